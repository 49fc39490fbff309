"""The reference gallery: projections of the map on the sampled poses, generated lazily.

Entry ``id`` is the pose index into :func:`gallery_poses` (even sphere directions × in-plane angles, step in
degrees, asymmetric unit of the symmetry group). A reference is the projection itself: no CTF, no shift.
The particle side carries both (:mod:`.query`): a particle is searched by its CTF-multiplied band, moved back
by each origin of the search grid (:func:`search_grid`), one search vector per origin. CTF · x correlated with
a projection P is the numerator of the exact score, Σ conj(CTF·P)·x, and a particle moved back by its origin
correlates with the centred projection as the moved projection does with the particle (a phase ramp is
unitary); so the search ranks as exhaustive scoring of poses × origins would, up to the per-pose norm
‖CTF·P‖. That norm is kept close by one weight on both sides: the references are multiplied by the particles'
RMS CTF over the band (``ctf_rms``, over a sample of the particles; astigmatism and defocus spread average
out) and the particle's CTF-multiplied band is divided by it, which leaves the numerator exact and makes the
reference norm ‖P·ctf_rms‖ ≈ ‖P·CTF‖. Without it the low frequencies, where the CTF is weak but the
projection strong, dominate ‖P‖ and misrank poses at low resolution (SwiftRes's first, 30 Å iteration); the
exact re-ranking then uses each particle's own CTF. The gallery is ``shifts × CTF groups`` times smaller than
one that stores every shifted, CTF-modulated reference, so building it is a small part of an alignment instead
of most of it, and one index serves every particle whatever its defocus (``benchmarks/RESULTS.md``).

Projections are central slices of the map's padded 3D transform sampled at the band frequencies only
(:func:`band_slices`, the Fourier-slice theorem, same interpolation as :class:`deepcryo.core.projector.Projector`),
so the index's build never materialises the gallery: :meth:`Gallery.batches` yields (ids, vectors) a few poses
at a time and :meth:`Gallery.vectors` computes any set of entries. A query over enough particles keeps the band
slices of every pose once, within its memory limit (:meth:`Gallery.keep_slices`).
"""
import math
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch

from deepcryo.core.geometry import euler_to_matrix, matrix_to_euler, sample_poses
from deepcryo.core.projector import Projector

from .features import Band, vectors_from_band

__all__ = ["gallery_poses", "band_slices", "shift_grid", "search_grid", "cell_offsets", "Gallery"]

SEARCH_SHIFT_STEPS = 1.5   # spacing of the origins a particle is searched at, in shift steps (:func:`search_grid`)


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
    max_radius = float(freqs_px.norm(dim=1).max()) if len(freqs_px) else 0.0
    return projector.central_slices(freqs_px, rotations, max_radius)


def shift_grid(max_shift_px: float, shift_step_px: float) -> np.ndarray:
    """(S, 2) origins (px) on a square grid spanning exactly ±``max_shift_px`` with a step <= ``shift_step_px``."""
    if max_shift_px <= 0:
        return np.zeros((1, 2))
    n = int(math.ceil(max_shift_px / shift_step_px - 1e-9))
    axis = np.linspace(-max_shift_px, max_shift_px, 2 * n + 1)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def search_grid(max_shift_px: float, shift_step_px: float) -> np.ndarray:
    """(S, 2) origins (px) each particle is searched at: the shift grid at ``SEARCH_SHIFT_STEPS`` (1.5) shift steps.

    Why coarser than the shift step: the search only has to bring the right pose among the matches, and the
    exact re-ranking then scores each match across its cell of this grid (:func:`cell_offsets`) and the
    refinement goes on from there. A particle half a cell off its search origin loses some correlation at the
    band edge, but on RELION-rendered particles at SNR 0.1 to 0.01 the matches held the right pose as often as
    on the shift grid itself, for half the searches (25 instead of 49 at ±6 px; ``benchmarks/RESULTS.md``);
    twice the step lost some at SNR 0.01."""
    return shift_grid(max_shift_px, SEARCH_SHIFT_STEPS * shift_step_px)


def cell_offsets(origins_px: np.ndarray) -> torch.Tensor:
    """(9, 2) offsets (px) {−h, 0, h}² (:func:`shift_grid` of ±h at step h) that cover a cell of the square origin
    grid ``origins_px`` (S, 2), h half its spacing; (1, 2) zeros for a single origin."""
    axis = np.unique(np.asarray(origins_px, dtype=np.float64)[:, 0])
    h = float(np.diff(axis).min()) / 2 if len(axis) > 1 else 0.0
    return torch.as_tensor(shift_grid(h, h), dtype=torch.float32)


def _pose_matrices(poses_deg, chunk=65536):
    """float32 (M, 3, 3) matrices of (M, 3) poses (degrees), ``chunk`` poses at a time: the float64
    intermediates of :func:`euler_to_matrix` for millions of poses would take hundreds of MB at once."""
    out = torch.empty(len(poses_deg), 3, 3)
    for s in range(0, len(poses_deg), chunk):
        out[s:s + chunk] = euler_to_matrix(torch.as_tensor(poses_deg[s:s + chunk])).to(torch.float32)
    return out


class Gallery:
    """Lazy gallery of reference vectors, one per pose (see module docstring).

    Args:
        projector: Projector of the reference map.
        band: :class:`deepcryo.swiftalign.features.Band` of the search vectors.
        poses_deg: (M, 3) rot, tilt, psi (degrees).
        sqrt_weights: (P,) whitening (or None); normalise: unit-norm vectors.
        ctf_rms: (P,) the particles' RMS CTF over the band (see the module docstring), or None.
    """

    def __init__(self, projector: Projector, band: Band, poses_deg: np.ndarray,
                 sqrt_weights: Optional[torch.Tensor] = None, normalise: bool = True,
                 ctf_rms: Optional[torch.Tensor] = None) -> None:
        self.projector = projector
        self.band = band
        self.poses_deg = np.asarray(poses_deg, dtype=np.float64)
        self.rotations = _pose_matrices(self.poses_deg)
        # the vectors are computed where the projector is, then returned on the CPU
        self.sqrt_weights = None if sqrt_weights is None else sqrt_weights.to(projector.device)
        self.ctf_rms = None if ctf_rms is None else torch.as_tensor(ctf_rms, dtype=torch.float32).to(projector.device)
        self.normalise = normalise
        self._slices = None              # (M, P) band slices of every pose, once :meth:`keep_slices` made them

    def __len__(self) -> int:
        return len(self.poses_deg)

    def slices(self, ids: torch.Tensor) -> torch.Tensor:
        """Band slices (..., P) complex (no CTF, no weights) of the poses ``ids`` (...), on the projector's
        device: read from the table of :meth:`keep_slices` when it was made, else projected. Both give the same
        values, bit for bit: a slice does not depend on the batch that projects it
        (:meth:`deepcryo.core.projector.Projector.central_slices`)."""
        if self._slices is not None:
            return self._slices[ids.to(self._slices.device)]
        rot = self.rotations[ids.cpu()].reshape(-1, 3, 3)
        return band_slices(self.projector, rot, self.band.freqs_px).reshape(tuple(ids.shape) + (-1,))

    def keep_slices(self, max_bytes: float, chunk: int = 4096) -> bool:
        """Project every pose once and keep the band slices, if they take at most ``max_bytes``; True when kept.

        Why: the exact re-ranking projects each particle's 4·k matches (:func:`.query.rerank_matches`), so once
        the particles outnumber the poses / 4·k, projecting the gallery once and reading the matches' slices
        from it costs less; a gallery too large for the memory limit keeps projecting its matches."""
        if self._slices is not None:
            return True
        if len(self) * len(self.band) * 8 > max_bytes:
            return False
        table = torch.empty(len(self), len(self.band), dtype=torch.complex64, device=self.projector.device)
        for s in range(0, len(self), chunk):
            table[s:s + chunk] = band_slices(self.projector, self.rotations[s:s + chunk], self.band.freqs_px)
        self._slices = table
        return True

    def vectors(self, ids: np.ndarray) -> torch.Tensor:
        """Vectors (len(ids), dim) of the poses ``ids``."""
        coeffs = self.slices(torch.as_tensor(ids))
        if self.ctf_rms is not None:
            coeffs = coeffs * self.ctf_rms
        return vectors_from_band(coeffs, self.sqrt_weights, self.normalise).cpu()

    def batches(self, max_vectors: int) -> Iterator[Tuple[int, torch.Tensor]]:
        """Yield ``(first_id, vectors)`` over the whole gallery in id order, ``max_vectors`` at a time."""
        for start in range(0, len(self), max(1, max_vectors)):
            yield start, self.vectors(np.arange(start, min(start + max(1, max_vectors), len(self))))

    def sample_ids(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` distinct random entry ids (all of them when the gallery is smaller)."""
        if n >= len(self):
            return np.arange(len(self))
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(len(self), size=n, replace=False))
