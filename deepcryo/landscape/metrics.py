"""Accuracy of a landscape run against a simulation's truth (used by the tests and benchmarks/landscape.py).

- :func:`pose_error_deg`: angular error (degrees) of predicted poses after the best global rotation and hand;
- :func:`two_state_ari` / :func:`hinge_rho`: adjusted Rand index of k-means (K = 2) on the latents against the
  true states, and |Spearman ρ| of the latent PC1 against the true hinge parameter.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from ..core.geometry import euler_to_matrix, rotation_angle_deg

__all__ = ["pose_error_deg", "two_state_ari", "hinge_rho", "latents"]

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


def latents(star) -> np.ndarray:
    """(N, L) latent coordinates ``dcLatent01`` … of a particle STAR."""
    cols = sorted(c for c in star.particles if c.startswith("dcLatent"))
    return np.stack([np.asarray(star.particles[c], dtype=np.float64) for c in cols], 1)


def two_state_ari(z: np.ndarray, true_states: np.ndarray, seed: int = 0) -> float:
    """Adjusted Rand index of k-means (K = 2) on latents ``z`` (N, L) against the true states (N,)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score
    labels = KMeans(2, n_init=10, random_state=seed).fit_predict(z)
    return float(adjusted_rand_score(np.asarray(true_states), labels))


def hinge_rho(z: np.ndarray, hinge: np.ndarray) -> float:
    """|Spearman ρ| of the first principal component of latents ``z`` (N, L) against the hinge parameter."""
    from scipy.stats import spearmanr
    from sklearn.decomposition import PCA
    pc1 = PCA(1).fit_transform(z)[:, 0]
    return float(abs(spearmanr(pc1, np.asarray(hinge)).correlation))
