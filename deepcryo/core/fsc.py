"""Fourier shell correlation, resolution at a threshold, and soft spherical masks.

Shells are integer-radius rings of the centred 3D spectrum (shell k holds radii in [k-0.5, k+0.5) Fourier
pixels), k = 0 … N/2; shell k corresponds to the frequency ``k / (N · pixel_size_A)`` 1/Å. The resolution
at a threshold is interpolated linearly at the first crossing below it (after shell 1), as RELION does.
"""
import math

import numpy as np
import torch

from . import fourier

__all__ = ["fsc", "fsc_resolution_A", "shell_frequencies", "spherical_mask", "fsc_to_ssnr", "fsc_to_half_ssnr"]


def fsc(volume1, volume2):
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


def shell_frequencies(box, pixel_size_A):
    """Spatial frequency (1/Å) of each FSC shell."""
    return np.arange(box // 2 + 1) / (box * pixel_size_A)


def fsc_resolution_A(curve, pixel_size_A, threshold=0.143):
    """Resolution (Å) where the FSC first drops below ``threshold`` (Nyquist if it never does)."""
    curve = np.asarray(curve)
    box = 2 * (len(curve) - 1)
    freqs = shell_frequencies(box, pixel_size_A)
    for k in range(1, len(curve)):
        if curve[k] < threshold:
            f0, f1, c0, c1 = freqs[k - 1], freqs[k], curve[k - 1], curve[k]
            f = f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0) if c0 != c1 else f1
            return float(1.0 / f) if f > 0 else math.inf
    return float(1.0 / freqs[-1])


def fsc_to_ssnr(curve, floor=1e-3):
    """Spectral SNR of the full map from a half-map FSC: ``2·FSC / (1 − FSC)`` (clipped to ``floor``)."""
    c = np.clip(np.asarray(curve, dtype=np.float64), 0.0, 0.999)
    return np.maximum(2.0 * c / (1.0 - c), floor)


def fsc_to_half_ssnr(curve):
    """Spectral SNR of one half map from the half-map FSC: ``FSC / (1 − FSC)``, FSC clipped to [1e-3, 0.999]
    (RELION's ``updateSSNRarrays``)."""
    c = np.clip(np.asarray(curve, dtype=np.float64), 1e-3, 0.999)
    return c / (1.0 - c)


def spherical_mask(box, radius_px=None, edge_px=5.0, device=None):
    """(N, N, N) soft spherical mask: 1 inside ``radius_px`` (default N/2 - edge - 1), cosine edge."""
    if radius_px is None:
        radius_px = box / 2 - edge_px - 1
    r = fourier.radius_grid_3d(box, device=device)
    return fourier.soft_edge(r, radius_px, edge_px)
