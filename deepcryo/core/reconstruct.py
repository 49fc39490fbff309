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

Memory is bounded: particles stream in batches from memory-mapped stacks; only the two padded grids
(data and weight) are held, ``(pad·N)³`` complex + real.

Program (options and examples in :mod:`deepcryo.core.commands.reconstruct`)::

    python -m deepcryo.core.reconstruct --particles P.star --output map.mrc --halves --symmetry C1
"""
import sys
import time
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import fourier
from .ctf import ctf_2d
from .fsc import fsc, shell_frequencies
from .geometry import euler_to_matrix, symmetry_matrices
from .mrc import ImageStack
from .particles import ParticleStar
from .projector import gridding_kernel_1d
from .star import write_star

__all__ = ["Reconstructor", "insert_particles", "reconstruct_star", "mask_corners", "half_split", "main"]


class Reconstructor:
    """Accumulates particle spectra and CTF² weights in a padded Fourier grid.

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
        # The grid has one extra plane per axis: trilinear corners of frequencies up to Nyquist reach index
        # M, so no bounds checks are needed. Columns: real, imag, weight.
        self._stride = self.padded_box + 2
        self.grid = torch.zeros((self._stride ** 3, 3), dtype=torch.float32, device=self.device)
        # the inserted half slice (kx >= 0, radius <= max): frequencies (P0, 3) and flat image indices
        k = fourier.freq_grid_2d(self.box, device=self.device)
        r = fourier.radius_grid_2d(self.box, device=self.device)
        keep = ((k[..., 0] >= 0) & (r <= (max_radius_px or self.box / 2))).reshape(-1)
        self._pixels = torch.nonzero(keep).squeeze(1)
        k = k.reshape(-1, 2)[self._pixels]
        self._freqs = torch.cat([k, torch.zeros_like(k[:, :1])], dim=1)
        s = self._stride
        self._corner_offsets = torch.tensor([dz * s * s + dy * s + dx for dz in (0, 1) for dy in (0, 1)
                                             for dx in (0, 1)], device=self.device)
        self.count = 0

    def insert(self, spectra: torch.Tensor, ctf2: torch.Tensor, rotations: torch.Tensor) -> None:
        """Insert centred, CTF-multiplied spectra (B, N, N) complex with their CTF² (B, N, N) at (B, 3, 3) poses.

        Only the half slice kx >= 0 is inserted: its Friedel mates are restored once, in
        :meth:`reconstruct`, by Hermitian symmetry.
        """
        b, m, s = spectra.shape[0], self.padded_box, self._stride
        flat = spectra.reshape(b, -1).index_select(1, self._pixels)
        vals = torch.stack([flat.real, flat.imag, ctf2.reshape(b, -1).index_select(1, self._pixels)], -1)
        vals = vals.reshape(-1, 3)
        for sym in self.symmetry:
            pts = (torch.matmul(self._freqs, rotations @ sym.T) * m + m // 2).reshape(-1, 3)   # k·A, grid units
            base = torch.floor(pts)
            frac = pts - base
            base = base.long()
            wx = torch.stack([1 - frac[:, 0], frac[:, 0]], 1)
            wy = torch.stack([1 - frac[:, 1], frac[:, 1]], 1)
            wz = torch.stack([1 - frac[:, 2], frac[:, 2]], 1)
            w = (wz[:, :, None, None] * wy[:, None, :, None] * wx[:, None, None, :]).reshape(-1, 8)
            idx = ((base[:, 2] * s + base[:, 1]) * s + base[:, 0])[:, None] + self._corner_offsets
            self.grid.index_add_(0, idx.reshape(-1), (vals[:, None, :] * w[..., None]).reshape(-1, 3))
        self.count += b

    def insert_images(self, images: torch.Tensor, rotations: torch.Tensor,
                      origins_px: Optional[Union[np.ndarray, torch.Tensor]] = None,
                      ctf: Optional[torch.Tensor] = None) -> None:
        """Insert real images (B, N, N): origins (B, 2) px are undone, ``ctf`` (B, N, N) multiplies."""
        spec = fourier.fft2c(images.to(self.device, torch.float32))
        if origins_px is not None:
            spec = spec * fourier.phase_shift_2d(self.box, torch.as_tensor(origins_px, dtype=torch.float32,
                                                                           device=self.device), device=self.device)
        if ctf is None:
            ctf = torch.ones_like(spec.real)
        spec = spec * ctf
        self.insert(spec, ctf * ctf, rotations.to(self.device, torch.float32))

    def add(self, other: "Reconstructor") -> None:
        """Accumulate another reconstructor's grid (same geometry)."""
        self.grid += other.grid
        self.count += other.count

    def reconstruct(self, ssnr: Optional[Union[np.ndarray, torch.Tensor]] = None) -> np.ndarray:
        """Return the map (N, N, N) float32 numpy.

        Args:
            ssnr: optional (N//2 + 1,) spectral SNR per shell of the N grid of the map being reconstructed
                (a half map: :func:`deepcryo.core.fsc.fsc_to_half_ssnr`; the full map:
                :func:`deepcryo.core.fsc.fsc_to_ssnr`); adds the Wiener term ``W̄ / SSNR`` to the
                weights, ``W̄`` the shell's mean weight (RELION's τ² regularisation). Without it the
                weight is floored at 1e-3 of its shell's mean.
        """
        m, n, s = self.padded_box, self.box, self._stride
        grid = self.grid.reshape(s, s, s, 3)[:m + 1, :m + 1, :m + 1]
        grid = grid + torch.flip(grid, dims=(0, 1, 2)) * torch.tensor([1.0, -1.0, 1.0], device=self.device)
        grid = grid[:m, :m, :m]                  # Friedel mates restored (i <-> M - i); drop the extra plane
        data = torch.complex(grid[..., 0], grid[..., 1])
        weight = grid[..., 2]
        radius = fourier.radius_grid_3d(m, device=self.device) / (m / n)       # in N-grid Fourier pixels
        inside = radius <= (self.max_radius_px or n / 2)
        n_shells = n // 2 + 1
        shells = torch.round(radius).long().clamp(max=n_shells - 1)
        counts = torch.zeros(n_shells, device=self.device).index_add_(0, shells[inside], torch.ones_like(weight[inside]))
        shell_w = torch.zeros(n_shells, device=self.device).index_add_(0, shells[inside], weight[inside])
        shell_w = (shell_w / counts.clamp(min=1)).clamp(min=1e-30)
        if ssnr is not None:
            ssnr = torch.as_tensor(ssnr, dtype=torch.float32, device=self.device)[:n_shells].clamp(min=1e-6)
            denom = weight + (shell_w / ssnr)[shells]
        else:
            denom = torch.maximum(weight, 1e-3 * shell_w[shells])
        ft = torch.where(inside, data / denom, torch.zeros_like(data))
        vol = fourier.ifft3c(ft).real
        vol = fourier.crop_to(vol, n, 3)
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


def batch_inputs(star: ParticleStar, indices: np.ndarray, stack: ImageStack,
                 device: Union[str, torch.device]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                            Optional[torch.Tensor]]:
    """Images, pose matrices, origins (px) and CTFs (B, N, N) of particles ``indices`` of ``star``."""
    px = star.pixel_size_A
    images = torch.from_numpy(stack.read(indices)).to(device)
    rot = euler_to_matrix(torch.as_tensor(star.angles_deg()[indices])).to(torch.float32).to(device)
    origins = torch.as_tensor(star.origins_A()[indices] / px, dtype=torch.float32, device=device)
    ctf = None
    if star.has_ctf():
        p = {k: v[indices] for k, v in star.ctf_params().items()}
        ctf = ctf_2d(stack.box, px, device=device, **p)
    return images, rot, origins, ctf


def insert_particles(star: ParticleStar, stack: ImageStack, labels: np.ndarray, recs: Dict[int, Reconstructor],
                     batch_size: int, device: torch.device,
                     progress: Optional[Callable[[int, int, float], None]] = None) -> None:
    """Insert each particle ``i`` of ``star`` (images read from the open ``stack``) into ``recs[labels[i]]``,
    ``batch_size`` particles at a time; particles whose label has no reconstructor are skipped. ``progress``
    (optional) is called as ``progress(done, total, elapsed_s)`` after each batch."""
    done, t0 = 0, time.time()
    for start in range(0, len(star), batch_size):
        idx = np.arange(start, min(start + batch_size, len(star)))
        images, rot, origins, ctf = batch_inputs(star, idx, stack, device)
        for label, rec in recs.items():
            sel = torch.as_tensor(labels[idx] == label, device=device)
            if sel.any():
                rec.insert_images(images[sel], rot[sel], origins[sel], None if ctf is None else ctf[sel])
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
        insert_particles(star, stack, labels, recs, batch_size, device, progress)
    if not halves:
        return {"map": recs[1].reconstruct()}
    half1, half2 = recs[1].reconstruct(), recs[2].reconstruct()
    total = Reconstructor(box, symmetry=symmetry, max_radius_px=max_r, device=device)
    total.add(recs[1])
    total.add(recs[2])
    return {"map": total.reconstruct(), "half1": half1, "half2": half2, "fsc": fsc(half1, half2)}


def write_fsc_star(path: str, curve: np.ndarray, box: int, pixel_size_A: float) -> None:
    """Write an FSC curve as STAR (``rlnSpectralIndex``, ``rlnResolution`` 1/Å, ``rlnAngstromResolution``,
    ``rlnFourierShellCorrelation``)."""
    freqs = shell_frequencies(box, pixel_size_A)
    with np.errstate(divide="ignore"):
        ang = np.where(freqs > 0, 1.0 / np.maximum(freqs, 1e-30), 999.0)
    write_star(path, {"fsc": {"rlnSpectralIndex": np.arange(len(curve)), "rlnResolution": freqs,
                                 "rlnAngstromResolution": ang, "rlnFourierShellCorrelation": np.asarray(curve)}})


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m deepcryo.core.reconstruct``: the command :mod:`deepcryo.core.commands.reconstruct`."""
    from .cli import run_program
    from .commands import reconstruct as command
    return run_program("python -m deepcryo.core.reconstruct", None, command, argv)


if __name__ == "__main__":
    sys.exit(main())
