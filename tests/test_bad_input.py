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

import pytest
import torch

from deepcryo.core import reconstruct as reconstruct_cli
from deepcryo.core import simulate as simulate_cli
from deepcryo.core.star import read_star
from deepcryo.defocus import __main__ as defocus_cli
from deepcryo.landscape import __main__ as landscape_cli
from deepcryo.swiftalign import __main__ as swiftalign_cli


from bad_inputs import ACQ

TABLE = []


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)



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
                                            "30", "--max-shift", "0", "--index-factory", "Flat",
                                            "--threads", "1", "--output", "@OUT@/index"], words)
        add("swiftalign query", label, ["query", "--index", "@INDEX@", "--particles", star, "--threads", "1",
                                        "--output", "@OUT@/aligned.star"], words)
        add("landscape train", label, ["train", "--particles", star, "--output-dir", "@OUT@/vae", "--epochs", "1",
                                       "--latent-dim", "2", "--basis", "2", "--batch-size", "8"], words)
        add("landscape halves", label, ["halves", "--particles", star, "--output-dir", "@OUT@/halves", "--epochs",
                                        "1", "--latent-dim", "2", "--basis", "2", "--batch-size", "8"], words)
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
    add("landscape train", "zero volume steps",
        ["train", "--particles", "@STAR@", "--output-dir", "@OUT@/vae", "--volume-steps", "0"], ["--volume-steps", ">= 1"])
    add("landscape train", "negative KL warm-up",
        ["train", "--particles", "@STAR@", "--output-dir", "@OUT@/vae", "--beta-warmup-epochs", "-1"],
        ["--beta-warmup-epochs", ">= 0"])
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
        add("landscape volumes", label, ["volumes", tdir, "--output-dir", "@OUT@/volumes", "--pc", "1"], words)
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
         "landscape train --continue": landscape_cli.main, "landscape analyze": landscape_cli.main,
         "landscape halves": landscape_cli.main, "landscape volumes": landscape_cli.main}


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
    names = [os.path.basename(n) for n in read_star(out)["micrographs"]["rlnMicrographName"]]
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
