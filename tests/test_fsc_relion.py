"""Resolution as RELION 3.1 reports it: the last shell above the threshold, and the masked FSC corrected by
phase randomisation as relion_postprocess does. The RELION-free tests check the conventions on hand-made
curves and on maps whose true FSC is known; the others run ``relion_postprocess`` (Debian package
``relion``) on the same half maps and mask, and are skipped where it is not installed."""
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from deepcryo.core import fourier, simulate
from deepcryo.core.fsc import (fsc, fsc_resolution_A, masked_fsc, randomization_shell, randomize_phases_beyond,
                               resolution_shell, shell_frequencies, solvent_corrected_fsc)
from deepcryo.core.mrc import read_mrc, write_mrc
from deepcryo.core.star import read_star

BOX, PIXEL_A = 64, 2.0
needs_relion = pytest.mark.skipif(shutil.which("relion_postprocess") is None,
                                  reason="RELION (relion_postprocess) not installed")


# ------------------------------------------------------------------------------------ RELION-free
def test_reported_resolution_is_the_last_shell_above_threshold():
    """RELION's postprocessing.cpp: global_resol = N·px / i for the last shell i before the first drop."""
    curve = np.linspace(1.0, 0.0, BOX // 2 + 1)          # shell k: 1 - k/32; 0.143 lies between 27 and 28
    assert resolution_shell(curve) == 27
    assert fsc_resolution_A(curve, PIXEL_A) == pytest.approx(BOX * PIXEL_A / 27, rel=1e-12)
    # the first drop counts, even if the curve rises above the threshold again
    dip = np.ones(BOX // 2 + 1)
    dip[10], dip[12] = 0.1, 0.01
    assert fsc_resolution_A(dip, PIXEL_A) == pytest.approx(BOX * PIXEL_A / 9, rel=1e-12)
    assert fsc_resolution_A(dip, PIXEL_A, 0.05) == pytest.approx(BOX * PIXEL_A / 11, rel=1e-12)
    # never below: Nyquist; below from shell 1 on: no resolution
    assert fsc_resolution_A(np.ones(BOX // 2 + 1), PIXEL_A) == pytest.approx(2 * PIXEL_A, rel=1e-12)
    assert fsc_resolution_A(np.r_[1.0, np.zeros(BOX // 2)], PIXEL_A) == math.inf
    # the shell of each reported resolution is a shell frequency
    assert 1.0 / fsc_resolution_A(curve, PIXEL_A) == pytest.approx(shell_frequencies(BOX, PIXEL_A)[27])


def test_phase_randomisation_keeps_amplitudes_and_the_inner_sphere():
    vol = torch.as_tensor(simulate.phantom_volume(32, seed=1), dtype=torch.float64)
    out = randomize_phases_beyond(vol, 6, torch.Generator().manual_seed(0))
    f, g = fourier.fft3c(vol), fourier.fft3c(out)
    r = fourier.radius_grid_3d(32, dtype=torch.float64)
    assert torch.allclose(g.abs(), f.abs(), rtol=1e-9, atol=1e-9 * f.abs().max())     # a real map, same amplitudes
    assert torch.allclose(g[r < 6], f[r < 6], rtol=1e-9, atol=1e-9 * f.abs().max())
    curve = fsc(vol, out)
    assert curve[:6].min() > 0.999 and np.abs(curve[8:]).max() < 0.3 and abs(curve[8:].mean()) < 0.05


def test_solvent_correction_formula_and_start_shell():
    masked = np.array([1.0, 0.99, 0.95, 0.9, 0.8, 0.6, 0.5, 0.4])
    rand = np.array([1.0, 0.99, 0.9, 0.7, 0.5, 0.2, 0.1, 0.0])
    out = solvent_corrected_fsc(masked, rand, 2)
    np.testing.assert_array_equal(out[:4], masked[:4])
    np.testing.assert_allclose(out[4:], (masked[4:] - rand[4:]) / (1 - rand[4:]))
    assert randomization_shell(np.array([1.0, 0.9, 0.85, 0.79, 0.9, 0.5])) == 3
    assert randomization_shell(np.ones(5)) is None
    with pytest.raises(ValueError, match="cubes of one shape"):
        masked_fsc(np.zeros((8, 8, 8)), np.zeros((8, 8, 8)), np.ones((6, 6, 6)))


def _tight_mask(vol, threshold, edge_px):
    """The phantom low-passed to 10 Å, thresholded, with a soft edge (a Gaussian of ``edge_px``, doubled and
    clipped to 1 so that the inside stays 1)."""
    r = fourier.radius_grid_3d(BOX, dtype=torch.float64)
    binary = torch.as_tensor(fourier.lowpass_volume(torch.as_tensor(vol), 10.0, PIXEL_A).numpy() > threshold,
                             dtype=torch.float64)
    blur = torch.exp(-0.5 * (r / (BOX / (2 * math.pi * edge_px))) ** 2)
    return np.clip(2 * fourier.ifft3c(fourier.fft3c(binary) * blur).real.numpy(), 0, 1)


def _halves_sharing_low_frequencies(seed):
    """Two maps equal (the phantom) up to shell 8 and independent noise beyond it (true FSC 0 there), with
    a tight mask cut from the phantom: the masked FSC sees the mask's own correlation beyond shell 8."""
    rng = np.random.default_rng(seed)
    vol = simulate.phantom_volume(BOX, seed=2)
    r = fourier.radius_grid_3d(BOX, dtype=torch.float64)
    low = fourier.fft3c(torch.as_tensor(vol, dtype=torch.float64)) * (r < 8.5)
    halves = []
    for _ in range(2):
        noise = fourier.fft3c(torch.as_tensor(rng.standard_normal((BOX,) * 3))) * (r >= 8.5) * 0.02
        halves.append(fourier.ifft3c(low + noise).real.numpy())
    return halves[0], halves[1], _tight_mask(vol, 0.1, 1.0)


def test_corrected_fsc_removes_the_mask_correlation():
    """Beyond shell 8 the halves share nothing: the masked FSC is inflated by the mask (about 0.5), the
    corrected one is about zero (the true FSC) from shell 11 on (randomisation from shell 9, correction two
    shells later, as RELION), so the reported resolution is near shell 10, not the masked curve's."""
    h1, h2, mask = _halves_sharing_low_frequencies(0)
    out = masked_fsc(h1, h2, mask, seed=0)
    assert out.mask_used and out.randomize_shell == 9
    beyond = slice(11, BOX // 2 + 1)
    assert out.masked[beyond].mean() > 0.4
    assert abs(out.corrected[beyond].mean()) < 0.05 and np.abs(out.corrected[beyond]).max() < 0.3
    assert resolution_shell(out.corrected) <= 12 and resolution_shell(out.masked) >= 20


def test_unmasked_curve_used_where_the_mask_does_not_help():
    h1, h2, _ = _halves_sharing_low_frequencies(1)
    # a mask in the solvent only: the masked maps are noise, the unmasked FSC reaches further
    solvent = np.zeros((BOX,) * 3)
    solvent[2:10, 2:10, 2:10] = 1.0
    out = masked_fsc(h1, h2, solvent, seed=0)
    assert not out.mask_used
    np.testing.assert_array_equal(out.corrected, out.unmasked)
    # halves that agree everywhere above 0.8: nothing to randomise, the unmasked curve is used
    same = masked_fsc(h1, h1 + 1e-3 * h1.std() * np.random.default_rng(2).standard_normal(h1.shape), solvent)
    assert same.randomize_shell is None and same.random_masked is None and not same.mask_used


# ------------------------------------------------------------------------------------ against RELION
def _write_postprocess_inputs(folder):
    """Half maps with a real fall-off (the phantom with a B-factor of 400 Å², plus independent white noise
    per half) and a tight soft mask (the 10 Å phantom thresholded at 10 %, half a pixel of soft edge): the
    phase-randomised FSC is about 0.3 at the resolution, so the correction moves it by several shells."""
    rng = np.random.default_rng(5)
    vol = simulate.phantom_volume(BOX, seed=3)
    r = fourier.radius_grid_3d(BOX, dtype=torch.float64)
    s = r / (BOX * PIXEL_A)
    signal = fourier.ifft3c(fourier.fft3c(torch.as_tensor(vol, dtype=torch.float64))
                            * torch.exp(-400.0 * s ** 2 / 4)).real.numpy()
    arrays = {"half1": signal + 0.1 * rng.standard_normal(signal.shape),
              "half2": signal + 0.1 * rng.standard_normal(signal.shape), "mask": _tight_mask(vol, 0.1, 0.5)}
    for name, a in arrays.items():
        write_mrc(os.path.join(folder, name + ".mrc"), a.astype(np.float32), PIXEL_A)
    return {name: read_mrc(os.path.join(folder, name + ".mrc"))[0] for name in arrays}


@needs_relion
def test_masked_resolution_and_curve_match_relion_postprocess(tmp_path):
    maps = _write_postprocess_inputs(str(tmp_path))
    os.makedirs(str(tmp_path / "pp"))
    subprocess.run(["relion_postprocess", "--i", "half1.mrc", "--i2", "half2.mrc", "--mask", "mask.mrc",
                    "--angpix", str(PIXEL_A), "--o", "pp/postprocess"], cwd=str(tmp_path), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    star = read_star(str(tmp_path / "pp" / "postprocess.star"))
    general, table = star["general"], star["fsc"]
    relion_A = float(np.ravel(general["rlnFinalResolution"])[0])
    col = {name: np.asarray(table[name], dtype=np.float64) for name in table}
    relion_shell = int(round(BOX * PIXEL_A / relion_A))

    # RELION's own convention: its reported number is the last shell of its corrected curve above 0.143
    assert fsc_resolution_A(col["rlnFourierShellCorrelationCorrected"], PIXEL_A) == pytest.approx(relion_A, abs=1e-4)
    np.testing.assert_allclose(col["rlnResolution"][1:], shell_frequencies(BOX, PIXEL_A)[1:], rtol=1e-4)

    ours = masked_fsc(maps["half1"], maps["half2"], maps["mask"], seed=0)
    assert ours.mask_used
    assert BOX * PIXEL_A / ours.randomize_shell == pytest.approx(float(np.ravel(general["rlnRandomiseFrom"])[0]),
                                                                  rel=1e-4)
    # the curves without random phases agree but for RELION's half-spectrum sums (module docstring)
    assert np.abs(ours.unmasked - col["rlnFourierShellCorrelationUnmaskedMaps"]).max() < 0.02
    assert np.abs(ours.masked - col["rlnFourierShellCorrelationMaskedMaps"]).max() < 0.02
    # the data exercise the correction: the plain masked FSC is optimistic by at least two shells
    assert resolution_shell(ours.masked) >= relion_shell + 2
    assert abs(resolution_shell(ours.corrected) - relion_shell) <= 1, \
        "ours %.2f Å, relion_postprocess %.2f Å" % (fsc_resolution_A(ours.corrected, PIXEL_A), relion_A)

    # the corrected curve: RELION's one draw of random phases against the mean of eight of ours, within five
    # standard deviations of one draw (measured on ours, per shell) plus 0.02 for the half-spectrum sums
    draws = np.stack([masked_fsc(maps["half1"], maps["half2"], maps["mask"], seed=k).corrected for k in range(8)])
    tolerance = 5 * draws.std(axis=0) + 0.02
    gap = np.abs(draws.mean(axis=0) - col["rlnFourierShellCorrelationCorrected"])
    assert (gap <= tolerance).all(), "shell %d: |Δ| %.3f > %.3f" % (gap.argmax(), gap.max(), tolerance[gap.argmax()])
