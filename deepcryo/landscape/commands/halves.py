"""Train the landscape on two half sets independently and measure how well the halves agree (gold standard).

Example::

    python -m deepcryo.landscape halves --particles sim/particles.star --output-dir halves --box 32 \\
        --latent-dim 8 --epochs 10 --clusters 2

The halves are the particles' ``rlnRandomSubset`` (1/2) when the STAR has it, else a random split (``--seed``).
Each half is trained as ``train`` would (same options) into ``output-dir/half1`` and ``half2``; then every
particle is encoded by both, and ``output-dir/halves.json`` gets the R² of the best affine map between the
two latent spaces, their canonical correlations, the adjusted Rand index of k-means (``--clusters``) on
each, and per cluster the FSC of the two halves' decoded volumes at corresponding latent points (printed too).
Poses must be given (a pose-free half learns its own frame and hand, so its volumes cannot be compared).
"""
from .train import add_training_args


def add_args(parser):
    add_training_args(parser)
    parser.add_argument("--clusters", type=int, default=2, help="k-means clusters compared between the halves")


def main(args):
    from ..halves import train_halves
    train_halves(args.particles, args.output_dir, n_clusters=args.clusters, seed=args.seed,
                 latent_dim=args.latent_dim, epochs=args.epochs, box=args.box, batch_size=args.batch_size,
                 beta=args.beta, n_basis=args.basis, learning_rate=args.learning_rate, devices=args.devices,
                 resume=args.resume, symmetry=args.symmetry, volume_steps=args.volume_steps,
                 beta_warmup_epochs=args.beta_warmup_epochs)
