"""CTF of micrographs (CNN guess + physics refinement) → RELION CTF STAR.

Example::

    # estimate the CTF of every micrograph (RELION CTF STAR + PSD images in ctf_psd/)
    python -m deepcryo.defocus predict --micrographs 'mics/*.mrc' --pixel-size 0.85 --voltage 300 \\
        --cs 2.7 --amplitude-contrast 0.07 --output ctf.star

    # EPU micrographs (uint16, FEI extended header): the pixel size is read from the MRC header
    python -m deepcryo.defocus predict --micrographs 'Images-Disc1/*/Data/*_Data_*[0-9].mrc' --voltage 300 --cs 2.7 \\
        --amplitude-contrast 0.1 --output ctf.star

    # a known defocus range (Å) and a band where the rings are (CTFFIND's search range and resolution band)
    python -m deepcryo.defocus predict --micrographs 'mics/*.mrc' --pixel-size 1.0 --voltage 300 --cs 2.7 \
        --amplitude-contrast 0.07 --defocus-min 5000 --defocus-max 30000 --low-resolution 25 \
        --high-resolution 4 --output ctf.star

    # CNN only, from a RELION micrograph STAR (acquisition read from it), own model, first GPU
    python -m deepcryo.defocus predict --micrographs micrographs.star --output ctf.star --no-refine \\
        --model my_model.pt --device cuda

    # also the specimen's tilt (angle, axis) and ice thickness, as CTFFIND5 (lamellae, tilted or thick specimens)
    python -m deepcryo.defocus predict --micrographs 'mics/*.mrc' --pixel-size 1.5 --voltage 300 --cs 2.7 \
        --amplitude-contrast 0.07 --fit-tilt --fit-thickness --output ctf.star

A single unusable micrograph among others is reported ("skipped ...", on stderr) and the others go on.
"""
import logging

from deepcryo.core import cli
from deepcryo.core.errors import InputError

logger = logging.getLogger(__name__)


def add_args(parser):
    parser.add_argument("--micrographs", required=True, help="glob pattern of MRC files, or a micrograph STAR")
    parser.add_argument("--output", required=True, help="CTF STAR to write")
    parser.add_argument("--pixel-size", type=float, help="Å/px (default: from the STAR, else the MRC header)")
    parser.add_argument("--voltage", type=float, help="kV (default: from the STAR)")
    parser.add_argument("--cs", type=float, help="spherical aberration, mm (default: from the STAR)")
    parser.add_argument("--amplitude-contrast", type=float, help="fraction (default: from the STAR)")
    parser.add_argument("--no-refine", action="store_true", help="CNN only, no physics fit")
    parser.add_argument("--phase-shift", action="store_true", help="also fit a phase shift (phase plate)")
    parser.add_argument("--low-resolution", type=float, default=30.0, help="fit band low-resolution end, Å")
    parser.add_argument("--high-resolution", type=float, default=5.0, help="fit band high-resolution end, Å")
    parser.add_argument("--defocus-min", type=float, default=500.0, help="smallest defocus searched, Å")
    parser.add_argument("--defocus-max", type=float, default=float("inf"),
                        help="largest defocus searched, Å (default: no limit); the CNN's guess is clipped to the range")
    parser.add_argument("--fit-tilt", action="store_true",
                        help="also fit the specimen's tilt angle and axis (degrees, CTFFIND5's convention) from the "
                             "defoci of 512 px tiles: STAR columns dcCtfTiltAngle, dcCtfTiltAxis (needs >= 1024 px)")
    parser.add_argument("--fit-thickness", action="store_true",
                        help="also fit the specimen's thickness (Å) from the Thon rings' nodes: STAR columns "
                             "rlnCtfIceThickness (0 = no node seen: thinner than dcCtfIceThicknessMin, or rings too "
                             "weak beyond the first node; see benchmarks/RESULTS.md)")
    parser.add_argument("--model", help="weight file (default: the shipped weights)")
    parser.add_argument("--batch-size", type=int, default=8, help="micrographs per batch")
    cli.add_device_argument(parser)
    cli.add_threads_argument(parser)


def main(args):
    from .. import predict
    if not 0 < args.high_resolution < args.low_resolution:
        raise InputError("need 0 < --high-resolution < --low-resolution (Å)")
    if not 0 < args.defocus_min < args.defocus_max:
        raise InputError("need 0 < --defocus-min < --defocus-max (Å)")
    if args.batch_size < 1:
        raise InputError("--batch-size must be >= 1")
    defaults = dict(pixel_size_A=args.pixel_size, voltage_kV=args.voltage, cs_mm=args.cs,
                    amplitude_contrast=args.amplitude_contrast)
    results = predict.predict(args.micrographs, args.output, args.model, refine=not args.no_refine,
                              low_A=args.low_resolution, high_A=args.high_resolution, fit_phase=args.phase_shift,
                              batch_size=args.batch_size, device=args.device, defaults=defaults,
                              defocus_range_A=(args.defocus_min, args.defocus_max), fit_tilt=args.fit_tilt,
                              fit_thickness=args.fit_thickness)
    flagged = sum(r["flagged"] for r in results)
    logger.info("wrote %s (%d micrographs, %d flagged)", args.output, len(results), flagged)
