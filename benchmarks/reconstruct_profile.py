"""Where the insertion of a reconstruction spends its CPU: ``insert_particles`` on the first ``--n`` particles
of a STAR file, in this process.

Prints the CPU milliseconds per particle (``time.process_time``: all threads) of each of ``--repeats`` runs
into a fresh :class:`~deepcryo.core.reconstruct.Reconstructor` (the minimum is the figure least disturbed by
a shared machine), then the self CPU time of each torch operator over one more run (``torch.profiler``):
the scatter-adds into the grids, the FFT, the elementwise steps. The map itself (``reconstruct()``) is not
timed: it costs the same whatever the number of particles.

Run it with ``OMP_WAIT_POLICY=PASSIVE`` exported (deepcryo sets it when imported, which is too late here:
torch is imported first)::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/reconstruct_profile.py --particles P.star --n 200 --threads 1
"""
import argparse
import os
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from deepcryo.core.particles import read_particles
from deepcryo.core.reconstruct import Reconstructor, insert_particles


def insert_cpu_ms(star, repeats: int, batch_size: int, profiled: bool = False):
    """CPU ms per particle of ``repeats`` insertions of ``star`` (each into a fresh grid); with ``profiled``
    one more run under ``torch.profiler``, returned as its second value."""
    labels = np.ones(len(star), dtype=np.int64)
    times, prof = [], None
    with star.open_images() as stack:
        for k in range(repeats + profiled):
            rec = Reconstructor(stack.box)
            if k == repeats:
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    insert_particles(star, stack, labels, {1: rec}, batch_size)
            else:
                c0 = time.process_time()
                insert_particles(star, stack, labels, {1: rec}, batch_size)
                times.append(1e3 * (time.process_time() - c0) / len(star))
            del rec
    return times, prof


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--particles", required=True, help="STAR file with poses, CTF and images")
    p.add_argument("--n", type=int, default=200, help="first N particles")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    star = read_particles(args.particles)
    star = star.subset(np.arange(min(args.n, len(star))))
    times, prof = insert_cpu_ms(star, args.repeats, args.batch_size, profiled=True)
    print("%d particles, %d thread(s), load average %.1f: %s CPU ms/particle (min %.2f)"
          % (len(star), args.threads, os.getloadavg()[0], " ".join("%.2f" % t for t in times), min(times)))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
