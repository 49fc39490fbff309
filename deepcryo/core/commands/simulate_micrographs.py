"""Micrographs with known defocus U/V/angle and a truth STAR (for the defocus CNN and its tests).

Example::

    python -m deepcryo.core.simulate micrographs --output-dir mics/ --n 20 --size 4096
    python -m deepcryo.core.simulate micrographs --output-dir mics/ --n 50 --size 1024 --voltages 300 \\
        --pixel-size-min 1.0 --pixel-size-max 1.0 --defocus-min 5000 --defocus-max 30000

Writes ``mic_*.mrc`` and ``micrographs_ctf.star`` (the true CTF of each micrograph) into the output folder;
the simulation is :func:`deepcryo.core.micrographs.simulate_micrograph`.
"""
import logging

from ..errors import InputError
from ..micrographs import simulate_micrograph_set

logger = logging.getLogger(__name__)


def add_args(parser):
    parser.add_argument("--output-dir", required=True, help="output folder")
    parser.add_argument("--n", type=int, default=20, help="number of micrographs")
    parser.add_argument("--size", type=int, default=4096, help="micrograph side (px)")
    parser.add_argument("--pixel-size-min", type=float, default=0.5, help="Å/px")
    parser.add_argument("--pixel-size-max", type=float, default=2.5, help="Å/px")
    parser.add_argument("--voltages", type=float, nargs="+", default=[200.0, 300.0], help="kV, drawn at random")
    parser.add_argument("--cs", type=float, default=2.7, help="mm")
    parser.add_argument("--defocus-min", type=float, default=3000.0, help="mean defocus, Å")
    parser.add_argument("--defocus-max", type=float, default=50000.0, help="mean defocus, Å")
    parser.add_argument("--astigmatism", type=float, default=2000.0, help="max U - V, Å")
    parser.add_argument("--seed", type=int, default=0, help="seed of every draw")


def main(args):
    if args.n < 1 or args.size < 64 or not 0 < args.pixel_size_min <= args.pixel_size_max:
        raise InputError("need --n >= 1, --size >= 64 and 0 < --pixel-size-min <= --pixel-size-max")
    if not 0 < args.defocus_min <= args.defocus_max or args.astigmatism < 0:
        raise InputError("need 0 < --defocus-min <= --defocus-max and --astigmatism >= 0")
    star, _ = simulate_micrograph_set(
        args.n, args.output_dir, size_px=args.size, seed=args.seed,
        pixel_size_range_A=(args.pixel_size_min, args.pixel_size_max), voltages_kV=tuple(args.voltages),
        cs_mm=args.cs, defocus_range_A=(args.defocus_min, args.defocus_max), astigmatism_max_A=args.astigmatism)
    logger.info("wrote %s (%d micrographs of %d px)", star, args.n, args.size)
