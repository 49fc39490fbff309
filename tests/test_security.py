"""Security (issue #8): model files never run code on load, programs write only inside their output folder,
nothing is fetched from the network.

* A file crafted to run code when unpickled (``__reduce__`` → ``open(marker, "w")``) is refused, with one line,
  by every loader of user-supplied model files: the defocus model (``--model``/``--init``), the defocus
  training checkpoint and cache (``--continue``, ``--cache``), the landscape checkpoint (``analyze``,
  ``--continue``) and the swiftalign index weights; the marker file is never created.
* Every ``torch.load`` in deepcryo passes ``weights_only=True``; no pickle/joblib/``allow_pickle=True``/
  ``torch.jit.load``/``eval``/``exec`` (read from the source with ``ast``).
* STAR files whose image paths go up (``../``) are read, and nothing is written outside the output folder
  (the whole tree is compared before and after each program).
* With every socket connection refused, every program still runs; and no network client is imported.
"""
import ast
import hashlib
import os
import shutil
import socket

import numpy as np
import pytest
import torch

from deepcryo.core import reconstruct as reconstruct_cli
from deepcryo.core.errors import InputError
from deepcryo.core.particles import read_particles
from deepcryo.core.star import write_star
from deepcryo.defocus import __main__ as defocus_cli
from deepcryo.defocus import model as defocus_model
from deepcryo.defocus import train as defocus_train
from deepcryo.landscape import __main__ as landscape_cli
from deepcryo.landscape import train as landscape_train
from deepcryo.swiftalign import __main__ as swiftalign_cli
from deepcryo.tests.malicious import Malicious, malicious_file

from bad_inputs import ACQ

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deepcryo")  # this checkout's
#: the Scipion side is not part of "the programs", but is scanned too
SOURCES = sorted(os.path.join(r, f) for r, _, fs in os.walk(PACKAGE) for f in fs
                 if f.endswith(".py") and "/tests" not in r)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------- crafted files
def _crafted(tmp_path, marker):
    """Malicious payloads, bare and dressed up as each of our formats."""
    d = tmp_path / "crafted"
    d.mkdir()
    files = {"bare": malicious_file(str(d / "bare.pt"), marker)}
    for tag in (defocus_model.FORMAT, defocus_train.CHECKPOINT_FORMAT):
        files[tag] = str(d / ("tagged_%d.pt" % len(files)))
        torch.save({"format": tag, "config": {"arch": "polar"}, "state_dict": Malicious(marker),
                    "model": Malicious(marker)}, files[tag])
    return files


def test_crafted_model_files_are_refused_everywhere(ws, tmp_path, capsys):
    marker = str(tmp_path / "MARKER_code_ran")
    files = _crafted(tmp_path, marker)
    # the check is real: plain pickle loading would run the payload
    torch.load(files["bare"], weights_only=False)
    assert os.path.exists(marker)
    os.remove(marker)
    refused = 0
    for name, path in files.items():
        with pytest.raises(InputError, match="not a deepcryo defocus model"):
            defocus_model.load_model(path)
        # defocus training checkpoint (--continue)
        out = tmp_path / ("train_" + os.path.basename(path))
        out.mkdir()
        shutil.copy(path, str(out / "m.pt.ckpt"))
        arrays = {"psd": np.zeros((4, 3, 128, 128), np.float16), "acq": np.ones((4, 2), np.float32),
                  "labels": np.ones((4, 3), np.float32)}
        with pytest.raises(InputError, match="not a deepcryo defocus checkpoint"):
            defocus_train.train(arrays, str(out / "m.pt"), epochs=1, resume=True)
        # landscape checkpoint (analyze, --continue)
        vae = tmp_path / ("vae_" + os.path.basename(path))
        vae.mkdir()
        shutil.copy(path, str(vae / landscape_train.CHECKPOINT))
        with pytest.raises(InputError, match="not a deepcryo landscape checkpoint"):
            landscape_train.load_model(str(vae))
        assert landscape_cli.main(["train", "--particles", ws["star"], "--output-dir", str(vae), "--continue"]) == 2
        # the programs: one line
        assert defocus_cli.main(["predict", "--micrographs", ws["mic"], "--output", str(tmp_path / "o" / "c.star"),
                                 "--model", path] + ACQ) == 2
        assert defocus_cli.main(["train", "--star", os.path.join(ws["bad"], "labels.star"), "--init", path,
                                 "--epochs", "1", "--output", str(tmp_path / "o" / "m.pt")]) == 2
        assert landscape_cli.main(["analyze", str(vae), "--output-dir", str(tmp_path / "o" / "a")]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 4 and all(ln.startswith("error: ") and "not a deepcryo" in ln for ln in err), err
        refused += 8
        assert not os.path.exists(marker), "%s ran code on load" % name
        assert not os.path.exists(tmp_path / "o")
    # numpy files: the defocus training cache and the swiftalign index weights (pickled object arrays)
    cache = str(tmp_path / "cache.npz")
    np.savez(cache, psd=np.array([Malicious(marker)], dtype=object), acq=np.zeros(1), labels=np.zeros(1))
    with pytest.raises(InputError, match="not a deepcryo defocus training cache"):
        defocus_train.load_arrays(cache)
    index = tmp_path / "index"
    shutil.copytree(str(ws["root"] / "index"), str(index))
    manifest = (index / "manifest.json").read_text().replace('"weights": null', '"weights": "weights.npy"')
    (index / "manifest.json").write_text(manifest)
    np.save(str(index / "weights.npy"), np.array([Malicious(marker)], dtype=object), allow_pickle=True)
    assert swiftalign_cli.main(["query", "--index", str(index), "--particles", ws["star"], "--threads", "1",
                                "--output", str(tmp_path / "o" / "a.star")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "weights.npy" in err and "\n" not in err, err
    refused += 2
    assert not os.path.exists(marker)
    assert refused == 3 * 8 + 2


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_every_load_is_weights_only_and_nothing_unpickles():
    checked = 0
    for path in SOURCES:
        tree = ast.parse(open(path).read(), path)
        for node, func in _calls(tree):
            where = "%s:%d" % (os.path.relpath(path, PACKAGE), node.lineno)
            if func == "torch.load":
                kw = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in kw and isinstance(kw["weights_only"], ast.Constant) \
                    and kw["weights_only"].value is True, "%s: torch.load without weights_only=True" % where
                checked += 1
            assert func not in ("pickle.load", "pickle.loads", "joblib.load", "torch.jit.load", "eval", "exec",
                                "dill.load", "cloudpickle.load"), "%s: %s" % (where, func)
            if func in ("np.load", "numpy.load"):
                for k in node.keywords:
                    assert not (k.arg == "allow_pickle" and getattr(k.value, "value", False)), where
    assert checked >= 3  # defocus model, defocus checkpoint, landscape checkpoint


def test_no_network_client_in_the_programs():
    banned = ("urllib", "requests", "http", "httpx", "aiohttp", "ftplib", "paramiko", "torch.hub", "wget",
              "huggingface_hub")
    for path in SOURCES:
        tree = ast.parse(open(path).read(), path)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for n in names:
                assert not any(n == b or n.startswith(b + ".") for b in banned), "%s imports %s" % (path, n)
        for node, func in _calls(tree):
            assert "hub.load" not in func and "download" not in func.lower(), "%s: %s" % (path, func)


# ------------------------------------------------------------------ writes only inside the output folder
def _tree(root):
    """{relative path: sha1} of every file under root."""
    out = {}
    for r, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(r, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha1(fh.read()).hexdigest()
    return out


@pytest.fixture
def updir(ws, tmp_path, monkeypatch):
    """``root/data`` (images, read only), ``root/job/in/*.star`` naming them as ``../../data/…``, output
    folder ``root/job/out``; the network is off (every socket connection raises)."""
    root = tmp_path / "tree"
    data = root / "data"
    (root / "job" / "in").mkdir(parents=True)
    data.mkdir()
    shutil.copy(ws["stack"], str(data / "particles.mrcs"))
    shutil.copy(ws["ref"], str(data / "map.mrc"))
    for i in range(3):
        shutil.copy(os.path.join(os.path.dirname(ws["mic"]), "mic_%d.mrc" % i), str(data / ("mic_%d.mrc" % i)))
    star = read_particles(ws["star"])
    star.particles["rlnImageName"] = np.array(["%06d@../../data/particles.mrcs" % (i + 1) for i in range(len(star))],
                                              dtype=object)
    write_star(str(root / "job" / "in" / "particles.star"), {"optics": star.optics, "particles": star.particles})
    write_star(str(root / "job" / "in" / "mics.star"), {"micrographs": {
        "rlnMicrographName": np.array(["../../data/mic_%d.mrc" % i for i in range(3)], dtype=object)}})

    def refuse(*a, **k):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return root


PROGRAMS = [
    ("reconstruct", reconstruct_cli.main, ["--particles", "@IN@/particles.star", "--output", "@OUT@/map.mrc",
                                           "--halves"]),
    ("defocus predict", defocus_cli.main, ["predict", "--micrographs", "@IN@/mics.star", "--output", "@OUT@/ctf.star",
                                           "--no-refine"] + ACQ),
    ("swiftalign train", swiftalign_cli.main, ["train", "--reference", "@ROOT@/data/map.mrc", "--particles",
                                               "@IN@/particles.star", "--angular-step", "30", "--max-shift", "0",
                                               "--index-factory", "Flat", "--whiten",
                                               "--threads", "1", "--output", "@OUT@/index"]),
    ("landscape train", landscape_cli.main, ["train", "--particles", "@IN@/particles.star", "--output-dir",
                                             "@OUT@/vae", "--epochs", "1", "--latent-dim", "2", "--basis", "2",
                                             "--batch-size", "8"]),
]


@pytest.mark.parametrize("name,main,argv", PROGRAMS, ids=[p[0] for p in PROGRAMS])
def test_reads_up_but_writes_only_in_output(updir, name, main, argv):
    before = _tree(str(updir))
    fill = lambda a: a.replace("@IN@", str(updir / "job" / "in")).replace(  # noqa: E731
        "@OUT@", str(updir / "job" / "out")).replace("@ROOT@", str(updir))
    cwd = os.getcwd()
    os.chdir(str(updir / "job" / "in"))  # a relative path would land here: it must not
    try:
        assert main([fill(a) for a in argv]) == 0
        if name == "swiftalign train":
            assert swiftalign_cli.main(["query", "--index", fill("@OUT@/index"), "--particles",
                                        fill("@IN@/particles.star"), "--threads", "1", "--output",
                                        fill("@OUT@/aligned.star")]) == 0
        if name == "landscape train":
            assert landscape_cli.main(["analyze", fill("@OUT@/vae"), "--clusters", "2", "--trajectory-steps", "2",
                                       "--pcs", "1", "--no-umap"]) == 0
    finally:
        os.chdir(cwd)
    after = _tree(str(updir))
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert changed, "the program wrote nothing"
    outside = sorted(p for p in changed if not p.startswith(os.path.join("job", "out") + os.sep))
    assert outside == [], "written outside the output folder: %s" % outside
