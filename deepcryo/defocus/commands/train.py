"""Train or fine-tune the defocus CNN.

Example::

    # train on 4000 simulated 512² micrographs (200/300 kV, 0.5-2.5 Å/px, mean defocus 0.3-5 µm,
    # astigmatism up to 2000 Å), inputs cached so that training can be repeated
    # (the exact recipe of the shipped weights is in deepcryo/defocus/weights/README.md)
    python -m deepcryo.defocus train --simulate 4000 --seed 11 --cache sim.npz --output my_model.pt

    # fine-tune the shipped weights on your own labels (any previous CTF estimation), on the first GPU
    python -m deepcryo.defocus train --star micrographs_ctf.star --init shipped --output tuned.pt --device cuda

    # continue a killed run from my_model.pt.ckpt (same command, --continue)
    python -m deepcryo.defocus train --cache sim.npz --output my_model.pt --continue

A checkpoint ``<output>.ckpt`` is written after every epoch; the best weights go to ``<output>``.
"""
import logging
import os

from deepcryo.core import cli
from deepcryo.core.errors import InputError

logger = logging.getLogger(__name__)


def add_args(parser):
    parser.add_argument("--output", required=True, help="weight file to write")
    parser.add_argument("--simulate", type=int, help="number of simulated micrographs")
    parser.add_argument("--sim-size", type=int, default=512, help="side of the simulated micrographs, px")
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
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulation, split and batches")
    cli.add_continue_argument(parser, "<output>.ckpt")
    cli.add_threads_argument(parser)
    cli.add_device_argument(parser)


def main(args):
    from .. import model as model_mod
    from .. import train
    if args.simulate is not None and args.star:
        raise InputError("give either --simulate N or --star FILE, not both")
    if args.cache and os.path.exists(args.cache):
        arrays = train.load_arrays(args.cache)
        logger.info("loaded %d examples from %s", len(arrays["psd"]), args.cache)
    elif args.simulate is not None:
        if args.simulate < 4 or args.sim_size < 64:
            raise InputError("need --simulate >= 4 and --sim-size >= 64")
        arrays = train.simulate_training_arrays(args.simulate, size_px=args.sim_size, seed=args.seed)
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
                          seed=args.seed, resume=args.resume, device=args.device)
    logger.info("wrote %s (best validation MAE %.0f Å over %d validation micrographs)",
                args.output, summary["best_val_mae_A"], summary["n_val"])
