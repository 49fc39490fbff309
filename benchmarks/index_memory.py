"""SwiftAlign index memory: peak resident memory of ``train`` and ``query`` against ``--memory-limit``.

For each gallery size it runs the real programs as child processes and reads each child's peak resident
set (``ru_maxrss`` from ``os.wait4``):

* ``baseline``: a Python process that imports the programs (torch, faiss, deepcryo) and exits: the fixed
  footprint that any run has before it holds a byte of index;
* ``python -m deepcryo.swiftalign train --memory-limit L`` on a phantom map (32 px, 2 Å/px, 8 Å band: 196
  dims), 2 CTF groups, origins within ±1 px (9 shifts), the angular step chosen to give about N references;
* ``python -m deepcryo.swiftalign query --memory-limit L --k 1`` of simulated particles with that index.

The limit L of each size is below the size of its index, so the index is split into shards that are
written while they fill and read one at a time at query. The gallery, its features and the faiss index
are the real ones; only the factory (``--index-factory``) has fewer inverted lists than the default,
so that the coarse assignment of 20 M references fits in the time of a 2-core machine (the bytes per
reference are those of the default: 48-byte codes and 8-byte ids).

    nice python benchmarks/index_memory.py --references 1e6 5e6 20e6 --memory-limit 0.04 0.1 0.4 \\
        --work-dir /tmp/index_memory --output /tmp/index_memory.json
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

from deepcryo.core import io
from deepcryo.core.geometry import sample_poses
from deepcryo.core.simulate import phantom_volume, write_particle_set

BOX, PIXEL_A, RESOLUTION_A, GROUPS, SHIFTS = 32, 2.0, 8.0, 2, 9


def _child(cmd, log_path):
    """Run ``cmd``; return (exit status, wall s, peak RSS in MB of that child alone)."""
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.time() - t0, usage.ru_maxrss / 1024.0


def _step_for(n_references):
    """Angular step (degrees) whose gallery has about ``n_references`` entries (poses ∝ step⁻³)."""
    want = n_references / (GROUPS * SHIFTS)
    step = 15.0 * (len(sample_poses(15.0, 15.0)) / want) ** (1 / 3)
    for _ in range(3):
        step *= (len(sample_poses(step, step)) / want) ** (1 / 3)
    return step


def run(args):
    os.makedirs(args.work_dir, exist_ok=True)
    ref = os.path.join(args.work_dir, "map.mrc")
    vol = phantom_volume(BOX, seed=0)
    io.write_mrc(ref, vol, PIXEL_A)
    star = write_particle_set(os.path.join(args.work_dir, "sim"), vol, args.particles, PIXEL_A, snr=0.3, seed=1,
                              max_shift_px=1.0, defocus_range_A=(15000.0, 20000.0))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p))
    py = [sys.executable]
    code, _, base = _child(py + ["-c", "import torch, faiss; import deepcryo.swiftalign.__main__"],
                           os.path.join(args.work_dir, "baseline.log"))
    rows = []
    for n_refs, limit in zip(args.references, args.memory_limit):
        step = _step_for(n_refs)
        out = os.path.join(args.work_dir, "index_%g" % n_refs)
        common = ["--particles", star, "--memory-limit", str(limit), "--threads", str(args.threads)]
        code, b_wall, b_rss = _child(py + ["-m", "deepcryo.swiftalign", "train", "--reference", ref] + common +
                                     ["--angular-step", "%.4f" % step, "--max-resolution", str(RESOLUTION_A),
                                      "--max-shift", "1", "--shift-step", "1", "--ctf-groups", str(GROUPS),
                                      "--index-factory", args.index_factory, "--output", out],
                                     out + "_train.log")
        if code:
            raise SystemExit("train failed (%d), see %s_train.log" % (code, out))
        with open(os.path.join(out, "manifest.json")) as f:
            m = json.load(f)
        index_mb = sum(os.path.getsize(os.path.join(out, s["file"])) for s in m["shards"]) / 1e6
        code, q_wall, q_rss = _child(py + ["-m", "deepcryo.swiftalign", "query", "--index", out] + common +
                                     ["--k", "1", "--output", out + "_aligned.star"], out + "_query.log")
        if code:
            raise SystemExit("query failed (%d), see %s_query.log" % (code, out))
        row = dict(references=m["n_references"], step_deg=step, factory=m["factory"], dim=m["dim"],
                   bytes_per_reference=m["bytes_per_reference"], index_MB=index_mb, shards=len(m["shards"]),
                   limit_MB=limit * 1e3, baseline_MB=base, train_peak_MB=b_rss, train_s=b_wall,
                   query_peak_MB=q_rss, query_s=q_wall, particles=args.particles)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.output:
            with open(args.output, "w") as f:
                json.dump(rows, f, indent=1)
        if not args.keep:
            for s in m["shards"]:
                os.remove(os.path.join(out, s["file"]))
    print("| references | index | limit | shards | baseline RSS | train peak RSS (above baseline) | "
          "query peak RSS (above baseline) | train / query wall |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| %.2f M | %.0f MB | %.0f MB | %d | %.0f MB | %.0f MB (%.0f) | %.0f MB (%.0f) | %.0f s / %.0f s |"
              % (r["references"] / 1e6, r["index_MB"], r["limit_MB"], r["shards"], r["baseline_MB"],
                 r["train_peak_MB"], r["train_peak_MB"] - r["baseline_MB"], r["query_peak_MB"],
                 r["query_peak_MB"] - r["baseline_MB"], r["train_s"], r["query_s"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--references", type=float, nargs="+", default=[1e6], help="gallery sizes (approximate)")
    p.add_argument("--memory-limit", type=float, nargs="+", default=[0.04], help="--memory-limit of each size, GB")
    p.add_argument("--index-factory", default="PCA192,IVF256,PQ96x4fs", help="faiss factory (see docstring)")
    p.add_argument("--particles", type=int, default=500, help="simulated particles to query")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--output", help="JSON of the rows")
    p.add_argument("--keep", action="store_true", help="keep the shard files")
    args = p.parse_args(argv)
    if len(args.memory_limit) != len(args.references) or min(args.references) < 1 or math.isnan(sum(args.memory_limit)):
        p.error("give one --memory-limit per --references")
    run(args)


if __name__ == "__main__":
    main()
