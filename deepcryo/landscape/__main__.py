"""Conformational landscape of a particle set with a pose- and CTF-aware VAE.

Examples::

    python -m deepcryo.landscape train --particles sim/particles.star --output-dir vae --latent-dim 8 \\
        --epochs 10 --box 32
    python -m deepcryo.landscape analyze vae --clusters 2
    python -m deepcryo.landscape volumes vae --output-dir vae/volumes --pc 2 --path-particles 12 873
    python -m deepcryo.landscape frames --particles vae/analysis/particles.star \\
        --maps vae/analysis/cluster_*_reconstructed.mrc --output frames/particles.star
    python -m deepcryo.landscape halves --particles sim/particles.star --output-dir halves --box 32

``python -m deepcryo.landscape COMMAND --help`` shows each command's options and examples. Errors in the
input are reported in one line and the program exits with status 2.
"""
import sys

from deepcryo.core.cli import run_program

from .commands import analyze, frames, halves, train, volumes

COMMANDS = {"train": train, "analyze": analyze, "volumes": volumes, "frames": frames,
            "halves": halves}


def main(argv=None):
    return run_program("python -m deepcryo.landscape", __doc__, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
