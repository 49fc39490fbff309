"""Image → search vector: the low-frequency Fourier band, as float32 vectors (SwiftAlign §4.2).

Band: the coefficients of the centred spectrum (:mod:`deepcryo.core.fourier`, origin at N//2) with a
frequency radius ``0 < r <= N · pixel_size_A / max_resolution_A`` (Fourier pixels) on the non-redundant
half plane of :mod:`deepcryo.core.bands` (``kx > 0``, or ``kx == 0`` and ``ky > 0``): the DC and the
Friedel mates are left out.

Vector: the band coefficients, optionally multiplied by ``sqrt(weight)`` (whitening by the noise
spectrum: weight = 1 / noise power), real and imaginary parts interleaved ``[Re c1, Im c1, Re c2, …]``,
float32. Interleaving keeps the Euclidean norm, so the L2 distance between vectors is the (weighted)
Fourier distance over the half band. With ``normalise`` every vector has unit norm and the squared
L2 distance is ``2 - 2·ρ``, ρ the (weighted) correlation of the two images over the band.
"""
from typing import Optional, Union

import numpy as np
import torch

from deepcryo.core import bands, fourier

__all__ = ["Band", "band_radius_px", "vectors_from_band", "noise_weights"]


def band_radius_px(box: int, pixel_size_A: float, max_resolution_A: float) -> float:
    """Band radius in Fourier pixels of a ``box`` px image for a resolution limit in Å (capped at Nyquist)."""
    if max_resolution_A < 2 * pixel_size_A:
        raise ValueError("max resolution %.3g Å is beyond Nyquist (%.3g Å)" % (max_resolution_A, 2 * pixel_size_A))
    return min(box * pixel_size_A / max_resolution_A, box / 2 - 1)


class Band:
    """The half-plane Fourier band of ``box`` px images up to ``max_resolution_A``.

    Attributes:
        pixels: (P,) flat indices into a centred (N, N) spectrum.
        freqs_px: (P, 2) frequencies (fx, fy) in cycles/px.
        radius_px: (P,) frequency radius in Fourier pixels.
    """

    def __init__(self, box: int, pixel_size_A: float, max_resolution_A: float) -> None:
        self.box = int(box)
        self.pixel_size_A = float(pixel_size_A)
        self.max_resolution_A = float(max_resolution_A)
        radius = band_radius_px(box, pixel_size_A, max_resolution_A)
        k = fourier.freq_grid_2d(self.box) * self.box                  # Fourier pixels
        r = torch.sqrt((k ** 2).sum(-1))
        self.pixels = bands.band_indices(k, r, 0.0, radius)
        self.freqs_px = (k.reshape(-1, 2)[self.pixels] / self.box).contiguous()
        self.radius_px = r.reshape(-1)[self.pixels]
        # the band read from an uncentred half spectrum (rfft2: kx = 0 … N/2, ky at ky mod N); every band pixel
        # has kx >= 0. Centring the image first (ifftshift by N//2) multiplies coefficient k by
        # exp(2πi (kx + ky) (N//2) / N): ±1 for even N.
        kx, ky = (k.reshape(-1, 2)[self.pixels].round().to(torch.int64)).unbind(-1)
        self._rfft_pixels = (ky % self.box) * (self.box // 2 + 1) + kx
        angle = 2 * np.pi * ((kx + ky) * (self.box // 2) % self.box).double() / self.box
        self._rfft_phase = torch.polar(torch.ones_like(angle), angle).to(torch.complex64)

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def dim(self) -> int:
        """Length of the real vectors: 2 × number of coefficients."""
        return 2 * len(self.pixels)

    @property
    def freqs_invA(self) -> torch.Tensor:
        """(P, 2) band frequencies in 1/Å."""
        return self.freqs_px / self.pixel_size_A

    def from_images(self, images: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
        """Band coefficients (B, P) complex of real images (B, N, N): the centred spectrum's
        (:func:`deepcryo.core.fourier.fft2c`) at the band pixels, read from the images' half spectrum (``rfft2``),
        without the centring shifts, which cost more than the transform itself."""
        x = torch.as_tensor(images, dtype=torch.float32)
        half = torch.fft.rfft2(x).reshape(x.shape[0], -1)
        return half.index_select(1, self._rfft_pixels.to(x.device)) * self._rfft_phase.to(x.device)

    def phase_ramps(self, origins_px: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
        """(..., P) complex ramps that move image content by ``-origin`` (RELION origin, px)."""
        return fourier.phase_ramps(self.freqs_px, -torch.as_tensor(origins_px, dtype=torch.float32))


def vectors_from_band(coeffs: torch.Tensor, sqrt_weights: Optional[torch.Tensor] = None,
                      normalise: bool = True) -> torch.Tensor:
    """Float32 search vectors (..., 2P) from band coefficients (..., P) complex (see module docstring)."""
    if sqrt_weights is not None:
        coeffs = coeffs * sqrt_weights
    vec = torch.view_as_real(coeffs.to(torch.complex64).contiguous()).reshape(coeffs.shape[:-1] + (-1,))
    if normalise:
        vec = vec / vec.norm(dim=-1, keepdim=True).clamp_min(1e-20)
    return vec.contiguous()


def noise_weights(band: Band, coeffs: torch.Tensor) -> torch.Tensor:
    """Whitening weights (P,): 1 / the radial mean power of band coefficients (B, P), normalised to mean 1.

    At the low SNR of particle images their power spectrum is dominated by the noise, so this is the
    inverse noise power per frequency shell (1-px shells).
    """
    shells = torch.round(band.radius_px).long()
    power = (coeffs.abs() ** 2).mean(0)
    n = int(shells.max()) + 1
    sums = torch.zeros(n).index_add_(0, shells, power)
    counts = torch.zeros(n).index_add_(0, shells, torch.ones_like(power))
    shell_power = sums / counts.clamp_min(1)
    w = 1.0 / shell_power[shells].clamp_min(1e-12 * float(shell_power.max()))
    return w / w.mean()
