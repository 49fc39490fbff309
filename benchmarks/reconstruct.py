"""Reconstruction speed and accuracy: deepcryo vs ``relion_reconstruct`` (RELION 3.1) on the same particles.

Simulates a phantom and ``--n`` noisy CTF-modulated particles (``--snr``; 0 = noiseless), reconstructs them
with both programs (CTF-corrected, same thread count) and prints particles/s (wall and CPU), the ratio,
and each map's FSC against the ground truth (resolution at 0.5 and 0.143: the last shell above each, as
RELION reports, :func:`deepcryo.core.fsc.fsc_resolution_A`).

    python benchmarks/reconstruct.py --n 5000 --box 96 --snr 0.1 --threads 2
"""
import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from deepcryo.core import fsc, simulate
from deepcryo.core.mrc import read_mrc


def _child_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _timed(cmd, cwd):
    cpu0, t0 = _child_cpu(), time.time()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.time() - t0, _child_cpu() - cpu0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--box", type=int, default=96)
    p.add_argument("--pixel-size", type=float, default=1.5)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    if shutil.which("relion_reconstruct") is None:
        sys.exit("relion_reconstruct not found (apt-get install relion)")
    work = args.workdir or tempfile.mkdtemp(prefix="dc_bench_rec_")
    vol = simulate.phantom_volume(args.box, seed=1)
    star = simulate.write_particle_set(work, vol, args.n, args.pixel_size, snr=args.snr or None, seed=2)

    ours_wall, ours_cpu = _timed([sys.executable, "-m", "deepcryo.core.reconstruct", "--particles", star,
                                  "--output", "ours.mrc", "--threads", str(args.threads)], work)
    relion_wall, relion_cpu = _timed(["relion_reconstruct", "--i", star, "--o", "relion.mrc", "--ctf",
                                      "--angpix", str(args.pixel_size), "--j", str(args.threads)], work)
    rows = []
    for name, wall, cpu in (("deepcryo", ours_wall, ours_cpu), ("relion_reconstruct", relion_wall, relion_cpu)):
        m, _ = read_mrc(os.path.join(work, "ours.mrc" if name == "deepcryo" else "relion.mrc"))
        curve = fsc.fsc(vol, m)
        rows.append((name, args.n / wall, args.n / max(cpu, 1e-9), fsc.fsc_resolution_A(curve, args.pixel_size, 0.5),
                     fsc.fsc_resolution_A(curve, args.pixel_size, 0.143), np.corrcoef(vol.ravel(), m.ravel())[0, 1]))
    print("particles: %d, box %d, %.2f Å/px, SNR %s, threads %d" % (args.n, args.box, args.pixel_size,
                                                                  args.snr or "inf", args.threads))
    print("%-20s %14s %14s %16s %17s %10s" % ("program", "particles/s", "particles/CPUs",
                                               "FSC0.5 truth (Å)", "FSC0.143 truth (Å)", "corr"))
    for r in rows:
        print("%-20s %14.1f %14.1f %16.2f %17.2f %10.4f" % r)
    print("ratio deepcryo/relion: %.2fx wall, %.2fx CPU" % (rows[0][1] / rows[1][1], rows[0][2] / rows[1][2]))
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
