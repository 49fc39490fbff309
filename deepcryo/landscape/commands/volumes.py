"""Decode volumes at chosen latent points, along principal components, or along a path through the data.

Example::

    python -m deepcryo.landscape volumes vae --output-dir vols --zfile points.txt
    python -m deepcryo.landscape volumes vae --output-dir vols --pc 2 --pc-points 10 --percentiles 5 95
    python -m deepcryo.landscape volumes vae --output-dir vols --path-particles 12 873 --path-points 10
    python -m deepcryo.landscape volumes vae --output-dir vols \\
        --path-zfile vae/analysis/cluster_centres.txt --path-rows 1 2

``--zfile``: a text file (or ``.npy``) with one latent point per row, as cryoDRGN's ``eval_vol --zfile``.
``--pc N``: ``--pc-points`` volumes along each of the first N principal components of the particles' latents,
between two percentiles of their scores (cryoDRGN's ``analyze --pc``). ``--path-particles I J`` (0-based,
STAR order) or ``--path-zfile`` (rows ``--path-rows``, default the first and the last, each moved to its
nearest particle): the shortest path between them in the k-nearest-neighbour graph of the latents
(cryoDRGN's ``graph_traversal``), resampled to ``--path-points`` volumes. Volumes are at the training's working
box and pixel size; each set also gets ``<name>_z.txt`` with its latent points, and ``volumes.json`` lists them.
"""
from deepcryo.core import cli


def add_args(parser):
    parser.add_argument("train_dir", help="output folder of train")
    parser.add_argument("--output-dir", required=True, help="output folder of the volumes")
    parser.add_argument("--zfile", default=None, help="latent points, one per row (text or .npy)")
    parser.add_argument("--pc", type=int, default=0, help="number of principal components with a trajectory")
    parser.add_argument("--pc-points", type=int, default=10, help="volumes along each principal component")
    parser.add_argument("--percentiles", type=float, nargs=2, default=(5.0, 95.0), metavar=("LOW", "HIGH"),
                        help="ends of the PC trajectories, percentiles of the particles' scores")
    parser.add_argument("--path-particles", type=int, nargs=2, default=None, metavar=("START", "END"),
                        help="path between these particles (0-based indices, STAR order)")
    parser.add_argument("--path-zfile", default=None, help="path between latent points of this file (rows "
                                                           "--path-rows), each moved to its nearest particle")
    parser.add_argument("--path-rows", type=int, nargs=2, default=None, metavar=("START", "END"),
                        help="1-based rows of --path-zfile (default: first and last)")
    parser.add_argument("--path-points", type=int, default=10, help="volumes along the path")
    parser.add_argument("--neighbors", type=int, default=10, help="neighbours per particle in the path's graph")
    cli.add_threads_argument(parser)


def main(args):
    from ..volumes import volumes
    volumes(args.train_dir, args.output_dir, zfile=args.zfile, n_pcs=args.pc, pc_points_n=args.pc_points,
            percentiles=args.percentiles, path_particles=args.path_particles, path_zfile=args.path_zfile,
            path_rows=args.path_rows, path_points=args.path_points, neighbours=args.neighbors)
