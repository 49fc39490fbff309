"""The references of a SwiftRes refinement: reading and checking the input maps and mask, and building each
iteration's references from its half maps (:func:`next_references`).

Conventions: maps are (N, N, N) arrays in real space at the particles' pixel size; per-shell curves and
filters have N//2 + 1 values, shell s at s / (N · px) Å⁻¹; resolutions are in Å.

The next reference of each half is its half map reconstructed with RELION's Wiener term (τ² from the half-map
FSC, :func:`deepcryo.core.fsc.fsc_to_half_ssnr`), weighted by ``sqrt(2·FSC / (1 + FSC))`` (Rosenthal &
Henderson's C_ref, the filter cisTEM and RELION's post-processing use), cut at the resolution, its Fourier
components below the join resolution averaged with the other half's (RELION's ``--low_resol_join_halves``,
which keeps the halves in one frame and hand), and multiplied by the mask (the user's, or a soft sphere of the
particle diameter).
"""
import logging
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from deepcryo.core import fourier
from deepcryo.core.errors import InputError
from deepcryo.core.fsc import fsc_to_half_ssnr, particle_mask
from deepcryo.core.mrc import read_mrc
from deepcryo.core.particles import ParticleStar
from deepcryo.core.reconstruct import Reconstructor

from .index import check_reference_map

logger = logging.getLogger(__name__)

__all__ = ["reference_filter", "apply_shell_filter", "join_halves", "refinement_mask",
           "read_references", "read_mask", "initial_references", "next_references"]


# ------------------------------------------------------------------------------------------ inputs
def read_references(paths: Sequence[str], star: ParticleStar) -> List[np.ndarray]:
    """The maps (N, N, N) at ``paths`` (MRC), each checked against the particles ``star`` by
    :func:`.index.check_reference_map`. A cubic map of the particles' physical box (within 1 %) at another
    voxel size is resampled to their box first (:func:`deepcryo.core.fourier.resize_volume`), so maps made at a
    working box, such as the landscape's cluster maps, can start a refinement of the full-size particles."""
    maps = []
    box, px = star.box_size, star.pixel_size_A
    for path in paths:
        volume, map_px = read_mrc(path)
        n = volume.shape[-1]
        if volume.ndim == 3 and len(set(volume.shape)) == 1 and n != box and abs(n * map_px - box * px) <= 0.01 * box * px:
            logger.info("%s: %d px at %.4g Å/px resampled to the particles' %d px at %.4g Å/px", path, n, map_px, box, px)
            volume, map_px = fourier.resize_volume(torch.as_tensor(volume), box).numpy(), px
        check_reference_map(volume, map_px, star, path)
        maps.append(volume)
    return maps


def read_mask(path: Optional[str], box: int) -> Optional[np.ndarray]:
    """The mask (N, N, N) at ``path`` (MRC, values in [0, 1], not empty), or None without a path."""
    if not path:
        return None
    mask, _ = read_mrc(path)
    if mask.shape != (box,) * 3:
        raise InputError("%s: mask shape %s does not match the %d px particles" % (path, mask.shape, box))
    if mask.min() < -1e-3 or mask.max() > 1 + 1e-3 or mask.max() <= 0:
        raise InputError("%s: a mask must have values in [0, 1] and not be empty" % path)
    return mask


def refinement_mask(box: int, pixel_size_A: float, diameter_A: float,
                    mask: Optional[np.ndarray] = None) -> torch.Tensor:
    """The user's mask (N, N, N) or a soft sphere of ``diameter_A`` with a 3 px cosine edge."""
    if mask is not None:
        return torch.as_tensor(mask, dtype=torch.float32)
    return particle_mask(box, pixel_size_A, diameter_A)


def initial_references(maps: Sequence[np.ndarray], resolution_A: float, pixel_size_A: float,
                       mask: torch.Tensor) -> List[List[np.ndarray]]:
    """refs[k][h-1]: each initial map low-passed to ``resolution_A`` and masked, the same for both halves."""
    return [[fourier.lowpass_volume(torch.as_tensor(m), resolution_A, pixel_size_A).numpy() * mask.numpy()
             for _ in range(2)] for m in maps]


# ------------------------------------------------------------------------------------------ filters
def reference_filter(curve: Sequence[float], resolution_A: float, box: int, pixel_size_A: float) -> np.ndarray:
    """Per-shell filter (N//2 + 1,): ``sqrt(2·FSC / (1 + FSC))`` for FSC > 0, zero beyond ``resolution_A``."""
    c = np.clip(np.asarray(curve, dtype=np.float64), 0.0, 1.0)
    w = np.sqrt(2.0 * c / (1.0 + c))
    shells = np.arange(len(c))
    w[shells > box * pixel_size_A / resolution_A] = 0.0
    w[0] = 1.0
    return w


def apply_shell_filter(volume, weights: Sequence[float]) -> torch.Tensor:
    """``volume`` (N, N, N) with each Fourier shell multiplied by ``weights[shell]`` (zero beyond N/2)."""
    v = torch.as_tensor(volume, dtype=torch.float32)
    n = v.shape[-1]
    r = torch.round(fourier.radius_grid_3d(n)).long().clamp(max=len(weights) - 1)
    w = torch.as_tensor(weights, dtype=torch.float32)[r]
    w = torch.where(fourier.radius_grid_3d(n) > n // 2, torch.zeros_like(w), w)
    return fourier.ifft3c(fourier.fft3c(v) * w).real


def join_halves(half1, half2, join_resolution_A: float, pixel_size_A: float) -> Tuple[np.ndarray, np.ndarray]:
    """Both halves with their Fourier components below ``join_resolution_A`` (Å) replaced by the halves' mean."""
    v1, v2 = torch.as_tensor(half1, dtype=torch.float32), torch.as_tensor(half2, dtype=torch.float32)
    n = v1.shape[-1]
    low = (fourier.radius_grid_3d(n) <= n * pixel_size_A / join_resolution_A).to(torch.float32)
    f1, f2 = fourier.fft3c(v1), fourier.fft3c(v2)
    mean = 0.5 * (f1 + f2)
    return (fourier.ifft3c(low * mean + (1 - low) * f1).real.numpy(),
            fourier.ifft3c(low * mean + (1 - low) * f2).real.numpy())


# ------------------------------------------------------------------------------------------ next references
def next_references(recs: Sequence[Sequence[Reconstructor]], curves: Sequence[np.ndarray],
                    class_resolution_A: Sequence[float], refs: Sequence[Sequence[np.ndarray]], mask: torch.Tensor,
                    join_resolution_A: float, pixel_size_A: float) -> List[Sequence[np.ndarray]]:
    """refs[k][h-1] for the next iteration from the half-map reconstructors ``recs[k][h-1]``, their FSC
    ``curves[k]`` and resolution ``class_resolution_A[k]`` (module docstring); a class without a resolution
    (no particles in one half) keeps its reference ``refs[k]``. ``mask`` (N, N, N) is the refinement mask."""
    new_refs = []
    for k, (curve, resolution_A) in enumerate(zip(curves, class_resolution_A)):
        if not math.isfinite(resolution_A):
            new_refs.append(refs[k])
            continue
        filt = reference_filter(curve, resolution_A, mask.shape[-1], pixel_size_A)
        ssnr = fsc_to_half_ssnr(curve)
        f1 = apply_shell_filter(recs[k][0].reconstruct(ssnr=ssnr), filt).numpy()
        f2 = apply_shell_filter(recs[k][1].reconstruct(ssnr=ssnr), filt).numpy()
        j1, j2 = join_halves(f1, f2, join_resolution_A, pixel_size_A)
        new_refs.append([j1 * mask.numpy(), j2 * mask.numpy()])
    return new_refs
