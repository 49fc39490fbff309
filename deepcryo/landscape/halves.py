"""Gold-standard halves of a landscape: two VAEs trained independently on the two half sets, and how well
their landscapes agree.

A landscape, like a map, can be shaped by noise: a VAE finds structure in any data. RELION's answer for maps
is the gold standard (two half sets refined apart, compared by FSC); here the two halves are trained apart
(:func:`train_halves`: the particles' own ``rlnRandomSubset`` when present, as RELION and SwiftRes write it,
else a seeded random split, :func:`deepcryo.core.reconstruct.half_split`) and compared on every particle
(:func:`compare_halves`), both encoders seeing the same images:

- **latent correspondence**: the latents of the two encoders are in different coordinates (any invertible map
  of a latent space is an equally good latent space), so they are compared after the best affine map of
  half 2's onto half 1's (least squares): ``r2_half2_to_half1`` = 1 − residual / total variance of half 1's
  latents, summed over dimensions (and the reverse map); the canonical correlations of the two latent sets
  (1 for every direction one set determines linearly in the other, ≈ 0 for unrelated sets);
- **clusters**: k-means (K clusters, as the analysis) on each half's latents; the adjusted Rand index of the
  two labelings (1: the same partition of the particles, 0: chance);
- **volumes per conformation**: for each of half 1's clusters, half 1's decoded volume at its centre and half
  2's at the mean half-2 latent of the same particles (the corresponding point); their FSC (within the
  decoder's spherical mask) is the gold-standard FSC of that conformation: ``fsc05_A``, ``fsc0143_A``
  (RELION's reading of the curve) and the mean FSC over shells 1 … D/2.

A landscape that both halves learn agrees on all three; one trained on noise agrees on none (measured:
README "Gold-standard halves").
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict

import numpy as np

from ..core.errors import InputError
from ..core.fsc import fsc, fsc_resolution_A
from ..core.particles import write_particles
from ..core.reconstruct import half_split
from .analyze import cluster_latents
from .dataset import ParticleBatches, load_particles
from .distributed import read_launch
from .train import encode_posterior, latent_pixel_size_A, load_model, train
from .volumes import decode_volumes

logger = logging.getLogger(__name__)

__all__ = ["train_halves", "compare_halves", "affine_r2", "canonical_correlations", "SUMMARY"]

SUMMARY = "halves.json"


def affine_r2(source: np.ndarray, target: np.ndarray) -> float:
    """R² of the least-squares affine map of ``source`` (N, L1) onto ``target`` (N, L2): 1 − Σ residual² /
    Σ (target − mean)², summed over the target's dimensions."""
    x = np.concatenate([source, np.ones((len(source), 1))], 1)
    w = np.linalg.lstsq(x, target, rcond=None)[0]
    total = ((target - target.mean(0)) ** 2).sum()
    return float(1.0 - ((target - x @ w) ** 2).sum() / max(total, 1e-300))


def canonical_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Canonical correlations (descending) of two sets of variables (N, La), (N, Lb): the singular values of
    ``Uaᵀ Ub``, U an orthonormal basis of each centred set's column space (degenerate directions dropped)."""
    def basis(x):
        u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
        return u[:, s > 1e-9 * s[0]] if s[0] > 0 else u[:, :0]
    return np.linalg.svd(basis(a).T @ basis(b), compute_uv=False)


def compare_halves(half1_dir: str, half2_dir: str, particles: str, n_clusters: int = 2, batch_size: int = 256,
                   device: str = "cpu") -> Dict[str, Any]:
    """Agreement of two trained halves on every particle of ``particles`` (see the module docstring); the
    particles are encoded on ``device``."""
    from sklearn.metrics import adjusted_rand_score
    if n_clusters < 1:
        raise InputError("--clusters must be >= 1")
    star = load_particles(particles)
    if n_clusters > len(star):
        raise InputError("%s: %d particles cannot make %d clusters" % (particles, len(star), n_clusters))
    models, latents, sigmas = [], [], []
    for folder in (half1_dir, half2_dir):
        model, ckpt = load_model(folder, device)
        data = ParticleBatches(star, ckpt["config"]["box"], scale=ckpt["config"]["scale"])
        posterior = encode_posterior(model, data, batch_size, device)
        latents.append(posterior.z.astype(np.float64))
        sigmas.append(posterior.sigma.astype(np.float64))
        data.close()
        models.append((model, float(ckpt["config"]["scale"])))
    if models[0][0].box != models[1][0].box:
        raise InputError("the halves were trained at different boxes (%d and %d px)"
                         % (models[0][0].box, models[1][0].box))
    z1, z2 = latents
    labels1, centres1 = cluster_latents(z1, n_clusters, sigma=sigmas[0])
    labels2, _ = cluster_latents(z2, n_clusters, sigma=sigmas[1])
    px = latent_pixel_size_A(half1_dir)
    mask = models[0][0].mask3d.cpu().numpy()
    conformations = []
    for c in range(n_clusters):
        members = labels1 == c
        v1 = decode_volumes(models[0][0], centres1[c:c + 1], models[0][1])[0]
        v2 = decode_volumes(models[1][0], z2[members].mean(0, keepdims=True), models[1][1])[0]
        curve = fsc(v1 * mask, v2 * mask)
        conformations.append({"cluster": c + 1, "particles": int(members.sum()),
                              "fsc05_A": fsc_resolution_A(curve, px, 0.5),
                              "fsc0143_A": fsc_resolution_A(curve, px, 0.143),
                              "mean_fsc": float(curve[1:].mean()), "fsc": curve.tolist()})
    return {"particles": len(star), "clusters": n_clusters, "pixel_size_A": px,
            "r2_half2_to_half1": affine_r2(z2, z1), "r2_half1_to_half2": affine_r2(z1, z2),
            "canonical_correlations": canonical_correlations(z1, z2).tolist(),
            "cluster_ari": float(adjusted_rand_score(labels1, labels2)), "conformations": conformations}


def train_halves(particles: str, output_dir: str, n_clusters: int = 2, seed: int = 0,
                 **train_args: Any) -> str:
    """Split ``particles`` into half sets, train one VAE on each (``half1/``, ``half2/``, same options, ``train``'s
    keywords ``train_args``), compare them (:func:`compare_halves`) and write ``halves.json``; returns its path.

    The halves are ``rlnRandomSubset`` (1/2) when the STAR has it, else a random split seeded by ``seed``; the
    split is written as ``half1.star`` and ``half2.star``. With ``resume`` each half continues its checkpoint.
    One process (several GPUs: ``devices``, one DDP process each, spawned per half); the particles are
    encoded for the comparison on the first device.
    """
    if read_launch(os.environ).world_size > 1:
        raise InputError("halves runs as one process (not under srun or torchrun): give several GPUs with "
                         "--device cuda:0,cuda:1")
    star = load_particles(particles)
    halves = half_split(star, seed)
    if min(np.sum(halves == 1), np.sum(halves == 2)) < 2:
        raise InputError("%s: each half set needs at least 2 particles (rlnRandomSubset 1 and 2)" % particles)
    ParticleBatches(star, train_args.get("box")).close()   # images and box checked before anything is written
    os.makedirs(output_dir, exist_ok=True)
    dirs = []
    for h in (1, 2):
        half_star = os.path.join(output_dir, "half%d.star" % h)
        write_particles(half_star, star.subset(halves == h))
        dirs.append(os.path.join(output_dir, "half%d" % h))
        logger.info("half %d: %d particles", h, int(np.sum(halves == h)))
        train(half_star, dirs[-1], seed=seed, **train_args)
    summary = compare_halves(dirs[0], dirs[1], particles, n_clusters,
                             batch_size=max(64, int(train_args.get("batch_size", 64))),
                             device=list(train_args.get("devices", ["cpu"]))[0])
    summary["split"] = "rlnRandomSubset" if "rlnRandomSubset" in star.particles else "random (seed %d)" % seed
    path = os.path.join(output_dir, SUMMARY)
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    log_agreement(summary)
    return path


def log_agreement(summary: Dict[str, Any]) -> None:
    """Log the agreement figures of a :func:`compare_halves` summary (one line each)."""
    logger.info("halves agree: R² half 2 → half 1 %.3f (half 1 → half 2 %.3f); canonical correlations %s; "
                "k-means ARI %.3f", summary["r2_half2_to_half1"], summary["r2_half1_to_half2"],
                np.round(summary["canonical_correlations"], 3).tolist(), summary["cluster_ari"])
    for c in summary["conformations"]:
        logger.info("cluster %d (%d particles): half-map FSC 0.5 at %.1f Å, 0.143 at %.1f Å, mean FSC %.3f",
                    c["cluster"], c["particles"], c["fsc05_A"], c["fsc0143_A"], c["mean_fsc"])
