"""Conformational landscape of a particle set with a pose- and CTF-aware VAE.

Examples::

    python -m deepcryo.core.simulate particles --output-dir sim --states 2 --n 4000 --box 48 --snr 0.1
    python -m deepcryo.landscape train --particles sim/particles.star --output-dir vae --latent-dim 8 \\
        --epochs 10 --box 32
    python -m deepcryo.landscape train --particles sim/particles.star --output-dir vae --latent-dim 8 \\
        --epochs 20 --box 32 --continue
    python -m deepcryo.landscape analyze vae --clusters 2
    python -m deepcryo.landscape train --particles P.star --output-dir vae --device cuda:0,cuda:1
    python -m deepcryo.landscape train --particles P.star --output-dir vae_pf --pose-free --reference map.mrc

The particles need consensus poses and CTF (RELION 3.1 STAR); with ``--pose-free`` (the seed's method, see
README "Pose-free mode" for its measured accuracy) only the CTF is read and a pose head learns the poses. ``analyze`` writes into ``vae/analysis`` unless given ``--output-dir``.
"""
import argparse
import sys

import torch

from ..core.cli import parse_devices
from ..core.io import InputError


def _parser():
    parser = argparse.ArgumentParser(prog="python -m deepcryo.landscape", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the VAE (checkpoint per epoch, --continue resumes)")
    t.add_argument("--particles", required=True, help="RELION 3.1 STAR with poses and CTF")
    t.add_argument("--output-dir", required=True)
    t.add_argument("--latent-dim", type=int, default=8)
    t.add_argument("--epochs", type=int, default=20, help="total epochs (also when continuing)")
    t.add_argument("--box", type=int, default=None, help="working box (px, even; Fourier crop); default: particle box")
    t.add_argument("--batch-size", type=int, default=64, help="particles per step and device")
    t.add_argument("--beta", type=float, default=1.0, help="weight of the KL term")
    t.add_argument("--basis", type=int, default=16, help="basis volumes of the decoder")
    t.add_argument("--learning-rate", type=float, default=3e-3,
                   help="Adam step size (3e-3 converges in 3-4 epochs on the simulated sets; 1e-3 needs more)")
    t.add_argument("--device", default="cpu", help="cpu, cuda[:N], or a comma-separated list for DDP (cuda:0,cuda:1)")
    t.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--continue", dest="resume", action="store_true", help="resume from output-dir/checkpoint.pt")
    t.add_argument("--pose-free", action="store_true",
                   help="ignore the particles' poses: learn them with a pose head (quaternion + shift)")
    t.add_argument("--reference", default=None, help="pose-free: MRC map to start the mean volume from "
                                                     "(default: a soft sphere)")
    t.add_argument("--pose-heads", type=int, default=8, help="pose-free: candidate poses per particle")
    a = sub.add_parser("analyze", help="embeddings, landscape, clusters, volumes and trajectories")
    a.add_argument("train_dir", help="output folder of train")
    a.add_argument("--output-dir", default=None, help="output folder (default: train_dir/analysis)")
    a.add_argument("--clusters", type=int, default=0, help="number of clusters (0: suggested by GMM BIC)")
    a.add_argument("--max-clusters", type=int, default=8, help="largest K tried by the BIC")
    a.add_argument("--trajectory-steps", type=int, default=7, help="volumes along each principal component")
    a.add_argument("--pcs", type=int, default=2, help="principal components with a trajectory")
    a.add_argument("--no-umap", action="store_true", help="skip the UMAP embedding (PCA only)")
    a.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    a.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        if args.command == "train":
            from .train import train
            train(args.particles, args.output_dir, latent_dim=args.latent_dim, epochs=args.epochs, box=args.box,
                  batch_size=args.batch_size, beta=args.beta, n_basis=args.basis,
                  learning_rate=args.learning_rate, devices=parse_devices(args.device), resume=args.resume,
                  seed=args.seed, pose_free=args.pose_free, reference=args.reference, pose_heads=args.pose_heads)
        else:
            from .analyze import analyze
            analyze(args.train_dir, n_clusters=args.clusters, max_clusters=args.max_clusters,
                    trajectory_steps=args.trajectory_steps, n_pcs=args.pcs, umap=not args.no_umap, seed=args.seed,
                    output_dir=args.output_dir)
    except InputError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from deepcryo.core.cli import run_main  # one line, status 2, for a full disk or a refused write
    sys.exit(run_main(main))
