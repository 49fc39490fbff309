"""Iterative gold-standard 3D refinement (SwiftRes).

Example::

    python -m deepcryo.swiftalign refine --particles P.star --reference initial.mrc --output-dir out/ \\
        --symmetry C1 --initial-resolution 30
    python -m deepcryo.swiftalign refine --particles P.star --reference initial.mrc --output-dir out/ \\
        --mask mask.mrc --max-iterations 12 --repetitions 2 --device cuda:0
    python -m deepcryo.swiftalign refine --particles P.star --reference initial.mrc --output-dir out/ --continue
    python -m deepcryo.swiftalign refine --particles P.star --reference class1.mrc class2.mrc --output-dir out/

Writes out/it###_{half1,half2}.mrc, _fsc.star, _particles.star, _model.json per iteration and
out/{map,half1,half2}.mrc, fsc.star, particles.star and model.json at the end. Several references: one class
each (multi-reference refinement). Every setting of :class:`deepcryo.swiftalign.refine.RefineParams` that
changes the result has its option here.
"""
import logging
import time

from deepcryo.constants import SYMMETRY_NAMES
from deepcryo.core import cli
from deepcryo.core.errors import InputError

from ..refine import RefineParams, refine_3d
from ._shared import add_common_args

logger = logging.getLogger(__name__)


def add_args(parser):
    parser.add_argument("--reference", required=True, nargs="+",
                        help="initial map(s) (MRC); several = multi-reference refinement (one class each)")
    add_common_args(parser, several_devices=False)
    parser.add_argument("--output-dir", required=True, help="output folder")
    parser.add_argument("--symmetry", default="C1",
                        help="point group, RELION's names and operators (default C1): " + SYMMETRY_NAMES)
    parser.add_argument("--initial-resolution", type=float, default=30.0, help="low-pass of the initial map, Å")
    parser.add_argument("--mask", help="mask (MRC, values 0-1; default: soft sphere of the particle diameter)")
    parser.add_argument("--particle-diameter", type=float,
                        help="particle diameter, Å (default 0.8 x box x pixel size)")
    parser.add_argument("--max-iterations", type=int, default=12, help="iterations at most")
    parser.add_argument("--global-iterations", type=int, default=1, help="first iterations with a global search")
    parser.add_argument("--local-steps", type=int, default=2, help="local search range, ± angular steps")
    parser.add_argument("--max-shift", type=float, help="global origin search range, ± px (default 10%% of the box)")
    parser.add_argument("--join-resolution", type=float, default=40.0,
                        help="the half maps share their Fourier components below this resolution, Å")
    parser.add_argument("--repetitions", type=int, default=1, choices=(1, 2),
                        help="2: align twice with differently perturbed samplings, leave out disagreeing particles")
    parser.add_argument("--k", type=int, default=3,
                        help="candidates refined per particle in global iterations: all k one level, the best of "
                             "them to the finest")
    parser.add_argument("--nprobe", type=int, default=32, help="inverted lists of the global index visited per search")
    parser.add_argument("--whiten", action="store_true", help="weight frequencies by the inverse noise power")
    parser.add_argument("--batch-size", type=int, default=256, help="particles per reconstruction batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the half split and the perturbations")
    cli.add_continue_argument(parser, "the last completed iteration in --output-dir")


def main(args):
    t0 = time.time()
    params = RefineParams(symmetry=args.symmetry, initial_resolution_A=args.initial_resolution,
                          particle_diameter_A=args.particle_diameter, max_iterations=args.max_iterations,
                          global_iterations=args.global_iterations, local_steps=args.local_steps,
                          max_shift_px=args.max_shift, join_resolution_A=args.join_resolution,
                          repetitions=args.repetitions, k=args.k, nprobe=args.nprobe,
                          whiten=args.whiten, seed=args.seed, device=args.device, batch_size=args.batch_size,
                          memory_limit_GB=args.memory_limit)
    try:
        refine_3d(args.particles, args.reference, args.output_dir, params, mask=args.mask, resume=args.resume)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    logger.info("wrote %s (%.1f s)", args.output_dir, time.time() - t0)
