"""Shared bad inputs of the programs' bad-input tests (``test_bad_input.py``, ``test_security.py``): the tiny
good data set and every bad file built from it (fixture ``ws``, made available by ``conftest.py``), among them
the malicious pickle payload of :mod:`deepcryo.tests.malicious`."""
import os
import shutil

import mrcfile
import numpy as np
import pytest
import torch

from deepcryo.core import simulate as simulate_cli
from deepcryo.core.micrographs import simulate_micrograph
from deepcryo.core.mrc import read_mrc, write_mrc
from deepcryo.core.particles import read_particles
from deepcryo.core.star import write_star
from deepcryo.swiftalign import __main__ as swiftalign_cli
from deepcryo.tests.malicious import malicious_file


PX, BOX, N = 4.0, 16, 24
MIC_PX = 1.2
ACQ = ["--pixel-size", str(MIC_PX), "--voltage", "300", "--cs", "2.7", "--amplitude-contrast", "0.07"]


# --------------------------------------------------------------------------------------- bad files
def _truncate(src, dst, fraction=0.6):
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * fraction)])
    return dst


def _write_raw_mrc(path, data, px):
    """An MRC written with mrcfile directly (write_mrc would be fine too; this keeps NaN untouched)."""
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.asarray(data, dtype=np.float32))
        m.voxel_size = px
    return path


def _star_variant(src, dst, drop=(), optics=None, names=None, empty=False):
    star = read_particles(src)
    parts = star.particles
    for c in drop:
        parts.pop(c, None)
    if names is not None:
        parts["rlnImageName"] = np.asarray(names, dtype=object)
    if empty:
        parts = {k: v[:0] for k, v in parts.items()}
    opt = star.optics
    for k, v in (optics or {}).items():
        opt[k] = np.array([v])
    blocks = {"optics": opt, "particles": parts}
    write_star(dst, blocks)
    return dst


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Good inputs and every bad file, built once."""
    root = tmp_path_factory.mktemp("bad_input")
    d = lambda *p: str(root.joinpath(*p))  # noqa: E731
    assert simulate_cli.main(["particles", "--output-dir", d("sim"), "--n", str(N), "--box", str(BOX),
                              "--pixel-size", str(PX), "--snr", "1", "--seed", "1"]) == 0
    star, stack, ref = d("sim", "particles.star"), d("sim", "particles.mrcs"), d("sim", "truth.mrc")
    w = {"root": root, "star": star, "stack": stack, "ref": ref}
    good, _ = read_mrc(stack)
    os.makedirs(d("bad"))
    # particle stacks
    _truncate(stack, d("bad", "truncated.mrcs"))
    nan = good.copy()
    nan[3, 5, 5] = np.nan
    nan[4, 0, 0] = np.inf
    _write_raw_mrc(d("bad", "nan.mrcs"), nan, PX)
    _write_raw_mrc(d("bad", "constant.mrcs"), np.full_like(good, 0.5), PX)
    _write_raw_mrc(d("bad", "box20.mrcs"), np.zeros((N // 2, 20, 20), np.float32) + np.arange(20), PX)
    names = ["%06d@%s" % (i + 1, os.path.relpath(d("bad", "%s.mrcs"), d("bad"))) for i in range(N)]
    for what in ("truncated", "nan", "constant"):
        _star_variant(star, d("bad", "%s.star" % what), names=[n % what for n in names], optics={"rlnImageSize": BOX})
    mixed = ["%06d@../sim/particles.mrcs" % (i + 1) for i in range(N // 2)] + \
            ["%06d@box20.mrcs" % (i + 1) for i in range(N // 2)]
    _star_variant(star, d("bad", "mixed_box.star"), names=mixed)
    _star_variant(star, d("bad", "no_angles.star"), drop=("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
    _star_variant(star, d("bad", "no_ctf.star"), drop=("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"))
    _star_variant(star, d("bad", "nowhere.star"), names=["%06d@missing/stack.mrcs" % (i + 1) for i in range(N)])
    _star_variant(star, d("bad", "empty.star"), empty=True)
    _star_variant(star, d("bad", "zero_kv.star"), optics={"rlnVoltage": 0.0})
    _star_variant(star, d("bad", "negative_cs.star"), optics={"rlnSphericalAberration": -2.7})
    _star_variant(star, d("bad", "px3.star"), optics={"rlnImagePixelSize": 3.0})
    # maps
    vol, _ = read_mrc(ref)
    _truncate(ref, d("bad", "truncated_map.mrc"))
    nanvol = vol.copy()
    nanvol[2, 2, 2] = np.nan
    _write_raw_mrc(d("bad", "nan_map.mrc"), nanvol, PX)
    _write_raw_mrc(d("bad", "map_px3.mrc"), vol, 3.0)
    # micrographs
    os.makedirs(d("mics"))
    for i in range(4):
        img, t = simulate_micrograph(256, pixel_size_A=MIC_PX, defocus_u_A=12000 + 2000 * i,
                                     defocus_v_A=11000 + 2000 * i, defocus_angle_deg=30, seed=i)
        write_mrc(d("mics", "mic_%d.mrc" % i), img, MIC_PX)
    w["mic"] = d("mics", "mic_0.mrc")
    _truncate(w["mic"], d("bad", "truncated_mic.mrc"))
    img, _ = read_mrc(w["mic"])
    img[10:20, 10:20] = np.nan
    _write_raw_mrc(d("bad", "nan_mic.mrc"), img, MIC_PX)
    _write_raw_mrc(d("bad", "constant_mic.mrc"), np.full((256, 256), 7.0, np.float32), MIC_PX)
    _write_raw_mrc(d("bad", "tiny_mic.mrc"), img[30:78, 30:78], MIC_PX)
    _write_raw_mrc(d("bad", "empty_mic.mrc"), np.zeros((0, 0), np.float32), MIC_PX)
    _micstar(d("bad", "mics_no_name.star"), {"rlnDefocusU": [1.0]})
    _micstar(d("bad", "mics_empty.star"), {"rlnMicrographName": []})
    _micstar(d("bad", "mics_nowhere.star"), {"rlnMicrographName": ["nowhere/mic.mrc"]})
    labels = {"rlnMicrographName": ["../mics/mic_%d.mrc" % i for i in range(4)],
              "rlnDefocusU": [12000.0 + 2000 * i for i in range(4)], "rlnDefocusV": [11000.0 + 2000 * i for i in range(4)],
              "rlnDefocusAngle": [30.0] * 4, "rlnMicrographPixelSize": [MIC_PX] * 4, "rlnVoltage": [300.0] * 4,
              "rlnSphericalAberration": [2.7] * 4}
    _micstar(d("bad", "labels.star"), labels)
    _micstar(d("bad", "labels_no_defocus.star"), {k: v for k, v in labels.items() if k != "rlnDefocusU"})
    _micstar(d("bad", "labels_empty.star"), {k: [] for k in labels})
    _micstar(d("bad", "labels_zero_kv.star"), dict(labels, rlnVoltage=[0.0] * 4))
    _micstar(d("bad", "labels_tiny.star"), dict(labels, rlnMicrographName=["tiny_mic.mrc"] * 4))
    _micstar(d("bad", "labels_nan.star"), dict(labels, rlnMicrographName=["nan_mic.mrc"] + labels["rlnMicrographName"][1:]))
    # model files that are not ours
    with open(d("bad", "garbage.pt"), "wb") as f:
        f.write(os.urandom(2000))
    torch.save({"state_dict": {"w": torch.zeros(3)}}, d("bad", "foreign.pt"))
    w["marker"] = d("MARKER_code_ran")
    malicious_file(d("bad", "malicious.pt"), w["marker"])
    for name in ("vae_garbage", "vae_foreign", "vae_malicious"):
        os.makedirs(d("bad", name))
    shutil.copy(d("bad", "garbage.pt"), d("bad", "vae_garbage", "checkpoint.pt"))
    shutil.copy(d("bad", "foreign.pt"), d("bad", "vae_foreign", "checkpoint.pt"))
    malicious_file(d("bad", "vae_malicious", "checkpoint.pt"), w["marker"])
    # a good swiftalign index, and broken copies
    assert swiftalign_cli.main(["train", "--reference", ref, "--particles", star, "--angular-step", "30",
                                "--max-shift", "0", "--index-factory", "Flat",
                                "--threads", "1", "--output", d("index")]) == 0
    shutil.copytree(d("index"), d("bad", "index_foreign"))
    with open(d("bad", "index_foreign", "manifest.json"), "w") as f:
        f.write('{"hello": "world"}')
    shutil.copytree(d("index"), d("bad", "index_garbage_shard"))
    with open(d("bad", "index_garbage_shard", "shard_000.faiss"), "wb") as f:
        f.write(os.urandom(500))
    w["bad"] = d("bad")
    return w


def _micstar(path, cols):
    cols = {k: np.asarray(v, dtype=object if k == "rlnMicrographName" else np.float64) for k, v in cols.items()}
    write_star(path, {"micrographs": cols})
