"""Specimen tilt and ice thickness (CTFFIND5-style, deepcryo.defocus.tilt / .thickness) against the ground truth
of simulated micrographs (2048² at 1.5 Å/px, 300 kV), the predict program's STAR columns and their Scipion
CTFModel attributes."""

import numpy as np
import pytest
import torch

from deepcryo.core.micrographs import simulate_micrograph
from deepcryo.core.mrc import write_mrc
from deepcryo.core.star import read_star
from deepcryo.defocus import fit, thickness, tilt
from deepcryo.defocus.__main__ import main
from deepcryo.defocus.psd import compute_psd
from deepcryo.defocus.predict import fit_sampling_A

torch.set_num_threads(2)

PX, SIZE, KV, CS, AMP = 1.5, 2048, 300.0, 2.7, 0.07
ACQ = ["--pixel-size", str(PX), "--voltage", "300", "--cs", "2.7", "--amplitude-contrast", "0.07"]


def _simulate(seed, **extra):
    img, _ = simulate_micrograph(SIZE, pixel_size_A=PX, defocus_u_A=10500.0, defocus_v_A=9500.0, defocus_angle_deg=30.0,
                                 seed=seed, layer_step_A=100.0, **extra)
    return img


@pytest.fixture(scope="module")
def flat():
    return _simulate(21)


@pytest.fixture(scope="module")
def tilted():
    # an axis in (180, 360): a sign error in x or y, or swapped axes, moves it by 180 or mirrors it
    return _simulate(22, tilt_angle_deg=30.0, tilt_axis_deg=235.0)


@pytest.fixture(scope="module")
def thick():
    # 1200 Å: first node at 4.4 Å, the inverted lobe well inside the band (to 3.3 Å); at 800 Å the lobe's rings
    # are 1.7 standard errors here, too weak to tell a node from rings fading into the noise
    return _simulate(23, ice_thickness_A=1200.0)


def _fitted(img, high_A=5.0):
    samp = fit_sampling_A(PX, high_A)
    psd = compute_psd(torch.as_tensor(img), PX, (samp,), 384)[:, 0]
    return samp, fit.refine_ctf(psd, samp, 10000.0, 10000.0, 0.0, KV, CS, AMP, high_A=high_A)


def _tilt(img):
    samp, res = _fitted(img)
    tiles, centres = tilt.tile_psds(torch.as_tensor(img), PX, samp)
    return tilt.fit_tilt(tiles, centres, samp, float(res._z), float(res._ax), float(res._ay), float(res._phase),
                         KV, CS, AMP)


def _thickness(img, gradient=None):
    _, res = _fitted(img)  # the defocus on the usual band (to 5 Å), the thickness to 3.3 Å
    psd = compute_psd(torch.as_tensor(img), PX, (PX,), 384)[:, 0]
    end = thickness.thickness_band_end_A(PX, float(res.defocus_u_A), KV, 384)
    acq = [torch.tensor([v]) for v in (KV, CS, AMP)]
    spread = None if gradient is None else thickness.tilt_defocus_spread(gradient, SIZE * PX, SIZE * PX)
    t, _ = thickness.fit_thickness(psd, PX, res, acq, high_A=end, defocus_spread=spread)
    return float(t)


def _axis_error(a, b):
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


# ------------------------------------------------------------------------------------------- simulation
def test_simulator_defaults_unchanged():
    """The defaults (no tilt, no thickness) give the image of earlier versions: its 64-px block means and eight
    pixels to 1e-3 (the image's std is 11.9), read off the image whose bytes this test pinned by a hash until
    then. Not the hash: torch's FFTs (MKL) round differently on different CPUs (up to 3e-5 between MKL's AVX2 and
    AVX-512 paths on one machine), while any change to the simulator's model moves these values by far more."""
    img, truth = simulate_micrograph(size_px=256, pixel_size_A=1.5, seed=3)
    blocks = np.asarray(img, dtype=np.float64).reshape(4, 64, 4, 64).mean((1, 3))
    np.testing.assert_allclose(blocks, [[90.0362, 90.1567, 90.0735, 89.8012], [90.1600, 90.4738, 90.1763, 89.5523],
                                        [90.1737, 89.9094, 90.2111, 90.0161], [90.1094, 90.1186, 89.9222, 89.6595]],
                               atol=1e-3)
    pixels = [img[i, j] for i, j in ((0, 0), (17, 200), (64, 31), (100, 100), (128, 255), (199, 7), (230, 140),
                                     (255, 255))]
    np.testing.assert_allclose(pixels, [82.447, 79.0311, 74.664, 101.2943, 97.8641, 86.4152, 95.2714, 89.7382],
                               atol=1e-3)
    assert "tilt_angle_deg" not in truth
    _, truth = simulate_micrograph(size_px=64, seed=3, tilt_angle_deg=10.0, tilt_axis_deg=-30.0, ice_thickness_A=60.0)
    assert (truth["tilt_angle_deg"], truth["tilt_axis_deg"], truth["ice_thickness_A"]) == (10.0, 330.0, 60.0)


def test_tilt_conventions_round_trip():
    for angle, axis in ((30.0, 235.0), (5.0, 10.0), (60.0, 300.0)):
        back = tilt.tilt_from_gradient(*tilt.gradient_from_tilt(angle, axis))
        assert np.allclose(back, (angle, axis))
    # the defocus grows along (sin axis, cos axis): axis 90 = towards +x, axis 0 = towards +y
    assert np.allclose(tilt.gradient_from_tilt(45.0, 90.0), (1.0, 0.0)) and \
        np.allclose(tilt.gradient_from_tilt(45.0, 0.0), (0.0, 1.0))


# ------------------------------------------------------------------------------------------------- tilt
def test_no_tilt_gives_angle_near_zero(flat):
    out = _tilt(flat)
    assert out["tiles"] == 16 and out["tilt_angle_deg"] <= 1.5


def test_tilt_angle_and_axis(tilted):
    out = _tilt(tilted)
    assert abs(out["tilt_angle_deg"] - 30.0) <= 3.0
    assert _axis_error(out["tilt_axis_deg"], 235.0) <= 10.0


def test_plane_fit_leaves_out_a_wrong_basin():
    rng = np.random.default_rng(0)
    x, y = (a.ravel() for a in np.meshgrid(np.arange(4) * 768.0, np.arange(4) * 768.0))
    z = 12000.0 + 0.2 * x - 0.1 * y + rng.normal(0, 5.0, x.size)
    z[5] += 3000.0  # a tile in a wrong Thon-ring basin
    coef, keep = tilt.fit_plane(x, y, z, np.full(x.size, 5.0))
    assert not keep[5] and keep.sum() == 15 and np.allclose(coef[1:], (0.2, -0.1), atol=0.01)


def test_tilt_needs_two_by_two_tiles():
    with pytest.raises(Exception, match="too small for a tilt fit"):
        tilt.tile_psds(torch.zeros(1000, 2048), PX, 2.0)


# -------------------------------------------------------------------------------------------- thickness
def test_slab_model_is_the_average_over_the_slab():
    """½[1 − sinc(πλs²t) cos 2γ] equals the mean of sin²(γ + πλs²z) over z in [−t/2, t/2]."""
    lam, t = 0.0197, 800.0
    s2 = torch.linspace(0.0, 0.1, 50, dtype=torch.float64)
    gamma = 3.0 + 50.0 * s2
    z = torch.linspace(-t / 2, t / 2, 20001, dtype=torch.float64)[:, None]
    mean = (torch.sin(gamma + torch.pi * lam * s2 * z) ** 2).mean(dim=0)
    assert torch.allclose(thickness.slab_ctf2(torch.cos(2 * gamma), s2, lam, t), mean, atol=1e-4)


def test_thickness_zero(flat):
    assert _thickness(flat) == 0.0


def test_thickness_1200(thick):
    assert abs(_thickness(thick) - 1200.0) <= 240.0


def test_fading_rings_are_not_a_node():
    """A thin specimen whose rings fade into the noise inside the band (B = 250 Å²) reads 0: without the
    inverted-lobe test the slab's main lobe fitted the fading as ~950 Å."""
    img, _ = simulate_micrograph(SIZE, pixel_size_A=PX, defocus_u_A=10500.0, defocus_v_A=9500.0, seed=1,
                                 bfactor_A2=250.0)
    assert _thickness(img) == 0.0


def test_thin_tilted_specimen_is_not_thick(tilted):
    """The tilt's height range (±1100 Å here) averages the PSD over defocus as a slab would; with the fitted tilt
    the model carries that spread and the thin specimen reads 0 (without it: ~1500 Å)."""
    assert _thickness(tilted, _tilt(tilted)["defocus_gradient"]) == 0.0


# --------------------------------------------------------------------------------- program and Scipion
def test_predict_writes_tilt_and_thickness_columns(tmp_path, tilted, thick):
    write_mrc(str(tmp_path / "tilted.mrc"), tilted, PX)
    write_mrc(str(tmp_path / "thick.mrc"), thick, PX)
    out = str(tmp_path / "ctf.star")
    assert main(["predict", "--micrographs", str(tmp_path / "*.mrc"), *ACQ, "--output", out,
                 "--fit-tilt", "--fit-thickness"]) == 0
    rows = read_star(out)["micrographs"]
    names = [str(n).split("/")[-1] for n in rows["rlnMicrographName"]]
    i, j = names.index("tilted.mrc"), names.index("thick.mrc")
    assert abs(rows["dcCtfTiltAngle"][i] - 30.0) <= 3.0 and _axis_error(rows["dcCtfTiltAxis"][i], 235.0) <= 10.0
    assert rows["dcCtfTiltAngle"][j] <= 1.5
    assert abs(rows["rlnCtfIceThickness"][j] - 1200.0) <= 240.0 and 0 < rows["dcCtfIceThicknessMin"][j] < 1200.0

    # the columns become the CTFModel's attributes
    from pwem.objects import CTFModel
    from deepcryo import convert
    model = convert.ctfRowToModel(convert.readCtfStar(out)[j], CTFModel())
    for column, attr in convert.CTF_EXTRA_ATTRS.items():
        assert getattr(model, attr).get() == pytest.approx(rows[column][j], abs=1e-3)
    assert not hasattr(convert.ctfRowToModel({"rlnDefocusU": 1e4, "rlnDefocusV": 1e4, "rlnDefocusAngle": 0.0},
                                             CTFModel()), convert.CTF_THICKNESS_ATTR)


def test_predict_thick_slab_ends_the_defocus_band_before_its_node(tmp_path):
    """A 2000 Å slab, flat, the default 5 Å band: its first node (6.3 Å) lies inside the band. The thin fit read
    the defocus ~300 Å off and a false tilt of ~7° before the band was ended at the node automatically."""
    img, _ = simulate_micrograph(SIZE, pixel_size_A=PX, defocus_u_A=12200.0, defocus_v_A=11800.0,
                                 defocus_angle_deg=30.0, seed=5, layer_step_A=100.0, ice_thickness_A=2000.0)
    write_mrc(str(tmp_path / "slab.mrc"), img, PX)
    out = str(tmp_path / "ctf.star")
    assert main(["predict", "--micrographs", str(tmp_path / "slab.mrc"), *ACQ, "--output", out,
                 "--fit-tilt", "--fit-thickness"]) == 0
    row = {k: v[0] for k, v in read_star(out)["micrographs"].items()}
    assert abs(0.5 * (row["rlnDefocusU"] + row["rlnDefocusV"]) - 12000.0) <= 100.0
    assert abs(row["rlnCtfIceThickness"] - 2000.0) <= 400.0
    assert row["dcCtfTiltAngle"] <= 3.0


def test_predict_tilt_and_thickness_errors(tmp_path, capsys):
    img, _ = simulate_micrograph(512, pixel_size_A=PX, seed=1)
    write_mrc(str(tmp_path / "small.mrc"), img, PX)
    out = str(tmp_path / "ctf.star")
    assert main(["predict", "--micrographs", str(tmp_path / "small.mrc"), *ACQ, "--output", out, "--fit-tilt",
                 "--no-refine"]) == 2
    assert "drop --no-refine" in capsys.readouterr().err
    assert main(["predict", "--micrographs", str(tmp_path / "small.mrc"), *ACQ, "--output", out, "--fit-tilt"]) == 2
    err = capsys.readouterr().err
    assert "too small for a tilt fit" in err and len(err.strip().splitlines()) == 1
