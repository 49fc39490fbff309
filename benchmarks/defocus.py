"""Benchmark of deepcryo.defocus on deepcryo's simulator, independent simulators and real micrographs.

Micrograph sets:

(a) ``ours``: :func:`deepcryo.core.micrographs.simulate_micrograph`, 4096², 200/300 kV, 0.5-2.5 Å/px, mean defocus
    0.3-5 µm, U − V ≤ 2000 Å, random ice/carbon texture and dose (``--n-ours``);
(b) ``independent``: particle fields with weak Thon rings from numpy-only code that shares nothing with deepcryo
    (``benchmarks/independent_micrographs.py``: full wave propagation, Poisson counts), 2048², 1 Å/px, 300 kV,
    mean defocus 0.5-3 µm, U − V ≤ 1500 Å (``--n-independent``); and ``aspire``: ASPIRE's MicrographSimulation
    (particles of a synthetic volume, CTF per micrograph, white noise; 2048², 1 Å/px; ``--n-aspire``, needs
    ``--baseline-python``);
(c) ``real``: the two 300 kV micrographs in mrcfile's source package (``--real-dir``: its ``tests/test_data``):
    ``epu2.9_example.mrc`` (4096², 0.667 Å/px) and ``fei-extended.mrc`` (3838 × 3710, 0.854 Å/px), Cs 2.7 mm
    and amplitude contrast 0.07 assumed. No truth: each estimate is compared with the others.

Estimators: deepcryo's CNN alone and CNN + refinement (:func:`deepcryo.defocus.predict.estimate_batch`, band
30-5 Å) for each ``--model`` (default: the shipped weights); with ``--baseline-python`` (a separate virtual
environment, see ``benchmarks/defocus_baselines.py``) ASPIRE's ``estimate_ctf`` and teamtomo's
torch-ctf-estimation on the first ``--baseline-n`` micrographs of each set and on the real ones.

Figures per set and estimator: MAE (mean of |ΔU| and |ΔV|, Å), median and 90th percentile of the per-micrograph
error, U−V bias (mean of estimated minus true U − V, Å: positive = astigmatism inflated), median angle error
(where the true U − V > 300 Å), CPU seconds per micrograph (``time.process_time``, all threads; set (a) is
4096², so its column is the CPU time per 4096² micrograph) and, for CNN + refinement, the calibration of its σ
(the fraction of micrographs whose mean-defocus error is within 2σ of the written ``dcDefocusSigma``). One small warm-up micrograph is not counted.

Example (the run of benchmarks/RESULTS.md)::

    pip download --no-binary :all: --no-deps mrcfile -d /tmp && tar xzf /tmp/mrcfile-*.tar.gz -C /tmp
    python3 -m venv /tmp/bench && /tmp/bench/bin/pip install aspire torch-ctf-estimation
    nice python benchmarks/defocus.py --threads 2 --real-dir /tmp/mrcfile-1.5.4/tests/test_data \\
        --baseline-python /tmp/bench/bin/python --model shipped new_weights.pt --json defocus_benchmark.json
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import independent_micrographs  # noqa: E402  (a sibling benchmark module)

from deepcryo.core.micrographs import random_micrograph_parameters, simulate_micrograph  # noqa: E402
from deepcryo.core.mrc import read_mrc, write_mrc  # noqa: E402
from deepcryo.defocus import fit, model as model_mod, predict  # noqa: E402
from deepcryo.defocus.psd import compute_psd  # noqa: E402

REAL = (("epu2.9_example.mrc", 0.66655), ("fei-extended.mrc", 0.85378))


def _angle_error(a, b):
    d = np.abs(np.asarray(a) - np.asarray(b)) % 180.0
    return np.minimum(d, 180.0 - d)


def _mic(path, truth, pixel_size_A, voltage_kV=300.0, cs_mm=2.7, amplitude_contrast=0.07):
    return dict(path=path, truth=truth, pixel_size_A=float(pixel_size_A), voltage_kV=float(voltage_kV),
                cs_mm=float(cs_mm), amplitude_contrast=float(amplitude_contrast), estimates={})


def make_sets(args, work):
    """{set name: [micrograph dict]} with MRC files under ``work``."""
    sets = {"ours": [], "independent": [], "aspire": [], "real": []}
    rng = np.random.default_rng(args.seed)
    for i in range(args.n_ours):
        prm = random_micrograph_parameters(rng, defocus_range_A=(3000.0, 50000.0))
        img, t = simulate_micrograph(4096, seed=args.seed + i, **prm)
        path = os.path.join(work, "ours_%02d.mrc" % i)
        write_mrc(path, img, t["pixel_size_A"])
        sets["ours"].append(_mic(path, (t["defocus_u_A"], t["defocus_v_A"], t["defocus_angle_deg"]),
                                 t["pixel_size_A"], t["voltage_kV"], t["cs_mm"], t["amplitude_contrast"]))
    for i in range(args.n_independent):
        img, t = independent_micrographs.particle_field_micrograph(
            shape=(2048, 2048), **independent_micrographs.random_truth(rng))
        path = os.path.join(work, "independent_%02d.mrc" % i)
        write_mrc(path, img, 1.0)
        sets["independent"].append(_mic(path, (t["defocus_u_A"], t["defocus_v_A"], t["defocus_angle_deg"]), 1.0))
    if args.baseline_python and args.n_aspire:
        out = os.path.join(work, "aspire")
        subprocess.run([args.baseline_python, os.path.join(os.path.dirname(__file__), "defocus_baselines.py"),
                        "simulate-aspire", "--n", str(args.n_aspire), "--size", "2048", "--seed", str(args.seed),
                        "--output-dir", out], check=True, stdout=subprocess.DEVNULL, env=_baseline_env(args),
                       cwd=work)  # ASPIRE writes logs/ into its working directory
        with open(os.path.join(out, "truth.json")) as f:
            for t in json.load(f):
                sets["aspire"].append(_mic(t["path"], (t["defocus_u_A"], t["defocus_v_A"], t["defocus_angle_deg"]),
                                           t["pixel_size_A"]))
    if args.real_dir:
        for name, px in REAL:
            sets["real"].append(_mic(os.path.abspath(os.path.join(args.real_dir, name)), None, px))
    return {k: v for k, v in sets.items() if v}


def _baseline_env(args):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env.pop("PYTHONPATH", None)
    return env


def run_deepcryo(mics, weights, label, device):
    """CNN only and CNN + refinement of one model on every micrograph (estimates stored in the dicts)."""
    model, _ = model_mod.load_model(None if weights == "shipped" else weights, device=device)
    for m in mics:
        entry = predict.MicrographEntry(m["path"], m["pixel_size_A"], m["voltage_kV"], m["cs_mm"],
                                        m["amplitude_contrast"])
        c0 = time.process_time()
        mic = torch.as_tensor(read_mrc(m["path"])[0], device=device)
        with torch.no_grad():
            u, v, a = model_mod.decode(model(compute_psd(mic, m["pixel_size_A"]), model_mod.acquisition_features(
                m["voltage_kV"], m["cs_mm"], 1).to(device)))
        m["estimates"]["%s CNN" % label] = (float(u[0]), float(v[0]), float(a[0]), time.process_time() - c0)
        c0 = time.process_time()
        r = predict.estimate_batch([entry], model, device=device)[0]
        m["estimates"]["%s CNN+fit" % label] = (r["defocus_u_A"], r["defocus_v_A"], r["defocus_angle_deg"],
                                                time.process_time() - c0, r["defocus_sigma_A"])


def run_exhaustive(mics, device):
    """deepcryo's CTFFIND-style grid search (no CNN): a second estimator for the real micrographs."""
    for m in mics:
        c0 = time.process_time()
        mic = torch.as_tensor(read_mrc(m["path"])[0], device=device)
        samp = predict.fit_sampling_A(m["pixel_size_A"], 5.0)
        psd = compute_psd(mic, m["pixel_size_A"], (samp,), predict.FIT_SIZE_PX)[:, 0]
        e = fit.exhaustive_search(psd, samp, m["voltage_kV"], m["cs_mm"], m["amplitude_contrast"])
        m["estimates"]["exhaustive grid"] = (float(e.defocus_u_A[0]), float(e.defocus_v_A[0]),
                                             float(e.defocus_angle_deg[0]), time.process_time() - c0)


def run_baselines(mics, args, work):
    """ASPIRE and torch-ctf-estimation in the baseline environment (a subprocess), estimates stored."""
    listing = os.path.join(work, "baseline_input.json")
    out = os.path.join(work, "baseline_output.json")
    with open(listing, "w") as f:
        json.dump([{k: m[k] for k in ("path", "pixel_size_A", "voltage_kV", "cs_mm", "amplitude_contrast")}
                   for m in mics], f)
    subprocess.run([args.baseline_python, os.path.join(os.path.dirname(__file__), "defocus_baselines.py"),
                    "estimate", "--input", listing, "--output", out], check=True, stdout=subprocess.DEVNULL,
                   env=_baseline_env(args), cwd=work)  # ASPIRE writes logs/ into its working directory
    with open(out) as f:
        rows = json.load(f)
    for m, row in zip(mics, rows):
        for method, label in (("aspire", "ASPIRE estimate_ctf"), ("tce", "torch-ctf-estimation")):
            r = row.get(method, {})
            if "error" in r:
                print("%s failed on %s: %s" % (label, m["path"], r["error"]), flush=True)
            elif r:
                m["estimates"][label] = (r["defocus_u_A"], r["defocus_v_A"], r["defocus_angle_deg"], r["cpu_s"])


def figures(mics, method):
    """Error figures of one estimator on the micrographs of a set that it processed (with truth)."""
    rows = [(m["truth"], m["estimates"][method]) for m in mics if method in m["estimates"]]
    if not rows:
        return None
    t = np.array([r[0] for r in rows])
    e = np.array([r[1][:4] for r in rows])
    sigma = np.array([r[1][4] if len(r[1]) > 4 else np.nan for r in rows])
    err = 0.5 * (np.abs(e[:, 0] - t[:, 0]) + np.abs(e[:, 1] - t[:, 1]))
    mean_err = 0.5 * np.abs(e[:, 0] + e[:, 1] - t[:, 0] - t[:, 1])
    astig = (t[:, 0] - t[:, 1]) > 300.0
    return dict(n=len(rows), mae_A=float(err.mean()), median_A=float(np.median(err)),
                p90_A=float(np.percentile(err, 90)), uv_bias_A=float(((e[:, 0] - e[:, 1]) - (t[:, 0] - t[:, 1])).mean()),
                angle_error_deg=float(np.median(_angle_error(e[astig, 2], t[astig, 2]))) if astig.any() else None,
                cpu_s=float(e[:, 3].mean()),
                within_2sigma=None if np.isnan(sigma).any() else float(np.mean(mean_err <= 2 * sigma)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-ours", type=int, default=8, help="4096² micrographs of deepcryo's simulator")
    parser.add_argument("--n-independent", type=int, default=8, help="2048² independent particle fields")
    parser.add_argument("--n-aspire", type=int, default=0, help="2048² ASPIRE micrographs (--baseline-python)")
    parser.add_argument("--real-dir", help="mrcfile's tests/test_data folder (the real micrographs)")
    parser.add_argument("--model", nargs="+", default=["shipped"], help="weight files ('shipped' = the shipped)")
    parser.add_argument("--baseline-python", help="python of the environment with aspire, torch-ctf-estimation")
    parser.add_argument("--baseline-n", type=int, default=4, help="micrographs per simulated set for the baselines")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--json", help="write every estimate and figure to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    t_start = time.time()
    labels = ["shipped" if w == "shipped" else os.path.basename(w) for w in args.model]
    with tempfile.TemporaryDirectory() as work:
        img, _ = simulate_micrograph(512, seed=1, pixel_size_A=1.0)  # warm-up (first calls of torch kernels)
        write_mrc(os.path.join(work, "warm.mrc"), img, 1.0)
        predict.estimate_batch([predict.MicrographEntry(os.path.join(work, "warm.mrc"), 1.0, 300.0, 2.7, 0.1)],
                               model_mod.load_model(None)[0], device=args.device)
        sets = make_sets(args, work)
        for name, mics in sets.items():
            for weights, label in zip(args.model, labels):
                run_deepcryo(mics, weights, label, args.device)
            if name == "real":
                run_exhaustive(mics, args.device)
            if args.baseline_python:
                run_baselines(mics if name == "real" else mics[:args.baseline_n], args, work)
            print("set %s done (%.0f s so far)" % (name, time.time() - t_start), flush=True)
    print("\n%s, torch %s, %d threads, device %s, seed %d; load average (1, 5, 15 min) start %.1f %.1f %.1f, "
          "end %.1f %.1f %.1f; %.0f s in all"
          % (platform.processor() or platform.machine(), torch.__version__, args.threads, args.device, args.seed,
             *load0, *os.getloadavg(), time.time() - t_start))
    report = {"sets": {}, "real": []}
    for name, mics in sets.items():
        methods = list(dict.fromkeys(k for m in mics for k in m["estimates"]))
        if name != "real":
            print("\n(%s) %d micrographs" % (name, len(mics)))
            print("| estimator | n | MAE (Å) | median | p90 | U−V bias (Å) | angle error (°) | CPU s/micrograph "
                  "| mean-defocus error ≤ 2σ |")
            print("|---|---|---|---|---|---|---|---|---|")
            report["sets"][name] = {}
            for method in methods:
                f = figures(mics, method)
                report["sets"][name][method] = f
                print("| %s | %d | %.0f | %.0f | %.0f | %+.0f | %s | %.2f | %s |"
                      % (method, f["n"], f["mae_A"], f["median_A"], f["p90_A"], f["uv_bias_A"],
                         "%.2f" % f["angle_error_deg"] if f["angle_error_deg"] is not None else "-", f["cpu_s"],
                         "%.0f %%" % (100 * f["within_2sigma"]) if f["within_2sigma"] is not None else "-"))
            continue
        print("\n(real) no truth: U / V / angle of each estimator, and its difference from %s CNN+fit" % labels[0])
        print("| micrograph | estimator | U (Å) | V (Å) | angle (°) | Δ mean defocus (Å) | Δ(U−V) (Å) | CPU s |")
        print("|---|---|---|---|---|---|---|---|")
        for m in mics:
            ref = m["estimates"]["%s CNN+fit" % labels[0]]
            for method, e in m["estimates"].items():
                dm = 0.5 * (e[0] + e[1] - ref[0] - ref[1])
                du = (e[0] - e[1]) - (ref[0] - ref[1])
                print("| %s | %s | %.0f | %.0f | %.1f | %+.0f | %+.0f | %.2f |"
                      % (os.path.basename(m["path"]), method, e[0], e[1], e[2], dm, du, e[3]))
                report["real"].append(dict(micrograph=os.path.basename(m["path"]), estimator=method, u_A=e[0],
                                           v_A=e[1], angle_deg=e[2], cpu_s=e[3]))
    if args.json:
        for mics in sets.values():
            for m in mics:
                m["path"] = os.path.basename(m["path"])
        report["micrographs"] = sets
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
