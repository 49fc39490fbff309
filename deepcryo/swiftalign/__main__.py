"""SwiftAlign programs: build an index of reference projections, then align particles with it.

Examples::

    python -m deepcryo.swiftalign train --reference map.mrc --particles P.star --angular-step 7.5 \\
        --max-shift 4 --max-resolution 16 --output index_dir/
    python -m deepcryo.swiftalign train --reference map.mrc --particles P.star --max-resolution 12 \\
        --max-shift 8 --index-factory Flat --ctf-groups 4 --output exact_index/
    python -m deepcryo.swiftalign query --index index_dir/ --particles P.star --output aligned.star \\
        --nprobe 32 --k 5
    python -m deepcryo.swiftalign query --index index_dir/ --particles P.star --output refined.star \\
        --local --prior aligned.star --local-steps 2 --local-shift 2
    python -m deepcryo.swiftalign refine --particles P.star --reference initial.mrc --output-dir out/ \\
        --symmetry C1 --initial-resolution 30 [--mask m.mrc] [--max-iterations 12] [--continue]

``--device cuda:0 [cuda:1 …]`` runs the projections (and in ``refine`` the reconstructions) on the first GPU
and searches the index with faiss-gpu, sharded over all of them; ``train`` then builds an index faiss-gpu can
search (:func:`.index.default_factory`). The exact scoring of the candidates stays on the CPU, where the
particle images are. CUDA asked for on a host without it stops the program at the start;
a faiss without GPU support, or an index built for the CPU (fast-scan), is searched on the CPU with one
warning line.

``train`` writes ``index_dir/`` (``manifest.json``, ``reference.mrc``, ``shard_*.faiss``); ``query`` writes a
RELION 3.1 STAR with the angles (rlnAngleRot/Tilt/Psi, degrees) and origins (rlnOriginX/YAngst, Å) found,
and the columns dcSwiftScore (normalised correlation), dcSwiftConfidence (score gap to the best pose far
from the winner) and dcSwiftCtfGroup (CTF group of the matched reference). Errors in the input stop the
program with a one-line reason and exit status 2, before anything is written.
"""
import argparse
import sys
import time

from deepcryo.constants import SYMMETRY_NAMES
from deepcryo.core import io
from deepcryo.core.cli import parse_devices

from .index import train
from .query import query
from .refine import RefineParams, refine


def _threads(n):
    import faiss
    import torch
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def _common(p):
    p.add_argument("--particles", required=True, help="particle STAR (RELION 3.1 or 3.0) with CTF columns")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch and faiss)")
    p.add_argument("--memory-limit", type=float, default=4.0, help="memory bound for batches and index shards, GB")
    p.add_argument("--device", nargs="+", default=["cpu"],
                   help="cpu, or CUDA devices (cuda:0 cuda:1 …: the index is sharded over them; "
                        "refine takes one)")


def _parser():
    parser = argparse.ArgumentParser(prog="python -m deepcryo.swiftalign", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="build the index of reference projections")
    t.add_argument("--reference", required=True, help="reference map (MRC), same box and pixel size as the particles")
    _common(t)
    t.add_argument("--angular-step", type=float, help="angular step of directions and in-plane angles, degrees")
    t.add_argument("--max-resolution", type=float, help="resolution limit of the search vectors, Å")
    t.add_argument("--max-shift", type=float, default=5.0, help="largest origin searched per axis, px")
    t.add_argument("--shift-step", type=float, help="shift grid step, px (default max resolution / (4 px size))")
    t.add_argument("--index-factory", help="faiss index_factory string (default from the gallery size; "
                                           "'Flat' = exact search)")
    t.add_argument("--ctf-groups", type=int, default=8, help="number of defocus clusters (CTF groups)")
    t.add_argument("--symmetry", default="C1", help="point group, RELION's names and operators (default C1): " + SYMMETRY_NAMES)
    t.add_argument("--whiten", action="store_true", help="weight frequencies by the inverse noise power")
    t.add_argument("--output", required=True, help="index folder to create")
    q = sub.add_parser("query", help="align particles with an index")
    q.add_argument("--index", required=True, help="index folder written by train")
    _common(q)
    q.add_argument("--output", required=True, help="aligned particle STAR")
    q.add_argument("--nprobe", type=int, default=32, help="inverted lists visited per search")
    q.add_argument("--k", type=int, default=5, help="candidates refined per particle (4·k index matches are re-ranked exactly)")
    q.add_argument("--local", action="store_true", help="search only around the prior poses")
    q.add_argument("--prior", help="STAR with the prior poses (default: the particles' own)")
    q.add_argument("--local-steps", type=int, default=2, help="local angular range, ± angular steps")
    q.add_argument("--local-shift", type=float, help="local origin range, ± px (default: the index max shift)")
    r = sub.add_parser("refine", help="iterative gold-standard 3D refinement (SwiftRes)",
                       description="Writes out/it###_{half1,half2}.mrc, _fsc.star, _particles.star, _model.json "
                                   "per iteration and out/{map,half1,half2}.mrc, fsc.star, particles.star at the end.")
    r.add_argument("--reference", required=True, nargs="+",
                   help="initial map(s) (MRC); several = multi-reference refinement (one class each)")
    _common(r)
    r.add_argument("--output-dir", required=True, help="output folder")
    r.add_argument("--symmetry", default="C1", help="point group, RELION's names and operators (default C1): " + SYMMETRY_NAMES)
    r.add_argument("--initial-resolution", type=float, default=30.0, help="low-pass of the initial map, Å")
    r.add_argument("--mask", help="mask (MRC, values 0-1; default: soft sphere of the particle diameter)")
    r.add_argument("--particle-diameter", type=float, help="particle diameter, Å (default 0.8 x box x pixel size)")
    r.add_argument("--max-iterations", type=int, default=12, help="iterations at most")
    r.add_argument("--global-iterations", type=int, default=1, help="first iterations with a global search")
    r.add_argument("--local-steps", type=int, default=2, help="local search range, ± angular steps")
    r.add_argument("--max-shift", type=float, help="global origin search range, ± px (default 10%% of the box)")
    r.add_argument("--repetitions", type=int, default=1, choices=(1, 2),
                   help="2: align twice with differently perturbed samplings, leave out disagreeing particles")
    r.add_argument("--ctf-groups", type=int, default=4, help="CTF groups of the global index")
    r.add_argument("--k", type=int, default=3, help="candidates refined per particle")
    r.add_argument("--whiten", action="store_true", help="weight frequencies by the inverse noise power")
    r.add_argument("--seed", type=int, default=0, help="seed of the half split and the perturbations")
    r.add_argument("--continue", dest="resume", action="store_true",
                   help="resume after the last completed iteration in --output-dir")
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    _threads(args.threads)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    t0 = time.time()
    try:
        devices = parse_devices(args.device)
        if args.command == "train":
            if args.angular_step is None and args.max_resolution is None:
                raise io.InputError("give --angular-step or --max-resolution (or both)")
            m = train(args.reference, args.particles, args.output, angular_step_deg=args.angular_step,
                      max_resolution_A=args.max_resolution, max_shift_px=args.max_shift,
                      shift_step_px=args.shift_step, index_factory=args.index_factory,
                      n_ctf_groups=args.ctf_groups, symmetry=args.symmetry, whiten=args.whiten,
                      memory_limit_GB=args.memory_limit, devices=devices, log=log)
            log("wrote %s: %d references, %s, %d bytes/reference (%.1f s)"
                % (args.output, m["n_references"], m["factory"], m["bytes_per_reference"], time.time() - t0))
        elif args.command == "refine":
            if len(devices) > 1:
                raise io.InputError("refine runs on one device, got --device %s" % " ".join(devices))
            params = RefineParams(symmetry=args.symmetry, initial_resolution_A=args.initial_resolution,
                                  particle_diameter_A=args.particle_diameter, max_iterations=args.max_iterations,
                                  global_iterations=args.global_iterations, local_steps=args.local_steps,
                                  max_shift_px=args.max_shift, repetitions=args.repetitions,
                                  n_ctf_groups=args.ctf_groups, k=args.k, whiten=args.whiten, seed=args.seed,
                                  device=devices[0], memory_limit_GB=args.memory_limit)
            refine(args.particles, args.reference, args.output_dir, params, mask=args.mask, resume=args.resume,
                   log=log)
            log("wrote %s (%.1f s)" % (args.output_dir, time.time() - t0))
        else:
            query(args.index, args.particles, args.output, k=args.k, nprobe=args.nprobe, local=args.local,
                  prior=args.prior, local_steps=args.local_steps, local_shift_px=args.local_shift,
                  devices=devices, memory_limit_GB=args.memory_limit, log=log)
            log("wrote %s (%.1f s)" % (args.output, time.time() - t0))
    except (io.InputError, ValueError) as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from deepcryo.core.cli import run_main  # one line, status 2, for a full disk or a refused write
    sys.exit(run_main(main))
