"""Fourier-slice projection of a volume for a batch of poses, with shifts and an optional CTF.

Method (as RELION's projector): the volume is zero-padded ``pad`` times, pre-divided by the Fourier
transform of the trilinear interpolation kernel (gridding correction, ``sinc²`` per axis), transformed
once; each projection is the central slice ``P̂(k) = V̂(Aᵀ k)`` sampled by trilinear interpolation for
frequencies up to Nyquist (radius N/2 in Fourier pixels), then inverse-transformed.

Image formation (RELION convention): ``image = IFT( CTF · T_{-origin} · P̂ )``; the particle centre sits
at pixel ``N//2 - origin_px``, i.e. the origin is the shift that brings the particle back to the box centre.
"""
import math

import torch
import torch.nn.functional as F

from . import fourier
from .geometry import euler_to_matrix

__all__ = ["Projector", "gridding_kernel_1d"]


def gridding_kernel_1d(n, padded, device=None, dtype=torch.float32):
    """Real-space profile (n,) of the trilinear kernel's transform ``sinc²(x / padded)``, x from the centre."""
    x = (torch.arange(n, device=device, dtype=dtype) - n // 2) / padded
    return torch.sinc(x) ** 2


class Projector:
    """Projects one volume (N, N, N) for batches of poses.

    The padded transform is kept as its Hermitian half ``kx >= 0`` (real volumes: ``V̂(−k) = V̂(k)*``), real and
    imaginary channels, (1, 2, M, M, M/2 + 1) with kz, ky = −M/2 … M/2 − 1 at index k + M/2 and kx = 0 … M/2 (the
    layout of :func:`deepcryo.landscape.model.padded_half_transform`). A point with kx < 0 is read at −k and
    conjugated. Trilinear interpolation of Hermitian data is Hermitian, so this equals sampling the whole cube,
    with half the memory. A request whose frequencies stay within a radius (a band, a low-pass) reads a copy
    cropped to that radius, cached until another radius is asked for: a whole cube (kx, ky, kz = −h … h, unfolded
    from the half table) where it holds at most half the half table's voxels, so no point is folded or conjugated
    (a third of a band slice's cost), else the half table cropped, folded as above; the projector so never holds
    more than 1.5 times its half table. Both matter at large boxes, where the slices' gather is bound by memory
    traffic over a table of ``8 (2N)³ / 2`` bytes.

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
        corrected = fourier.pad_to(vol / (g[:, None, None] * g[None, :, None] * g[None, None, :]), self.padded_box, 3)
        half = torch.fft.fftshift(torch.fft.rfftn(torch.fft.ifftshift(corrected)), dim=(0, 1))
        del corrected
        self._half = torch.stack([half.real, half.imag], dim=0)[None].contiguous()
        self._cropped = (None, None, None)        # (half-width h, cropped table, whole cube?) of the last radius asked

    def _table(self, max_radius):
        """(table, h, whole): the half table and M/2, or (when ``max_radius`` (cycles/px) is below Nyquist) a copy
        cropped to the padded-grid radius h of ``max_radius`` plus one for the interpolation's upper corners: the
        whole cube kx, ky, kz = −h … h (``whole``; its value at −k the conjugate of the half table's at k) when it
        holds at most half the half table's voxels, else the half table's kz, ky = −h … h, kx = 0 … h."""
        m = self.padded_box
        h = int(math.ceil(max_radius * m)) + 1
        if h >= m // 2 - 1:
            return self._half, m // 2, False
        if self._cropped[0] != h:
            half = self._half[..., m // 2 - h:m // 2 + h + 1, m // 2 - h:m // 2 + h + 1, :h + 1]
            whole = 2 * (2 * h + 1) ** 3 <= self._half[0, 0].numel()
            if whole:
                mirrored = half[..., 1:].flip(-1, -2, -3)                     # kx = −h … −1 read at −k
                mirrored = torch.cat([mirrored[:, :1], -mirrored[:, 1:]], 1)  # conjugated
                half = torch.cat([mirrored, half], -1)
            self._cropped = (h, half.contiguous(), whole)
        return self._cropped[1], h, self._cropped[2]

    def _sample_grid(self, grid: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Trilinear values (2, n) of ``table`` at ``grid`` (n, 3), grid_sample's normalised coordinates."""
        return F.grid_sample(table, grid.reshape(1, -1, 1, 1, 3), mode="bilinear", padding_mode="zeros",
                             align_corners=True).reshape(2, -1)

    def sample(self, points: torch.Tensor, max_radius: float = 0.5) -> torch.Tensor:
        """Trilinear values (...) complex of the padded, gridding-corrected transform at frequencies ``points``
        (..., 3), (kx, ky, kz) in cycles/px, on :attr:`device`. Points beyond ``max_radius`` (cycles/px; Nyquist
        by default) may read zeros: callers keep their frequencies within it, or mask what lies beyond.
        A central slice is ``sample(k·A)`` for the in-plane frequencies k = (kx, ky, 0) (the row vector k times
        the pose matrix A is ``Aᵀk``)."""
        table, origin, whole = self._table(max_radius)
        if whole:                                                     # a cropped whole cube, centred on k = 0
            out = self._sample_grid(points * (self.padded_box / origin), table)
            return torch.complex(out[0], out[1]).reshape(points.shape[:-1])
        z, y, x = table.shape[-3:]
        m = self.padded_box
        scale = torch.tensor([2.0 * m / (x - 1), 2.0 * m / (y - 1), 2.0 * m / (z - 1)], device=points.device)
        shift = torch.tensor([-1.0, 2.0 * origin / (y - 1) - 1.0, 2.0 * origin / (z - 1) - 1.0], device=points.device)
        conj = torch.where(points[..., :1] < 0, -1.0, 1.0)                                 # (..., 1)
        out = self._sample_grid(points * conj * scale + shift, table).reshape((2,) + points.shape[:-1])
        return torch.complex(out[0], out[1] * conj[..., 0])

    def central_slices(self, freqs: torch.Tensor, rotations: torch.Tensor, max_radius: float = 0.5) -> torch.Tensor:
        """Central slices (B, ...) complex at in-plane frequencies ``freqs`` (..., 2), (kx, ky) in cycles/px, for
        (B, 3, 3) pose matrices A: :meth:`sample` at ``k·A`` (``Aᵀk``), k = (kx, ky, 0); ``max_radius`` as there.
        The points ``kx·A[0] + ky·A[1]`` are formed elementwise: cheaper than a batch of (F, 3) × (3, 3)
        products, and each value independent of the batch it is computed in (a gallery vector must not depend
        on the batch that projected it), which neither one large matrix product nor a fused multiply-add
        (vector and scalar paths round differently) guarantees."""
        f = freqs.reshape(1, -1, 2, 1)
        shape = rotations.shape[:1] + freqs.shape[:-1]
        table, origin, whole = self._table(max_radius)
        if whole:                                   # a cropped cube: the grid's scale taken into the (B, 2, 3) rows
            rows = (rotations[:, :2, :] * (self.padded_box / origin))[:, None]
            out = self._sample_grid(f[:, :, 0] * rows[:, :, 0] + f[:, :, 1] * rows[:, :, 1], table)
            return torch.complex(out[0], out[1]).reshape(shape)
        rows = rotations[:, None, :2, :]                                                  # (B, 1, 2, 3)
        points = f[:, :, 0] * rows[:, :, 0] + f[:, :, 1] * rows[:, :, 1]                  # (B, F, 3)
        return self.sample(points, max_radius).reshape(shape)

    def project_ft(self, rotations, max_radius_px=None):
        """Centred spectra (B, N, N) complex of the projections for (B, 3, 3) pose matrices, zero beyond
        ``max_radius_px`` (Fourier pixels of the N grid; N/2 by default)."""
        rotations = torch.as_tensor(rotations, dtype=torch.float32, device=self.device)
        n = self.box
        radius_px = n / 2 if max_radius_px is None else max_radius_px
        mask = fourier.radius_grid_2d(n, device=self.device) <= radius_px
        return self.central_slices(fourier.freq_grid_2d(n, device=self.device), rotations, radius_px / n) * mask

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
