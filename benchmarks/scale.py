"""A ladder of sizes: CPU, wall time and peak memory of every deepcryo program, and RELION's, as N and the box grow.

Particles are rendered by RELION's ``relion_project`` (not by deepcryo's projector and CTF), streamed in chunks
into one MRCS stack (:func:`render_streamed`): the map is deepcryo's pseudo-atomic phantom
(:func:`deepcryo.core.simulate.phantom_volume`, 14 ellipsoids of 400 Gaussian atoms each, defined in fractions of
the box, so every box holds the same 192 Å object: 3.0, 1.5 and 0.75 Å/px at box 64, 128 and 256), uniform random
rotations, origins uniform within ±4.5 Å, the CTF of one of 8 defocus groups (1.0–2.5 µm, one "micrograph" each;
per-particle astigmatism up to 500 Å at a random angle), white noise at SNR 0.1. Micrographs for the defocus
program are rendered here with a short numpy Thon-ring model (:func:`render_micrograph`), independent of
deepcryo's simulator.

Each program runs as its own process, through its command line (the table :data:`PROGRAMS`: adjust flags there),
timed by ``os.wait4`` on that program alone (forked by a small launcher, :data:`_WAIT4`, so that its ``ru_maxrss``
does not inherit this script's): CPU seconds (user + system), wall seconds and its peak RSS. Rungs
(:data:`RUNGS`): N = 2 k, 10 k, 50 k at box 128, box 64 / 128 / 256 at N = 10 k, 2 k at box 256 (the marginal
cost per particle there), ``2k@64`` (a quick one) and two micrograph sizes (4096², 5760 × 4092). One SwiftRes iteration (``--max-iterations 1``) includes its final
pose-weighted half maps at full resolution; ``relion_refine`` (one iteration, 7.5°, K = 1, 2 threads, first
iteration by cross-correlation at 30 Å) always runs on a subset of :attr:`Program.subset` particles and is scaled
by N / n. Any
per-particle program whose wall time, predicted from a rung already measured (scaled by N and by the pixel count),
exceeds ``--max-minutes`` runs on the subset that fits and is scaled the same way; the table says so
("extrapolated from n"). A linear scaling of a subset counts the start-up and the per-map work N / n times, so it
overestimates; the marginal column (the CPU difference between two rungs of one box, divided by the difference
in N) does not.

Every measurement is kept in ``WORK/results.json``; the table and the plot (``--plot``, default
``benchmarks/scale.png``: CPU ms per particle against N at box 128 and against the box at N = 10 k) show all of
them (a run whose peak RSS, predicted from the smaller boxes, would exceed 80 % of the free memory is skipped and
listed as such), so the ladder can be climbed over several invocations. ``--results FILE`` appends the markdown table to FILE.

    python benchmarks/scale.py --rungs 2k@64 2k@128 --work /tmp/scale            # quick check (~1 h, 2 shared cores)
    python benchmarks/scale.py --work /tmp/scale --max-minutes 30                 # the whole ladder (~6 h, 2 cores)
    python benchmarks/scale.py --rungs 10k@128 --programs reconstruct relion_reconstruct --work /tmp/scale
    python benchmarks/scale.py --work /tmp/scale --device cuda                    # deepcryo on the GPU
    python benchmarks/scale.py --work /tmp/scale --report-only --results benchmarks/RESULTS.md
"""
import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

import mrcfile
import numpy as np
import torch

from deepcryo.core import fourier
from deepcryo.core.ctf import ctf_2d
from deepcryo.core.geometry import pose_distance_deg
from deepcryo.core.mrc import write_mrc
from deepcryo.core.star import read_star
from deepcryo.core.particles import ParticleStar, read_particles, write_particles
from deepcryo.core.projector import Projector
from deepcryo.core.simulate import phantom_volume

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
from relion_data import RenderSpec, relion_project, truth_particles  # noqa: E402  (tests/relion_data.py)

SPECIMEN_A = 192.0                 # box side in Å at every box (1.5 Å/px at box 128)
MAX_SHIFT_A = 4.5                  # rendered origins: uniform within ± this, per axis
DEFOCUS_GROUPS = 8
CHUNK_BYTES = 512 * 2 ** 20        # one relion_project call renders at most this much (and at most 10 k images)
SNR = 0.1


@dataclasses.dataclass(frozen=True)
class Rung:
    """``n`` particles at ``box`` px, or (``micrograph_shape`` set) ``n`` micrographs of that shape (y, x)."""
    n: int
    box: int = 0
    micrograph_shape: tuple = ()

    @property
    def pixel_size_A(self) -> float:
        return SPECIMEN_A / self.box if self.box else 1.0


RUNGS: Dict[str, Rung] = {
    "2k@64": Rung(2000, 64), "2k@128": Rung(2000, 128), "10k@128": Rung(10000, 128), "50k@128": Rung(50000, 128),
    "10k@64": Rung(10000, 64), "2k@256": Rung(2000, 256), "10k@256": Rung(10000, 256),
    "mic4096": Rung(4, micrograph_shape=(4096, 4096)), "mic5760x4092": Rung(4, micrograph_shape=(4092, 5760)),
}
LADDER = ["2k@128", "10k@128", "50k@128", "10k@64", "2k@256", "10k@256", "mic4096", "mic5760x4092"]


@dataclasses.dataclass(frozen=True)
class Program:
    """One program's command line (a ``str.format`` template, fields in :func:`_context`), what its cost is
    counted per ('particle', 'micrograph', or 'index': paid once per map and search setting), and ``subset``:
    always run on at most that many particles (0: all, unless ``--max-minutes`` asks for fewer)."""
    command: str
    unit: str = "particle"
    subset: int = 0
    deepcryo: bool = True


DC = "{python} -m deepcryo"
DEV = " --threads {threads} --device {device}"
PROGRAMS: Dict[str, Program] = {
    "reconstruct": Program(DC + ".core.reconstruct --particles {star} --output {out}/map.mrc" + DEV),
    "relion_reconstruct": Program("relion_reconstruct --i {star} --o {out}/map.mrc --ctf --angpix {px} --j {threads}",
                                  deepcryo=False),
    "swiftalign_train": Program(DC + ".swiftalign train --reference {map} --particles {star} --angular-step 7.5 "
                                "--max-shift {shift_px} --max-resolution 12 --output {out}/index"
                                + DEV, unit="index"),
    "swiftalign_query": Program(DC + ".swiftalign query --index {index} --particles {star} --output "
                                "{out}/aligned.star" + DEV),
    "swiftres_refine": Program(DC + ".swiftalign refine --particles {star_nopose} --reference {initial} "
                               "--output-dir {out} --max-iterations 1 --initial-resolution 30 --max-shift {shift_px} "
                               "--particle-diameter {diameter}" + DEV),
    "relion_refine": Program("relion_refine --i {star_nopose} --o {out}/run --ref {initial} --ini_high 30 --iter 1 "
                             "--K 1 --firstiter_cc --healpix_order 2 --offset_range {shift_px} --offset_step "
                             "{offset_step_px} --ctf --particle_diameter {diameter} --flatten_solvent --zero_mask "
                             "--oversampling 1 --pad 2 --sym C1 --norm --scale --dont_combine_weights_via_disc "
                             "--pool 30 --j {threads}", subset=500, deepcryo=False),
    "landscape_train": Program(DC + ".landscape train --particles {star} --output-dir {out} --epochs 1" + DEV),
    # at box 256 users train at a smaller working box, as cryoDRGN's users downsample to 128 for a first pass
    "landscape_train_box128": Program(DC + ".landscape train --particles {star} --output-dir {out} --epochs 1 "
                                      "--box 128" + DEV),
    "defocus_predict": Program(DC + ".defocus predict --micrographs '{mics}/*.mrc' --pixel-size {px} --voltage 300 "
                               "--cs 2.7 --amplitude-contrast 0.07 --output {out}/ctf.star" + DEV, unit="micrograph"),
}
PARTICLE_PROGRAMS = [p for p in PROGRAMS if PROGRAMS[p].unit == "particle"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELION_BESIDE = {"relion_reconstruct": "reconstruct", "relion_refine": "swiftres_refine"}


# ----------------------------------------------------------------------------------------------------- rendering
def _defocus_groups(star, spec: RenderSpec, n_groups: int) -> None:
    """Replace the uniform mean defocus of ``star`` by ``n_groups`` levels over ``spec.defocus_range_A`` (one
    ``rlnMicrographName`` each, as particles of one micrograph share a defocus); the astigmatism stays per particle."""
    p = star.particles
    group = np.random.default_rng([spec.seed, 2]).integers(n_groups, size=len(star))
    mean_A = np.linspace(*spec.defocus_range_A, n_groups)[group]
    astig_A = np.asarray(p["rlnDefocusU"]) - np.asarray(p["rlnDefocusV"])
    p["rlnDefocusU"], p["rlnDefocusV"] = mean_A + astig_A / 2, mean_A - astig_A / 2
    p["rlnMicrographName"] = np.array(["defocus_group%02d.mrc" % (g + 1) for g in group], dtype=object)


def deepcryo_project(volume: np.ndarray, truth: ParticleStar, device: str, batch: int = 256) -> np.ndarray:
    """Clean images (B, box, box) of ``truth``'s poses, origins and CTF by deepcryo's own projector and CTF: the
    stand-in renderer (``--renderer deepcryo``) on machines without RELION (the GPU machines lent here), where
    only speed is measured, not agreement with an independent renderer."""
    projector = Projector(volume, device=device)
    ctf, angles, origins_px = truth.ctf_params(), truth.angles_deg(), truth.origins_A() / truth.pixel_size_A
    out = np.empty((len(truth), truth.box_size, truth.box_size), dtype=np.float32)
    for start in range(0, len(truth), batch):
        sl = slice(start, min(start + batch, len(truth)))
        c = ctf_2d(truth.box_size, truth.pixel_size_A, device=device,
                   **{k: torch.as_tensor(v[sl], device=device) for k, v in ctf.items()})
        out[sl] = projector.project(angles[sl], origins_px[sl], c).cpu().numpy()
    return out


def render_streamed(folder: str, spec: RenderSpec, n_groups: int = DEFOCUS_GROUPS,
                    renderer: str = "relion", device: str = "cpu") -> Dict[str, str]:
    """Render ``spec`` with ``relion_project`` into ``folder/particles.mrcs`` + ``particles.star`` without ever
    holding the whole stack: chunks of at most 10 k images and :data:`CHUNK_BYTES` are projected (RELION's pixels,
    CTF and origins), their noise added (σ² = mean image variance of the first chunk / SNR, as
    ``tests/relion_data.py`` defines it, seeded per chunk) and written into a memory-mapped stack.
    Also writes ``particles_nopose.star`` (no angles, origins: the refinement's input), ``truth.mrc`` and
    ``initial.mrc`` (the truth low-passed to 30 Å). Reuses a finished rendering of the same spec. ``renderer``
    "deepcryo": :func:`deepcryo_project` on ``device`` instead of ``relion_project``."""
    os.makedirs(folder, exist_ok=True)
    files = {k: os.path.join(folder, v) for k, v in (("star", "particles.star"), ("star_nopose", "particles_nopose.star"),
                                                     ("map", "truth.mrc"), ("initial", "initial.mrc"))}
    record = os.path.join(folder, "spec.json")
    wanted = {"spec": dataclasses.asdict(spec), "groups": n_groups, "renderer": renderer}
    if os.path.exists(record):
        with open(record) as f:
            if json.load(f) == json.loads(json.dumps(wanted)):
                return files
    t0 = time.time()
    truth = truth_particles(spec)
    _defocus_groups(truth, spec, n_groups)
    vol = phantom_volume(spec.box, seed=spec.volume_seed)
    write_mrc(files["map"], vol, spec.pixel_size_A)
    write_mrc(files["initial"], fourier.lowpass_volume(torch.as_tensor(vol), 30.0, spec.pixel_size_A).numpy(),
              spec.pixel_size_A)
    stack_path = os.path.join(folder, "particles.mrcs")
    chunk = max(1, min(10000, CHUNK_BYTES // (4 * spec.box ** 2)))
    sigma, total, total_sq, lo, hi = None, 0.0, 0.0, np.inf, -np.inf
    with mrcfile.new_mmap(stack_path, shape=(spec.n, spec.box, spec.box), mrc_mode=2, overwrite=True) as stack:
        for k, start in enumerate(range(0, spec.n, chunk)):
            idx = np.arange(start, min(start + chunk, spec.n))
            if renderer == "deepcryo":
                images = deepcryo_project(vol, truth.subset(idx), device)
            else:
                write_particles(os.path.join(folder, "chunk_truth.star"), truth.subset(idx))
                out = read_particles(relion_project(folder, "truth.mrc", "chunk_truth.star", "chunk",
                                                    spec.pixel_size_A))
                if not np.allclose(out.angles_deg(), truth.angles_deg()[idx], atol=1e-3):
                    raise RuntimeError("relion_project did not read the poses back (chunk %d)" % k)
                with mrcfile.mmap(os.path.join(folder, "chunk.mrcs"), permissive=True) as clean:
                    images = np.array(clean.data, dtype=np.float32)
                for name in ("chunk.mrcs", "chunk.star", "chunk_truth.star"):
                    os.remove(os.path.join(folder, name))
            if sigma is None:
                sigma = float(np.sqrt(images.var(axis=(1, 2)).mean() / spec.snr))
            images += sigma * np.random.default_rng([spec.seed, 1, k]).standard_normal(images.shape, dtype=np.float32)
            stack.data[idx[0]:idx[-1] + 1] = images
            total, total_sq = total + float(images.sum(dtype=np.float64)), total_sq + float((images ** 2).sum(dtype=np.float64))
            lo, hi = min(lo, float(images.min())), max(hi, float(images.max()))
            del images
        count = spec.n * spec.box ** 2
        stack.header.ispg = 0
        stack.voxel_size = spec.pixel_size_A
        stack.header.dmin, stack.header.dmax, stack.header.dmean = lo, hi, total / count
        stack.header.rms = math.sqrt(max(total_sq / count - (total / count) ** 2, 0.0))
    star = truth.copy()
    star.directory = folder
    star.particles["rlnImageName"] = np.array(["%06d@particles.mrcs" % (i + 1) for i in range(spec.n)], dtype=object)
    write_particles(files["star"], star)
    for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnClassNumber"):
        star.particles.pop(c)
    write_particles(files["star_nopose"], star)
    with open(record, "w") as f:
        json.dump(wanted, f)
    print("rendered %d particles of %d px with %s in %.0f s (%s)" % (
        spec.n, spec.box, "relion_project" if renderer == "relion" else "deepcryo's projector", time.time() - t0,
        folder), flush=True)
    return files


def subset_star(files: Dict[str, str], n: int) -> Dict[str, str]:
    """STARs of the first ``n`` particles (the same stack), beside the full ones."""
    out = dict(files)
    for key in ("star", "star_nopose"):
        path = files[key].replace(".star", "_first%d.star" % n)
        if not os.path.exists(path):
            s = read_particles(files[key])
            write_particles(path, s.subset(np.arange(n)))
        out[key] = path
    return out


def _wavelength_A(voltage_kV: float) -> float:
    v = voltage_kV * 1e3
    return 12.2639 / math.sqrt(v + 0.97845e-6 * v * v)


def render_micrograph(shape, pixel_size_A: float, defocus_u_A: float, defocus_v_A: float, angle_deg: float,
                      seed: int, voltage_kV: float = 300.0, cs_mm: float = 2.7, amplitude_contrast: float = 0.07,
                      dose_e_per_A2: float = 40.0, bfactor_A2: float = 60.0) -> np.ndarray:
    """A (ny, nx) micrograph with Thon rings: a coloured random specimen filtered by the CTF (RELION's formula,
    written out here, not deepcryo's), 8 % contrast on ``dose`` electrons per Å², shot noise (Gaussian)."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    fy = np.fft.fftfreq(ny, d=pixel_size_A)[:, None]
    fx = np.fft.rfftfreq(nx, d=pixel_size_A)[None, :]
    s2 = fx * fx + fy * fy
    lam = _wavelength_A(voltage_kV)
    dz = 0.5 * (defocus_u_A + defocus_v_A) + 0.5 * (defocus_u_A - defocus_v_A) * np.cos(
        2 * (np.arctan2(fy, fx) - math.radians(angle_deg)))
    gamma = math.pi * lam * dz * s2 - 0.5 * math.pi * cs_mm * 1e7 * lam ** 3 * s2 * s2
    ctf = -(math.sqrt(1 - amplitude_contrast ** 2) * np.sin(gamma) + amplitude_contrast * np.cos(gamma))
    colour = (1.0 + s2 * 60.0 ** 2) ** -0.5 * np.exp(-bfactor_A2 * s2 / 4)
    spectrum = (rng.standard_normal(s2.shape) + 1j * rng.standard_normal(s2.shape)) * colour * ctf
    spectrum[0, 0] = 0.0
    signal = np.fft.irfft2(spectrum, s=(ny, nx))
    counts = dose_e_per_A2 * pixel_size_A ** 2
    image = counts * (1.0 + 0.08 * signal / signal.std())
    return (image + rng.standard_normal(image.shape) * np.sqrt(np.clip(image, 0, None))).astype(np.float32)


def render_micrographs(folder: str, rung: Rung, pixel_size_A: float = 1.0) -> List[dict]:
    """``rung.n`` micrographs (defocus 0.8–3 µm, astigmatism ≤ 1000 Å) in ``folder``; their truth."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(7)
    truth = []
    for i in range(rung.n):
        mean, astig, angle = rng.uniform(8000, 30000), rng.uniform(0, 1000), rng.uniform(0, 180)
        name = os.path.join(folder, "mic_%03d.mrc" % i)
        truth.append({"name": name, "u": mean + astig / 2, "v": mean - astig / 2})
        if not os.path.exists(name):
            write_mrc(name, render_micrograph(rung.micrograph_shape, pixel_size_A, mean + astig / 2,
                                              mean - astig / 2, angle, seed=i), pixel_size_A)
    return truth


# ------------------------------------------------------------------------------------------------------- timing
def _gpu_used_mb() -> Optional[float]:
    """Memory in use on the first GPU (MB, ``nvidia-smi``: the whole device, not one process: the PID
    namespaces of containers hide the processes), None without ``nvidia-smi``."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10).stdout
        return float(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


# Forks the program and writes its own os.wait4 rusage. Run as a fresh ``python -S`` (~10 MB), so that the
# program's ru_maxrss starts from this small process and not from this benchmark's: Linux keeps the resident
# high-water mark across fork (and vfork) and exec, so a program started from here directly would report at
# least this process's peak RSS (torch, the renderings).
_WAIT4 = """import json, os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_kb": ru.ru_maxrss}, f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_timed(cmd: List[str], cwd: str, log_path: str, env: dict, timeout_s: float, gpu: bool = False) -> dict:
    """Run ``cmd`` in its own process group under the :data:`_WAIT4` launcher and return the program's own
    ``os.wait4`` figures: cpu_s (user + system of the program and the processes it waited for), rss_mb (peak
    resident set of the largest of them), and wall_s, returncode; killed (SIGTERM to its group) after
    ``timeout_s`` (then cpu_s and rss_mb are NaN). With ``gpu``, gpu_mb: the peak GPU memory in use above its
    level at the start, sampled about once a second (None without ``nvidia-smi``)."""
    gpu0 = _gpu_used_mb() if gpu else None
    gpu_peak = gpu0
    usage_path = log_path + ".rusage.json"
    if os.path.exists(usage_path):
        os.remove(usage_path)
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write("$ %s\n" % " ".join(shlex.quote(c) for c in cmd))
        log.flush()
        child = subprocess.Popen([sys.executable, "-S", "-c", _WAIT4, usage_path] + cmd, cwd=cwd, env=env,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        killed = False
        while child.poll() is None:
            if not killed and time.time() - t0 > timeout_s:
                os.killpg(child.pid, signal.SIGTERM)
                killed = True
            if gpu0 is not None:
                gpu_peak = max(gpu_peak, _gpu_used_mb() or 0.0)
            time.sleep(0.2 if gpu0 is None else 0.8)
    wall = time.time() - t0
    usage = {"cpu_s": math.nan, "maxrss_kb": math.nan}
    if os.path.exists(usage_path):
        with open(usage_path) as f:
            usage = json.load(f)
    return {"wall_s": wall, "cpu_s": usage["cpu_s"], "rss_mb": usage["maxrss_kb"] / 1024,
            "returncode": child.returncode, "killed": killed, "gpu_mb": None if gpu0 is None else gpu_peak - gpu0}


def _context(args, rung: Rung, files: Dict[str, str], out: str, rung_dir: str) -> dict:
    px = rung.pixel_size_A
    return {"python": sys.executable, "threads": args.threads, "device": args.device, "out": out, "px": px,
            "box": rung.box, "shift_px": math.ceil(MAX_SHIFT_A / px - 1e-6) if rung.box else 0,
            "offset_step_px": max(1, round(3.0 / px)), "diameter": round(0.8 * SPECIMEN_A),
            "index": os.path.join(rung_dir, "swiftalign_train", "index"), "mics": os.path.join(rung_dir, "mics"),
            **files}


def _predicted_wall_s(records: List[dict], program: str, rung: Rung) -> Optional[float]:
    """Wall time of ``program`` at ``rung`` scaled from its nearest measured particle rung (∝ N × box²)."""
    done = [r for r in records if r["program"] == program and r["unit"] == "particle" and r["returncode"] == 0]
    if not done:
        return None
    near = min(done, key=lambda r: (abs(math.log(r["box"] / rung.box)), abs(math.log(r["n"] / rung.n))))
    return near["wall_s"] / near["n"] * rung.n * (rung.box / near["box"]) ** 2


def _predicted_rss_mb(records: List[dict], program: str, rung: Rung) -> Optional[float]:
    """Peak RSS of ``program`` at ``rung`` from its measured rungs of the largest boxes up to ``rung.box``: ∝ box^e,
    e measured between the two largest boxes (clipped to 2–3: images to maps), 3 with one box only."""
    done = [r for r in records if r["program"] == program and r["returncode"] == 0 and 0 < r["box"] <= rung.box]
    by_box = {r["box"]: max(s["rss_mb"] for s in done if s["box"] == r["box"]) for r in done}
    if not by_box:
        return None
    boxes = sorted(by_box)
    e = 3.0
    if len(boxes) > 1:
        e = min(3.0, max(2.0, math.log(by_box[boxes[-1]] / by_box[boxes[-2]]) / math.log(boxes[-1] / boxes[-2])))
    return by_box[boxes[-1]] * (rung.box / boxes[-1]) ** e


def _available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return math.inf


def _check(program: str, out: str, files: Dict[str, str], truth_mics: List[dict]) -> str:
    """A one-line sanity figure of a finished run (accuracy is measured by the other benchmarks)."""
    try:
        if program == "swiftalign_query":
            got = read_particles(os.path.join(out, "aligned.star"), require_images=False)
            want = read_particles(files["star"], require_images=False).subset(np.arange(len(got)))
            err = pose_distance_deg(torch.as_tensor(want.angles_deg()), torch.as_tensor(got.angles_deg())).numpy()
            return "median angle error %.1f°" % np.median(err)
        if program == "defocus_predict":
            t = next(iter(read_star(os.path.join(out, "ctf.star")).values()))
            est = dict(zip([os.path.basename(str(n)) for n in t["rlnMicrographName"]],
                           zip(t["rlnDefocusU"], t["rlnDefocusV"])))
            err = [0.5 * (abs(est[os.path.basename(m["name"])][0] - m["u"]) + abs(est[os.path.basename(m["name"])][1]
                                                                                   - m["v"])) for m in truth_mics]
            return "defocus MAE %.0f Å" % np.mean(err)
        if program == "swiftres_refine":
            with open(os.path.join(out, "..", "swiftres_refine.log")) as f:
                text = f.read()
            it = re.findall(r"iteration 1 \(global\).* ([0-9.]+) s$", text, re.M)
            final = re.findall(r"^final: .* ([0-9.]+) s$", text, re.M)
            return "wall: iteration %s s, to the end of the final half maps %s s" % (
                it[-1] if it else "?", final[-1] if final else "?")
        if program.startswith("landscape_train"):
            with open(os.path.join(out, "..", program + ".log")) as f:
                epoch = re.findall(r"epoch 1/1 .* ([0-9.]+) s", f.read())
            return "epoch %s s wall" % epoch[-1] if epoch else ""
    except (OSError, KeyError, ValueError, StopIteration) as exc:
        return "check failed: %s" % exc
    return ""


def measure(args, name: str, rung: Rung, program: str, records: List[dict]) -> dict:
    """Render the rung if needed, run ``program`` on it (or on a subset) and return its record."""
    prog = PROGRAMS[program]
    rung_dir = os.path.join(args.work, name.replace("@", "_"))
    truth_mics: List[dict] = []
    if rung.micrograph_shape:
        truth_mics = render_micrographs(os.path.join(rung_dir, "mics"), rung)
        files: Dict[str, str] = {}
    else:
        files = render_streamed(os.path.join(rung_dir, "data"), RenderSpec(
            n=rung.n, box=rung.box, pixel_size_A=rung.pixel_size_A, snr=SNR, seed=1, max_shift_px=MAX_SHIFT_A /
            rung.pixel_size_A, defocus_range_A=(10000.0, 25000.0)), renderer=args.renderer,
            device=args.device)
    n_run, note = rung.n, ""
    if prog.unit == "particle":
        n_run = min(rung.n, prog.subset or rung.n)
        predicted = _predicted_wall_s(records, program, rung)
        if predicted and predicted * n_run / rung.n > 60 * args.max_minutes:
            n_run = max(200, int(rung.n * 60 * args.max_minutes / predicted) // 100 * 100)
        if n_run < rung.n:
            files = subset_star(files, n_run)
            note = "extrapolated from %d particles (×%.1f)" % (n_run, rung.n / n_run)
    rss = _predicted_rss_mb(records, program, rung) if rung.box else None
    if rss and args.memory_guard and rss > 0.8 * _available_mb():
        note = "skipped: predicted peak RSS %.1f GB > 80%% of the %.1f GB available" % (rss / 1024,
                                                                                      _available_mb() / 1024)
        print("%-12s %-20s %s" % (name, program, note), flush=True)
        return {"rung": name, "program": program, "unit": prog.unit, "n": rung.n, "n_run": 0, "box": rung.box,
                "shape": [], "px": rung.pixel_size_A, "device": args.device if prog.deepcryo else "cpu",
                "threads": args.threads, "wall_s": 0.0, "cpu_s": 0.0, "rss_mb": rss, "gpu_mb": None, "returncode": -1,
                "command": "", "date": _now(), "load": os.getloadavg()[0], "note": note}
    out = os.path.join(rung_dir, program)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    ctx = _context(args, rung, files, out, rung_dir)
    ctx["px"] = 1.0 if rung.micrograph_shape else ctx["px"]
    cmd = shlex.split(prog.command.format(**ctx))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([REPO] + [x for x in [os.environ.get("PYTHONPATH")] if x]))
    cwd = os.path.dirname(files["star"]) if files else rung_dir    # RELION reads image names from the cwd
    t = run_timed(cmd, cwd, os.path.join(rung_dir, program + ".log"), env, 180 * args.max_minutes,
                  gpu=prog.deepcryo and args.device.startswith("cuda"))
    scale = rung.n / n_run
    rec = {"rung": name, "program": program, "unit": prog.unit, "n": rung.n, "n_run": n_run, "box": rung.box,
           "shape": list(rung.micrograph_shape), "px": ctx["px"], "device": args.device if prog.deepcryo else "cpu",
           "threads": args.threads, "wall_s": t["wall_s"] * scale, "cpu_s": t["cpu_s"] * scale,
           "rss_mb": t["rss_mb"], "gpu_mb": t["gpu_mb"], "returncode": t["returncode"], "command": " ".join(cmd),
           "date": _now(), "load": os.getloadavg()[0]}
    if t["killed"]:
        note = "killed after %.0f min" % (t["wall_s"] / 60)
    elif t["returncode"] != 0:
        note = "failed (exit %d, see %s.log)" % (t["returncode"], os.path.join(rung_dir, program))
    else:
        note = "; ".join(x for x in (note, _check(program, out, files, truth_mics)) if x)
    rec["note"] = note
    print("%-12s %-20s %6d  wall %8.1f s  CPU %8.1f s  RSS %7.0f MB  %s" % (name, program, rung.n, rec["wall_s"],
                                                                           rec["cpu_s"], rec["rss_mb"], note),
          flush=True)
    return rec


# ------------------------------------------------------------------------------------------------------- report
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _per_unit(r: dict) -> str:
    if r["unit"] == "index":
        return "%.1f s/index" % r["cpu_s"]
    if r["unit"] == "micrograph":
        return "%.2f s/micrograph" % (r["cpu_s"] / r["n"])
    return "%.2f ms/particle" % (1e3 * r["cpu_s"] / r["n"])


def _marginal(r: dict, records: List[dict]) -> str:
    """CPU ms per particle from the difference with the next smaller N of the same program, box and device."""
    smaller = [s for s in records if s["program"] == r["program"] and s["box"] == r["box"] and s["unit"] == "particle"
               and s["device"] == r["device"] and s["n"] < r["n"] and s["returncode"] == 0]
    if r["unit"] != "particle" or not smaller or r["returncode"] != 0:
        return ""
    s = max(smaller, key=lambda s: s["n"])
    return "%.2f (vs %d)" % (1e3 * (r["cpu_s"] - s["cpu_s"]) / (r["n"] - s["n"]), s["n"])


def markdown_table(records: List[dict]) -> str:
    order = {p: i for i, p in enumerate(PROGRAMS)}
    rungs = list(RUNGS)
    rows = sorted(records, key=lambda r: (order[r["program"]], r["device"], rungs.index(r["rung"])))
    lines = ["| program | device | rung | N | box | Å/px | wall s | CPU s | CPU per item | marginal CPU ms/particle "
             "| peak RSS MB | GPU MB | note |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        box = "×".join(str(v) for v in r["shape"][::-1]) if r["shape"] else str(r["box"])
        gpu = "" if r.get("gpu_mb") is None else "%.0f" % r["gpu_mb"]
        lines.append("| %s | %s | %s | %d | %s | %.2f | %.1f | %.1f | %s | %s | %.0f | %s | %s |" % (
            r["program"], r["device"], r["rung"], r["n"], box, r["px"], r["wall_s"], r["cpu_s"], _per_unit(r),
            _marginal(r, records), r["rss_mb"], gpu, r["note"]))
    return "\n".join(lines)


def _ladders(records: List[dict]):
    """The two ladders of the records: (box, N values) with most N at one box (the N ladder, box 128 in the
    full run) and (N, boxes) with most boxes at one N (the box ladder, N = 10 k in the full run)."""
    ok = [r for r in records if r["unit"] == "particle" and r["returncode"] == 0]
    boxes = {r["box"]: sorted({s["n"] for s in ok if s["box"] == r["box"]}) for r in ok}
    ns = {r["n"]: sorted({s["box"] for s in ok if s["n"] == r["n"]}) for r in ok}
    box = max(boxes, key=lambda b: (len(boxes[b]), b == 128), default=None)
    n = max(ns, key=lambda k: (len(ns[k]), k == 10000), default=None)
    return box, n


def growth_summary(records: List[dict]) -> str:
    """Flatness in N (CPU ms and peak RSS per rung) and growth with the box (CPU ratio / pixel-count ratio)."""
    box, n = _ladders(records)
    out = []
    for program in PARTICLE_PROGRAMS:
        for device in sorted({r["device"] for r in records}):
            mine = [r for r in records if r["program"] == program and r["device"] == device and r["returncode"] == 0]
            by_n = sorted((r for r in mine if r["box"] == box), key=lambda r: r["n"])
            if len(by_n) > 1:
                out.append("- %s (%s), box %d, N %s: CPU ms/particle %s; peak RSS %s MB" % (
                    program, device, box, " → ".join(str(r["n"]) for r in by_n),
                    " → ".join("%.2f" % (1e3 * r["cpu_s"] / r["n"]) for r in by_n),
                    " → ".join("%.0f" % r["rss_mb"] for r in by_n)))
            by_box = sorted((r for r in mine if r["n"] == n), key=lambda r: r["box"])
            if len(by_box) > 1:
                b0 = by_box[0]
                out.append("- %s (%s), N %d, box %s: CPU growth / pixel-count growth %s; peak RSS %s MB" % (
                    program, device, n, " → ".join(str(r["box"]) for r in by_box),
                    " → ".join("%.2f" % (r["cpu_s"] / b0["cpu_s"] / (r["box"] / b0["box"]) ** 2) for r in by_box),
                    " → ".join("%.0f" % r["rss_mb"] for r in by_box)))
    return "\n".join(out)


def plot(records: List[dict], path: str) -> None:
    """CPU ms per particle against N (at the box of the N ladder) and against the box (at the N of the box
    ladder), one line per program and device; RELION dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    box, n = _ladders(records)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for program in PARTICLE_PROGRAMS:
        for device in sorted({r["device"] for r in records}):
            mine = [r for r in records if r["program"] == program and r["device"] == device and r["returncode"] == 0]
            style = "--" if not PROGRAMS[program].deepcryo else "-"
            label = program + ("" if device == "cpu" else " (%s)" % device)
            for ax, sel, key in ((axes[0], [r for r in mine if r["box"] == box], "n"),
                                 (axes[1], [r for r in mine if r["n"] == n], "box")):
                sel = sorted(sel, key=lambda r: r[key])
                if sel:
                    ax.plot([r[key] for r in sel], [1e3 * r["cpu_s"] / r["n"] for r in sel], style, marker="o",
                            label=label)
    axes[0].set(xscale="log", yscale="log", xlabel="particles (box %s px)" % box, ylabel="CPU ms per particle")
    axes[1].set(xscale="log", yscale="log", xlabel="box (px, same %g Å object; N = %s)" % (SPECIMEN_A, n),
                ylabel="CPU ms per particle")
    boxes = np.array([64, 256])
    axes[1].plot(boxes, (boxes / 64.0) ** 2, ":", color="grey", label="∝ pixel count")
    for ax, key in zip(axes, ("n", "box")):
        ticks = sorted({r[key] for r in records if r["unit"] == "particle"})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle("deepcryo (solid) and RELION (dashed): CPU per particle, particles rendered by relion_project")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rungs", nargs="+", default=LADDER, choices=list(RUNGS), help="default: the whole ladder")
    p.add_argument("--programs", nargs="+", default=list(PROGRAMS), choices=list(PROGRAMS))
    p.add_argument("--work", required=True, help="folder for the renderings, runs and results.json")
    p.add_argument("--device", default="cpu", help="deepcryo's --device (RELION runs on the CPU)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--renderer", choices=("relion", "deepcryo"), default="relion",
                   help="who renders the particles: relion_project (independent of deepcryo), or deepcryo's own "
                        "projector where RELION is not installed (speed only)")
    p.add_argument("--deadline-minutes", type=float, default=0.0,
                   help="start no new run after this many minutes from the start (0: no limit)")
    p.add_argument("--max-minutes", type=float, default=60.0,
                   help="a per-particle run predicted to take longer runs on a subset and is extrapolated; every "
                        "run is stopped after 3× this")
    p.add_argument("--no-memory-guard", dest="memory_guard", action="store_false",
                   help="run also where the peak RSS predicted from smaller boxes exceeds 80%% of the free memory")
    p.add_argument("--results", help="append the markdown table to this file")
    p.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "scale.png"))
    p.add_argument("--report-only", action="store_true", help="only print the table and plot WORK/results.json")
    args = p.parse_args(argv)
    needed = [p for p in args.programs if not PROGRAMS[p].deepcryo] + (["relion_project"] if args.renderer == "relion"
                                                                         else [])
    for exe in needed:
        if shutil.which(exe) is None and not args.report_only:
            sys.exit("%s not found (apt-get install relion)" % exe)
    started = time.time()
    args.work = os.path.abspath(args.work)
    os.makedirs(args.work, exist_ok=True)
    results_path = os.path.join(args.work, "results.json")
    records = []
    if os.path.exists(results_path):
        with open(results_path) as f:
            records = json.load(f)
    rungs = sorted(args.rungs, key=lambda r: (bool(RUNGS[r].micrograph_shape), RUNGS[r].n * RUNGS[r].box ** 2))
    for name in [] if args.report_only else rungs:
        rung = RUNGS[name]
        for program in args.programs:
            if (PROGRAMS[program].unit == "micrograph") != bool(rung.micrograph_shape):
                continue
            device = args.device if PROGRAMS[program].deepcryo else "cpu"
            if args.deadline_minutes and time.time() - started > 60 * args.deadline_minutes:
                print("%-12s %-20s not started: past --deadline-minutes" % (name, program), flush=True)
                continue
            rec = measure(args, name, rung, program, records)
            records = [r for r in records if (r["rung"], r["program"], r["device"]) != (name, program, device)] + [rec]
            with open(results_path, "w") as f:
                json.dump(records, f, indent=1)
    header = "%s, %s, %d threads, torch %s; load average at the end %.1f" % (
        _now(), platform.node(), args.threads, torch.__version__,
        os.getloadavg()[0])
    text = "%s\n\n%s\n\n%s\n" % (header, markdown_table(records), growth_summary(records))
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + text)
    plot(records, args.plot)
    print("plot: %s" % args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
