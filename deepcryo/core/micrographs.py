"""Simulated micrographs with known CTF: the ground truth of the defocus estimator's tests and training.

A micrograph is built in Fourier space (one real FFT, one inverse), so a 4096² image takes well under
a second on CPU:

* specimen = particle-like Gaussian blobs (random centres, sizes and weights) + a coloured ice/carbon
  texture (power ∝ 1 / (1 + (s/s0)²)^exponent plus a flat "atomic" floor), as a phase-contrast signal;
* times the CTF of :mod:`deepcryo.core.ctf` (RELION sign; defocus U/V in Å, angle in degrees from the
  image x axis to U) with the B-factor envelope ``exp(-B s²/4)``;
* intensity ``dose·p²·(1 + signal)`` counts per pixel (dose in e⁻/Å², pixel size p in Å/px) with shot
  noise (Gaussian approximation of Poisson) and a small white read-out noise.

Images are arrays ``[y, x]``; the x axis is the last axis, as in :mod:`deepcryo.core.fourier`.
Everything is deterministic given ``seed``.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import ctf as ctf_mod
from .errors import InputError

__all__ = ["simulate_micrograph", "simulate_micrograph_set", "random_micrograph_parameters", "TRUTH_COLUMNS"]

#: truth dict key -> RELION column written in the truth STAR
TRUTH_COLUMNS = OrderedDict([
    ("defocus_u_A", "rlnDefocusU"), ("defocus_v_A", "rlnDefocusV"), ("defocus_angle_deg", "rlnDefocusAngle"),
    ("voltage_kV", "rlnVoltage"), ("cs_mm", "rlnSphericalAberration"),
    ("amplitude_contrast", "rlnAmplitudeContrast"), ("phase_shift_deg", "rlnPhaseShift"),
    ("bfactor_A2", "rlnCtfBfactor"), ("pixel_size_A", "rlnMicrographPixelSize")])


def simulate_micrograph(size_px: int = 1024, pixel_size_A: float = 1.0, voltage_kV: float = 300.0, cs_mm: float = 2.7,
                        amplitude_contrast: float = 0.07, defocus_u_A: float = 15000.0, defocus_v_A: float = 14000.0,
                        defocus_angle_deg: float = 30.0, phase_shift_deg: float = 0.0, bfactor_A2: float = 60.0,
                        dose_e_per_A2: float = 40.0, contrast: float = 0.08, n_particles: Optional[int] = None,
                        particle_diameter_A: float = 150.0, texture_strength: float = 1.0,
                        texture_exponent: float = 1.0, seed: int = 0, tilt_angle_deg: float = 0.0,
                        tilt_axis_deg: float = 0.0, ice_thickness_A: float = 0.0,
                        layer_step_A: float = 50.0) -> Tuple[np.ndarray, Dict[str, Any]]:
    """One simulated micrograph (``size_px`` × ``size_px``) and its truth.

    Args:
        size_px: image side (px). pixel_size_A: Å/px. voltage_kV: kV. cs_mm: mm.
        amplitude_contrast: fraction (0..1). defocus_u_A, defocus_v_A: Å, positive underfocus (U >= V is
            not required; the truth is returned standardised to U >= V, angle in [0, 180)).
        defocus_angle_deg: degrees from the image x axis to the U direction. phase_shift_deg: degrees.
        bfactor_A2: envelope B-factor (Å²). dose_e_per_A2: electrons per Å² (sets the shot noise).
        contrast: standard deviation of the specimen's relative intensity modulation.
        n_particles: number of blobs (default: a field about 40 % covered). particle_diameter_A: Å.
        texture_strength: weight of the ice/carbon texture relative to the particles.
        texture_exponent: power-law exponent of the texture spectrum (≈0.5 ice … 1.5 carbon).
        seed: random seed (the image is a deterministic function of all arguments).
        tilt_angle_deg, tilt_axis_deg: specimen tilt θ (degrees, >= 0) and tilt axis φ (degrees), CTFFIND5's
            convention (:mod:`deepcryo.defocus.tilt`): the mean defocus at (x, y) Å from the image centre
            (x along columns, y along rows) is ``(U + V)/2 + tan θ · (x sin φ + y cos φ)``.
        ice_thickness_A: thickness t (Å) of the specimen slab, centred on the given defocus: the specimen is
            ``ceil(t / layer_step_A)`` independent layers at evenly spread defoci, so that the PSD holds the
            slab-averaged CTF² ``½[1 − sinc(π λ s² t) cos 2γ]`` (:mod:`deepcryo.defocus.thickness`).
        layer_step_A: defocus step (Å) of the layers (thickness) and of the terraces (tilt): a tilted layer is
            cut into terraces of defocus within ± step/2, each transferred with its own CTF.
        With ``tilt_angle_deg = 0`` and ``ice_thickness_A = 0`` (the defaults) the image is the flat, thin one
        of earlier versions, bit for bit.
    Returns:
        (image float32 (size_px, size_px) in counts per pixel, truth dict with the CTF and acquisition values).
    """
    if size_px < 16 or pixel_size_A <= 0 or dose_e_per_A2 <= 0:
        raise InputError("micrograph simulation needs size_px >= 16, pixel_size_A > 0 and a positive dose")
    if not (0 <= tilt_angle_deg < 90 and ice_thickness_A >= 0 and layer_step_A > 0):
        raise InputError("micrograph simulation needs 0 <= tilt angle < 90 degrees, ice thickness >= 0 Å and "
                         "a positive layer step")
    gen = torch.Generator().manual_seed(int(seed))
    n = int(size_px)
    sigma_px = 0.25 * particle_diameter_A / pixel_size_A
    if n_particles is None:
        n_particles = max(1, int(0.4 * n * n / (math.pi * (2 * sigma_px) ** 2)))
    fy = torch.fft.fftfreq(n).reshape(-1, 1) / pixel_size_A
    fx = torch.fft.rfftfreq(n).reshape(1, -1) / pixel_size_A
    s2 = fx * fx + fy * fy
    grid = torch.stack(torch.broadcast_tensors(fx, fy), dim=-1).reshape(-1, 2)

    def specimen():
        return _specimen_spectrum(n, pixel_size_A, sigma_px, n_particles, texture_strength, texture_exponent, s2, gen)

    def transfer(offset_A):
        return ctf_mod.ctf_from_freqs(grid, defocus_u_A + offset_A, defocus_v_A + offset_A, defocus_angle_deg,
                                      voltage_kV, cs_mm, amplitude_contrast, phase_shift_deg,
                                      bfactor_A2).reshape(s2.shape)

    if tilt_angle_deg == 0 and ice_thickness_A == 0:
        signal = torch.fft.irfft2(specimen() * transfer(0.0), s=(n, n))
    else:
        signal = _thick_tilted_signal(n, pixel_size_A, specimen, transfer, tilt_angle_deg, tilt_axis_deg,
                                      ice_thickness_A, layer_step_A)
    signal = signal * (contrast / signal.std().clamp(min=1e-12))
    counts = dose_e_per_A2 * pixel_size_A ** 2
    image = counts * (1.0 + signal)
    image = image + torch.randn(n, n, generator=gen) * torch.sqrt(image.clamp(min=0.0) + 0.25)
    u, v, ang = float(defocus_u_A), float(defocus_v_A), float(defocus_angle_deg)
    if v > u:
        u, v, ang = v, u, ang + 90.0
    truth = OrderedDict([
        ("defocus_u_A", u), ("defocus_v_A", v), ("defocus_angle_deg", ang % 180.0),
        ("voltage_kV", float(voltage_kV)), ("cs_mm", float(cs_mm)),
        ("amplitude_contrast", float(amplitude_contrast)), ("phase_shift_deg", float(phase_shift_deg)),
        ("bfactor_A2", float(bfactor_A2)), ("pixel_size_A", float(pixel_size_A)),
        ("dose_e_per_A2", float(dose_e_per_A2)), ("contrast", float(contrast)), ("size_px", n), ("seed", int(seed))])
    if tilt_angle_deg or ice_thickness_A:
        truth.update(tilt_angle_deg=float(tilt_angle_deg), tilt_axis_deg=float(tilt_axis_deg) % 360.0,
                     ice_thickness_A=float(ice_thickness_A))
    return image.numpy().astype(np.float32), truth


def _specimen_spectrum(n, pixel_size_A, sigma_px, n_particles, texture_strength, texture_exponent, s2, gen):
    """rfft2 (n, n//2+1) of one specimen layer: Gaussian blobs at random positions + coloured texture."""
    # particles: weighted impulses, convolved with a Gaussian profile in Fourier space
    impulses = torch.zeros(n * n)
    pos = torch.randint(0, n * n, (n_particles,), generator=gen)
    impulses.index_add_(0, pos, 0.5 + torch.rand(n_particles, generator=gen))
    spectrum = torch.fft.rfft2(impulses.reshape(n, n))
    blob = torch.exp(-2.0 * math.pi ** 2 * (sigma_px * pixel_size_A) ** 2 * s2)
    spectrum = spectrum * blob / math.sqrt(max(n_particles, 1))
    # texture: complex Gaussian noise with a coloured amplitude spectrum + a flat floor
    s0 = 1.0 / 60.0
    colour = (1.0 + s2 / s0 ** 2) ** (-0.5 * texture_exponent) + 0.15
    noise = torch.complex(torch.randn(s2.shape, generator=gen), torch.randn(s2.shape, generator=gen))
    spectrum = spectrum + texture_strength * n * 0.05 * colour * noise
    spectrum[0, 0] = 0.0
    return spectrum


def _thick_tilted_signal(n, pixel_size_A, specimen, transfer, tilt_angle_deg, tilt_axis_deg, thickness_A, step_A):
    """Phase-contrast signal (n, n) of a slab of ``thickness_A`` Å, tilted by ``tilt_angle_deg`` about
    ``tilt_axis_deg``: independent layers (``specimen()`` spectra, variance 1/layers each) at defoci evenly spread
    over the thickness, each cut into terraces of defocus within ± ``step_A``/2 (the local defocus of the tilt,
    :func:`simulate_micrograph`), each terrace transferred with the CTF of its defocus (``transfer(offset_A)``);
    the transferred terraces add up in Fourier space (one inverse FFT)."""
    layers = max(1, int(math.ceil(thickness_A / step_A)))
    offsets = (torch.arange(layers, dtype=torch.float64) + 0.5) / layers * thickness_A - 0.5 * thickness_A
    centre = 0.5 * (n - 1)
    coords = (torch.arange(n, dtype=torch.float64) - centre) * pixel_size_A
    slope = math.tan(math.radians(tilt_angle_deg))
    axis = math.radians(tilt_axis_deg)
    height = slope * (coords[None, :] * math.sin(axis) + coords[:, None] * math.cos(axis))  # (y, x) Å
    terrace = torch.round(height / step_A).long()
    total = 0.0
    for offset in offsets.tolist():
        spectrum = specimen() / math.sqrt(layers)
        if tilt_angle_deg == 0:
            total = total + spectrum * transfer(offset)
            continue
        layer = torch.fft.irfft2(spectrum, s=(n, n))
        for k in torch.unique(terrace).tolist():
            part = torch.fft.rfft2(torch.where(terrace == k, layer, torch.zeros_like(layer)))
            total = total + part * transfer(offset + k * step_A)
    return torch.fft.irfft2(total, s=(n, n))


def random_micrograph_parameters(rng: np.random.Generator, pixel_size_range_A: Tuple[float, float] = (0.5, 2.5),
                                 voltages_kV: Sequence[float] = (200.0, 300.0), cs_mm: float = 2.7,
                                 defocus_range_A: Tuple[float, float] = (3000.0, 50000.0),
                                 astigmatism_max_A: float = 2000.0,
                                 amplitude_contrast: Tuple[float, float] = (0.05, 0.1),
                                 bfactor_range_A2: Tuple[float, float] = (20.0, 150.0),
                                 dose_range: Tuple[float, float] = (20.0, 60.0),
                                 contrast_range: Tuple[float, float] = (0.04, 0.12)) -> Dict[str, float]:
    """Random keyword arguments for :func:`simulate_micrograph` drawn with a numpy ``rng``.

    Defocus is the mean defocus (Å), uniform in ``defocus_range_A``; U - V uniform in [0, astigmatism_max_A]
    (Å); angle uniform in [0, 180) degrees; textures from ice-like to carbon-like.
    """
    mean = rng.uniform(*defocus_range_A)
    astig = rng.uniform(0.0, astigmatism_max_A)
    return dict(pixel_size_A=float(rng.uniform(*pixel_size_range_A)), voltage_kV=float(rng.choice(voltages_kV)),
                cs_mm=float(cs_mm), amplitude_contrast=float(rng.uniform(*amplitude_contrast)),
                defocus_u_A=float(mean + astig / 2), defocus_v_A=float(mean - astig / 2),
                defocus_angle_deg=float(rng.uniform(0.0, 180.0)), bfactor_A2=float(rng.uniform(*bfactor_range_A2)),
                dose_e_per_A2=float(rng.uniform(*dose_range)), contrast=float(rng.uniform(*contrast_range)),
                texture_strength=float(rng.uniform(0.3, 2.0)), texture_exponent=float(rng.uniform(0.5, 1.5)),
                particle_diameter_A=float(rng.uniform(80.0, 250.0)))


def simulate_micrograph_set(n: int, out_dir: str, size_px: int = 1024, seed: int = 0,
                            star_name: str = "micrographs_ctf.star", **ranges: Any) -> Tuple[str, List[Dict[str, Any]]]:
    """Write ``n`` simulated micrographs ``mic_0000.mrc`` … and a truth STAR into ``out_dir``.

    ``ranges`` go to :func:`random_micrograph_parameters`. The STAR (``data_micrographs``) has
    ``rlnMicrographName`` (relative to the STAR's folder) and the RELION CTF columns of
    :data:`TRUTH_COLUMNS` per micrograph. Returns ``(star path, list of truth dicts)``.
    """
    from .mrc import write_mrc  # here: simulating in memory (training) needs neither mrcfile nor emtable
    from .star import write_star
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    truths, names = [], []
    for i in range(n):
        params = random_micrograph_parameters(rng, **ranges)
        image, truth = simulate_micrograph(size_px=size_px, seed=int(rng.integers(2 ** 31)), **params)
        name = "mic_%04d.mrc" % i
        write_mrc(os.path.join(out_dir, name), image, truth["pixel_size_A"])
        truths.append(truth)
        names.append(name)
    cols = OrderedDict([("rlnMicrographName", np.array(names, dtype=object))])
    for key, column in TRUTH_COLUMNS.items():
        cols[column] = np.array([t[key] for t in truths], dtype=np.float64)
    star = os.path.join(out_dir, star_name)
    write_star(star, OrderedDict([("micrographs", cols)]))
    return star, truths
