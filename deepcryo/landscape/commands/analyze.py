"""Embeddings, landscape, clusters, volumes and trajectories of a trained VAE.

Example::

    python -m deepcryo.landscape analyze vae --clusters 2
    python -m deepcryo.landscape analyze vae --clusters 0 --no-umap --output-dir vae/analysis_pca

``--clusters 0`` takes the number of clusters suggested by the Gaussian-mixture BIC. Writes into
``vae/analysis`` unless given ``--output-dir``.
"""
from deepcryo.core import cli


def add_args(parser):
    parser.add_argument("train_dir", help="output folder of train")
    parser.add_argument("--output-dir", default=None, help="output folder (default: train_dir/analysis)")
    parser.add_argument("--clusters", type=int, default=0, help="number of clusters (0: suggested by GMM BIC)")
    parser.add_argument("--max-clusters", type=int, default=8, help="largest K tried by the BIC")
    parser.add_argument("--trajectory-steps", type=int, default=7, help="volumes along each principal component")
    parser.add_argument("--pcs", type=int, default=2, help="principal components with a trajectory")
    parser.add_argument("--no-umap", action="store_true", help="skip the UMAP embedding (PCA only)")
    cli.add_threads_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the clustering and the embedding")


def main(args):
    from ..analyze import analyze
    analyze(args.train_dir, n_clusters=args.clusters, max_clusters=args.max_clusters,
            trajectory_steps=args.trajectory_steps, n_pcs=args.pcs, umap=not args.no_umap, seed=args.seed,
            output_dir=args.output_dir)
