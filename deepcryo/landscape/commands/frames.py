"""One body frame for every group of a landscape: measure the turn of each group map's static body against the
reference group's and turn that group's poses by it (:mod:`deepcryo.landscape.frames`).

Example::

    python -m deepcryo.landscape analyze vae --clusters 5 --no-umap
    python -m deepcryo.landscape frames --particles vae/analysis/particles.star \\
        --maps vae/analysis/cluster_*_reconstructed.mrc --output frames/particles.star
    python -m deepcryo.landscape train --particles frames/particles.star --output-dir vae2 --box 32

A consensus refinement aligns every particle to one map, so each conformation's particles share a turn of their
frame (about half the domain's turn, between body and domain), and a VAE decodes each conformation in its own
frame. The maps (one per group, in the order of the groups 1 … K of ``--group-column``) are compared on the part
where they agree once turned into one frame, the static body (the larger rigid part); each group's poses A become
A·Rᵀ with R its map's turn onto the reference group's. Writes the STAR, ``<output stem>_frames.json`` (the turns
in degrees) and ``<output stem>_static_body.mrc`` (the static body mask).
"""


def add_args(parser):
    parser.add_argument("--particles", required=True, help="STAR with the poses and a group column (analyze's "
                                                           "analysis/particles.star)")
    parser.add_argument("--maps", required=True, nargs="+", help="one map per group, group 1 first")
    parser.add_argument("--output", required=True, help="output STAR with the turned poses")
    parser.add_argument("--group-column", default="dcCluster", help="1-based group of each particle")
    parser.add_argument("--reference", type=int, default=None, help="reference group (1-based; default the most "
                                                                    "populated)")
    parser.add_argument("--max-angle", type=float, default=20.0, help="largest turn searched (degrees)")


def main(args):
    from ..frames import correct_frames
    correct_frames(args.particles, args.maps, args.output, group_column=args.group_column,
                   reference=args.reference, max_angle_deg=args.max_angle)
