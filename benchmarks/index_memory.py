"""SwiftAlign index memory: peak resident memory of ``train`` and ``query`` against ``--memory-limit``.

For each gallery size it runs the real programs as child processes and reads each child's peak resident
set (``ru_maxrss`` from ``os.wait4``). This parent imports nothing heavy: Linux carries the parent's peak
over fork and exec into the child's ``ru_maxrss``, so a parent holding torch would mask every child
smaller than itself. The map, the particles and the angular steps are made by a ``--prepare`` child.

* ``baseline``: a Python process that imports the programs (torch, faiss, deepcryo) and exits: the fixed
  footprint that any run has before it holds a byte of index;
* ``python -m deepcryo.swiftalign train --memory-limit L`` on a phantom map (32 px, 2 Å/px, 8 Å band: 196
  dims), origins within ±1 px (9 searched per particle), the angular step chosen to give about N references;
* ``python -m deepcryo.swiftalign query --memory-limit L --k 1`` of simulated particles with that index.

With ``--synthetic`` the children build and search through the same code (:func:`.index.build_index`,
:func:`.index.search` over :meth:`.index.IndexBundle.shards`' one-at-a-time reader) but the gallery is
random unit vectors of the same dimension (196) and the query is ``--particles`` random vectors searched
for their 4 nearest references (``query --k 1``), in the blocks ``query`` would use: what the real
gallery costs to compute (about as much as the faiss add) is saved for galleries too large to project
on the development machine in the time.

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

BOX, PIXEL_A, RESOLUTION_A = 32, 2.0, 8.0


def _child(cmd, log_path):
    """Run ``cmd`` (this checkout first on its PYTHONPATH); return (exit status, wall s, peak RSS in MB of
    that child alone)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.time() - t0, usage.ru_maxrss / 1024.0


def _step_for(n_references):
    """Angular step (degrees) whose gallery has about ``n_references`` entries (poses ∝ step⁻³)."""
    from deepcryo.core.geometry import sample_poses
    want = n_references
    step = 15.0 * (len(sample_poses(15.0, 15.0)) / want) ** (1 / 3)
    for _ in range(3):
        step *= (len(sample_poses(step, step)) / want) ** (1 / 3)
    return step


def prepare(args):
    """Child: the phantom map, the simulated particles and the angular step of each size (prepare.json)."""
    from deepcryo.core.mrc import write_mrc
    from deepcryo.core.simulate import phantom_volume, write_particle_set
    ref = os.path.join(args.work_dir, "map.mrc")
    vol = phantom_volume(BOX, seed=0)
    write_mrc(ref, vol, PIXEL_A)
    star = write_particle_set(os.path.join(args.work_dir, "sim"), vol, args.particles, PIXEL_A, snr=0.3, seed=1,
                              max_shift_px=1.0, defocus_range_A=(15000.0, 20000.0))
    steps = [None if args.synthetic else _step_for(n) for n in args.references]
    with open(os.path.join(args.work_dir, "prepare.json"), "w") as f:
        json.dump({"reference": ref, "particles": star, "steps": steps}, f)


def _synthetic_gallery(n):
    """Random unit vectors standing in for :class:`.gallery.Gallery` in :func:`.index.build_index`."""
    import torch
    from deepcryo.swiftalign.features import Band

    class SyntheticGallery:
        band = Band(BOX, PIXEL_A, RESOLUTION_A)

        def __len__(self):
            return n

        def random(self, count, seed):
            v = torch.randn(count, self.band.dim, generator=torch.Generator().manual_seed(seed))
            return v / v.norm(dim=1, keepdim=True)

        def sample_ids(self, count, seed=0):
            return list(range(min(count, n)))

        def vectors(self, ids):
            return self.random(len(ids), int(ids[0]) + 1)

        def batches(self, max_vectors):
            for start in range(0, n, max_vectors):
                yield start, self.random(min(max_vectors, n - start), start)

    return SyntheticGallery()


def child(args):
    """Child: the synthetic build or query."""
    import faiss
    import torch
    from deepcryo.core.cli import configure_logging
    from deepcryo.swiftalign import index as swindex
    configure_logging()                       # the build's progress lines go to the child's log file
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    n, limit, out = int(args.references[0]), args.memory_limit[0] * 1e9, args.work_dir
    gallery = _synthetic_gallery(n)
    if args.child == "build":
        os.makedirs(out, exist_ok=True)
        shards, per_ref = swindex.build_index(gallery, args.index_factory, limit, out)
        with open(os.path.join(out, swindex.MANIFEST), "w") as f:
            json.dump({"factory": args.index_factory, "dim": gallery.band.dim, "n_references": n,
                       "bytes_per_reference": per_ref, "shards": shards}, f)
        return
    with open(os.path.join(out, swindex.MANIFEST)) as f:
        m = json.load(f)
    reader = swindex._ShardReader(out, m["shards"], None)
    block = max(1, int(limit // 8 // (4 * gallery.band.dim + 12 * 4)))
    queries = gallery.random(args.particles, 12345).numpy()
    t0 = time.time()
    for s in range(0, len(queries), block):
        swindex.search(reader, queries[s:s + block], 4, 32, limit)
    print("searched %d vectors in %.1f s" % (len(queries), time.time() - t0))


def _synthetic_rung(args, py, n_refs, limit, out):
    base = py + [os.path.abspath(__file__), "--references", str(n_refs), "--memory-limit", str(limit),
                 "--index-factory", args.index_factory, "--particles", str(args.particles),
                 "--threads", str(args.threads), "--work-dir", out, "--child"]
    code, b_wall, b_rss = _child(base + ["build"], out + "_train.log")
    if code:
        raise SystemExit("synthetic build failed (%d), see %s_train.log" % (code, out))
    code, q_wall, q_rss = _child(base + ["query"], out + "_query.log")
    if code:
        raise SystemExit("synthetic query failed (%d), see %s_query.log" % (code, out))
    return b_wall, b_rss, q_wall, q_rss


def _row(m, out, gallery, limit, base, b_rss, b_wall, q_rss, q_wall, particles):
    """One result (also printed as a JSON line)."""
    row = dict(references=m["n_references"], gallery=gallery, factory=m["factory"], dim=m["dim"],
               bytes_per_reference=m["bytes_per_reference"], shards=len(m["shards"]),
               index_MB=sum(os.path.getsize(os.path.join(out, s["file"])) for s in m["shards"]) / 1e6,
               limit_MB=limit * 1e3, baseline_MB=base, train_peak_MB=b_rss, train_s=b_wall,
               query_peak_MB=q_rss, query_s=q_wall, particles=particles, dir=out)
    print(json.dumps(row), flush=True)
    return row


def _save(rows, path):
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def run(args):
    os.makedirs(args.work_dir, exist_ok=True)
    py = [sys.executable, os.path.abspath(__file__)]
    opts = ["--references"] + [str(n) for n in args.references] + ["--particles", str(args.particles),
                                                                    "--work-dir", args.work_dir]
    code, _, _ = _child(py + opts + ["--prepare"] + (["--synthetic"] if args.synthetic else []),
                        os.path.join(args.work_dir, "prepare.log"))
    if code:
        raise SystemExit("prepare failed (%d), see %s/prepare.log" % (code, args.work_dir))
    with open(os.path.join(args.work_dir, "prepare.json")) as f:
        prep = json.load(f)
    ref, star = prep["reference"], prep["particles"]
    py = [sys.executable]
    code, _, base = _child(py + ["-c", "import torch, faiss; import deepcryo.swiftalign.__main__"],
                           os.path.join(args.work_dir, "baseline.log"))
    rows = []
    for n_refs, limit, step in zip(args.references, args.memory_limit, prep["steps"]):
        out = os.path.join(args.work_dir, "index_%g" % n_refs)
        if args.synthetic:
            b_wall, b_rss, q_wall, q_rss = _synthetic_rung(args, py, n_refs, limit, out)
            with open(os.path.join(out, "manifest.json")) as f:
                m = json.load(f)
            rows.append(_row(m, out, "synthetic", limit, base, b_rss, b_wall, q_rss, q_wall, args.particles))
            _save(rows, args.output)
            continue
        common = ["--particles", star, "--memory-limit", str(limit), "--threads", str(args.threads)]
        code, b_wall, b_rss = _child(py + ["-m", "deepcryo.swiftalign", "train", "--reference", ref] + common +
                                     ["--angular-step", "%.4f" % step, "--max-resolution", str(RESOLUTION_A),
                                      "--max-shift", "1", "--shift-step", "1",
                                      "--index-factory", args.index_factory, "--output", out],
                                     out + "_train.log")
        if code:
            raise SystemExit("train failed (%d), see %s_train.log" % (code, out))
        with open(os.path.join(out, "manifest.json")) as f:
            m = json.load(f)
        code, q_wall, q_rss = _child(py + ["-m", "deepcryo.swiftalign", "query", "--index", out] + common +
                                     ["--k", "1", "--output", out + "_aligned.star"], out + "_query.log")
        if code:
            raise SystemExit("query failed (%d), see %s_query.log" % (code, out))
        rows.append(_row(m, out, "real, step %.2f°" % step, limit, base, b_rss, b_wall, q_rss, q_wall,
                         args.particles))
        _save(rows, args.output)
    print("| references | index | limit | shards | baseline RSS | train peak RSS (above baseline) | "
          "query peak RSS (above baseline) | train / query wall |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if not args.keep:
            for name in os.listdir(r["dir"]):
                if name.startswith("shard_"):
                    os.remove(os.path.join(r["dir"], name))
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
    p.add_argument("--synthetic", action="store_true", help="random vectors instead of the projected gallery")
    p.add_argument("--child", choices=("build", "query"), help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.prepare and (len(args.memory_limit) != len(args.references) or min(args.references) < 1
                             or math.isnan(sum(args.memory_limit))):
        p.error("give one --memory-limit per --references")
    if args.prepare:
        prepare(args)
    elif args.child:
        child(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
