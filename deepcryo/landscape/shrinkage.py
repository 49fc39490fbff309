"""Wiener weight of the decoder's variation: keep the decoded volumes' variation where it rises above noise.

The decoder writes a volume as V(z) = V₀ + Σₘ cₘ(z) Bₘ (:class:`deepcryo.landscape.model.LandscapeVAE`). Its basis
volumes Bₘ are learned from noisy images without a prior on them, so they also hold noise, and every decoded volume
inherits it over the whole box, where the particle moves and where it does not. A volume decoded at one particle's
latent (CryoBench's per-image volume), whose coefficients spread further than a group's mean, suffers most: at SNR
0.01 those volumes were worse than the plain consensus map over the whole particle although better in the moving
region (``benchmarks/RESULTS.md``, "Wiener weight of the decoded variation").

The weight is a per-voxel Wiener filter of the variation Σₘ cₘ Bₘ, fixed once after training from the data's own
latents: w = max(0, 1 − σₙ² / σ²), where σ (x) is the standard deviation over the particles of the decoded
variation at voxel x (smoothed over a few voxels, a local estimate) and σₙ² the median of σ² over the solvent: the
voxels inside the decoder's sphere and away from the mean volume, where any variation of the decoded volumes is
noise of the basis. Where the particles' volumes truly differ σ ≫ σₙ and w → 1 (the variation is kept); where
nothing moves σ ≈ σₙ and w → 0 (the volume is V₀ there, which the whole data set determines, not a few basis
coefficients). Like a focus mask of cryoSPARC's 3D variability analysis, but derived from the variability found,
with no threshold to choose. Conventions: volumes (D, D, D) indexed [z, y, x], in the training's intensity scale.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

__all__ = ["variation_variance", "solvent_mask", "variation_weight", "SMOOTHING_PX"]

#: σ (px of the working box) of the Gaussian that smooths the variation's standard deviation before the weight
SMOOTHING_PX = 1.5


def variation_variance(basis: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """Variance (D, D, D) over the particles of the decoded variation Σₘ cₘ Bₘ, for basis volumes ``basis``
    (M, D, D, D) and the particles' coefficients ``coefficients`` (N, M): bᵀ C b per voxel, with C the (M, M)
    covariance of the coefficients, exact for these N particles and one basis volume in memory at a time."""
    c = coefficients.to(torch.float64)
    cov = torch.cov(c.T).reshape(c.shape[1], c.shape[1]).to(basis.dtype)
    variance = torch.zeros(basis.shape[1:], dtype=basis.dtype, device=basis.device)
    for m in range(basis.shape[0]):
        variance += basis[m] * torch.einsum("n,nzyx->zyx", cov[m], basis)
    return variance.clamp_min(0)


def solvent_mask(mean_volume: np.ndarray, inside: np.ndarray, threshold: float = 0.05,
                 margin_px: int = 2) -> np.ndarray:
    """Boolean (D, D, D): voxels of ``inside`` (the decoder's sphere) away from the particle, i.e. outside the mean
    volume smoothed by 1 px and thresholded at ``threshold`` of its maximum, grown by ``margin_px``."""
    smooth = ndimage.gaussian_filter(np.asarray(mean_volume, dtype=np.float64), 1.0)
    support = ndimage.binary_dilation(smooth > threshold * smooth.max(), iterations=margin_px)
    return np.asarray(inside, dtype=bool) & ~support


def variation_weight(variance: np.ndarray, solvent: np.ndarray, smoothing_px: float = SMOOTHING_PX) -> np.ndarray:
    """Wiener weight (D, D, D) in [0, 1] of the decoded variation (see the module): from its per-voxel ``variance``
    (:func:`variation_variance`) and the ``solvent`` voxels (:func:`solvent_mask`) that measure the noise floor.
    All ones when there is no solvent to measure or no variation at all (nothing to weigh)."""
    sd = ndimage.gaussian_filter(np.sqrt(np.asarray(variance, dtype=np.float64)), smoothing_px)
    if not np.any(solvent) or not np.any(sd > 0):
        return np.ones_like(sd, dtype=np.float32)
    noise_var = float(np.median(sd[solvent] ** 2))
    return np.clip(1.0 - noise_var / np.maximum(sd ** 2, np.finfo(np.float64).tiny), 0.0, 1.0).astype(np.float32)
