"""The GPU paths end to end on small simulated data, each against the same run on the CPU.

Runs, through the programs' own ``main`` (the command lines the Scipion protocols build), first with
``--device cpu`` then with ``--device cuda:0``:

1. ``swiftalign train`` + ``query`` (global search): 64 px phantom particles, 12° gallery; the CUDA run builds
   the GPU factory and searches it with faiss-gpu when this faiss has GPU support (said in the output);
   check: the fraction of particles aligned within 2 steps and 1 px of the truth, CPU vs GPU.
2. ``swiftalign refine``: 2 iterations from a 30 Å start; check: final half-map resolution, CPU vs GPU.
3. ``defocus predict`` (shipped model + fit) on simulated micrographs; check: |ΔU|, |ΔV| between the runs.
4. ``defocus train`` (1 epoch on simulated micrographs); check: finite validation MAE on both.
5. ``landscape train`` (VAE, 2 epochs, two states); check: final loss, CPU vs GPU (relative difference).

and prints one line per step: CPU and GPU wall seconds, speed-up, the compared figures and PASS/FAIL; exit
status 0 when every check passes, 1 otherwise, 2 when there is no CUDA GPU (nothing is run). Each time
includes the run's start-up (torch's first calls; CUDA initialisation in the GPU run) and the data are small,
so the speed-ups are lower bounds of those on real data sets.

    python benchmarks/gpu.py                    # on a machine with a CUDA GPU (about 5 min with 16 cores)
    python benchmarks/gpu.py --device cpu --small   # the script itself on a CPU machine (CPU vs CPU)
"""
import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

from deepcryo.core.mrc import write_mrc
from deepcryo.core.particles import read_particles
from deepcryo.core.star import read_star


def _runs(device):
    """(key, device) of the two runs compared: the CPU reference, then ``device``."""
    return (("cpu", "cpu"), ("dev", device))


def _timed(fn):
    t0 = time.time()
    out = fn()
    return out, time.time() - t0


def _run(module, argv):
    """``python -m deepcryo.<module> argv`` in this process; raises on a non-zero status."""
    import importlib
    status = importlib.import_module("deepcryo.%s.__main__" % module).main([str(a) for a in argv])
    if status:
        raise RuntimeError("deepcryo.%s %s: exit status %s" % (module, " ".join(map(str, argv)), status))


def _faiss_gpu():
    import faiss
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _guarded(name, bench, *args):
    """``bench(*args)``, or one failed row when it raises: the steps after a failing one still run, so one lease of
    a GPU machine shows every failing path, not only the first."""
    try:
        return bench(*args)
    except Exception as exc:    # noqa: BLE001 -- reported in the table, the run goes on
        traceback.print_exc()
        return [(name, math.nan, math.nan, "error: %s" % str(exc).splitlines()[-1][:120], False)]


def _aligned_fraction(truth, aligned_star, step_deg):
    from deepcryo.core.geometry import pose_distance_deg
    out = read_particles(aligned_star, require_images=False)
    ang = pose_distance_deg(torch.as_tensor(truth.angles_deg()), torch.as_tensor(out.angles_deg())).numpy()
    shift = np.linalg.norm(truth.origins_A() - out.origins_A(), axis=1) / truth.pixel_size_A
    return float(((ang < 2 * step_deg) & (shift < 1.0)).mean())


def bench_swiftalign(work, device, n, threads):
    from deepcryo.core.simulate import phantom_volume, write_particle_set
    step = 12.0
    vol = phantom_volume(64, seed=0)
    write_mrc(os.path.join(work, "map.mrc"), vol, 2.0)
    star = write_particle_set(os.path.join(work, "sim"), vol, n, 2.0, snr=0.1, seed=3, max_shift_px=3.0,
                              defocus_range_A=(15000.0, 20000.0))
    truth = read_particles(star, require_images=False)
    rows = {}
    for key, dev in _runs(device):
        index = os.path.join(work, "index_" + key)
        common = ["--particles", star, "--threads", threads, "--device", dev]
        _, t_train = _timed(lambda: _run("swiftalign", ["train", "--reference", os.path.join(work, "map.mrc"),
                                                        "--angular-step", step, "--max-resolution", 16,
                                                        "--max-shift", 3, "--output", index]
                                         + common))
        out = index + ".star"
        _, t_query = _timed(lambda: _run("swiftalign", ["query", "--index", index, "--output", out] + common))
        with open(os.path.join(index, "manifest.json")) as f:
            factory = json.load(f)["factory"]
        rows[key] = dict(train_s=t_train, query_s=t_query, factory=factory,
                         aligned=_aligned_fraction(truth, out, step))
    c, g = rows["cpu"], rows["dev"]
    ok = g["aligned"] >= c["aligned"] - 0.05
    return [("swiftalign train", c["train_s"], g["train_s"], "factory cpu %s | %s %s" % (c["factory"], device,
                                                                                        g["factory"]), ok),
            ("swiftalign query", c["query_s"], g["query_s"], "aligned %.3f | %.3f (faiss-gpu %s)"
             % (c["aligned"], g["aligned"], "used" if _faiss_gpu() and device != "cpu" else "not used"), ok)], star


def bench_refine(work, device, star, threads):
    rows = {}
    for key, dev in _runs(device):
        out = os.path.join(work, "refine_" + key)
        _, t = _timed(lambda: _run("swiftalign", ["refine", "--particles", star, "--reference",
                                                  os.path.join(work, "map.mrc"), "--output-dir", out,
                                                  "--initial-resolution", 30, "--max-iterations", 2,
                                                  "--threads", threads, "--device", dev]))
        with open(os.path.join(out, "model.json")) as f:
            model = json.load(f)
        rows[key] = (t, model.get("final_resolution_A", model.get("resolution_A")))
    (tc, rc), (tg, rg) = rows["cpu"], rows["dev"]
    return [("swiftalign refine", tc, tg, "final resolution %.2f | %.2f Å" % (rc, rg), abs(rg - rc) <= 0.1 * rc)]


def bench_defocus(work, device, n_mics, size_px, threads):
    from deepcryo.core.micrographs import simulate_micrograph_set
    mics, _ = simulate_micrograph_set(n_mics, os.path.join(work, "mics"), size_px=size_px, seed=5)
    ctf = {}
    times = {}
    for key, dev in _runs(device):
        out = os.path.join(work, "ctf_%s.star" % key)
        _, times[key] = _timed(lambda: _run("defocus", ["predict", "--micrographs", mics, "--output", out,
                                                        "--threads", threads, "--device", dev]))
        t = read_star(out)["micrographs"]
        ctf[key] = np.stack([np.asarray(t["rlnDefocusU"], float), np.asarray(t["rlnDefocusV"], float)], 1)
    diff = float(np.abs(ctf["cpu"] - ctf["dev"]).max())
    rows = [("defocus predict", times["cpu"], times["dev"], "largest U or V difference %.1f Å" % diff, diff <= 50.0)]
    maes = {}
    for key, dev in _runs(device):
        out = os.path.join(work, "defocus_%s.pt" % key)
        _, times[key] = _timed(lambda: _run("defocus", ["train", "--simulate", 16, "--simulator", "micrographs", "--sim-size", size_px,
                                                        "--epochs", 1, "--batch-size", 8, "--output", out,
                                                        "--threads", threads, "--device", dev]))
        state = torch.load(out + ".ckpt", map_location="cpu", weights_only=True)
        maes[key] = float(state["best"])
    rows.append(("defocus train", times["cpu"], times["dev"], "val MAE %.0f | %.0f Å" % (maes["cpu"], maes["dev"]),
                 all(math.isfinite(v) for v in maes.values())))
    return rows


def bench_landscape(work, device, n, threads):
    from deepcryo.core.simulate import phantom_states, write_particle_set
    from deepcryo.landscape.train import read_checkpoint
    star = write_particle_set(os.path.join(work, "states"), phantom_states(48, 2, seed=0), n, 3.0, snr=0.1, seed=0)
    loss, times = {}, {}
    for key, dev in _runs(device):
        out = os.path.join(work, "vae_" + key)
        _, times[key] = _timed(lambda: _run("landscape", ["train", "--particles", star, "--output-dir", out,
                                                          "--epochs", 2, "--box", 32, "--threads", threads,
                                                          "--device", dev]))
        loss[key] = read_checkpoint(os.path.join(out, "checkpoint.pt"))["history"][-1][0]
    rel = abs(loss["dev"] - loss["cpu"]) / abs(loss["cpu"])
    return [("landscape train", times["cpu"], times["dev"], "final loss %.2f | %.2f (rel. %.3f)"
             % (loss["cpu"], loss["dev"], rel), rel <= 0.05)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda:0", help="device compared with the CPU (cpu: check the script)")
    p.add_argument("--small", action="store_true", help="tiny sizes (a quick check of the script)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of the CPU runs")
    p.add_argument("--work-dir", help="folder for the data and outputs (default: a temporary one)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA GPU here (torch %s, CUDA %s): nothing to compare, nothing run"
              % (torch.__version__, torch.version.cuda or "not built in"), file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    n_particles, n_mics, mic_px = (40, 2, 512) if args.small else (300, 4, 2048)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print("machine: %s, %d CPU cores, GPU %s; torch %s, faiss-gpu %s; %s"
          % (platform.node(), os.cpu_count(), gpu, torch.__version__, "yes" if _faiss_gpu() else "no",
             time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())), flush=True)
    work = args.work_dir or tempfile.mkdtemp(prefix="deepcryo_gpu_")
    rows = []
    align = _guarded("swiftalign", bench_swiftalign, work, args.device, n_particles, args.threads)
    if isinstance(align, tuple):
        rows += align[0]
        rows += _guarded("swiftalign refine", bench_refine, work, args.device, align[1], args.threads)
    else:
        rows += align
    rows += _guarded("defocus", bench_defocus, work, args.device, n_mics, mic_px, args.threads)
    rows += _guarded("landscape", bench_landscape, work, args.device, 4 * n_particles, args.threads)
    print("\n| step | cpu s | %s s | speed-up | figures (cpu / %s) | check |" % (args.device, args.device))
    print("|---|---|---|---|---|---|")
    for name, tc, tg, figures, ok in rows:
        print("| %s | %.1f | %.1f | %.2f× | %s | %s |"
              % (name, tc, tg, tc / tg, figures.replace(" | ", " / "), "PASS" if ok else "FAIL"))
    print("outputs in %s" % work)
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
