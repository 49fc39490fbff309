"""Per-particle pose refinement inside the landscape VAE (``train --refine-poses``).

Why: consensus poses come from a refinement against one map, so a particle of another conformation is aligned
to the wrong structure and its pose is biased, differently per state; the VAE then explains that pose error
with its latent (or as noise) and the states mix. As cryoDRGN's pose SGD and DynaMight do, each particle gets
learnable corrections of its consensus pose, optimised jointly with the decoder against the particle's own
decoded volume, so that each state is explained at its own best pose.

Parametrisation (units and conventions):

- rotation: an axis-angle vector ``ω`` (radians, projection frame); the refined pose is ``exp([ω]×)·A``, A the
  consensus matrix (volume → projection frame, RELION ZYZ, :func:`deepcryo.core.geometry.euler_to_matrix`);
  ``|ω|`` is the angle of the correction;
- origin: ``δ`` (px of the working box) added to the consensus origin (RELION's sense: the shift that brings the
  particle to the box centre), applied to the centred spectrum as the dataset applies the origin
  (:func:`deepcryo.core.fourier.phase_shift_2d`).

Both start at zero and carry an isotropic Gaussian prior (``σ_rot`` degrees, ``σ_shift`` px): the term
``½ (|ω|²/σ_rot² + |δ|²/σ_shift²)`` is added to each particle's negative log-likelihood, the log prior of a
MAP estimate in the likelihood's own units. It keeps particles that the data do not pin down near their
consensus pose. The corrections are sparse embeddings updated by :class:`torch.optim.SparseAdam`: a particle's
correction moves only in the steps its image is in (dense Adam would keep moving every row on stale moments).
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
import torch.nn as nn

from ..core import fourier

__all__ = ["PoseOffsets", "axis_angle_to_matrix", "refine_batch"]


def axis_angle_to_matrix(omega: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (B, 3, 3) of axis-angle vectors ω (B, 3) in radians (differentiable, exact at 0)."""
    zero = torch.zeros_like(omega[:, 0])
    skew = torch.stack([zero, -omega[:, 2], omega[:, 1],
                        omega[:, 2], zero, -omega[:, 0],
                        -omega[:, 1], omega[:, 0], zero], 1).reshape(-1, 3, 3)
    return torch.linalg.matrix_exp(skew)


def refine_batch(spectra: torch.Tensor, rotations: torch.Tensor, omega: torch.Tensor, shift_px: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Apply corrections to a batch: centred spectra (B, D, D) moved by ``shift_px`` (B, 2) px of their box and
    poses (B, 3, 3) turned by ``exp([ω]×)`` (ω (B, 3), radians) in the projection frame."""
    box = spectra.shape[-1]
    ramp = fourier.phase_shift_2d(box, shift_px, device=spectra.device)
    return spectra * ramp, axis_angle_to_matrix(omega) @ rotations


class PoseOffsets(nn.Module):
    """Learnable pose corrections of ``n`` particles (see the module docstring).

    Args:
        n: number of particles (STAR order).
        sigma_rot_deg: standard deviation of the Gaussian prior on the rotation angle, degrees.
        sigma_shift_px: standard deviation of the Gaussian prior on each origin coordinate, px of the working box.
    """

    def __init__(self, n: int, sigma_rot_deg: float = 10.0, sigma_shift_px: float = 1.0) -> None:
        super().__init__()
        self.sigma_rot_rad = math.radians(float(sigma_rot_deg))
        self.sigma_shift_px = float(sigma_shift_px)
        self.omega = nn.Embedding(int(n), 3, sparse=True)
        self.shift = nn.Embedding(int(n), 2, sparse=True)
        nn.init.zeros_(self.omega.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, indices: np.ndarray, spectra: torch.Tensor, rotations: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Corrected spectra and poses of particles ``indices`` and their prior term (B,) (NLL units)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long, device=spectra.device)
        omega, shift = self.omega(idx), self.shift(idx)
        spectra, rotations = refine_batch(spectra, rotations, omega, shift)
        prior = 0.5 * ((omega ** 2).sum(1) / self.sigma_rot_rad ** 2 + (shift ** 2).sum(1) / self.sigma_shift_px ** 2)
        return spectra, rotations, prior

    def corrected_poses(self, rotations: torch.Tensor, origins_px: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """All particles' refined pose matrices (N, 3, 3) and origins (N, 2) px from the consensus ones."""
        with torch.no_grad():
            rot = axis_angle_to_matrix(self.omega.weight.cpu()) @ rotations
            return rot, origins_px + self.shift.weight.cpu()
