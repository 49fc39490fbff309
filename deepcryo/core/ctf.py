"""Contrast transfer function, in RELION's (and Xmipp's) sign convention.

Geometry (shared by CTFFIND, RELION, Xmipp, cryoDRGN and Scipion's ``CTFModel``): defocus U and V in Å,
positive = underfocus, U >= V; the astigmatism angle (degrees) goes from the image x axis to the U
direction. The defocus along azimuth φ is ``Δf(φ) = (U+V)/2 + (U-V)/2 · cos(2(φ - angle))``.

Sign: with the phase ``γ(s) = π λ Δf s² − (π/2) Cs λ³ s⁴ + φ_amp + φ_shift``, where
``φ_amp = atan(w / sqrt(1 - w²))`` for amplitude contrast ``w``, deepcryo uses ``CTF = sin(γ)``, exactly
RELION's ``-sin(K1 Δf' s² + K2 s⁴ - K5 - K3)`` with ``Δf' = -Δf``. Hence ``CTF(0) = +w`` and particles of
positive density ("white", as RELION extracts them) stay positive at low frequency. CTFFIND and cryoDRGN
use the opposite overall sign (``CTF(0) = -w``).

Envelope: ``exp(-B s² / 4)`` for a B-factor ``B`` in Å² (RELION's ``rlnCtfBfactor``).
Wavelength: ``λ(Å) = 12.2639 / sqrt(V + 0.97845e-6 V²)`` with V in volts.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from . import fourier

__all__ = ["wavelength_A", "ctf_2d", "ctf_from_freqs", "ctf_phase_from_freqs", "defocus_at_azimuth", "ctf_1d"]


def wavelength_A(voltage_kV: Union[float, torch.Tensor]) -> torch.Tensor:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV (float or tensor)."""
    v = voltage_kV * 1e3
    if isinstance(v, torch.Tensor):
        return 12.2639 / torch.sqrt(v + 0.97845e-6 * v * v)
    return 12.2639 / math.sqrt(v + 0.97845e-6 * v * v)


def _col(x, like):
    """Broadcast a scalar / (B,) array to a (B, 1) tensor on ``like``'s device and dtype."""
    t = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    return t.reshape(-1, 1)


def defocus_at_azimuth(defocus_u_A: Union[float, torch.Tensor], defocus_v_A: Union[float, torch.Tensor],
                       defocus_angle_deg: Union[float, torch.Tensor], azimuth_rad: torch.Tensor) -> torch.Tensor:
    """Defocus (Å) along azimuth ``azimuth_rad`` (radians from the x axis)."""
    mean = 0.5 * (defocus_u_A + defocus_v_A)
    half = 0.5 * (defocus_u_A - defocus_v_A)
    return mean + half * torch.cos(2.0 * (azimuth_rad - defocus_angle_deg * (math.pi / 180.0)))


def ctf_phase_from_freqs(freqs_invA: torch.Tensor, defocus_u_A: Union[float, torch.Tensor],
                         defocus_v_A: Union[float, torch.Tensor], defocus_angle_deg: Union[float, torch.Tensor],
                         voltage_kV: Union[float, torch.Tensor], cs_mm: Union[float, torch.Tensor],
                         amplitude_contrast: Union[float, torch.Tensor],
                         phase_shift_deg: Union[float, torch.Tensor] = 0.0) -> torch.Tensor:
    """The phase γ (B, M) in radians, ``CTF = sin γ`` (arguments as in :func:`ctf_from_freqs`)."""
    fx, fy = freqs_invA[:, 0][None], freqs_invA[:, 1][None]
    s2 = fx * fx + fy * fy
    du, dv, ang = (_col(v, freqs_invA) for v in (defocus_u_A, defocus_v_A, defocus_angle_deg))
    volt, cs, w = (_col(v, freqs_invA) for v in (voltage_kV, cs_mm, amplitude_contrast))
    shift = _col(phase_shift_deg, freqs_invA)
    lam = wavelength_A(volt)
    # dz(φ)·s² of :func:`defocus_at_azimuth`, expanded with cos 2(φ − α) = cos 2φ cos 2α + sin 2φ sin 2α and
    # s² cos 2φ = fx² − fy², s² sin 2φ = 2 fx fy: no angle or cosine per pixel and particle
    two_alpha = ang * (math.pi / 90.0)
    half = 0.5 * (du - dv)
    dz_s2 = (0.5 * (du + dv)) * s2 + (half * torch.cos(two_alpha)) * (fx * fx - fy * fy) \
        + (half * torch.sin(two_alpha)) * (2.0 * fx * fy)
    return (math.pi * lam) * dz_s2 - (0.5 * math.pi * (cs * 1e7) * lam ** 3) * (s2 * s2) \
        + (torch.atan(w / torch.sqrt(1.0 - w * w)) + shift * (math.pi / 180.0))


def ctf_from_freqs(freqs_invA: torch.Tensor, defocus_u_A: Union[float, torch.Tensor],
                   defocus_v_A: Union[float, torch.Tensor], defocus_angle_deg: Union[float, torch.Tensor],
                   voltage_kV: Union[float, torch.Tensor], cs_mm: Union[float, torch.Tensor],
                   amplitude_contrast: Union[float, torch.Tensor], phase_shift_deg: Union[float, torch.Tensor] = 0.0,
                   bfactor_A2: Union[float, torch.Tensor] = 0.0) -> torch.Tensor:
    """CTF at arbitrary frequencies.

    Args:
        freqs_invA: (M, 2) tensor of (fx, fy) in 1/Å (the same frequencies for every item of the batch).
        defocus_u_A, defocus_v_A (float or (B,)): defoci in Å, positive underfocus.
        defocus_angle_deg (float or (B,)): astigmatism angle, degrees from x to U.
        voltage_kV, cs_mm, amplitude_contrast, phase_shift_deg, bfactor_A2 (float or (B,)).
    Returns:
        (B, M) tensor.
    """
    gamma = ctf_phase_from_freqs(freqs_invA, defocus_u_A, defocus_v_A, defocus_angle_deg, voltage_kV, cs_mm,
                                 amplitude_contrast, phase_shift_deg)
    ctf = torch.sin(gamma)
    bfac = _col(bfactor_A2, freqs_invA)
    if bool((bfac != 0).any()):            # the envelope only when some B-factor is not 0 (one exp per pixel)
        s2 = freqs_invA[:, 0][None] ** 2 + freqs_invA[:, 1][None] ** 2
        ctf = ctf * torch.exp(-bfac * s2 / 4.0)
    return ctf


def ctf_2d(box: int, pixel_size_A: float, defocus_u_A: Union[float, torch.Tensor],
           defocus_v_A: Union[float, torch.Tensor], defocus_angle_deg: Union[float, torch.Tensor],
           voltage_kV: Union[float, torch.Tensor], cs_mm: Union[float, torch.Tensor],
           amplitude_contrast: Union[float, torch.Tensor], phase_shift_deg: Union[float, torch.Tensor] = 0.0,
           bfactor_A2: Union[float, torch.Tensor] = 0.0, device: Optional[Union[str, torch.device]] = None,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """CTF images (B, box, box) on the centred frequency grid of :mod:`deepcryo.core.fourier`.

    Scalars or (B,) arrays/tensors for every parameter; ``pixel_size_A`` in Å/px.
    """
    grid = fourier.freq_grid_2d(box, device=device, dtype=dtype).reshape(-1, 2) / pixel_size_A
    out = ctf_from_freqs(grid, defocus_u_A, defocus_v_A, defocus_angle_deg, voltage_kV, cs_mm,
                         amplitude_contrast, phase_shift_deg, bfactor_A2)
    return out.reshape(-1, box, box)


def ctf_1d(freqs_invA: torch.Tensor, defocus_A: Union[float, torch.Tensor], voltage_kV: Union[float, torch.Tensor],
           cs_mm: Union[float, torch.Tensor], amplitude_contrast: Union[float, torch.Tensor],
           phase_shift_deg: Union[float, torch.Tensor] = 0.0) -> torch.Tensor:
    """Rotationally symmetric CTF (B, M) at radial frequencies ``freqs_invA`` (M,) in 1/Å."""
    f = torch.as_tensor(freqs_invA)
    pts = torch.stack([f, torch.zeros_like(f)], dim=1)
    return ctf_from_freqs(pts, defocus_A, defocus_A, 0.0, voltage_kV, cs_mm, amplitude_contrast, phase_shift_deg)
