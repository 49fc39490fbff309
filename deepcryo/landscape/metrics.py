"""Accuracy of a landscape run against a simulation's truth (used by the tests and benchmarks/landscape.py).

- :func:`pose_error_deg`: angular error (degrees) of predicted poses after the best global rotation and hand;
- :func:`state_ari` / :func:`hinge_rho`: adjusted Rand index of k-means (K = the number of true states) on the
  latents against the true states, and |Spearman ρ| of the latent PC1 against the true hinge parameter;
- :func:`neighbour_rho`: the same ρ for the hinge predicted from each particle's nearest latents (curved landscapes);
- CryoBench's volume scores (``benchmarks/landscape_cryobench.py``): :func:`fsc_auc` (area under an FSC curve),
  :func:`moving_mask` (where the true conformations differ), :func:`scoring_masks` (whole particle and moving
  region), :func:`conformation_means` (mean latent of each conformation's particles) and
  :func:`conformation_fsc_auc` (per-conformation FSC-AUC against the truth).
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch

from ..core.fourier import soft_edge
from ..core.fsc import masked_fsc, solvent_corrected_fsc, spherical_mask
from ..core.geometry import euler_to_matrix, rotation_angle_deg

__all__ = ["pose_error_deg", "state_ari", "hinge_rho", "neighbour_rho", "latents", "fsc_auc", "moving_mask", "scoring_masks",
           "conformation_means", "conformation_fsc_auc"]

_MIRROR = np.diag([1.0, 1.0, -1.0])


def _project_so3(m):
    u, _, vt = np.linalg.svd(m)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def _aligned_errors(pred, true, iterations=5):
    """Per-particle angles (deg) between true·G and pred, G the robust global rotation (trimmed Procrustes)."""
    rel = np.einsum("nji,njk->nik", true, pred)              # trueᵀ·pred, = G for a perfect prediction
    keep = np.ones(len(rel), bool)
    for _ in range(iterations):
        g = _project_so3(rel[keep].sum(0))
        err = rotation_angle_deg(torch.from_numpy(np.einsum("nij,jk->nik", true, g).transpose(0, 2, 1) @ pred)).numpy()
        keep = err <= np.median(err)
    return err


def pose_error_deg(pred_angles_deg: np.ndarray, true_angles_deg: np.ndarray) -> Tuple[float, float]:
    """Median angular error (deg) of predicted poses against the truth, and the chance level.

    The learned volume has its own frame and hand, so the predictions are compared after the best global
    rotation G (robust Procrustes on A_trueᵀ·A_pred) in either hand (A or M·A·M, M = diag(1, 1, −1)); the
    chance level is the same statistic for the predictions paired with shuffled truths.
    Returns ``(median error, chance median)`` in degrees.
    """
    pred = euler_to_matrix(torch.as_tensor(np.asarray(pred_angles_deg, dtype=np.float64))).numpy()
    true = euler_to_matrix(torch.as_tensor(np.asarray(true_angles_deg, dtype=np.float64))).numpy()
    mirrored = _MIRROR @ pred @ _MIRROR
    err = min(np.median(_aligned_errors(p, true)) for p in (pred, mirrored))
    shuffled = true[np.random.default_rng(0).permutation(len(true))]
    chance = min(np.median(_aligned_errors(p, shuffled)) for p in (pred, mirrored))
    return float(err), float(chance)


def latents(star, sigma_units: bool = False) -> np.ndarray:
    """(N, L) latent coordinates ``dcLatent01`` … of a particle STAR; with ``sigma_units``, each divided by its
    root-mean-square encoder σ over the particles (``dcZSigma…``; unscaled where the STAR has none): the units in
    which ``analyze`` measures them (its PCA and k-means), so that scores of deepcryo's latents are those of its
    analysis."""
    from .volumes import latent_noise_sd, latent_sigmas
    cols = sorted(c for c in star.particles if c.startswith("dcLatent"))
    z = np.stack([np.asarray(star.particles[c], dtype=np.float64) for c in cols], 1)
    if not sigma_units:
        return z
    return z / latent_noise_sd(latent_sigmas(star.particles, z.shape[1]), z.shape[1])


def state_ari(z: np.ndarray, true_states: np.ndarray, seed: int = 0) -> float:
    """Adjusted Rand index of k-means on latents ``z`` (N, L) (``analyze``'s :func:`.analyze.cluster_latents`), K =
    the number of distinct true states (N,), against those states (0: chance, 1: the states found exactly). For
    deepcryo's latents as its analysis clusters them, pass ``latents(star, sigma_units=True)``."""
    from sklearn.metrics import adjusted_rand_score
    from .analyze import cluster_latents
    labels, _ = cluster_latents(z, len(np.unique(true_states)), seed)
    return float(adjusted_rand_score(np.asarray(true_states), labels))


def neighbour_rho(z: np.ndarray, hinge: np.ndarray, neighbours: int = 50, folds: int = 5, seed: int = 0) -> float:
    """|Spearman ρ| between the hinge parameter (N,) and its prediction from each particle's ``neighbours`` nearest
    latents (N, L) (k-nearest-neighbour regression, ``folds``-fold cross-validated, the particles shuffled by
    ``seed``): how well the latent orders a 1-D motion whatever the shape of the curve it runs along.

    Why beside :func:`hinge_rho`: a latent can order the conformations along a curve through several coordinates,
    which a straight first component does not follow (measured on RELION-rendered motions, ``benchmarks/RESULTS.md``);
    this is a probe of the ordering the latent holds, not of an axis a user reads off."""
    from scipy.stats import spearmanr
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.neighbors import KNeighborsRegressor
    hinge = np.asarray(hinge, dtype=np.float64)
    predicted = cross_val_predict(KNeighborsRegressor(min(neighbours, len(z) - len(z) // folds - 1)), z, hinge,
                                  cv=KFold(folds, shuffle=True, random_state=seed))
    return float(abs(spearmanr(predicted, hinge).correlation))


def order_rho(z: np.ndarray, hinge: np.ndarray) -> float:
    """|Spearman ρ| of the landscape's order (:func:`deepcryo.landscape.ordering.landscape_order`, what ``analyze``
    writes as ``dcOrder``) against the hinge parameter: the ordering a user reads off, along a curved landscape
    too, where :func:`hinge_rho` (PC1) fails and :func:`neighbour_rho` only probes."""
    from scipy.stats import spearmanr
    from .ordering import landscape_order
    return float(abs(spearmanr(landscape_order(z), np.asarray(hinge)).correlation))


def hinge_rho(z: np.ndarray, hinge: np.ndarray) -> float:
    """|Spearman ρ| of the first principal component of latents ``z`` (N, L) against the hinge parameter."""
    from scipy.stats import spearmanr
    from sklearn.decomposition import PCA
    pc1 = PCA(1).fit_transform(z)[:, 0]
    return float(abs(spearmanr(pc1, np.asarray(hinge)).correlation))


def fsc_auc(curve: np.ndarray) -> float:
    """Area under an FSC curve of shells 0 … N/2 (:func:`deepcryo.core.fsc.fsc`) against the spatial frequency in
    1/px, 0 to Nyquist (0.5), by the trapezoid rule: CryoBench's FSC-AUC (its ``auc(pixres, fsc)``, pixres =
    shell / N), so identical maps score 0.5 and the published figures (e.g. 0.366 for cryoDRGN on IgG-1D) are on
    this scale."""
    curve = np.asarray(curve, dtype=np.float64)
    freq = np.arange(len(curve)) / (2.0 * (len(curve) - 1))
    return float(np.sum((curve[1:] + curve[:-1]) * np.diff(freq)) / 2.0)


def moving_mask(volumes: np.ndarray, fraction: float = 0.2, extend_px: float = 1.0,
                soft_px: float = 2.0) -> np.ndarray:
    """(N, N, N) soft mask, values in [0, 1], of the region where the true conformations ``volumes`` (K, N, N, N)
    differ: the voxels whose standard deviation over the K maps exceeds ``fraction`` of its maximum, extended by
    ``extend_px`` and given a raised-cosine edge ``soft_px`` wide (relion_mask_create's ``--ini_threshold``,
    ``--extend_inimask``, ``--width_soft_edge`` applied to the std map). A method that recovers the motion beats
    the consensus map here, where the consensus blurs the conformations together."""
    from scipy.ndimage import distance_transform_edt
    std = np.asarray(volumes, dtype=np.float64).std(axis=0)
    core = std > fraction * std.max()
    distance_px = distance_transform_edt(~core)
    return soft_edge(torch.as_tensor(distance_px), extend_px, soft_px).numpy()


def scoring_masks(volumes: np.ndarray) -> Dict[str, np.ndarray]:
    """The masks of CryoBench-style scores for true conformations ``volumes`` (K, N, N, N): ``whole``, a soft sphere
    that holds the box's inscribed ball but its outer pixel (radius N/2 − 4 px, 3 px cosine edge), and ``moving``,
    :func:`moving_mask` within it."""
    box = np.asarray(volumes).shape[-1]
    whole = spherical_mask(box, radius_px=box / 2 - 4, edge_px=3.0).numpy().astype(np.float64)
    return {"whole": whole, "moving": moving_mask(volumes) * whole}


def conformation_means(z: np.ndarray, conformation: np.ndarray) -> np.ndarray:
    """(K, L) mean latent of each conformation's particles; ``conformation`` (N,) holds 0 … K − 1."""
    conformation = np.asarray(conformation)
    return np.stack([np.asarray(z)[conformation == k].mean(0) for k in range(int(conformation.max()) + 1)])


def conformation_fsc_auc(volumes: np.ndarray, truths: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(K,) FSC-AUC (:func:`fsc_auc`) of each volume (K, N, N, N) against its true conformation (K, N, N, N) inside
    ``mask`` (N, N, N). The masked curve is corrected for the correlation that the mask itself creates (a mask
    that cuts through density, as the moving region's does, correlates any two maps at high frequency) by phase
    randomisation beyond the shell where the unmasked curve drops below 0.8 (:func:`deepcryo.core.fsc.masked_fsc`'s
    curves, without its fall-back to the unmasked curve, which would score the whole box)."""
    aucs = []
    for v, t in zip(volumes, truths):
        r = masked_fsc(v, t, mask)
        curve = r.masked if r.random_masked is None else solvent_corrected_fsc(r.masked, r.random_masked,
                                                                               r.randomize_shell)
        aucs.append(fsc_auc(curve))
    return np.array(aucs)
