"""Bad input to every deepcryo program (issue #8): one clear line naming the file and the problem, a non-zero
exit status and nothing left in the output folder.

Each case builds a bad input from a tiny good data set (24 particles of 16 px, 256² micrographs), runs the
program's ``main(argv)`` in this process (the same code path as ``python -m …``; a traceback fails the
test) and checks the captured stderr and the output folder. ``test_cli_subprocess`` runs a few of them as
real subprocesses. The protocols' ``_validate`` is tested in ``test_protocol_bad_input.py``.

The table printed by ``DEEPCRYO_BAD_INPUT_TABLE=path pytest …`` (input × program → message) is the one in
``RELIABILITY.md``.
"""
import os
import shutil
import subprocess
import sys

import mrcfile
import numpy as np
import pytest
import torch

from deepcryo.core import io
from deepcryo.core import reconstruct as reconstruct_cli
from deepcryo.core import simulate as simulate_cli
from deepcryo.core.micrographs import simulate_micrograph
from deepcryo.defocus import __main__ as defocus_cli
from deepcryo.landscape import __main__ as landscape_cli
from deepcryo.swiftalign import __main__ as swiftalign_cli

PX, BOX, N = 4.0, 16, 24
MIC_PX = 1.2
ACQ = ["--pixel-size", str(MIC_PX), "--voltage", "300", "--cs", "2.7", "--amplitude-contrast", "0.07"]
TABLE = []


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------------- bad files
def _truncate(src, dst, fraction=0.6):
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * fraction)])
    return dst


def _write_raw_mrc(path, data, px):
    """An MRC written with mrcfile directly (io.write_mrc would be fine too; this keeps NaN untouched)."""
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.asarray(data, dtype=np.float32))
        m.voxel_size = px
    return path


def _star_variant(src, dst, drop=(), optics=None, names=None, empty=False):
    star = io.read_particles(src)
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
    io.write_star(dst, blocks)
    return dst


class Malicious:
    """A pickle payload that would create a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_file(path, marker, wrap=None):
    """``torch.save`` of a dict holding a code-running object (the classic model-file attack)."""
    payload = {"format": wrap, "model": Malicious(marker)} if wrap else Malicious(marker)
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Good inputs and every bad file, built once."""
    root = tmp_path_factory.mktemp("bad_input")
    d = lambda *p: str(root.joinpath(*p))  # noqa: E731
    assert simulate_cli.main(["particles", "--output-dir", d("sim"), "--n", str(N), "--box", str(BOX),
                              "--pixel-size", str(PX), "--snr", "1", "--seed", "1"]) == 0
    star, stack, ref = d("sim", "particles.star"), d("sim", "particles.mrcs"), d("sim", "truth.mrc")
    w = {"root": root, "star": star, "stack": stack, "ref": ref}
    good, _ = io.read_mrc(stack)
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
    vol, _ = io.read_mrc(ref)
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
        io.write_mrc(d("mics", "mic_%d.mrc" % i), img, MIC_PX)
    w["mic"] = d("mics", "mic_0.mrc")
    _truncate(w["mic"], d("bad", "truncated_mic.mrc"))
    img, _ = io.read_mrc(w["mic"])
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
                                "--max-shift", "0", "--ctf-groups", "1", "--index-factory", "Flat",
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
    io.write_star(path, {"micrographs": cols})


# -------------------------------------------------------------------------------------------- cases
def B(name):
    return "@BAD@/" + name


#: image-content cases; ``swiftalign train`` reads only the STAR's CTF and optics columns (never the images,
#: except with --whiten), so for it these inputs are not errors
IMAGE_CASES = ("truncated MRC", "MRC with NaN/Inf", "zero-variance images", "mixed box sizes",
               "STAR image paths point nowhere")
PARTICLE_CASES = [  # (input label, particle STAR, words of the message)
    ("missing file", B("does_not_exist.star"), ["does_not_exist.star", "not found"]),
    ("truncated MRC", B("truncated.star"), ["truncated.mrcs", "not a readable"]),
    ("MRC with NaN/Inf", B("nan.star"), ["nan.mrcs", "NaN"]),
    ("zero-variance images", B("constant.star"), ["constant.mrcs", "zero variance"]),
    ("mixed box sizes", B("mixed_box.star"), ["box20.mrcs", "mixed box sizes"]),
    ("STAR image paths point nowhere", B("nowhere.star"), ["missing/stack.mrcs", "not found"]),
    ("empty set", B("empty.star"), ["empty.star", "empty"]),
    ("0 kV", B("zero_kv.star"), ["zero_kv.star", "voltage"]),
    ("negative Cs", B("negative_cs.star"), ["negative_cs.star", "spherical aberration"]),
]


def _cases():
    out = []

    def add(program, label, argv, words, out_name="out"):
        out.append(pytest.param(program, label, argv, words, out_name, id="%s-%s" % (program, label.replace(" ", "_"))))

    for label, star, words in PARTICLE_CASES:
        add("reconstruct", label, ["--particles", star, "--output", "@OUT@/map.mrc", "--halves"], words)
        if label not in IMAGE_CASES:
            add("swiftalign train", label, ["train", "--reference", "@REF@", "--particles", star, "--angular-step",
                                            "30", "--max-shift", "0", "--ctf-groups", "1", "--index-factory", "Flat",
                                            "--threads", "1", "--output", "@OUT@/index"], words)
        add("swiftalign query", label, ["query", "--index", "@INDEX@", "--particles", star, "--threads", "1",
                                        "--output", "@OUT@/aligned.star"], words)
        add("landscape train", label, ["train", "--particles", star, "--output-dir", "@OUT@/vae", "--epochs", "1",
                                       "--latent-dim", "2", "--basis", "2", "--batch-size", "8"], words)
    add("reconstruct", "STAR without required columns", ["--particles", B("no_angles.star"),
                                                          "--output", "@OUT@/map.mrc"], ["no_angles.star", "rlnAngleRot"])
    add("swiftalign train", "STAR without required columns",
        ["train", "--reference", "@REF@", "--particles", B("no_ctf.star"), "--angular-step", "30",
         "--output", "@OUT@/index"], ["no_ctf.star", "rlnDefocusU"])
    add("swiftalign query", "STAR without required columns",
        ["query", "--index", "@INDEX@", "--particles", B("no_ctf.star"), "--output", "@OUT@/a.star"],
        ["no_ctf.star", "rlnDefocusU"])
    add("landscape train", "STAR without required columns",
        ["train", "--particles", B("no_angles.star"), "--output-dir", "@OUT@/vae"], ["no_angles.star", "rlnAngleRot"])
    for label, ref, words in (("missing file", B("no_map.mrc"), ["no_map.mrc", "not found"]),
                              ("truncated MRC", B("truncated_map.mrc"), ["truncated_map.mrc", "not a readable"]),
                              ("MRC with NaN/Inf", B("nan_map.mrc"), ["nan_map.mrc", "NaN"]),
                              ("mismatched pixel sizes", B("map_px3.mrc"), ["map_px3.mrc", "pixel size mismatch"])):
        add("swiftalign train", label + " (map)", ["train", "--reference", ref, "--particles", "@STAR@",
                                                   "--angular-step", "30", "--output", "@OUT@/index"], words)
    for label, index, words in (("missing file", B("no_index"), ["no_index", "not a swiftalign index"]),
                                ("model file not ours", B("index_foreign"), ["index_foreign", "not a swiftalign index"]),
                                ("corrupt index shard", B("index_garbage_shard"), ["shard_000.faiss", "not a readable"])):
        add("swiftalign query", label + " (index)", ["query", "--index", index, "--particles", "@STAR@",
                                                     "--output", "@OUT@/a.star"], words)
    add("swiftalign query", "mismatched pixel sizes (index)", ["query", "--index", "@INDEX@", "--particles",
                                                               B("px3.star"), "--output", "@OUT@/a.star"],
        ["index", "pixel size mismatch"])
    for label, tdir, words in (("missing file", B("no_vae"), ["checkpoint.pt", "no checkpoint"]),
                               ("model file not ours", B("vae_garbage"), ["checkpoint.pt", "not a deepcryo"]),
                               ("model file not ours (foreign torch file)", B("vae_foreign"),
                                ["checkpoint.pt", "not a deepcryo"]),
                               ("model file crafted to run code", B("vae_malicious"), ["checkpoint.pt", "not a deepcryo"])):
        add("landscape analyze", label, ["analyze", tdir, "--output-dir", "@OUT@/analysis", "--no-umap"], words)
        add("landscape train --continue", label,
            ["train", "--particles", "@STAR@", "--output-dir", tdir, "--continue", "--epochs", "2"], words)
    # defocus predict: a single micrograph (all bad → error), by glob or STAR
    pred = ["predict", "--output", "@OUT@/ctf.star", "--no-refine"] + ACQ
    for label, mic, words in (("missing file", B("no_mic.mrc"), ["no_mic.mrc", "no micrograph matches"]),
                              ("truncated MRC", B("truncated_mic.mrc"), ["truncated_mic.mrc", "not a readable"]),
                              ("MRC with NaN/Inf", B("nan_mic.mrc"), ["nan_mic.mrc", "NaN"]),
                              ("zero-variance image", B("constant_mic.mrc"), ["constant_mic.mrc", "zero variance"]),
                              ("micrograph smaller than a PSD tile", B("tiny_mic.mrc"),
                               ["tiny_mic.mrc", "smaller than a PSD tile"]),
                              ("empty MRC (0 px)", B("empty_mic.mrc"), ["empty_mic.mrc", "smaller than a PSD tile"]),
                              ("STAR without required columns", B("mics_no_name.star"),
                               ["mics_no_name.star", "rlnMicrographName"]),
                              ("empty set", B("mics_empty.star"), ["mics_empty.star", "no micrograph"]),
                              ("STAR image paths point nowhere", B("mics_nowhere.star"), ["nowhere/mic.mrc", "not found"])):
        add("defocus predict", label, pred[:1] + ["--micrographs", mic] + pred[1:], words)
    good = ["--micrographs", "@MIC@"]
    add("defocus predict", "0 kV", ["predict", "--output", "@OUT@/ctf.star", "--pixel-size", "1.2", "--voltage", "0",
                                    "--cs", "2.7", "--amplitude-contrast", "0.07"] + good, ["mic_0.mrc", "voltage"])
    add("defocus predict", "negative Cs", ["predict", "--output", "@OUT@/ctf.star", "--pixel-size", "1.2",
                                           "--voltage", "300", "--cs", "-1", "--amplitude-contrast", "0.07"] + good,
        ["mic_0.mrc", "cs"])
    for label, model, words in (("missing file", B("no_model.pt"), ["no_model.pt", "not found"]),
                                ("model file not ours", B("garbage.pt"), ["garbage.pt", "not a deepcryo"]),
                                ("model file not ours (foreign torch file)", B("foreign.pt"),
                                 ["foreign.pt", "not a deepcryo"]),
                                ("model file crafted to run code", B("malicious.pt"), ["malicious.pt", "not a deepcryo"])):
        add("defocus predict", label + " (--model)", pred + good + ["--model", model], words)
        add("defocus train", label + " (--init)", ["train", "--star", B("labels.star"), "--epochs", "1",
                                                   "--init", model, "--output", "@OUT@/model.pt"], words)
    train = ["train", "--epochs", "1", "--output", "@OUT@/model.pt", "--star"]
    for label, star, words in (("missing file", B("no_labels.star"), ["no_labels.star", "not found"]),
                               ("STAR without required columns", B("labels_no_defocus.star"),
                                ["labels_no_defocus.star", "rlnDefocusU"]),
                               ("empty set", B("labels_empty.star"), ["labels_empty.star", "empty"]),
                               ("0 kV", B("labels_zero_kv.star"), ["labels_zero_kv.star", "voltage"]),
                               ("micrograph smaller than a PSD tile", B("labels_tiny.star"),
                                ["tiny_mic.mrc", "smaller than a PSD tile"]),
                               ("MRC with NaN/Inf", B("labels_nan.star"), ["nan_mic.mrc", "NaN"])):
        add("defocus train", label, train + [star], words)
    # simulate
    add("simulate", "0 kV", ["particles", "--output-dir", "@OUT@/sim", "--n", "4", "--voltage", "0"], ["voltage"])
    add("simulate", "negative Cs", ["particles", "--output-dir", "@OUT@/sim", "--n", "4", "--cs", "-1"], ["cs"])
    add("simulate", "empty set", ["particles", "--output-dir", "@OUT@/sim", "--n", "0"], ["--n"])
    add("simulate", "micrograph smaller than a PSD tile", ["micrographs", "--output-dir", "@OUT@/sim", "--n", "1",
                                                           "--size", "32"], ["--size"])
    return out


MAINS = {"reconstruct": reconstruct_cli.main, "simulate": simulate_cli.main, "defocus predict": defocus_cli.main,
         "defocus train": defocus_cli.main, "swiftalign train": swiftalign_cli.main,
         "swiftalign query": swiftalign_cli.main, "landscape train": landscape_cli.main,
         "landscape train --continue": landscape_cli.main, "landscape analyze": landscape_cli.main}


def _fill(argv, ws, out):
    rep = {"@BAD@": ws["bad"], "@OUT@": out, "@REF@": ws["ref"], "@STAR@": ws["star"], "@MIC@": ws["mic"],
           "@INDEX@": str(ws["root"] / "index")}
    res = []
    for a in argv:
        for k, v in rep.items():
            a = a.replace(k, v)
        res.append(a)
    return res


def _snapshot(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, ds, fs in os.walk(folder) for f in fs + ds)


@pytest.mark.parametrize("program,label,argv,words,out_name", _cases())
def test_bad_input(ws, tmp_path, capsys, program, label, argv, words, out_name):
    out = str(tmp_path / out_name)
    bad_before = _snapshot(ws["bad"])
    rc = MAINS[program](_fill(argv, ws, out))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    TABLE.append((label, program, lines[-1] if lines else "(nothing)", rc))
    assert rc not in (0, None), "exit status 0 for %s" % label
    assert len(lines) == 1, "not one line:\n" + err
    msg = lines[-1]
    assert msg.startswith("error: "), msg
    for w in words:
        assert w.lower() in msg.lower(), "%r not in %r" % (w, msg)
    left = _snapshot(out) if os.path.exists(out) else []
    assert left == [], "left in the output folder: %s" % left
    assert _snapshot(ws["bad"]) == bad_before, "the program wrote next to its input"
    assert not os.path.exists(ws["marker"]), "a model file ran code on load"


def test_bad_micrograph_among_good_ones_is_skipped(ws, tmp_path, capsys):
    """One unusable micrograph in a batch: one 'skipped' line naming it, the others get a CTF, status 0."""
    spec = str(tmp_path / "mics")
    os.makedirs(spec)
    for i in range(3):
        shutil.copy(os.path.join(os.path.dirname(ws["mic"]), "mic_%d.mrc" % i), spec)
    shutil.copy(os.path.join(ws["bad"], "nan_mic.mrc"), os.path.join(spec, "mic_1b.mrc"))
    out = str(tmp_path / "out" / "ctf.star")
    rc = defocus_cli.main(["predict", "--micrographs", spec + "/*.mrc", "--output", out, "--no-refine"] + ACQ)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 0
    assert len(err) == 1 and "skipped" in err[0] and "mic_1b.mrc" in err[0] and "NaN" in err[0], err
    names = [os.path.basename(n) for n in io.read_star(out)["micrographs"]["rlnMicrographName"]]
    assert names == ["mic_0.mrc", "mic_1.mrc", "mic_2.mrc"]


@pytest.mark.parametrize("module,argv,words", [
    ("deepcryo.core.reconstruct", ["--particles", "@BAD@/nan.star", "--output", "@OUT@/map.mrc"], ["nan.mrcs", "NaN"]),
    ("deepcryo.defocus", ["predict", "--micrographs", "@BAD@/truncated_mic.mrc", "--output", "@OUT@/c.star"] + ACQ,
     ["truncated_mic.mrc", "not a readable"]),
    ("deepcryo.landscape", ["analyze", "@BAD@/vae_malicious", "--output-dir", "@OUT@/a"], ["checkpoint.pt", "not a deepcryo"]),
])
def test_cli_subprocess(ws, tmp_path, module, argv, words):
    """The real command line: one line on stderr, status 2 (every program), no
    traceback, nothing written."""
    out = str(tmp_path / "out")
    proc = subprocess.run([sys.executable, "-m", module] + _fill(argv, ws, out), capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert not os.path.exists(out) or _snapshot(out) == []
    assert not os.path.exists(ws["marker"])


def teardown_module(module):
    path = os.environ.get("DEEPCRYO_BAD_INPUT_TABLE")
    if path and TABLE:
        with open(path, "w") as f:
            f.write("| input | program | exit | message |\n|---|---|---|---|\n")
            for label, program, msg, rc in TABLE:
                f.write("| %s | %s | %s | `%s` |\n" % (label, program, rc, msg.replace("|", "\\|")))


def test_full_disk(ws, tmp_path, monkeypatch, capsys):
    """A write the system refuses (ENOSPC) in the middle of an output file: one line naming the file, status 2,
    the previous output intact, no temporary file left (``run_main``, as ``python -m`` runs it)."""
    import builtins
    import errno
    from deepcryo.core.cli import run_main
    out = tmp_path / "out"
    out.mkdir()
    (out / "map.mrc").write_bytes(b"previous map")
    (out / "ctf.star").write_text("previous star")
    real_open = builtins.open

    def full_open(name, mode="r", *a, **kw):
        f = real_open(name, mode, *a, **kw)
        if ".part" in str(name) and ("w" in mode or "+" in mode):
            f.write(b"\0" * 10 if "b" in mode else "partial")
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(name))
        return f

    monkeypatch.setattr(builtins, "open", full_open)
    rc1 = run_main(reconstruct_cli.main, ["--particles", ws["star"], "--output", str(out / "map.mrc")])
    rc2 = run_main(defocus_cli.main, ["predict", "--micrographs", ws["mic"], "--output", str(out / "ctf.star"),
                                      "--no-refine"] + ACQ)
    monkeypatch.setattr(builtins, "open", real_open)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc1 == rc2 == 2 and len(err) == 2, err
    assert all(ln.startswith("error: ") and "No space left on device" in ln and str(out) in ln for ln in err), err
    TABLE.append(("full disk (ENOSPC while writing)", "reconstruct", err[0], rc1))
    assert (out / "map.mrc").read_bytes() == b"previous map" and (out / "ctf.star").read_text() == "previous star"
    assert sorted(os.listdir(out)) == ["ctf.star", "ctf_psd", "map.mrc"]  # + the PSD images, complete files
    assert all(f.endswith("_psd.mrc") for f in os.listdir(out / "ctf_psd"))
