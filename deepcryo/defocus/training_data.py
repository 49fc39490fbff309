"""Training data of the defocus CNN from several image-formation models, simulated as the PSDs the model sees.

Why: a CNN trained on one simulator learns that simulator. On particle-field micrographs with weak Thon rings
from independent code, the CNN trained on :mod:`deepcryo.core.micrographs` alone made systematic errors
(astigmatism inflated by the particles' own form factor and by anisotropic blur). Each training micrograph here
draws one of :data:`IMAGE_MODELS` and random acquisition, detector and specimen parameters.

Image formation (all models). With ``s`` the spatial frequency (1/Å), ``φ`` its azimuth and ``f = s·p``
(cycles/px, pixel size ``p`` Å/px), the expected power spectrum of the relative intensity ``I/I₀ − 1`` is ::

    P(s, φ) = c² · S(s) · CTF²(s, φ) · exp(−B s²/2) · E_drift(s, φ) · E_vib(s) · MTF²(f) / norm
              + A_bg · exp(−(s/s_bg)²) · MTF²(f)                       (unmodulated: inelastic, thickness)
              + [NPS(f) + n_c · (1 + (f/0.05)²)^(−α/2)] / (dose · p²)  (shot noise, coloured noise)

* ``CTF`` is :func:`deepcryo.core.ctf.ctf_from_freqs` (defocus U/V in Å, angle in degrees from x to U,
  amplitude contrast, phase-plate shift in degrees), ``B`` the envelope B-factor (Å²);
* ``E_drift = sinc²(L s cos(φ − ψ))`` for a linear drift of ``L`` Å along ψ during the exposure,
  ``E_vib = exp(−4π² σ² s²)`` for an isotropic vibration of RMS ``σ`` Å;
* detectors: *counting* (``MTF = sinc(f)``, the pixel aperture, white ``NPS = 1``) or *integrating*
  (scintillator: ``MTF = sinc(f) / (1 + (f/f_c)²)``, ``NPS = n_w + (1 − n_w)·MTF²``, so DQE falls with f);
* ``norm`` makes the variance of the CTF-modulated signal ``c²`` (``c`` = ``contrast``).

Specimen spectra ``S(s)`` by model:

* ``"ice_carbon"`` (deepcryo's micrograph model, strong rings): Gaussian-blob particles plus an amorphous-ice
  or carbon texture ``((1 + (s/s₀)²)^(−e/2) + 0.15)²``, ``s₀ = 1/60`` Å⁻¹, ``e`` 0.5 (ice) … 1.5 (carbon), and
  the water ring at 1/3.7 Å⁻¹;
* ``"particles"`` (particle-only field, weak rings): the form factor of polydisperse globular particles
  (solid spheres of diameter ``D`` ± polydispersity, whose own oscillations look like rings at low
  frequency) plus a Wilson plateau and a thin-ice texture; low contrast.

From model to CNN input (:func:`simulate_psd`): the Welch step of :func:`deepcryo.defocus.psd.compute_psd`
averages the periodograms of ``M`` Hann-tapered tiles of ``T`` px. For a stationary Gaussian field of
spectrum ``P`` a tile's windowed DFT is ``h ⊛ Z`` with ``Z(k) ~ CN(0, P(k/(T p)))`` on the tile's DFT grid and
``h = [−¼, ½, −¼]`` per axis (the Hann window's DFT). :func:`simulate_psd` draws exactly that on the cropped
grid (``|k| ≤ K``), averages ``min(M, 4)`` draws and scales their deviation from the expectation to the
variance of ``M`` draws (overlapping tiles are counted as independent: the periodograms of 50 %-overlapped
Hann tiles correlate at 1/36), makes it Hermitian (the periodogram of a real image is), and hands it to
:func:`deepcryo.defocus.psd.normalised_log_psd`, the same code that finishes :func:`compute_psd`. ``T``, ``K``
and ``M`` are those :func:`compute_psd` would use for a micrograph of ``height_px × width_px``, so a
8192² or 5760×4092 micrograph costs the same as a 2048² one (three ~140² grids). Not modelled: aliasing of
frequencies beyond Nyquist and non-stationarity (particles clustered on part of the field).
:func:`realise_micrograph` draws a real-space micrograph of the same spectrum (tests, benchmarks).

Parameters of one micrograph are a plain dict (:func:`draw_parameters`); :func:`training_arrays` makes the
``{"psd", "acq", "labels", "image_model", "phase_shift_deg"}`` arrays of :mod:`deepcryo.defocus.train`, in parallel processes.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core import ctf as ctf_mod
from ..core.errors import InputError
from .psd import CNN_SAMPLINGS_A, CNN_SIZE_PX, normalised_log_psd, periodogram_half_width, tile_size_px

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_MODELS", "DETECTORS", "Ranges", "draw_parameters", "power_spectrum", "welch_layout",
           "simulate_psd", "realise_micrograph", "training_arrays"]

#: image-formation models (see the module docstring)
IMAGE_MODELS = ("ice_carbon", "particles")
#: detector models: counting (white noise, pixel-aperture MTF) and integrating (scintillator blur)
DETECTORS = ("counting", "integrating")
_WATER_RING_INV_A = 1.0 / 3.7
_TEXTURE_S0_INV_A = 1.0 / 60.0
_MAX_DRAWS = 4  # speckle draws per PSD channel (the variance is then scaled to the tile count)


@dataclasses.dataclass
class Ranges:
    """What :func:`draw_parameters` draws from (uniform unless said). Units in the names.

    ``sizes_px``: (height, width) of the micrographs, one drawn per micrograph; ``phase_plate_fraction``:
    fraction of micrographs with a phase shift uniform in ``phase_shift_range_deg``, the others have none;
    ``astigmatism_max_A``: the largest U − V (also kept below the mean defocus so that V > 0).
    """

    image_models: Tuple[str, ...] = IMAGE_MODELS
    detectors: Tuple[str, ...] = DETECTORS
    sizes_px: Tuple[Tuple[int, int], ...] = ((2048, 2048), (4096, 4096), (5760, 4092), (8192, 8192))
    pixel_size_range_A: Tuple[float, float] = (0.5, 2.5)
    voltages_kV: Tuple[float, ...] = (200.0, 300.0)
    cs_values_mm: Tuple[float, ...] = (2.7,)
    defocus_range_A: Tuple[float, float] = (2000.0, 50000.0)
    astigmatism_max_A: float = 3000.0
    phase_plate_fraction: float = 0.2
    phase_shift_range_deg: Tuple[float, float] = (0.0, 180.0)
    bfactor_range_A2: Tuple[float, float] = (20.0, 200.0)
    dose_range_e_per_A2: Tuple[float, float] = (15.0, 60.0)
    drift_max_A: float = 10.0
    vibration_max_A: float = 2.0
    coloured_noise_max: float = 1.0

    def validate(self) -> None:
        """Raise :class:`InputError` for an empty or impossible range."""
        bad = [m for m in self.image_models if m not in IMAGE_MODELS]
        bad += [d for d in self.detectors if d not in DETECTORS]
        if bad or not self.image_models or not self.detectors:
            raise InputError("unknown or no image model/detector %s (choose from %s and %s)"
                             % (bad, ",".join(IMAGE_MODELS), ",".join(DETECTORS)))
        if not self.sizes_px or any(min(s) < 256 for s in self.sizes_px):
            raise InputError("micrograph sizes must be at least 256 px (got %s)" % (self.sizes_px,))
        for name in ("pixel_size_range_A", "defocus_range_A", "bfactor_range_A2", "dose_range_e_per_A2",
                     "phase_shift_range_deg"):
            lo, hi = getattr(self, name)
            if not (lo <= hi) or lo < 0 or (name in ("pixel_size_range_A", "dose_range_e_per_A2") and lo <= 0):
                raise InputError("bad range %s = (%g, %g)" % (name, lo, hi))
        if self.defocus_range_A[0] < 500.0:
            raise InputError("defocus range must start at >= 500 Å (got %g)" % self.defocus_range_A[0])
        if not (0 <= self.phase_plate_fraction <= 1) or min(self.astigmatism_max_A, self.drift_max_A,
                                                            self.vibration_max_A, self.coloured_noise_max) < 0:
            raise InputError("phase-plate fraction must be in [0, 1] and astigmatism, drift, vibration and "
                             "coloured noise >= 0")
        if not self.voltages_kV or not self.cs_values_mm or min(self.voltages_kV) <= 0 or min(self.cs_values_mm) < 0:
            raise InputError("voltages must be > 0 kV and Cs >= 0 mm")


def draw_parameters(rng: np.random.Generator, ranges: Ranges = Ranges()) -> Dict[str, Any]:
    """One micrograph's parameters (a dict; units in the keys) drawn from ``ranges`` with a numpy ``rng``.

    The mean defocus is uniform in ``defocus_range_A``; U − V uniform in [0, min(astigmatism_max_A,
    1.5 × mean)]; the angle uniform in [0, 180) degrees; U >= V.
    """
    model = str(rng.choice(ranges.image_models))
    height, width = ranges.sizes_px[int(rng.integers(len(ranges.sizes_px)))]
    mean = rng.uniform(*ranges.defocus_range_A)
    astig = rng.uniform(0.0, min(ranges.astigmatism_max_A, 1.5 * mean))
    phase = rng.uniform(*ranges.phase_shift_range_deg) if rng.random() < ranges.phase_plate_fraction else 0.0
    particles = model == "particles"
    return dict(
        image_model=model, height_px=int(height), width_px=int(width),
        pixel_size_A=float(rng.uniform(*ranges.pixel_size_range_A)),
        voltage_kV=float(rng.choice(ranges.voltages_kV)), cs_mm=float(rng.choice(ranges.cs_values_mm)),
        amplitude_contrast=float(rng.uniform(0.05, 0.1)),
        defocus_u_A=float(mean + astig / 2), defocus_v_A=float(mean - astig / 2),
        defocus_angle_deg=float(rng.uniform(0.0, 180.0)), phase_shift_deg=float(phase),
        bfactor_A2=float(rng.uniform(*ranges.bfactor_range_A2)),
        dose_e_per_A2=float(rng.uniform(*ranges.dose_range_e_per_A2)),
        # relative intensity modulation: weak for particle-only fields (rings barely above the noise)
        contrast=float(rng.uniform(0.005, 0.03) if particles else rng.uniform(0.04, 0.12)),
        detector=str(rng.choice(ranges.detectors)), scintillator_cutoff=float(rng.uniform(0.12, 0.35)),
        white_noise_fraction=float(rng.uniform(0.2, 0.6)),
        drift_A=float(rng.uniform(0.0, ranges.drift_max_A)), drift_angle_deg=float(rng.uniform(0.0, 180.0)),
        vibration_A=float(rng.uniform(0.0, ranges.vibration_max_A)),
        coloured_noise=float(rng.uniform(0.0, ranges.coloured_noise_max)),
        coloured_noise_exponent=float(rng.uniform(0.5, 2.5)),
        background=float(rng.uniform(0.0, 2.0)), background_width_A=float(rng.uniform(30.0, 150.0)),
        particle_diameter_A=float(rng.uniform(80.0, 300.0)), polydispersity=float(rng.uniform(0.05, 0.3)),
        texture_strength=float(rng.uniform(0.0, 0.3) if particles else rng.uniform(0.3, 2.0)),
        texture_exponent=float(rng.uniform(0.5, 1.5)),
        ice_ring=float(rng.uniform(0.0, 0.5)))


def _sphere_form_factor(s, diameter_A, polydispersity):
    """Mean ``|F|²`` of solid spheres (F(0) = 1) whose diameters are uniform in D·(1 ± polydispersity)."""
    out = torch.zeros_like(s)
    for d in diameter_A * (1.0 + polydispersity * torch.linspace(-1.0, 1.0, 9, dtype=s.dtype)):
        x = (math.pi * float(d) * s).clamp(min=1e-4)
        f = 3.0 * (torch.sin(x) - x * torch.cos(x)) / x ** 3
        out += f * f
    return out / 9.0


def _specimen_spectrum(s, prm):
    """Specimen power ``S(s)`` (relative units) of the drawn image model at frequencies ``s`` (1/Å)."""
    texture = ((1.0 + (s / _TEXTURE_S0_INV_A) ** 2) ** (-0.5 * prm["texture_exponent"]) + 0.15) ** 2
    water = torch.exp(-0.5 * ((s - _WATER_RING_INV_A) / 0.02) ** 2)
    if prm["image_model"] == "particles":
        form = _sphere_form_factor(s, prm["particle_diameter_A"], prm["polydispersity"])
        wilson = 0.02 * torch.exp(-((s / 0.1) ** 2)) + 0.005
        return form + wilson + prm["texture_strength"] * 0.05 * texture + prm["ice_ring"] * 0.01 * water
    sigma = 0.25 * prm["particle_diameter_A"]
    blobs = torch.exp(-4.0 * math.pi ** 2 * sigma ** 2 * s * s)
    return blobs + prm["texture_strength"] * 0.2 * texture + prm["ice_ring"] * 0.05 * water


def _mtf(f, prm):
    """Detector MTF at ``f`` (cycles/px)."""
    aperture = torch.sinc(f)
    if prm["detector"] == "counting":
        return aperture
    return aperture / (1.0 + (f / prm["scintillator_cutoff"]) ** 2)


def _nps(f, prm):
    """Detector noise power spectrum at ``f`` (cycles/px), 1 at f = 0."""
    if prm["detector"] == "counting":
        return torch.ones_like(f)
    w = prm["white_noise_fraction"]
    return w + (1.0 - w) * _mtf(f, prm) ** 2


def _hann_autocorrelation(lag):
    """Autocorrelation of the Hann window ``sin²(πt)``, t in [0, 1], at ``lag`` tile lengths (1 at 0, 0 at ≥ 1):
    the Fourier transform of ``|W|²``, by which the Welch step damps a ring pattern of ``lag`` cycles per bin."""
    tau = lag.clamp(max=1.0)
    u = 2.0 * math.pi * tau
    # closed form of ∫ sin²(πt) sin²(π(t+τ)) dt over the overlap, divided by ∫ sin⁴(πt) dt = 3/8
    return ((1.0 - tau) * (2.0 + torch.cos(u)) / 8.0 + 3.0 * torch.sin(u) / (16.0 * math.pi)) / 0.375


def _ctf2(fx, fy, prm, welch_grid=False):
    """CTF² at (fx, fy) 1/Å; with ``welch_grid`` ((fx, fy) is a periodogram's grid of bins), averaged over the
    Hann window's spectral kernel: ``(1 − cos 2γ · A(τx) A(τy)) / 2`` with τ the local ring frequency of 2γ in cycles per
    bin and A the window's autocorrelation (rings finer than a bin average out instead of aliasing)."""
    shape = fx.shape
    freqs = torch.stack([fx.reshape(-1), fy.reshape(-1)], dim=1)
    gamma = ctf_mod.ctf_phase_from_freqs(freqs, prm["defocus_u_A"], prm["defocus_v_A"], prm["defocus_angle_deg"],
                                         prm["voltage_kV"], prm["cs_mm"], prm["amplitude_contrast"],
                                         prm["phase_shift_deg"])[0].reshape(shape)
    if not welch_grid:
        return torch.sin(gamma) ** 2
    gy, gx = torch.gradient(2.0 * gamma)  # radians per bin (the grid's step is one bin)
    damp = _hann_autocorrelation(gx.abs() / (2.0 * math.pi)) * _hann_autocorrelation(gy.abs() / (2.0 * math.pi))
    return 0.5 * (1.0 - torch.cos(2.0 * gamma) * damp)


def _signal(fx, fy, prm, welch_grid=False):
    """CTF-modulated, enveloped and detector-filtered specimen power (unnormalised) at (fx, fy) in 1/Å."""
    s2 = fx * fx + fy * fy
    s = s2.sqrt()
    psi = math.radians(prm["drift_angle_deg"])
    drift = torch.sinc(prm["drift_A"] * (fx * math.cos(psi) + fy * math.sin(psi))) ** 2
    envelope = torch.exp(-0.5 * prm["bfactor_A2"] * s2 - 4.0 * math.pi ** 2 * prm["vibration_A"] ** 2 * s2)
    mtf2 = _mtf(s * prm["pixel_size_A"], prm) ** 2
    return _specimen_spectrum(s, prm) * _ctf2(fx, fy, prm, welch_grid) * envelope * drift * mtf2


def power_spectrum(fx_invA: torch.Tensor, fy_invA: torch.Tensor, prm: Dict[str, Any],
                   welch_grid: bool = False) -> torch.Tensor:
    """Expected power ``P`` of the relative intensity at frequencies (fx, fy) in 1/Å (tensors of one shape),
    per pixel of the micrograph (the formula of the module docstring); ``prm`` from :func:`draw_parameters`.

    With ``welch_grid``, (fx, fy) must be the frequency grid of a tile's DFT (2D, one bin per element) and P is
    the expected Welch periodogram of Hann tiles (Thon rings finer than a bin averaged out)."""
    p = prm["pixel_size_A"]
    # normaliser: the mean signal power over the micrograph's whole frequency square (64² grid)
    g = (torch.arange(64, dtype=fx_invA.dtype) - 32) / (64 * p)
    gy, gx = torch.meshgrid(g, g, indexing="ij")
    norm = _signal(gx, gy, prm).mean().clamp(min=1e-30)
    s2 = fx_invA * fx_invA + fy_invA * fy_invA
    s = s2.sqrt()
    f = s * p
    mtf2 = _mtf(f, prm) ** 2
    signal = prm["contrast"] ** 2 * _signal(fx_invA, fy_invA, prm, welch_grid) / norm
    background = prm["contrast"] ** 2 * prm["background"] * torch.exp(-s2 * prm["background_width_A"] ** 2) * mtf2
    coloured = prm["coloured_noise"] * (1.0 + (f / 0.05) ** 2) ** (-0.5 * prm["coloured_noise_exponent"])
    noise = (_nps(f, prm) + coloured) / (prm["dose_e_per_A2"] * p * p)
    return signal + background + noise


def welch_layout(height_px: int, width_px: int, pixel_size_A: float, sampling_A: float,
                 size_px: int = CNN_SIZE_PX) -> Tuple[int, int, int]:
    """``(tile T px, crop half width K, tile count M)`` that :func:`deepcryo.defocus.psd.compute_psd` uses
    for one channel of a ``height_px × width_px`` micrograph (50 % overlap when fewer than 16 disjoint tiles)."""
    tile = tile_size_px(min(height_px, width_px), pixel_size_A, sampling_A, size_px)
    half = periodogram_half_width(pixel_size_A, tile, sampling_A)
    step = max(tile // 2 if (height_px // tile) * (width_px // tile) < 16 else tile, 1)
    count = ((height_px - tile) // step + 1) * ((width_px - tile) // step + 1)
    return tile, half, count


_HANN_DFT = torch.tensor([-0.25, 0.5, -0.25])
def _speckle(draws, n, generator):
    """Mean of ``draws`` unit-mean periodogram speckles (n, n) of Hann-tapered white noise (neighbouring bins
    correlated as in the Welch step)."""
    shape = (draws, n + 2, n + 2)
    z = torch.complex(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
    h = _HANN_DFT
    z = h[0] * z[:, :-2] + h[1] * z[:, 1:-1] + h[2] * z[:, 2:]
    z = h[0] * z[..., :-2] + h[1] * z[..., 1:-1] + h[2] * z[..., 2:]
    return (z.abs() ** 2).mean(dim=0) / (2.0 * float((h * h).sum()) ** 2)


def simulate_periodogram(prm: Dict[str, Any], sampling_A: float, generator: torch.Generator,
                         size_px: int = CNN_SIZE_PX) -> Tuple[torch.Tensor, int]:
    """A Welch periodogram (2K+1, 2K+1), centred, as :func:`deepcryo.defocus.psd.compute_psd` would average
    it for one channel of the micrograph ``prm``; returns it with the tile side T (px).

    Expected value: :func:`power_spectrum` at the bins, with the CTF² averaged over the Hann window's kernel.
    Fluctuations: a unit-mean speckle of ``min(M, 4)`` Hann-tapered white-noise periodograms, its deviation from
    1 scaled to the variance of ``M`` tiles."""
    tile, half, count = welch_layout(prm["height_px"], prm["width_px"], prm["pixel_size_A"], sampling_A, size_px)
    step = 1.0 / (tile * prm["pixel_size_A"])
    k = torch.arange(-half, half + 1, dtype=torch.float32) * step
    fy, fx = torch.meshgrid(k, k, indexing="ij")
    expected = power_spectrum(fx, fy, prm, welch_grid=True)
    draws = min(count, _MAX_DRAWS)
    speckle = _speckle(draws, expected.shape[-1], generator)
    if count > draws:  # the deviation of `draws` averaged periodograms, scaled to that of `count`
        speckle = 1.0 + (speckle - 1.0) * math.sqrt(draws / count)
    power = expected * speckle
    # Hermitian: a real image's periodogram is symmetric, P(k) = P(−k)
    n = power.shape[-1]
    upper = torch.zeros(n, n, dtype=torch.bool)
    upper[half + 1:] = True
    upper[half, half:] = True
    return torch.where(upper, power, power.flip(0, 1)), tile


def simulate_psd(prm: Dict[str, Any], generator: torch.Generator, samplings_A: Sequence[float] = CNN_SAMPLINGS_A,
                 size_px: int = CNN_SIZE_PX) -> torch.Tensor:
    """The CNN input (C, size_px, size_px) that :func:`deepcryo.defocus.psd.compute_psd` would give for a
    micrograph of the parameters ``prm`` (:func:`draw_parameters`), without making the micrograph."""
    channels = []
    for sampling in samplings_A:
        power, tile = simulate_periodogram(prm, sampling, generator, size_px)
        channels.append(normalised_log_psd(power[None], prm["pixel_size_A"], tile, sampling, size_px)[0])
    return torch.stack(channels)


def realise_micrograph(prm: Dict[str, Any], generator: torch.Generator) -> np.ndarray:
    """A real-space micrograph (height_px, width_px) float32, in e⁻/px, whose expected power spectrum is
    :func:`power_spectrum` (a Gaussian field: shot noise in its Gaussian approximation)."""
    h, w, p = prm["height_px"], prm["width_px"], prm["pixel_size_A"]
    fy = torch.fft.fftfreq(h).reshape(-1, 1) / p
    fx = torch.fft.rfftfreq(w).reshape(1, -1) / p
    fy, fx = torch.broadcast_tensors(fy, fx)
    amp = power_spectrum(fx, fy, prm).sqrt() * math.sqrt(h * w)
    amp[0, 0] = 0.0
    shape = amp.shape
    z = torch.complex(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
    rel = torch.fft.irfft2(z * amp * math.sqrt(0.5), s=(h, w))
    counts = prm["dose_e_per_A2"] * p * p
    return (counts * (1.0 + rel)).numpy().astype(np.float32)


def _arrays_chunk(args):
    """Worker: (seed, n, ranges) → (psd (n, C, S, S) float16, acq (n, 2), labels (n, 3), image_model (n,),
    phase_shift_deg (n,))."""
    seed, n, ranges = args
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(int(seed))
    psd = np.empty((n, len(CNN_SAMPLINGS_A), CNN_SIZE_PX, CNN_SIZE_PX), dtype=np.float16)
    acq, labels, models = np.empty((n, 2), np.float32), np.empty((n, 3), np.float32), np.empty(n, np.int8)
    phases = np.empty(n, np.float32)
    for i in range(n):
        prm = draw_parameters(rng, ranges)
        psd[i] = simulate_psd(prm, gen).numpy()
        acq[i] = (prm["voltage_kV"], prm["cs_mm"])
        labels[i] = (prm["defocus_u_A"], prm["defocus_v_A"], prm["defocus_angle_deg"])
        models[i] = IMAGE_MODELS.index(prm["image_model"])
        phases[i] = prm["phase_shift_deg"]
    return psd, acq, labels, models, phases


def training_arrays(n: int, seed: int = 0, ranges: Optional[Ranges] = None, workers: int = 1,
                    chunk: int = 250) -> Dict[str, np.ndarray]:
    """``n`` simulated CNN inputs with labels: ``{"psd": (n, 3, S, S) float16, "acq": (n, 2) voltage kV / Cs
    mm, "labels": (n, 3) U Å, V Å, angle deg, "image_model": (n,) index in IMAGE_MODELS, "phase_shift_deg": (n,)}``.

    Chunks of ``chunk`` micrographs are seeded ``(seed, chunk index)``, so the arrays do not depend on
    ``workers`` (processes; 1 = in this process).
    """
    ranges = ranges or Ranges()
    ranges.validate()
    if n < 1:
        raise InputError("need at least one micrograph to simulate (got %d)" % n)
    jobs = [(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]), min(chunk, n - start), ranges)
            for i, start in enumerate(range(0, n, chunk))]
    parts: List[Tuple[np.ndarray, ...]] = []
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)), initializer=torch.set_num_threads,
                                                       initargs=(1,)) as pool:
            for part in pool.imap(_arrays_chunk, jobs):
                parts.append(part)
                logger.info("simulated %d/%d PSDs", sum(len(p[0]) for p in parts), n)
    else:
        for job in jobs:
            parts.append(_arrays_chunk(job))
            logger.info("simulated %d/%d PSDs", sum(len(p[0]) for p in parts), n)
    keys = ("psd", "acq", "labels", "image_model", "phase_shift_deg")
    return {key: np.concatenate([p[i] for p in parts]) for i, key in enumerate(keys)}
