"""Fourier shell correlation, resolution at a threshold, solvent-mask correction, soft spherical masks.

Conventions (RELION 3.1's, read from its ``src/fftw.cpp`` getFSC and ``src/postprocessing.cpp``):

* shells are integer-radius rings of the 3D spectrum (shell k holds radii in [k-0.5, k+0.5) Fourier
  pixels), k = 0 … N/2; shell k is the frequency ``k / (N · pixel_size_A)`` 1/Å, i.e. the resolution
  ``N · pixel_size_A / k`` Å. The sums run over the whole spectrum; RELION's run over the half spectrum of
  its real-to-complex transform, which weighs the x = 0 plane twice as much as the others: the curves
  differ by about 0.01 per shell on 64³ maps (``tests/test_fsc_relion.py``);
* the resolution at a threshold is that of the **last shell before the curve first drops below it**, not
  interpolated (:mod:`deepcryo.core.resolution`, numpy only, whose functions this module re-exports);
* a masked FSC is corrected for the correlation that the mask itself creates by phase randomisation
  (Chen et al. 2013, Ultramicroscopy 135:24): the half maps' phases are randomised beyond the shell where
  their unmasked FSC first drops below 0.8, the randomised maps are masked, and from two shells beyond
  that shell on ``FSC_true = (FSC_masked − FSC_random_masked) / (1 − FSC_random_masked)``; if the unmasked
  FSC reaches a finer resolution than the corrected one (a mask that cuts density), the unmasked curve is
  used, as relion_postprocess does without ``--force_mask``. (relion_refine ``--solvent_correct_fsc``
  corrects its iterations' FSC the same way, but clips it at 0 and never falls back to the unmasked curve.)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import numpy as np
import torch

from . import fourier
from .resolution import fsc_resolution_A, resolution_shell, shell_frequencies

__all__ = ["fsc", "fsc_resolution_A", "resolution_shell", "shell_frequencies", "randomize_phases_beyond",
           "randomization_shell", "solvent_corrected_fsc", "MaskedFSC", "masked_fsc", "particle_mask",
           "spherical_mask", "fsc_to_ssnr", "fsc_to_half_ssnr", "RANDOMIZE_FSC_AT"]

RANDOMIZE_FSC_AT = 0.8
"""Unmasked FSC below which relion_postprocess randomises phases (its ``--randomize_at_fsc`` default)."""


def fsc(volume1: Union[torch.Tensor, np.ndarray], volume2: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    """FSC curve (N//2 + 1,) between two volumes (N, N, N) (tensors or arrays); float64 numpy."""
    v1 = torch.as_tensor(np.asarray(volume1), dtype=torch.float64)
    v2 = torch.as_tensor(np.asarray(volume2), dtype=torch.float64)
    f1, f2 = fourier.fft3c(v1), fourier.fft3c(v2)
    n = v1.shape[-1]
    r = torch.round(fourier.radius_grid_3d(n, dtype=torch.float64)).long().reshape(-1)
    shells = n // 2 + 1
    keep = r < shells
    r = r[keep]

    def shell_sum(x):
        return torch.zeros(shells, dtype=torch.float64).index_add_(0, r, x.reshape(-1)[keep])

    num = shell_sum((f1 * f2.conj()).real)
    den = torch.sqrt(shell_sum(f1.abs() ** 2) * shell_sum(f2.abs() ** 2))
    return (num / den.clamp(min=1e-30)).numpy()


def fsc_to_ssnr(curve: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    """Spectral SNR of the full map from a half-map FSC: ``2·FSC / (1 − FSC)`` (clipped to ``floor``)."""
    c = np.clip(np.asarray(curve, dtype=np.float64), 0.0, 0.999)
    return np.maximum(2.0 * c / (1.0 - c), floor)


def fsc_to_half_ssnr(curve: np.ndarray) -> np.ndarray:
    """Spectral SNR of one half map from the half-map FSC: ``FSC / (1 − FSC)``, FSC clipped to [1e-3, 0.999]
    (RELION's ``updateSSNRarrays``)."""
    c = np.clip(np.asarray(curve, dtype=np.float64), 1e-3, 0.999)
    return c / (1.0 - c)


def randomize_phases_beyond(volume: torch.Tensor, shell: int,
                            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``volume`` (N, N, N) with the phase of every Fourier component at radius ≥ ``shell`` Fourier pixels
    replaced by a uniform random one, amplitudes kept (RELION's ``randomizePhasesBeyond``, which compares the
    radius itself, not its shell). The phase at −k is minus that at k, so the map stays real. float64."""
    v = torch.as_tensor(np.asarray(volume), dtype=torch.float64)
    n = v.shape[-1]
    ft = fourier.fft3c(v)
    theta = 2 * math.pi * torch.rand(ft.shape, generator=generator, dtype=torch.float64)
    # centred layout: index i holds frequency i - N//2, so -k sits at (N - i) mod N on every axis
    minus_k = torch.roll(torch.flip(theta, dims=(0, 1, 2)), shifts=(1, 1, 1) if n % 2 == 0 else (0, 0, 0),
                         dims=(0, 1, 2))
    phase = torch.where(fourier.radius_grid_3d(n, dtype=torch.float64) >= shell, theta - minus_k,
                        torch.zeros_like(theta))
    return fourier.ifft3c(ft * torch.polar(torch.ones_like(phase), phase)).real


def randomization_shell(unmasked_curve: np.ndarray, fsc_at: float = RANDOMIZE_FSC_AT) -> Optional[int]:
    """The first shell k ≥ 1 where the unmasked half-map FSC drops below ``fsc_at``: phases are randomised
    from there on. None if it never does."""
    below = np.nonzero(np.asarray(unmasked_curve)[1:] < fsc_at)[0]
    return int(below[0]) + 1 if len(below) else None


def solvent_corrected_fsc(masked_curve: np.ndarray, random_masked_curve: np.ndarray,
                          randomize_shell: int) -> np.ndarray:
    """``(FSC_masked − FSC_random_masked) / (1 − FSC_random_masked)`` from shell ``randomize_shell + 2`` on, the
    masked FSC below it (RELION moved the start two shells up against artefacts near the randomisation
    shell); not clipped, as in relion_postprocess."""
    masked = np.asarray(masked_curve, dtype=np.float64)
    rand = np.asarray(random_masked_curve, dtype=np.float64)
    out = masked.copy()
    k = np.arange(len(masked)) >= randomize_shell + 2
    out[k] = (masked[k] - rand[k]) / (1.0 - rand[k])
    return out


@dataclasses.dataclass(frozen=True)
class MaskedFSC:
    """Half-map FSC curves (N//2 + 1,) as relion_postprocess computes them.

    ``corrected`` is the curve to report and to use (RELION's ``rlnFourierShellCorrelationCorrected``):
    the solvent-corrected masked FSC, or the unmasked one where ``mask_used`` is False (unmasked FSC never
    below 0.8, so nothing to randomise; or the unmasked FSC reaching a finer resolution at 0.143).
    ``random_masked`` is None when no phase was randomised; ``randomize_shell`` the first randomised shell.
    """
    unmasked: np.ndarray
    masked: np.ndarray
    random_masked: Optional[np.ndarray]
    corrected: np.ndarray
    randomize_shell: Optional[int]
    mask_used: bool


def masked_fsc(half1: Union[torch.Tensor, np.ndarray], half2: Union[torch.Tensor, np.ndarray],
               mask: Union[torch.Tensor, np.ndarray], randomize_fsc_at: float = RANDOMIZE_FSC_AT,
               seed: int = 0) -> MaskedFSC:
    """Solvent-corrected FSC of two half maps (N, N, N) in ``mask`` (N, N, N, values in [0, 1]), as
    relion_postprocess does (module docstring); the random phases come from a torch generator seeded with
    ``seed`` (one draw for half1, then one for half2), so a run is reproducible."""
    h1 = torch.as_tensor(np.asarray(half1), dtype=torch.float64)
    h2 = torch.as_tensor(np.asarray(half2), dtype=torch.float64)
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float64)
    if not (h1.ndim == 3 and len(set(h1.shape)) == 1 and h1.shape == h2.shape == m.shape):
        raise ValueError("half maps and mask must be cubes of one shape (got %s, %s, %s)"
                         % (tuple(h1.shape), tuple(h2.shape), tuple(m.shape)))
    unmasked, masked = fsc(h1, h2), fsc(h1 * m, h2 * m)
    shell = randomization_shell(unmasked, randomize_fsc_at)
    if shell is None:
        return MaskedFSC(unmasked, masked, None, unmasked, None, False)
    g = torch.Generator().manual_seed(int(seed))
    r1, r2 = randomize_phases_beyond(h1, shell, g), randomize_phases_beyond(h2, shell, g)
    random_masked = fsc(r1 * m, r2 * m)
    corrected = solvent_corrected_fsc(masked, random_masked, shell)
    if resolution_shell(unmasked) > resolution_shell(corrected):
        return MaskedFSC(unmasked, masked, random_masked, unmasked, shell, False)
    return MaskedFSC(unmasked, masked, random_masked, corrected, shell, True)


def particle_mask(box: int, pixel_size_A: float, diameter_A: float, edge_px: float = 3.0) -> torch.Tensor:
    """(N, N, N) soft sphere of a particle of ``diameter_A`` (Å): its cosine edge of ``edge_px`` ends at the
    diameter (or 1 px inside the box), so the mask takes nothing outside the particle."""
    radius = min(box / 2 - 1, diameter_A / (2 * pixel_size_A))
    return spherical_mask(box, radius_px=max(1.0, radius - edge_px), edge_px=edge_px)


def spherical_mask(box: int, radius_px: Optional[float] = None, edge_px: float = 5.0,
                   device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """(N, N, N) soft spherical mask: 1 inside ``radius_px`` (default N/2 - edge - 1), cosine edge."""
    if radius_px is None:
        radius_px = box / 2 - edge_px - 1
    r = fourier.radius_grid_3d(box, device=device)
    return fourier.soft_edge(r, radius_px, edge_px)
