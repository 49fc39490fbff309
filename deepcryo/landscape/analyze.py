"""Analysis of a trained landscape VAE: embeddings, landscape, clusters, volumes and trajectories.

Writes into ``train_dir/analysis`` or ``--output-dir`` (built in a temporary folder and renamed when complete):

- ``particles.star``: the particles with ``dcLatent01`` …, ``dcPC1``, ``dcPC2`` (scores on the principal
  components of the latent means, each latent coordinate in units of the encoder's root-mean-square σ: see
  :class:`deepcryo.landscape.volumes.LatentPCA` for why), ``dcUMAP1/2`` when umap-learn is installed and asked
  for, and ``dcCluster`` (1-based k-means label);
- ``landscape.png``: PC1–PC2 coloured by cluster, the density and ``−ln density`` (the "free-energy" view;
  ``kT`` units up to a constant); ``landscape_umap.png`` likewise; ``bic.png``: GMM BIC against K;
- ``cluster_centres.txt``: the k-means centres, one latent row per cluster (a ``--zfile`` for ``volumes``);
- ``cluster_KK_decoded.mrc`` (decoder at the k-means centre) and ``cluster_KK_reconstructed.mrc``
  (the cluster's particles reconstructed with :class:`deepcryo.core.reconstruct.Reconstructor` at their
  consensus poses); their FSC says whether the decoder can be trusted (``fsc.png``);
- ``pcJ_stepSS.mrc``: volumes along principal component J from −2 to +2 standard deviations of its scores;
- ``dcOrder`` in ``particles.star`` and ``order_stepSS.mrc``: each particle's position along the landscape's main
  curve (:func:`deepcryo.landscape.ordering.landscape_order`) and volumes at the mean latent of equal-count bins
  along it: the trajectory of a continuous motion when the landscape is curved and PC1 mixes its ends
  (``order_pc1_rho`` in the summary says how far PC1 follows it);
- ``summary.json``: K suggested by the BIC elbow (:func:`suggest_clusters`), BIC values, cluster sizes, FSC
  resolutions (Å), the components' explained variance ratios, the scale of each latent coordinate
  (``pca_latent_scale``, the root-mean-square σ) and how many coordinates are active
  (``active_coordinates``, :func:`deepcryo.landscape.train.report_active_coordinates`; 0: a flat landscape).

Volumes are at the working box and pixel size of the training, in the particles' intensity units.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import List, Optional, Tuple

import numpy as np

from ..core.errors import InputError
from ..core.fsc import fsc, fsc_resolution_A, shell_frequencies
from ..core.mrc import write_mrc
from ..core.particles import read_particles, write_particles
from ..core.reconstruct import Reconstructor
from .dataset import ParticleBatches
from .density import draw_density_panels
from .ordering import landscape_order, order_points
from .train import LATENT_STAR, latent_columns, load_model, report_active_coordinates
from .volumes import decode_volumes, fit_pca, latent_means, latent_noise_sd, latent_sigmas, pc_points

logger = logging.getLogger(__name__)

CENTRES = "cluster_centres.txt"

__all__ = ["analyze", "suggest_clusters", "cluster_latents"]


def suggest_clusters(z: np.ndarray, max_clusters: int, seed: int = 0, min_variance_ratio: float = 0.02,
                     elbow_fraction: float = 1.0 / 3.0, sigma: Optional[np.ndarray] = None) -> Tuple[int, List[float]]:
    """K suggested by Gaussian-mixture BIC on the informative principal components of latents z (N, L), each
    coordinate in units of the encoder's σ (N, L) as :func:`cluster_latents` clusters them (plain without ``sigma``).

    The GMM (full covariances) is fitted on the principal components that explain at least
    ``min_variance_ratio`` of the latent variance (collapsed latent dimensions only add noise). Real
    clusters are not Gaussian (tails along the landscape), so the BIC keeps decreasing slowly past the true
    K; the suggestion is the elbow: the smallest K whose step to K+1 gains less than ``elbow_fraction``
    of the largest single-step BIC gain. Returns (K, BIC values for K = 1 … max_clusters).
    """
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture
    z = np.asarray(z, dtype=np.float64) / latent_noise_sd(sigma, z.shape[1])
    pca = PCA(min(z.shape), random_state=seed).fit(z)
    keep = max(1, int(np.sum(pca.explained_variance_ratio_ >= min_variance_ratio)))
    y = pca.transform(z)[:, :keep]
    ks = range(1, max(1, min(max_clusters, len(z) - 1)) + 1)
    bic = np.array([GaussianMixture(k, covariance_type="full", random_state=seed, n_init=2).fit(y).bic(y)
                    for k in ks])
    gains = -np.diff(bic)
    if len(gains) == 0 or gains.max() <= 0:
        return 1, bic.tolist()
    small = np.nonzero(gains < elbow_fraction * gains.max())[0]
    return int(small[0] + 1 if len(small) else len(bic)), bic.tolist()


def cluster_latents(z: np.ndarray, n_clusters: int, seed: int = 0, sigma: Optional[np.ndarray] = None
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """k-means of latents z (N, L), each coordinate divided by its root-mean-square encoder σ over the particles
    (``sigma`` (N, L); plain k-means without it): labels (N,) 0-based and centres (K, L) in latent units (the mean
    latent of each cluster's particles).

    Why the σ units: for the reason of :class:`.volumes.LatentPCA`, whose PCs are measured in them. A coordinate
    that the images do not pin down (σ near the prior's 1) can spread the latent means as widely as the one that
    carries the states, and plain k-means then cuts along it; per unit of a particle's own uncertainty the
    informative coordinate dominates. Measured on the stored landscapes of RELION-rendered sets with discrete states
    (``benchmarks/RESULTS.md``, "Clusters in units of the encoder's σ").
    """
    from sklearn.cluster import KMeans
    scale = latent_noise_sd(sigma, z.shape[1])
    km = KMeans(n_clusters, n_init=10, random_state=seed).fit(np.asarray(z, dtype=np.float64) / scale)
    return km.labels_, km.cluster_centers_ * scale


def _abs_spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr
    rho = spearmanr(a, b).correlation
    return float(abs(rho)) if np.isfinite(rho) else 0.0


def _plot_landscape(path, xy, labels, names):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.6))
    ax[0].scatter(xy[:, 0], xy[:, 1], c=labels, s=2, cmap="tab10")
    ax[0].set_title("clusters")
    draw_density_panels(fig, ax[1], ax[2], xy)
    for a in ax:
        a.set_xlabel(names[0])
        a.set_ylabel(names[1])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_curves(path, x, curves, xlabel, ylabel, labels):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for c, lab in zip(curves, labels):
        ax.plot(x, c, marker=".", label=lab)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cluster_reconstruction(data: ParticleBatches, indices: np.ndarray, batch_size: int = 256,
                           symmetry: str = "C1") -> np.ndarray:
    """Map (D, D, D) of particles ``indices`` at their consensus poses (point group ``symmetry``), in the
    dataset's intensity scale."""
    rec = Reconstructor(data.box, symmetry=symmetry)
    for start in range(0, len(indices), batch_size):
        spectra, rot, ctf = data.get(np.sort(indices[start:start + batch_size]))
        rec.insert(spectra * ctf, ctf * ctf, rot)
    return rec.reconstruct()


def analyze(train_dir: str, n_clusters: int = 0, max_clusters: int = 8, trajectory_steps: int = 7, n_pcs: int = 2,
            umap: bool = True, seed: int = 0, output_dir: Optional[str] = None) -> str:
    """Analyse a training folder; returns the path of ``summary.json`` in the output folder.

    Args:
        output_dir: output folder (replaced when complete); default ``train_dir/analysis``.
        n_clusters: K for k-means; 0 takes the K suggested by the GMM BIC.
        max_clusters: largest K tried by the BIC.
        trajectory_steps: volumes along each of the first ``n_pcs`` principal components.
        umap: also embed with UMAP when umap-learn is installed.
    """
    if n_clusters < 0 or max_clusters < 1 or trajectory_steps < 2 or n_pcs < 1:
        raise InputError("need --clusters >= 0, --max-clusters >= 1, --trajectory-steps >= 2 and --pcs >= 1")
    star_path = os.path.join(train_dir, LATENT_STAR)
    model, ckpt = load_model(train_dir)
    if not os.path.exists(star_path):
        raise InputError("%s: not found (training did not finish)" % star_path)
    cfg = ckpt["config"]
    star = read_particles(star_path)
    star.require(*latent_columns(model.latent_dim))
    z = latent_means(star.particles, model.latent_dim)
    if len(z) < 2 or n_clusters > len(z):
        raise InputError("%s: %d particles cannot make %d clusters" % (star_path, len(z), n_clusters))
    n_pcs = min(n_pcs, z.shape[1])
    sigma = latent_sigmas(star.particles, model.latent_dim)
    if sigma is None:
        logger.info("%s has no dcZSigma columns (an older training): plain PCA of the latent means", star_path)
    pca = fit_pca(z, sigma)
    active = report_active_coordinates(z)
    pcs = pca.transform(z)
    order = landscape_order(z / pca.noise_sd_, seed=seed, reference=pcs[:, 0])
    order_pc1_rho = _abs_spearman(order, pcs[:, 0])
    suggested, bic = suggest_clusters(z, max_clusters, seed, sigma=sigma)
    k = n_clusters or suggested
    labels, centres = cluster_latents(z, k, seed, sigma)
    logger.info("latent %d-dim, PCA explained variance %s; GMM BIC suggests K = %d; using K = %d",
                z.shape[1], np.round(pca.explained_variance_ratio_[:4], 3).tolist(), suggested, k)

    final = os.path.abspath(output_dir or os.path.join(train_dir, "analysis"))
    os.makedirs(os.path.dirname(final), exist_ok=True)
    work = tempfile.mkdtemp(prefix=".analysis.", dir=os.path.dirname(final))
    try:
        data = ParticleBatches(star, cfg["box"], scale=cfg["scale"])
        px, scale = data.pixel_size_A, data.scale
        out = star.copy()
        out.particles["dcPC1"] = pcs[:, 0]
        out.particles["dcPC2"] = pcs[:, 1] if pcs.shape[1] > 1 else np.zeros(len(z))
        out.particles["dcOrder"] = order
        out.particles["dcCluster"] = labels.astype(np.int64) + 1
        xy = np.stack([out.particles["dcPC1"], out.particles["dcPC2"]], 1)
        _plot_landscape(os.path.join(work, "landscape.png"), xy, labels, ("PC1", "PC2"))
        embedding = None
        if umap:
            try:
                import umap as umap_module
            except ImportError:
                logger.info("umap-learn is not installed: PCA landscape only")
            else:
                embedding = umap_module.UMAP(n_components=2, random_state=seed).fit_transform(z)
                out.particles["dcUMAP1"], out.particles["dcUMAP2"] = embedding[:, 0], embedding[:, 1]
                _plot_landscape(os.path.join(work, "landscape_umap.png"), embedding, labels, ("UMAP1", "UMAP2"))
        _plot_curves(os.path.join(work, "bic.png"), np.arange(1, len(bic) + 1), [bic], "K",
                     "GMM BIC (informative PCs)", ["BIC"])
        write_particles(os.path.join(work, "particles.star"), out)
        np.savetxt(os.path.join(work, CENTRES), centres, fmt="%.17g",
                   header="k-means centres (latent coordinates), one row per cluster, cluster 1 first")

        decoded = decode_volumes(model, centres, scale)
        mask = model.mask3d.numpy()
        clusters, curves = [], []
        for c in range(k):
            members = np.nonzero(labels == c)[0]
            recon = cluster_reconstruction(data, members, symmetry=cfg.get("symmetry", "C1")) * scale
            write_mrc(os.path.join(work, "cluster_%02d_decoded.mrc" % (c + 1)), decoded[c], px)
            write_mrc(os.path.join(work, "cluster_%02d_reconstructed.mrc" % (c + 1)), recon, px)
            curve = fsc(decoded[c] * mask, recon * mask)
            curves.append(curve)
            clusters.append({"cluster": c + 1, "particles": int(len(members)),
                             "decoded_vs_reconstructed_fsc05_A": fsc_resolution_A(curve, px, 0.5),
                             "decoded_vs_reconstructed_fsc0143_A": fsc_resolution_A(curve, px, 0.143)})
            logger.info("cluster %d: %d particles, decoded vs reconstructed FSC 0.5 at %.1f Å",
                        c + 1, len(members), clusters[-1]["decoded_vs_reconstructed_fsc05_A"])
        _plot_curves(os.path.join(work, "fsc.png"), shell_frequencies(data.box, px), curves, "1/Å",
                     "FSC decoded vs reconstructed", ["cluster %d" % (c + 1) for c in range(k)])
        data.close()

        steps = np.linspace(-2.0, 2.0, trajectory_steps)
        for j in range(n_pcs):
            vols = decode_volumes(model, pc_points(pca, j, steps * np.sqrt(pca.explained_variance_[j])), scale)
            for s, v in enumerate(vols):
                write_mrc(os.path.join(work, "pc%d_step%02d.mrc" % (j + 1, s + 1)), v, px)
        for s, v in enumerate(decode_volumes(model, order_points(z, order, min(trajectory_steps, len(z))), scale)):
            write_mrc(os.path.join(work, "order_step%02d.mrc" % (s + 1)), v, px)
        if active and order_pc1_rho < 0.9:
            logger.info("PC1 follows the landscape's order with |rho| %.2f only: for a continuous motion the "
                        "landscape is curved, the order_step volumes (dcOrder) follow it and the pc1_step ones mix "
                        "its ends", order_pc1_rho)
        summary = {"suggested_clusters": suggested, "clusters_used": k, "bic": bic,
                   "pca_explained_variance_ratio": pca.explained_variance_ratio_.tolist(),
                   "pca_latent_scale": pca.noise_sd_.tolist(), "active_coordinates": active,
                   "umap": embedding is not None, "pixel_size_A": px, "box": data.box, "clusters": clusters,
                   "trajectory_sd": steps.tolist(), "order_pc1_rho": order_pc1_rho}
        with open(os.path.join(work, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    logger.info("analysis written to %s", final)
    return os.path.join(final, "summary.json")
