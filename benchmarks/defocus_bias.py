"""Where the mean-defocus bias of the fit on the independent particle fields comes from (issue 19).

The same micrographs of ``benchmarks/independent_micrographs.py`` (2048², 1 Å/px, 300 kV, mean defocus 15-30 kÅ)
are rendered with one knob changed at a time, and fitted from the true CTF (:func:`deepcryo.defocus.fit.refine_ctf`,
band 30-5 Å, fit PSD at 2 Å/px, amplitude contrast 0.07 as rendered), with the phase held fixed and with it fitted:

* ``as benchmarked``: phase RMS 0.05 rad, 40 e⁻/Å², B 40-120 Å²;
* ``no shot noise``: 10⁹ e⁻/Å² (the PSD is the specimen's alone);
* ``linear (weak phase), no noise``: phase RMS 0.005 rad, 10⁹ e⁻/Å² (the image is the linear CTF image);
* ``linear, same SNR``: phase RMS 0.005 rad at 4000 e⁻/Å² (the signal-to-noise ratio of the benchmark);
* ``strong phase, no noise``: phase RMS 0.15 rad, 10⁹ e⁻/Å².

Printed per variant: mean relative error of the mean defocus (%), and with the phase fitted, that error and the
mean fitted phase shift (degrees, on top of the amplitude contrast's 4.0°).

Example (the run of benchmarks/RESULTS.md)::

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/defocus_bias.py --n 4 --seed 7
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import independent_micrographs  # noqa: E402  (a sibling benchmark module)

from deepcryo.defocus import fit, predict  # noqa: E402
from deepcryo.defocus.psd import compute_psd  # noqa: E402

VARIANTS = (("as benchmarked", {}),
            ("no shot noise", dict(dose_e_per_A2=1e9)),
            ("linear (weak phase), no noise", dict(dose_e_per_A2=1e9, phase_rms_rad=0.005)),
            ("linear, same SNR", dict(dose_e_per_A2=4000.0, phase_rms_rad=0.005)),
            ("strong phase, no noise", dict(dose_e_per_A2=1e9, phase_rms_rad=0.15)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4, help="micrographs per variant")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    samp = predict.fit_sampling_A(1.0, 5.0)
    rng = np.random.default_rng(args.seed)
    truths = [independent_micrographs.random_truth(rng, defocus_range_A=(15000.0, 30000.0)) for _ in range(args.n)]
    print("| variant | mean-defocus error, phase fixed (%) | phase fitted (%) | fitted extra phase (°) |")
    print("|---|---|---|---|")
    for name, change in VARIANTS:
        rel = {False: [], True: []}
        phase = []
        for truth in truths:
            img, t = independent_micrographs.particle_field_micrograph(shape=(2048, 2048), **{**truth, **change})
            psd = compute_psd(torch.as_tensor(img), 1.0, (samp,), predict.FIT_SIZE_PX)[:, 0]
            z_true = 0.5 * (t["defocus_u_A"] + t["defocus_v_A"])
            for fit_phase in (False, True):
                r = fit.refine_ctf(psd, samp, t["defocus_u_A"], t["defocus_v_A"], t["defocus_angle_deg"], 300.0,
                                   2.7, 0.07, fit_phase=fit_phase)
                rel[fit_phase].append(100.0 * (float(r._z[0]) - z_true) / z_true)
                if fit_phase:
                    phase.append((float(r.phase_shift_deg[0]) + 90.0) % 180.0 - 90.0)
        print("| %s | %+.2f (%s) | %+.2f | %+.1f |" % (name, np.mean(rel[False]),
                                                     ", ".join("%+.2f" % x for x in rel[False]),
                                                     np.mean(rel[True]), np.mean(phase)), flush=True)


if __name__ == "__main__":
    main()
