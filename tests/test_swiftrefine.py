"""SwiftRes refinement (``deepcryo.swiftalign.refine``) on simulated particles with known poses.

Main case (issue #6): phantom, 64 px at 2 Å/px, 2000 particles, SNR 0.1, CTF (1.5–2.5 µm), origins within
±3 px; the input has no poses; the initial reference is the true map low-passed to 30 Å. With the true
poses these particles give a map at 6.77 Å (FSC 0.5 against the truth): the refinement must get close.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import faiss
import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from deepcryo.core import fourier
from deepcryo.core.fsc import fsc, fsc_resolution_A
from deepcryo.core.geometry import pose_distance_deg
from deepcryo.core.mrc import read_mrc, write_mrc
from deepcryo.core.particles import read_particles
from deepcryo.core.simulate import phantom_states, phantom_volume, write_particle_set
from deepcryo.swiftalign import __main__ as cli
from deepcryo.core.errors import InputError
from deepcryo.swiftalign.references import join_halves, read_references, reference_filter
from deepcryo.swiftalign.refine import RefineParams, refine_3d
from deepcryo.swiftalign.sampling import angular_step_for_diameter, shift_step_for_resolution

from poses import strip_poses

PX = 2.0


def _lowpassed(vol, path, resolution_A=30.0):
    write_mrc(path, fourier.lowpass_volume(torch.as_tensor(vol), resolution_A, PX).numpy(), PX)
    return path


def _angle_errors(truth_star, out_star, symmetry="C1"):
    t = read_particles(truth_star, require_images=False)
    o = read_particles(out_star, require_images=False)
    return pose_distance_deg(torch.as_tensor(t.angles_deg()), torch.as_tensor(o.angles_deg()), symmetry).numpy()


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    d = tmp_path_factory.mktemp("swiftrefine")
    vol = phantom_volume(64, seed=0)
    truth_star = write_particle_set(str(d / "sim"), vol, 2000, PX, snr=0.1, seed=3, max_shift_px=3.0,
                                    defocus_range_A=(15000.0, 25000.0))
    inp = strip_poses(truth_star, str(d / "sim" / "input.star"))
    ref = _lowpassed(vol, str(d / "initial.mrc"))
    out = str(d / "out")
    model = refine_3d(inp, ref, out, RefineParams(max_iterations=6))
    return dict(dir=d, vol=vol, truth=truth_star, input=inp, ref=ref, out=out, model=model)


def test_refinement_recovers_poses_and_map(main_run):
    out = main_run["out"]
    for name in ("map.mrc", "half1.mrc", "half2.mrc", "fsc.star", "particles.star", "model.json",
                 "it001_half1.mrc", "it001_half2.mrc", "it001_fsc.star", "it001_particles.star", "it001_model.json"):
        assert os.path.exists(os.path.join(out, name)), name
    assert not os.path.exists(os.path.join(out, "work"))
    err = _angle_errors(main_run["truth"], os.path.join(out, "particles.star"))
    print("median angular error %.2f°, > 10°: %.1f%%" % (np.median(err), 100 * np.mean(err > 10)))
    assert np.median(err) < 3.0                   # 2.10° measured
    assert np.mean(err > 10) < 0.01               # 0.2 % measured; 2.0 % when the global iteration's runner-up
                                                  # poses are not searched again (pseudo-2-fold mates)
    t = read_particles(main_run["truth"], require_images=False)
    o = read_particles(os.path.join(out, "particles.star"), require_images=False)
    shift_err = np.linalg.norm(t.origins_A() - o.origins_A(), axis=1) / PX
    assert np.median(shift_err) < 0.75
    final, _ = read_mrc(os.path.join(out, "map.mrc"))
    res_truth = fsc_resolution_A(fsc(main_run["vol"], final), PX, 0.5)
    print("FSC 0.5 vs truth %.2f Å, half-map %.2f Å" % (res_truth, main_run["model"]["resolution_A"]))
    assert res_truth < 7.0                       # 6.52 Å measured (7.04 Å without the pose-posterior final
                                                  # maps); the true poses, each inserted once, give 6.77 Å
    model = main_run["model"]
    assert model["final_resolution_A"] < model["resolution_A"]              # 6.04 vs 6.23 Å measured
    assert main_run["model"]["resolution_A"] < 9.0
    hist = main_run["model"]["history"]
    assert hist[0]["mode"] == "global" and all(h["mode"] == "local" for h in hist[1:])
    assert hist[-1]["resolution_A"] < hist[0]["align_resolution_A"]          # better than the 30 Å start
    assert hist[-1]["angular_step_deg"] < hist[0]["angular_step_deg"]         # sampling follows resolution
    # gold standard: the half sets are a fixed split of the particles
    halves = np.asarray(o.particles["rlnRandomSubset"])
    assert set(np.unique(halves)) == {1, 2} and abs(np.mean(halves == 1) - 0.5) < 0.01
    first = read_particles(os.path.join(out, "it001_particles.star"), require_images=False)
    assert np.array_equal(np.asarray(first.particles["rlnRandomSubset"]), halves)


def test_continue_resumes_after_last_iteration(main_run, tmp_path):
    """A run SIGKILLed as iteration 2 begins resumes from iteration 1 and reproduces iteration 2."""
    src, out = main_run["out"], str(tmp_path / "out")
    shutil.copytree(src, out)
    for name in os.listdir(out):
        if not name.startswith("it001_"):
            os.remove(os.path.join(out, name))
    stamp = os.path.getmtime(os.path.join(out, "it001_half1.mrc"))
    args = ["refine", "--particles", main_run["input"], "--reference", main_run["ref"], "--output-dir", out,
            "--max-iterations", "2", "--continue", "--threads", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "deepcryo.swiftalign"] + args, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("continuing after iteration 1"):
            break
    proc.send_signal(signal.SIGKILL)                # iteration 2 has begun (no sleep: a fast machine finishes it)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "it002_model.json"))
    stale, kept = os.path.join(out, ".it002_half1.ab12_cd3.part.mrc"), os.path.join(out, ".notes.partial")
    for path in (stale, kept):                      # a kill during a write leaves such a temporary
        open(path, "w").close()
    assert cli.main(args) == 0
    assert not os.path.exists(stale) and os.path.exists(kept)
    assert os.path.getmtime(os.path.join(out, "it001_half1.mrc")) == stamp      # not redone
    with open(os.path.join(out, "model.json")) as f:
        assert [h["iteration"] for h in json.load(f)["history"]] == [1, 2]
    for h in (1, 2):
        a, _ = read_mrc(os.path.join(out, "it002_half%d.mrc" % h))
        b, _ = read_mrc(os.path.join(src, "it002_half%d.mrc" % h))
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_multi_reference_classifies_states(tmp_path):
    """Two conformations (50/50), two initial maps: classes match the true states."""
    torch.set_num_threads(2)
    states = phantom_states(48, 2, seed=1, angle_deg=35.0)
    truth = write_particle_set(str(tmp_path / "sim"), states, 800, PX, snr=0.1, seed=5, max_shift_px=2.0,
                               defocus_range_A=(15000.0, 25000.0))
    inp = strip_poses(truth, str(tmp_path / "sim" / "input.star"))
    refs = [_lowpassed(v, str(tmp_path / ("ref%d.mrc" % i)), 20.0) for i, v in enumerate(states)]
    out = str(tmp_path / "out")
    model = refine_3d(inp, refs, out, RefineParams(max_iterations=3, initial_resolution_A=20.0))
    assert model["n_classes"] == 2
    t = read_particles(truth, require_images=False)
    o = read_particles(os.path.join(out, "particles.star"), require_images=False)
    agreement = np.mean(np.asarray(t.particles["rlnClassNumber"]) == np.asarray(o.particles["rlnClassNumber"]))
    print("class agreement %.3f" % agreement)
    assert agreement > 0.85
    for k in range(2):
        m, _ = read_mrc(os.path.join(out, "class%03d_map.mrc" % (k + 1)))
        own = np.corrcoef(m.ravel(), states[k].ravel())[0, 1]
        other = np.corrcoef(m.ravel(), states[1 - k].ravel())[0, 1]
        assert own > other


def test_sampling_follows_resolution():
    assert angular_step_for_diameter(10.0, 100.0) == pytest.approx(np.degrees(np.arcsin(0.1)))
    assert angular_step_for_diameter(5.0, 100.0) < angular_step_for_diameter(10.0, 100.0)
    assert shift_step_for_resolution(8.0, 2.0) == 1.0
    assert shift_step_for_resolution(1.0, 2.0) == 0.5


def test_reference_filter_and_join():
    curve = np.linspace(1.0, -0.1, 33)
    w = reference_filter(curve, resolution_A=8.0, box=64, pixel_size_A=PX)
    assert w[0] == 1.0 and np.all(w[17:] == 0) and np.all(np.diff(w[1:16]) <= 1e-12)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 32, 32, 32)).astype(np.float32)
    ja, jb = join_halves(a, b, 40.0, PX)
    fa, fb = fourier.fft3c(torch.as_tensor(ja)), fourier.fft3c(torch.as_tensor(jb))
    r = fourier.radius_grid_3d(32)
    low = r <= 32 * PX / 40.0
    assert torch.allclose(fa[low], fb[low], atol=1e-4)
    assert not torch.allclose(fa[~low], fb[~low], atol=1e-2)


@pytest.mark.parametrize("case", ["pixel", "mask", "symmetry", "resolution"])
def test_bad_input_one_clear_line(tmp_path, case, capsys):
    vol = phantom_volume(32, seed=2)
    star = write_particle_set(str(tmp_path / "sim"), vol, 8, PX, snr=0.1, seed=1)
    ref = str(tmp_path / "ref.mrc")
    write_mrc(ref, vol, PX if case != "pixel" else 1.5)
    args = ["refine", "--particles", star, "--reference", ref, "--output-dir", str(tmp_path / "out")]
    if case == "mask":
        write_mrc(str(tmp_path / "mask.mrc"), np.ones((16, 16, 16), np.float32), PX)
        args += ["--mask", str(tmp_path / "mask.mrc")]
    elif case == "symmetry":
        args += ["--symmetry", "X5"]
    elif case == "resolution":
        args += ["--initial-resolution", "3"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not os.path.exists(str(tmp_path / "out" / "map.mrc"))


def test_repetition_consensus_leaves_out_wrong_poses(tmp_path):
    """With two differently perturbed searches, the particles left out of the reconstruction are the ones
    with wrong poses: their errors against the truth are larger than the kept ones' (one-sided Mann-Whitney
    p < 0.01) and their median error is over 1.5× the kept median. Measured (2 iterations, SNR 0.05, 48 px,
    seed 8): 600 particles gave ratios 1.88, 1.53, 2.95, 1.63 on seeds 8–11 (before RELION's resolution
    convention: 2.18, 1.35, 1.51, 1.69; the earlier 2× bound held for seed 8 alone), with only ~20 particles
    left out; 1500 particles give 1.86 (p 3e-5) and 1.55 (p 0.005) on seeds 8 and 9."""
    torch.set_num_threads(2)
    vol = phantom_volume(48, seed=4)
    truth = write_particle_set(str(tmp_path / "sim"), vol, 1500, PX, snr=0.05, seed=8, max_shift_px=2.0,
                               defocus_range_A=(15000.0, 25000.0))
    inp = strip_poses(truth, str(tmp_path / "sim" / "input.star"))
    out = str(tmp_path / "out")
    model = refine_3d(inp, _lowpassed(vol, str(tmp_path / "ref.mrc")), out,
                   RefineParams(max_iterations=2, repetitions=2))
    o = read_particles(os.path.join(out, "particles.star"), require_images=False)
    kept = np.asarray(o.particles["dcSwiftKept"], dtype=bool)
    err = _angle_errors(truth, os.path.join(out, "particles.star"))
    print("kept %.1f%%: median error kept %.2f°, left out %.2f°" % (100 * kept.mean(), np.median(err[kept]),
                                                                     np.median(err[~kept])))
    assert 0.5 < kept.mean() < 1.0 and model["fraction_kept"] == pytest.approx(kept.mean())
    assert mannwhitneyu(err[~kept], err[kept], alternative="greater").pvalue < 0.01
    assert np.median(err[~kept]) > 1.5 * np.median(err[kept])


def test_symmetric_refinement_c4(tmp_path):
    """A C4 phantom refined with symmetry C4: poses right up to the symmetry, map close to the truth."""
    from scipy.ndimage import affine_transform

    from deepcryo.core.geometry import symmetry_matrices
    torch.set_num_threads(2)
    base = phantom_volume(48, seed=6)
    centre = np.full(3, 24.0)
    rev = np.eye(3)[::-1]                                   # (x, y, z) matrices act on (z, y, x) indices
    vol = np.mean([affine_transform(base, rev @ s @ rev, offset=centre - rev @ s @ rev @ centre, order=1)
                   for s in symmetry_matrices("C4").numpy()], axis=0).astype(np.float32)
    truth = write_particle_set(str(tmp_path / "sim"), vol, 500, PX, snr=0.3, seed=9, max_shift_px=2.0,
                               defocus_range_A=(15000.0, 25000.0))
    inp = strip_poses(truth, str(tmp_path / "sim" / "input.star"))
    out = str(tmp_path / "out")
    # the symmetrised phantom is nearly cylindrical at 30 Å: start from 15 Å
    refine_3d(inp, _lowpassed(vol, str(tmp_path / "ref.mrc"), 15.0), out,
           RefineParams(symmetry="C4", max_iterations=2, initial_resolution_A=15.0))
    err = _angle_errors(truth, os.path.join(out, "particles.star"), "C4")
    final, _ = read_mrc(os.path.join(out, "map.mrc"))
    res = fsc_resolution_A(fsc(vol, final), PX, 0.5)
    print("C4: median angular error %.2f°, FSC 0.5 vs truth %.2f Å" % (np.median(err), res))
    assert np.median(err) < 5.0
    assert res < 12.0


def test_reference_at_another_voxel_size_of_the_same_box_is_resampled(tmp_path):
    """A map of the particles' physical box at half their box (a landscape cluster map) starts a refinement:
    it is Fourier-padded to the particles' box (the original map, cut at the small map's Nyquist); a map of
    another physical size is refused with one clear error."""
    vol = phantom_volume(32, seed=2)
    star = read_particles(write_particle_set(str(tmp_path / "p"), vol, 4, 2.0, snr=None, seed=0))
    small = fourier.resize_volume(torch.as_tensor(vol), 16).numpy()
    write_mrc(str(tmp_path / "small.mrc"), small, 4.0)
    (got,) = read_references([str(tmp_path / "small.mrc")], star)
    assert got.shape == (32, 32, 32)
    want = fourier.resize_volume(torch.as_tensor(small), 32).numpy()
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    assert abs(float(got.mean()) - float(vol.mean())) < 1e-5 * float(np.abs(vol).max())
    assert np.corrcoef(got.ravel(), vol.ravel())[0, 1] > 0.95                # the same map, cut at 8 Å
    write_mrc(str(tmp_path / "other.mrc"), small, 3.0)                     # 48 Å, not the particles' 64 Å
    with pytest.raises(InputError, match="other.mrc"):
        read_references([str(tmp_path / "other.mrc")], star)
