"""Build the index of reference projections (SwiftAlign).

Example::

    python -m deepcryo.swiftalign train --reference map.mrc --particles P.star --angular-step 7.5 \\
        --max-shift 4 --max-resolution 16 --output index_dir/
    python -m deepcryo.swiftalign train --reference map.mrc --particles P.star --max-resolution 12 \\
        --max-shift 8 --index-factory Flat --output exact_index/
    python -m deepcryo.swiftalign train --reference map.mrc --particles P.star --angular-step 7.5 \\
        --output gpu_index/ --device cuda:0 cuda:1

Writes ``index_dir/`` (``manifest.json``, ``reference.mrc``, ``shard_*.faiss``). With ``--device cuda…`` the
projections run on the first GPU and the index is one faiss-gpu can search
(:func:`deepcryo.swiftalign.index.default_factory`).
"""
import logging
import time

from deepcryo.constants import SYMMETRY_NAMES
from deepcryo.core.errors import InputError

from ..index import train
from ._shared import add_common_args

logger = logging.getLogger(__name__)


def add_args(parser):
    parser.add_argument("--reference", required=True,
                        help="reference map (MRC), same box and pixel size as the particles")
    add_common_args(parser, several_devices=True)
    parser.add_argument("--angular-step", type=float, help="angular step of directions and in-plane angles, degrees")
    parser.add_argument("--max-resolution", type=float, help="resolution limit of the search vectors, Å")
    parser.add_argument("--max-shift", type=float, default=5.0, help="largest origin searched per axis, px")
    parser.add_argument("--shift-step", type=float, help="shift grid step, px (default max resolution / (4 px size))")
    parser.add_argument("--index-factory", help="faiss index_factory string (default from the gallery size; "
                                                "'Flat' = exact search)")
    parser.add_argument("--symmetry", default="C1",
                        help="point group, RELION's names and operators (default C1): " + SYMMETRY_NAMES)
    parser.add_argument("--whiten", action="store_true", help="weight frequencies by the inverse noise power")
    parser.add_argument("--output", required=True, help="index folder to create")


def main(args):
    if args.angular_step is None and args.max_resolution is None:
        raise InputError("give --angular-step or --max-resolution (or both)")
    t0 = time.time()
    try:
        m = train(args.reference, args.particles, args.output, angular_step_deg=args.angular_step,
                  max_resolution_A=args.max_resolution, max_shift_px=args.max_shift, shift_step_px=args.shift_step,
                  index_factory=args.index_factory, symmetry=args.symmetry,
                  whiten=args.whiten, memory_limit_GB=args.memory_limit, devices=args.devices)
    except ValueError as exc:  # an unknown symmetry, a resolution beyond Nyquist
        raise InputError(str(exc)) from exc
    logger.info("wrote %s: %d references, %s, %d bytes/reference (%.1f s)", args.output, m["n_references"],
                m["factory"], m["bytes_per_reference"], time.time() - t0)
