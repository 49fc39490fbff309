"""Direct Fourier inversion of a particle set with poses (CTF-weighted, RELION's method).

Example::

    python -m deepcryo.core.reconstruct --particles P.star --output map.mrc --halves --symmetry C1
    python -m deepcryo.core.reconstruct --particles P.star --output map.mrc --max-resolution 8 --device cuda
    python -m deepcryo.core.reconstruct --particles P.star --output map.mrc --halves --mask-diameter 180

writes ``map.mrc`` (with ``--halves`` also ``map_half1.mrc``, ``map_half2.mrc`` and ``map_fsc.star``) and
prints the half-map FSC resolution at 0.143; with ``--mask-diameter`` the FSC is that inside a soft sphere of the
particle, corrected for the mask by phase randomisation (:func:`deepcryo.core.fsc.masked_fsc`). Half sets come from ``rlnRandomSubset`` when present,
otherwise from a seeded random split (which is written nowhere, the input is only read). The method is in
:mod:`deepcryo.core.reconstruct`.
"""
import logging
import os

from deepcryo.constants import SYMMETRY_NAMES

from .. import cli
from ..errors import InputError
from ..fsc import fsc_resolution_A, masked_fsc, particle_mask
from ..geometry import symmetry_matrices
from ..mrc import write_mrc
from ..particles import read_particles
from ..reconstruct import reconstruct_star
from ..resolution import write_fsc_star

logger = logging.getLogger(__name__)


def add_args(parser):
    parser.add_argument("--particles", required=True, help="RELION 3.1 (or 3.0) particle STAR with poses")
    parser.add_argument("--output", required=True, help="output map (.mrc)")
    parser.add_argument("--halves", action="store_true", help="also write half maps and their FSC")
    parser.add_argument("--symmetry", default="C1",
                        help="point group, RELION's names and operators (default C1): " + SYMMETRY_NAMES)
    parser.add_argument("--max-resolution", type=float, default=0.0,
                        help="highest resolution inserted, Å (0: Nyquist)")
    parser.add_argument("--mask-diameter", type=float, default=0.0,
                        help="with --halves: FSC inside a soft sphere of this particle diameter, Å, corrected for "
                             "the mask by phase randomisation as relion_postprocess (0: unmasked FSC)")
    parser.add_argument("--batch-size", type=int, default=256, help="particles per batch (memory bound)")
    cli.add_device_argument(parser)
    cli.add_threads_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random half split")


def _progress(done, total, seconds):
    logger.info("reconstruct: %d/%d particles (%.0f particles/s)", done, total, done / max(seconds, 1e-9))


def main(args):
    try:
        symmetry_matrices(args.symmetry)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if args.mask_diameter < 0:
        raise InputError("--mask-diameter must be >= 0 Å (0: unmasked FSC), got %g" % args.mask_diameter)
    star = read_particles(args.particles)
    star.require("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    result = reconstruct_star(star, args.halves, args.symmetry, args.max_resolution or None, args.batch_size,
                              args.device, args.seed, _progress)
    px = star.pixel_size_A
    root, ext = os.path.splitext(args.output)
    write_mrc(args.output, result["map"], px)
    if args.halves:
        write_mrc(root + "_half1" + (ext or ".mrc"), result["half1"], px)
        write_mrc(root + "_half2" + (ext or ".mrc"), result["half2"], px)
        box = result["map"].shape[-1]
        curve = result["fsc"]
        if args.mask_diameter > 0:
            curve = masked_fsc(result["half1"], result["half2"], particle_mask(box, px, args.mask_diameter).numpy(),
                               seed=args.seed).corrected
        write_fsc_star(root + "_fsc.star", curve, box, px)
        logger.info("resolution (FSC 0.143%s): %.2f A; (FSC 0.5): %.2f A",
                    ", in a %g A sphere" % args.mask_diameter if args.mask_diameter > 0 else "",
                    fsc_resolution_A(curve, px, 0.143), fsc_resolution_A(curve, px, 0.5))
    logger.info("wrote %s", args.output)
