"""Align particles with an index (SwiftAlign).

Example::

    python -m deepcryo.swiftalign query --index index_dir/ --particles P.star --output aligned.star \\
        --nprobe 8 --k 5
    python -m deepcryo.swiftalign query --index index_dir/ --particles P.star --output refined.star \\
        --local --prior aligned.star --local-steps 2 --local-shift 2

Writes a RELION 3.1 STAR with the angles (rlnAngleRot/Tilt/Psi, degrees) and origins (rlnOriginX/YAngst, Å)
found, and the columns dcSwiftScore (normalised correlation), dcSwiftConfidence (score gap to the best pose
far from the winner). With ``--device cuda…`` the
index is searched with faiss-gpu, sharded over the GPUs; the exact scoring of the candidates stays on the CPU.
A faiss without GPU support, or an index built for the CPU (fast-scan), is searched on the CPU with one
warning line.
"""
import logging
import time

from deepcryo.core.errors import InputError

from ..query import query
from ._shared import add_common_args

logger = logging.getLogger(__name__)


def add_args(parser):
    parser.add_argument("--index", required=True, help="index folder written by train")
    add_common_args(parser, several_devices=True)
    parser.add_argument("--output", required=True, help="aligned particle STAR")
    parser.add_argument("--nprobe", type=int, default=8,
                        help="inverted lists visited per search (each particle searches once per origin, so its "
                             "matches come from many lists; more rarely finds more: benchmarks/RESULTS.md)")
    parser.add_argument("--k", type=int, default=5,
                        help="candidates refined per particle: all k one level, the best of them to the finest "
                             "(4·k index matches are re-ranked exactly)")
    parser.add_argument("--local", action="store_true", help="search only around the prior poses")
    parser.add_argument("--prior", help="STAR with the prior poses (default: the particles' own)")
    parser.add_argument("--local-steps", type=int, default=2, help="local angular range, ± angular steps")
    parser.add_argument("--local-shift", type=float, help="local origin range, ± px (default: the index max shift)")


def main(args):
    t0 = time.time()
    # align's per-batch progress lines are DEBUG (refine aligns at every iteration and keeps them quiet);
    # this program shows them
    progress = logging.getLogger(query.__module__)
    level = progress.level
    progress.setLevel(logging.DEBUG)
    try:
        query(args.index, args.particles, args.output, k=args.k, nprobe=args.nprobe, local=args.local,
              prior=args.prior, local_steps=args.local_steps, local_shift_px=args.local_shift,
              devices=args.devices, memory_limit_GB=args.memory_limit)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    finally:
        progress.setLevel(level)
    logger.info("wrote %s (%.1f s)", args.output, time.time() - t0)
