"""Fourier-slice projection of a volume for a batch of poses, with shifts and an optional CTF.

Method (as RELION's projector): the volume is zero-padded ``pad`` times, pre-divided by the Fourier
transform of the trilinear interpolation kernel (gridding correction, ``sinc²`` per axis), transformed
once; each projection is the central slice ``P̂(k) = V̂(Aᵀ k)`` sampled by trilinear interpolation for
frequencies up to Nyquist (radius N/2 in Fourier pixels), then inverse-transformed.

Image formation (RELION convention): ``image = IFT( CTF · T_{-origin} · P̂ )``; the particle centre sits
at pixel ``N//2 - origin_px``, i.e. the origin is the shift that brings the particle back to the box centre.
"""
import torch
import torch.nn.functional as F

from . import fourier
from .geometry import euler_to_matrix

__all__ = ["Projector", "slice_coordinates", "gridding_kernel_1d"]


def gridding_kernel_1d(n, padded, device=None, dtype=torch.float32):
    """Real-space profile (n,) of the trilinear kernel's transform ``sinc²(x / padded)``, x from the centre."""
    x = (torch.arange(n, device=device, dtype=dtype) - n // 2) / padded
    return torch.sinc(x) ** 2


def slice_coordinates(rotations, box, padded_box, max_radius_px=None):
    """Padded-grid sampling coordinates of the central slices.

    Args:
        rotations: (B, 3, 3) pose matrices A (volume → projection frame).
        box: image size N; padded_box: size M of the padded Fourier grid.
        max_radius_px: keep frequencies with radius <= this (Fourier pixels of the N grid); default N/2.
    Returns:
        coords (B, N, N, 3) float positions (x, y, z) in padded-grid index units, and the (N, N) bool mask
        of the kept frequencies.
    """
    device, dtype = rotations.device, rotations.dtype
    k = fourier.freq_grid_2d(box, device=device, dtype=dtype)              # (N, N, 2) cycles/px
    k3 = torch.cat([k, torch.zeros_like(k[..., :1])], dim=-1)             # (N, N, 3)
    pts = torch.einsum("hwi,bij->bhwj", k3, rotations)                     # Aᵀk as row vector k·A
    coords = pts * padded_box + padded_box // 2
    r = fourier.radius_grid_2d(box, device=device, dtype=dtype)
    mask = r <= (box / 2 if max_radius_px is None else max_radius_px)
    return coords, mask


class Projector:
    """Projects one volume (N, N, N) for batches of poses.

    Args:
        volume: (N, N, N) tensor or array (indexed [z, y, x]).
        pad: padding factor of the Fourier grid (2 as RELION).
        device: torch device.
    """

    def __init__(self, volume, pad=2, device=None):
        vol = torch.as_tensor(volume, dtype=torch.float32, device=device)
        if vol.dim() != 3 or len(set(vol.shape)) != 1:
            raise ValueError("volume must be a cube, got shape %s" % (tuple(vol.shape),))
        self.box = vol.shape[-1]
        self.padded_box = int(pad * self.box)
        self.device = vol.device
        g = gridding_kernel_1d(self.box, self.padded_box, device=self.device)
        corrected = vol / (g[:, None, None] * g[None, :, None] * g[None, None, :])
        ft = fourier.fft3c(fourier.pad_to(corrected, self.padded_box, 3))
        # (1, 2, M, M, M) real/imag channels for grid_sample
        self._ft = torch.stack([ft.real, ft.imag], dim=0)[None].contiguous()

    @property
    def padded_ft(self) -> torch.Tensor:
        """(1, 2, M, M, M) real and imaginary channels of the padded, gridding-corrected, centred transform
        (M = ``padded_box``, origin at M//2), the layout :func:`torch.nn.functional.grid_sample` samples
        with ``align_corners=True``; on :attr:`device`. Read-only: shared with the projector."""
        return self._ft

    def project_ft(self, rotations, max_radius_px=None):
        """Centred spectra (B, N, N) complex of the projections for (B, 3, 3) pose matrices."""
        rotations = torch.as_tensor(rotations, dtype=torch.float32, device=self.device)
        coords, mask = slice_coordinates(rotations, self.box, self.padded_box, max_radius_px)
        grid = coords / (self.padded_box - 1) * 2.0 - 1.0                      # align_corners=True
        out = F.grid_sample(self._ft, grid[None], mode="bilinear", padding_mode="zeros", align_corners=True)
        out = out[0]                                                              # (2, B, N, N)
        return torch.complex(out[0], out[1]) * mask

    def project(self, angles_deg, origins_px=None, ctf=None, max_radius_px=None):
        """Real projection images (B, N, N).

        Args:
            angles_deg: (B, 3) rot, tilt, psi (degrees).
            origins_px: (B, 2) RELION origins in pixels (x, y); the image content moves by -origin.
            ctf: (B, N, N) CTF on the centred grid (see :func:`deepcryo.core.ctf.ctf_2d`), or None.
        """
        rot = euler_to_matrix(torch.as_tensor(angles_deg, dtype=torch.float64)).to(torch.float32)
        spec = self.project_ft(rot.to(self.device), max_radius_px)
        if origins_px is not None:
            shifts = -torch.as_tensor(origins_px, dtype=torch.float32, device=self.device)
            spec = spec * fourier.phase_shift_2d(self.box, shifts, device=self.device)
        if ctf is not None:
            spec = spec * torch.as_tensor(ctf, dtype=torch.float32, device=self.device)
        return fourier.ifft2c(spec).real
