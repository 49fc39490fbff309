"""Unit tests of deepcryo.defocus (CPU, small): ground truth from simulated micrographs."""
import os

import numpy as np
import pytest
import torch

from deepcryo.core import ctf as ctf_mod
from deepcryo.core.errors import InputError
from deepcryo.core.micrographs import random_micrograph_parameters, simulate_micrograph, simulate_micrograph_set
from deepcryo.core.mrc import write_mrc
from deepcryo.core.star import read_star
from deepcryo.defocus import fit, model as model_mod, predict, train
from deepcryo.defocus.__main__ import main
from deepcryo.defocus.psd import CNN_SAMPLINGS_A, CNN_SIZE_PX, compute_psd, compute_psds

torch.set_num_threads(2)


def _angle_error(a, b):
    d = np.abs(np.asarray(a) - np.asarray(b)) % 180.0
    return np.minimum(d, 180.0 - d)


# ------------------------------------------------------------------------------------------ simulation
def test_simulation_is_deterministic_and_standardised():
    a, ta = simulate_micrograph(256, defocus_u_A=10000, defocus_v_A=12000, defocus_angle_deg=10, seed=3)
    b, _ = simulate_micrograph(256, defocus_u_A=10000, defocus_v_A=12000, defocus_angle_deg=10, seed=3)
    c, _ = simulate_micrograph(256, defocus_u_A=10000, defocus_v_A=12000, defocus_angle_deg=10, seed=4)
    assert a.dtype == np.float32 and a.shape == (256, 256)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert (ta["defocus_u_A"], ta["defocus_v_A"], ta["defocus_angle_deg"]) == (12000.0, 10000.0, 100.0)


def test_simulated_set_star(tmp_path):
    star, truths = simulate_micrograph_set(2, str(tmp_path), size_px=128, seed=1)
    rows = read_star(star)["micrographs"]
    assert list(rows["rlnMicrographName"]) == ["mic_0000.mrc", "mic_0001.mrc"]
    assert np.allclose(rows["rlnDefocusU"], [t["defocus_u_A"] for t in truths], atol=1e-3)
    assert os.path.exists(tmp_path / "mic_0001.mrc")


# ------------------------------------------------------------------------------------------------- PSD
def test_psd_invariants():
    img, truth = simulate_micrograph(512, pixel_size_A=2.5, seed=2)
    p = compute_psd(img, 2.5)
    assert p.shape == (1, 3, CNN_SIZE_PX, CNN_SIZE_PX) and torch.isfinite(p).all()
    c = CNN_SIZE_PX // 2
    assert p[0, :, c, c].abs().max() == 0  # zero frequency masked
    # 1 Å/px channel: beyond the micrograph's Nyquist (1/5 Å⁻¹ → 25.6 px from the centre) is masked
    assert p[0, 0, c, c + 30:].abs().max() == 0 and p[0, 0, c, c + 20].abs() > 0
    # invariant to the intensity scale and offset (dose, gain), batched = single
    q = compute_psd(np.stack([img, 3.0 * img + 7.0]), 2.5)
    assert torch.allclose(q[0], p[0], atol=1e-3) and torch.allclose(q[1], p[0], atol=1e-3)


def test_psds_at_once_equal_separate_calls():
    img, _ = simulate_micrograph(600, pixel_size_A=1.3, seed=5)
    a, b = compute_psds(img, 1.3, [(CNN_SAMPLINGS_A, CNN_SIZE_PX), ((2.0,), 200)])
    assert torch.allclose(a, compute_psd(img, 1.3), atol=1e-5)
    assert torch.allclose(b, compute_psd(img, 1.3, (2.0,), 200), atol=1e-5) and b.shape == (1, 1, 200, 200)


def test_psd_rings_follow_the_ctf():
    img, t = simulate_micrograph(1024, pixel_size_A=1.0, defocus_u_A=16000, defocus_v_A=14000,
                                 defocus_angle_deg=30, seed=1)
    p = compute_psd(img, 1.0, (2.0,), 256)[0, 0]

    def corr(angle):
        m = ctf_mod.ctf_2d(256, 2.0, 16000, 14000, angle, 300, 2.7, 0.07)[0] ** 2
        band = (p != 0)
        x, y = p[band] - p[band].mean(), m[band] - m[band].mean()
        return float(x @ y / x.norm() / y.norm())
    assert corr(30) > 0.2 and corr(30) > corr(120) + 0.1


def test_psd_bad_inputs():
    with pytest.raises(InputError, match="smaller than a PSD tile"):
        compute_psd(np.zeros((32, 32), np.float32), 1.0)
    bad = np.ones((128, 128), np.float32)
    bad[3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        compute_psd(bad, 1.0)
    with pytest.raises(InputError, match="pixel size"):
        compute_psd(np.ones((128, 128), np.float32), 0.0)


# ------------------------------------------------------------------------------------------ augmentation
@pytest.mark.parametrize("op", range(8))
def test_augmentation_transforms_the_angle(op):
    angle = 30.0
    psd = ctf_mod.ctf_2d(64, 2.0, 20000, 16000, angle, 300, 2.7, 0.1)[None] ** 2  # (1, 1, 64, 64)
    out, new_angle = train.augment(psd, torch.tensor([angle]), torch.tensor([op]))
    expected = ctf_mod.ctf_2d(64, 2.0, 20000, 16000, float(new_angle[0]), 300, 2.7, 0.1)[0] ** 2
    assert torch.allclose(out[0, 0, 1:, 1:], expected[1:, 1:], atol=1e-4)
    assert 0.0 <= float(new_angle[0]) < 180.0


# -------------------------------------------------------------------------------------- CNN and fit
def _simulated(n, size, seed, **ranges):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prm = random_micrograph_parameters(rng, **ranges)
        out.append(simulate_micrograph(size, seed=seed * 1000 + i, **prm))
    return out


def _write(tmp_path, sims):
    entries = []
    for i, (img, t) in enumerate(sims):
        path = str(tmp_path / ("m%02d.mrc" % i))
        write_mrc(path, img, t["pixel_size_A"])
        entries.append(predict.MicrographEntry(path, t["pixel_size_A"], t["voltage_kV"], t["cs_mm"],
                                               t["amplitude_contrast"]))
    return entries


def test_shipped_cnn_mae_at_most_470A():
    model, config = model_mod.load_model()
    sims = _simulated(24, 512, seed=77)
    psd = torch.cat([compute_psd(img, t["pixel_size_A"]) for img, t in sims])
    acq = model_mod.acquisition_features([t["voltage_kV"] for _, t in sims], [t["cs_mm"] for _, t in sims], len(sims))
    with torch.no_grad():
        u, v, _ = model_mod.decode(model(psd, acq))
    err = np.concatenate([np.abs(u.numpy() - [t["defocus_u_A"] for _, t in sims]),
                          np.abs(v.numpy() - [t["defocus_v_A"] for _, t in sims])])
    assert err.mean() <= 470.0, "CNN-only MAE %.0f Å" % err.mean()


def test_refined_accuracy_from_the_cnn(tmp_path):
    model, _ = model_mod.load_model()
    sims = _simulated(6, 1024, seed=5, pixel_size_range_A=(0.8, 2.0))
    results = predict.estimate_batch(_write(tmp_path, sims), model)
    truth_u = np.array([t["defocus_u_A"] for _, t in sims])
    truth_v = np.array([t["defocus_v_A"] for _, t in sims])
    u = np.array([r["defocus_u_A"] for r in results])
    v = np.array([r["defocus_v_A"] for r in results])
    mae = 0.5 * (np.abs(u - truth_u) + np.abs(v - truth_v)).mean()
    assert mae < 150.0, "refined MAE %.0f Å" % mae
    astig = truth_u - truth_v > 300
    ang = _angle_error([r["defocus_angle_deg"] for r in results], [t["defocus_angle_deg"] for _, t in sims])
    assert astig.any() and ang[astig].max() < 10.0
    assert all(0 < r["figure_of_merit"] <= 1 and r["resolution_A"] > 0 for r in results)


def _fit_psd(img, t):
    samp = predict.fit_sampling_A(t["pixel_size_A"], 5.0)
    return compute_psd(img, t["pixel_size_A"], (samp,), predict.FIT_SIZE_PX)[:, 0], samp


def test_refine_recovers_from_a_start_far_off():
    """A start 20 % (8000 Å) off at 4 µm is beyond ±5000 Å but inside the ±25 % scan: the right basin."""
    img, t = simulate_micrograph(1024, pixel_size_A=1.4, defocus_u_A=40600, defocus_v_A=39400,
                                 defocus_angle_deg=60, voltage_kV=300, seed=12)
    psd, samp = _fit_psd(img, t)
    acq = (t["voltage_kV"], t["cs_mm"], t["amplitude_contrast"])
    res = fit.refine_ctf(psd, samp, [48600.0], [47400.0], [20.0], *acq)
    assert abs(float(res.defocus_u_A[0]) - 40600) < 150 and abs(float(res.defocus_v_A[0]) - 39400) < 150
    assert bool(fit.disagreement_flag(torch.tensor([48600.0]), torch.tensor([47400.0]), res)[0])  # CNN was far


def test_fit_resolution_and_merit_follow_the_truth():
    """At the true CTF, the fit resolution is better for a sharper micrograph (lower B factor) and reaches near
    the PSD's Nyquist (4 Å); at a wrong defocus (1500 Å off) it collapses and the figure of merit falls."""
    out = {}
    for b in (20.0, 200.0):
        img, t = simulate_micrograph(1024, pixel_size_A=1.0, defocus_u_A=15500, defocus_v_A=14500,
                                     defocus_angle_deg=40, bfactor_A2=b, seed=4)
        psd, samp = _fit_psd(img, t)
        acq = (t["voltage_kV"], t["cs_mm"], t["amplitude_contrast"])
        right = fit.score_only(psd, samp, 15500, 14500, 40, *acq)
        wrong = fit.score_only(psd, samp, 17000, 16000, 40, *acq)
        out[b] = (float(right.resolution_A[0]), float(wrong.resolution_A[0]), float(right.figure_of_merit[0]),
                  float(wrong.figure_of_merit[0]))
    assert out[20.0][0] < 4.6 and out[20.0][0] < out[200.0][0]
    for res_right, res_wrong, fom_right, fom_wrong in out.values():
        assert res_wrong > 2 * res_right and fom_right > 0.1 > 0.05 > fom_wrong


def test_exhaustive_search_finds_the_truth():
    (img, t), = _simulated(1, 1024, seed=9, pixel_size_range_A=(1.0, 1.5), defocus_range_A=(8000.0, 20000.0))
    samp = predict.fit_sampling_A(t["pixel_size_A"], 5.0)
    psd = compute_psd(img, t["pixel_size_A"], (samp,), predict.FIT_SIZE_PX)[:, 0]
    res = fit.exhaustive_search(psd, samp, t["voltage_kV"], t["cs_mm"], t["amplitude_contrast"],
                                defocus_range_A=(3000.0, 25000.0))
    assert abs(float(res.defocus_u_A[0]) - t["defocus_u_A"]) < 150
    assert abs(float(res.defocus_v_A[0]) - t["defocus_v_A"]) < 150


def test_fit_internals_match_their_definitions():
    """The fit's fast forms equal their definitions: γ (one matrix product) equals the CTF phase written out,
    the analytic gradient of the band correlation equals autograd's, and the covariance's lag sums (FFT, box
    sums) equal the explicit sums over shifted copies."""
    torch.manual_seed(0)
    band = fit.BandPixels(64, 2.0, 30.0, 5.0)
    b, m = 2, band.index.numel()
    z, ax, ay, ph = (torch.tensor([15000.0, 8000.0]), torch.tensor([300.0, -100.0]), torch.tensor([-200.0, 50.0]),
                     torch.tensor([0.0, 0.5]))
    acq = [torch.full((b,), v) for v in (300.0, 2.7, 0.07)]
    lam = ctf_mod.wavelength_A(acq[0])[:, None]
    dz = z[:, None] + ax[:, None] * band.cos2 + ay[:, None] * band.sin2
    written = (torch.pi * lam * dz * band.s2 - 0.5 * torch.pi * 2.7e7 * lam ** 3 * band.s4
               + torch.atan(torch.tensor(0.07 / (1 - 0.07 ** 2) ** 0.5)) + ph[:, None])
    gam = fit._gamma(band, z, ax, ay, ph, *acq)
    assert torch.allclose(gam, written, atol=1e-4)
    data = fit._prep(torch.randn(b, m))
    jac = fit._gamma_jacobian(band, acq[0], True, True)
    theta = torch.zeros(b, 4, requires_grad=True)
    fit._corr(data, torch.sin(gam + (jac @ theta[..., None])[..., 0]) ** 2).sum().backward()
    assert torch.allclose(fit._corr_gradient(data, gam, jac), theta.grad, rtol=1e-3, atol=1e-7)
    resid, scores, lag = torch.randn(b, m), torch.randn(b, m, 3), 2
    img = torch.zeros(b, 64 * 64)
    img[:, band.index] = resid
    mask = torch.zeros(64 * 64)
    mask[band.index] = 1.0
    img, mask = img.reshape(b, 64, 64), mask.reshape(64, 64)
    simg = torch.zeros(b, 64 * 64, 3)
    simg[:, band.index] = scores
    simg = simg.reshape(b, 64, 64, 3)
    total, outer = torch.zeros(b), torch.zeros(b, 3, 3)
    for dy in range(-lag, lag + 1):
        for dx in range(-lag, lag + 1):
            count = (mask * torch.roll(mask, (dy, dx), (0, 1))).sum()
            total += (img * torch.roll(img, (dy, dx), (1, 2))).sum(dim=(1, 2)) / count
            outer += torch.einsum("byxi,byxj->bij", simg, torch.roll(simg, (dy, dx), (1, 2)))
    var0 = (img * img).sum(dim=(1, 2)) / mask.sum()
    assert torch.allclose(fit._residual_correlation(resid, band, lag), (total / var0).clamp(min=1.0), rtol=1e-4)
    assert torch.allclose(fit._score_outer(scores, band, lag), 0.5 * (outer + outer.transpose(1, 2)), rtol=1e-4,
                          atol=1e-3)


def test_defocus_sensitivity_to_the_fixed_phase():
    """``dz/dφ`` of :func:`fit.parameter_covariance` (first order, Gauss-Newton; σ's amplitude-contrast term) is
    the fit's own response: refitting with the amplitude contrast 0.07 → 0.10 (1.7° more phase) moves the mean
    defocus by −Δφ · dz/dφ within a factor 1.5 (a wrong sign, a missing projection of the per-shell nuisance or
    a missing s² in the Jacobian is off by far more; measured: −714 vs 900 Å/rad)."""
    img, t = simulate_micrograph(1024, pixel_size_A=1.0, defocus_u_A=20500, defocus_v_A=19500,
                                 defocus_angle_deg=30, bfactor_A2=60.0, amplitude_contrast=0.07, seed=5)
    psd, samp = _fit_psd(img, t)
    fits = {w: fit.refine_ctf(psd, samp, [20500.0], [19500.0], [30.0], t["voltage_kV"], t["cs_mm"], w)
            for w in (0.07, 0.10)}
    r = fits[0.07]
    acq = [torch.tensor([v]) for v in (t["voltage_kV"], t["cs_mm"], 0.07)]
    band = fit.BandPixels(psd.shape[-1], samp, 30.0, 5.0)
    _, _, dz_dphase = fit.parameter_covariance(psd, band, r._z, r._ax, r._ay, r._phase, acq, True, False)
    dphase = float(np.arctan(0.10 / np.sqrt(1 - 0.01)) - np.arctan(0.07 / np.sqrt(1 - 0.07 ** 2)))
    moved = float(fits[0.10]._z[0] - r._z[0]) / dphase
    assert float(dz_dphase[0]) > 0 and 1 / 1.5 < -moved / float(dz_dphase[0]) < 1.5, (moved, float(dz_dphase[0]))


def test_disagreement_flag():
    res = fit.FitResult(torch.tensor([10000.0, 10000.0]), torch.zeros(2), torch.zeros(2), torch.zeros(2),
                        torch.ones(2))
    flags = fit.disagreement_flag(torch.tensor([10200.0, 14000.0]), torch.tensor([10200.0, 14000.0]), res)
    assert flags.tolist() == [False, True]
    res.figure_of_merit = torch.tensor([0.01, 0.3])  # no rings: flagged even when CNN and fit agree
    flags = fit.disagreement_flag(torch.tensor([10200.0, 10200.0]), torch.tensor([10200.0, 10200.0]), res)
    assert flags.tolist() == [True, False]


# ---------------------------------------------------------------------------------------------- weights
def test_weight_files_are_checked(tmp_path):
    torch.save({"something": torch.zeros(2)}, str(tmp_path / "other.pt"))
    (tmp_path / "text.pt").write_text("not a model")
    for name in ("other.pt", "text.pt", "missing.pt"):
        with pytest.raises(InputError, match="not a deepcryo defocus model|not found"):
            model_mod.load_model(str(tmp_path / name))
    assert os.path.getsize(model_mod.SHIPPED_WEIGHTS) < 2e6
    # files written atomically get the mode open() would give (0644 with umask 022), not mkstemp's 0600
    model, config = model_mod.load_model()
    out = str(tmp_path / "copy.pt")
    old = os.umask(0o022)
    try:
        model_mod.save_model(out, model, config)
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o644


def test_train_resume_and_finetune(tmp_path):
    arrays = train.simulate_training_arrays(10, size_px=256, seed=3)
    out = str(tmp_path / "m.pt")
    s1 = train.train(arrays, out, epochs=1, batch_size=4)
    s2 = train.train(arrays, out, epochs=2, batch_size=4, resume=True)
    assert s1["epochs"] == 1 and s2["epochs"] == 2 and s1["n_val"] + s1["n_train"] == 10
    m, cfg = model_mod.load_model(out)
    assert cfg["arch"] == "rings"
    s3 = train.train(arrays, str(tmp_path / "ft.pt"), init_weights=model_mod.SHIPPED_WEIGHTS, epochs=1,
                     batch_size=4)
    assert np.isfinite(s3["best_val_mae_A"])


# ------------------------------------------------------------------------------------------------ program
def test_predict_program_skips_bad_micrographs(tmp_path, capsys):
    sims = _simulated(2, 512, seed=11, pixel_size_range_A=(1.0, 1.5), voltages_kV=(300.0,))
    for i, (img, t) in enumerate(sims):
        write_mrc(str(tmp_path / ("good%d.mrc" % i)), img, 1.2)
    bad = sims[0][0].copy()
    bad[0, 0] = np.nan
    write_mrc(str(tmp_path / "nan.mrc"), bad, 1.2)
    write_mrc(str(tmp_path / "tiny.mrc"), np.zeros((32, 32), np.float32), 1.2)
    (tmp_path / "broken.mrc").write_bytes(b"garbage")
    out = str(tmp_path / "ctf.star")
    rc = main(["predict", "--micrographs", str(tmp_path / "*.mrc"), "--pixel-size", "1.2", "--voltage", "300",
               "--cs", "2.7", "--amplitude-contrast", "0.07", "--output", out, "--batch-size", "3"])
    err = capsys.readouterr().err
    assert rc == 0 and err.count("skipped") == 3 and "NaN" in err and "smaller than a PSD tile" in err
    rows = read_star(out)["micrographs"]
    assert len(rows["rlnMicrographName"]) == 2
    for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfMaxResolution", "rlnCtfFigureOfMerit",
              "rlnCtfImage"):
        assert c in rows
    assert all(os.path.exists(p) for p in rows["rlnCtfImage"])


def test_predict_program_errors(tmp_path, capsys):
    img, _ = simulate_micrograph(256, seed=1)
    write_mrc(str(tmp_path / "a.mrc"), img, 1.0)
    write_mrc(str(tmp_path / "nopx.mrc"), img, 0.0)  # no --pixel-size and none in the header
    out = str(tmp_path / "ctf.star")
    assert main(["predict", "--micrographs", str(tmp_path / "nopx.mrc"), "--voltage", "300", "--cs", "2.7",
                 "--amplitude-contrast", "0.1", "--output", out]) == 2
    assert "missing pixel size" in capsys.readouterr().err and not os.path.exists(out)
    assert main(["predict", "--micrographs", str(tmp_path / "none*.mrc"), "--pixel-size", "1", "--output", out]) == 2
    assert "no micrograph matches" in capsys.readouterr().err
    (tmp_path / "x.pt").write_text("junk")
    assert main(["predict", "--micrographs", str(tmp_path / "a.mrc"), "--pixel-size", "1", "--voltage", "300",
                 "--cs", "2.7", "--amplitude-contrast", "0.1", "--output", out, "--model", str(tmp_path / "x.pt")]) == 2
    assert "not a deepcryo defocus model" in capsys.readouterr().err and not os.path.exists(out)
