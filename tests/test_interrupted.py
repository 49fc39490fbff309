"""Interrupted runs (issue #8): SIGKILL defocus and landscape training after their first checkpoint, leave a
truncated temporary checkpoint behind as a kill in the middle of a checkpoint write would, resume with
``--continue`` and check the result is the one of an uninterrupted run with the same seed.

Also in-process: a failure in the middle of a checkpoint write (``torch.save`` interrupted) leaves the previous
checkpoint intact and loadable, and no temporary file.

Each run is a real ``python -m …`` subprocess with one thread (deterministic on CPU); tiny data (40 PSDs,
1000 particles of 24 px at a 16 px working box), 3 epochs.
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from deepcryo.core.particles import read_particles
from deepcryo.defocus import model as defocus_model
from deepcryo.defocus import train as defocus_train
from deepcryo.landscape import train as landscape_train
from deepcryo.landscape.analyze import cluster_latents

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
KILLS = []  # (program, epoch of the checkpoint found after the kill) for RELIABILITY.md


def _run(args, **kw):
    proc = subprocess.run([sys.executable, "-m"] + args, capture_output=True, text=True, env=ENV, timeout=600, **kw)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _run_and_kill(args, watch):
    """Start ``python -m args``; SIGKILL it as soon as ``watch`` exists. Fails if it ended by itself."""
    proc = subprocess.Popen([sys.executable, "-m"] + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=ENV)
    try:
        while proc.poll() is None and not os.path.exists(watch):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill (status %s):\n%s" % (proc.returncode, out)
    return out


def _plant_truncated_temp(path):
    """What a kill during ``atomic_output(path)`` leaves: a truncated temporary file beside ``path``."""
    base, ext = os.path.splitext(os.path.basename(path))
    tmp = os.path.join(os.path.dirname(path), ".%s.k1ll3d_x.part%s" % (base, ext))
    with open(path, "rb") as f:
        data = f.read()
    with open(tmp, "wb") as f:
        f.write(data[: len(data) // 3])
    return tmp


def _assert_same_state(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]) and a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], atol=atol, rtol=0), k
        elif torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------- defocus
@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("defocus_arrays") / "arrays.npz")
    torch.set_num_threads(1)
    defocus_train.save_arrays(path, defocus_train.simulate_training_arrays(40, size_px=128, seed=0))
    return path


def _defocus_args(cache, output):
    return ["deepcryo.defocus", "train", "--cache", cache, "--output", output, "--epochs", "3", "--seed", "0",
            "--threads", "1", "--batch-size", "8", "--patience", "10"]


def test_defocus_training_survives_sigkill(arrays, tmp_path):
    ref = str(tmp_path / "ref" / "model.pt")
    _run(_defocus_args(arrays, ref))
    out = str(tmp_path / "killed" / "model.pt")
    ckpt = out + ".ckpt"
    _run_and_kill(_defocus_args(arrays, out), ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # complete and loadable after the kill
    assert 1 <= state["epoch"] < 3
    KILLS.append(("defocus train", state["epoch"]))
    tmp = _plant_truncated_temp(ckpt)
    log = _run(_defocus_args(arrays, out) + ["--continue"]).stdout
    assert "resumed from %s at epoch %d" % (ckpt, state["epoch"]) in log
    assert not os.path.exists(tmp), "stale temporary checkpoint left behind"
    a = torch.load(ref, map_location="cpu", weights_only=True)
    b = torch.load(out, map_location="cpu", weights_only=True)
    _assert_same_state(a["state_dict"], b["state_dict"])
    assert a["config"] == b["config"]
    ca = torch.load(ref + ".ckpt", map_location="cpu", weights_only=True)
    cb = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert ca["epoch"] == cb["epoch"] == 3 and ca["best"] == pytest.approx(cb["best"], abs=1e-3)
    _assert_same_state(ca["model"], cb["model"])
    assert sorted(os.listdir(tmp_path / "killed")) == ["model.pt", "model.pt.ckpt"]


def test_defocus_checkpoint_write_is_atomic(arrays, tmp_path, monkeypatch):
    """A write interrupted in the middle (here: torch.save raises after half the bytes) keeps the previous
    checkpoint, loadable, and leaves no temporary file."""
    torch.set_num_threads(1)
    data = defocus_train.load_arrays(arrays)
    out = str(tmp_path / "model.pt")
    real_save, calls = torch.save, []

    def flaky_save(obj, f, *a, **kw):
        calls.append(f)
        if str(f).endswith(".part.ckpt") and len(calls) > 2:
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04 half a zip")
            raise KeyboardInterrupt("killed while writing")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        defocus_train.train(data, out, epochs=3, batch_size=8, seed=0)
    monkeypatch.setattr(torch, "save", real_save)
    state = torch.load(out + ".ckpt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1
    model, _ = defocus_model.load_model(out)  # the best model so far is complete too
    assert sorted(os.listdir(tmp_path)) == ["model.pt", "model.pt.ckpt"]
    summary = defocus_train.train(data, out, epochs=3, batch_size=8, seed=0, resume=True)
    assert summary["epochs"] == 3


# -------------------------------------------------------------------------------------------- landscape
@pytest.fixture(scope="module")
def particles(tmp_path_factory):
    root = tmp_path_factory.mktemp("landscape_particles")
    _run(["deepcryo.core.simulate", "particles", "--output-dir", str(root), "--states", "2", "--n", "1000",
          "--box", "24", "--pixel-size", "3", "--snr", "0.5", "--seed", "0"])
    return str(root / "particles.star")


def _landscape_args(star, out):
    return ["deepcryo.landscape", "train", "--particles", star, "--output-dir", out, "--epochs", "3",
            "--latent-dim", "2", "--box", "16", "--batch-size", "32", "--basis", "4", "--threads", "1", "--seed", "0"]


def _latents(out):
    star = read_particles(os.path.join(out, landscape_train.LATENT_STAR))
    return np.stack([star.particles[c] for c in landscape_train.latent_columns(2)], 1)


def test_landscape_training_survives_sigkill(particles, tmp_path):
    ref = str(tmp_path / "ref")
    _run(_landscape_args(particles, ref))
    out = str(tmp_path / "killed")
    ckpt = os.path.join(out, landscape_train.CHECKPOINT)
    _run_and_kill(_landscape_args(particles, out), ckpt)
    state = landscape_train.read_checkpoint(ckpt)
    assert 1 <= state["epoch"] < 3 and not os.path.exists(os.path.join(out, landscape_train.LATENT_STAR))
    KILLS.append(("landscape train", state["epoch"]))
    tmp = _plant_truncated_temp(ckpt)
    _run(_landscape_args(particles, out) + ["--continue"])
    assert not os.path.exists(tmp), "stale temporary checkpoint left behind"
    a = landscape_train.read_checkpoint(os.path.join(ref, landscape_train.CHECKPOINT))
    b = landscape_train.read_checkpoint(ckpt)
    assert a["epoch"] == b["epoch"] == 3
    _assert_same_state(a["model"], b["model"], atol=1e-5)
    np.testing.assert_allclose(a["history"], b["history"], rtol=1e-5)
    za, zb = _latents(ref), _latents(out)
    np.testing.assert_allclose(za, zb, atol=1e-4)
    la, _ = cluster_latents(za, 2)
    lb, _ = cluster_latents(zb, 2)
    assert adjusted_rand_score(la, lb) == 1.0  # same clusters
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))


def test_landscape_checkpoint_write_is_atomic(particles, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    out = str(tmp_path / "vae")
    real_save, calls = torch.save, []

    def flaky_save(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04 half a zip")
            raise KeyboardInterrupt("killed while writing")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        landscape_train.train(particles, out, latent_dim=2, epochs=3, box=16, batch_size=32, n_basis=4)
    monkeypatch.setattr(torch, "save", real_save)
    assert landscape_train.read_checkpoint(os.path.join(out, landscape_train.CHECKPOINT))["epoch"] == 1
    assert sorted(os.listdir(out)) == [landscape_train.CHECKPOINT, "consensus.mrc"]


def teardown_module(module):
    path = os.environ.get("DEEPCRYO_KILLS_TABLE")
    if path and KILLS:
        with open(path, "w") as f:
            for program, epoch in KILLS:
                f.write("%s: killed after epoch %d checkpoint, resumed, same result\n" % (program, epoch))


def test_every_torch_save_is_atomic():
    """Every ``torch.save`` in deepcryo (model files, checkpoints) writes inside ``with atomic_output(...)``:
    a temporary name in the same folder, renamed (``os.replace``) only once complete."""
    import ast
    package = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deepcryo")
    found = 0
    for r, _, fs in os.walk(package):
        if "/tests" in r:
            continue
        for f in fs:
            if not f.endswith(".py"):
                continue
            path = os.path.join(r, f)
            tree = ast.parse(open(path).read(), path)
            parents = {}
            for node in ast.walk(tree):
                for child in ast.iter_child_nodes(node):
                    parents[child] = node
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.save":
                    found += 1
                    p, atomic = node, False
                    while p in parents and not atomic:
                        p = parents[p]
                        atomic = isinstance(p, ast.With) and any(
                            "atomic_output" in ast.unparse(item.context_expr) for item in p.items)
                    assert atomic, "%s:%d: torch.save outside atomic_output" % (path, node.lineno)
    assert found >= 3  # defocus model, defocus checkpoint, landscape checkpoint
