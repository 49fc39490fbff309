"""Half-plane Fourier bands: the non-redundant pixels of a centred spectrum within a frequency range.

Convention (the only one in deepcryo)
-------------------------------------
The spectrum of a real image is Hermitian, ``F(-k) = conj(F(k))``, so a band keeps one of each Friedel
pair: the half plane ``kx > 0``, or ``kx == 0`` and ``ky > 0`` (the ``kx >= 0`` half that RELION and FFTW
store, without the Friedel mates on the ``kx = 0`` line). The DC term is never in a band. Frequencies
``(kx, ky)`` are those of :func:`deepcryo.core.fourier.freq_grid_2d` (``[..., 0]`` along x, the last axis)
in any unit (cycles/px, Fourier pixels, 1/Å): only their signs and radius matter here.
"""
import torch

__all__ = ["half_plane_mask", "band_indices"]


def half_plane_mask(freqs: torch.Tensor) -> torch.Tensor:
    """(...) bool mask of the half plane ``kx > 0 or (kx == 0 and ky > 0)`` for frequencies (..., 2) = (kx, ky)."""
    kx, ky = freqs[..., 0], freqs[..., 1]
    return (kx > 0) | ((kx == 0) & (ky > 0))


def band_indices(freqs: torch.Tensor, radius: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """(P,) flat indices, in increasing order, of the half-plane pixels with ``low <= radius <= high``.

    Args:
        freqs: (N, N, 2) or (N·N, 2) frequencies (kx, ky) of a centred grid.
        radius: (N, N) or (N·N,) their radius, in the unit of ``low`` and ``high`` (computed by the caller,
            so that a band's edge is the one its user defines).
        low, high: radius range, inclusive; ``radius > 0`` always (no DC).
    """
    keep = half_plane_mask(freqs) & (radius >= low) & (radius <= high) & (radius > 0)
    return torch.nonzero(keep.reshape(-1)).squeeze(1)
