"""The user's landscape path end to end: RELION-rendered two-state particles → SwiftRes → VAE → clusters (issue 17).

1. ``relion_project`` renders ``--n`` particles of two states (:func:`deepcryo.core.simulate.phantom_states`, the
   domain turned by ``--hinge-deg`` between them, default 35°; half the particles each) at ``--box`` px, 2 Å/px, SNR ``--snr``
   (:mod:`deepcryo.tests.relion_data`);
2. ``python -m deepcryo.swiftalign refine`` from the map of state 1 low-passed to 30 Å (``--initial-resolution
   30``) estimates the poses; their error against the truth is the angle of ``A_trueᵀ·A_est`` (the reference is
   in the true frame and hand, so no global alignment is taken out);
3. ``python -m deepcryo.landscape train`` (working box ``--work-box``, ``--epochs``) on the estimated poses and,
   for reference, on the true poses;
4. ``python -m deepcryo.landscape analyze --clusters 2``: adjusted Rand index (ARI) of its k-means clusters against
   the true states;
5. with ``--two-pass``, the heterogeneity-aware consensus: SwiftRes again from the raw particles with two
   references, the two cluster reconstructions of step 4 Fourier-padded to the particle box
   (``--initial-resolution 15``, one global iteration), so each particle is aligned to the map of its own state;
   the ARI of its class assignment; then steps 3 and 4 on its poses.

Prints one table: median pose error, % of particles beyond 10° (also after the best rotation of each true
state's frame, see :func:`state_aligned_errors_deg`), ARI, CPU seconds (user + system of the child processes)
per run. The rendering and the first SwiftRes run are kept in ``--work`` and reused when run again.

    python benchmarks/landscape_path.py --n 2000 --box 64 --work-box 32 --epochs 8 --threads 2 \\
        --work /tmp/lpath --two-pass
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from deepcryo.core import fourier  # noqa: E402
from deepcryo.core.mrc import read_mrc, write_mrc  # noqa: E402
from deepcryo.core.geometry import euler_to_matrix, rotation_angle_deg  # noqa: E402
from deepcryo.core.particles import read_particles  # noqa: E402
from deepcryo.landscape import metrics  # noqa: E402
from deepcryo.tests.relion_data import RenderSpec, render  # noqa: E402


def _run(cmd, log):
    """Run ``cmd`` (its output appended to ``log``); CPU seconds (user + system) of the child."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def image_keys(star):
    """``index@stack file name`` of every particle (the programs write the stack path relative or absolute)."""
    return [n.split("@")[0].lstrip("0") + "@" + os.path.basename(n.split("@")[1])
            for n in np.asarray(star.particles["rlnImageName"])]


def pose_errors_deg(star, truth_by_name):
    """Per-particle angle (deg) between the STAR's poses and the true ones (matched by image)."""
    true = np.stack([truth_by_name[n] for n in image_keys(star)])
    a = euler_to_matrix(torch.as_tensor(star.angles_deg()))
    b = euler_to_matrix(torch.as_tensor(true))
    return rotation_angle_deg(b.transpose(1, 2) @ a).numpy()


def state_aligned_errors_deg(star, truth_by_name, state_by_name):
    """Per-particle pose errors (deg) after the best global rotation of each true state's frame.

    A pose error shared by all particles of a state (SwiftRes aligns the other state to state 1's map with a
    systematic turn) is a rigid rotation of that state's volume, which the decoder can represent; what is left
    is the error that blurs the state (robust Procrustes of :mod:`deepcryo.landscape.metrics`)."""
    keys = image_keys(star)
    states = np.array([state_by_name[k] for k in keys])
    est = euler_to_matrix(torch.as_tensor(star.angles_deg())).numpy()
    true = euler_to_matrix(torch.as_tensor(np.stack([truth_by_name[k] for k in keys]))).numpy()
    err = np.empty(len(keys))
    for s in np.unique(states):
        m = states == s
        err[m] = metrics._aligned_errors(est[m], true[m])
    return err


def ari_of_analysis(folder, state_by_name):
    from sklearn.metrics import adjusted_rand_score
    star = read_particles(os.path.join(folder, "analysis", "particles.star"), require_images=False)
    return float(adjusted_rand_score([state_by_name[n] for n in image_keys(star)],
                                     np.asarray(star.particles["dcCluster"])))


def cluster_references(analysis_dir, box, pixel_size_A, out_dir, clusters=2):
    """The ``clusters`` cluster reconstructions of ``analyze`` (working box) Fourier-padded to the particle box
    ``box``: the references of the second, multi-class SwiftRes pass. Returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for k in range(1, clusters + 1):
        vol, _ = read_mrc(os.path.join(analysis_dir, "cluster_%02d_reconstructed.mrc" % k))
        ft = fourier.pad_to(fourier.fft3c(torch.as_tensor(vol, dtype=torch.float64)), box, 3)
        paths.append(os.path.join(out_dir, "class%d.mrc" % k))
        write_mrc(paths[-1], fourier.ifft3c(ft).real.numpy().astype(np.float32), pixel_size_A)
    return paths


def vae(star_path, out, args, log):
    py = sys.executable
    cpu = _run([py, "-m", "deepcryo.landscape", "train", "--particles", star_path, "--output-dir", out,
                "--box", str(args.work_box), "--epochs", str(args.epochs), "--latent-dim", str(args.latent_dim),
                "--threads", str(args.threads), "--seed", str(args.seed)], log)
    cpu += _run([py, "-m", "deepcryo.landscape", "analyze", out, "--clusters", "2", "--no-umap",
                 "--trajectory-steps", "2", "--pcs", "1"], log)
    return cpu


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--hinge-deg", type=float, default=35.0, help="turn of the domain between the two states (degrees)")
    p.add_argument("--work-box", type=int, default=32)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--latent-dim", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-true", action="store_true", help="skip the reference run on the true poses")
    p.add_argument("--skip-estimated", action="store_true", help="skip the run on the estimated poses alone")
    p.add_argument("--two-pass", action="store_true",
                   help="then SwiftRes with two classes from the VAE's cluster maps, and the VAE on its poses")
    p.add_argument("--work", default="/tmp/landscape_path")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.makedirs(args.work, exist_ok=True)
    log = os.path.join(args.work, "log.txt")
    spec = RenderSpec(n=args.n, box=args.box, snr=args.snr, states=2, seed=args.seed, hinge_deg=args.hinge_deg)
    data = render(os.path.join(args.work, "data"), spec)
    truth = read_particles(data.star)
    names = image_keys(truth)
    truth_by_name = dict(zip(names, truth.angles_deg()))
    state_by_name = dict(zip(names, np.asarray(truth.particles["rlnClassNumber"])))

    refined = os.path.join(args.work, "swiftres")
    timing = os.path.join(refined, "cpu_s.json")
    if not os.path.exists(timing):
        cpu = _run([sys.executable, "-m", "deepcryo.swiftalign", "refine", "--particles", data.star,
                    "--reference", data.volume_paths[0], "--initial-resolution", "30", "--output-dir", refined,
                    "--threads", str(args.threads), "--seed", str(args.seed)], log)
        with open(timing, "w") as f:
            json.dump(cpu, f)
    with open(timing) as f:
        swift_cpu = json.load(f)
    est_star = os.path.join(refined, "particles.star")

    def pose_figures(star_path):
        star = read_particles(star_path, require_images=False)
        e = pose_errors_deg(star, truth_by_name)
        a = state_aligned_errors_deg(star, truth_by_name, state_by_name)
        return float(np.median(e)), 100 * float(np.mean(e > 10)), float(np.median(a)), 100 * float(np.mean(a > 10))

    rows = [("SwiftRes poses",) + pose_figures(est_star) + (float("nan"), swift_cpu)]
    runs = [] if args.skip_estimated else [("VAE, estimated poses", est_star, "vae_est")]
    if not args.skip_true:
        runs.append(("VAE, true poses", data.star, "vae_true"))
    for label, star_path, name in runs:
        out = os.path.join(args.work, name)
        t0 = time.time()
        cpu = vae(star_path, out, args, log)
        ari = ari_of_analysis(out, state_by_name)
        poses = pose_figures(os.path.join(out, "particles_latent.star"))   # the poses the VAE used
        rows.append((label,) + poses + (ari, cpu))
        print("%s done in %.0f s wall" % (label, time.time() - t0), file=sys.stderr)

    if args.two_pass:
        first = os.path.join(args.work, "vae_est", "analysis")
        refs = cluster_references(first, args.box, spec.pixel_size_A, os.path.join(args.work, "classes"))
        second = os.path.join(args.work, "swiftres_2class")
        cpu = _run([sys.executable, "-m", "deepcryo.swiftalign", "refine", "--particles", data.star,
                    "--reference"] + refs + ["--initial-resolution", "15", "--output-dir", second,
                                             "--threads", str(args.threads), "--seed", str(args.seed)], log)
        star2 = os.path.join(second, "particles.star")
        classes = read_particles(star2, require_images=False)
        from sklearn.metrics import adjusted_rand_score
        ari = adjusted_rand_score([state_by_name[k] for k in image_keys(classes)],
                                  np.asarray(classes.particles["rlnClassNumber"]))
        rows.append(("SwiftRes 2 classes from VAE clusters",) + pose_figures(star2) + (ari, cpu))
        out = os.path.join(args.work, "vae_2class")
        cpu = vae(star2, out, args, log)
        rows.append(("VAE, 2-class SwiftRes poses",) + pose_figures(os.path.join(out, "particles_latent.star"))
                    + (ari_of_analysis(out, state_by_name), cpu))

    print("%d particles, box %d px at 2 Å/px, SNR %.3f (measured), 2 states; VAE box %d, %d epochs, latent %d"
          % (args.n, args.box, data.snr, args.work_box, args.epochs, args.latent_dim))
    print("pose error: angle to the truth; 'state-aligned': after the best rotation of each state's frame")
    print("%-38s %9s %7s %14s %8s %7s %7s" % ("run", "median°", "% >10°", "state-aligned°", "% >10°", "ARI",
                                               "CPU s"))
    for label, med, frac, amed, afrac, ari, cpu in rows:
        print("%-38s %9.2f %7.1f %14.2f %8.1f %7.3f %7.0f" % (label, med, frac, amed, afrac, ari, cpu))


if __name__ == "__main__":
    main()
