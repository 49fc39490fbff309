"""CryoBench-style landscape benchmark: per-conformation FSC-AUC of deepcryo's VAE, cryoDRGN and the consensus map.

Two particle sets are rendered by RELION's ``relion_project`` (not by deepcryo's projector; see
:mod:`deepcryo.tests.relion_data`: uniform random poses, origins up to 3 px, CTF of 1.5-2.5 µm defocus, white
noise at ``--snr``), each with its particles split evenly between the conformations:

- ``motion``: a 1-D continuous motion, ``--conformations`` K (default 20) maps of the phantom with its domain
  turned about its hinge by 0 … ``--hinge-deg`` in equal steps (``phantom_states(box, K, angle_deg)``, the
  maps ``hinge_volume(box, k / (K - 1), max_angle_deg)`` of :mod:`deepcryo.core.simulate`);
- ``discrete``: a mixture of ``--states`` (default 3) such conformations, far apart along the same hinge.

Each method runs on the true poses and CTF of the same STAR and stack:

- ``deepcryo``: ``python -m deepcryo.landscape train`` then ``volumes --zfile``;
- ``cryoDRGN`` (with ``--cryodrgn``, the ``cryodrgn`` 4.3.1 executable of its own virtual environment, as it
  needs numpy >= 2: ``python3 -m venv /tmp/cdrgn && /tmp/cdrgn/bin/pip install cryodrgn==4.3.1``): ``downsample``,
  ``parse_pose_star``, ``parse_ctf_star``, ``train_vae`` with ``--cryodrgn-dim``-wide 3-layer networks (cryoDRGN's
  default is 1024), then ``eval_vol --zfile``;
- ``consensus``: ``python -m deepcryo.core.reconstruct`` of all particles with the true poses, the floor: a
  method that does not beat it inside the moving region has not recovered the motion.

Scores, as CryoBench (Jeon et al. 2024, arXiv:2408.05526) scores methods, at the working box ``--work-box`` (the
true maps and the consensus are Fourier-cropped to it):

- **FSC-AUC**: for each conformation k, the FSC between the method's volume for k and the true map of k, and
  its area against the spatial frequency in 1/px up to Nyquist (:func:`deepcryo.landscape.metrics.fsc_auc`;
  identical maps score 0.5), averaged over k. The volume for k is decoded at the **mean latent of k's particles**
  (CryoBench's first protocol, its per-conformation FSC; its later per-image FSC decodes one volume at each
  image's latent and so also penalises the spread of a conformation's latents, at N decodes: not done here).
  Over the whole particle (a soft sphere of radius N/2 − 4 px with a 3 px edge) and inside the **moving region**
  (:func:`deepcryo.landscape.metrics.scoring_masks`: voxels where the standard deviation over the K true maps
  exceeds 20 % of its maximum, extended by 1 px with a 2 px cosine edge, within that sphere; 40-50 % of the
  phantom's density). The masked curves are corrected for the correlation the mask itself creates, by phase
  randomisation as relion_postprocess (:func:`deepcryo.landscape.metrics.conformation_fsc_auc`): uncorrected, the
  tight moving-region mask scores the consensus higher there than over the whole particle. All methods and the
  consensus share the masks. As CryoBench (its ``fsc`` and ``fsc_flipped``), each
  method's volumes are scored as written and mirrored (z flipped about the box centre), and the better hand over
  the whole particle is kept: a method's frame and hand are its own;
- **|ρ|** (motion): |Spearman ρ| between the latent PC1 and the conformation index; **ARI** (discrete): adjusted
  Rand index of k-means (K = the number of states) on the latents against the true states;
- **CPU s**: user + system time of the child processes of each method, everything from the STAR and stack to the
  scored volumes (cryoDRGN's preprocessing included).

Published CryoBench FSC-AUC on IgG-1D (100 k particles, 128 px, SNR 0.01), for context: cryoDRGN 0.366,
cryoSPARC 3DVA 0.351, RECOVAR 0.391, CryoSPIRE 0.402.

RECOVAR is not run here. RECOVAR 1.0.5 (PyPI, JAX) installs in its own virtual environment and its ``pipeline``
runs on CPU (``--accept-cpu --mask sphere --zdim 4`` on 400 particles at box 32: 264 s wall, 200 CPU s), but its
``compute_state`` (volumes at 4 latent points by kernel regression) had not finished after 400 s on the 2-core
development machine, so a RECOVAR run at the benchmark's size needs a GPU. Adding it follows cryoDRGN's pattern:
latents in ``model/zdim_<d>/latent_coords.npy``, volumes from ``compute_state --latent-points <z.txt>``.

Prints one markdown table per set and writes ``--json`` (default ``<workdir>/cryobench.json``) with every
per-conformation score. Validation size (see benchmarks/RESULTS.md)::

    python benchmarks/landscape_cryobench.py --n 2000 --box 64 --work-box 32 --epochs 8 --snr 0.1 \\
        --cryodrgn /tmp/cdrgn/bin/cryodrgn --cryodrgn-dim 256

The issue's size (≥ 20 k particles, SNR 0.1 and 0.01)::

    python benchmarks/landscape_cryobench.py --n 20000 --box 128 --work-box 64 --epochs 20 --snr 0.01 \\
        --cryodrgn /tmp/cdrgn/bin/cryodrgn
"""
import argparse
import glob
import json
import logging
import os
import sys
import tempfile
import time

import numpy as np
import torch

from deepcryo.core.fourier import resize_volume
from deepcryo.core.mrc import read_mrc
from deepcryo.landscape import metrics
from deepcryo.tests.relion_data import RenderSpec, render

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import landscape as pairwise  # noqa: E402  (benchmarks/landscape.py, a sibling benchmark module)
from landscape import timed_commands  # noqa: E402

logger = logging.getLogger("landscape_cryobench")

SETS = ("motion", "discrete")


def _read_volumes(paths):
    return np.stack([read_mrc(p)[0] for p in paths]).astype(np.float64)


def run_deepcryo(star, conformation, out, args):
    """Train on ``star`` (true poses), decode at each conformation's mean latent; (volumes, latents, wall, CPU)."""
    wall, cpu, z, _ = pairwise.run_deepcryo(star, out, args)
    zfile = os.path.join(out, "conformation_means.txt")
    np.savetxt(zfile, metrics.conformation_means(z, conformation))
    vols = os.path.join(out, "volumes")
    w, c = timed_commands([[sys.executable, "-m", "deepcryo.landscape", "volumes", out, "--output-dir", vols,
                            "--zfile", zfile, "--threads", str(args.threads)]])
    return _read_volumes(sorted(glob.glob(os.path.join(vols, "vol_*.mrc")))), z, wall + w, cpu + c


def run_cryodrgn(star, conformation, out, args):
    """cryoDRGN 4.3.1 from the same STAR and stack (``benchmarks/landscape.py``'s downsample, parse and
    ``train_vae``, networks ``--cryodrgn-dim`` wide), then ``eval_vol`` at each conformation's mean latent;
    (volumes, latents, wall, CPU)."""
    wall, cpu, z, _ = pairwise.run_cryodrgn(star, out, args, dim=args.cryodrgn_dim)
    train_dir = os.path.join(out, "train")
    zfile = os.path.join(out, "conformation_means.txt")
    np.savetxt(zfile, metrics.conformation_means(z, conformation))
    vols = os.path.join(out, "volumes")
    w, c = timed_commands([[args.cryodrgn, "eval_vol", os.path.join(train_dir, "weights.pkl"), "-c",
                            os.path.join(train_dir, "config.yaml"), "--zfile", zfile, "-o", vols,
                            "--Apix", repr(args.pixel_size * args.box / args.work_box)]],
                          env=pairwise.cryodrgn_environ(args))
    return _read_volumes(sorted(glob.glob(os.path.join(vols, "*.mrc")))), z, wall + w, cpu + c


def run_consensus(star, n_conformations, out, args):
    """Direct Fourier inversion of all particles with the true poses, cropped to the working box, once per
    conformation; (volumes, None, wall, CPU)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "consensus.mrc")
    wall, cpu = timed_commands([[sys.executable, "-m", "deepcryo.core.reconstruct", "--particles", star, "--output", path,
                         "--threads", str(args.threads)]])
    vol = resize_volume(torch.as_tensor(read_mrc(path)[0]), args.work_box).numpy()
    return np.repeat(vol[None].astype(np.float64), n_conformations, 0), None, wall, cpu


def mirrored(volumes: np.ndarray) -> np.ndarray:
    """Volumes (K, N, N, N) of the other hand: z flipped about the box centre (index N/2 stays in place)."""
    return np.roll(np.flip(volumes, axis=1), 1, axis=1)


def score(volumes, truths, masks):
    """Per-conformation FSC-AUC in each mask (dict name -> (K,)) in the better hand over the whole particle."""
    best = None
    for hand, vols in (("as written", volumes), ("mirrored", mirrored(volumes))):
        aucs = {name: metrics.conformation_fsc_auc(vols, truths, m) for name, m in masks.items()}
        if best is None or aucs["whole"].mean() > best[1]["whole"].mean():
            best = (hand, aucs)
    return best


def run_set(kind, args, work):
    """Render one set, run every method on it and score it; the set's JSON entry."""
    states = args.conformations if kind == "motion" else args.states
    spec = RenderSpec(n=args.n, box=args.box, pixel_size_A=args.pixel_size, snr=args.snr, seed=args.seed,
                      states=states, hinge_deg=args.hinge_deg)
    t0 = time.time()
    data = render(os.path.join(work, kind, "data"), spec)
    logger.info("%s: rendered %d particles of %d conformations by relion_project in %.0f s (SNR %.3f)", kind,
                args.n, states, time.time() - t0, data.snr)
    conformation = np.asarray(data.truth.particles["rlnClassNumber"]) - 1
    truths = np.stack([resize_volume(torch.as_tensor(v), args.work_box).numpy() for v in data.volumes])
    masks = metrics.scoring_masks(truths)
    methods = [("deepcryo", run_deepcryo)]
    if args.cryodrgn:
        methods.append(("cryoDRGN", run_cryodrgn))
    entry = {"spec": dict(vars(spec)), "work_box": args.work_box, "snr_measured": data.snr, "moving_mask_fraction":
             float(masks["moving"].mean()), "methods": {}}
    for name, run in methods + [("consensus", None)]:
        out = os.path.join(work, kind, name)
        t0 = time.time()
        if run is None:
            vols, z, wall, cpu = run_consensus(data.star, states, out, args)
        else:
            vols, z, wall, cpu = run(data.star, conformation, out, args)
        hand, aucs = score(vols, truths, masks)
        result = {"auc_whole": float(aucs["whole"].mean()), "auc_moving": float(aucs["moving"].mean()),
                  "auc_whole_per_conformation": aucs["whole"].tolist(),
                  "auc_moving_per_conformation": aucs["moving"].tolist(), "hand": hand, "wall_s": wall, "cpu_s": cpu}
        if z is not None:
            key, value = (("rho", metrics.hinge_rho(z, conformation)) if kind == "motion"
                          else ("ari", metrics.state_ari(z, conformation)))
            result[key] = value
        entry["methods"][name] = result
        logger.info("%s %s: %.0f s wall, %s", kind, name, time.time() - t0, json.dumps(
            {k: round(v, 3) for k, v in result.items() if isinstance(v, float)}))
    return entry


def table(kind, entry):
    """The set's markdown table."""
    key, label = ("rho", "\\|ρ\\| PC1 vs conformation") if kind == "motion" else ("ari", "ARI")
    spec = entry["spec"]
    lines = ["%s: %d particles, %d conformations, box %d scored at %d, SNR %.3g, moving region %.1f %% of the box" % (
                 kind, spec["n"], spec["states"], spec["box"], entry["work_box"], entry["snr_measured"],
                 100 * entry["moving_mask_fraction"]), "",
             "| method | FSC-AUC whole | FSC-AUC moving | %s | CPU s |" % label, "|---|---|---|---|---|"]
    for name, r in entry["methods"].items():
        ordering = "%.3f" % r[key] if key in r else "—"
        lines.append("| %s | %.3f | %.3f | %s | %.0f |" % (name, r["auc_whole"], r["auc_moving"], ordering,
                                                           r["cpu_s"]))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000, help="particles per set")
    p.add_argument("--box", type=int, default=64, help="rendered box (px)")
    p.add_argument("--work-box", type=int, default=None, help="training and scoring box (px; default --box)")
    p.add_argument("--pixel-size", type=float, default=2.0, help="Å/px of the rendered box")
    p.add_argument("--snr", type=float, default=0.1, help="signal variance / noise variance of the images")
    p.add_argument("--conformations", type=int, default=20, help="conformations of the motion set")
    p.add_argument("--states", type=int, default=3, help="states of the discrete set")
    p.add_argument("--hinge-deg", type=float, default=40.0, help="largest turn of the domain (degrees)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--latent-dim", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of poses, CTF, origins, states and noise")
    p.add_argument("--cryodrgn", default=None, help="cryodrgn executable of its own virtual environment")
    p.add_argument("--cryodrgn-dim", type=int, default=1024, help="width of cryoDRGN's 3-layer encoder and decoder")
    p.add_argument("--sets", default=",".join(SETS), help="comma-separated: " + ", ".join(SETS))
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="output JSON (default <workdir>/cryobench.json)")
    args = p.parse_args(argv)
    args.work_box = args.work_box or args.box
    sets = args.sets.split(",")
    if not set(sets) <= set(SETS) or args.work_box > args.box or args.work_box % 2:
        p.error("--sets from %s; --work-box even and <= --box" % (SETS,))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = args.workdir or tempfile.mkdtemp(prefix="bench_cryobench_")
    header = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "cpus": os.cpu_count(),
              "load_before": os.getloadavg(), "args": vars(args)}
    results = {}
    for kind in sets:
        results[kind] = run_set(kind, args, work)
        print(table(kind, results[kind]) + "\n", flush=True)
    header["load_after"] = os.getloadavg()
    path = args.json or os.path.join(work, "cryobench.json")
    with open(path, "w") as f:
        json.dump(dict(header, sets=results), f, indent=1)
    print("date %s UTC, %d CPUs, load average before %s, after %s; JSON %s" % (
        header["date_utc"], header["cpus"], header["load_before"], header["load_after"], path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
