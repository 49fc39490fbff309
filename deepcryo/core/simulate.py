"""Deterministic simulation of test data with known ground truth (seeded).

* Phantom volumes: asymmetric assemblies of Gaussian blobs and ellipsoids (:func:`phantom_volume`).
* Conformations: discrete states (a domain displaced and turned, :func:`phantom_states`) and a continuous
  hinge motion whose parameter ``t ∈ [0, 1]`` is recorded (:func:`hinge_volume`).
* Particles (:func:`simulate_particles`, :func:`write_particle_set`): uniformly random poses, origins,
  per-particle defocus, RELION-convention CTF, and white or coloured Gaussian noise at a given SNR
  (SNR = variance of the noise-free CTF-modulated images over the box / noise variance), written as
  RELION 3.1 STAR + MRCS with the truth (state, hinge parameter) as extra columns ``rlnClassNumber`` and
  ``dcHingeParameter``.
* Micrographs with known defocus: :mod:`deepcryo.core.micrographs`.

Program::

    python -m deepcryo.core.simulate particles --output-dir sim/ --n 3000 --box 64 --pixel-size 2.0 --snr 0.1
    python -m deepcryo.core.simulate particles --output-dir sim2/ --states 2 --n 4000 --box 48
    python -m deepcryo.core.simulate particles --output-dir hinge/ --hinge --n 4000 --box 48
    python -m deepcryo.core.simulate micrographs --output-dir mics/ --n 20 --size 4096

``particles`` writes ``particles.star``, ``particles.mrcs`` and the ground-truth map(s) ``truth.mrc``
(``truth_state01.mrc`` … for states); ``python -m deepcryo.core.simulate COMMAND --help`` shows the options.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import mrcfile
import numpy as np
import torch

from . import fourier
from .ctf import ctf_2d
from .files import atomic_output
from .geometry import matrix_to_euler, quaternion_to_matrix
from .particles import ParticleStar, make_optics, write_particles
from .projector import Projector

__all__ = ["phantom_volume", "phantom_states", "hinge_volume", "random_poses", "simulate_particles",
           "write_particle_set", "main"]


# ------------------------------------------------------------------------------------------------ volumes
def _blob_parameters(box, n_blobs, rng):
    """Centres (px from the box centre), radii (px) and amplitudes of an asymmetric blob assembly."""
    extent = 0.28 * box
    centres = []
    while len(centres) < n_blobs:
        c = rng.uniform(-extent, extent, size=3)
        if np.linalg.norm(c) <= extent:
            centres.append(c)
    centres = np.array(centres)
    radii = rng.uniform(0.04, 0.09, size=(n_blobs, 3)) * box        # anisotropic: ellipsoids
    amps = rng.uniform(0.5, 1.0, size=n_blobs)
    axes = quaternion_to_matrix(torch.as_tensor(rng.normal(size=(n_blobs, 4)))).numpy()
    return centres, radii, amps, axes


def _render_blobs(box, centres, radii, amps, axes, atoms_per_blob=400, atom_sigma_px=0.8, seed=12345):
    """Pseudo-atomic density: each ellipsoid holds ``atoms_per_blob`` Gaussian-distributed point atoms
    (weight ∝ amplitude) in its own frame, so a rigid motion of the ellipsoid moves its atoms rigidly.
    Atoms are splatted trilinearly and blurred by a Gaussian of ``atom_sigma_px``, which gives the map
    power up to Nyquist (FSC against it is meaningful at every frequency)."""
    rng = np.random.default_rng(seed)
    grid = torch.zeros(box ** 3, dtype=torch.float64)
    for centre, r, a, rot in zip(centres, radii, amps, axes):
        u = rng.normal(size=(atoms_per_blob, 3))
        u = u[np.linalg.norm(u, axis=1) < 2.0]
        pts = centre + (u * r) @ rot.T + box // 2                       # (x, y, z) voxel positions
        base = np.floor(pts).astype(np.int64)
        frac = pts - base
        for corner in range(8):
            d = np.array([(corner >> 0) & 1, (corner >> 1) & 1, (corner >> 2) & 1])
            w = np.prod(np.where(d, frac, 1 - frac), axis=1) * a
            x, y, z = (base + d).T
            ok = (x >= 0) & (x < box) & (y >= 0) & (y < box) & (z >= 0) & (z < box)
            grid.index_add_(0, torch.as_tensor(((z * box + y) * box + x)[ok]), torch.as_tensor(w[ok]))
    vol = grid.reshape(box, box, box)
    f2 = (fourier.radius_grid_3d(box, dtype=torch.float64) / box) ** 2
    blur = torch.exp(-2.0 * math.pi ** 2 * atom_sigma_px ** 2 * f2)
    return fourier.ifft3c(fourier.fft3c(vol) * blur).real.numpy().astype(np.float32)


def phantom_volume(box: int, seed: int = 0, n_blobs: int = 14) -> np.ndarray:
    """An asymmetric phantom (box, box, box) of ``n_blobs`` Gaussian ellipsoids, max 1, indexed [z, y, x]."""
    params = _blob_parameters(box, n_blobs, np.random.default_rng(seed))
    vol = _render_blobs(box, *params)
    return vol / vol.max()


def _domain_motion(box, seed, n_blobs, angle_deg, translation_px):
    """Blob parameters with the blobs of x > median (the 'domain') turned about a hinge axis through the
    boundary by ``angle_deg`` (about y) and moved by ``translation_px`` along x."""
    centres, radii, amps, axes = _blob_parameters(box, n_blobs, np.random.default_rng(seed))
    dom = centres[:, 0] > np.median(centres[:, 0])
    pivot = np.array([np.median(centres[:, 0]), 0.0, 0.0])
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    moved = centres.copy()
    moved[dom] = (centres[dom] - pivot) @ rot.T + pivot + np.array([translation_px, 0, 0])
    new_axes = axes.copy()
    new_axes[dom] = rot @ axes[dom]
    return moved, radii, amps, new_axes


def phantom_states(box: int, n_states: int = 2, seed: int = 0, n_blobs: int = 14,
                   angle_deg: float = 35.0) -> List[np.ndarray]:
    """``n_states`` volumes of one phantom whose domain is turned by 0, angle/(n-1), …, angle degrees
    (about a hinge) — structurally distinct states of one particle, each max-normalised like the first."""
    vols = []
    for k in range(n_states):
        ang = angle_deg * k / max(n_states - 1, 1)
        vols.append(_render_blobs(box, *_domain_motion(box, seed, n_blobs, ang, 0.0)))
    top = vols[0].max()
    return [v / top for v in vols]


def hinge_volume(box: int, t: float, seed: int = 0, n_blobs: int = 14, max_angle_deg: float = 40.0) -> np.ndarray:
    """The phantom with its domain turned by ``t · max_angle_deg`` (t ∈ [0, 1]) about its hinge."""
    ref = _render_blobs(box, *_domain_motion(box, seed, n_blobs, 0.0, 0.0)).max()
    return _render_blobs(box, *_domain_motion(box, seed, n_blobs, t * max_angle_deg, 0.0)) / ref


# ---------------------------------------------------------------------------------------------- particles
def random_poses(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) Euler angles (deg) of rotations uniform on SO(3)."""
    q = rng.normal(size=(n, 4))
    return matrix_to_euler(quaternion_to_matrix(torch.as_tensor(q))).numpy()


def _noise(shape, sigma, coloured, rng, box):
    white = rng.normal(size=shape).astype(np.float32) * sigma
    if not coloured:
        return white
    # coloured: amplitude falls as 1/(1 + (f/f0)) (more power at low frequency, like ice + detector)
    r = fourier.radius_grid_2d(box) / box
    profile = 1.0 / (1.0 + r / 0.1)
    profile = profile / torch.sqrt((profile ** 2).mean())
    ft = fourier.fft2c(torch.from_numpy(white)) * profile
    return fourier.ifft2c(ft).real.numpy()


def simulate_particles(volumes: Sequence[np.ndarray], n: int, pixel_size_A: float, snr: float = 0.1, seed: int = 0,
                       defocus_range_A: Tuple[float, float] = (10000.0, 25000.0), astigmatism_A: float = 500.0,
                       max_shift_px: float = 3.0, voltage_kV: float = 300.0, cs_mm: float = 2.7,
                       amplitude_contrast: float = 0.1, bfactor_A2: float = 0.0, coloured_noise: bool = False,
                       state_of: Optional[np.ndarray] = None, batch_size: int = 512
                       ) -> Iterator[Dict[str, np.ndarray]]:
    """Yield batches of simulated particles from one or several volumes.

    Args:
        volumes: a volume (N, N, N), or a list of volumes (states) — particle i comes from
            ``volumes[state_of[i]]`` (default: random equal split) — or a callable ``t -> volume``
            (continuous motion, ``t`` uniform in [0, 1] per particle, discretised to 20 levels).
        snr: signal-to-noise ratio (variance ratio over the box); ``None`` for noiseless images.
    Yields:
        dict with ``images`` (B, N, N) float32 and truth arrays for the batch: ``angles_deg`` (B, 3),
        ``origins_A`` (B, 2), ``defocus_u_A``, ``defocus_v_A``, ``defocus_angle_deg``, ``state`` (B,) int,
        ``hinge`` (B,) float (NaN when not continuous).
    """
    rng = np.random.default_rng(seed)
    continuous = callable(volumes)
    if continuous:
        levels = np.linspace(0, 1, 20)
        t = rng.choice(levels, size=n)
        state = np.searchsorted(levels, t)
        vols = None
    else:
        vols = volumes if isinstance(volumes, (list, tuple)) else [volumes]
        state = (np.asarray(state_of) if state_of is not None else rng.integers(0, len(vols), size=n))
        t = np.full(n, np.nan)
    box = (vols[0] if vols else volumes(0.0)).shape[-1]
    angles = random_poses(n, rng)
    origins_A = rng.uniform(-max_shift_px, max_shift_px, size=(n, 2)) * pixel_size_A
    dmean = rng.uniform(*defocus_range_A, size=n)
    dastig = rng.uniform(0, astigmatism_A, size=n)
    du, dv = dmean + dastig / 2, dmean - dastig / 2
    dang = rng.uniform(0, 180, size=n)
    projectors = {}
    sigma = None
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        b = sl.stop - sl.start
        images = np.empty((b, box, box), dtype=np.float32)
        ctf = ctf_2d(box, pixel_size_A, du[sl], dv[sl], dang[sl], voltage_kV, cs_mm, amplitude_contrast,
                     0.0, bfactor_A2)
        for s in np.unique(state[sl]):
            if s not in projectors:
                projectors[s] = Projector(volumes(levels[s]) if continuous else vols[s])
            sel = np.nonzero(state[sl] == s)[0]
            idx = sel + start
            images[sel] = projectors[s].project(angles[idx], origins_A[idx] / pixel_size_A, ctf[sel]).numpy()
        if snr is not None:
            if sigma is None:   # noise level fixed from the first batch, so every batch has the same SNR
                sigma = math.sqrt(float(images.var(axis=(1, 2)).mean()) / snr)
            images = images + _noise(images.shape, sigma, coloured_noise, rng, box)
        yield {"images": images, "angles_deg": angles[sl], "origins_A": origins_A[sl], "defocus_u_A": du[sl],
               "defocus_v_A": dv[sl], "defocus_angle_deg": dang[sl], "state": state[sl], "hinge": t[sl]}


def write_particle_set(out_dir: str, volumes: Sequence[np.ndarray], n: int, pixel_size_A: float,
                       voltage_kV: float = 300.0, cs_mm: float = 2.7, amplitude_contrast: float = 0.1,
                       stack_name: str = "particles.mrcs", star_name: str = "particles.star", **kwargs: Any) -> str:
    """Simulate ``n`` particles (see :func:`simulate_particles`) into ``out_dir``: an MRCS stack and a
    RELION 3.1 STAR with the true poses, origins and CTF. Returns the STAR path."""
    os.makedirs(out_dir, exist_ok=True)
    first = volumes if not isinstance(volumes, (list, tuple)) else volumes[0]
    box = (first(0.0) if callable(first) else first).shape[-1]
    stack_path = os.path.join(out_dir, stack_name)
    cols = {k: [] for k in ("angles_deg", "origins_A", "defocus_u_A", "defocus_v_A", "defocus_angle_deg",
                            "state", "hinge")}
    with atomic_output(stack_path) as tmp:
        with mrcfile.new_mmap(tmp, shape=(n, box, box), mrc_mode=2, overwrite=True) as mrc:
            mrc.header.ispg = 0
            pos = 0
            for batch in simulate_particles(volumes, n, pixel_size_A, voltage_kV=voltage_kV, cs_mm=cs_mm,
                                            amplitude_contrast=amplitude_contrast, **kwargs):
                b = len(batch["images"])
                mrc.data[pos:pos + b] = batch["images"]
                pos += b
                for k in cols:
                    cols[k].append(batch[k])
            mrc.voxel_size = pixel_size_A
    cols = {k: np.concatenate(v) for k, v in cols.items()}
    particles = {
        "rlnImageName": np.array(["%06d@%s" % (i + 1, stack_name) for i in range(n)], dtype=object),
        "rlnOpticsGroup": np.ones(n, dtype=np.int64),
        "rlnDefocusU": cols["defocus_u_A"], "rlnDefocusV": cols["defocus_v_A"],
        "rlnDefocusAngle": cols["defocus_angle_deg"],
        "rlnAngleRot": cols["angles_deg"][:, 0], "rlnAngleTilt": cols["angles_deg"][:, 1],
        "rlnAnglePsi": cols["angles_deg"][:, 2],
        "rlnOriginXAngst": cols["origins_A"][:, 0], "rlnOriginYAngst": cols["origins_A"][:, 1],
        "rlnClassNumber": cols["state"] + 1,
    }
    if np.isfinite(cols["hinge"]).any():
        particles["dcHingeParameter"] = cols["hinge"]
    star = ParticleStar(make_optics(pixel_size_A, box, voltage_kV, cs_mm, amplitude_contrast),
                           particles, out_dir)
    star_path = os.path.join(out_dir, star_name)
    write_particles(star_path, star)
    return star_path


# ---------------------------------------------------------------------------------------------- program
def main(argv=None):
    """``python -m deepcryo.core.simulate particles|micrographs``: the commands
    :mod:`deepcryo.core.commands.simulate_particles` and :mod:`deepcryo.core.commands.simulate_micrographs`."""
    from .cli import run_program
    from .commands import simulate_micrographs, simulate_particles
    return run_program("python -m deepcryo.core.simulate", __doc__,
                       {"particles": simulate_particles, "micrographs": simulate_micrographs}, argv)


if __name__ == "__main__":
    sys.exit(main())
