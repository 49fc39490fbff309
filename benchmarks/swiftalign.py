"""SwiftAlign: compressed index vs exhaustive flat search, same particles, same run, growing galleries.

For each angular step (a larger gallery each time) it builds a Flat (exact) and a default compressed
index, then reports: bytes per reference, search wall/CPU time (index search of 4·k matches for all
particles), total alignment wall time (search + exact re-ranking + refinement), accuracy (angle within
2 steps and origin within 1 px of the truth) and the share of the particles exhaustive search gets right
that the compressed index also gets right.

    python benchmarks/swiftalign.py --particles sim/particles.star --reference sim/truth.mrc --steps 15 10
"""
import argparse
import os
import tempfile
import time

import faiss
import numpy as np
import torch

from deepcryo.core.geometry import pose_distance_deg
from deepcryo.core.particles import read_particles
from deepcryo.swiftalign import index as swindex
from deepcryo.swiftalign.query import ParticleBatch, align


def _timed(fn):
    w, c = time.time(), time.process_time()
    out = fn()
    return out, time.time() - w, time.process_time() - c


def run(args):
    star = read_particles(args.particles)
    truth_angles, truth_origins = star.angles_deg(), star.origins_A()
    rows = []
    for step in args.steps:
        res = {}
        for kind, factory in (("flat", "Flat"), ("compressed", args.index_factory)):
            out = os.path.join(args.work_dir, "%s_%g" % (kind, step))
            (m, train_wall, _) = _timed(lambda: swindex.train(
                args.reference, star, out, angular_step_deg=step, max_resolution_A=args.max_resolution,
                max_shift_px=args.max_shift, index_factory=factory))
            bundle = swindex.load(out)
            shards = bundle.shards()
            with star.open_images() as stack:
                parts = ParticleBatch(bundle.band, stack.read(np.arange(len(star))), star.ctf_params(),
                                      bundle.sqrt_weights)
            vecs = parts.search_vectors(bundle.band, bundle.origins_px, m["normalise"], bundle.gallery.ctf_rms).numpy()
            _, s_wall, s_cpu = _timed(lambda: swindex.search(shards, vecs, 4 * args.k, args.nprobe))
            aligned, a_wall, _ = _timed(lambda: align(bundle, star, k=args.k, nprobe=args.nprobe))
            ang = pose_distance_deg(torch.as_tensor(truth_angles), torch.as_tensor(aligned["angles_deg"])).numpy()
            sh = np.linalg.norm(truth_origins - aligned["origins_A"], axis=1) / star.pixel_size_A
            res[kind] = dict(factory=m["factory"], n=m["n_references"], bpr=m["bytes_per_reference"],
                             train=train_wall, s_wall=s_wall, s_cpu=s_cpu, a_wall=a_wall,
                             good=(ang < 2 * step) & (sh < 1.0))
        f, c = res["flat"], res["compressed"]
        kept = (c["good"] & f["good"]).sum() / max(1, f["good"].sum())
        rows.append((step, f["n"], c["factory"], c["bpr"], f["bpr"], f["s_wall"], c["s_wall"], f["s_cpu"], c["s_cpu"],
                     f["s_wall"] / c["s_wall"], f["a_wall"], c["a_wall"], 100 * f["good"].mean(), 100 * c["good"].mean(), 100 * kept,
                     c["train"]))
        print("| %g° | %d | %s | %d | %d | %.2f / %.3f | %.2f / %.3f | %.0f× | %.1f / %.1f | %.1f%% / %.1f%% | %.1f%% | %.0f |"
              % rows[-1], flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--particles", required=True)
    p.add_argument("--reference", required=True)
    p.add_argument("--steps", type=float, nargs="+", default=[15.0, 10.0], help="angular steps, degrees")
    p.add_argument("--max-resolution", type=float, default=16.0)
    p.add_argument("--max-shift", type=float, default=3.0)
    p.add_argument("--index-factory", default=None, help="compressed index (default: from the gallery size)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work-dir", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="swiftbench.")
    print("| step | references | compressed index | B/ref compressed | B/ref flat | search wall s flat / compressed "
          "| search CPU s flat / compressed | search speed-up | align wall s flat / compressed "
          "| accuracy flat / compressed | exact-right kept | compressed train s |")
    print("|" + "---|" * 12)
    run(args)


if __name__ == "__main__":
    main()
