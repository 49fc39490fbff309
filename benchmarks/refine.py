"""3D refinement: deepcryo SwiftRes (``python -m deepcryo.swiftalign refine``) vs RELION 3.1 auto-refine.

Simulates ``--n`` particles of a phantom (box ``--box``, ``--pixel-size``, SNR ``--snr``, CTF 1–2.5 µm,
origins within ±3 px) with ``python -m deepcryo.core.simulate particles``, removes their poses, and refines
them with both programs from the same initial reference (the true map low-passed to 30 Å), on the same
cores: deepcryo with ``--threads T``; RELION with ``mpirun -np T+1 relion_refine_mpi --j 1`` (T workers and
the idle master rank that auto-refine's half-set split requires), ``--auto_refine --split_random_halves``,
healpix order 2 (7.5°) with automatic local searches from healpix order ``--relion-local-order`` (RELION's
default 4, i.e. global searches down to 3.75°), offset range 6 px, ``--low_resol_join_halves 40``.

Printed per program: wall and CPU seconds (the process and its children; CPU seconds are steadier on a
shared machine), median angular error and shift error against the truth, half-map FSC 0.143 (computed
here in the same way for both, unmasked and in the same soft spherical mask, the masked one corrected by
phase randomisation as relion_postprocess does) and FSC 0.5 of the final map against the truth, unmasked
and in that mask; then the deepcryo / RELION ratios. Every resolution is the one RELION reports: the last
shell above the threshold, not interpolated (:func:`deepcryo.core.fsc.fsc_resolution_A`). Compare the masked
figure when RELION is evaluated at an intermediate iteration: ``--flatten_solvent`` masks RELION's
iteration maps by a sphere of the particle diameter (not its final map, where it skips solvent flattening),
so their unmasked FSC against the truth would count the solvent noise of deepcryo's map only.

    python benchmarks/refine.py --n 2000 --box 64 --threads 2 --workdir /tmp/bench_refine

With ``--workdir`` an existing simulation is reused, and ``--reuse-relion`` reuses a finished RELION run in
``workdir/relion`` (``workdir/relion_local3`` with ``--relion-local-order 3``; its ``timing.json`` written by
an earlier run of this script).
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from deepcryo.core import fourier
from deepcryo.core.fsc import fsc, fsc_resolution_A, masked_fsc, spherical_mask
from deepcryo.core.geometry import pose_distance_deg
from deepcryo.core.mrc import read_mrc, write_mrc
from deepcryo.core.particles import read_particles, write_particles


def _child_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _timed(cmd, cwd, log_path):
    cpu0, t0 = _child_cpu(), time.time()
    with open(log_path, "w") as log:
        subprocess.run(cmd, cwd=cwd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return {"wall_s": time.time() - t0, "cpu_s": _child_cpu() - cpu0}


def simulate(work, args):
    sim = os.path.join(work, "sim")
    if not os.path.exists(os.path.join(sim, "input.star")):
        subprocess.run([sys.executable, "-m", "deepcryo.core.simulate", "particles", "--output-dir", sim,
                        "--n", str(args.n), "--box", str(args.box), "--pixel-size", str(args.pixel_size),
                        "--snr", str(args.snr), "--max-shift", "3", "--seed", str(args.seed)], check=True)
        star = read_particles(os.path.join(sim, "particles.star"))
        for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                  "rlnClassNumber"):
            star.particles.pop(c)
        write_particles(os.path.join(sim, "input.star"), star)
        # RELION groups particles by micrograph for its noise and scale models: 50 particles per "micrograph"
        star.particles["rlnMicrographName"] = np.array(["mic%04d.mrc" % (i // 50) for i in range(len(star))],
                                                       dtype=object)
        write_particles(os.path.join(sim, "relion_input.star"), star)
        vol, px = read_mrc(os.path.join(sim, "truth.mrc"))
        write_mrc(os.path.join(sim, "initial.mrc"),
                     fourier.lowpass_volume(torch.as_tensor(vol), args.initial_resolution, px).numpy(), px)
    return sim


def run_deepcryo(work, sim, args):
    out = os.path.join(work, "deepcryo")
    shutil.rmtree(out, ignore_errors=True)
    t = _timed([sys.executable, "-m", "deepcryo.swiftalign", "refine", "--particles", os.path.join(sim, "input.star"),
                "--reference", os.path.join(sim, "initial.mrc"), "--output-dir", out, "--threads", str(args.threads),
                "--initial-resolution", str(args.initial_resolution), "--particle-diameter", str(args.diameter)],
               work, os.path.join(work, "deepcryo.log"))
    return t, {"particles": os.path.join(out, "particles.star"), "map": os.path.join(out, "map.mrc"),
               "half1": os.path.join(out, "half1.mrc"), "half2": os.path.join(out, "half2.mrc")}


def run_relion(work, sim, args):
    out = os.path.join(work, "relion" if args.relion_local_order == 4 else "relion_local%d" % args.relion_local_order)
    timing_path = os.path.join(out, "timing.json")
    files = {"particles": os.path.join(out, "run_data.star"), "map": os.path.join(out, "run_class001.mrc"),
             "half1": os.path.join(out, "run_half1_class001_unfil.mrc"),
             "half2": os.path.join(out, "run_half2_class001_unfil.mrc")}
    if args.reuse_relion and os.path.exists(timing_path):
        with open(timing_path) as f:
            return json.load(f), files
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(args.threads + 1), "relion_refine_mpi",
           "--o", os.path.join(out, "run"), "--auto_refine", "--split_random_halves", "--i", "relion_input.star",
           "--ref", "initial.mrc", "--ini_high", str(args.initial_resolution), "--firstiter_cc",
           "--dont_combine_weights_via_disc", "--pool", "30", "--pad", "2", "--ctf",
           "--particle_diameter", str(args.diameter), "--flatten_solvent", "--zero_mask", "--oversampling", "1",
           "--healpix_order", "2", "--auto_local_healpix_order", str(args.relion_local_order),
           "--offset_range", "6", "--offset_step", "2",
           "--sym", "C1", "--low_resol_join_halves", "40", "--norm", "--scale", "--j", "1"]
    t = _timed(cmd, sim, os.path.join(out, "relion.log"))     # RELION resolves image paths from the cwd
    with open(timing_path, "w") as f:
        json.dump(t, f)
    return t, files


def evaluate(files, truth_star, truth_vol, px, diameter_A):
    truth = read_particles(truth_star, require_images=False)
    out = read_particles(files["particles"], require_images=False)
    name = lambda s: [str(x).split("@")[0].lstrip("0") + "@" + os.path.basename(str(x).split("@")[1])  # noqa: E731
                      for x in s.particles["rlnImageName"]]
    row = {n: i for i, n in enumerate(name(out))}
    order = np.array([row[n] for n in name(truth)])
    ang = pose_distance_deg(torch.as_tensor(truth.angles_deg()), torch.as_tensor(out.angles_deg()[order])).numpy()
    shift = np.linalg.norm(truth.origins_A() - out.origins_A()[order], axis=1)
    h1, _ = read_mrc(files["half1"])
    h2, _ = read_mrc(files["half2"])
    final, _ = read_mrc(files["map"])
    box = h1.shape[-1]
    mask = spherical_mask(box, radius_px=min(box / 2 - 1, diameter_A / (2 * px)) - 3.0, edge_px=3.0).numpy()
    return {"median_angle_err_deg": float(np.median(ang)), "frac_angle_err_gt10": float(np.mean(ang > 10)),
            "median_shift_err_A": float(np.median(shift)),
            "half_fsc0143_unmasked_A": fsc_resolution_A(fsc(h1, h2), px, 0.143),
            "half_fsc0143_masked_corrected_A": fsc_resolution_A(masked_fsc(h1, h2, mask).corrected, px, 0.143),
            "truth_fsc05_A": fsc_resolution_A(fsc(truth_vol, final), px, 0.5),
            "truth_fsc05_masked_A": fsc_resolution_A(fsc(truth_vol * mask, final * mask), px, 0.5)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--pixel-size", type=float, default=2.0)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--initial-resolution", type=float, default=30.0)
    p.add_argument("--diameter", type=float, default=None, help="particle diameter, Å (default 0.8 x box)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None)
    p.add_argument("--reuse-relion", action="store_true")
    p.add_argument("--relion-local-order", type=int, default=4,
                   help="RELION's --auto_local_healpix_order (its default 4: local searches from 1.875°; 3: from "
                        "3.75°, which finishes in well under half the time on this set)")
    p.add_argument("--skip-relion", action="store_true")
    args = p.parse_args(argv)
    args.diameter = args.diameter or 0.8 * args.box * args.pixel_size
    if not args.skip_relion and shutil.which("relion_refine_mpi") is None:
        sys.exit("relion_refine_mpi not found (apt-get install relion)")
    work = args.workdir or tempfile.mkdtemp(prefix="dc_bench_refine_")
    os.makedirs(work, exist_ok=True)
    sim = simulate(work, args)
    truth_vol, px = read_mrc(os.path.join(sim, "truth.mrc"))
    truth_star = os.path.join(sim, "particles.star")
    rows = []
    t, files = run_deepcryo(work, sim, args)
    rows.append(("deepcryo", t, evaluate(files, truth_star, truth_vol, px, args.diameter)))
    if not args.skip_relion:
        t, files = run_relion(work, sim, args)
        rows.append(("relion_refine_mpi", t, evaluate(files, truth_star, truth_vol, px, args.diameter)))
    print("particles %d, box %d, %.2f Å/px, SNR %g, %d cores, initial reference: truth low-passed to %g Å"
          % (args.n, args.box, px, args.snr, args.threads, args.initial_resolution))
    print("%-18s %8s %8s %10s %8s %9s %12s %12s %12s %12s" % ("program", "wall s", "CPU s", "ang err °", ">10°",
                                                                 "shift Å", "half 0.143", "masked corr", "truth 0.5",
                                                                 "masked"))
    for name, t, e in rows:
        print("%-18s %8.1f %8.1f %10.2f %7.1f%% %9.2f %11.2fÅ %11.2fÅ %11.2fÅ %11.2fÅ"
              % (name, t["wall_s"], t["cpu_s"], e["median_angle_err_deg"], 100 * e["frac_angle_err_gt10"],
                 e["median_shift_err_A"], e["half_fsc0143_unmasked_A"], e["half_fsc0143_masked_corrected_A"],
                 e["truth_fsc05_A"], e["truth_fsc05_masked_A"]))
    if len(rows) == 2:
        print("ratio deepcryo/relion: %.3fx wall, %.3fx CPU" % (rows[0][1]["wall_s"] / rows[1][1]["wall_s"],
                                                               rows[0][1]["cpu_s"] / rows[1][1]["cpu_s"]))
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump([{"program": n, **t, **e} for n, t, e in rows], f, indent=1)
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
