"""The ONE function that turns micrographs into the defocus model's input (training and prediction alike).

:func:`compute_psd` (micrograph of any size and pixel size → PSD images at fixed physical samplings):

1. square tiles (50 % overlap when there are few; side ``size · sampling / pixel_size`` px, so that one tile
   spans ``size · sampling`` Å, capped at the micrograph's side), each mean-subtracted and tapered by a
   Hann window; their periodograms ``|FFT|²`` are averaged (Welch);
2. the average is resampled (bilinear) onto a centred ``size × size`` grid of frequency step
   ``1 / (size · sampling)`` 1/Å, i.e. the PSD of the micrograph as if sampled at ``sampling`` Å/px;
   frequencies beyond the micrograph's Nyquist (``1 / (2 · pixel_size)``) are masked (set to 0);
3. ``log``; a smooth radial background (radial average of the log-PSD smoothed over ``size/24`` shells)
   is subtracted, then the result is divided by its smoothed radial RMS, so Thon rings have unit
   amplitude at every frequency; values are clipped to [-4, 4].

Conventions: centred grids of :mod:`deepcryo.core.fourier` (zero frequency at index ``size // 2``;
x = last axis), so a ring pattern of a CTF with angle θ (degrees from x to U) appears as in
:func:`deepcryo.core.ctf.ctf_2d` with ``pixel_size_A = sampling``.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..core import fourier
from ..core.errors import InputError

__all__ = ["compute_psd", "compute_psds", "tile_size_px", "normalised_log_psd", "periodogram_half_width", "MIN_TILE_PX", "CNN_SAMPLINGS_A", "CNN_SIZE_PX"]

#: the model's input: samplings (Å/px) and image side (px) of its three PSD channels
CNN_SAMPLINGS_A = (1.0, 2.0, 3.0)
CNN_SIZE_PX = 128
#: a micrograph side shorter than this (px) is refused
MIN_TILE_PX = 64

_FAST = sorted({2 ** a * 3 ** b * 5 ** c for a in range(14) for b in range(6) for c in range(4)
                if 2 ** a * 3 ** b * 5 ** c <= 8192})


def tile_size_px(micrograph_side_px: int, pixel_size_A: float, sampling_A: float, size_px: int) -> int:
    """Tile side (px) for a PSD of ``size_px`` at ``sampling_A`` Å/px from a micrograph at ``pixel_size_A``.

    The ideal side ``size_px · sampling_A / pixel_size_A`` is rounded up to an FFT-friendly length and
    capped at the micrograph's side.
    """
    ideal = int(math.ceil(size_px * sampling_A / pixel_size_A))
    fast = next((f for f in _FAST if f >= ideal), ideal)
    return int(min(fast, micrograph_side_px))


def _welch(mics, mean, tile, kmax=None):
    """Average periodogram of Hann-tapered tiles of ``mics - mean``, centred and cropped to |k| <= ``kmax``.

    Returns (B, 2K+1, 2K+1) with K = ``min(kmax, tile // 2)`` and the zero frequency at index K (k in
    cycles per tile). Tiles overlap by 50 % when the micrograph holds fewer than 16 disjoint tiles,
    otherwise they are disjoint (enough averaging already, and half the memory traffic). ``mean`` (B,) is
    subtracted while tapering (one fused pass, no mean-free copy of the micrograph). Only the needed
    frequencies are transformed: rfft along x, crop to K, fft along y of those columns; the periodograms
    (re² + im²) of each row of tiles are summed, and cropped to |ky| <= K at the end.
    """
    b, h, w = mics.shape
    K = tile // 2 if kmax is None else int(min(kmax, tile // 2))
    step = tile // 2 if (h // tile) * (w // tile) < 16 else tile
    step = max(step, 1)
    win1 = torch.hann_window(tile, periodic=False, dtype=mics.dtype, device=mics.device)
    win = win1[:, None] * win1[None, :]
    offset = -mean[:, None, None, None] * win  # (B, 1, tile, tile): (x − mean)·win = x·win − mean·win
    acc = torch.zeros(b, tile, K + 1, dtype=mics.dtype, device=mics.device)
    count = 0
    for y in range(0, h - tile + 1, step):
        tiles = mics[:, y:y + tile].unfold(2, tile, step).permute(0, 2, 1, 3)  # (B, nx, tile, tile) view
        half = torch.fft.rfft(torch.addcmul(offset, tiles, win), dim=-1)[..., :K + 1]
        spec = torch.fft.fft(half, dim=-2)
        acc += (spec.real.square() + spec.imag.square()).sum(dim=1)
        count += tiles.shape[1]
    acc = acc[:, torch.arange(-K, K + 1, device=mics.device) % tile]  # ky = -K..K
    acc /= count * float(win.square().sum())
    # centred full spectrum from the half spectrum: P[ky, kx] = P[-ky, -kx] for real input
    i = torch.arange(2 * K + 1, device=mics.device)
    kx = i - K
    r_idx = torch.where(kx[None, :] < 0, 2 * K - i[:, None], i[:, None])
    out = acc[:, r_idx, kx.abs()[None, :].expand(2 * K + 1, -1)]
    if 2 * K == tile:
        # uncropped even tile: k = +tile/2 is the same frequency as -tile/2; an uncropped centred periodogram
        # stops at +tile/2 - 1, so repeat that row/column there (same bilinear values as 'border' padding)
        out[:, -1] = out[:, -2]
        out[:, :, -1] = out[:, :, -2]
    return out


def _smooth_radial(profile, width):
    """Gaussian smoothing (sigma ``width`` shells) of radial profiles (B, S) with edge replication."""
    radius = int(3 * width) + 1
    x = torch.arange(-radius, radius + 1, dtype=profile.dtype, device=profile.device)
    kernel = torch.exp(-0.5 * (x / width) ** 2)
    kernel = (kernel / kernel.sum()).reshape(1, 1, -1)
    padded = F.pad(profile[:, None], (radius, radius), mode="replicate")
    return F.conv1d(padded, kernel)[:, 0]


def compute_psd(micrographs: torch.Tensor, pixel_size_A: float, samplings_A: Sequence[float] = CNN_SAMPLINGS_A,
                size_px: int = CNN_SIZE_PX) -> torch.Tensor:
    """Background-subtracted, normalised log-PSDs of micrographs at fixed physical samplings.

    Args:
        micrographs: (B, H, W) or (H, W) tensor/array (any H, W >= :data:`MIN_TILE_PX`), all at one pixel size.
        pixel_size_A: micrograph pixel size (Å/px).
        samplings_A: output samplings (Å/px), one channel each.
        size_px: output side (px); channel c has frequency step ``1 / (size_px · samplings_A[c])`` 1/Å.
    Returns:
        (B, C, size_px, size_px) float32 tensor, centred (zero frequency at ``size_px // 2``); 0 beyond the
        micrograph's Nyquist and at the zero frequency.
    Raises:
        InputError for a micrograph smaller than :data:`MIN_TILE_PX`, a bad pixel size or non-finite values.
    """
    return compute_psds(micrographs, pixel_size_A, [(samplings_A, size_px)])[0]


def compute_psds(micrographs: torch.Tensor, pixel_size_A: float,
                 requests: Sequence[Tuple[Sequence[float], int]]) -> List[torch.Tensor]:
    """Several :func:`compute_psd` outputs of the same micrographs at once (validated and normalised once).

    ``requests``: list of ``(samplings_A, size_px)``; returns the list of (B, C, size_px, size_px) tensors,
    each identical to ``compute_psd(micrographs, pixel_size_A, samplings_A, size_px)`` (which calls this).
    """
    mics = torch.as_tensor(micrographs)
    if mics.dtype != torch.float32:
        mics = mics.to(torch.float32)
    if mics.ndim == 2:
        mics = mics[None]
    if mics.ndim != 3:
        raise InputError("compute_psd: expected (B, H, W) micrographs, got shape %s" % (tuple(mics.shape),))
    if not pixel_size_A or pixel_size_A <= 0 or not math.isfinite(pixel_size_A):
        raise InputError("missing or invalid pixel size (%r Å/px)" % (pixel_size_A,))
    side = min(mics.shape[-2:])
    if side < MIN_TILE_PX:
        raise InputError("micrograph of %dx%d px is smaller than a PSD tile (%d px)"
                         % (mics.shape[-1], mics.shape[-2], MIN_TILE_PX))
    # intensities: the mean is subtracted while tapering and the periodogram divided by the variance, so the
    # PSD does not depend on dose scaling (NaN/Inf propagate into these; two passes cost less than var_mean's one)
    flat = mics.flatten(1)
    var, mean = flat.var(dim=1), flat.mean(dim=1)
    if not (torch.isfinite(var).all() and torch.isfinite(mean).all()):
        raise InputError("micrograph contains NaN or Inf values")
    if bool((var == 0).any()):
        raise InputError("micrograph is constant (zero variance)")
    var = var.clamp(min=1e-30)
    powers = {}
    out = []
    for samplings_A, size_px in requests:
        channels = []
        for sampling in samplings_A:
            tile = tile_size_px(side, pixel_size_A, sampling, size_px)
            key = (tile, periodogram_half_width(pixel_size_A, tile, sampling))
            if key not in powers:
                powers[key] = _welch(mics, mean, tile, key[1]) / var[:, None, None]
            channels.append(normalised_log_psd(powers[key], pixel_size_A, tile, sampling, size_px))
        out.append(torch.stack(channels, dim=1))
    return out


def periodogram_half_width(pixel_size_A: float, tile_px: int, sampling_A: float) -> int:
    """Half width K (cycles per tile) of the centred periodogram crop that a ``CNN_SIZE_PX``-style output at
    ``sampling_A`` Å/px reads (its corner frequency ``0.5 / sampling_A`` plus the bilinear neighbour), at most
    ``tile_px // 2``."""
    corner = float(torch.tensor(0.5) / sampling_A)  # float32, as the output grid's corner frequency
    kmax = int(math.ceil(corner * pixel_size_A * tile_px)) + 1
    return int(min(kmax, tile_px // 2))


def normalised_log_psd(power: torch.Tensor, pixel_size_A: float, tile_px: int, sampling_A: float,
                       size_px: int) -> torch.Tensor:
    """Steps 2-3 of :func:`compute_psd` for one channel: a centred periodogram → the normalised log-PSD.

    Args:
        power: (B, 2K+1, 2K+1) averaged periodograms of ``tile_px`` tiles, zero frequency at index K,
            frequency step ``1 / (tile_px · pixel_size_A)`` 1/Å (what the Welch step gives, or a simulation
            of it: :mod:`deepcryo.defocus.training_data`).
        pixel_size_A: micrograph pixel size (Å/px); frequencies beyond its Nyquist are masked.
        sampling_A, size_px: output sampling (Å/px) and side (px).
    Returns:
        (B, size_px, size_px) float32, background-subtracted, unit radial RMS, clipped to [-4, 4], 0 outside.
    """
    b = power.shape[0]
    device = power.device
    grid_c = fourier.freq_grid_2d(size_px, device=device)  # cycles/px at the output sampling
    r_out = fourier.radius_grid_2d(size_px, device=device)
    n_shells = size_px // 2 + 1
    shell = torch.round(r_out).long().clamp(max=n_shells - 1)
    freqs = grid_c / sampling_A  # 1/Å
    k = (power.shape[-1] - 1) // 2
    # position in the tile's centred periodogram (cycles/px of the micrograph · tile), then to [-1, 1]
    pos = freqs * pixel_size_A * tile_px + k
    norm = (pos + 0.5) / (2 * k + 1) * 2.0 - 1.0
    sampled = F.grid_sample(power[:, None], norm[None].expand(b, -1, -1, -1), mode="bilinear",
                            padding_mode="border", align_corners=False)[:, 0]
    inside = (freqs.abs() <= 0.5 / pixel_size_A).all(dim=-1) & (r_out > 0.5)
    logp = torch.log(sampled.clamp(min=1e-30))
    mask = inside.to(logp.dtype)
    counts = torch.zeros(n_shells, device=device).index_add_(0, shell.reshape(-1), mask.reshape(-1))
    sums = torch.zeros(b, n_shells, device=device).index_add_(1, shell.reshape(-1), (logp * mask).reshape(b, -1))
    valid = counts > 0
    mean_r = _fill_invalid(sums / counts.clamp(min=1), valid)
    background = _smooth_radial(mean_r, size_px / 24.0)
    resid = (logp - background[:, shell]) * mask
    sq = torch.zeros(b, n_shells, device=device).index_add_(1, shell.reshape(-1), (resid ** 2).reshape(b, -1))
    rms = _smooth_radial(_fill_invalid(sq / counts.clamp(min=1), valid), size_px / 24.0).clamp(min=1e-6).sqrt()
    return (resid / rms[:, shell]).clamp(-4.0, 4.0) * mask


def _fill_invalid(profile, valid):
    """Replace shells without pixels by the nearest valid shell (beyond the last valid one: the last)."""
    idx = torch.arange(profile.shape[-1], device=profile.device)
    good = idx[valid]
    if good.numel() == 0:
        return profile
    nearest = good[(idx[:, None] - good[None, :]).abs().argmin(dim=1)]
    return profile[:, nearest]
