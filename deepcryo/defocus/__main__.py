"""Deep micrograph defocus: CNN guess + physics refinement of the 2D CTF.

Examples::

    python -m deepcryo.defocus predict --micrographs 'mics/*.mrc' --pixel-size 0.85 --voltage 300 \\
        --cs 2.7 --amplitude-contrast 0.07 --output ctf.star
    python -m deepcryo.defocus train --simulate 4000 --seed 11 --cache sim.npz --output my_model.pt
    python -m deepcryo.defocus train --star micrographs_ctf.star --init shipped --output tuned.pt --device cuda
    python -m deepcryo.defocus psd --micrograph mic_001.mrc --pixel-size 0.85 --output mic_001_psd.mrc
    python -m deepcryo.defocus check-model --model tuned.pt

``python -m deepcryo.defocus COMMAND --help`` shows each command's options and examples. Errors in the input
are reported in one line and the program exits with status 2 without writing its output (CUDA asked for on
a host without it stops the program at the start).
"""
import sys

from deepcryo.core.cli import run_program

from .commands import check_model, predict, psd, train

COMMANDS = {"predict": predict, "train": train, "psd": psd, "check-model": check_model}


def main(argv=None):
    return run_program("python -m deepcryo.defocus", __doc__, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
