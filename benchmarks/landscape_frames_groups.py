"""Does ``landscape frames`` take known frame turns out of the poses, and what does it do when the groups do not
follow the conformations? (issue 17, the body frame as a Scipion step)

1. ``relion_project`` renders ``--n`` particles of three states of a 40° hinge (domain at 0°, 20°, 40°; a third
   each) at 32 px, 4 Å/px, SNR ``--snr`` (:mod:`deepcryo.tests.relion_data`);
2. the true poses of states 1 and 3 are turned by 10° and 9° about the hinge axis (the shared turn a consensus
   alignment gives the conformations on either side of its map), those of state 2 kept;
3. ``landscape train`` (box 32, ``--latent-dim``, ``--epochs``) and ``analyze --clusters 3`` on those poses;
4. ``landscape frames --group-column dcPC1 --bins 3 --box 32``.

Prints one JSON line: the adjusted Rand index of the 3 PC1 bins against the states, the static body's fraction of
the particle mask (or the one-line error of ``frames``), the median pose error per state in one common frame
(:func:`deepcryo.tests.test_protocol_bodyframe.stateErrorsDeg`: the angle to the common rotation between true
and estimated poses) before and after, and the CPU seconds (user + system) of the programs. Rendering is reused
from ``--work`` when run again. The same data and settings as ``deepcryo/tests/test_protocol_bodyframe.py`` with
``--n 1500 --snr 0.1 --latent-dim 8 --epochs 12``.

    python benchmarks/landscape_frames_groups.py --n 1500 --snr 0.1 --latent-dim 8 --epochs 12 --work /tmp/lfg
"""
import argparse
import json
import os
import resource
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from deepcryo.core.geometry import axis_angle_matrices  # noqa: E402
from deepcryo.core.particles import read_particles, write_particles  # noqa: E402
from deepcryo.landscape import frames  # noqa: E402
from deepcryo.tests.relion_data import RenderSpec, render  # noqa: E402
from deepcryo.tests.sets import relionPoseToScipionMatrix  # noqa: E402
from deepcryo.tests.test_protocol_bodyframe import TURNS_DEG, stateErrorsDeg  # noqa: E402


def _landscape(*words):
    """Run ``python -m deepcryo.landscape words``; (return code, last line of its stderr)."""
    done = subprocess.run([sys.executable, "-m", "deepcryo.landscape"] + [str(w) for w in words],
                          capture_output=True, text=True)
    return done.returncode, (done.stderr.strip().splitlines() or [""])[-1]


def _rotations(star):
    """(N, 3, 3) rotation parts of the Scipion matrices of a STAR's poses."""
    return np.stack([relionPoseToScipionMatrix(*a, 0.0, 0.0)[:3, :3] for a in star.angles_deg()])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1500)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--latent-dim", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", required=True)
    args = parser.parse_args()
    work = os.path.join(args.work, "n%d_snr%g_z%d_e%d" % (args.n, args.snr, args.latent_dim, args.epochs))
    data = render(os.path.join(args.work, "relion_n%d_snr%g" % (args.n, args.snr)),
                  RenderSpec(n=args.n, box=32, pixel_size_A=4.0, snr=args.snr, states=3, hinge_deg=40.0))
    truth = read_particles(data.star)
    states = np.asarray(truth.particles["rlnClassNumber"], dtype=np.int64) - 1
    turned = frames.turn_particles(truth, states, axis_angle_matrices(np.radians(TURNS_DEG)).numpy(),
                                   np.zeros((3, 3)))
    os.makedirs(work, exist_ok=True)
    write_particles(os.path.join(work, "turned.star"), turned)
    vae, out = os.path.join(work, "vae"), os.path.join(work, "frames", "particles.star")
    for words in (["train", "--particles", os.path.join(work, "turned.star"), "--output-dir", vae, "--box", 32,
                   "--latent-dim", args.latent_dim, "--epochs", args.epochs, "--threads", args.threads,
                   "--device", "cpu"],
                  ["analyze", vae, "--clusters", 3, "--no-umap", "--trajectory-steps", 2, "--threads", args.threads]):
        code, last = _landscape(*words)
        if code:
            raise SystemExit("%s failed: %s" % (words[0], last))
    code, last = _landscape("frames", "--particles", os.path.join(vae, "analysis", "particles.star"),
                            "--group-column", "dcPC1", "--bins", 3, "--box", 32, "--output", out)
    from sklearn.metrics import adjusted_rand_score
    analysis = read_particles(os.path.join(vae, "analysis", "particles.star"), require_images=False)
    reference = _rotations(truth)
    row = {"n": args.n, "snr": args.snr, "latent_dim": args.latent_dim, "epochs": args.epochs,
           "pc1_bins_ari": round(adjusted_rand_score(states, frames.quantile_groups(analysis.particles["dcPC1"], 3)),
                                 3),
           "error_before_deg": np.round(stateErrorsDeg(_rotations(turned), reference, states), 2).tolist()}
    if code == 0:
        with open(os.path.splitext(out)[0] + "_frames.json") as f:
            row["static_body_fraction"] = round(json.load(f)["static_body_fraction_of_particle"], 4)
        moved = read_particles(out, require_images=False)
        row["error_after_deg"] = np.round(stateErrorsDeg(_rotations(moved), reference, states), 2).tolist()
    else:
        row["frames_error"] = last
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    row["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
