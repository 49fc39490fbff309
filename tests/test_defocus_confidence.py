"""The CTF fit on weak Thon rings: no astigmatism where there is none, a calibrated uncertainty, the phase
shift of phase-plate data, the search range and the 1D rotational average.

The micrographs are rendered here by a short numpy image model (:func:`particle_field`), independent of
:mod:`deepcryo.core.simulate` and :mod:`deepcryo.core.ctf`: a field of particles made of point atoms, its
projected density filtered by the CTF (CTFFIND's formula written out here) and a B-factor envelope, a few %
contrast on a shot-noise background, no carbon: the rings are weak, as on a thin-ice particle field.
"""
import math

import numpy as np
import pytest

from deepcryo.core.mrc import write_mrc
from deepcryo.defocus import model as model_mod
from deepcryo.defocus import predict


def _wavelength_A(voltage_kV):
    v = voltage_kV * 1e3
    return 12.2639 / math.sqrt(v + 0.97845e-6 * v * v)


def particle_field(shape, pixel_size_A, defocus_u_A, defocus_v_A, angle_deg, seed, voltage_kV=300.0, cs_mm=2.7,
                   amplitude_contrast=0.07, phase_shift_deg=0.0, contrast=0.03, n_particles=400, atoms=300,
                   radius_A=60.0, bfactor_A2=80.0, dose_e_per_A2=30.0):
    """(ny, nx) micrograph: ``n_particles`` discs of radius ``radius_A`` made of ``atoms`` point atoms (1 Å
    Gaussians), so the power falls at low resolution (particle shape) and is flat beyond ~10 Å (Wilson); the
    projection is filtered by ``-(sqrt(1-w²) sin γ + w cos γ)``, γ = π λ Δf(φ) s² − π/2 Cs λ³ s⁴ + phase, and
    ``exp(-B s²/4)``; ``contrast`` of the ``dose`` electrons per Å², Gaussian shot noise."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    fy = np.fft.fftfreq(ny, d=pixel_size_A)[:, None]
    fx = np.fft.rfftfreq(nx, d=pixel_size_A)[None, :]
    s2 = fx * fx + fy * fy
    centres = rng.uniform([0, 0], [ny, nx], size=(n_particles, 2))
    r = radius_A / pixel_size_A * np.sqrt(rng.uniform(size=(n_particles, atoms)))
    t = rng.uniform(0, 2 * np.pi, size=(n_particles, atoms))
    iy = (centres[:, :1] + r * np.sin(t)).astype(int).ravel() % ny
    ix = (centres[:, 1:] + r * np.cos(t)).astype(int).ravel() % nx
    density = np.zeros(shape)
    np.add.at(density, (iy, ix), 1.0)
    lam = _wavelength_A(voltage_kV)
    dz = 0.5 * (defocus_u_A + defocus_v_A) + 0.5 * (defocus_u_A - defocus_v_A) * np.cos(
        2 * (np.arctan2(fy, fx) - math.radians(angle_deg)))
    gamma = (math.pi * lam * dz * s2 - 0.5 * math.pi * cs_mm * 1e7 * lam ** 3 * s2 * s2
             + math.radians(phase_shift_deg))
    w = amplitude_contrast
    ctf = -(math.sqrt(1 - w * w) * np.sin(gamma) + w * np.cos(gamma))
    spectrum = np.fft.rfft2(density) * np.exp(-2 * math.pi ** 2 * s2) * ctf * np.exp(-bfactor_A2 * s2 / 4)
    spectrum[0, 0] = 0.0
    signal = np.fft.irfft2(spectrum, s=shape)
    counts = dose_e_per_A2 * pixel_size_A ** 2
    image = counts * (1.0 + contrast * signal / signal.std())
    return (image + rng.standard_normal(shape) * np.sqrt(np.clip(image, 0, None))).astype(np.float32)


def _field_set(folder, n, seed, astigmatism_A=(0.0, 0.0), phase_range_deg=None, contrast=(0.03, 0.03),
               pixel_size_A=1.0, side=1024, **kw):
    """``n`` micrographs (mean defocus 0.8–2.5 µm, random angle, U − V and contrast uniform in the ranges given)
    written to ``folder``; entries and truth."""
    rng = np.random.default_rng(seed)
    entries, truth = [], []
    for i in range(n):
        z, ang = rng.uniform(8000, 25000), rng.uniform(0, 180)
        phase = rng.uniform(*phase_range_deg) if phase_range_deg else 0.0
        astig, con = rng.uniform(*astigmatism_A), rng.uniform(*contrast)
        u, v = z + astig / 2, z - astig / 2
        path = str(folder / ("f%d_%02d.mrc" % (seed, i)))
        write_mrc(path, particle_field((side, side), pixel_size_A, u, v, ang, seed=seed * 100 + i,
                                       phase_shift_deg=phase, contrast=con, **kw), pixel_size_A)
        entries.append(predict.MicrographEntry(path, pixel_size_A, 300.0, 2.7, 0.07))
        truth.append(dict(u=u, v=v, angle=ang, phase=phase))
    return entries, truth


@pytest.fixture(scope="module")
def cnn():
    return model_mod.load_model()[0]


def test_no_astigmatism_inflation_on_weak_rings(tmp_path, cnn):
    """Round truth, weak rings (figure of merit ~0.07): the mean fitted U − V is within 50 Å of 0 (it was
    292 Å before the fit chose between a round and an astigmatic model)."""
    entries, truth = _field_set(tmp_path, 10, seed=1)
    results = predict.estimate_batch(entries, cnn)
    astig = np.array([r["defocus_u_A"] - r["defocus_v_A"] for r in results])
    assert abs(astig.mean()) <= 50.0, "mean U - V %.0f Å on round truth" % astig.mean()
    mean_err = np.array([0.5 * (r["defocus_u_A"] + r["defocus_v_A"]) - 0.5 * (t["u"] + t["v"])
                         for r, t in zip(results, truth)])
    assert np.abs(mean_err).max() < 500.0


def test_astigmatism_still_fitted_on_weak_rings(tmp_path, cnn):
    """Truth U − V = 1500 Å on the same weak rings: every micrograph keeps its astigmatism (the model choice
    does not round it off), the mean error of U − V is within 150 Å, the angle within 10° (median). (The
    U − V of single micrographs scatters by ~250 Å at this signal; 800 Å is not always told from round.)"""
    entries, truth = _field_set(tmp_path, 8, seed=2, astigmatism_A=(1500.0, 1500.0))
    results = predict.estimate_batch(entries, cnn)
    err = np.array([r["defocus_u_A"] - r["defocus_v_A"] - 1500.0 for r in results])
    assert (err > -1000).all() and abs(err.mean()) <= 150.0, err
    ang = np.array([abs((r["defocus_angle_deg"] - t["angle"] + 90) % 180 - 90) for r, t in zip(results, truth)])
    assert np.median(ang) < 10.0, ang


def test_defocus_sigma_is_calibrated(tmp_path, cnn):
    """The standard error σ of the mean defocus (from the fit's curvature) covers the error: |error| <= 2σ for
    at least 90 % of weak-ring micrographs (contrast 2.5–5 %, U − V 0–1000 Å), and σ is larger where the rings
    are weaker."""
    entries, truth = _field_set(tmp_path, 40, seed=21, astigmatism_A=(0.0, 1000.0), contrast=(0.025, 0.05))
    results = predict.estimate_batch(entries, cnn)
    err = np.array([0.5 * (r["defocus_u_A"] + r["defocus_v_A"] - t["u"] - t["v"]) for r, t in zip(results, truth)])
    sigma = np.array([r["defocus_sigma_A"] for r in results])
    assert np.all(sigma > 0)
    assert np.mean(np.abs(err) <= 2 * sigma) >= 0.9, (err, sigma)
    fom = np.array([r["figure_of_merit"] for r in results])
    assert np.corrcoef(fom, sigma)[0, 1] < -0.3


def test_defocus_sigma_covers_a_wrong_amplitude_contrast(tmp_path, cnn):
    """The amplitude contrast is given, not fitted, and a specimen's effective one differs from it (non-linear
    scattering of a particle field acts as a few degrees of extra phase): rendered with w = 0.12 (2.9° more
    phase than the w = 0.07 given to the fit), on strong rings, the fit's mean defocus is biased (positive: more
    phase looks like more defocus), and σ, which includes ``dz/dφ · 2°`` (fit.AMPLITUDE_PHASE_SIGMA_DEG), still
    covers the error for >= 90 % of the micrographs (4 of 12 with the statistical σ alone, before)."""
    entries, truth = _field_set(tmp_path, 12, seed=31, astigmatism_A=(0.0, 1000.0), contrast=(0.1, 0.15),
                                amplitude_contrast=0.12)
    results = predict.estimate_batch(entries, cnn)
    err = np.array([0.5 * (r["defocus_u_A"] + r["defocus_v_A"] - t["u"] - t["v"]) for r, t in zip(results, truth)])
    sigma = np.array([r["defocus_sigma_A"] for r in results])
    assert np.mean(err) > 10.0, err
    assert np.mean(np.abs(err) <= 2 * sigma) >= 0.9, (err, sigma)


def test_phase_shift_of_phase_plate_micrographs(tmp_path, cnn):
    """Volta phase plate, truth 0–180°: the fitted phase shift is within 10° of the truth (modulo 180°, as
    CTF² is) for 7 of 8 micrographs, median within 5°; the defocus of those within 300 Å. (Measured: one
    micrograph of the 8 lands 44° off, in the basin where phase and defocus trade off at low resolution.)"""
    entries, truth = _field_set(tmp_path, 8, seed=4, phase_range_deg=(0.0, 180.0), contrast=(0.08, 0.08))
    results = predict.estimate_batch(entries, cnn, fit_phase=True)
    err = np.array([abs((r["phase_shift_deg"] - t["phase"] + 90) % 180 - 90) for r, t in zip(results, truth)])
    assert np.sum(err < 10.0) >= 7 and np.median(err) < 5.0, (err, [t["phase"] for t in truth])
    dz = np.array([0.5 * (r["defocus_u_A"] + r["defocus_v_A"] - t["u"] - t["v"]) for r, t in zip(results, truth)])
    assert np.abs(dz[err < 10.0]).max() < 300.0, dz


def test_defocus_range_options(tmp_path, capsys, cnn):
    """--defocus-min/--defocus-max: a range that excludes the CNN's guess clips it, and the fit stays in the
    range's reach; min >= max is one clear error; the STAR carries dcDefocusSigma."""
    from deepcryo.core.star import read_star
    from deepcryo.defocus.__main__ import main
    entries, truth = _field_set(tmp_path, 1, seed=5, contrast=(0.1, 0.1))
    results = predict.estimate_batch(entries, cnn, defocus_range_A=(500.0, 0.5 * truth[0]["u"]))
    assert results[0]["cnn_u_A"] <= 0.5 * truth[0]["u"] and results[0]["defocus_u_A"] < 0.8 * truth[0]["u"]
    out = str(tmp_path / "ctf.star")
    common = ["predict", "--micrographs", entries[0].path, "--pixel-size", "1", "--voltage", "300", "--cs", "2.7",
              "--amplitude-contrast", "0.07", "--output", out]
    assert main(common + ["--defocus-min", "20000", "--defocus-max", "10000"]) == 2
    assert "--defocus-min < --defocus-max" in capsys.readouterr().err
    assert main(common + ["--defocus-min", "2000", "--defocus-max", "40000"]) == 0
    row = read_star(out)["micrographs"]
    assert abs(float(row["rlnDefocusU"][0]) - truth[0]["u"]) < 200 and float(row["dcDefocusSigma"][0]) > 0


def test_rotational_average_file(tmp_path, cnn):
    """The ``_avrot.txt`` of an astigmatic micrograph (U − V = 1500 Å): 6 rows (CTFFIND's layout); in the fit
    band the astigmatism-corrected average (row 3) follows the fitted CTF² (row 4) closely and better than the
    plain rotational average (row 2), whose rings astigmatism washes out; the windowed correlation (row 5)
    is above its 2σ noise level (row 6) over most of the band."""
    entries, truth = _field_set(tmp_path, 1, seed=6, astigmatism_A=(1500.0, 1500.0), contrast=(0.1, 0.1))
    (result,) = predict.estimate_batch(entries, cnn, psd_dir=str(tmp_path))
    rows = np.loadtxt(result["avrot"])
    assert rows.shape == (6, predict.FIT_SIZE_PX // 2)
    band = (rows[0] > 1 / 30.0) & (rows[0] < 1 / 5.0)
    epa = np.corrcoef(rows[2][band], rows[3][band])[0, 1]
    plain = np.corrcoef(rows[1][band], rows[3][band])[0, 1]
    assert epa > 0.8 and epa > plain + 0.1, (epa, plain)
    assert np.mean(rows[4][band] > rows[5][band]) > 0.8


def test_band_wizard_conversions_and_preview(tmp_path):
    """The band wizard's Å ↔ cycles/px round trip, and its PSD preview (deepcryo's PSD over the micrograph's
    Nyquist): the first Thon ring's radius in the preview is where the truth puts it."""
    from deepcryo.wizards import band_to_frequencies, frequencies_to_band, preview_images
    assert frequencies_to_band(*band_to_frequencies(30.0, 5.0, 1.3), 1.3) == (30.0, 5.0)
    assert band_to_frequencies(30.0, 1.0, 1.3)[1] == 0.5  # beyond Nyquist: clipped
    entries, truth = _field_set(tmp_path, 1, seed=8, contrast=(0.15, 0.15))
    mic, psd = preview_images(entries[0].path, 1.0, 256)
    assert mic.shape == (256, 256) and psd.shape == (256, 256)
    yy, xx = np.mgrid[:256, :256] - 128
    r = np.hypot(xx, yy)
    profile = np.array([psd[(r >= k - 0.5) & (r < k + 0.5)].mean() for k in range(4, 60)])
    lam = _wavelength_A(300.0)
    first_peak_px = math.sqrt(0.5 / (lam * truth[0]["u"])) * 256  # γ ≈ π/2: the first maximum of CTF²
    assert abs(4 + int(np.argmax(profile[: int(first_peak_px * 1.4)])) - first_peak_px) < 3
