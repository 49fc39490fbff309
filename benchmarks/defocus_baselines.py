"""Other programs' CTF estimators and ASPIRE's micrograph simulator, for benchmarks/defocus.py.

Runs in a SEPARATE virtual environment (never deepcryo's): ASPIRE (``pip install aspire``) and teamtomo's
torch-ctf-estimation (``pip install torch-ctf-estimation``). It imports nothing from deepcryo; it talks to
benchmarks/defocus.py through MRC files and JSON.

Commands::

    # U, V (Å), angle (degrees from x to U, [0, 180)) and CPU seconds of each estimator for each micrograph
    python defocus_baselines.py estimate --input mics.json --output estimates.json [--methods aspire tce]

    # ASPIRE's MicrographSimulation: particles of a pseudo-atomic volume, CTF per micrograph, white noise at a pixel SNR
    python defocus_baselines.py simulate-aspire --n 4 --size 2048 --pixel-size 1.0 --output-dir aspire_mics

``mics.json``: a list of ``{"path", "pixel_size_A", "voltage_kV", "cs_mm", "amplitude_contrast"}``.
Conventions, checked on independent micrographs with U − V = 3000 Å at 30° and 120°
(benchmarks/independent_micrographs.py): ASPIRE's ``estimate_ctf`` reports ``defocus_ang`` in radians from
the y axis (it returned 58.5° and 150.1°): angle = 90° − defocus_ang. torch-ctf-estimation's
``astigmatism_angle`` is in degrees from x to U, and its ``astigmatism`` ``a`` is the half-difference (torch-ctf:
Δf(φ) = d + a cos 2(φ − θ)), so U, V = d ± a (its ``defocus_u/v`` = d ± a/2 are not U and V).
"""
import argparse
import json
import math
import os
import shutil
import tempfile
import time

import numpy as np


def _standard(u, v, angle_deg):
    """(U, V, angle) with U >= V and the angle in [0, 180)."""
    if v > u:
        u, v, angle_deg = v, u, angle_deg + 90.0
    return float(u), float(v), float(angle_deg % 180.0)


def estimate_aspire(mic, workdir):
    """ASPIRE's estimate_ctf (multitaper PSD, 512 px, band 30-5 Å) on one micrograph."""
    from aspire.ctf import estimate_ctf
    folder = tempfile.mkdtemp(dir=workdir)
    os.symlink(os.path.abspath(mic["path"]), os.path.join(folder, "mic.mrc"))
    try:
        out = estimate_ctf(folder, pixel_size=mic["pixel_size_A"], cs=mic["cs_mm"],
                           amplitude_contrast=mic["amplitude_contrast"], voltage=mic["voltage_kV"],
                           psd_size=512, g_min=30, g_max=5, output_dir=os.path.join(folder, "out"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    r = next(iter(out.values()))
    return _standard(r["defocus_u"], r["defocus_v"], 90.0 - math.degrees(r["defocus_ang"]))


def estimate_tce(mic):
    """teamtomo's torch-ctf-estimation: 1D then 2D fit of one global CTF (patches of 256 px, band 30-5 Å,
    defocus 0.2-5 µm)."""
    import mrcfile
    import torch
    import torch_ctf_estimation as tce
    with mrcfile.open(mic["path"], permissive=True) as f:
        image = torch.as_tensor(np.array(f.data, dtype=np.float32))  # a writable copy
    optics = tce.OpticalParams(pixel_spacing_angstroms=mic["pixel_size_A"], voltage_kev=mic["voltage_kV"],
                               spherical_aberration_mm=mic["cs_mm"],
                               amplitude_contrast_fraction=mic["amplitude_contrast"])
    fitting = tce.CTFFittingParams(defocus_grid_resolution=(1, 1, 1), frequency_fit_range_angstroms=(30.0, 5.0),
                                   defocus_range_microns=(0.2, 5.0))
    _, _, r2 = tce.estimate_ctf(image, optics, fitting, device=torch.device("cpu"))
    mean_A = 0.5 * (r2.defocus_u + r2.defocus_v) * 1e4
    half_A = r2.astigmatism * 1e4
    return _standard(mean_A + half_A, mean_A - half_A, r2.astigmatism_angle)


def cmd_estimate(args):
    with open(args.input) as f:
        mics = json.load(f)
    results = []
    work = tempfile.mkdtemp()
    try:
        for mic in mics:
            row = {"path": mic["path"]}
            for method in args.methods:
                c0 = time.process_time()
                try:
                    u, v, a = estimate_aspire(mic, work) if method == "aspire" else estimate_tce(mic)
                    row[method] = {"defocus_u_A": u, "defocus_v_A": v, "defocus_angle_deg": a,
                                   "cpu_s": time.process_time() - c0}
                except Exception as exc:  # a baseline that fails on one micrograph is reported, not fatal
                    row[method] = {"error": "%s: %s" % (type(exc).__name__, exc)}
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)


def _atomic_volume(box, pixel_size_A, rng, n_atoms=4000):
    """(box³) float32 pseudo-atomic density: point atoms in a globule of ~0.3·box radius, 1 Å Gaussian atoms.
    (ASPIRE's synthetic volumes are sums of broad Gaussians, whose projections have no power beyond ~40 Å,
    hence no Thon rings to estimate a CTF from.)"""
    pts = rng.normal(size=(n_atoms, 3)) * (0.12 * box) + box / 2
    grid, _ = np.histogramdd(pts, bins=(box, box, box), range=[(0, box)] * 3)
    k = np.fft.fftfreq(box) / pixel_size_A
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    vol = np.fft.ifftn(np.fft.fftn(grid) * np.exp(-2.0 * np.pi ** 2 * k2)).real
    return vol.astype(np.float32)


def cmd_simulate_aspire(args):
    import mrcfile
    from aspire.operators import CTFFilter
    from aspire.source import MicrographSimulation
    from aspire.volume import Volume
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    volume = Volume(_atomic_volume(args.box, args.pixel_size, rng), pixel_size=args.pixel_size)
    truths = []
    for i in range(args.n):
        mean = rng.uniform(*args.defocus_range)
        astig = rng.uniform(0.0, 1500.0)
        u, v, ang = mean + astig / 2, mean - astig / 2, rng.uniform(0.0, 180.0)
        ctf = CTFFilter(voltage=300.0, defocus_u=u, defocus_v=v, defocus_ang=math.radians(ang), Cs=2.7,
                        alpha=0.07, B=rng.uniform(40.0, 120.0))
        n_particles = int(0.3 * args.size ** 2 / args.box ** 2)
        sim = MicrographSimulation(volume, micrograph_size=args.size, micrograph_count=1,
                                   particles_per_micrograph=n_particles, pixel_size=args.pixel_size,
                                   seed=int(rng.integers(2 ** 31)), ctf_filters=[ctf],
                                   boundary=0,
                                   interparticle_distance=-args.box // 2)
        clean = np.asarray(sim.clean_images[0].asnumpy()[0], dtype=np.float64)
        noise = rng.normal(size=clean.shape) * clean.std() / np.sqrt(args.snr)  # white, at a pixel SNR
        image = (clean + noise).astype(np.float32)
        path = os.path.abspath(os.path.join(args.output_dir, "aspire_%03d.mrc" % i))
        with mrcfile.new(path, overwrite=True) as f:
            f.set_data(image)
            f.voxel_size = args.pixel_size
        su, sv, sa = _standard(u, v, ang)
        truths.append({"path": path, "defocus_u_A": su, "defocus_v_A": sv, "defocus_angle_deg": sa,
                       "pixel_size_A": args.pixel_size, "voltage_kV": 300.0, "cs_mm": 2.7,
                       "amplitude_contrast": 0.07})
        print("aspire micrograph %d: U %.0f V %.0f angle %.1f" % (i, su, sv, sa), flush=True)
    with open(os.path.join(args.output_dir, "truth.json"), "w") as f:
        json.dump(truths, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("estimate")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--methods", nargs="+", choices=("aspire", "tce"), default=["aspire", "tce"])
    p = sub.add_parser("simulate-aspire")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--box", type=int, default=192, help="particle box, px (the CTF is applied in it)")
    p.add_argument("--defocus-range", nargs=2, type=float, default=(5000.0, 20000.0),
                   help="mean defocus, Å (a particle's CTF must stay inside its box)")
    p.add_argument("--pixel-size", type=float, default=1.0)
    p.add_argument("--snr", type=float, default=3.0, help="pixel SNR: variance of the clean field / of the noise (the clean field's variance is mostly below 1/40 Å⁻¹)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", required=True)
    args = parser.parse_args()
    cmd_estimate(args) if args.command == "estimate" else cmd_simulate_aspire(args)


if __name__ == "__main__":
    main()
