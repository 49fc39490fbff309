"""SwiftAlign's global search against an exhaustive search of the same poses with the same scores.

Particles are rendered by ``relion_project`` (``tests/relion_data.py``: the phantom, uniform poses,
origins uniform within ±``--max-shift`` px, CTF, white noise at ``--snr``), so neither program sees images
of deepcryo's own simulator. For each angular step:

* **index** (the product): ``python -m deepcryo.swiftalign train`` then ``query`` (default factory, k, nprobe),
  run as child processes on all particles; CPU seconds (user + system), wall seconds and peak RSS of each
  child (``os.wait4``), start-up included;
* **exhaustive**: every gallery pose × every origin of the shift grid (the index searches the coarser search
  grid, :func:`deepcryo.swiftalign.gallery.search_grid`, and re-ranks over its cells) scored with the exact score of the
  re-ranking (normalised correlation with the particle's own CTF, whitening as the index: none): the band
  slices of every gallery pose projected once (as the index's training does), then one real matrix product
  per block of poses and block of 64 particles (:func:`exhaustive_pool`), then the same refinement of the
  ``k`` best and the same choice of the winner (:func:`deepcryo.swiftalign.query.select_and_refine`).

Both searches also run in this process on the first ``--exhaustive-particles`` particles (:func:`stages`),
timed stage by stage: the *search* (index: search vectors, faiss, exact re-ranking of the 4·k matches;
exhaustive: the gallery's projection, counted once, and the scoring of every pose and origin) and the
*refinement* that follows it (the same code for both). The search ratio is exhaustive search CPU / (train
CPU + index search CPU), both scaled to all particles; the whole-alignment ratio adds each path's refinement
(the index path: the query program's own CPU time on all particles).

A pose is correct when its angle is within two angular steps of the truth (over the symmetry copies) and its
origin within 1.5 px. The table gives each method's correct share on the exhaustive subset, the share of
the exhaustive search's correct particles that the index also gets right, and the CPU ratio.

    python benchmarks/global_search.py --n 10000 --steps 7.5 3.75 --work-dir /tmp/gs
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from deepcryo.core.geometry import pose_distance_deg
from deepcryo.core.particles import read_particles
from deepcryo.swiftalign.gallery import Gallery, gallery_poses, shift_grid
from deepcryo.swiftalign.query import ParticleBatch, select_and_refine
from deepcryo.swiftalign.sampling import shift_step_for_resolution
from scale import run_timed  # benchmarks/scale.py, beside this script

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
from relion_data import RenderSpec, render  # noqa: E402  (tests/relion_data.py)


def _child(cmd, log_path):
    """Run ``cmd`` (the ladder's timed launcher, :func:`scale.run_timed`); (CPU s, wall s, peak RSS MB) of that
    program alone."""
    run = run_timed(cmd, os.getcwd(), log_path, dict(os.environ), timeout_s=float("inf"))
    if run["returncode"]:
        raise SystemExit("%s failed, see %s" % (" ".join(cmd), log_path))
    return run["cpu_s"], run["wall_s"], run["rss_mb"]


def exhaustive_pool(gallery, band, parts, origins_px, n_keep, pose_block=2048):
    """The ``n_keep`` best (pose, origin) of every particle by exact score over all poses of ``gallery`` (M, P)
    complex (the band slices of every gallery pose, projected once) × ``origins_px`` (S, 2): pose indices
    (B, n), origin indices (B, n), scores (B, n)."""
    b, s = len(parts), len(origins_px)
    undo = band.phase_ramps(torch.as_tensor(origins_px, dtype=torch.float32)).conj()          # (S, P)
    y = (parts.coeffs * parts.ctf)[:, None] * undo[None]                                     # (B, S, P)
    y = torch.cat([y.real, y.imag], -1).reshape(b * s, -1)                                   # (B·S, 2P)
    ctf2 = parts.ctf ** 2                                                                    # (B, P)
    x_norm = (parts.coeffs.abs() ** 2).sum(-1)                                               # (B,)
    best = torch.full((b, n_keep), -np.inf)
    best_id = torch.zeros((b, n_keep), dtype=torch.int64)
    for start in range(0, len(gallery), pose_block):
        ref = gallery[start:start + pose_block]                                              # (C, P)
        c = ref.shape[0]
        num = torch.cat([ref.real, ref.imag], -1) @ y.T                                      # (C, B·S)
        ref_norm = (ref.abs() ** 2) @ ctf2.T                                                 # (C, B)
        score = num.reshape(c, b, s) / torch.sqrt(ref_norm * x_norm).clamp_min(1e-20)[..., None]
        score = score.permute(1, 0, 2).reshape(b, c * s)
        top = score.topk(n_keep, dim=1)                                                      # block's best first
        ids = start * s + top.indices                                                        # pose·S + origin
        merged = torch.cat([best, top.values], 1).topk(n_keep, dim=1)
        best = merged.values
        best_id = torch.gather(torch.cat([best_id, ids], 1), 1, merged.indices)
    return best_id // s, best_id % s, best


def stages(star, subset, index_dir, step, res_A, max_shift, k, nprobe, threads, block=64):
    """Both searches on particles ``subset``, ``block`` at a time, in this process, each followed by the same
    refinement: CPU seconds of each search stage (index: search vectors, faiss search, exact re-ranking of
    the 4k matches; exhaustive: the gallery's band slices, projected once, then :func:`exhaustive_pool`)
    and of the refinements, and the poses (angles (n, 3), origins_A (n, 2)) of each path."""
    import faiss
    from deepcryo.core.geometry import matrix_to_euler
    from deepcryo.swiftalign import index as swindex
    from deepcryo.swiftalign.query import nearest_poses, rerank_matches
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    px = star.pixel_size_A
    bundle = swindex.load(index_dir)
    projector, band = bundle.projector, bundle.band
    exhaustive = Gallery(projector, band, gallery_poses(step))          # the index's poses, unweighted
    rotations = exhaustive.rotations
    sstep = shift_step_for_resolution(res_A, px)
    origins = shift_grid(max_shift, sstep)
    assert len(rotations) == len(bundle.gallery)
    ctf = star.ctf_params()
    cpu = dict(index_search=0.0, index_refine=0.0, exhaustive_gallery=0.0, exhaustive_search=0.0,
               exhaustive_refine=0.0)
    poses = {name: (np.zeros((len(subset), 3)), np.zeros((len(subset), 2))) for name in ("index", "exhaustive")}

    def refine(name, parts, rot, org, score, slices, rows):
        t0 = time.process_time()
        sel = select_and_refine(projector, band, parts, rot, org, score, k, step, sstep, 2 * step, "C1",
                                pool_slices=slices)
        cpu[name + "_refine"] += time.process_time() - t0
        poses[name][0][rows] = matrix_to_euler(sel.rotation.double()).numpy()
        poses[name][1][rows] = (sel.origin_px * px).numpy()

    t0 = time.process_time()
    exhaustive.keep_slices(float("inf"))                                                      # (M, P), once
    gallery = exhaustive.slices(torch.arange(len(exhaustive)))
    cpu["exhaustive_gallery"] = time.process_time() - t0
    origins_t = torch.as_tensor(origins, dtype=torch.float32)
    with star.open_images() as stack:
        for s in range(0, len(subset), block):
            idx = subset[s:s + block]
            rows = np.arange(s, s + len(idx))
            parts = ParticleBatch(band, stack.read(idx), {key: v[idx] for key, v in ctf.items()})
            t0 = time.process_time()
            vectors = parts.search_vectors(band, bundle.origins_px, ctf_rms=bundle.gallery.ctf_rms).numpy()
            distances, ids = swindex.search(bundle.shards(), vectors, 4 * k, nprobe)
            rot, org, score, slices = rerank_matches(bundle, parts, *nearest_poses(distances, ids,
                                                                                   len(bundle.origins_px), 4 * k))
            cpu["index_search"] += time.process_time() - t0
            refine("index", parts, rot, org, score, slices, rows)
            t0 = time.process_time()
            pose, origin, score = exhaustive_pool(gallery, band, parts, origins, 4 * k)
            cpu["exhaustive_search"] += time.process_time() - t0
            refine("exhaustive", parts, rotations[pose], origins_t[origin], score, gallery[pose], rows)
    return cpu, poses


def correct(star, rows, angles, origins_A, step):
    ang = pose_distance_deg(torch.as_tensor(star.angles_deg()[rows]), torch.as_tensor(angles)).numpy()
    shift = np.linalg.norm(star.origins_A()[rows] - origins_A, axis=1) / star.pixel_size_A
    return (ang <= 2 * step) & (shift <= 1.5), ang


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000, help="particles")
    p.add_argument("--box", type=int, default=128)
    p.add_argument("--pixel-size", type=float, default=1.5)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--max-shift", type=float, default=6.0, help="origins of the truth and of the search, ± px")
    p.add_argument("--max-resolution", type=float, default=12.0, help="band limit of the search, Å")
    p.add_argument("--steps", type=float, nargs="+", default=[7.5, 3.75], help="angular steps, degrees")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--nprobe", type=int, default=8)
    p.add_argument("--exhaustive-particles", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work-dir", required=True)
    args = p.parse_args(argv)
    spec = RenderSpec(n=args.n, box=args.box, pixel_size_A=args.pixel_size, snr=args.snr, seed=11,
                      max_shift_px=args.max_shift, defocus_range_A=(10000.0, 30000.0))
    rs = render(os.path.join(args.work_dir, "data"), spec)
    star = read_particles(rs.star)
    subset = np.arange(min(args.exhaustive_particles, len(star)))
    py = [sys.executable, "-m", "deepcryo.swiftalign"]
    common = ["--particles", rs.star, "--threads", str(args.threads)]
    rows = []
    for step in args.steps:
        out = os.path.join(args.work_dir, "index_%g" % step)
        t_cpu, t_wall, t_rss = _child(py + ["train", "--reference", rs.volume_paths[0], "--angular-step", str(step),
                                            "--max-resolution", str(args.max_resolution),
                                            "--max-shift", str(args.max_shift), "--output", out] + common,
                                      out + "_train.log")
        aligned = out + "_aligned.star"
        q_cpu, q_wall, q_rss = _child(py + ["query", "--index", out, "--k", str(args.k), "--nprobe", str(args.nprobe),
                                            "--output", aligned] + common, out + "_query.log")
        with open(os.path.join(out, "manifest.json")) as f:
            manifest = json.load(f)
        res = read_particles(aligned)
        ok_index, ang_index = correct(star, np.arange(len(star)), res.angles_deg(), res.origins_A(), step)
        cpu, poses = stages(star, subset, out, step, args.max_resolution, args.max_shift,
                            args.k, args.nprobe, args.threads)
        ok_sub, _ = correct(star, subset, *poses["index"], step)
        ok_exh, ang_exh = correct(star, subset, *poses["exhaustive"], step)
        scale = len(star) / len(subset)
        kept = (ok_sub & ok_exh).sum() / max(1, ok_exh.sum())
        search_index = t_cpu + cpu["index_search"] * scale
        search_exh = cpu["exhaustive_gallery"] + cpu["exhaustive_search"] * scale
        rows.append(dict(step=step, references=manifest["n_references"], factory=manifest["factory"],
                         origins=len(manifest["origins_px"]),
                         exhaustive_origins=len(shift_grid(args.max_shift, manifest["shift_step_px"])),
                         train_cpu=t_cpu, train_wall=t_wall, train_rss=t_rss,
                         query_cpu=q_cpu, query_wall=q_wall, query_rss=q_rss, subset=len(subset),
                         stage_cpu_subset=cpu, search_cpu_index=search_index, search_cpu_exhaustive=search_exh,
                         search_ratio=search_exh / search_index,
                         whole_ratio=(search_exh + cpu["exhaustive_refine"] * scale) / (t_cpu + q_cpu),
                         index_correct=float(ok_index.mean()), index_correct_subset=float(ok_sub.mean()),
                         exhaustive_correct_subset=float(ok_exh.mean()), kept=float(kept),
                         index_median_deg=float(np.median(ang_index)), exhaustive_median_deg=float(np.median(ang_exh))))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| step | references (factory) | origins per particle (index / exhaustive) | train CPU s (wall; RSS MB) | query CPU s, all "
          "particles (wall; RSS MB) | search CPU s, %d particles: index (train + search + re-rank) / exhaustive "
          "| ratio | whole alignment ratio | correct: index all / subset | correct: exhaustive | exhaustive's "
          "correct kept | median error index / exhaustive |" % args.n)
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| %g° | %d (%s) | %d / %d | %.0f (%.0f; %.0f) | %.0f (%.0f; %.0f) | %.0f / %.0f | %.1f× | %.1f× | %.1f %% / %.1f %% "
              "| %.1f %% | %.1f %% | %.2f° / %.2f° |" % (
                  r["step"], r["references"], r["factory"], r["origins"], r["exhaustive_origins"], r["train_cpu"], r["train_wall"],
                  r["train_rss"], r["query_cpu"], r["query_wall"], r["query_rss"], r["search_cpu_index"],
                  r["search_cpu_exhaustive"], r["search_ratio"], r["whole_ratio"], 100 * r["index_correct"],
                  100 * r["index_correct_subset"], 100 * r["exhaustive_correct_subset"], 100 * r["kept"],
                  r["index_median_deg"], r["exhaustive_median_deg"]))

if __name__ == "__main__":
    main()
