"""Conformational landscape: deepcryo's VAE vs cryoDRGN 4.3.1 ``train_vae`` on the same simulated sets.

Simulates a two-state set (50/50) and a continuous hinge set (SNR, CTF, random poses and shifts), trains
both programs with the same working box, epochs, latent dimension and batch size, and prints the wall time
of each, the ratio, the adjusted Rand index of k-means (K = 2) on the two-state latents against the true
states, and |Spearman ρ| of the latent PC1 against the true hinge parameter. cryoDRGN needs numpy >= 2,
so it runs from its own virtual environment (``--cryodrgn`` = its ``cryodrgn`` executable); without it
only deepcryo runs.

    python benchmarks/landscape.py --n 3000 --box 48 --work-box 24 --epochs 4 --threads 2 \\
        --cryodrgn /tmp/cdrgn/bin/cryodrgn
"""
import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time

import numpy as np
from scipy.stats import spearmanr
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score

from deepcryo.core import io, simulate


def scores(z, star):
    """(ARI of k-means K=2 vs rlnClassNumber, |ρ| of PC1 vs dcHingeParameter); NaN where no truth."""
    ari = rho = float("nan")
    if "dcHingeParameter" in star.particles:
        pc1 = PCA(1).fit_transform(z)[:, 0]
        rho = abs(spearmanr(pc1, star.particles["dcHingeParameter"]).correlation)
    else:
        labels = KMeans(2, n_init=10, random_state=0).fit_predict(z)
        ari = adjusted_rand_score(np.asarray(star.particles["rlnClassNumber"], dtype=np.int64), labels)
    return ari, rho


def run_deepcryo(star_path, out, args):
    cmd = [sys.executable, "-m", "deepcryo.landscape", "train", "--particles", star_path, "--output-dir", out,
           "--latent-dim", str(args.latent_dim), "--epochs", str(args.epochs), "--box", str(args.work_box),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.time() - t0
    star = io.read_particles(os.path.join(out, "particles_latent.star"), require_images=False)
    z = np.stack([star.particles["dcLatent%02d" % (i + 1)] for i in range(args.latent_dim)], 1)
    return seconds, z


def run_cryodrgn(star_path, out, args):
    """Downsample, parse poses/CTF and train_vae with cryoDRGN; the wall time includes all four steps.

    ``--ps 0``: the simulated STAR has no ``rlnPhaseShift`` column, which cryoDRGN otherwise reads as NaN.
    """
    exe = args.cryodrgn
    folder = os.path.dirname(star_path)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env.pop("PYTHONPATH", None)
    os.makedirs(out, exist_ok=True)
    steps = [
        [exe, "downsample", os.path.join(folder, "particles.mrcs"), "-D", str(args.work_box),
         "-o", os.path.join(out, "particles_ds.mrcs")],
        [exe, "parse_pose_star", star_path, "-o", os.path.join(out, "poses.pkl"), "-D", str(args.box)],
        [exe, "parse_ctf_star", star_path, "-o", os.path.join(out, "ctf.pkl"), "-D", str(args.box), "--ps", "0"],
        [exe, "train_vae", os.path.join(out, "particles_ds.mrcs"), "--poses", os.path.join(out, "poses.pkl"),
         "--ctf", os.path.join(out, "ctf.pkl"), "--zdim", str(args.latent_dim), "-n", str(args.epochs),
         "-b", str(args.batch_size), "--no-analysis", "-o", os.path.join(out, "train")],
    ]
    t0 = time.time()
    for cmd in steps:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    seconds = time.time() - t0
    with open(os.path.join(out, "train", "z.pkl"), "rb") as f:
        return seconds, np.asarray(pickle.load(f))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--box", type=int, default=48)
    p.add_argument("--work-box", type=int, default=24)
    p.add_argument("--pixel-size", type=float, default=2.0)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--latent-dim", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cryodrgn", default=None, help="cryodrgn executable of its own virtual environment")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="bench_landscape_")
    sets = {
        "two-state": (simulate.phantom_states(args.box, 2, seed=0),
                      np.random.default_rng(1).permutation(np.arange(args.n) % 2)),
        "hinge": (lambda t: simulate.hinge_volume(args.box, t, seed=0), None),
    }
    print("%-10s %-9s %9s %7s %7s" % ("set", "program", "wall s", "ARI", "|rho|"))
    for name, (vols, state_of) in sets.items():
        star_path = simulate.write_particle_set(os.path.join(work, name), vols, args.n, args.pixel_size,
                                                snr=args.snr, seed=2, state_of=state_of)
        truth = io.read_particles(star_path)
        runs = [("deepcryo", run_deepcryo)] + ([("cryodrgn", run_cryodrgn)] if args.cryodrgn else [])
        times = {}
        for program, fn in runs:
            seconds, z = fn(star_path, os.path.join(work, name, program), args)
            times[program] = seconds
            ari, rho = scores(z, truth)
            print("%-10s %-9s %9.1f %7.3f %7.3f" % (name, program, seconds, ari, rho))
        if len(times) == 2:
            print("%-10s deepcryo / cryodrgn wall time: %.3f" % (name, times["deepcryo"] / times["cryodrgn"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
