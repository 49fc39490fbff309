"""Benchmark of deepcryo.defocus on simulated 4096² micrographs with known CTF.

For every micrograph (simulated with :mod:`deepcryo.core.micrographs`: 200/300 kV, 0.5-2.5 Å/px,
mean defocus 0.3-5 µm, astigmatism up to 2000 Å, random texture and dose) it measures

* CNN only: the shipped model's U, V, angle (PSD + CNN time);
* CNN + refinement: :func:`deepcryo.defocus.predict.estimate_batch` (everything from the MRC file: read,
  both PSDs, CNN, fit, fit resolution), seconds per micrograph;
* exhaustive search: the same fit PSD, :func:`deepcryo.defocus.fit.exhaustive_search` (CTFFIND-style 2D
  grid, no CNN seed, then the same local refinement), seconds per micrograph including its PSD.

and prints MAE of U and V (Å), median angle error (degrees, where U − V > 300 Å), wall and CPU seconds
(``time.process_time``, all threads) per micrograph, the speed ratio, flags and the load average. One small
warm-up micrograph is processed first (torch's first-call costs are not counted).

Example::

    nice python benchmarks/defocus.py --n 20 --size 4096 --threads 2
"""
import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch

from deepcryo.core.micrographs import random_micrograph_parameters, simulate_micrograph
from deepcryo.core.mrc import read_mrc, write_mrc
from deepcryo.defocus import fit, model as model_mod, predict
from deepcryo.defocus.psd import compute_psd


def _angle_error(a, b):
    d = np.abs(np.asarray(a) - np.asarray(b)) % 180.0
    return np.minimum(d, 180.0 - d)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--pixel-size-min", type=float, default=0.5)
    parser.add_argument("--pixel-size-max", type=float, default=2.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--model", help="weight file (default: the shipped weights)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    model, config = model_mod.load_model(args.model, device=args.device)
    load0 = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:  # warm-up (first calls of torch kernels), not counted
        img, t = simulate_micrograph(512, seed=1, pixel_size_A=1.0)
        path = os.path.join(tmp, "warm.mrc")
        write_mrc(path, img, 1.0)
        predict.estimate_batch([predict.MicrographEntry(path, 1.0, 300.0, 2.7, 0.1)], model, device=args.device)
        psd = compute_psd(img, 1.0, (2.0,), predict.FIT_SIZE_PX)[:, 0]
        fit.exhaustive_search(psd, 2.0, 300.0, 2.7, 0.1, defocus_range_A=(10000.0, 11000.0))
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.n):
            prm = random_micrograph_parameters(rng, pixel_size_range_A=(args.pixel_size_min, args.pixel_size_max),
                                               defocus_range_A=(3000.0, 50000.0))
            img, t = simulate_micrograph(args.size, seed=args.seed + i, **prm)
            path = os.path.join(tmp, "mic.mrc")
            write_mrc(path, img, t["pixel_size_A"])
            entry = predict.MicrographEntry(path, t["pixel_size_A"], t["voltage_kV"], t["cs_mm"],
                                            t["amplitude_contrast"])
            t0, c0 = time.time(), time.process_time()
            mic = torch.as_tensor(read_mrc(path)[0], device=args.device)
            with torch.no_grad():
                cu, cv, ca = model_mod.decode(model(compute_psd(mic, t["pixel_size_A"]), model_mod.acquisition_features(
                    t["voltage_kV"], t["cs_mm"], 1).to(args.device)))
            t_cnn, c_cnn = time.time() - t0, time.process_time() - c0
            t0, c0 = time.time(), time.process_time()
            r = predict.estimate_batch([entry], model, device=args.device)[0]
            t_ref, c_ref = time.time() - t0, time.process_time() - c0
            t0, c0 = time.time(), time.process_time()
            mic = torch.as_tensor(read_mrc(path)[0], device=args.device)
            samp = predict.fit_sampling_A(t["pixel_size_A"], 5.0)
            psd = compute_psd(mic, t["pixel_size_A"], (samp,), predict.FIT_SIZE_PX)[:, 0]
            e = fit.exhaustive_search(psd, samp, t["voltage_kV"], t["cs_mm"], t["amplitude_contrast"])
            t_exh, c_exh = time.time() - t0, time.process_time() - c0
            rows.append(dict(truth=t, cnn=(float(cu[0]), float(cv[0]), float(ca[0])),
                             ref=(r["defocus_u_A"], r["defocus_v_A"], r["defocus_angle_deg"]),
                             exh=(float(e.defocus_u_A[0]), float(e.defocus_v_A[0]), float(e.defocus_angle_deg[0])),
                             t_cnn=t_cnn, t_ref=t_ref, t_exh=t_exh, c_cnn=c_cnn, c_ref=c_ref, c_exh=c_exh,
                             res=r["resolution_A"], fom=r["figure_of_merit"], flag=r["flagged"]))
            print("%2d  px %.2f  %3.0f kV  truth U %6.0f V %6.0f A %5.1f | CNN %6.0f %6.0f %5.1f | refined %6.0f %6.0f "
                  "%5.1f (%.2f s, res %.1f Å%s) | exhaustive %6.0f %6.0f %5.1f (%.2f s)"
                  % (i, t["pixel_size_A"], t["voltage_kV"], t["defocus_u_A"], t["defocus_v_A"], t["defocus_angle_deg"],
                     *rows[-1]["cnn"], *rows[-1]["ref"], t_ref, r["resolution_A"], ", FLAGGED" if r["flagged"] else "",
                     *rows[-1]["exh"], t_exh), flush=True)
    tu = np.array([r["truth"]["defocus_u_A"] for r in rows])
    tv = np.array([r["truth"]["defocus_v_A"] for r in rows])
    ta = np.array([r["truth"]["defocus_angle_deg"] for r in rows])
    astig = (tu - tv) > 300

    def stats(key):
        est = np.array([r[key] for r in rows])
        mae = 0.5 * (np.abs(est[:, 0] - tu) + np.abs(est[:, 1] - tv)).mean()
        ang = np.median(_angle_error(est[astig, 2], ta[astig])) if astig.any() else float("nan")
        return mae, ang

    print("\n%d micrographs of %d², %s, torch %s, %d threads, device %s, model %s"
          % (len(rows), args.size, platform.processor() or platform.machine(), torch.__version__, args.threads,
             args.device, config.get("arch")))
    for key, label, tkey in (("cnn", "CNN only", "cnn"), ("ref", "CNN + refinement", "ref"),
                             ("exh", "exhaustive search", "exh")):
        mae, ang = stats(key)
        err = np.array([0.5 * (abs(r[key][0] - r["truth"]["defocus_u_A"]) + abs(r[key][1] - r["truth"]["defocus_v_A"]))
                        for r in rows])
        print("%-20s MAE(U,V) %7.1f Å (median %6.1f, max %7.1f)  median angle error %5.2f°   "
              "%.2f s wall, %.2f s CPU /micrograph (median wall %.2f)"
              % (label, mae, np.median(err), err.max(), ang, np.mean([r["t_" + tkey] for r in rows]),
                 np.mean([r["c_" + tkey] for r in rows]), np.median([r["t_" + tkey] for r in rows])))
    print("speed-up of CNN + refinement over exhaustive search: %.1fx wall (mean), %.1fx CPU (mean), "
          "%.1fx (median wall)"
          % (np.mean([r["t_exh"] for r in rows]) / np.mean([r["t_ref"] for r in rows]),
             np.mean([r["c_exh"] for r in rows]) / np.mean([r["c_ref"] for r in rows]),
             np.median([r["t_exh"] / r["t_ref"] for r in rows])))
    print("fit resolution (Å): median %.1f, range %.1f-%.1f; figure of merit median %.3f"
          % (np.median([r["res"] for r in rows]), min(r["res"] for r in rows), max(r["res"] for r in rows),
             np.median([r["fom"] for r in rows])))
    print("flagged: %d (%s)" % (sum(r["flag"] for r in rows),
                                ", ".join(str(i) for i, r in enumerate(rows) if r["flag"])))
    print("load average (1, 5, 15 min): start %.1f %.1f %.1f, end %.1f %.1f %.1f" % (load0 + os.getloadavg()))


if __name__ == "__main__":
    main()
