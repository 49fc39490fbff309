"""One body frame for every group of a landscape: measure the turn of each group map's static body against the
reference group's and turn that group's poses by it (:mod:`deepcryo.landscape.frames`).

Example::

    python -m deepcryo.landscape analyze vae --clusters 5 --no-umap
    python -m deepcryo.landscape frames --particles vae/analysis/particles.star \\
        --maps vae/analysis/cluster_*_reconstructed.mrc --output frames/particles.star
    python -m deepcryo.landscape frames --particles vae/analysis/particles.star --group-column dcPC1 --bins 8 \\
        --box 32 --interpolate --output frames/particles.star
    python -m deepcryo.landscape train --particles frames/particles.star --output-dir vae2 --box 32
    python -m deepcryo.landscape analyze vae2 --clusters 8 --no-umap     # continuous, >= 2 500 per group: round two
    python -m deepcryo.landscape frames --particles vae2/analysis/particles.star --group-column dcPC1 --bins 8 \\
        --box 32 --interpolate --output frames2/particles.star
    python -m deepcryo.landscape train --particles frames2/particles.star --output-dir vae3 --box 32

A consensus refinement aligns every particle to one map, so each conformation's particles share a turn of their
frame (about half the domain's turn, between body and domain), and a VAE decodes each conformation in its own
frame. The groups: the 1-based values of ``--group-column`` (analyze's k-means ``dcCluster``), or with ``--bins K``
K equal groups along that column (``dcPC1``: a continuous motion runs along the first principal component, where
k-means may cut across it). The maps (``--maps``, one per group, group 1 first; without them each group's
particles are reconstructed at ``--box``) are compared on the part
where they agree once turned into one frame, the static body (the larger rigid part); each group's poses A become
A·Rᵀ and its origins move with t, (R, t) the rigid motion of its map's body onto the common frame (by default the
mean of the groups' frames, so the consensus's frame is kept on average); with ``--interpolate`` (bins only, for a
continuous motion) each particle takes the motion interpolated along the column between the groups'. Then (``--refine-resolution``, 0 to skip)
each particle's pose is refined by a local search against its own group's map, now in the common frame. Writes the STAR (with ``dcFrameGroup``), ``<output stem>_frames.json`` (the turns
in degrees) and ``<output stem>_static_body.mrc`` (the static body mask).
"""


def add_args(parser):
    parser.add_argument("--particles", required=True, help="STAR with the poses and a group column (analyze's "
                                                           "analysis/particles.star)")
    parser.add_argument("--maps", nargs="+", default=None, help="one map per group, group 1 first (default: "
                                                                 "reconstructed from the groups' particles)")
    parser.add_argument("--output", required=True, help="output STAR with the turned poses")
    parser.add_argument("--group-column", default="dcCluster", help="1-based group of each particle, or with "
                                                                    "--bins the column binned")
    parser.add_argument("--bins", type=int, default=0, help="K equal groups along --group-column (0: its values "
                                                            "are the groups)")
    parser.add_argument("--box", type=int, default=32, help="box of the reconstructed group maps (px)")
    parser.add_argument("--resolution", type=float, default=10.0,
                        help="low-pass of the group maps (Å; 15 Å at 4 Å/px lost most of the turn in our tests)")
    parser.add_argument("--reference", type=int, default=None,
                        help="group whose frame all take (1-based; default: the mean of the groups' frames, the "
                             "consensus's frame on average)")
    parser.add_argument("--max-angle", type=float, default=20.0, help="largest turn searched (degrees)")
    parser.add_argument("--refine-resolution", type=float, default=8.0,
                        help="then refine each particle's pose locally against its group's map at the particles' "
                             "box, low-passed to this (Å; 0: no refinement; worth it with thousands of particles "
                             "per group)")
    parser.add_argument("--interpolate", action="store_true",
                        help="with --bins: each particle's turn and shift interpolated along --group-column between "
                             "the groups' (placed at their medians, carried on past the end medians to the end "
                             "groups' outer tenth), instead of its group's: for a continuous motion, in two rounds "
                             "with thousands of particles per group (train, analyze and frames again on the second "
                             "landscape), in one with a few hundred")


def main(args):
    from ..frames import correct_frames
    correct_frames(args.particles, args.output, maps=args.maps, group_column=args.group_column, bins=args.bins,
                   box=args.box, reference=args.reference, max_angle_deg=args.max_angle,
                   resolution_A=args.resolution, refine_resolution_A=args.refine_resolution,
                   interpolate=args.interpolate)
