"""Train or fine-tune the defocus CNN.

Example::

    # fine-tune the shipped weights on 20000 simulated PSDs of 2k-8k micrographs from every image-formation
    # model (deepcryo.defocus.training_data: ice/carbon and particle-only fields, counting and integrating
    # detectors, drift, phase plates), simulated by 16 processes (the recipe of the shipped weights is in
    # deepcryo/defocus/weights/README.md and scripts/retrain_defocus.sh)
    python -m deepcryo.defocus train --simulate 20000 --workers 16 --init shipped --output tuned.pt --device cuda

    # only particle-only fields on a counting camera at 0.8-1.2 Å/px, 4096² and 5760x4092, no phase plate
    python -m deepcryo.defocus train --simulate 4000 --image-models particles --detectors counting \
        --pixel-size-range 0.8 1.2 --micrograph-sizes 4096x4096 5760x4092 --phase-plate-fraction 0 \
        --cache particles.npz --output particles.pt

    # the earlier route: real-space 512² micrographs of deepcryo.core.micrographs, then compute_psd
    python -m deepcryo.defocus train --simulate 4000 --simulator micrographs --sim-size 512 --seed 11 \
        --cache sim.npz --output my_model.pt

    # fine-tune the shipped weights on your own labels (any previous CTF estimation), on the first GPU
    python -m deepcryo.defocus train --star micrographs_ctf.star --init shipped --output tuned.pt --device cuda

    # continue a killed run from my_model.pt.ckpt (same command, --continue)
    python -m deepcryo.defocus train --cache sim.npz --output my_model.pt --continue

A checkpoint ``<output>.ckpt`` is written after every epoch; the best weights go to ``<output>``.
"""
import dataclasses
import json
import logging
import os

from deepcryo.core import cli
from deepcryo.core.errors import InputError
from deepcryo.core.files import atomic_output

logger = logging.getLogger(__name__)


def _size(text):
    """'HEIGHTxWIDTH' or 'SIDE' (px) → (height, width)."""
    parts = text.lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) not in (1, 2):
        raise ValueError(text)
    return (dims[0], dims[-1])


_size.__name__ = "size (HEIGHTxWIDTH)"

#: command-line option → field of deepcryo.defocus.training_data.Ranges (options of --simulator psd only)
_RANGE_OPTIONS = {
    "image_models": "image_models", "detectors": "detectors", "micrograph_sizes": "sizes_px",
    "pixel_size_range": "pixel_size_range_A", "voltages": "voltages_kV", "cs_values": "cs_values_mm",
    "defocus_range": "defocus_range_A", "astigmatism_max": "astigmatism_max_A",
    "phase_plate_fraction": "phase_plate_fraction", "phase_shift_range": "phase_shift_range_deg",
    "bfactor_range": "bfactor_range_A2", "dose_range": "dose_range_e_per_A2", "drift_max": "drift_max_A",
    "vibration_max": "vibration_max_A", "coloured_noise_max": "coloured_noise_max"}


def add_args(parser):
    from deepcryo.defocus.training_data import DETECTORS, IMAGE_MODELS, Ranges
    d = Ranges()
    parser.add_argument("--output", required=True, help="weight file to write")
    parser.add_argument("--simulate", type=int, help="number of simulated micrographs")
    parser.add_argument("--simulator", choices=("psd", "micrographs"), default="psd",
                        help="psd: the CNN inputs of 2k-8k micrographs from several image-formation models "
                             "(deepcryo.defocus.training_data, default); micrographs: real-space --sim-size "
                             "micrographs of deepcryo.core.micrographs")
    parser.add_argument("--workers", type=int, default=1, help="psd: simulation processes")
    parser.add_argument("--sim-size", type=int, help="micrographs: side of the simulated micrographs, px (512)")
    sim = parser.add_argument_group("ranges of --simulator psd (defaults: deepcryo.defocus.training_data.Ranges)")
    sim.add_argument("--image-models", nargs="+", choices=IMAGE_MODELS, help="default: all")
    sim.add_argument("--detectors", nargs="+", choices=DETECTORS, help="default: all")
    sim.add_argument("--micrograph-sizes", nargs="+", type=_size, metavar="HxW",
                     help="micrograph sizes, px (default %s)" % " ".join("%dx%d" % s for s in d.sizes_px))
    sim.add_argument("--pixel-size-range", nargs=2, type=float, metavar=("MIN", "MAX"),
                     help="Å/px (default %g %g)" % d.pixel_size_range_A)
    sim.add_argument("--voltages", nargs="+", type=float, help="kV (default %s)" % " ".join(map(str, d.voltages_kV)))
    sim.add_argument("--cs-values", nargs="+", type=float, help="mm (default %s)" % " ".join(map(str, d.cs_values_mm)))
    sim.add_argument("--defocus-range", nargs=2, type=float, metavar=("MIN", "MAX"),
                     help="mean defocus, Å (default %g %g)" % d.defocus_range_A)
    sim.add_argument("--astigmatism-max", type=float, help="largest U − V, Å (default %g)" % d.astigmatism_max_A)
    sim.add_argument("--phase-plate-fraction", type=float,
                     help="fraction of micrographs with a phase shift (default %g)" % d.phase_plate_fraction)
    sim.add_argument("--phase-shift-range", nargs=2, type=float, metavar=("MIN", "MAX"),
                     help="degrees (default %g %g)" % d.phase_shift_range_deg)
    sim.add_argument("--bfactor-range", nargs=2, type=float, metavar=("MIN", "MAX"),
                     help="envelope B-factor, Å² (default %g %g)" % d.bfactor_range_A2)
    sim.add_argument("--dose-range", nargs=2, type=float, metavar=("MIN", "MAX"),
                     help="e⁻/Å² (default %g %g)" % d.dose_range_e_per_A2)
    sim.add_argument("--drift-max", type=float, help="linear drift during the exposure, Å (default %g)" % d.drift_max_A)
    sim.add_argument("--vibration-max", type=float, help="RMS vibration, Å (default %g)" % d.vibration_max_A)
    sim.add_argument("--coloured-noise-max", type=float,
                     help="coloured noise power relative to the shot noise at f = 0 (default %g)" % d.coloured_noise_max)
    parser.add_argument("--star", help="micrograph STAR with rlnDefocusU/V/Angle labels")
    parser.add_argument("--pixel-size", type=float, help="Å/px when the STAR has none")
    parser.add_argument("--voltage", type=float, help="kV when the STAR has none")
    parser.add_argument("--cs", type=float, help="mm when the STAR has none")
    parser.add_argument("--cache", help="npz of model inputs: read when it exists, written otherwise")
    parser.add_argument("--init", help="'shipped' or a weight file to fine-tune from")
    parser.add_argument("--arch", choices=("rings", "polar", "defocusnet", "seed"), default="rings",
                        help="rings (shipped), polar, defocusnet or seed (the thesis' baseline)")
    parser.add_argument("--width", type=int, default=0, help="rings/polar/defocusnet width (default 16/24/16)")
    parser.add_argument("--n-defocus", type=int, default=0, help="rings: number of defocus templates (default 160)")
    parser.add_argument("--epochs", type=int, default=60, help="epochs at most")
    parser.add_argument("--batch-size", type=int, default=32, help="micrographs per step")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam step size (halved on plateaus)")
    parser.add_argument("--patience", type=int, default=8, help="early stopping patience, epochs")
    parser.add_argument("--report", help="JSON file: validation figures (per image model) before and after")
    parser.add_argument("--time-limit", type=float, help="seconds: start no epoch that would end later")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulation, split and batches")
    cli.add_continue_argument(parser, "<output>.ckpt")
    cli.add_threads_argument(parser)
    cli.add_device_argument(parser)


def simulation_ranges(args):
    """The :class:`deepcryo.defocus.training_data.Ranges` of the command line (defaults where not given)."""
    from deepcryo.defocus.training_data import Ranges
    given = {}
    for option, field in _RANGE_OPTIONS.items():
        value = getattr(args, option)
        if value is not None:
            given[field] = tuple(value) if isinstance(value, list) else value
    ranges = dataclasses.replace(Ranges(), **given)
    ranges.validate()
    return ranges


def _simulate(args):
    from .. import train, training_data
    if args.simulate < 4:
        raise InputError("need --simulate >= 4")
    if args.simulator == "micrographs":
        psd_only = ["--" + o.replace("_", "-") for o in _RANGE_OPTIONS if getattr(args, o) is not None]
        if psd_only or args.workers != 1:
            raise InputError("%s: options of --simulator psd only" % " ".join(psd_only + ["--workers"] * (args.workers != 1)))
        size = 512 if args.sim_size is None else args.sim_size
        if size < 64:
            raise InputError("need --sim-size >= 64")
        return train.simulate_training_arrays(args.simulate, size_px=size, seed=args.seed)
    if args.sim_size is not None:
        raise InputError("--sim-size is an option of --simulator micrographs (use --micrograph-sizes)")
    if args.workers < 1:
        raise InputError("need --workers >= 1")
    return training_data.training_arrays(args.simulate, seed=args.seed, ranges=simulation_ranges(args),
                                         workers=args.workers)


def main(args):
    from .. import model as model_mod
    from .. import train
    if args.simulate is not None and args.star:
        raise InputError("give either --simulate N or --star FILE, not both")
    if args.cache and os.path.exists(args.cache):
        arrays = train.load_arrays(args.cache)
        logger.info("loaded %d examples from %s", len(arrays["psd"]), args.cache)
    elif args.simulate is not None:
        arrays = _simulate(args)
    elif args.star:
        arrays = train.star_training_arrays(args.star, args.voltage, args.cs, args.pixel_size)
    else:
        raise InputError("give --simulate N or --star FILE (or --cache of an earlier run)")
    if args.cache and not os.path.exists(args.cache):
        train.save_arrays(args.cache, arrays)
    init = None
    if args.init:
        init = model_mod.SHIPPED_WEIGHTS if args.init == "shipped" else args.init
    if args.arch == "seed":
        config = {"arch": "seed", "size_px": arrays["psd"].shape[-1]}
    else:
        config = {"arch": args.arch, "width": args.width or (24 if args.arch == "polar" else 16)}
        if args.arch == "rings" and args.n_defocus:
            config["n_defocus"] = args.n_defocus
    summary = train.train(arrays, args.output, config=config, init_weights=init, epochs=args.epochs,
                          batch_size=args.batch_size, learning_rate=args.learning_rate, patience=args.patience,
                          seed=args.seed, resume=args.resume, device=args.device, time_limit_s=args.time_limit)
    logger.info("wrote %s (best validation MAE %.0f Å over %d validation micrographs)",
                args.output, summary["best_val_mae_A"], summary["n_val"])
    for name, fig in summary["validation"].items():
        before = (summary["validation_of_init_weights"] or {}).get(name)
        logger.info("validation %-14s n %5d  MAE %6.0f Å  median %6.0f  p90 %6.0f  U-V bias %+6.0f Å%s", name, fig["n"],
                    fig["mae_A"], fig["median_A"], fig["p90_A"], fig["astigmatism_bias_A"],
                    "  (init weights: MAE %.0f, U-V bias %+.0f)" % (before["mae_A"], before["astigmatism_bias_A"])
                    if before else "")
    if args.report:
        summary["command"] = {k: v for k, v in vars(args).items() if not callable(v)}
        with atomic_output(args.report) as tmp:
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=1, default=str)
