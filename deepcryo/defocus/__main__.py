"""Deep micrograph defocus: CNN guess + physics refinement of the 2D CTF.

Examples::

    # estimate the CTF of every micrograph (RELION CTF STAR + PSD images in ctf_psd/)
    python -m deepcryo.defocus predict --micrographs 'mics/*.mrc' --pixel-size 0.85 --voltage 300 \\
        --cs 2.7 --amplitude-contrast 0.07 --output ctf.star

    # EPU micrographs (uint16, FEI extended header): the pixel size is read from the MRC header
    python -m deepcryo.defocus predict --micrographs 'Images-Disc1/*/Data/*_Data_*[0-9].mrc' --voltage 300 --cs 2.7 \\
        --amplitude-contrast 0.1 --output ctf.star

    # CNN only, from a RELION micrograph STAR (acquisition read from it), own model
    python -m deepcryo.defocus predict --micrographs micrographs.star --output ctf.star --no-refine \\
        --model my_model.pt

    # train on 4000 simulated 512² micrographs (200/300 kV, 0.5-2.5 Å/px, mean defocus 0.3-5 µm,
    # astigmatism up to 2000 Å), inputs cached so that training can be repeated
    # (the exact recipe of the shipped weights is in deepcryo/defocus/weights/README.md)
    python -m deepcryo.defocus train --simulate 4000 --seed 11 --cache sim.npz --output my_model.pt

    # fine-tune the shipped weights on your own labels (any previous CTF estimation)
    python -m deepcryo.defocus train --star micrographs_ctf.star --init shipped --output tuned.pt

    # the same on the first GPU (CUDA asked for on a host without it stops with one line)
    python -m deepcryo.defocus train --star micrographs_ctf.star --init shipped --output tuned.pt --device cuda

Errors in the input are reported in one line and the program exits with status 2 without writing its
output. In ``predict``, a single unusable micrograph is reported ("skipped ...") and the others go on.
"""
import argparse
import os
import sys

import torch

from ..core.cli import parse_devices
from ..core.io import InputError


def _device(word):
    """The one torch device of ``--device`` (cpu, cuda or cuda:N), checked (:func:`parse_devices`)."""
    return parse_devices(word)[0]


def _predict(args):
    from . import predict
    device = _device(args.device)
    if not 0 < args.high_resolution < args.low_resolution:
        raise InputError("need 0 < --high-resolution < --low-resolution (Å)")
    if args.batch_size < 1:
        raise InputError("--batch-size must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = dict(pixel_size_A=args.pixel_size, voltage_kV=args.voltage, cs_mm=args.cs,
                    amplitude_contrast=args.amplitude_contrast)
    results = predict.predict(args.micrographs, args.output, args.model, refine=not args.no_refine,
                              low_A=args.low_resolution, high_A=args.high_resolution, fit_phase=args.phase_shift,
                              batch_size=args.batch_size, device=device, defaults=defaults,
                              log=lambda m: print(m, flush=True),
                              warn=lambda m: print("deepcryo.defocus: " + m, file=sys.stderr, flush=True))
    flagged = sum(r["flagged"] for r in results)
    print("wrote %s (%d micrographs, %d flagged)" % (args.output, len(results), flagged))


def _train(args):
    from . import model as model_mod
    from . import train
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.simulate is not None and args.star:
        raise InputError("give either --simulate N or --star FILE, not both")
    if args.cache and os.path.exists(args.cache):
        arrays = train.load_arrays(args.cache)
        print("loaded %d examples from %s" % (len(arrays["psd"]), args.cache))
    elif args.simulate is not None:
        if args.simulate < 4 or args.sim_size < 64:
            raise InputError("need --simulate >= 4 and --sim-size >= 64")
        arrays = train.simulate_training_arrays(args.simulate, size_px=args.sim_size, seed=args.seed, log=print)
    elif args.star:
        arrays = train.star_training_arrays(args.star, args.voltage, args.cs, args.pixel_size, log=print)
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
                          batch_size=args.batch_size, lr=args.lr, patience=args.patience, seed=args.seed,
                          resume=args.resume, log=lambda m: print(m, flush=True), threads=args.threads,
                          device=device)
    print("wrote %s (best validation MAE %.0f Å over %d validation micrographs)"
          % (args.output, summary["best_val_mae_A"], summary["n_val"]))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m deepcryo.defocus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="CTF of micrographs → RELION CTF STAR")
    p.add_argument("--micrographs", required=True, help="glob pattern of MRC files, or a micrograph STAR")
    p.add_argument("--output", required=True, help="CTF STAR to write")
    p.add_argument("--pixel-size", type=float, help="Å/px (default: from the STAR, else the MRC header)")
    p.add_argument("--voltage", type=float, help="kV (default: from the STAR)")
    p.add_argument("--cs", type=float, help="spherical aberration, mm (default: from the STAR)")
    p.add_argument("--amplitude-contrast", type=float, help="fraction (default: from the STAR)")
    p.add_argument("--no-refine", action="store_true", help="CNN only, no physics fit")
    p.add_argument("--phase-shift", action="store_true", help="also fit a phase shift (phase plate)")
    p.add_argument("--low-resolution", type=float, default=30.0, help="fit band low-resolution end, Å")
    p.add_argument("--high-resolution", type=float, default=5.0, help="fit band high-resolution end, Å")
    p.add_argument("--model", help="weight file (default: the shipped weights)")
    p.add_argument("--batch-size", type=int, default=8, help="micrographs per batch")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    t = sub.add_parser("train", help="train or fine-tune the defocus CNN")
    t.add_argument("--output", required=True, help="weight file to write")
    t.add_argument("--simulate", type=int, help="number of simulated micrographs")
    t.add_argument("--sim-size", type=int, default=512, help="side of the simulated micrographs, px")
    t.add_argument("--star", help="micrograph STAR with rlnDefocusU/V/Angle labels")
    t.add_argument("--pixel-size", type=float, help="Å/px when the STAR has none")
    t.add_argument("--voltage", type=float, help="kV when the STAR has none")
    t.add_argument("--cs", type=float, help="mm when the STAR has none")
    t.add_argument("--cache", help="npz of model inputs: read when it exists, written otherwise")
    t.add_argument("--init", help="'shipped' or a weight file to fine-tune from")
    t.add_argument("--arch", choices=("rings", "polar", "defocusnet", "seed"), default="rings",
                   help="rings (shipped), polar, defocusnet or seed (the thesis' baseline)")
    t.add_argument("--width", type=int, default=0, help="rings/polar/defocusnet width (default 16/24/16)")
    t.add_argument("--n-defocus", type=int, default=0, help="rings: number of defocus templates (default 160)")
    t.add_argument("--epochs", type=int, default=60)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--patience", type=int, default=8, help="early stopping patience, epochs")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from <output>.ckpt")
    t.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    t.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    try:
        _predict(args) if args.command == "predict" else _train(args)
    except InputError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from deepcryo.core.cli import run_main  # one line, status 2, for a full disk or a refused write
    sys.exit(run_main(main))
