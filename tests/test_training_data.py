"""deepcryo.defocus.training_data: the drawn parameters land in the simulated PSDs, the PSD simulation agrees with
compute_psd of a real-space micrograph, and every option is reachable from ``python -m deepcryo.defocus train``."""
import argparse
import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from deepcryo.core import ctf as ctf_mod
from deepcryo.core import fourier
from deepcryo.core.errors import InputError
from deepcryo.defocus import training_data as td
from deepcryo.defocus.commands import train as train_cmd
from deepcryo.defocus.psd import compute_psd

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _clean(**over):
    """Parameters of a clean micrograph (strong rings) with ``over`` replaced."""
    prm = td.draw_parameters(np.random.default_rng(0), td.Ranges(image_models=("ice_carbon",),
                                                                 detectors=("counting",)))
    prm.update(height_px=4096, width_px=4096, pixel_size_A=1.0, voltage_kV=300.0, cs_mm=2.7,
               amplitude_contrast=0.07, phase_shift_deg=0.0, bfactor_A2=30.0, dose_e_per_A2=60.0, contrast=0.12,
               drift_A=0.0, vibration_A=0.0, coloured_noise=0.0, background=0.0, texture_strength=1.5)
    prm.update(over)
    return prm


def _ctf2_on_channel(prm, sampling_A, u, v, angle, size=128):
    grid = fourier.freq_grid_2d(size).reshape(-1, 2) / sampling_A
    gamma = ctf_mod.ctf_phase_from_freqs(grid, u, v, angle, prm["voltage_kV"], prm["cs_mm"],
                                         prm["amplitude_contrast"], prm["phase_shift_deg"])
    return torch.sin(gamma).reshape(-1, size, size) ** 2


def _corr(psd, models):
    r = fourier.radius_grid_2d(psd.shape[-1])
    band = (r > 8) & (r < 60) & (psd != 0)
    x = psd[band] - psd[band].mean()
    m = models[:, band] - models[:, band].mean(dim=1, keepdim=True)
    return (m @ x) / (m.norm(dim=1) * x.norm())


@pytest.mark.parametrize("model", td.IMAGE_MODELS)
def test_ring_positions_match_the_drawn_defocus(model):
    """A scan of mean defocus and angle against CTF² peaks at the drawn values (2 Å/px channel)."""
    over = {"image_model": model, "defocus_u_A": 21000.0, "defocus_v_A": 19000.0, "defocus_angle_deg": 35.0}
    if model == "particles":
        over.update(contrast=0.03, particle_diameter_A=150.0, texture_strength=0.1)
    prm = _clean(**over)
    psd = td.simulate_psd(prm, torch.Generator().manual_seed(1))[1]
    means = torch.linspace(18000.0, 22000.0, 81)
    scores = _corr(psd, torch.cat([_ctf2_on_channel(prm, 2.0, z + 1000.0, z - 1000.0, 35.0) for z in means]))
    assert abs(float(means[scores.argmax()]) - 20000.0) <= 100.0
    angles = torch.arange(0.0, 180.0, 5.0)
    scores = _corr(psd, torch.cat([_ctf2_on_channel(prm, 2.0, 21000.0, 19000.0, a) for a in angles]))
    assert float(angles[scores.argmax()]) == 35.0
    # and the swapped astigmatism (U along 125°) is clearly worse: the angle is in the image, not only |U − V|
    assert float(scores.max()) > float(scores[angles == 125.0]) + 0.1


def _minimum_radius_invA(psd, sampling_A, near_invA):
    """Radius (1/Å) of the radial average's minimum within ±25 % of ``near_invA`` (parabolic interpolation)."""
    prof = fourier.radial_average(psd[None])[0].numpy()
    step = 1.0 / (psd.shape[-1] * sampling_A)
    lo, hi = int(0.75 * near_invA / step), int(math.ceil(1.25 * near_invA / step))
    i = lo + int(np.argmin(prof[lo:hi + 1]))
    a, b, c = prof[i - 1], prof[i], prof[i + 1]
    return (i + 0.5 * (a - c) / (a - 2 * b + c)) * step


@pytest.mark.parametrize("phase_deg", [0.0, 60.0, 120.0])
def test_phase_shift_moves_the_first_zero_as_the_ctf_formula_says(phase_deg):
    """CTF = sin γ, γ = π λ Δf s² − π/2 Cs λ³ s⁴ + atan(w/√(1−w²)) + φ: the first zero is at γ = π (without the
    shift it would be 2-4 pixels further out, outside the tolerance)."""
    prm = _clean(defocus_u_A=20000.0, defocus_v_A=20000.0, phase_shift_deg=phase_deg, bfactor_A2=10.0)
    psd = td.simulate_psd(prm, torch.Generator().manual_seed(2), samplings_A=(3.0,))[0]
    lam = float(ctf_mod.wavelength_A(300.0))
    offset = math.atan(0.07 / math.sqrt(1 - 0.07 ** 2)) + math.radians(phase_deg)
    s = np.linspace(0.005, 0.08, 20001)
    gamma = math.pi * lam * 20000.0 * s ** 2 - 0.5 * math.pi * 2.7e7 * lam ** 3 * s ** 4 + offset
    expected = s[np.argmax(gamma >= math.pi)]
    assert abs(_minimum_radius_invA(psd, 3.0, expected) - expected) <= 0.5 / (128 * 3.0)  # half a pixel


def test_simulated_psd_is_compute_psd_of_a_micrograph_of_the_same_model():
    """The PSD simulation and compute_psd of a real-space micrograph of the same spectrum agree as well as two
    micrographs do with each other (same parameters, different noise): neither better (the speckle of the tile
    average would be missing: the correlation with the expectation is the square root of this one) nor worse."""
    prm = _clean(height_px=1024, width_px=1024, pixel_size_A=2.0, image_model="particles", contrast=0.2,
                 bfactor_A2=10.0, particle_diameter_A=200.0, drift_A=6.0, detector="integrating")
    gen = torch.Generator().manual_seed(3)
    sim = td.simulate_psd(prm, gen)
    real = [compute_psd(td.realise_micrograph(prm, gen), 2.0)[0] for _ in range(2)]

    def corr(a, b):
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    for c in range(3):
        between = corr(real[0][c], real[1][c])
        assert between > 0.5
        assert abs(corr(sim[c], real[0][c]) - between) < 0.08
        assert abs(float(sim[c].std()) - float(real[0][c].std())) < 0.05


def test_drawn_parameters_respect_the_ranges():
    rng = np.random.default_rng(4)
    ranges = td.Ranges(defocus_range_A=(3000.0, 4000.0), astigmatism_max_A=500.0, phase_plate_fraction=0.0,
                       sizes_px=((5760, 4092),), pixel_size_range_A=(0.8, 0.9), voltages_kV=(120.0,))
    for _ in range(50):
        p = td.draw_parameters(rng, ranges)
        assert 3000.0 <= 0.5 * (p["defocus_u_A"] + p["defocus_v_A"]) <= 4000.0
        assert 0.0 <= p["defocus_u_A"] - p["defocus_v_A"] <= 500.0 and p["phase_shift_deg"] == 0.0
        assert (p["height_px"], p["width_px"]) == (5760, 4092) and 0.8 <= p["pixel_size_A"] <= 0.9
        assert p["voltage_kV"] == 120.0
    # the Welch layout of a non-square micrograph is the one compute_psd uses (tile on the short side)
    assert td.welch_layout(5760, 4092, 0.5, 3.0)[0] == 768
    with pytest.raises(InputError):
        td.training_arrays(4, ranges=td.Ranges(image_models=("nope",)))


def test_training_arrays_do_not_depend_on_the_number_of_processes():
    a = td.training_arrays(6, seed=5, workers=1, chunk=3)
    b = td.training_arrays(6, seed=5, workers=2, chunk=3)
    assert a["psd"].shape == (6, 3, 128, 128) and a["psd"].dtype == np.float16
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def _parser():
    parser = argparse.ArgumentParser()
    train_cmd.add_args(parser)
    return parser


def test_every_simulation_option_is_a_flag_and_reaches_the_ranges():
    fields = {f.name for f in dataclasses.fields(td.Ranges)}
    assert set(train_cmd._RANGE_OPTIONS.values()) == fields  # no range without a flag, no flag without a range
    args = _parser().parse_args([
        "--output", "x.pt", "--simulate", "8", "--image-models", "particles", "--detectors", "integrating",
        "--micrograph-sizes", "5760x4092", "2048", "--pixel-size-range", "0.6", "0.7", "--voltages", "200",
        "--cs-values", "2.7", "0.01", "--defocus-range", "2500", "9000", "--astigmatism-max", "700",
        "--phase-plate-fraction", "0.5", "--phase-shift-range", "10", "170", "--bfactor-range", "30", "40",
        "--dose-range", "20", "30", "--drift-max", "4", "--vibration-max", "1", "--coloured-noise-max", "0.5"])
    r = train_cmd.simulation_ranges(args)
    assert r == td.Ranges(image_models=("particles",), detectors=("integrating",),
                          sizes_px=((5760, 4092), (2048, 2048)), pixel_size_range_A=(0.6, 0.7),
                          voltages_kV=(200.0,), cs_values_mm=(2.7, 0.01), defocus_range_A=(2500.0, 9000.0),
                          astigmatism_max_A=700.0, phase_plate_fraction=0.5, phase_shift_range_deg=(10.0, 170.0),
                          bfactor_range_A2=(30.0, 40.0), dose_range_e_per_A2=(20.0, 30.0), drift_max_A=4.0,
                          vibration_max_A=1.0, coloured_noise_max=0.5)
    assert train_cmd.simulation_ranges(_parser().parse_args(["--output", "x.pt"])) == td.Ranges()


def test_options_of_the_other_simulator_are_refused(tmp_path):
    for extra in (["--simulator", "micrographs", "--drift-max", "3"], ["--simulator", "micrographs", "--workers", "2"],
                  ["--sim-size", "256"], ["--defocus-range", "100", "200"]):
        args = _parser().parse_args(["--output", str(tmp_path / "x.pt"), "--simulate", "8"] + extra)
        with pytest.raises(InputError):
            train_cmd.main(args)
    assert not os.path.exists(tmp_path / "x.pt")


def test_retraining_needs_neither_mrcfile_nor_emtable_nor_scipion(tmp_path):
    """The GPU machine of the retraining has torch, numpy and scipy only: train from simulations there."""
    blocker = tmp_path / "block.py"
    blocker.write_text(
        "import runpy, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('mrcfile', 'emtable', 'pyworkflow', 'pwem', 'faiss'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.argv = ['deepcryo.defocus'] + sys.argv[1:]\n"
        "runpy.run_module('deepcryo.defocus', run_name='__main__')\n")
    out = tmp_path / "m.pt"
    proc = subprocess.run([sys.executable, str(blocker), "train", "--simulate", "12", "--epochs", "1",
                           "--batch-size", "4", "--init", "shipped", "--output", str(out),
                           "--report", str(tmp_path / "r.json"), "--micrograph-sizes", "4096"],
                          cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.exists() and (tmp_path / "r.json").exists()
