"""Lazy particle batches for the landscape VAE: Fourier-cropped spectra, poses and CTFs at the working box.

Images are read batch by batch from the STAR's memory-mapped MRC stacks (:class:`deepcryo.core.mrc.ImageStack`),
so a set of millions of particles never has to fit in memory. Each batch is

- Fourier-cropped from the stack box N to the working box D (pixel size ``pixel_size_A * N / D``),
- centred: the RELION origin is undone by a phase ramp (``phase_shift_2d(D, +origin_px)``),
- scaled by ``1 / scale`` (one global factor, the image standard deviation over a sample of particles),

and returned as centred spectra (B, D, D) complex with the (B, 3, 3) pose matrices A (volume → projection
frame, RELION ZYZ) and the (B, D, D) CTFs (RELION sign) on the centred grid of :mod:`deepcryo.core.fourier`.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch

from ..core import fourier
from ..core.ctf import ctf_2d
from ..core.errors import InputError
from ..core.geometry import euler_to_matrix
from ..core.particles import read_particles

__all__ = ["ParticleBatches", "load_particles"]


def load_particles(path: str, poses: bool = True):
    """Read a particle STAR and check it has what the VAE needs (images, CTF, poses unless ``poses`` is
    False); InputError otherwise."""
    star = read_particles(path)
    star.require(*(["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"] if poses else [])
                 + ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"])
    return star


class ParticleBatches:
    """Batches of one particle set at the working box.

    Args:
        star: :class:`deepcryo.core.particles.ParticleStar` with poses and CTF.
        box: working box D (px), even, at most the stack box; the stack box when None.
        scale: image intensity divisor; estimated from up to 1000 particles when None.
        poses: use the STAR's poses and origins; False (pose-free mode): rotations are identities and the
            spectra are not centred (the STAR's angles and origins, if any, are never read).
    """

    def __init__(self, star, box: Optional[int] = None, scale: Optional[float] = None, poses: bool = True) -> None:
        self.star = star
        self.stack = star.open_images()
        self.stack_box = self.stack.box
        self.box = int(box or self.stack_box)
        if self.box > self.stack_box or self.box < 8 or self.box % 2:
            raise InputError("--box must be even, >= 8 and <= the particle box %d px (got %d)"
                             % (self.stack_box, self.box))
        self.pixel_size_A = star.pixel_size_A * self.stack_box / self.box
        if poses:
            self._rotations = euler_to_matrix(torch.as_tensor(star.angles_deg())).to(torch.float32)
            self._origins_px = torch.as_tensor(star.origins_A() / self.pixel_size_A, dtype=torch.float32)
        else:
            self._rotations = torch.eye(3).expand(len(star), 3, 3)
            self._origins_px = None
        self._ctf = {k: np.asarray(v) for k, v in star.ctf_params().items()}
        self.scale = float(scale) if scale else self._estimate_scale()

    def __len__(self):
        return len(self.star)

    def _estimate_scale(self):
        idx = np.linspace(0, len(self) - 1, min(len(self), 1000)).astype(np.int64)
        images = fourier.resize_images(torch.from_numpy(self.stack.read(idx)), self.box)
        std = float(images.std())
        if not np.isfinite(std) or std <= 0:
            raise InputError("particle images are constant (zero variance); nothing to learn")
        return std

    def get(self, indices: Union[torch.Tensor, np.ndarray],
            device: Union[str, torch.device] = "cpu") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Spectra (B, D, D) complex, rotations (B, 3, 3) and CTFs (B, D, D) of particles ``indices``."""
        indices = np.asarray(indices, dtype=np.int64)
        images = torch.from_numpy(self.stack.read(indices)).to(device) / self.scale
        spectra = fourier.fft2c(images)
        if self.box != self.stack_box:
            spectra = fourier.fourier_crop_2d(spectra, self.box) * (self.box / self.stack_box) ** 2
        if self._origins_px is not None:
            spectra = spectra * fourier.phase_shift_2d(self.box, self._origins_px[indices].to(device), device=device)
        ctf = ctf_2d(self.box, self.pixel_size_A, device=device,
                     **{k: v[indices] for k, v in self._ctf.items()})
        return spectra, self._rotations[indices].to(device), ctf

    def images(self, indices: Union[torch.Tensor, np.ndarray], device: Union[str, torch.device] = "cpu"
               ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], dict]:
        """Real images (B, D, D) at the working box (Fourier-cropped, scaled as :meth:`get`), rotations
        (B, 3, 3), RELION origins (B, 2) in working-box px (None in the pose-free mode) and the CTF parameters
        of particles ``indices``, for :meth:`deepcryo.core.reconstruct.Reconstructor.insert_images`: the
        centred (D, D) spectra and CTFs of :meth:`get` would cost a reconstruction several times its own work."""
        indices = np.asarray(indices, dtype=np.int64)
        images = torch.from_numpy(self.stack.read(indices)).to(device) / self.scale
        images = fourier.resize_images(images, self.box)
        origins = None if self._origins_px is None else self._origins_px[indices].to(device)
        return (images, self._rotations[indices].to(device), origins,
                {k: v[indices] for k, v in self._ctf.items()})

    def batches(self, batch_size: int, order: Optional[np.ndarray] = None, device: Union[str, torch.device] = "cpu"
                ) -> Iterator[Tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(indices, spectra, rotations, ctf)`` over ``order`` (default: all particles in order)."""
        order = np.arange(len(self)) if order is None else np.asarray(order)
        for start in range(0, len(order), batch_size):
            idx = np.sort(order[start:start + batch_size])
            yield (idx,) + self.get(idx, device)

    def close(self) -> None:
        self.stack.close()
