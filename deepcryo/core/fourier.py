"""Fourier helpers with ONE centring convention, used by every deepcryo module.

Convention
----------
Real-space and Fourier-space arrays of size N are *centred*: the origin (real-space rotation centre, and
the zero frequency) sits at index ``N // 2`` (RELION, cryoDRGN, ASPIRE, Xmipp all use this origin).
:func:`fft2c`/:func:`ifft2c` (and the 3D versions) map centred arrays to centred arrays:
``fft2c(x) = fftshift(fft2(ifftshift(x)))``. A centred point-like object therefore has a real,
positive transform, and a real, centrosymmetric image has a real transform.

Frequencies are in cycles per pixel from :func:`freqs_1d` (``(k - N//2) / N``); multiply by
``1 / pixel_size_A`` for 1/Å. Nyquist is 0.5 cycles/px.

All functions take batched torch tensors whose last 2 (or 3) dimensions are the image (or volume).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["fft2c", "ifft2c", "fft3c", "ifft3c", "freqs_1d", "freq_grid_2d", "freq_grid_3d", "radius_grid_2d",
           "radius_grid_3d", "fourier_crop_2d", "fourier_pad_2d", "resize_images", "resize_volume", "phase_ramps",
           "phase_shift_2d", "shift_images", "lowpass_filter", "bandpass_filter", "radial_average", "soft_edge",
           "downsample_images", "lowpass_volume"]


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred 2D FFT over the last two dimensions."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1))), dim=(-2, -1))


def ifft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred inverse 2D FFT over the last two dimensions (complex result)."""
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(x, dim=(-2, -1))), dim=(-2, -1))


def fft3c(x: torch.Tensor) -> torch.Tensor:
    """Centred 3D FFT over the last three dimensions."""
    dims = (-3, -2, -1)
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=dims), dim=dims), dim=dims)


def ifft3c(x: torch.Tensor) -> torch.Tensor:
    """Centred inverse 3D FFT over the last three dimensions (complex result)."""
    dims = (-3, -2, -1)
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(x, dim=dims), dim=dims), dim=dims)


def freqs_1d(n: int, device: Optional[Union[str, torch.device]] = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Frequencies (cycles/px) of a centred axis of length ``n``: ``(k - n//2) / n``."""
    return (torch.arange(n, device=device, dtype=dtype) - n // 2) / n


def freq_grid_2d(n: int, device: Optional[Union[str, torch.device]] = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, n, 2) grid of (fx, fy) in cycles/px; ``[..., 0]`` varies along x (the last axis)."""
    f = freqs_1d(n, device, dtype)
    fy, fx = torch.meshgrid(f, f, indexing="ij")
    return torch.stack([fx, fy], dim=-1)


def freq_grid_3d(n: int, device: Optional[Union[str, torch.device]] = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, n, n, 3) grid of (fx, fy, fz) in cycles/px for a volume indexed [z, y, x]."""
    f = freqs_1d(n, device, dtype)
    fz, fy, fx = torch.meshgrid(f, f, f, indexing="ij")
    return torch.stack([fx, fy, fz], dim=-1)


def radius_grid_2d(n: int, device: Optional[Union[str, torch.device]] = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, n) distance from the centre N//2 in pixels (also: frequency radius in Fourier pixels)."""
    c = torch.arange(n, device=device, dtype=dtype) - n // 2
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.sqrt(x * x + y * y)


def radius_grid_3d(n: int, device: Optional[Union[str, torch.device]] = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, n, n) distance from the centre N//2 in voxels."""
    c = torch.arange(n, device=device, dtype=dtype) - n // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return torch.sqrt(x * x + y * y + z * z)


def fourier_crop_2d(ft: torch.Tensor, n_out: int) -> torch.Tensor:
    """Crop a centred 2D spectrum (..., N, N) to (..., n_out, n_out) around the origin."""
    n = ft.shape[-1]
    start = n // 2 - n_out // 2
    return ft[..., start:start + n_out, start:start + n_out]


def fourier_pad_2d(ft: torch.Tensor, n_out: int) -> torch.Tensor:
    """Zero-pad a centred 2D spectrum (..., N, N) to (..., n_out, n_out), keeping the origin at n_out//2."""
    n = ft.shape[-1]
    start = n_out // 2 - n // 2
    out = ft.new_zeros(ft.shape[:-2] + (n_out, n_out))
    out[..., start:start + n, start:start + n] = ft
    return out


def resize_images(images: torch.Tensor, n_out: int) -> torch.Tensor:
    """Fourier-crop (downsample) or pad (upsample) real images (..., N, N) to (..., n_out, n_out).

    The pixel size changes by N / n_out; intensities are scaled so that the mean value is preserved.
    """
    n = images.shape[-1]
    if n_out == n:
        return images
    ft = fft2c(images)
    ft = fourier_crop_2d(ft, n_out) if n_out < n else fourier_pad_2d(ft, n_out)
    return ifft2c(ft).real * (n_out * n_out) / (n * n)


downsample_images = resize_images


def resize_volume(volume: torch.Tensor, n_out: int) -> torch.Tensor:
    """Fourier-crop (downsample) or zero-pad (upsample) a real volume (N, N, N) to (n_out, n_out, n_out): the same
    physical box at N / n_out times the voxel size; values scaled so that the mean is preserved."""
    n = volume.shape[-1]
    if n_out == n:
        return volume
    ft = fft3c(volume.to(torch.float32))
    ft = crop_to(ft, n_out, 3) if n_out < n else pad_to(ft, n_out, 3)
    return ifft3c(ft).real * (n_out / n) ** 3


def phase_ramps(freqs_px: torch.Tensor, shifts_px: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """Phase ramps (B, P) complex at frequencies ``freqs_px`` (P, 2) = (fx, fy) cycles/px that translate
    image content by ``shifts_px`` (B, 2) = (dx, dy) px: ``exp(-2πi f·shift)``, on ``freqs_px``'s device."""
    shifts = torch.as_tensor(shifts_px, dtype=torch.float32, device=freqs_px.device)
    phase = (-2.0 * math.pi) * (shifts @ freqs_px.T)
    return torch.polar(torch.ones_like(phase), phase)


def phase_shift_2d(n: int, shifts_px: torch.Tensor, device: Optional[Union[str, torch.device]] = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Phase ramps (B, n, n) complex that translate an image by ``shifts_px`` (B, 2) = (dx, dy) pixels.

    Multiplying a centred spectrum by this ramp moves image content by +dx along x and +dy along y.
    """
    shifts_px = torch.as_tensor(shifts_px, device=device, dtype=dtype)
    grid = freq_grid_2d(n, device=shifts_px.device, dtype=dtype)
    phase = -2.0 * math.pi * (grid[..., 0] * shifts_px[:, 0, None, None] + grid[..., 1] * shifts_px[:, 1, None, None])
    return torch.polar(torch.ones_like(phase), phase)


def shift_images(images: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
    """Translate real images (B, n, n) by ``shifts_px`` (B, 2) pixels (sub-pixel, periodic)."""
    ft = fft2c(images) * phase_shift_2d(images.shape[-1], shifts_px, device=images.device, dtype=images.dtype)
    return ifft2c(ft).real


def soft_edge(radius: torch.Tensor, cutoff: float, width: float) -> torch.Tensor:
    """Raised-cosine edge: 1 inside ``cutoff``, 0 beyond ``cutoff + width``, smooth in between."""
    if width <= 0:
        return (radius <= cutoff).to(radius.dtype)
    t = ((radius - cutoff) / width).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * t))


def lowpass_filter(images: torch.Tensor, resolution_A: float, pixel_size_A: float,
                   width_px: float = 2.0) -> torch.Tensor:
    """Low-pass real images (..., N, N) to ``resolution_A`` with a raised-cosine edge ``width_px`` wide."""
    n = images.shape[-1]
    cutoff = n * pixel_size_A / resolution_A
    mask = soft_edge(radius_grid_2d(n, device=images.device), cutoff, width_px)
    return ifft2c(fft2c(images) * mask).real


def bandpass_filter(images: torch.Tensor, low_A: float, high_A: float, pixel_size_A: float,
                    width_px: float = 2.0) -> torch.Tensor:
    """Keep frequencies between ``low_A`` and ``high_A`` (Å) with raised-cosine edges."""
    n = images.shape[-1]
    r = radius_grid_2d(n, device=images.device)
    keep = soft_edge(r, n * pixel_size_A / high_A, width_px) * (1 - soft_edge(r, n * pixel_size_A / low_A, width_px))
    return ifft2c(fft2c(images) * keep).real


def lowpass_volume(volume: torch.Tensor, resolution_A: float, pixel_size_A: float,
                   width_px: float = 2.0) -> torch.Tensor:
    """Low-pass a volume (N, N, N) to ``resolution_A`` with a raised-cosine edge."""
    n = volume.shape[-1]
    cutoff = n * pixel_size_A / resolution_A
    mask = soft_edge(radius_grid_3d(n, device=volume.device), cutoff, width_px)
    return ifft3c(fft3c(volume) * mask).real


def radial_average(x: torch.Tensor, n_shells: Optional[int] = None) -> torch.Tensor:
    """Rotational average of images (..., N, N) over integer-radius shells around N//2.

    Returns (..., n_shells) with shell k holding radii in [k - 0.5, k + 0.5); default n_shells = N//2 + 1.
    """
    n = x.shape[-1]
    return _shell_average(x, radius_grid_2d(n, device=x.device), 2, n_shells or n // 2 + 1)


def _shell_average(x, r, ndim, n_shells):
    idx = torch.round(r).long().clamp(max=n_shells).reshape(-1)
    flat = x.reshape(x.shape[:-ndim] + (-1,))
    sums = torch.zeros(flat.shape[:-1] + (n_shells + 1,), dtype=flat.dtype, device=flat.device)
    sums.index_add_(-1, idx, flat)
    counts = torch.zeros(n_shells + 1, dtype=flat.dtype, device=flat.device).index_add_(
        0, idx, torch.ones_like(idx, dtype=flat.dtype))
    return (sums / counts.clamp(min=1))[..., :n_shells]


def radial_average_3d(volume: torch.Tensor, n_shells: Optional[int] = None) -> torch.Tensor:
    """Rotational average of (..., N, N, N) over integer-radius shells; (..., n_shells)."""
    n = volume.shape[-1]
    return _shell_average(volume, radius_grid_3d(n, device=volume.device), 3, n_shells or n // 2 + 1)


__all__.append("radial_average_3d")


def interpolate_radial(profile: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Evaluate a radial profile (..., S) at fractional radii (any shape), linearly."""
    s = profile.shape[-1]
    r = radius.clamp(0, s - 1)
    lo = r.floor().long().clamp(max=s - 1)
    hi = (lo + 1).clamp(max=s - 1)
    w = r - lo
    return profile[..., lo] * (1 - w) + profile[..., hi] * w


__all__.append("interpolate_radial")


def pad_to(x: torch.Tensor, n_out: int, ndim: int) -> torch.Tensor:
    """Zero-pad the last ``ndim`` (2 or 3) dimensions of size N centrally to ``n_out``, keeping N//2 at n_out//2."""
    n = x.shape[-1]
    lo = n_out // 2 - n // 2
    return F.pad(x, (lo, n_out - n - lo) * ndim)


def crop_to(x: torch.Tensor, n_out: int, ndim: int) -> torch.Tensor:
    """Crop the last ``ndim`` dimensions of size N centrally to ``n_out`` (inverse of :func:`pad_to`)."""
    n = x.shape[-1]
    lo = n // 2 - n_out // 2
    sl = (Ellipsis,) + (slice(lo, lo + n_out),) * ndim
    return x[sl]


__all__ += ["pad_to", "crop_to"]
