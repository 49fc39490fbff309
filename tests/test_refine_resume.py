"""``python -m deepcryo.swiftalign refine --continue`` after a SIGKILL at every stage of the refinement (issue #14).

The stages: input preparation, the global iteration (alignment, its outputs), a local iteration (alignment,
reconstruction, its outputs), the final pass with pose posteriors, the final maps, the final ``model.json``
and the clean-up after it. For each, a real ``python -m deepcryo.swiftalign refine --continue`` process SIGKILLs
itself at the call that marks the stage (this module run as a program arms the kill by wrapping that one
function; no hook in the program itself), so the kill lands at the same point every time and leaves what a
kill there leaves: no clean-up, temporaries of an interrupted atomic write. The killed run of a later stage
starts (``--continue``) from the uninterrupted run's files of the iterations before it. A second ``--continue``
(in this process) must then finish with the result of the uninterrupted run, and every file the protocol and its viewer read must be
complete: ``model.json`` with the history and the settings, the map, half maps, FSC, particles, the per-
iteration FSC curves.

Tiny problem: 300 particles of 32 px at 4 Å/px (SNR 0.2, CTF, no input poses), 3 iterations (1 global,
2 local), one thread, so that every run is deterministic; about 6 s for an uninterrupted run.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from deepcryo.core import fourier
from deepcryo.core.geometry import pose_distance_deg
from deepcryo.core.mrc import read_mrc, write_mrc
from deepcryo.core.particles import read_particles, write_particles
from deepcryo.core.simulate import phantom_volume, write_particle_set
from deepcryo.core.star import read_star
from deepcryo.swiftalign import __main__ as cli

PX = 4.0
ITERATIONS = 3
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
FINAL_FILES = ("map.mrc", "half1.mrc", "half2.mrc", "fsc.star", "particles.star", "model.json")
ITERATION_FILES = ("half1.mrc", "half2.mrc", "ref_half1.mrc", "ref_half2.mrc", "fsc.star", "particles.star",
                   "model.json")

# stage -> iterations already finished when the killed run starts (where it is killed: _arm)
STAGES = {
    "input preparation": 0,
    "global alignment": 0,
    "global iteration output": 0,
    "local alignment": 1,
    "local reconstruction": 1,
    "local iteration output": 1,
    "final pass": ITERATIONS,
    "final maps": ITERATIONS,
    "final model": ITERATIONS,
    "clean-up": ITERATIONS,
}


def _arm(stage):
    """Make the call that marks ``stage`` SIGKILL this process (run in the child only)."""
    from deepcryo.swiftalign import layout, refine as r
    named = lambda name: (lambda n, a: os.path.basename(a[0]) == name)  # noqa: E731
    replacing = lambda name: (lambda n, a: os.path.basename(a[1]) == name)  # noqa: E731
    owner, attr, when = {
        "input preparation": (r, "half_split", lambda n, a: True),
        "global alignment": (r.swindex, "load", lambda n, a: n == 2),               # half 2's index is built
        "global iteration output": (layout, "_write_json", named("it001_model.json")),   # it001_* but the model
        "local alignment": (r, "align", lambda n, a: n == 2),
        "local reconstruction": (r.Reconstructor, "reconstruct", lambda n, a: n == 1),
        "local iteration output": (os, "replace", replacing("it002_particles.star")),  # inside the write
        "final pass": (r, "pose_posterior", lambda n, a: n == 2),
        "final maps": (os, "replace", replacing("map.mrc")),                        # inside the write
        "final model": (layout, "_write_json", named("model.json")),
        "clean-up": (r.shutil, "rmtree", named("work")),
    }[stage]
    original, calls = getattr(owner, attr), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if when(len(calls), args):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, attr, wrapper)


def _args(problem, out, iterations=ITERATIONS, repetitions=1):
    return ["refine", "--particles", problem["input"], "--reference", problem["ref"], "--output-dir", out,
            "--max-iterations", str(iterations), "--repetitions", str(repetitions), "--threads", "1", "--continue"]


def _run(args, stage=None):
    """``python -m deepcryo.swiftalign args`` in a new process (through this module, armed, with ``stage``)."""
    program = [__file__, stage] if stage else ["-m", "deepcryo.swiftalign"]
    return subprocess.run([sys.executable] + program + args, capture_output=True, text=True, env=ENV, timeout=600)


def _kill(args, stage):
    proc = _run(args, stage)
    assert proc.returncode == -signal.SIGKILL, "not killed at %s:\n%s%s" % (stage, proc.stdout, proc.stderr)


@pytest.fixture
def one_thread():
    """The program's ``--threads 1`` in this process (as in the uninterrupted run); the counts restored after."""
    import faiss
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    yield
    torch.set_num_threads(before[0])
    faiss.omp_set_num_threads(before[1])


def _resume(args):
    """The ``--continue`` run that must finish the job (in this process: it saves the start-up of a new one)."""
    assert cli.main(args) == 0


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    vol = phantom_volume(32, seed=0)
    star = read_particles(write_particle_set(str(d / "sim"), vol, 300, PX, snr=0.2, seed=3, max_shift_px=2.0,
                                                defocus_range_A=(15000.0, 25000.0)))
    for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        star.particles.pop(column)
    write_particles(str(d / "sim" / "input.star"), star)
    write_mrc(str(d / "ref.mrc"), fourier.lowpass_volume(torch.as_tensor(vol), 30.0, PX).numpy(), PX)
    problem = dict(input=str(d / "sim" / "input.star"), ref=str(d / "ref.mrc"), out=str(d / "uninterrupted"))
    proc = _run(_args(problem, problem["out"]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(os.path.join(problem["out"], "model.json")) as f:
        assert [h["iteration"] for h in json.load(f)["history"]] == list(range(1, ITERATIONS + 1))
    return problem


def _start_from(src, out, iterations):
    """``out`` holding the files of the first ``iterations`` iterations of the run in ``src``."""
    os.makedirs(out)
    for it in range(1, iterations + 1):
        for what in ITERATION_FILES:
            shutil.copy2(os.path.join(src, "it%03d_%s" % (it, what)), out)


def _model(folder):
    with open(os.path.join(folder, "model.json")) as f:
        return json.load(f)


def _fsc(path):
    return np.asarray(read_star(path)["fsc"]["rlnFourierShellCorrelation"], dtype=np.float64)


def _assert_same_map(a, b, tol=1e-4):
    va, vb = read_mrc(a)[0], read_mrc(b)[0]
    assert va.shape == vb.shape, a
    assert np.abs(va - vb).max() <= tol * np.abs(vb).max(), a


def _assert_same_particles(a, b):
    pa, pb = read_particles(a, require_images=False), read_particles(b, require_images=False)
    assert sorted(pa.particles) == sorted(pb.particles), a
    assert pose_distance_deg(torch.as_tensor(pa.angles_deg()), torch.as_tensor(pb.angles_deg())).max() < 1e-3, a
    assert np.allclose(pa.origins_A(), pb.origins_A(), atol=1e-4), a
    for column in ("rlnRandomSubset", "rlnClassNumber", "dcSwiftKept"):
        assert np.array_equal(pa.particles[column], pb.particles[column]), (a, column)


def _assert_protocol_reads(out):
    """What DeepCryoProtSwiftRefine (history, final resolution, outputs) and its viewer read, from ``out``."""
    from deepcryo.protocols.protocol_swiftrefine import DeepCryoProtSwiftRefine
    from deepcryo.viewers.viewer_swiftrefine import iteration_fsc_curves, plot_refine_history
    prot = types.SimpleNamespace(_refineDir=lambda *paths: os.path.join(out, *paths))
    history = DeepCryoProtSwiftRefine.history(prot)
    assert [h["iteration"] for h in history] == list(range(1, ITERATIONS + 1))
    assert DeepCryoProtSwiftRefine.finalResolution(prot) == _model(out)["final_resolution_A"]
    assert len(iteration_fsc_curves(out)) == ITERATIONS
    plot_refine_history(history)
    for name in ("map.mrc", "half1.mrc", "half2.mrc"):
        assert read_mrc(os.path.join(out, name))[0].shape == (32, 32, 32)
    assert len(read_particles(os.path.join(out, "particles.star"), require_images=False)) == 300


def _assert_same_result(out, ref):
    """``out`` holds every output of the uninterrupted run ``ref``, complete and with the same content."""
    names = set(os.listdir(out))
    assert names == set(os.listdir(ref)), names ^ set(os.listdir(ref))   # no work/, no temporaries left
    model, expected = _model(out), _model(ref)
    assert model["params"] == expected["params"] and model["n_classes"] == expected["n_classes"]
    assert model["iteration"] == expected["iteration"]
    for got, want in zip(model["history"], expected["history"]):
        assert [got[key] for key in ("iteration", "mode", "stalls", "converged")] == \
            [want[key] for key in ("iteration", "mode", "stalls", "converged")]
        for key in ("resolution_A", "angular_step_deg", "shift_step_px", "median_angle_change_deg"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), key
    assert len(model["history"]) == len(expected["history"])
    assert model["final_resolution_A"] == pytest.approx(expected["final_resolution_A"], rel=1e-6)
    for it in range(1, expected["iteration"] + 1):
        _assert_same_map(os.path.join(out, "it%03d_half1.mrc" % it), os.path.join(ref, "it%03d_half1.mrc" % it))
        _assert_same_particles(os.path.join(out, "it%03d_particles.star" % it),
                               os.path.join(ref, "it%03d_particles.star" % it))
    for name in ("map.mrc", "half1.mrc", "half2.mrc"):
        _assert_same_map(os.path.join(out, name), os.path.join(ref, name))
    assert np.allclose(_fsc(os.path.join(out, "fsc.star")), _fsc(os.path.join(ref, "fsc.star")), atol=1e-4)
    _assert_same_particles(os.path.join(out, "particles.star"), os.path.join(ref, "particles.star"))


@pytest.mark.parametrize("stage", list(STAGES))
def test_continue_after_kill(problem, tmp_path, stage, one_thread):
    """SIGKILLed at ``stage``, then continued: the result of the uninterrupted run, every output complete."""
    out = str(tmp_path / "out")
    if STAGES[stage]:
        _start_from(problem["out"], out, STAGES[stage])
    _kill(_args(problem, out), stage)
    if stage == "clean-up":                      # finished but for the clean-up: nothing is redone
        stamps = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in FINAL_FILES}
    else:
        assert not os.path.exists(os.path.join(out, "model.json"))
    _resume(_args(problem, out))
    if stage == "clean-up":
        assert stamps == {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in FINAL_FILES}
    _assert_same_result(out, problem["out"])
    _assert_protocol_reads(out)


def test_continue_with_a_higher_limit(problem, tmp_path, one_thread):
    """A run finished after 1 iteration, continued with a limit of 3 and killed in iteration 2: no ``model.json``
    claims any more that the final outputs are complete (the protocol reads the history of the iterations);
    continued again, the result of a run of 3 iterations."""
    out = str(tmp_path / "out")
    _start_from(problem["out"], out, 1)
    _resume(_args(problem, out, iterations=1))
    assert _model(out)["iteration"] == 1
    _kill(_args(problem, out), "local alignment")
    assert not os.path.exists(os.path.join(out, "model.json"))
    _resume(_args(problem, out))
    _assert_same_result(out, problem["out"])


def test_repetition_consensus_continues_with_the_same_draws(problem, tmp_path, one_thread):
    """Repetition consensus (random perturbations each iteration), killed in iteration 2 and continued: the
    same perturbations as without the kill, so the same particles kept and the same result."""
    ref, out = str(tmp_path / "uninterrupted"), str(tmp_path / "out")
    proc = _run(_args(problem, ref, iterations=2, repetitions=2))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _start_from(ref, out, 1)
    _kill(_args(problem, out, iterations=2, repetitions=2), "local alignment")
    _resume(_args(problem, out, iterations=2, repetitions=2))
    _assert_same_result(out, ref)


def test_protocol_history_without_history_in_model(problem, tmp_path):
    """A ``model.json`` without its history (what ``--continue`` wrote before the fix): the protocol reads
    the history from the last iteration."""
    from deepcryo.protocols.protocol_swiftrefine import DeepCryoProtSwiftRefine
    out = str(tmp_path / "out")
    shutil.copytree(problem["out"], out)
    model = _model(out)
    with open(os.path.join(out, "model.json"), "w") as f:
        json.dump({k: v for k, v in model.items() if k not in ("history", "params")}, f)
    prot = types.SimpleNamespace(_refineDir=lambda *paths: os.path.join(out, *paths))
    assert DeepCryoProtSwiftRefine.history(prot) == model["history"]


if __name__ == "__main__":
    # python tests/test_refine_resume.py STAGE refine ARGS…: the refinement, SIGKILLed at STAGE
    _arm(sys.argv[1])
    from deepcryo.swiftalign.__main__ import main
    sys.exit(main(sys.argv[2:]))
