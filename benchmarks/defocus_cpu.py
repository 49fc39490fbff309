"""CPU seconds per micrograph of the deep defocus program, and where they go (issue 19).

Everything ``python -m deepcryo.defocus predict`` does per micrograph is timed through
:func:`deepcryo.defocus.predict.estimate_batch` with a PSD folder (reading, the CNN's PSDs and the fit PSD,
the CNN, the fit, the astigmatism model choice and σ, the fit resolution, the ``_avrot.txt`` rows, the fitted
CTF² image and the files written), one micrograph per call, after a warm-up call (start-up excluded: imports,
loading the weights, first calls of the torch kernels). CPU seconds are those of the process
(``resource.getrusage``: user + system, all threads); the figure is the median over ``--repeats`` calls.

Micrographs: a 4096² one of deepcryo's simulator (:func:`deepcryo.core.micrographs.simulate_micrograph`,
1 Å/px, 300 kV, U/V 15000/14000 Å) and a 5760 × 4092 K3 frame of ``benchmarks/scale.py``'s independent
numpy renderer (1 Å/px, U/V 20500/19500 Å); ``--real FILE PIXEL_SIZE`` adds a real micrograph.

With ``--profile``, one more call per micrograph runs under ``cProfile`` with the process CPU clock and the
stages are printed: CPU seconds inside each stage's function (cumulative, so a stage includes what it calls).

    PYTHONPATH=$PWD python benchmarks/defocus_cpu.py --threads 2 --profile
    PYTHONPATH=$PWD python benchmarks/defocus_cpu.py --threads 2 --real /tmp/epu2.9_example.mrc 0.66655
"""
import argparse
import cProfile
import os
import pstats
import resource
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import render_micrograph  # noqa: E402  (a sibling benchmark module)

from deepcryo.core.micrographs import simulate_micrograph  # noqa: E402
from deepcryo.core.mrc import write_mrc  # noqa: E402
from deepcryo.defocus import model as model_mod  # noqa: E402
from deepcryo.defocus import predict  # noqa: E402

#: (label, module file suffix, function name, caller name or None): the stages of one micrograph
STAGES = (
    ("read MRC", "core/mrc.py", "read_mrc", None),
    ("PSDs (CNN's 3 + fit's)", "defocus/psd.py", "compute_psds", None),
    ("  Welch periodograms", "defocus/psd.py", "_welch", None),
    ("  resample + normalise", "defocus/psd.py", "normalised_log_psd", None),
    ("CNN", "torch/nn/modules/module.py", "_wrapped_call_impl", "estimate_batch"),
    ("fit (refine_ctf)", "defocus/fit.py", "refine_ctf", None),
    ("  defocus scan", "defocus/fit.py", "score_params", "refine_ctf"),
    ("  local fit, astigmatic", "defocus/fit.py", "_local", "refine_ctf"),
    ("  local fit, round", "defocus/fit.py", "_local", "select_astigmatism"),
    ("  covariance (σ, BIC)", "defocus/fit.py", "parameter_covariance", None),
    ("  fit resolution", "defocus/fit.py", "fit_resolution", None),
    ("_avrot rows", "defocus/fit.py", "rotational_average", None),
    ("fitted CTF² image", "defocus/predict.py", "fitted_ctf2", None),
    ("write PSD/CTF² MRC", "core/mrc.py", "write_mrc", None),
)


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def stage_table(profile: cProfile.Profile) -> list:
    """[(label, CPU s)] of :data:`STAGES` from a profile, and the total."""
    stats = pstats.Stats(profile).stats
    rows = []
    for label, suffix, name, caller in STAGES:
        total = 0.0
        for (path, _, fn), (_, _, _, ct, callers) in stats.items():
            if fn != name or not path.endswith(suffix):
                continue
            if caller is None:
                total += ct
            else:
                total += sum(c[3] for (_, _, cfn), c in callers.items() if cfn == caller)
        rows.append((label, total))
    rows.append(("total (estimate_batch)", sum(v[3] for (p, _, fn), v in stats.items() if fn == "estimate_batch")))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print the CPU seconds per stage")
    parser.add_argument("--real", nargs=2, action="append", default=[], metavar=("FILE", "PIXEL_SIZE_A"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = model_mod.load_model(None)[0]
    with tempfile.TemporaryDirectory() as work:
        mics = []
        img, _ = simulate_micrograph(4096, pixel_size_A=1.0, defocus_u_A=15000.0, defocus_v_A=14000.0, seed=3)
        mics.append(("4096² (deepcryo simulator)", os.path.join(work, "m4096.mrc"), 1.0))
        write_mrc(mics[-1][1], img, 1.0)
        img = render_micrograph((4092, 5760), 1.0, 20500.0, 19500.0, 40.0, seed=1)
        mics.append(("5760 × 4092 (scale.py renderer)", os.path.join(work, "m5760.mrc"), 1.0))
        write_mrc(mics[-1][1], img, 1.0)
        del img
        mics += [(os.path.basename(path), os.path.abspath(path), float(px)) for path, px in args.real]
        psd_dir = os.path.join(work, "psd")
        os.makedirs(psd_dir)
        load0 = os.getloadavg()
        print("torch %s, %d threads; load average at start %.1f %.1f %.1f"
              % (torch.__version__, args.threads, *load0))
        for label, path, px in mics:
            entry = predict.MicrographEntry(path, px, 300.0, 2.7, 0.07)
            predict.estimate_batch([entry], model, psd_dir=psd_dir)  # warm-up
            cpu, wall = [], []
            for _ in range(args.repeats):
                c0, w0 = cpu_s(), time.perf_counter()
                r = predict.estimate_batch([entry], model, psd_dir=psd_dir)[0]
                cpu.append(cpu_s() - c0)
                wall.append(time.perf_counter() - w0)
            print("\n%s: CPU s %.2f (median of %s), wall s %.2f; U %.0f V %.0f angle %.1f σ %.1f res %.2f Å"
                  % (label, float(np.median(cpu)), " ".join("%.2f" % c for c in cpu), float(np.median(wall)),
                     r["defocus_u_A"], r["defocus_v_A"], r["defocus_angle_deg"], r["defocus_sigma_A"],
                     r["resolution_A"]))
            if args.profile:
                prof = cProfile.Profile(time.process_time)
                prof.runcall(predict.estimate_batch, [entry], model, psd_dir=psd_dir)
                for name, seconds in stage_table(prof):
                    print("  %-30s %6.3f" % (name, seconds))
        print("\nload average at end %.1f %.1f %.1f" % os.getloadavg())


if __name__ == "__main__":
    main()
