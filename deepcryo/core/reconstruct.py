"""Direct Fourier inversion: CTF-weighted insertion of particle spectra into a padded 3D grid.

Method (RELION's ``BackProjector``): each particle spectrum is centred (origin undone by a phase ramp),
multiplied by its CTF and inserted, with its CTF², into a ``pad``-times oversampled Fourier grid by
trilinear weights, at the central slice of its pose (and of every symmetry copy ``A·S``). The map is
``V̂ = Σ CTF·X / (Σ CTF² + W̄/SSNR)``: with an SSNR estimate the Wiener term is RELION's 1/τ² (τ² = SSNR·σ²,
σ² = 1/W̄ the noise power of the shell, W̄ its mean weight); without one the weight is floored at 1e-3 of its
shell's mean. The inverse transform is cropped back to N, divided by the trilinear kernel's transform
(``sinc²`` per axis), and its corners beyond radius N/2 are replaced by their mean (:func:`mask_corners`).

RELION also replaces the voxel-by-voxel division by Pipe & Menon's iterative density compensation
(10 iterations with a Kaiser–Bessel blob). It is not used: on simulated particles with true poses it
did not bring the map closer to the truth and cost twice the time (``benchmarks/RESULTS.md``).

The grid holds the Hermitian half kx >= 0 (as RELION's): a slice point with kx < 0 is inserted as its
Friedel mate, so each particle is read, transformed (a real-input FFT) and CTF-weighted at the ``≈ π N²/8``
pixels it inserts, and the map comes back by one real-output inverse FFT.

Memory is bounded: particles stream in batches from memory-mapped stacks whose pages are released once
read; only the two padded half grids (data and weight) are held, ``M² (M/2 + 1)`` complex + real for
``M = pad·N``.

Program (options and examples in :mod:`deepcryo.core.commands.reconstruct`)::

    python -m deepcryo.core.reconstruct --particles P.star --output map.mrc --halves --symmetry C1
"""
import math
import sys
import time
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import fourier
from .ctf import ctf_2d, ctf_from_freqs
from .fsc import fsc
from .geometry import euler_to_matrix, symmetry_matrices
from .mrc import ImageStack
from .particles import ParticleStar
from .projector import gridding_kernel_1d

_BRICK = 4                  # side (voxels) of the cubic bricks the grids are stored in while particles are inserted

__all__ = ["Reconstructor", "insert_particles", "reconstruct_star", "mask_corners", "half_split", "main"]


class Reconstructor:
    """Accumulates particle spectra and CTF² weights in a padded, Hermitian-half Fourier grid.

    The grid holds the half space kx >= 0 only (RELION's ``BackProjector`` layout): a real map's transform
    is Hermitian, so a slice point with kx < 0 is inserted as its Friedel mate (−k, conjugate value), and
    the one plane kx = 0 that holds both mates is made Hermitian in :meth:`reconstruct`. Data (complex)
    and weights (real) are two flat arrays so each insertion is two scatter-adds.

    While particles are inserted the arrays hold the grid in cubic bricks of ``_BRICK``³ voxels, each
    contiguous, instead of rows along x: a slice's trilinear corners then fall in fewer cache lines and
    pages of the large grid (the scatter-adds are bound by memory access). The first :meth:`reconstruct`
    rewrites them as a plain (z, y, x) array.

    Args:
        box: image and map size N (px).
        pad: oversampling of the Fourier grid.
        symmetry: point group ('C1', 'C4', 'D7', 'O', ...).
        max_radius_px: highest frequency inserted, in Fourier pixels of the N grid (default N/2).
        device: torch device.
    """

    def __init__(self, box: int, pad: int = 2, symmetry: str = "C1", max_radius_px: Optional[float] = None,
                 device: Optional[Union[str, torch.device]] = None) -> None:
        self.box = int(box)
        self.padded_box = int(pad * box)
        self.device = torch.device(device or "cpu")
        self.max_radius_px = max_radius_px
        self.symmetry = symmetry_matrices(symmetry).to(torch.float32).to(self.device)
        m = self.padded_box
        # Trilinear corners of frequencies up to Nyquist reach index M along y and z (centred at M/2) and
        # M/2 + 1 along x (from 0), so the arrays carry one spare plane per axis and need no bounds checks.
        self._bricks = tuple(-(-d // _BRICK) for d in (m + 2, m + 2, m // 2 + 2))   # (z, y, x) bricks
        self._shape = tuple(d * _BRICK for d in self._bricks)                      # (z, y, x) voxels
        size = self._shape[0] * self._shape[1] * self._shape[2]
        self.data = torch.zeros(size, dtype=torch.complex64, device=self.device)
        self.weight = torch.zeros(size, dtype=torch.float32, device=self.device)
        # the inserted half slice (kx >= 0, radius <= max): frequencies (P, 3) in cycles/px and the flat
        # indices of those pixels in a centred (N, N) spectrum and in an uncentred rfft2 (N, N//2 + 1) one
        n = self.box
        k = fourier.freq_grid_2d(n, device=self.device)
        r = fourier.radius_grid_2d(n, device=self.device)
        keep = (k[..., 0] >= 0) & (r <= (max_radius_px or n / 2))
        self._pixels = torch.nonzero(keep.reshape(-1)).squeeze(1)
        keep_half = torch.zeros((n, n // 2 + 1), dtype=torch.bool, device=self.device)   # rfft layout, y centred
        keep_half[:, :n - n // 2] = keep[:, n // 2:]
        rfft_order = torch.fft.fftshift(torch.arange(keep_half.numel(), device=self.device).reshape(keep_half.shape),
                                        dim=0).reshape(-1)
        self._rfft_pixels = rfft_order[torch.nonzero(keep_half.reshape(-1)).squeeze(1)]
        k = k.reshape(-1, 2)[self._pixels]
        self._freqs = torch.cat([k, torch.zeros_like(k[:, :1])], dim=1)
        self._freqs_grid = (k * m).T.contiguous()                # (2, P) in padded-grid px, rotated by _splat
        # the image's centre N//2 moved to the origin of the rfft2 (an ifftshift): a phase ramp, folded into
        # the origin's (:meth:`_slice_phases`)
        self._centre_px = float(n // 2)
        self._centre_ramp = fourier.phase_ramps(k, [[-self._centre_px, -self._centre_px]])[0]
        self._grid_centre = torch.tensor([[0.0], [m // 2], [m // 2]], device=self.device)
        # brick layout: voxel (z, y, x) at offset_z[z] + offset_y[y] + offset_x[x]; per axis two tables,
        # the offsets of index i and of i + 1 (the two trilinear corners along that axis)
        b3, (_, by, bx) = _BRICK ** 3, self._bricks
        self._corner_tables = []
        for n_vox, brick_step, voxel_step in ((self._shape[2], b3, 1), (self._shape[1], bx * b3, _BRICK),
                                              (self._shape[0], by * bx * b3, _BRICK ** 2)):
            i = torch.arange(n_vox, device=self.device)
            offset = (i // _BRICK) * brick_step + (i % _BRICK) * voxel_step
            self._corner_tables.append((offset[:-1].contiguous(), offset[1:].contiguous()))
        self._bricked = True
        self.count = 0
        self._folded = False

    @property
    def slice_freqs(self) -> torch.Tensor:
        """(P, 2) frequencies (fx, fy) in cycles/px of the inserted half-slice pixels (kx >= 0)."""
        return self._freqs[:, :2]

    def slice_ctf(self, pixel_size_A: float, **ctf_params) -> torch.Tensor:
        """(B, P) CTF at the inserted pixels; ``ctf_params`` as :func:`deepcryo.core.ctf.ctf_from_freqs`."""
        return ctf_from_freqs(self.slice_freqs / pixel_size_A, **ctf_params)

    def insert(self, spectra: torch.Tensor, ctf2: torch.Tensor, rotations: torch.Tensor) -> None:
        """Insert centred, CTF-multiplied spectra (B, N, N) complex with their CTF² (B, N, N) at (B, 3, 3) poses.

        Only the half slice kx >= 0 is inserted: its Friedel mates carry the same information.
        """
        b = spectra.shape[0]
        self.insert_slices(spectra.reshape(b, -1).index_select(1, self._pixels),
                           ctf2.reshape(b, -1).index_select(1, self._pixels), rotations)

    def slice_spectra(self, images: torch.Tensor) -> torch.Tensor:
        """(B, P) centred spectra of real images (B, N, N) at the inserted pixels, by a real-input FFT."""
        return self._rfft_slice(images) * self._centre_ramp

    def _rfft_slice(self, images: torch.Tensor) -> torch.Tensor:
        """(B, P) uncentred rfft2 of images (B, N, N) (origin at pixel 0, not N//2) at the inserted pixels."""
        half = torch.fft.rfft2(images.to(self.device, torch.float32))
        return half.reshape(images.shape[0], -1).index_select(1, self._rfft_pixels)

    def slice_phase_shift(self, origins_px: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
        """(B, P) phase ramps at the inserted pixels that undo RELION origins (B, 2) px (x, y): moving the
        content by +origin brings the particle centre back to N//2."""
        return fourier.phase_ramps(self.slice_freqs, origins_px)

    def _slice_phases(self, origins_px: Optional[torch.Tensor], b: int) -> torch.Tensor:
        """(B, P) phases (rad) that centre an uncentred rfft2 and undo ``origins_px`` (B, 2): the angle of
        ``_centre_ramp · slice_phase_shift(origins_px)``."""
        shift = torch.full((b, 2), -self._centre_px, device=self.device)
        if origins_px is not None:
            shift += torch.as_tensor(origins_px, dtype=torch.float32, device=self.device)
        return (-2.0 * math.pi) * (shift @ self.slice_freqs.T)

    def insert_images(self, images: torch.Tensor, rotations: torch.Tensor,
                      origins_px: Optional[Union[np.ndarray, torch.Tensor]] = None,
                      ctf: Optional[torch.Tensor] = None) -> None:
        """Insert real images (B, N, N): origins (B, 2) px are undone, ``ctf`` multiplies: (B, N, N) on the
        centred grid, or (B, P) at the inserted pixels (:meth:`slice_ctf`).

        Done :attr:`chunk` particles at a time from the FFT to the scatter, so that every (chunk, P) array
        stays in the CPU cache; the centring, the origin's phase ramp and the CTF are one complex factor
        ``polar(CTF, phase)`` per pixel."""
        b = images.shape[0]
        rotations = rotations.to(self.device, torch.float32)
        if ctf is not None:
            if ctf.dim() == 3:
                ctf = ctf.reshape(b, -1).index_select(1, self._pixels.to(ctf.device))
            ctf = ctf.to(self.device, torch.float32)
        if origins_px is not None:
            origins_px = torch.as_tensor(origins_px, dtype=torch.float32, device=self.device)
        step = self.chunk
        for start in range(0, b, step):
            stop = min(start + step, b)
            phases = self._slice_phases(None if origins_px is None else origins_px[start:stop], stop - start)
            c = torch.ones_like(phases) if ctf is None else ctf[start:stop]
            values = self._rfft_slice(images[start:stop]).mul_(torch.polar(c, phases))
            self._insert_chunk(values, c * c, rotations[start:stop])
        self.count += b

    @property
    def chunk(self) -> int:
        """Particles inserted at a time: ``1024 // N``, about 10⁵ trilinear points (the fastest measured at
        box 64, 128 and 256, ``benchmarks/RESULTS.md``)."""
        return max(1, 1024 // self.box)

    def insert_slices(self, values: torch.Tensor, weights: torch.Tensor, rotations: torch.Tensor,
                      chunk: Optional[int] = None) -> None:
        """Insert (B, P) complex ``values`` and real ``weights`` at the half-slice pixels (:attr:`slice_freqs`)
        of (B, 3, 3) poses, and at each symmetry copy, ``chunk`` particles at a time (default :attr:`chunk`)."""
        chunk = chunk or self.chunk
        rotations = rotations.to(self.device, torch.float32)
        values, weights = values.to(self.device), weights.to(self.device, torch.float32)
        for start in range(0, values.shape[0], chunk):
            stop = start + chunk
            self._insert_chunk(values[start:stop], weights[start:stop], rotations[start:stop])
        self.count += values.shape[0]

    def _insert_chunk(self, values: torch.Tensor, weights: torch.Tensor, rotations: torch.Tensor) -> None:
        """One chunk at its poses and at each symmetry copy."""
        if self._folded:
            raise RuntimeError("particles inserted into a reconstructor after reconstruct()")
        for sym in self.symmetry:
            self._splat(values, weights, rotations @ sym.T)

    def _splat(self, values: torch.Tensor, weights: torch.Tensor, rotations: torch.Tensor) -> None:
        """Trilinear scatter-add of one chunk at poses ``rotations`` (no symmetry).

        Arrays are (b, ..., P) with the pixels last, so that every elementwise step runs along contiguous
        memory; the 8 corners of all points go to the grids corner by corner."""
        b = values.shape[0]
        # k·A for k = (fx, fy, 0): (b, 3, P) = (x, y, z) in padded-grid px; kx < 0 is stored as (−k, conjugate)
        fx, fy = self._freqs_grid
        pts = torch.addcmul(rotations[:, 0, :, None] * fx, rotations[:, 1, :, None], fy)
        sign = pts[:, :1].sign().add_(0.5).sign_()                              # (b, 1, P): −1 where kx < 0
        pts.mul_(sign).add_(self._grid_centre)
        base = pts.floor()
        frac = pts.sub_(base)
        lower = base.to(torch.int32)
        cx, cy, cz = (torch.stack([t.index_select(0, lower[:, a].reshape(-1)).view(b, -1) for t in tables], 1)
                      for a, tables in enumerate(self._corner_tables))          # (b, 2, P) per axis
        idx = ((cz[:, :, None] + cy[:, None, :])[:, :, :, None] + cx[:, None, None]).reshape(-1)
        # corner weights (b, 2, 2, 2, P) in (z, y, x) order, as idx
        g = torch.stack([1.0 - frac, frac], 1)                                 # (b, 2, 3 axes, P)
        w = (g[:, :, None, 2] * g[:, None, :, 1])[:, :, :, None] * g[:, None, None, :, 0]
        w = w.reshape(b, 8, -1)
        data = (w * torch.complex(values.real, values.imag * sign[:, 0])[:, None]).reshape(-1)
        if self.device.type == "cpu":
            self.data.scatter_add_(0, idx, data)
        else:                                          # CUDA: float atomics on the real and imaginary parts
            torch.view_as_real(self.data).index_add_(0, idx, torch.view_as_real(data))
        self.weight.scatter_add_(0, idx, w.mul_(weights[:, None]).reshape(-1))

    def add(self, other: "Reconstructor") -> None:
        """Accumulate another reconstructor's grid (same geometry); folds both first when either has been
        reconstructed (:meth:`_fold` is linear, so folded grids add)."""
        if self._folded or other._folded:
            self._fold()
            other._fold()
        self.data += other.data
        self.weight += other.weight
        self.count += other.count

    def _fold(self) -> None:
        """Once, in place: the spare planes folded back (index M of y and z is frequency −M/2 of the periodic
        grid) and the plane kx = 0 made Hermitian. Done in place because at box 256 a copy of the grids is
        another 0.8 GB; no particle may be inserted afterwards."""
        if self._folded:
            return
        self._unbrick()
        m = self.padded_box
        for grid in (self.data.reshape(self._shape), self.weight.reshape(self._shape)):
            grid[0] += grid[m]
            grid[m] = 0
            grid[:, 0] += grid[:, m]
            grid[:, m] = 0
            plane = grid[:m, :m, 0]
            mate = torch.roll(torch.flip(plane, dims=(0, 1)), shifts=(1, 1), dims=(0, 1))   # index i -> M - i
            grid[:m, :m, 0] = plane + (mate.conj() if grid.is_complex() else mate)
        self._folded = True

    def _unbrick(self) -> None:
        """The grids rewritten from bricks to plain (z, y, x) arrays of the same shape, one at a time (a
        copy: a grid's memory is held twice for a moment)."""
        if not self._bricked:
            return
        bz, by, bx = self._bricks
        for name in ("data", "weight"):
            bricks = getattr(self, name).reshape(bz, by, bx, _BRICK, _BRICK, _BRICK)
            setattr(self, name, bricks.permute(0, 3, 1, 4, 2, 5).reshape(-1))
            del bricks
        self._bricked = False

    def reconstruct(self, ssnr: Optional[Union[np.ndarray, torch.Tensor]] = None) -> np.ndarray:
        """Return the map (N, N, N) float32 numpy. May be called again (another ``ssnr``, after :meth:`add`),
        but no particle can be inserted after it.

        Args:
            ssnr: optional (N//2 + 1,) spectral SNR per shell of the N grid of the map being reconstructed
                (a half map: :func:`deepcryo.core.fsc.fsc_to_half_ssnr`; the full map:
                :func:`deepcryo.core.fsc.fsc_to_ssnr`); adds the Wiener term ``W̄ / SSNR`` to the
                weights, ``W̄`` the shell's mean weight (RELION's τ² regularisation). Without it the
                weight is floored at 1e-3 of its shell's mean.
        """
        m, n = self.padded_box, self.box
        self._fold()
        data = self.data.reshape(self._shape)[:m, :m, :m // 2 + 1]                # y, z centred at M/2
        weight = self.weight.reshape(self._shape)[:m, :m, :m // 2 + 1]
        n_shells, r_max = n // 2 + 1, self.max_radius_px or n / 2
        f = torch.arange(m, device=self.device, dtype=torch.float32) - m // 2
        fx = torch.arange(m // 2 + 1, device=self.device, dtype=torch.float32)
        plane_r2 = f[:, None] ** 2 + fx[None, :] ** 2                            # (y, x) of one z plane
        # shell means over the whole sphere: every voxel kx > 0 stands for itself and its Friedel mate
        multiplicity = torch.where(fx == 0, 1.0, 2.0).expand_as(plane_r2)

        def plane_shells(z):
            radius = torch.sqrt(plane_r2 + f[z] ** 2) / (m / n)                 # in N-grid Fourier pixels
            inside = radius <= r_max
            return inside, torch.round(radius).long().clamp_(max=n_shells - 1)

        counts = torch.zeros(n_shells, device=self.device)
        shell_w = torch.zeros(n_shells, device=self.device)
        for z in range(m):                         # plane by plane: no whole-grid temporaries
            inside, shells = plane_shells(z)
            counts.index_add_(0, shells[inside], multiplicity[inside])
            shell_w.index_add_(0, shells[inside], (weight[z] * multiplicity)[inside])
        shell_w = (shell_w / counts.clamp(min=1)).clamp(min=1e-30)
        if ssnr is not None:
            ssnr = torch.as_tensor(ssnr, dtype=torch.float32, device=self.device)[:n_shells].clamp(min=1e-6)
            wiener = shell_w / ssnr
        # the divided transform, written plane by plane straight into FFT order (ifftshift of y and z)
        ft = torch.empty((m, m, m // 2 + 1), dtype=torch.complex64, device=self.device)
        for z in range(m):
            inside, shells = plane_shells(z)
            if ssnr is not None:
                denom = weight[z] + wiener[shells]
            else:
                denom = torch.maximum(weight[z], 1e-3 * shell_w[shells])
            plane = torch.where(inside, data[z] / denom, torch.zeros_like(data[z]))
            ft[(z + m // 2) % m] = torch.roll(plane, shifts=m // 2, dims=0)
        vol = torch.fft.irfftn(ft, s=(m, m, m), dim=(0, 1, 2))                    # origin at index 0
        del ft
        keep = (torch.arange(n, device=self.device) - n // 2) % m                # the centred N³, unshifted
        vol = vol[keep][:, keep][:, :, keep]
        g = gridding_kernel_1d(n, m, device=self.device)
        vol = vol / (g[:, None, None] * g[None, :, None] * g[None, None, :])
        return mask_corners(vol).cpu().numpy().astype(np.float32)


def mask_corners(volume: torch.Tensor, width_px: float = 3.0) -> torch.Tensor:
    """``volume`` (N, N, N) with everything beyond radius N/2 replaced by its mean there, through a raised-
    cosine edge of ``width_px`` (RELION's ``softMaskOutsideMap``, applied to every reconstruction). The
    corners hold no particle, only noise that the gridding correction amplifies most (measured:
    ``benchmarks/RESULTS.md``)."""
    n = volume.shape[-1]
    r = fourier.radius_grid_3d(n, device=volume.device)
    outside = 1 - fourier.soft_edge(r, n / 2, width_px)                        # 0 inside N/2, 1 beyond N/2 + width
    if not bool((outside > 0).any()):
        return volume
    background = (outside * volume).sum() / outside.sum()
    return (1 - outside) * volume + outside * background


def half_split(star: ParticleStar, seed: int = 0) -> np.ndarray:
    """Half-set labels 1/2 per particle: ``rlnRandomSubset`` when present, else a seeded random split."""
    if "rlnRandomSubset" in star.particles:
        sub = np.asarray(star.particles["rlnRandomSubset"], dtype=np.int64)
        if set(np.unique(sub)) <= {1, 2}:
            return sub
    rng = np.random.default_rng(seed)
    labels = np.ones(len(star), dtype=np.int64)
    labels[rng.permutation(len(star))[: len(star) // 2]] = 2
    return labels


def batch_inputs(star: ParticleStar, indices: np.ndarray, stack: ImageStack, device: Union[str, torch.device],
                 with_ctf: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Images, pose matrices, origins (px) and (``with_ctf``, when the STAR has CTF columns) CTFs (B, N, N) of
    particles ``indices`` of ``star``."""
    px = star.pixel_size_A
    images = torch.from_numpy(stack.read(indices)).to(device)
    rot = euler_to_matrix(torch.as_tensor(star.angles_deg()[indices])).to(torch.float32).to(device)
    origins = torch.as_tensor(star.origins_A()[indices] / px, dtype=torch.float32, device=device)
    ctf = None
    if with_ctf and star.has_ctf():
        p = {k: v[indices] for k, v in star.ctf_params().items()}
        ctf = ctf_2d(stack.box, px, device=device, **p)
    return images, rot, origins, ctf


def insert_particles(star: ParticleStar, stack: ImageStack, labels: np.ndarray, recs: Dict[int, Reconstructor],
                     batch_size: int, progress: Optional[Callable[[int, int, float], None]] = None) -> None:
    """Insert each particle ``i`` of ``star`` (images read from the open ``stack``) into ``recs[labels[i]]``,
    ``batch_size`` particles at a time; particles whose label has no reconstructor are skipped. The CTF is
    computed at the inserted pixels only. ``progress`` (optional) is called as ``progress(done, total,
    elapsed_s)`` after each batch."""
    px = star.pixel_size_A
    angles, origins_px = star.angles_deg(), star.origins_A() / px
    ctf_params = star.ctf_params() if star.has_ctf() else None
    done, t0 = 0, time.time()
    for start in range(0, len(star), batch_size):
        idx = np.arange(start, min(start + batch_size, len(star)))
        images = torch.from_numpy(stack.read(idx))
        for label, rec in recs.items():
            sel = np.nonzero(labels[idx] == label)[0]
            if len(sel) == 0:
                continue
            rows = idx[sel]
            rot = euler_to_matrix(torch.as_tensor(angles[rows])).to(torch.float32)
            ctf = None if ctf_params is None else rec.slice_ctf(px, **{k: v[rows] for k, v in ctf_params.items()})
            rec.insert_images(images if len(sel) == len(idx) else images[sel], rot, origins_px[rows], ctf)
        done += len(idx)
        if progress:
            progress(done, len(star), time.time() - t0)


def reconstruct_star(star: ParticleStar, halves: bool = False, symmetry: str = "C1",
                     max_resolution_A: Optional[float] = None, batch_size: int = 256,
                     device: Union[str, torch.device] = "cpu", seed: int = 0,
                     progress: Optional[Callable[[int, int, float], None]] = None) -> Dict[str, np.ndarray]:
    """Reconstruct the map(s) of a :class:`~deepcryo.core.particles.ParticleStar` (needs poses; CTF if present).

    Returns ``{"map": vol}`` or, with ``halves``, ``{"map", "half1", "half2", "fsc"}``.
    """
    star.require("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    px = star.pixel_size_A
    device = torch.device(device)
    with star.open_images() as stack:
        box = stack.box
        max_r = None if not max_resolution_A else min(box / 2, box * px / max_resolution_A)
        labels = half_split(star, seed) if halves else np.ones(len(star), dtype=np.int64)
        recs = {h: Reconstructor(box, symmetry=symmetry, max_radius_px=max_r, device=device)
                for h in np.unique(labels)}
        insert_particles(star, stack, labels, recs, batch_size, progress)
    if not halves:
        return {"map": recs[1].reconstruct()}
    half1, half2 = recs[1].reconstruct(), recs[2].reconstruct()
    recs[1].add(recs[2])                        # the halves are done: the first grid becomes the full set's
    return {"map": recs[1].reconstruct(), "half1": half1, "half2": half2, "fsc": fsc(half1, half2)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m deepcryo.core.reconstruct``: the command :mod:`deepcryo.core.commands.reconstruct`."""
    from .cli import run_program
    from .commands import reconstruct as command
    return run_program("python -m deepcryo.core.reconstruct", None, command, argv)


if __name__ == "__main__":
    sys.exit(main())
