"""SwiftAlign programs: build an index of reference projections, align particles with it, refine a map.

Examples::

    python -m deepcryo.swiftalign train --reference map.mrc --particles P.star --angular-step 7.5 \\
        --max-shift 4 --max-resolution 16 --output index_dir/
    python -m deepcryo.swiftalign query --index index_dir/ --particles P.star --output aligned.star
    python -m deepcryo.swiftalign refine --particles P.star --reference initial.mrc --output-dir out/ \\
        --symmetry C1 --initial-resolution 30 [--mask m.mrc] [--max-iterations 12] [--continue]

``python -m deepcryo.swiftalign COMMAND --help`` shows each command's options and examples. ``--device
cuda:0 [cuda:1 …]`` runs the projections (and in ``refine`` the reconstructions) on the first GPU and
searches the index with faiss-gpu, sharded over all of them; CUDA asked for on a host without it stops the
program at the start. Errors in the input stop the program with a one-line reason and exit status 2, before
anything is written.
"""
import sys

from deepcryo.core.cli import run_program

from .commands import query, refine, train

COMMANDS = {"train": train, "query": query, "refine": refine}


def main(argv=None):
    return run_program("python -m deepcryo.swiftalign", __doc__, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
