"""Particle-field micrographs with weak Thon rings from code that shares nothing with deepcryo (numpy only).

The benchmark's "independent simulator": written apart from :mod:`deepcryo.core.micrographs` and
:mod:`deepcryo.defocus.training_data`, with a different image formation, so that an estimator trained on
deepcryo's simulations is tested on images it has not learned the quirks of.

* Specimen: ``n_species`` globular pseudo-proteins, each a cloud of point atoms (Gaussian in an ellipsoid of
  random axes, 25-90 Å), placed at random positions and 3D orientations (a particle field, ~35 % covered), in
  a thin layer of amorphous ice (white potential noise, low-pass at 3 Å). Projected potential in arbitrary
  units, scaled so that the phase shift of the particles has RMS ``phase_rms_rad``.
* Image formation: full wave propagation, not a linear CTF: exit wave ``exp((i − w') σV)`` (absorption
  ``w' = w / sqrt(1 − w²)``), times the lens transfer ``exp(−iχ_K(k))`` with Kirkland's aberration phase
  ``χ_K = π λ k² (Cs λ² k² / 2 − Δf(φ))`` (Δf > 0 underfocus; Δf(φ) from U, V and the angle from x to U), a
  B-factor envelope, intensity ``|ψ|²`` (the weak-phase part is then ``−2σV·(sin χ + w' cos χ)`` with
  ``χ = −χ_K``: CTFFIND's CTF), pixel-aperture MTF, Poisson counts at ``dose``.

Optional thick and tilted specimens (off by default; then the image is that of earlier versions, bit for bit),
again by their own route, not deepcryo's slab-averaged CTF² or its terraced specimen:

* ``ice_thickness_A``: multislice. The specimen is ``n_slices`` independent slices (particles and ice), their
  defoci spread evenly over the thickness; the wave crosses them top (most underfocus) to bottom, each a phase
  grating ``exp((i − w') σV_k)``, with a Fresnel propagation ``exp(i π λ Δz k²)`` between them, and then the lens.
* ``tilt_angle_deg``, ``tilt_axis_deg``: the local defocus ``tan θ (x sin φ + y cos φ)`` (x, y in Å from the
  centre; CTFFIND5's convention, as :mod:`deepcryo.defocus.tilt`) is applied at the detector: the exit wave is
  imaged at each defocus step (``tilt_step_A``) and each pixel takes the intensity of its own defocus (an image
  of a position is formed from the wave within a few delocalisation lengths of it).

Returns an image (H, W) float32 and its truth (U ≥ V in Å, angle in degrees in [0, 180)).
"""
import math

import numpy as np


def _wavelength_A(voltage_kV):
    v = voltage_kV * 1e3
    return 12.26 / math.sqrt(v * (1.0 + 0.9785e-6 * v))


def _particle_atoms(rng, n_atoms=1500):
    """Atom positions (N, 3) in Å of one globular pseudo-protein (random ellipsoid, Gaussian density)."""
    axes = rng.uniform(25.0, 90.0, size=3)
    pts = rng.normal(size=(n_atoms, 3)) * axes / 2.5
    return pts


def _rotation(rng):
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def particle_field_micrograph(shape=(2048, 2048), pixel_size_A=1.0, voltage_kV=300.0, cs_mm=2.7,
                              amplitude_contrast=0.07, defocus_u_A=15000.0, defocus_v_A=14500.0,
                              defocus_angle_deg=30.0, bfactor_A2=60.0, dose_e_per_A2=40.0, phase_rms_rad=0.05,
                              ice_fraction=0.3, n_species=4, coverage=0.35, seed=0, ice_thickness_A=0.0,
                              n_slices=16, tilt_angle_deg=0.0, tilt_axis_deg=0.0, tilt_step_A=50.0):
    """One micrograph and its truth dict (see the module docstring)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    species = [_particle_atoms(rng) for _ in range(n_species)]
    radius_px = 60.0 / pixel_size_A
    n_particles = int(coverage * h * w / (math.pi * radius_px ** 2))
    if ice_thickness_A or tilt_angle_deg:
        return _thick_tilted(rng, species, shape, pixel_size_A, n_particles, voltage_kV, cs_mm, amplitude_contrast,
                             defocus_u_A, defocus_v_A, defocus_angle_deg, bfactor_A2, dose_e_per_A2, phase_rms_rad,
                             ice_fraction, ice_thickness_A, n_slices, tilt_angle_deg, tilt_axis_deg, tilt_step_A)
    phase = _projected_phase(rng, species, shape, pixel_size_A, n_particles, ice_fraction, phase_rms_rad)
    w_abs = amplitude_contrast / math.sqrt(1.0 - amplitude_contrast ** 2)
    exit_wave = np.exp((1j - w_abs) * phase)
    lam = _wavelength_A(voltage_kV)
    ky_full = np.fft.fftfreq(h)[:, None] / pixel_size_A
    kx_full = np.fft.fftfreq(w)[None, :] / pixel_size_A
    kk = kx_full ** 2 + ky_full ** 2
    az = np.arctan2(ky_full, kx_full)
    dz = 0.5 * (defocus_u_A + defocus_v_A) + 0.5 * (defocus_u_A - defocus_v_A) * np.cos(
        2.0 * (az - math.radians(defocus_angle_deg)))
    chi_k = math.pi * lam * kk * (0.5 * cs_mm * 1e7 * lam ** 2 * kk - dz)
    envelope = np.exp(-bfactor_A2 * kk / 4.0)
    wave = np.fft.ifft2(np.fft.fft2(exit_wave) * np.exp(-1j * chi_k) * envelope)
    counts = _detect(rng, np.abs(wave) ** 2, pixel_size_A, dose_e_per_A2)
    return counts, _truth(defocus_u_A, defocus_v_A, defocus_angle_deg, pixel_size_A, voltage_kV, cs_mm,
                          amplitude_contrast)


def _detect(rng, intensity, pixel_size_A, dose_e_per_A2):
    """Counts (H, W) float32 of an intensity image (1 = the unscattered beam): pixel-aperture MTF, then Poisson
    at ``dose_e_per_A2``."""
    h, w = intensity.shape
    mtf = np.sinc(np.fft.fftfreq(h))[:, None] * np.sinc(np.fft.rfftfreq(w))[None, :]
    intensity = np.fft.irfft2(np.fft.rfft2(intensity) * mtf, s=intensity.shape)
    return rng.poisson(np.clip(intensity, 0, None) * dose_e_per_A2 * pixel_size_A ** 2).astype(np.float32)


def _truth(defocus_u_A, defocus_v_A, defocus_angle_deg, pixel_size_A, voltage_kV, cs_mm, amplitude_contrast,
           **extra):
    """The truth dict: U ≥ V (Å), the angle from x to U in [0, 180), the acquisition, and ``extra``."""
    u, v, ang = float(defocus_u_A), float(defocus_v_A), float(defocus_angle_deg)
    if v > u:
        u, v, ang = v, u, ang + 90.0
    return dict(defocus_u_A=u, defocus_v_A=v, defocus_angle_deg=ang % 180.0, pixel_size_A=pixel_size_A,
                voltage_kV=voltage_kV, cs_mm=cs_mm, amplitude_contrast=amplitude_contrast, **extra)


def _projected_phase(rng, species, shape, pixel_size_A, n_particles, ice_fraction, phase_rms_rad):
    """Phase shift (H, W) in radians of ``n_particles`` particles (point atoms blurred by a 1 Å form factor) and
    ice (white noise low-passed at 3 Å, ``ice_fraction`` of the particles' RMS), zero mean, RMS ``phase_rms_rad``."""
    h, w = shape
    xs, ys = [], []
    for _ in range(n_particles):
        atoms = species[rng.integers(len(species))] @ _rotation(rng).T / pixel_size_A
        centre = rng.uniform((0, 0), (w, h))
        xs.append(atoms[:, 0] + centre[0])
        ys.append(atoms[:, 1] + centre[1])
    xs, ys = np.concatenate(xs) % w, np.concatenate(ys) % h
    potential, _, _ = np.histogram2d(ys, xs, bins=(h, w), range=((0, h), (0, w)))
    k2 = (np.fft.rfftfreq(w)[None, :] ** 2 + np.fft.fftfreq(h)[:, None] ** 2) / pixel_size_A ** 2
    vp = np.fft.irfft2(np.fft.rfft2(potential) * np.exp(-2.0 * math.pi ** 2 * k2), s=shape)
    ice = np.fft.irfft2(np.fft.rfft2(rng.normal(size=shape)) * np.exp(-(k2 * 9.0)), s=shape)
    vp = vp / vp.std() + ice_fraction * ice / ice.std()
    vp = vp - vp.mean()
    return phase_rms_rad * vp / vp.std()


def _thick_tilted(rng, species, shape, pixel_size_A, n_particles, voltage_kV, cs_mm, amplitude_contrast, defocus_u_A,
                  defocus_v_A, defocus_angle_deg, bfactor_A2, dose_e_per_A2, phase_rms_rad, ice_fraction, thickness_A,
                  n_slices, tilt_angle_deg, tilt_axis_deg, tilt_step_A):
    """The multislice / tilted image of :func:`particle_field_micrograph` (module docstring)."""
    h, w = shape
    slices = n_slices if thickness_A > 0 else 1
    lam = _wavelength_A(voltage_kV)
    ky = np.fft.fftfreq(h)[:, None] / pixel_size_A
    kx = np.fft.fftfreq(w)[None, :] / pixel_size_A
    kk = kx * kx + ky * ky
    w_abs = amplitude_contrast / math.sqrt(1.0 - amplitude_contrast ** 2)
    # slice defoci relative to the slab's centre, top (most underfocus) first
    offsets = thickness_A * (0.5 - (np.arange(slices) + 0.5) / slices)
    wave = np.ones(shape, dtype=np.complex128)
    for k in range(slices):
        phase = _projected_phase(rng, species, shape, pixel_size_A, max(1, n_particles // slices), ice_fraction,
                                 phase_rms_rad / math.sqrt(slices))
        wave = wave * np.exp((1j - w_abs) * phase)
        if k + 1 < slices:
            wave = np.fft.ifft2(np.fft.fft2(wave) * np.exp(1j * math.pi * lam * (offsets[k] - offsets[k + 1]) * kk))
    spectrum = np.fft.fft2(wave)
    az = np.arctan2(ky, kx)
    dz = 0.5 * (defocus_u_A + defocus_v_A) + 0.5 * (defocus_u_A - defocus_v_A) * np.cos(
        2.0 * (az - math.radians(defocus_angle_deg))) + offsets[-1]
    envelope = np.exp(-bfactor_A2 * kk / 4.0)
    yy = (np.arange(h)[:, None] - 0.5 * (h - 1)) * pixel_size_A
    xx = (np.arange(w)[None, :] - 0.5 * (w - 1)) * pixel_size_A
    axis = math.radians(tilt_axis_deg)
    height = math.tan(math.radians(tilt_angle_deg)) * (xx * math.sin(axis) + yy * math.cos(axis))
    step = np.round(height / tilt_step_A).astype(int)
    intensity = np.zeros(shape)
    for j in np.unique(step):
        chi_k = math.pi * lam * kk * (0.5 * cs_mm * 1e7 * lam ** 2 * kk - (dz + j * tilt_step_A))
        image = np.abs(np.fft.ifft2(spectrum * np.exp(-1j * chi_k) * envelope)) ** 2
        intensity = np.where(step == j, image, intensity)
    counts = _detect(rng, intensity, pixel_size_A, dose_e_per_A2)
    return counts, _truth(defocus_u_A, defocus_v_A, defocus_angle_deg, pixel_size_A, voltage_kV, cs_mm,
                          amplitude_contrast, ice_thickness_A=float(thickness_A),
                          tilt_angle_deg=float(tilt_angle_deg), tilt_axis_deg=float(tilt_axis_deg) % 360.0)


def random_truth(rng, defocus_range_A=(5000.0, 30000.0), astigmatism_max_A=1500.0):
    """Keyword arguments of :func:`particle_field_micrograph`: mean defocus, U − V, angle uniform."""
    mean = rng.uniform(*defocus_range_A)
    astig = rng.uniform(0.0, astigmatism_max_A)
    return dict(defocus_u_A=mean + astig / 2, defocus_v_A=mean - astig / 2,
                defocus_angle_deg=float(rng.uniform(0.0, 180.0)), bfactor_A2=float(rng.uniform(40.0, 120.0)),
                seed=int(rng.integers(2 ** 31)))
