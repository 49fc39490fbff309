"""The reference gallery: projections of the map on poses × shifts × CTF groups, generated lazily.

Entries are numbered ``id = (pose · G + group) · S + shift`` over

* poses: :func:`deepcryo.core.geometry.sample_poses` (even sphere directions × in-plane angles, step in
  degrees, asymmetric unit of the symmetry group);
* G CTF groups: particles clustered by mean defocus (:func:`ctf_groups`); each group's reference CTF is the
  CTF at the group's mean defocus (no astigmatism) with the particles' optics;
* S shifts: a square grid of RELION origins (px) within ±max shift (:func:`shift_grid`), applied as phase
  ramps on the band (an entry with origin ``o`` is the reference moved by ``-o``, as a particle whose
  ``rlnOrigin`` is ``o``).

Projections are central slices of the map's padded 3D transform sampled at the band frequencies only
(:func:`band_slices`, the Fourier-slice theorem, same interpolation as :class:`deepcryo.core.projector.Projector`),
so the gallery is never materialised: :meth:`Gallery.batches` yields (ids, vectors) a few poses at a time and
:meth:`Gallery.vectors` computes any set of entries.
"""
import math
from typing import Iterator, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from deepcryo.core.ctf import ctf_from_freqs
from deepcryo.core.geometry import euler_to_matrix, matrix_to_euler, sample_poses
from deepcryo.core.projector import Projector

from .features import Band, vectors_from_band

__all__ = ["gallery_poses", "band_slices", "shift_grid", "ctf_groups", "Gallery"]


def gallery_poses(angular_step_deg: float, symmetry: str = "C1",
                  grid_rotation: Optional[Union[np.ndarray, torch.Tensor]] = None) -> np.ndarray:
    """(M, 3) gallery poses (degrees): :func:`sample_poses` at ``angular_step_deg`` for directions and psi,
    each pose matrix ``A`` replaced by ``A · G`` when a grid rotation ``G`` (3, 3) is given. A rigid rotation
    of the grid keeps its spacing but moves every sample: two galleries with different ``G`` are the
    differently perturbed galleries of the repetition consensus (Lauzirika's step/4 perturbation, made
    rigid so that the sampling stays uniform)."""
    poses = sample_poses(angular_step_deg, angular_step_deg, symmetry)
    if grid_rotation is None:
        return poses
    rot = euler_to_matrix(torch.as_tensor(poses)) @ torch.as_tensor(grid_rotation, dtype=torch.float64)
    return matrix_to_euler(rot).numpy()


def band_slices(projector: Projector, rotations: Union[np.ndarray, torch.Tensor],
                freqs_px: torch.Tensor) -> torch.Tensor:
    """Central-slice values (B, P) complex of the projector's map at band frequencies, on the projector's
    device (the inputs are moved there).

    Args:
        projector: a :class:`deepcryo.core.projector.Projector` (its padded, gridding-corrected transform).
        rotations: (B, 3, 3) pose matrices (volume → projection frame, RELION convention).
        freqs_px: (P, 2) frequencies (fx, fy) in cycles/px.
    """
    device = projector.device
    rotations = torch.as_tensor(rotations, dtype=torch.float32).to(device)
    freqs_px = freqs_px.to(device)
    k3 = torch.cat([freqs_px, torch.zeros_like(freqs_px[:, :1])], dim=1)            # (P, 3)
    pts = torch.einsum("pi,bij->bpj", k3, rotations)                               # Aᵀk
    m = projector.padded_box
    grid = (pts * m + m // 2) / (m - 1) * 2.0 - 1.0
    out = F.grid_sample(projector.padded_ft, grid[None, :, :, None, :], mode="bilinear", padding_mode="zeros",
                        align_corners=True)[0, :, :, :, 0]                         # (2, B, P)
    return torch.complex(out[0], out[1])


def shift_grid(max_shift_px: float, shift_step_px: float) -> np.ndarray:
    """(S, 2) origins (px) on a square grid spanning exactly ±``max_shift_px`` with a step <= ``shift_step_px``."""
    if max_shift_px <= 0:
        return np.zeros((1, 2))
    n = int(math.ceil(max_shift_px / shift_step_px - 1e-9))
    axis = np.linspace(-max_shift_px, max_shift_px, 2 * n + 1)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def ctf_groups(defocus_A: np.ndarray, n_groups: int) -> Tuple[np.ndarray, np.ndarray]:
    """Cluster particles by mean defocus (1D k-means from quantiles).

    Returns (group mean defoci (G,) in Å, ascending; (N,) group index of each particle). G <= n_groups.
    """
    d = np.asarray(defocus_A, dtype=np.float64)
    centres = np.unique(np.quantile(d, (np.arange(n_groups) + 0.5) / n_groups))
    for _ in range(20):
        label = np.abs(d[:, None] - centres[None]).argmin(1)
        new = np.array([d[label == g].mean() for g in range(len(centres)) if np.any(label == g)])
        if len(new) == len(centres) and np.allclose(new, centres):
            break
        centres = new
    label = np.abs(d[:, None] - centres[None]).argmin(1)
    return centres, label


def _pose_matrices(poses_deg, chunk=65536):
    """float32 (M, 3, 3) matrices of (M, 3) poses (degrees), ``chunk`` poses at a time: the float64
    intermediates of :func:`euler_to_matrix` for the million poses of a 20 M-reference gallery would
    take 250 MB at once."""
    out = torch.empty(len(poses_deg), 3, 3)
    for s in range(0, len(poses_deg), chunk):
        out[s:s + chunk] = euler_to_matrix(torch.as_tensor(poses_deg[s:s + chunk])).to(torch.float32)
    return out


class Gallery:
    """Lazy gallery of reference vectors (see module docstring).

    Args:
        projector: Projector of the reference map.
        band: :class:`deepcryo.swiftalign.features.Band` of the search vectors.
        poses_deg: (M, 3) rot, tilt, psi (degrees).
        origins_px: (S, 2) origins (px).
        group_ctfs: (G, P) CTF of each group at the band frequencies (None: no CTF, G = 1).
        sqrt_weights: (P,) whitening (or None); normalise: unit-norm vectors.
    """

    def __init__(self, projector: Projector, band: Band, poses_deg: np.ndarray, origins_px: np.ndarray,
                 group_ctfs: Optional[torch.Tensor] = None, sqrt_weights: Optional[torch.Tensor] = None,
                 normalise: bool = True) -> None:
        self.projector = projector
        self.band = band
        self.poses_deg = np.asarray(poses_deg, dtype=np.float64)
        self.rotations = _pose_matrices(self.poses_deg)
        self.origins_px = np.asarray(origins_px, dtype=np.float64)
        device = projector.device  # the vectors are computed where the projector is, then returned on the CPU
        self.ramps = band.phase_ramps(self.origins_px).to(device)                  # (S, P)
        self.group_ctfs = (torch.ones(1, len(band)) if group_ctfs is None
                           else torch.as_tensor(group_ctfs, dtype=torch.float32)).to(device)
        self.sqrt_weights = None if sqrt_weights is None else sqrt_weights.to(device)
        self.normalise = normalise

    @classmethod
    def from_parameters(cls, projector: Projector, band: Band, angular_step_deg: float, max_shift_px: float,
                        shift_step_px: float, group_defocus_A: Optional[Sequence[float]], optics: Mapping[str, float],
                        symmetry: str = "C1", sqrt_weights: Optional[torch.Tensor] = None, normalise: bool = True,
                        grid_rotation: Optional[np.ndarray] = None) -> "Gallery":
        """Gallery on :func:`sample_poses` (``angular_step_deg`` for directions and psi), the shift grid and
        CTF groups of mean defoci ``group_defocus_A`` with ``optics`` = dict(voltage_kV, cs_mm, amplitude_contrast).
        ``grid_rotation`` (3, 3) rotates the whole pose grid rigidly (see :func:`gallery_poses`)."""
        poses = gallery_poses(angular_step_deg, symmetry, grid_rotation)
        origins = shift_grid(max_shift_px, shift_step_px)
        ctfs = group_ctf_band(band, group_defocus_A, optics) if group_defocus_A is not None else None
        return cls(projector, band, poses, origins, ctfs, sqrt_weights, normalise)

    @property
    def n_poses(self) -> int:
        return len(self.poses_deg)

    @property
    def n_groups(self) -> int:
        return self.group_ctfs.shape[0]

    @property
    def n_shifts(self) -> int:
        return len(self.origins_px)

    def __len__(self) -> int:
        return self.n_poses * self.n_groups * self.n_shifts

    def decode(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Entry ids (any shape) → (pose index, CTF group, shift index) arrays of the same shape."""
        ids = np.asarray(ids, dtype=np.int64)
        shift = ids % self.n_shifts
        rest = ids // self.n_shifts
        return rest // self.n_groups, rest % self.n_groups, shift

    def pose_vectors(self, pose_index: np.ndarray) -> torch.Tensor:
        """Vectors (B·G·S, dim) of every entry of the poses ``pose_index`` (B,), in id order."""
        coeffs = band_slices(self.projector, self.rotations[torch.as_tensor(pose_index)], self.band.freqs_px)
        full = coeffs[:, None, None, :] * self.group_ctfs[None, :, None, :] * self.ramps[None, None]
        return vectors_from_band(full, self.sqrt_weights, self.normalise).reshape(-1, self.band.dim).cpu()

    def vectors(self, ids: np.ndarray) -> torch.Tensor:
        """Vectors (len(ids), dim) of arbitrary entries."""
        pose, group, shift = self.decode(ids)
        coeffs = band_slices(self.projector, self.rotations[torch.as_tensor(pose)], self.band.freqs_px)
        full = coeffs * self.group_ctfs[torch.as_tensor(group)] * self.ramps[torch.as_tensor(shift)]
        return vectors_from_band(full, self.sqrt_weights, self.normalise).cpu()

    def batches(self, max_vectors: int) -> Iterator[Tuple[int, torch.Tensor]]:
        """Yield ``(first_id, vectors)`` over the whole gallery in id order, about ``max_vectors`` at a time."""
        per_pose = self.n_groups * self.n_shifts
        poses_per_batch = max(1, max_vectors // per_pose)
        for start in range(0, self.n_poses, poses_per_batch):
            idx = np.arange(start, min(start + poses_per_batch, self.n_poses))
            yield start * per_pose, self.pose_vectors(idx)

    def sample_ids(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` distinct random entry ids (all of them when the gallery is smaller)."""
        if n >= len(self):
            return np.arange(len(self))
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(len(self), size=n, replace=False))


def group_ctf_band(band: Band, group_defocus_A: Sequence[float], optics: Mapping[str, float]) -> torch.Tensor:
    """(G, P) CTF at the band frequencies for each group mean defocus (Å), without astigmatism."""
    d = np.asarray(group_defocus_A, dtype=np.float64)
    return ctf_from_freqs(band.freqs_invA, d, d, 0.0, optics["voltage_kV"], optics["cs_mm"],
                          optics["amplitude_contrast"])


__all__.append("group_ctf_band")
