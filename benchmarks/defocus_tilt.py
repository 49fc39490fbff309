"""Specimen tilt and ice thickness (``predict --fit-tilt --fit-thickness``, CTFFIND5-style) on simulated
micrographs with known truth: errors of the tilt angle, tilt axis and thickness, and the CPU time they add.

Two simulators: deepcryo's own (:func:`deepcryo.core.micrographs.simulate_micrograph`: terraced tilted specimen,
layered slab) and the independent one (``benchmarks/independent_micrographs.py``: multislice slab, tilt applied
at the detector, full wave optics). For each, ``--n`` tilted micrographs (θ uniform in 5-40°, φ uniform in
0-360°, thin) and ``--n`` thick ones (t uniform in 0-2000 Å, flat), 300 kV, ``--size`` px at 1.5 Å/px, mean
defocus 0.8-2 µm, through :func:`deepcryo.defocus.predict.estimate_batch` (the program's path: shipped CNN,
refinement, both extras; where a node is seen inside the defocus band, the program's refit on a band ended
before it). The mean defocus error is printed too (thick slabs move the thin fit). A thickness below the micrograph's ``ice_thickness_min_A`` (its first node beyond the
rings) is expected to read 0. Then the CPU seconds (one thread) of one ``--timing-size``² micrograph at 1 Å/px
without the extras, with the tilt and with the thickness.

usage: PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/defocus_tilt.py [--n 8] [--size 2048] [--timing-size 4096]
       [--high-resolution 5]
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import independent_micrographs  # noqa: E402

from deepcryo.core.micrographs import simulate_micrograph  # noqa: E402
from deepcryo.core.mrc import write_mrc  # noqa: E402
from deepcryo.defocus import model as model_mod, predict  # noqa: E402

PX, KV, CS, AMP = 1.5, 300.0, 2.7, 0.07


def _cases(rng, n):
    cases = []
    for kind in ("tilt", "thick"):
        for _ in range(n):
            mean, astig = rng.uniform(8000.0, 20000.0), rng.uniform(0.0, 1000.0)
            case = dict(defocus_u_A=mean + astig / 2, defocus_v_A=mean - astig / 2,
                        defocus_angle_deg=float(rng.uniform(0, 180)), seed=int(rng.integers(2 ** 31)))
            if kind == "tilt":
                case.update(tilt_angle_deg=float(rng.uniform(5, 40)), tilt_axis_deg=float(rng.uniform(0, 360)))
            else:
                case.update(ice_thickness_A=float(rng.uniform(0, 2000)))
            cases.append((kind, case))
    return cases


def _simulate(simulator, size, case):
    if simulator == "deepcryo":
        img, _ = simulate_micrograph(size, pixel_size_A=PX, voltage_kV=KV, cs_mm=CS, amplitude_contrast=AMP,
                                     layer_step_A=100.0, **case)
    else:
        img, _ = independent_micrographs.particle_field_micrograph(
            shape=(size, size), pixel_size_A=PX, voltage_kV=KV, cs_mm=CS, amplitude_contrast=AMP,
            tilt_step_A=100.0, **case)
    return img


def _axis_error(a, b):
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def accuracy(simulator, cases, size, model, folder, high_A):
    rows = []
    for i, (kind, case) in enumerate(cases):
        path = os.path.join(folder, "%s_%02d.mrc" % (simulator, i))
        write_mrc(path, _simulate(simulator, size, case), PX)
        entry = predict.MicrographEntry(path, PX, KV, CS, AMP)
        r = predict.estimate_batch([entry], model, high_A=high_A, fit_tilt=True, fit_thickness=True)[0]
        t_true = case.get("ice_thickness_A", 0.0)
        expected = t_true if t_true >= r["ice_thickness_min_A"] else 0.0
        dz = 0.5 * (r["defocus_u_A"] + r["defocus_v_A"] - case["defocus_u_A"] - case["defocus_v_A"])
        rows.append(dict(kind=kind, tilt=case.get("tilt_angle_deg", 0.0), axis=case.get("tilt_axis_deg", np.nan),
                         tilt_fit=r["tilt_angle_deg"], axis_fit=r["tilt_axis_deg"], thick=t_true,
                         thick_expected=expected, thick_fit=r["ice_thickness_A"], thick_min=r["ice_thickness_min_A"], dz=dz))
        print("%-11s %-5s tilt %5.1f/%5.1f axis %6.1f/%6.1f  thickness %6.0f (expected %6.0f, min %5.0f) fit %6.0f"
              "  defocus error %+5.0f Å" % (simulator, kind, rows[-1]["tilt"], r["tilt_angle_deg"], rows[-1]["axis"],
                                           r["tilt_axis_deg"], t_true, expected, r["ice_thickness_min_A"],
                                           r["ice_thickness_A"], dz), flush=True)
    return rows


def summarise(simulator, rows):
    tilt = [r for r in rows if r["kind"] == "tilt"]
    thick = [r for r in rows if r["kind"] == "thick"]
    angle_err = np.array([abs(r["tilt_fit"] - r["tilt"]) for r in tilt])
    axis_err = np.array([_axis_error(r["axis_fit"], r["axis"]) for r in tilt])
    false_tilt = np.array([r["tilt_fit"] for r in thick])
    t_err = np.array([abs(r["thick_fit"] - r["thick_expected"]) for r in thick])
    rel = np.array([abs(r["thick_fit"] - r["thick_expected"]) / r["thick_expected"]
                    for r in thick if r["thick_expected"] > 0])
    false_thick = np.array([r["thick_fit"] for r in tilt])
    dz_thick = np.array([abs(r["dz"]) for r in thick])
    print("%s: tilt angle error median %.2f° max %.2f°; axis error median %.1f° max %.1f° (n=%d); tilt on flat "
          "micrographs max %.2f°" % (simulator, np.median(angle_err), angle_err.max(), np.median(axis_err),
                                     axis_err.max(), len(tilt), false_tilt.max()))
    print("%s: thickness error median %.0f Å max %.0f Å (n=%d; relative, where measurable: median %.1f %% max "
          "%.1f %%, n=%d); thickness read on the thin tilted micrographs: %s Å"
          % (simulator, np.median(t_err), t_err.max(), len(thick), 100 * np.median(rel) if rel.size else np.nan,
             100 * rel.max() if rel.size else np.nan, rel.size, ", ".join("%.0f" % t for t in false_thick)))
    print("%s: mean defocus error on the flat (thickness) micrographs: median %.0f Å max %.0f Å"
          % (simulator, np.median(dz_thick), dz_thick.max()))


def timing(size, model, folder):
    img, _ = simulate_micrograph(size, pixel_size_A=1.0, defocus_u_A=15000.0, defocus_v_A=14000.0, seed=1)
    path = os.path.join(folder, "timing.mrc")
    write_mrc(path, img, 1.0)
    entry = predict.MicrographEntry(path, 1.0, KV, CS, AMP)
    out = {}
    for label, flags in (("plain", {}), ("tilt", dict(fit_tilt=True)), ("thickness", dict(fit_thickness=True))):
        best = np.inf
        for _ in range(2):
            t0 = time.process_time()
            predict.estimate_batch([entry], model, **flags)
            best = min(best, time.process_time() - t0)
        out[label] = best
    print("CPU s per %d² micrograph (1 thread, best of 2): plain %.2f, + tilt %.2f, + thickness %.2f"
          % (size, out["plain"], out["tilt"] - out["plain"], out["thickness"] - out["plain"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="micrographs of each kind and simulator")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--timing-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--high-resolution", type=float, default=5.0,
                        help="the defocus fit's band end (Å), the program's --high-resolution")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = model_mod.load_model(None)
    cases = _cases(np.random.default_rng(args.seed), args.n)
    with tempfile.TemporaryDirectory() as folder:
        for simulator in ("deepcryo", "independent"):
            summarise(simulator, accuracy(simulator, cases, args.size, model, folder, args.high_resolution))
        timing(args.timing_size, model, folder)


if __name__ == "__main__":
    main()
