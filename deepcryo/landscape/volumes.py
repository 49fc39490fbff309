"""Volumes anywhere in the latent space of a trained VAE: at given points, along principal components, and
along a path through the data.

The three ways of choosing latent points are cryoDRGN's (``eval_vol --zfile``, ``analyze --pc``,
``graph_traversal``):

- **points**: one volume per row of a text or ``.npy`` file of latent coordinates;
- **principal components**: ``n`` points along each of the first principal components of the particles'
  latents (each coordinate in units of the encoder's σ, :class:`LatentPCA`: the analysis' ``dcPC`` axes), from
  one percentile of the particles' scores on that component to another (5 to 95 by default), the other
  components at zero (the latents' mean); the percentiles keep the ends inside the data;
- **path**: the shortest path between two particles in a k-nearest-neighbour graph of the particles'
  latents (edges weighted by Euclidean distance, symmetrised: an edge where either point is among the other's
  k nearest), so that every step stays where particles are; it is resampled to ``n`` points at equal arc
  length along the polyline through its nodes. Endpoints given as latent points are first moved to their
  nearest particle (the path runs through the data).

Each set is written into the output folder as ``<name>_NNN.mrc`` (the working box and pixel size of the
training, origin 0, in the particles' intensity units: the same volumes as the analysis' decoded maps) and
``<name>_z.txt`` (one latent row per volume); the path also as ``path_particles.txt`` (0-based particle
indices of its nodes, STAR order of ``particles_latent.star``). ``volumes.json`` lists every set.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.errors import InputError
from ..core.mrc import write_mrc
from ..core.particles import read_particles
from .model import LandscapeVAE
from .train import LATENT_STAR, latent_columns, latent_pixel_size_A, load_model, sigma_columns

logger = logging.getLogger(__name__)

__all__ = ["read_latent_file", "particle_latents", "latent_means", "latent_sigmas", "latent_noise_sd", "LatentPCA", "fit_pca",
           "pc_points", "percentile_scores", "knn_graph", "graph_path", "resample_path", "nearest_particle", "decode_volumes",
           "write_volume_set", "volumes"]

SUMMARY = "volumes.json"


def read_latent_file(path: str, latent_dim: int) -> np.ndarray:
    """(K, L) latent points from a text file (``numpy.loadtxt``: one row per point, ``#`` comments) or a
    ``.npy`` array; InputError if it cannot be read, is empty, not finite, or rows are not ``latent_dim`` long."""
    if not os.path.exists(path):
        raise InputError("%s: not found" % path)
    try:
        with warnings.catch_warnings():        # an empty file is reported below, not as a numpy warning
            warnings.simplefilter("ignore", UserWarning)
            z = np.load(path) if path.endswith(".npy") else np.loadtxt(path, ndmin=2)
    except (ValueError, OSError) as exc:
        raise InputError("%s: not a table of latent points (%s)" % (path, str(exc).splitlines()[0][:80]))
    z = np.asarray(z, dtype=np.float64)
    if z.ndim == 1 and len(z) == latent_dim:
        z = z[None]
    if z.ndim != 2 or z.shape[0] == 0:
        raise InputError("%s: expected one latent point per row, got an array of shape %s" % (path, z.shape))
    if z.shape[1] != latent_dim:
        raise InputError("%s: rows have %d values, the model's latent space has %d dimensions"
                         % (path, z.shape[1], latent_dim))
    if not np.all(np.isfinite(z)):
        raise InputError("%s: latent points must be finite numbers" % path)
    return z


def particle_latents(train_dir: str, latent_dim: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Latent means (N, L) of the training's particles (``particles_latent.star``, STAR order) and the encoder's
    standard deviations σ (N, L) (``dcZSigma…``; None for a training folder written before they were)."""
    path = os.path.join(train_dir, LATENT_STAR)
    if not os.path.exists(path):
        raise InputError("%s: not found (training did not finish)" % path)
    star = read_particles(path, require_images=False)
    star.require(*latent_columns(latent_dim))
    return latent_means(star.particles, latent_dim), latent_sigmas(star.particles, latent_dim)


def _columns(particles, names) -> np.ndarray:
    return np.stack([np.asarray(particles[c], dtype=np.float64) for c in names], 1)


def latent_means(particles, latent_dim: int) -> np.ndarray:
    """(N, L) latent means of the particles from a STAR table's ``dcLatent…`` columns (checked by the caller)."""
    return _columns(particles, latent_columns(latent_dim))


def latent_sigmas(particles, latent_dim: int) -> Optional[np.ndarray]:
    """(N, L) σ of the particles' latent coordinates from a STAR table's ``dcZSigma…`` columns, or None when it has
    none; InputError unless they are positive finite numbers (the PCA divides by them)."""
    names = sigma_columns(latent_dim)
    if not all(c in particles for c in names):
        return None
    sigma = _columns(particles, names)
    if not np.all(np.isfinite(sigma) & (sigma > 0)):
        raise InputError("the dcZSigma columns must hold positive finite numbers (the encoder's sigma)")
    return sigma


def latent_noise_sd(sigma: Optional[np.ndarray], latent_dim: int) -> np.ndarray:
    """(L,) root-mean-square over the particles of the encoder's σ (N, L) of each latent coordinate: the scale in
    which the analysis measures the latents (:class:`LatentPCA`, :func:`deepcryo.landscape.analyze.cluster_latents`);
    ones when ``sigma`` is None (older training folders, no ``dcZSigma`` columns)."""
    if sigma is None:
        return np.ones(latent_dim)
    return np.sqrt((np.asarray(sigma, dtype=np.float64) ** 2).mean(0))


class LatentPCA:
    """Principal components of the particles' latent means, measured in units of the encoder's own uncertainty.

    Why not the plain PCA of the means: a latent coordinate that the images do not pin down (σ of q(z|X) near 1,
    the prior's) still spreads the means, and its spread can exceed that of the coordinate which carries the
    conformation (σ ≪ 1). The plain first component then follows the wider, uninformative direction (measured on
    RELION-rendered two-state sets from estimated poses: the states on PC2, ``benchmarks/RESULTS.md``). Dividing
    each coordinate by its root-mean-square σ over the particles first (the latent means' covariance against the
    mean posterior covariance diag σ²: the maximum-noise-fraction transform, since that covariance is diagonal)
    ranks directions by spread over the particles per unit of a particle's uncertainty. Where the encoder gives no
    σ (older training folders) the scale is 1: the plain PCA.

    Scores (``transform``, the analysis' ``dcPC1 …``) are in those σ units; ``inverse_transform`` returns latent
    points. The attributes mirror scikit-learn's PCA: ``n_components_``, ``explained_variance_`` (variance of the
    scores), ``explained_variance_ratio_``, and ``noise_sd_`` (L,), the scale of each latent coordinate.
    """

    def __init__(self, z: np.ndarray, sigma: Optional[np.ndarray] = None) -> None:
        from sklearn.decomposition import PCA
        z = np.asarray(z, dtype=np.float64)
        self.noise_sd_ = latent_noise_sd(sigma, z.shape[1])
        self._pca = PCA(min(z.shape), random_state=0).fit(z / self.noise_sd_)
        self.n_components_ = self._pca.n_components_
        self.explained_variance_ = self._pca.explained_variance_
        self.explained_variance_ratio_ = self._pca.explained_variance_ratio_

    def transform(self, z: np.ndarray) -> np.ndarray:
        """Scores (N, C) of latent points (N, L)."""
        return self._pca.transform(np.asarray(z, dtype=np.float64) / self.noise_sd_)

    def inverse_transform(self, scores: np.ndarray) -> np.ndarray:
        """Latent points (N, L) of scores (N, C)."""
        return self._pca.inverse_transform(scores) * self.noise_sd_


def fit_pca(z: np.ndarray, sigma: Optional[np.ndarray] = None) -> LatentPCA:
    """:class:`LatentPCA` of latents ``z`` (N, L) with the encoder's σ (N, L), all components (the one basis of
    the analysis' ``dcPC`` columns and of every PC trajectory)."""
    return LatentPCA(z, sigma)


def pc_points(pca: LatentPCA, component: int, scores: np.ndarray) -> np.ndarray:
    """Latent points (S, L) at ``scores`` (S,) along principal component ``component`` (0-based) of a fitted
    :func:`fit_pca`, the other components at zero: ``mean + score · (s ⊙ u_j)``, u_j the unit direction of the
    scaled latents and s their scale (``noise_sd_``)."""
    comp = np.zeros((len(scores), pca.n_components_))
    comp[:, component] = scores
    return pca.inverse_transform(comp)


def percentile_scores(pca: LatentPCA, z: np.ndarray, component: int, n_points: int,
                      percentiles: Tuple[float, float]) -> np.ndarray:
    """``n_points`` evenly spaced scores on ``component`` between two percentiles of the particles' scores."""
    return np.linspace(*np.percentile(pca.transform(z)[:, component], percentiles), n_points)


def knn_graph(z: np.ndarray, neighbours: int):
    """Symmetric sparse (N, N) graph of the ``neighbours`` nearest particles of each, weighted by Euclidean
    distance (an edge where either point is among the other's nearest; zero distances become 1e-12 so that
    duplicates stay connected)."""
    from sklearn.neighbors import NearestNeighbors
    k = min(neighbours, len(z) - 1)
    graph = NearestNeighbors(n_neighbors=k).fit(z).kneighbors_graph(mode="distance")
    graph.data = np.maximum(graph.data, 1e-12)
    return graph.maximum(graph.T).tocsr()


def graph_path(z: np.ndarray, start: int, end: int, neighbours: int = 10) -> np.ndarray:
    """Particle indices of the shortest path from ``start`` to ``end`` in :func:`knn_graph` (both included);
    InputError when the graph does not connect them (more neighbours joins its components)."""
    from scipy.sparse.csgraph import dijkstra
    dist, pred = dijkstra(knn_graph(z, neighbours), indices=start, return_predecessors=True)
    if not np.isfinite(dist[end]):
        raise InputError("particles %d and %d are not connected in the %d-nearest-neighbour graph of the latents; "
                         "use more --neighbors" % (start, end, neighbours))
    path = [end]
    while path[-1] != start:
        path.append(int(pred[path[-1]]))
    return np.asarray(path[::-1], dtype=np.int64)


def resample_path(points: np.ndarray, n_points: int) -> np.ndarray:
    """(n_points, L) points at equal arc length along the polyline through ``points`` (M, L), ends included."""
    step = np.linalg.norm(np.diff(points, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(step)])
    if arc[-1] == 0:
        return np.repeat(points[:1], n_points, 0)
    at = np.linspace(0.0, arc[-1], n_points)
    return np.stack([np.interp(at, arc, points[:, j]) for j in range(points.shape[1])], 1)


def nearest_particle(z: np.ndarray, point: np.ndarray) -> int:
    """Index of the particle whose latent (row of ``z``) is nearest to ``point`` (L,)."""
    return int(np.argmin(((z - point) ** 2).sum(1)))


def decode_volumes(model: LandscapeVAE, z: np.ndarray, scale: float) -> np.ndarray:
    """Decoded volumes (K, D, D, D) at latent points ``z`` (K, L), in the particles' intensity units (× the
    training's image ``scale``), as the analysis' ``cluster_KK_decoded.mrc``."""
    return model.volume(torch.as_tensor(np.asarray(z), dtype=torch.float32)).cpu().numpy() * scale


def write_volume_set(folder: str, name: str, model: LandscapeVAE, z: np.ndarray, scale: float,
                     pixel_size_A: float) -> Dict[str, object]:
    """Decode and write ``name_NNN.mrc`` (1-based) and ``name_z.txt`` for points ``z`` (K, L); returns the
    set's entry of ``volumes.json``."""
    files = []
    for start in range(0, len(z), 16):     # a few volumes at a time: K·D³ floats need not fit at once
        for i, vol in enumerate(decode_volumes(model, z[start:start + 16], scale), start + 1):
            files.append("%s_%03d.mrc" % (name, i))
            write_mrc(os.path.join(folder, files[-1]), vol, pixel_size_A)
    np.savetxt(os.path.join(folder, name + "_z.txt"), z, fmt="%.17g",
               header="latent points of %s_001.mrc ... %s_%03d.mrc, one row per volume" % (name, name, len(z)))
    return {"volumes": files, "z_file": name + "_z.txt"}


def _path_end(value: int, z: np.ndarray, what: str) -> int:
    if not 0 <= value < len(z):
        raise InputError("%s particle index %d out of range (0 to %d)" % (what, value, len(z) - 1))
    return int(value)


def volumes(train_dir: str, output_dir: str, zfile: Optional[str] = None, n_pcs: int = 0, pc_points_n: int = 10,
            percentiles: Sequence[float] = (5.0, 95.0), path_particles: Optional[Sequence[int]] = None,
            path_zfile: Optional[str] = None, path_rows: Optional[Sequence[int]] = None, path_points: int = 10,
            neighbours: int = 10) -> str:
    """Decode volumes of a training folder at chosen latent points; returns the path of ``volumes.json``.

    Args:
        zfile: text or ``.npy`` file of latent points (one row each) → set ``vol``.
        n_pcs: number of principal components with ``pc_points_n`` points each between the ``percentiles``
            (two values, 0–100) of the particles' scores → sets ``pc1``, ``pc2`` …
        path_particles: two 0-based particle indices (STAR order), or ``path_zfile`` with ``path_rows`` (two
            1-based rows; default first and last) whose points are moved to their nearest particles → set
            ``path``, ``path_points`` volumes along the k-NN graph path (``neighbours`` per particle).
    """
    model, ckpt = load_model(train_dir)
    dim, scale = model.latent_dim, float(ckpt["config"]["scale"])
    if zfile is None and n_pcs == 0 and path_particles is None and path_zfile is None:
        raise InputError("nothing to decode: give --zfile, --pc or --path-particles/--path-zfile")
    if path_particles is not None and path_zfile is not None:
        raise InputError("give --path-particles or --path-zfile, not both")
    if n_pcs < 0 or n_pcs > dim:
        raise InputError("--pc %d: between 0 and the latent dimension %d" % (n_pcs, dim))
    if pc_points_n < 2 or path_points < 2 or neighbours < 1:
        raise InputError("need --pc-points >= 2, --path-points >= 2 and --neighbors >= 1")
    lo, hi = percentiles
    if not 0 <= lo < hi <= 100:
        raise InputError("--percentiles %g %g: need 0 <= low < high <= 100" % (lo, hi))
    points = read_latent_file(zfile, dim) if zfile else None
    z, sigma = particle_latents(train_dir, dim) if (n_pcs or path_particles is not None or path_zfile) else (None, None)
    ends = None
    if path_particles is not None:
        ends = [_path_end(int(i), z, w) for i, w in zip(path_particles, ("start", "end"))]
    elif path_zfile:
        anchors = read_latent_file(path_zfile, dim)
        rows = list(path_rows) if path_rows else [1, len(anchors)]
        if len(anchors) < 2 and not path_rows:
            raise InputError("%s: a path needs two latent points (rows), found %d" % (path_zfile, len(anchors)))
        for r in rows:
            if not 1 <= r <= len(anchors):
                raise InputError("--path-rows %d: %s has rows 1 to %d" % (r, path_zfile, len(anchors)))
        ends = [nearest_particle(z, anchors[r - 1]) for r in rows]
    px = latent_pixel_size_A(train_dir)
    os.makedirs(output_dir, exist_ok=True)
    summary: Dict[str, object] = {"train_dir": os.path.abspath(train_dir), "pixel_size_A": px, "box": model.box,
                                  "sets": {}}
    sets: Dict[str, Dict[str, object]] = summary["sets"]     # type: ignore[assignment]
    if points is not None:
        sets["vol"] = write_volume_set(output_dir, "vol", model, points, scale, px)
    pca = fit_pca(z, sigma) if n_pcs else None
    for j in range(n_pcs):
        scores = percentile_scores(pca, z, j, pc_points_n, (lo, hi))
        entry = write_volume_set(output_dir, "pc%d" % (j + 1), model, pc_points(pca, j, scores), scale, px)
        sets["pc%d" % (j + 1)] = dict(entry, percentiles=[lo, hi], scores=scores.tolist())
    if ends is not None:
        nodes = graph_path(z, ends[0], ends[1], neighbours)
        entry = write_volume_set(output_dir, "path", model, resample_path(z[nodes], path_points), scale, px)
        np.savetxt(os.path.join(output_dir, "path_particles.txt"), nodes, fmt="%d",
                   header="0-based particle indices (particles_latent.star order) of the path's nodes")
        sets["path"] = dict(entry, particles=nodes.tolist(), neighbors=neighbours)
        logger.info("path from particle %d to %d: %d nodes in the %d-NN graph, %d volumes", ends[0], ends[1],
                    len(nodes), neighbours, path_points)
    path = os.path.join(output_dir, SUMMARY)
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    logger.info("%d volumes written to %s (%.3f Å/px, box %d)",
                sum(len(s["volumes"]) for s in sets.values()), output_dir, px, model.box)
    return path

