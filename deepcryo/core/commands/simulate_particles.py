"""Particle stack with known poses, shifts, CTF and noise (RELION 3.1 STAR + MRCS + the true map(s)).

Example::

    python -m deepcryo.core.simulate particles --output-dir sim/ --n 3000 --box 64 --pixel-size 2.0 --snr 0.1
    python -m deepcryo.core.simulate particles --output-dir sim2/ --states 2 --n 4000 --box 48
    python -m deepcryo.core.simulate particles --output-dir hinge/ --hinge --n 4000 --box 48

Writes ``particles.star``, ``particles.mrcs`` and the ground-truth map(s) ``truth.mrc``
(``truth_state01.mrc`` … for states, ``truth_t0.mrc`` and ``truth_t1.mrc`` for the hinge).
"""
import logging
import os

import numpy as np

from ..errors import InputError
from ..mrc import write_mrc
from ..simulate import hinge_volume, phantom_states, phantom_volume, write_particle_set

logger = logging.getLogger(__name__)


def add_args(parser):
    parser.add_argument("--output-dir", required=True, help="output folder")
    parser.add_argument("--n", type=int, default=1000, help="number of particles")
    parser.add_argument("--box", type=int, default=64, help="box size (px)")
    parser.add_argument("--pixel-size", type=float, default=2.0, help="Å/px")
    parser.add_argument("--snr", type=float, default=0.1, help="signal-to-noise variance ratio; 0 = noiseless")
    parser.add_argument("--coloured-noise", action="store_true", help="coloured instead of white noise")
    parser.add_argument("--states", type=int, default=1, help="number of discrete conformations (equal shares)")
    parser.add_argument("--hinge", action="store_true", help="continuous hinge motion (parameter in the STAR)")
    parser.add_argument("--defocus-min", type=float, default=10000.0, help="Å")
    parser.add_argument("--defocus-max", type=float, default=25000.0, help="Å")
    parser.add_argument("--astigmatism", type=float, default=500.0, help="max U - V, Å")
    parser.add_argument("--max-shift", type=float, default=3.0, help="max origin per axis, px")
    parser.add_argument("--voltage", type=float, default=300.0, help="kV")
    parser.add_argument("--cs", type=float, default=2.7, help="mm")
    parser.add_argument("--amplitude-contrast", type=float, default=0.1, help="fraction")
    parser.add_argument("--bfactor", type=float, default=0.0, help="CTF envelope B-factor, Å²")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phantom and of every draw")


def main(args):
    if args.box < 8 or args.n < 1 or args.pixel_size <= 0 or args.voltage <= 0 or args.cs < 0:
        raise InputError("need --box >= 8, --n >= 1, --pixel-size > 0, --voltage > 0 and --cs >= 0")
    kw = dict(snr=args.snr or None, seed=args.seed, defocus_range_A=(args.defocus_min, args.defocus_max),
              astigmatism_A=args.astigmatism, max_shift_px=args.max_shift, bfactor_A2=args.bfactor,
              coloured_noise=args.coloured_noise)
    optics = dict(voltage_kV=args.voltage, cs_mm=args.cs, amplitude_contrast=args.amplitude_contrast)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.hinge:
        vols = lambda t: hinge_volume(args.box, t, seed=args.seed)  # noqa: E731
        write_mrc(os.path.join(args.output_dir, "truth_t0.mrc"), vols(0.0), args.pixel_size)
        write_mrc(os.path.join(args.output_dir, "truth_t1.mrc"), vols(1.0), args.pixel_size)
    elif args.states > 1:
        vols = phantom_states(args.box, args.states, seed=args.seed)
        for k, v in enumerate(vols):
            write_mrc(os.path.join(args.output_dir, "truth_state%02d.mrc" % (k + 1)), v, args.pixel_size)
        kw["state_of"] = np.random.default_rng(args.seed + 1).permutation(np.arange(args.n) % args.states)
    else:
        vols = phantom_volume(args.box, seed=args.seed)
        write_mrc(os.path.join(args.output_dir, "truth.mrc"), vols, args.pixel_size)
    star = write_particle_set(args.output_dir, vols, args.n, args.pixel_size, **optics, **kw)
    logger.info("wrote %s (%d particles, box %d, %.3g Å/px)", star, args.n, args.box, args.pixel_size)
