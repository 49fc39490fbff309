"""Time overhead of the per-epoch atomic checkpoints of defocus and landscape training (issue #8).

Each training runs twice in this process, same data and seed: with its checkpoints (as shipped: written to a
temporary name, then ``os.replace``) and with the checkpoint write replaced by nothing. The overhead is the
ratio of CPU seconds (``time.process_time``, all threads) and of wall seconds; the CPU seconds spent inside the
checkpoint writes themselves are measured directly (the robust figure on a shared machine: their share of the
training's CPU seconds). A first run of each training is a discarded warm-up; then the runs alternate
(without, with, without, with, …) and the medians are compared.

Example::

    python benchmarks/checkpoint_overhead.py --threads 2 --repeats 3
"""
import argparse
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch

from deepcryo.core.simulate import phantom_states, write_particle_set
from deepcryo.defocus import train as defocus_train
from deepcryo.landscape import train as landscape_train


class Timer:
    """CPU and wall seconds of a block, and of the checkpoint writes inside it."""

    def __enter__(self):
        self.cpu, self.wall = time.process_time(), time.time()
        return self

    def __exit__(self, *exc):
        self.cpu, self.wall = time.process_time() - self.cpu, time.time() - self.wall


def _defocus(arrays, folder, checkpoints, epochs, spent):
    """Train the defocus model; ``checkpoints=False`` skips the .ckpt writes. ``spent`` collects CPU s of writes."""
    real_save = torch.save

    def save(obj, f, *a, **kw):
        is_ckpt = str(f).endswith(".part.ckpt")
        if is_ckpt and not checkpoints:
            return None
        t = time.process_time()
        real_save(obj, f, *a, **kw)
        if is_ckpt:
            spent.append(time.process_time() - t)

    torch.save = save
    try:
        defocus_train.train(arrays, os.path.join(folder, "model.pt"), epochs=epochs, batch_size=32, seed=0,
                            patience=epochs + 1)
    finally:
        torch.save = real_save


def _landscape(star, folder, checkpoints, epochs, spent):
    real = landscape_train._save_checkpoint

    def save(*a, **kw):
        if checkpoints:
            t = time.process_time()
            real(*a, **kw)
            spent.append(time.process_time() - t)

    landscape_train._save_checkpoint = save
    try:
        landscape_train.train(star, folder, latent_dim=8, epochs=epochs, box=32, batch_size=64)
    finally:
        landscape_train._save_checkpoint = real


def measure(name, fn, data, epochs, repeats, root):
    runs = {True: [], False: []}
    writes = []
    fn(data, tempfile.mkdtemp(prefix="%s_warmup_" % name, dir=root), True, epochs, [])  # warm-up, not counted
    for r in range(repeats):
        for checkpoints in (False, True):
            folder = tempfile.mkdtemp(prefix="%s_%s_%d_" % (name, checkpoints, r), dir=root)
            torch.manual_seed(0)
            with Timer() as t:
                fn(data, folder, checkpoints, epochs, writes if checkpoints else [])
            runs[checkpoints].append((t.cpu, t.wall))
    cpu = {k: statistics.median(c for c, _ in v) for k, v in runs.items()}
    wall = {k: statistics.median(w for _, w in v) for k, v in runs.items()}
    per_write = statistics.median(writes) if writes else float("nan")
    print("%-9s %d epochs: one checkpoint write %.4f CPU s = %.2f %% of the training's CPU s; median of the runs: "
          "CPU s without %.2f, with %.2f (ratio %.3f), wall s without %.2f, with %.2f (ratio %.3f)"
          % (name, epochs, per_write, 100.0 * per_write * epochs / cpu[False], cpu[False], cpu[True],
             cpu[True] / cpu[False], wall[False], wall[True], wall[True] / wall[False]))
    return cpu, wall, per_write


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs with and without checkpoints each (median)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--defocus-n", type=int, default=200, help="simulated PSDs (128 px) for defocus training")
    p.add_argument("--particles", type=int, default=2000, help="particles (32 px, 2 states) for the landscape")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("machine: %s, %d CPUs, torch %s, %d threads" % (platform.node(), os.cpu_count(), torch.__version__,
                                                          args.threads))
    with tempfile.TemporaryDirectory() as root:
        arrays = defocus_train.simulate_training_arrays(args.defocus_n, size_px=256, seed=0)
        measure("defocus", _defocus, arrays, args.epochs, args.repeats, root)
        vols = phantom_states(32, 2, seed=0)
        state_of = np.random.default_rng(1).permutation(np.arange(args.particles) % 2)
        star = write_particle_set(os.path.join(root, "sim"), vols, args.particles, 3.0, snr=0.1, seed=0,
                                  state_of=state_of)
        measure("landscape", _landscape, star, args.epochs, args.repeats, root)


if __name__ == "__main__":
    main()
