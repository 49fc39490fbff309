"""Conformational landscape: deepcryo's VAE vs cryoDRGN 4.3.1 ``train_vae`` on the same simulated sets.

Simulates a two-state set (50/50) and a continuous hinge set (SNR, CTF, random poses and shifts), trains
both programs with the same working box, epochs and latent dimension, each at its own minibatch (deepcryo
``--batch-size``, cryoDRGN ``--cryodrgn-batch-size``, 8 as its ``train_vae``; runs before 2026-12-07 gave cryoDRGN
deepcryo's 64), and prints the wall and CPU time (user + system of the child processes) of each, their ratios,
the adjusted Rand index of k-means (K = 2) on the two-state latents against the true states, and |Spearman ρ|
of the latent PC1 against the true hinge parameter. cryoDRGN needs numpy >= 2, so it runs from its own virtual environment
(``--cryodrgn`` = its ``cryodrgn`` executable); without it only deepcryo runs. Each program's time covers
everything from the STAR + stack to the latents (deepcryo: consensus map, noise spectrum, training, encoding;
cryoDRGN: downsample, parse_pose_star, parse_ctf_star, train_vae). ``--pose-free`` adds deepcryo's pose-free
mode (poses not read; started from a 20 Å low-pass of the mean state as reference) with its median pose
error against the truth (after the best global rotation and hand) and the chance level of that statistic.

    python benchmarks/landscape.py --n 3000 --box 48 --work-box 24 --epochs 4 --threads 2 \\
        --cryodrgn /tmp/cdrgn/bin/cryodrgn --pose-free
"""
import argparse
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

import torch

from deepcryo.core import fourier, simulate
from deepcryo.core.mrc import write_mrc
from deepcryo.core.particles import read_particles
from deepcryo.landscape import metrics


def scores(z, star):
    """(ARI of k-means K=2 vs rlnClassNumber, |ρ| of PC1 vs dcHingeParameter); NaN where no truth."""
    ari = rho = float("nan")
    if "dcHingeParameter" in star.particles:
        rho = metrics.hinge_rho(z, star.particles["dcHingeParameter"])
    else:
        ari = metrics.state_ari(z, np.asarray(star.particles["rlnClassNumber"], dtype=np.int64))
    return ari, rho


def timed_commands(cmds, env=None):
    """Run commands in turn (output to DEVNULL, RuntimeError with the failing command and the end of its stderr);
    (wall s, CPU s of the children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    for cmd in cmds:
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError("%s failed: %s" % (" ".join(cmd), done.stderr[-1500:]))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.time() - t0, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_deepcryo(star_path, out, args, pose_free=False, reference=None):
    cmd = [sys.executable, "-m", "deepcryo.landscape", "train", "--particles", star_path, "--output-dir", out,
           "--latent-dim", str(args.latent_dim), "--epochs", str(args.epochs), "--box", str(args.work_box),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    if pose_free:
        cmd += ["--pose-free", "--reference", reference]
    if getattr(args, "volume_steps", None):
        cmd += ["--volume-steps", str(args.volume_steps)]
    if getattr(args, "beta", None) is not None:
        cmd += ["--beta", repr(args.beta)]
    wall, cpu = timed_commands([cmd])
    star = read_particles(os.path.join(out, "particles_latent.star"), require_images=False)
    return wall, cpu, metrics.latents(star, sigma_units=True), star      # as deepcryo's analysis measures them


def cryodrgn_environ(args):
    """cryoDRGN's environment: its threads set, without deepcryo's PYTHONPATH (it runs in its own venv)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env.pop("PYTHONPATH", None)
    return env


CRYODRGN_BATCH_SIZE = 8
"""cryoDRGN 4.3.1 ``train_vae``'s own minibatch (``-b``): with its fixed learning rate, a larger one makes fewer
updates per epoch and a worse landscape, so a peer run at deepcryo's minibatch understates it."""


def add_cryodrgn_batch_size_argument(parser):
    """``--cryodrgn-batch-size`` (default :data:`CRYODRGN_BATCH_SIZE`, below 1 refused), shared by the benchmarks that
    run cryoDRGN."""
    def minibatch(text):
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError("%d: at least 1" % value)
        return value
    parser.add_argument("--cryodrgn-batch-size", type=minibatch, default=CRYODRGN_BATCH_SIZE,
                        help="cryoDRGN's minibatch (its own default %d: with the same learning rate, a larger batch "
                             "makes fewer updates per epoch)" % CRYODRGN_BATCH_SIZE)


def refuse_missing_peers(parser, args, peers):
    """One parser error for the first of ``peers`` (option names with ``_``) given but not an executable file, before
    any set is rendered or trained."""
    for peer in peers:
        path = getattr(args, peer)
        if path and not os.access(path, os.X_OK):
            parser.error("--%s %s: not an executable file (the peer's own virtual environment)" % (peer, path))


def cryodrgn_commands(star_path, out, args, dim=None, batch_size=CRYODRGN_BATCH_SIZE):
    """cryoDRGN's downsample, parse_pose_star, parse_ctf_star and train_vae of ``star_path`` (into ``out/train``),
    as command lines. ``dim``: width of its 3-layer encoder and decoder (default: cryoDRGN's); ``batch_size``: its
    minibatch (default: cryoDRGN's own).

    ``--ps 0``: the simulated STAR has no ``rlnPhaseShift`` column, which cryoDRGN otherwise reads as NaN.
    """
    exe = args.cryodrgn
    folder = os.path.dirname(star_path)
    train = [exe, "train_vae", os.path.join(out, "particles_ds.mrcs"), "--poses", os.path.join(out, "poses.pkl"),
             "--ctf", os.path.join(out, "ctf.pkl"), "--zdim", str(args.latent_dim), "-n", str(args.epochs),
             "-b", str(batch_size), "--no-analysis", "-o", os.path.join(out, "train")]
    if dim:
        train += ["--enc-dim", str(dim), "--dec-dim", str(dim)]
    return [
        [exe, "downsample", os.path.join(folder, "particles.mrcs"), "-D", str(args.work_box),
         "-o", os.path.join(out, "particles_ds.mrcs")],
        [exe, "parse_pose_star", star_path, "-o", os.path.join(out, "poses.pkl"), "-D", str(args.box)],
        [exe, "parse_ctf_star", star_path, "-o", os.path.join(out, "ctf.pkl"), "-D", str(args.box), "--ps", "0"],
        train,
    ]


def cryodrgn_latents(out):
    """(N, zdim) the latent means of cryoDRGN's finished ``train_vae`` in ``out/train``."""
    with open(os.path.join(out, "train", "z.pkl"), "rb") as f:
        return np.asarray(pickle.load(f))


def run_cryodrgn(star_path, out, args, dim=None):
    """:func:`cryodrgn_commands` run in turn (the wall time includes all four steps); (wall, CPU, latents, None)."""
    os.makedirs(out, exist_ok=True)
    wall, cpu = timed_commands(cryodrgn_commands(star_path, out, args, dim, args.cryodrgn_batch_size),
                               env=cryodrgn_environ(args))
    return wall, cpu, cryodrgn_latents(out), None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--box", type=int, default=48)
    p.add_argument("--work-box", type=int, default=24)
    p.add_argument("--pixel-size", type=float, default=2.0)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--latent-dim", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64, help="deepcryo's minibatch")
    add_cryodrgn_batch_size_argument(p)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cryodrgn", default=None, help="cryodrgn executable of its own virtual environment")
    p.add_argument("--workdir", default=None)
    p.add_argument("--pose-free", action="store_true", help="also run deepcryo's pose-free mode")
    p.add_argument("--sets", default="two-state,hinge", help="comma-separated: two-state, hinge")
    args = p.parse_args(argv)
    refuse_missing_peers(p, args, ("cryodrgn",))
    work = args.workdir or tempfile.mkdtemp(prefix="bench_landscape_")
    sets = {
        "two-state": (simulate.phantom_states(args.box, 2, seed=0),
                      np.random.default_rng(1).permutation(np.arange(args.n) % 2)),
        "hinge": (lambda t: simulate.hinge_volume(args.box, t, seed=0), None),
    }
    print("date %s UTC, %d CPUs, load average before %s" % (time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                                                         os.cpu_count(), os.getloadavg()))
    print("%-10s %-18s %8s %8s %7s %7s  %s" % ("set", "program", "wall s", "CPU s", "ARI", "|rho|", "pose error"))
    for name, (vols, state_of) in sets.items():
        if name not in args.sets.split(","):
            continue
        star_path = simulate.write_particle_set(os.path.join(work, name), vols, args.n, args.pixel_size,
                                                snr=args.snr, seed=2, state_of=state_of)
        truth = read_particles(star_path)
        runs = [("deepcryo", run_deepcryo)] + ([("cryodrgn", run_cryodrgn)] if args.cryodrgn else [])
        if args.pose_free:
            mean = vols(0.5) if callable(vols) else np.mean(vols, 0)
            reference = os.path.join(work, name, "reference_20A.mrc")
            write_mrc(reference, fourier.lowpass_volume(torch.as_tensor(mean), 20.0, args.pixel_size)
                         .numpy().astype(np.float32), args.pixel_size)
            runs.append(("deepcryo pose-free",
                         lambda s, o, a: run_deepcryo(s, o, a, pose_free=True, reference=reference)))
        times = {}
        for program, fn in runs:
            try:
                wall, cpu, z, out_star = fn(star_path, os.path.join(work, name, program.replace(" ", "_")), args)
            except RuntimeError as exc:  # timed_commands: a program failed
                print("%-10s %-18s failed: %s" % (name, program, exc), flush=True)
                continue
            times[program] = (wall, cpu)
            ari, rho = scores(z, truth)
            pose = ""
            if program.endswith("pose-free"):
                err, chance = metrics.pose_error_deg(out_star.angles_deg(), truth.angles_deg())
                pose = "median %.1f deg (chance %.1f deg)" % (err, chance)
            print("%-10s %-18s %8.1f %8.1f %7.3f %7.3f  %s" % (name, program, wall, cpu, ari, rho, pose),
                  flush=True)
        if "cryodrgn" in times:
            print("%-10s deepcryo / cryodrgn: wall %.3f, CPU %.3f" % (
                name, times["deepcryo"][0] / times["cryodrgn"][0], times["deepcryo"][1] / times["cryodrgn"][1]),
                flush=True)
    print("load average after %s" % (os.getloadavg(),))
    return 0


if __name__ == "__main__":
    sys.exit(main())
