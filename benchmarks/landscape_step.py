"""CPU cost of the landscape VAE's training steps at one working box: per particle, at each volume-update interval.

Runs :func:`deepcryo.landscape.train.train_epoch` (the training program's own loop) on synthetic spectra, CTFs
and poses (the cost of a step does not depend on the data), after one warm-up pass, and prints CPU seconds per
particle (``time.process_time``, this process only) for each ``--volume-steps``; ``--volume-steps 0`` stands for
the program's default (:func:`deepcryo.landscape.train.default_volume_steps`). Reading particles from disk is
not included: ``benchmarks/scale.py`` measures the whole program.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/landscape_step.py --box 128 --batch 64 --steps 8 \\
        --volume-steps 1 0
"""
import argparse
import json
import logging
import time

import torch

from deepcryo.core.cli import configure_logging
from deepcryo.core.geometry import quaternion_to_matrix
from deepcryo.landscape.model import LandscapeVAE
from deepcryo.landscape.train import default_volume_steps, train_epoch

logger = logging.getLogger("deepcryo.benchmarks.landscape_step")


def _batches(box, batch, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        spectra = torch.complex(torch.randn(batch, box, box, generator=g), torch.randn(batch, box, box, generator=g))
        yield (torch.arange(batch), spectra, quaternion_to_matrix(torch.randn(batch, 4, generator=g)),
               0.5 + torch.rand(batch, box, box, generator=g))


def measure(box: int, batch: int, steps: int, volume_steps: int, n_basis: int = 16) -> dict:
    """CPU s per particle of ``steps`` training steps (after a warm-up of ``volume_steps`` steps)."""
    torch.manual_seed(0)
    model = LandscapeVAE(box, 8, n_basis, 128, torch.randn(box, box, box), torch.ones(box, box))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_epoch(model, model, optimizer, _batches(box, batch, volume_steps), 1.0, volume_steps)
    t0 = time.process_time()
    train_epoch(model, model, optimizer, _batches(box, batch, steps, seed=1), 1.0, volume_steps)
    cpu = time.process_time() - t0
    return {"box": box, "batch": batch, "steps": steps, "volume_steps": volume_steps, "basis": n_basis, "cpu_s": cpu,
            "cpu_ms_per_particle": 1e3 * cpu / (steps * batch)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--box", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=8, help="measured steps (a multiple of every --volume-steps)")
    p.add_argument("--volume-steps", type=int, nargs="+", default=[1, 0], help="0: the program's default")
    p.add_argument("--basis", type=int, default=16, help="basis volumes of the decoder (the program's --basis)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    configure_logging()
    torch.set_num_threads(args.threads)
    rows = []
    for box in args.box:
        for vs in args.volume_steps:
            row = measure(box, args.batch, args.steps, vs or default_volume_steps(box), args.basis)
            logger.info("box %d batch %d volume_steps %d: %.1f CPU ms per particle (%d steps, %.1f s)", box,
                        args.batch, row["volume_steps"], row["cpu_ms_per_particle"], args.steps, row["cpu_s"])
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
