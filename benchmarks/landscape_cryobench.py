"""CryoBench-style landscape benchmark: per-conformation FSC-AUC of deepcryo's VAE, cryoDRGN, RECOVAR and the consensus map.

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
  default is 1024) and minibatches of ``--cryodrgn-batch-size`` (its default, 8; runs before 2026-12-07 used 64,
  deepcryo's), then ``eval_vol --zfile``;
- ``RECOVAR`` (with ``--recovar``, the Python interpreter of RECOVAR 1.0.5's own virtual environment, JAX on the
  CPU: ``python3 -m venv /tmp/rcv && /tmp/rcv/bin/pip install recovar==1.0.5``): ``pipeline`` on the same STAR
  (``--mask sphere --zdim 10 --downsample <work box>``, its other options at their defaults; zdim 10 as its README's
  ``analyze``), then ``compute_state`` at each conformation's mean latent (its kernel regression, default 50 bins)
  from ``model/zdim_10/latent_coords.npy``. Both run through ``recovar_cpu.py`` (beside this script), which fixes
  RECOVAR's JAX projector on the CPU (without it every map comes out magnified twice; see that file).
  ``compute_state`` gets ``--gpu-budget-gb 1``: that budget only sets its image batch, and every bin's images are
  padded to a full batch, so at the default (half the RAM on a CPU, about 3 000 images) a state cost 7.6× the CPU
  here for the same map;
- ``consensus``: ``python -m deepcryo.core.reconstruct`` of all particles with the true poses, the floor: a
  method that does not beat it inside the moving region has not recovered the motion.

With ``--poses true,estimated`` (or ``estimated``), the user's path as well: the particles' poses are not read but
estimated by SwiftRes (``python -m deepcryo.swiftalign refine`` from the middle conformation's map low-passed to
30 Å, as ``benchmarks/landscape_path.py`` from one state's map; ``--align-mask static`` masks the true moving region
out of its references in a local refinement from those poses, ``--swiftres-extra`` passes more of its options), then deepcryo and the consensus run on
those poses; the table adds each score's ratio to the same method's on the true poses and SwiftRes's pose error
against the truth (median and % beyond 10°, raw and after each conformation's best rotation of its frame, also per
conformation), and the VAE's scores after undoing the turn that each conformation's poses share
(:func:`shared_turns`, :func:`undo_turn`: aligned to one map, a conformation far from it takes a common turn of its
frame, and its decoded volume is turned with it; see benchmarks/RESULTS.md). ``--two-pass K`` then runs landscape_path's heterogeneity-aware consensus: SwiftRes again with the K
cluster maps of ``analyze`` on that VAE as references (15 Å, one class each) and the VAE on its poses.
``--body-frame K`` instead moves each group's poses into one body frame (``python -m deepcryo.landscape frames`` on
K bins along that VAE's latent PC1, with ``--body-frame-groups order`` along its order along the landscape
(``dcOrder``, for a curved one), or with ``--body-frame-groups clusters`` on its K k-means clusters; see
:mod:`deepcryo.landscape.frames`) and trains the VAE on the moved poses, ``--body-frame-rounds`` times in all.

Scores, as CryoBench (Jeon et al. 2024, arXiv:2408.05526) scores methods, at the working box ``--work-box`` (the
true maps and the consensus are Fourier-cropped to it):

- **FSC-AUC**: for each conformation k, the FSC between the method's volume for k and the true map of k, and
  its area against the spatial frequency in 1/px up to Nyquist (:func:`deepcryo.landscape.metrics.fsc_auc`;
  identical maps score 0.5), averaged over k. The volume for k is decoded at the **mean latent of k's particles**
  (CryoBench's first protocol, its per-conformation FSC).
  Over the whole particle (a soft sphere of radius N/2 − 4 px with a 3 px edge) and inside the **moving region**
  (:func:`deepcryo.landscape.metrics.scoring_masks`: voxels where the standard deviation over the K true maps
  exceeds 20 % of its maximum, extended by 1 px with a 2 px cosine edge, within that sphere; 40-50 % of the
  phantom's density). The masked curves are corrected for the correlation the mask itself creates, by phase
  randomisation as relion_postprocess (:func:`deepcryo.landscape.metrics.conformation_fsc_auc`): uncorrected, the
  tight moving-region mask scores the consensus higher there than over the whole particle. All methods and the
  consensus share the masks. As CryoBench (its ``fsc`` and ``fsc_flipped``), each
  method's volumes are scored as written and mirrored (z flipped about the box centre), and the better hand over
  the whole particle is kept: a method's frame and hand are its own;
- **per-image FSC-AUC** (CryoBench's ``imgfsc``): ``--per-image`` I images evenly spaced over the rendered STAR
  (:func:`per_image_rows`), one volume decoded at each image's own latent and scored as above against that image's
  true conformation, in the hand chosen for the method; averaged over the images. It also penalises the spread of
  a conformation's latents, which the per-conformation mean hides. The consensus map is scored against the same
  images. Its decodes are not counted in a method's CPU (RECOVAR's ``compute_state`` for them is recorded apart);
- **|ρ|** (motion): |Spearman ρ| between the latent PC1 and the conformation index, and in brackets the same for
  the conformation predicted from each particle's 50 nearest latents (``metrics.neighbour_rho``, cross-validated: a
  latent may order the motion along a curve that PC1 does not follow) and for the landscape's order along its curve
  (``metrics.order_rho``: ``analyze``'s ``dcOrder``, what a user reads the motion off); **ARI** (discrete): adjusted Rand index of
  k-means (K = the number of states) on the latents against the true states; deepcryo's latents in the σ units of
  its analysis (``metrics.latents(star, sigma_units=True)``), cryoDRGN's as its own analysis reads them;
- **CPU s**: user + system time of the child processes of each method, everything from the STAR and stack to the
  scored volumes (cryoDRGN's and RECOVAR's preprocessing included).

Published CryoBench FSC-AUC on IgG-1D (100 k particles, 128 px, SNR 0.01), for context: cryoDRGN 0.366,
cryoSPARC 3DVA 0.351, RECOVAR 0.391, CryoSPIRE 0.402.

Prints one markdown table per set and writes ``--json`` (default ``<workdir>/cryobench.json``) with every
per-conformation score. Validation size (see benchmarks/RESULTS.md)::

    python benchmarks/landscape_cryobench.py --n 2000 --box 64 --work-box 32 --epochs 8 --snr 0.1 \\
        --cryodrgn /tmp/cdrgn/bin/cryodrgn --cryodrgn-dim 256

From estimated poses at the issue's 4 000-particle, 20-epoch size::

    python benchmarks/landscape_cryobench.py --n 4000 --box 64 --work-box 32 --epochs 20 --snr 0.1 \\
        --poses true,estimated --threads 1

The issue's size (≥ 20 k particles, SNR 0.1 and 0.01)::

    python benchmarks/landscape_cryobench.py --n 20000 --box 128 --work-box 64 --epochs 20 --snr 0.01 \\
        --cryodrgn /tmp/cdrgn/bin/cryodrgn --recovar /tmp/rcv/bin/python

Each method's folder is reused by a later run on the same ``--workdir`` once it has finished (deepcryo's training
and decoding, cryoDRGN's training, RECOVAR's steps), so a peer or a score can be added to a set already scored.
"""
import argparse
import glob
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from typing import NamedTuple, Optional

import numpy as np
import torch

from deepcryo.core.fourier import resize_volume
from deepcryo.core.geometry import euler_to_matrix, rotation_angle_deg
from deepcryo.core.mrc import read_mrc, write_mrc
from deepcryo.core.particles import read_particles
from deepcryo.landscape import metrics
from deepcryo.landscape.frames import rotate_volumes
from deepcryo.tests.relion_data import RenderSpec, render

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import landscape as pairwise  # noqa: E402  (benchmarks/landscape.py, a sibling benchmark module)
from landscape import timed_commands  # noqa: E402
from landscape_path import cluster_references, image_keys, pose_errors_deg, state_aligned_errors_deg  # noqa: E402,E501

logger = logging.getLogger("deepcryo.benchmarks.landscape_cryobench")

SETS = ("motion", "discrete")


def _read_volumes(paths):
    return np.stack([read_mrc(p)[0] for p in paths]).astype(np.float64)


class Run(NamedTuple):
    """One method's output on one STAR."""
    volumes: np.ndarray                  # (K, N, N, N) at each conformation's mean latent
    latents: Optional[np.ndarray]        # (n, L) as the ordering and ARI read them (None: no latent)
    conformation: Optional[np.ndarray]   # (n,) true conformation of each latent
    wall_s: float
    cpu_s: float
    image_volumes: np.ndarray            # (I, N, N, N) at the latents of the per-image FSC's images


def per_image_rows(n: int, count: int) -> np.ndarray:
    """The rows (in the rendered STAR's order) of CryoBench's per-image FSC: ``count`` images evenly spaced over the
    ``n`` particles (its ``np.arange(0, n, n // count)``); the rendered states are a random permutation, so these hold
    the conformations at random."""
    return np.arange(0, n, max(1, n // count))[:count] if count > 0 else np.zeros(0, dtype=np.int64)


def _latents_of(z, keys, images):
    """Rows of ``z`` (its particles' image ``keys``) for the image keys ``images``, in that order."""
    row = {k: i for i, k in enumerate(keys)}
    return np.asarray(z)[[row[k] for k in images]]


def _decoded(out, name, points, decode):
    """Volumes at ``points`` (I, L) decoded by ``decode(zfile, folder)`` into a fresh ``out/name`` (I = 0: none)."""
    if len(points) == 0:
        return np.zeros((0,) * 4)
    folder, zfile = os.path.join(out, name), os.path.join(out, name + "_z.txt")
    shutil.rmtree(folder, ignore_errors=True)
    np.savetxt(zfile, points)
    decode(zfile, folder)
    return _read_volumes(sorted(glob.glob(os.path.join(folder, "*.mrc"))))


def run_deepcryo(star, conformation_of, out, args, images=()):
    """Train on ``star`` (its poses: true or estimated), decode at each conformation's mean latent and at the latents
    of the per-image FSC's ``images`` (image keys); a :class:`Run` (latents in the σ units of deepcryo's analysis).
    ``conformation_of``: image key -> true conformation (the estimated STAR need not keep the rendered order).
    Reused when ``out`` holds a finished run (its ``time_s.json`` with that run's wall and CPU seconds); the
    per-image volumes are decoded again each time and not counted in the CPU."""
    vols = os.path.join(out, "volumes")

    def decode(zfile, folder):
        return timed_commands([[sys.executable, "-m", "deepcryo.landscape", "volumes", out, "--output-dir", folder,
                                "--zfile", zfile, "--threads", str(args.threads)]])

    def train_and_decode():
        wall, cpu, _, trained = pairwise.run_deepcryo(star, out, args)
        zfile = os.path.join(out, "conformation_means.txt")
        conformation = np.array([conformation_of[k] for k in image_keys(trained)])
        np.savetxt(zfile, metrics.conformation_means(metrics.latents(trained), conformation))
        w, c = decode(zfile, vols)
        return wall + w, cpu + c

    wall, cpu = _recorded(os.path.join(out, "time_s.json"), train_and_decode)
    trained = read_particles(os.path.join(out, "particles_latent.star"), require_images=False)
    z = metrics.latents(trained)
    conformation = np.array([conformation_of[k] for k in image_keys(trained)])
    return Run(_read_volumes(sorted(glob.glob(os.path.join(vols, "vol_*.mrc")))),
               metrics.latents(trained, sigma_units=True), conformation, wall, cpu,
               _decoded(out, "per_image_volumes", _latents_of(z, image_keys(trained), images), decode))


def run_cryodrgn(star, conformation_of, out, args, images=()):
    """cryoDRGN 4.3.1 from the same STAR and stack (``benchmarks/landscape.py``'s downsample, parse and
    ``train_vae``, networks ``--cryodrgn-dim`` wide), then ``eval_vol`` at each conformation's mean latent and at the
    latents of ``images``; a :class:`Run`. ``star`` is the rendered one (cryoDRGN reads its whole stack in order).
    Its training is recorded once finished and reused (:func:`_timed_once`)."""
    wall, cpu = _timed_once(out, "train", pairwise.cryodrgn_commands(
        star, out, args, dim=args.cryodrgn_dim, batch_size=args.cryodrgn_batch_size),
                            pairwise.cryodrgn_environ(args))
    z = pairwise.cryodrgn_latents(out)
    keys = image_keys(read_particles(star, require_images=False))
    conformation = np.array([conformation_of[k] for k in keys])
    train_dir = os.path.join(out, "train")

    def decode(zfile, folder):
        return timed_commands([[args.cryodrgn, "eval_vol", os.path.join(train_dir, "weights.pkl"), "-c",
                                os.path.join(train_dir, "config.yaml"), "--zfile", zfile, "-o", folder,
                                "--Apix", repr(args.pixel_size * args.box / args.work_box)]],
                              env=pairwise.cryodrgn_environ(args))

    zfile, vols = os.path.join(out, "conformation_means.txt"), os.path.join(out, "volumes")
    np.savetxt(zfile, metrics.conformation_means(z, conformation))
    w, c = decode(zfile, vols)
    return Run(_read_volumes(sorted(glob.glob(os.path.join(vols, "*.mrc")))), z, conformation, wall + w, cpu + c,
               _decoded(out, "per_image_volumes", _latents_of(z, keys, images), decode))


RECOVAR_ZDIM = 10
RECOVAR_CPU = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recovar_cpu.py")


def recovar_environ(args):
    """RECOVAR's environment: a peer's in its own venv (``landscape.cryodrgn_environ``: ``--threads`` threads, without
    deepcryo's PYTHONPATH), with JAX on the CPU and XLA's threads set to the same number."""
    threads = int(args.threads)
    return dict(pairwise.cryodrgn_environ(args), JAX_PLATFORMS="cpu", XLA_FLAGS=(
        "--xla_cpu_multi_thread_eigen=%s intra_op_parallelism_threads=%d" % (str(threads > 1).lower(), threads)))


def _recorded(record, run):
    """``run()`` (its (wall, CPU) seconds) once per ``record``: written there when it has finished (through
    ``record.part``, so an interrupted step is run again) and read back by every later call."""
    if not os.path.exists(record):
        os.makedirs(os.path.dirname(record), exist_ok=True)
        with open(record + ".part", "w") as f:
            json.dump(list(run()), f)
        os.replace(record + ".part", record)
    with open(record) as f:
        return tuple(json.load(f))


def _timed_once(out, name, cmds, env):
    """``timed_commands`` once per ``out``: (wall, CPU) recorded in ``out/<name>_time_s.json`` and reused."""
    return _recorded(os.path.join(out, name + "_time_s.json"), lambda: timed_commands(cmds, env=env))


def run_recovar(star, conformation_of, out, args, images=()):
    """RECOVAR 1.0.5 from the same STAR (``pipeline``, then ``compute_state`` at each conformation's mean latent and,
    separately, at the latents of ``images``; see the module docstring); a :class:`Run`. Each finished step is
    reused; the per-image states' CPU is not counted in the method's (it is scoring), but recorded in
    ``per_image_<I>_time_s.json``."""
    env, pipeline, states = recovar_environ(args), os.path.join(out, "pipeline"), os.path.join(out, "states")
    recovar = [args.recovar, RECOVAR_CPU]
    wall, cpu = _timed_once(out, "pipeline", [recovar + [
        "pipeline", star, "-o", pipeline, "--mask", "sphere", "--zdim", str(RECOVAR_ZDIM), "--downsample",
        str(args.work_box), "--accept-cpu"]], env)
    z = np.load(os.path.join(pipeline, "model", "zdim_%d" % RECOVAR_ZDIM, "latent_coords.npy"))
    keys = image_keys(read_particles(star, require_images=False))
    conformation = np.array([conformation_of[k] for k in keys])

    def compute_state(record, zfile, points, folder):
        """``compute_state`` at ``points`` (written to ``zfile``) into ``folder``, once (``record``); (volumes,
        wall, CPU)."""
        np.savetxt(zfile, points)
        w, c = _timed_once(out, record, [recovar + [
            "compute_state", pipeline, "-o", folder, "--latent-points", zfile, "--gpu-budget-gb", "1"]], env)
        return _read_volumes([os.path.join(folder, "state%03d.mrc" % i) for i in range(len(points))]), w, c

    vols, w, c = compute_state("states", os.path.join(out, "conformation_means.txt"),
                               metrics.conformation_means(z, conformation), states)
    image_vols = np.zeros((0,) * 4)
    if len(images):
        name = "per_image_%d" % len(images)
        image_vols = compute_state(name, os.path.join(out, name + "_z.txt"), _latents_of(z, keys, images),
                                   os.path.join(out, name))[0]
    return Run(vols, z, conformation, wall + w, cpu + c, image_vols)


def run_consensus(star, n_conformations, out, args, n_images=0):
    """Direct Fourier inversion of all particles at the poses of ``star``, cropped to the working box, once per
    conformation and once per per-image FSC image; a :class:`Run` without latents."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "consensus.mrc")
    wall, cpu = timed_commands([[sys.executable, "-m", "deepcryo.core.reconstruct", "--particles", star, "--output", path,
                         "--threads", str(args.threads)]])
    vol = resize_volume(torch.as_tensor(read_mrc(path)[0]), args.work_box).numpy().astype(np.float64)
    return Run(np.repeat(vol[None], n_conformations, 0), None, None, wall, cpu, np.repeat(vol[None], n_images, 0))


def mirrored(volumes: np.ndarray) -> np.ndarray:
    """Volumes (K, N, N, N) of the other hand: z flipped about the box centre (index N/2 stays in place)."""
    return np.roll(np.flip(volumes, axis=1), 1, axis=1)


def per_image_scores(volumes: np.ndarray, truths: np.ndarray, masks, hand: str):
    """CryoBench's per-image FSC: each volume (I, N, N, N) decoded at one image's own latent against that image's true
    conformation (I, N, N, N), in the hand :func:`score` chose for the method; mean and per-image FSC-AUC in each
    mask. Unlike the per-conformation score it also penalises the spread of a conformation's latents."""
    vols = volumes if hand == "as written" else mirrored(volumes)
    aucs = {name: metrics.conformation_fsc_auc(vols, truths, m) for name, m in masks.items()}
    return dict({"per_image_auc_%s" % name: float(a.mean()) for name, a in aucs.items()},
                **{"per_image_auc_%s_each" % name: a.tolist() for name, a in aucs.items()})


def score(volumes, truths, masks):
    """Per-conformation FSC-AUC in each mask (dict name -> (K,)) in the better hand over the whole particle."""
    best = None
    for hand, vols in (("as written", volumes), ("mirrored", mirrored(volumes))):
        aucs = {name: metrics.conformation_fsc_auc(vols, truths, m) for name, m in masks.items()}
        if best is None or aucs["whole"].mean() > best[1]["whole"].mean():
            best = (hand, aucs)
    return best


def alignment_mask(volumes: np.ndarray) -> np.ndarray:
    """The particle without its moving region, (N, N, N) in [0, 1], from the true maps (K, N, N, N) at the particle
    box: the whole-particle sphere times one minus the moving mask of :func:`metrics.scoring_masks`. As a SwiftRes
    ``--mask``, the references are masked by it, so the particles are aligned on the part that does not move (what a
    user draws around the rigid body in RELION's focused refinement)."""
    masks = metrics.scoring_masks(volumes)
    return masks["whole"] - masks["moving"]


def swiftres_name(args):
    """Folder of one SwiftRes setting (``--align-mask``, ``--swiftres-extra``)."""
    extra = "".join(c if c.isalnum() else "_" for c in args.swiftres_extra.replace("--", "")).strip("_")
    return "swiftres" + ("_static" if args.align_mask == "static" else "") + ("_" + extra if extra else "")


def run_swiftres(data, out, args, references=None):
    """``python -m deepcryo.swiftalign refine`` of the unaligned particles; reused when ``out`` holds a finished run.
    Without ``references``, from the middle conformation's map low-passed to 30 Å (as benchmarks/landscape_path.py
    from one state's map), one global iteration (the STAR's true poses are not read: a global iteration searches all
    poses and shifts without priors); with them (the second pass), one class each from 15 Å, global, with its soft
    sphere, as landscape_path's ``--two-pass``. ``--align-mask static`` first runs the former with its soft sphere (folder ``swiftres``), then a
    focused refinement from its poses, local only (``--global-iterations 0``), against its consensus map at its
    resolution masked by :func:`alignment_mask`, as RELION users refine a rigid body after a consensus. (STAR path, wall, CPU: all
    the SwiftRes runs that made it)."""
    particles, before = data.star, (0.0, 0.0)
    if args.align_mask == "static" and not references:
        particles, *before = run_swiftres(data, os.path.join(os.path.dirname(out), "swiftres"),
                                          argparse.Namespace(**dict(vars(args), align_mask="sphere")))

    def refine():                       # in ``out``, which _recorded makes
        refs, resolution = ((references, "15") if references else
                            ([data.volume_paths[len(data.volume_paths) // 2]], "30"))
        if particles != data.star:      # focused: the consensus map and resolution of the sphere run
            consensus_dir = os.path.dirname(particles)
            with open(os.path.join(consensus_dir, "model.json")) as f:
                resolution = repr(json.load(f)["resolution_A"])
            refs = [os.path.join(consensus_dir, "map.mrc")]
        cmd = [sys.executable, "-m", "deepcryo.swiftalign", "refine", "--particles", particles, "--reference", *refs,
               "--initial-resolution", resolution, "--output-dir", out, "--threads", str(args.threads),
               "--seed", str(args.seed)]
        if args.align_mask == "static" and not references:
            mask = os.path.join(out, "static_mask.mrc")
            write_mrc(mask, alignment_mask(np.stack(data.volumes)).astype(np.float32), args.pixel_size)
            cmd += ["--mask", mask, "--global-iterations", "0"]
        return timed_commands([cmd + shlex.split(args.swiftres_extra)])

    wall, cpu = _recorded(os.path.join(out, "time_s.json"), refine)
    return os.path.join(out, "particles.star"), wall + before[0], cpu + before[1]


def second_pass_references(vae_dir, data, args):
    """``analyze --clusters K`` (K = ``--two-pass``) of the VAE trained on the first SwiftRes poses, its K cluster
    reconstructions brought to the particle box (landscape_path's ``cluster_references``); (paths, wall, CPU)."""
    wall, cpu = timed_commands([[sys.executable, "-m", "deepcryo.landscape", "analyze", vae_dir, "--clusters",
                                 str(args.two_pass), "--no-umap", "--trajectory-steps", "2", "--pcs", "1",
                                 "--threads", str(args.threads), "--seed", str(args.seed)]])
    refs = cluster_references(os.path.join(vae_dir, "analysis"), args.box, args.pixel_size,
                              os.path.join(vae_dir, "classes"), clusters=args.two_pass)
    return refs, wall, cpu


#: ``--body-frame-groups`` that bin the particles along a column of ``analyze``'s STAR, and that column
BIN_COLUMNS = {"pc1": "dcPC1", "order": "dcOrder"}


def body_frame_particles(vae_dir, out, args):
    """``analyze --clusters K`` (K = ``--body-frame``) of the VAE trained on SwiftRes's poses into
    ``vae_dir/analysis_bodyframe``, then ``python -m deepcryo.landscape frames`` of its particles into
    ``out/particles.star``, with ``--body-frame-groups clusters`` on its K k-means clusters and their
    reconstructions, with ``pc1`` or ``order`` on K equal bins along the latent's PC1 or ``analyze``'s order along
    the landscape (maps reconstructed by ``frames`` at the working box): each group's poses moved into one body
    frame (the mean of the groups'). Reused when ``out`` holds a finished run; (STAR path, wall, CPU of analyze and
    frames)."""
    star, analysis = os.path.join(out, "particles.star"), os.path.join(vae_dir, "analysis_bodyframe")
    if args.body_frame_groups in BIN_COLUMNS:
        groups = ["--group-column", BIN_COLUMNS[args.body_frame_groups], "--bins", str(args.body_frame),
                  "--box", str(args.work_box)] + (["--interpolate"] if args.body_frame_interpolate else [])
    else:
        groups = ["--maps", *["%s/cluster_%02d_reconstructed.mrc" % (analysis, c + 1) for c in range(args.body_frame)]]
    wall, cpu = _recorded(os.path.join(out, "time_s.json"), lambda: timed_commands([
        [sys.executable, "-m", "deepcryo.landscape", "analyze", vae_dir, "--clusters", str(args.body_frame),
         "--no-umap", "--trajectory-steps", "2", "--pcs", "1", "--threads", str(args.threads), "--seed",
         str(args.seed), "--output-dir", analysis],
        [sys.executable, "-m", "deepcryo.landscape", "frames", "--particles", os.path.join(analysis, "particles.star"),
         "--output", star, "--resolution", repr(args.body_frame_resolution)] + groups]))
    return star, wall, cpu


def body_frame_figures(star_path, truth, conformation_of):
    """The turns that ``frames`` found for each group against the truth: per group its size, the angle of the
    turn R found, of the turn G that its particles' SwiftRes poses share (A_est ≈ A_true·G, from the truth) and of
    R·Gᵀ (0 when R undoes G exactly: the turned poses are A_est·Rᵀ); and the shared turn of each conformation's
    turned poses (what is left of SwiftRes's turn)."""
    with open(os.path.splitext(star_path)[0] + "_frames.json") as f:
        found = json.load(f)
    star = read_particles(star_path, require_images=False)
    keys = image_keys(star)
    truth_by_key = dict(zip(image_keys(truth), truth.angles_deg()))
    source = read_particles(found["particles"], require_images=False)
    source_by_key = dict(zip(image_keys(source), source.angles_deg()))
    turns = np.asarray(found["rotations"])
    before = euler_to_matrix(torch.as_tensor(np.stack([source_by_key[k] for k in keys]))).numpy()   # A_est
    true = euler_to_matrix(torch.as_tensor(np.stack([truth_by_key[k] for k in keys]))).numpy()
    groups = np.asarray(star.particles["dcFrameGroup"], dtype=np.int64) - 1
    relative = np.einsum("nji,njk->nik", true, before)
    shared = np.stack([metrics._project_so3(relative[groups == g].sum(0)) for g in range(len(turns))])
    clusters = [{"cluster": g + 1, "particles": int((groups == g).sum()),
                 "turn_found_deg": float(rotation_angle_deg(torch.as_tensor(turns[g]))),
                 "swiftres_shared_turn_deg": float(rotation_angle_deg(torch.as_tensor(shared[g]))),
                 "found_vs_shared_deg": float(rotation_angle_deg(torch.as_tensor(turns[g] @ shared[g].T))),
                 "conformations": np.bincount([conformation_of[k] for k, m in zip(keys, groups == g) if m]).tolist()}
                for g in range(len(turns))]
    after = shared_turns(star_path, truth, conformation_of)
    return {"reference_cluster": found.get("aligned_to_group", found.get("reference_group")), "clusters": clusters,
            "static_body_fraction_of_particle": found["static_body_fraction_of_particle"],
            "turn_left_deg": [float(a) for a in rotation_angle_deg(torch.as_tensor(after)).numpy()]}


def pose_figures(star_path, truth, conformation_of):
    """SwiftRes's pose error against the truth: median and % beyond 10°, raw and after the best rotation of each
    conformation's frame (:func:`landscape_path.state_aligned_errors_deg`), overall and per conformation."""
    star = read_particles(star_path, require_images=False)
    keys = image_keys(truth)
    truth_by_key = dict(zip(keys, truth.angles_deg()))
    raw = pose_errors_deg(star, truth_by_key)
    aligned = state_aligned_errors_deg(star, truth_by_key, conformation_of)
    conformation = np.array([conformation_of[k] for k in image_keys(star)])
    per = [(float(np.median(raw[conformation == k])), float(np.median(aligned[conformation == k])))
           for k in range(int(conformation.max()) + 1)]
    return {"median_deg": float(np.median(raw)), "pct_over_10": 100 * float(np.mean(raw > 10)),
            "aligned_median_deg": float(np.median(aligned)), "aligned_pct_over_10": 100 * float(np.mean(aligned > 10)),
            "per_conformation_median_deg": [p[0] for p in per],
            "per_conformation_aligned_median_deg": [p[1] for p in per]}


def shared_turns(star_path, truth, conformation_of) -> np.ndarray:
    """(K, 3, 3) the rotation G_k shared by conformation k's estimated poses: A_est ≈ A_true·G_k (the rotation
    nearest to the mean of A_trueᵀ·A_est over k's particles). SwiftRes aligns every particle to one map, so the
    particles of a conformation far from it take a common turn of their frame, which the VAE then decodes as a
    rotated volume."""
    star = read_particles(star_path, require_images=False)
    keys = image_keys(truth)
    truth_by_key = dict(zip(keys, truth.angles_deg()))
    est = euler_to_matrix(torch.as_tensor(star.angles_deg())).numpy()
    true = euler_to_matrix(torch.as_tensor(np.stack([truth_by_key[k] for k in image_keys(star)]))).numpy()
    relative = np.einsum("nji,njk->nik", true, est)
    conformation = np.array([conformation_of[k] for k in image_keys(star)], dtype=np.int64)
    return np.stack([metrics._project_so3(relative[conformation == k].sum(0))
                     for k in range(int(conformation.max()) + 1)])


def undo_turn(volume: np.ndarray, turn: np.ndarray) -> np.ndarray:
    """``volume`` (N, N, N, indexed [z, y, x]) decoded from particles whose poses carry the frame turn ``turn``
    (A_est = A_true·G), brought back to the true frame: V(x) ← V(Gᵀx) about the box centre N/2 (trilinear).
    Its projection at A_true then matches the input's at A_true·G. (:func:`deepcryo.landscape.frames.rotate_volumes`
    with the rotation G.)"""
    turned = rotate_volumes(torch.as_tensor(volume, dtype=torch.float64),
                            torch.as_tensor(np.asarray(turn), dtype=torch.float64)[None])
    return turned[0].numpy()


def run_set(kind, args, work):
    """Render one set, run every method on it and score it; the set's JSON entry."""
    states = args.conformations if kind == "motion" else args.states
    spec = RenderSpec(n=args.n, box=args.box, pixel_size_A=args.pixel_size, snr=args.snr, seed=args.seed,
                      states=states, hinge_deg=args.hinge_deg)
    t0 = time.time()
    data = render(os.path.join(work, kind, "data"), spec)
    logger.info("%s: rendered %d particles of %d conformations by relion_project in %.0f s (SNR %.3f)", kind,
                args.n, states, time.time() - t0, data.snr)
    truth = read_particles(data.star)
    keys = image_keys(truth)
    conformation_of = dict(zip(keys, np.asarray(truth.particles["rlnClassNumber"], dtype=np.int64) - 1))
    truths = np.stack([resize_volume(torch.as_tensor(v), args.work_box).numpy() for v in data.volumes])
    masks = metrics.scoring_masks(truths)
    rows = per_image_rows(len(truth), args.per_image)
    images = [keys[i] for i in rows]
    image_truths = truths[[conformation_of[k] for k in images]]
    entry = {"spec": dict(vars(spec)), "work_box": args.work_box, "snr_measured": data.snr, "moving_mask_fraction":
             float(masks["moving"].mean()), "per_image_rows": rows.tolist(), "methods": {}}

    def score_run(label, poses, star, run, out, pose_cpu):
        t0 = time.time()
        if run is None:
            vols, z, conformation, wall, cpu, image_vols = run_consensus(star, states, out, args, len(images))
        else:
            vols, z, conformation, wall, cpu, image_vols = run(star, conformation_of, out, args, images)
        hand, aucs = score(vols, truths, masks)
        result = {"poses": poses, "auc_whole": float(aucs["whole"].mean()), "auc_moving": float(aucs["moving"].mean()),
                  "auc_whole_per_conformation": aucs["whole"].tolist(),
                  "auc_moving_per_conformation": aucs["moving"].tolist(), "hand": hand, "wall_s": wall,
                  "cpu_s": cpu + pose_cpu, "pose_cpu_s": pose_cpu}
        if images:
            result.update(per_image_scores(image_vols, image_truths, masks, hand))
        if z is not None:
            key, value = (("rho", metrics.hinge_rho(z, conformation)) if kind == "motion"
                          else ("ari", metrics.state_ari(z, conformation)))
            result[key] = value
            if kind == "motion":
                result["rho_neighbours"] = metrics.neighbour_rho(z, conformation)
                result["rho_order"] = metrics.order_rho(z, conformation)
        if poses == "estimated" and run is not None:
            turns = shared_turns(star, truth, conformation_of)
            turned = np.stack([undo_turn(v, g) for v, g in zip(vols, turns)])
            result.update({name + "_turn_out": float(metrics.conformation_fsc_auc(turned, truths, m).mean())
                           for name, m in (("auc_whole", masks["whole"]), ("auc_moving", masks["moving"]))})
            result["turn_deg"] = [float(a) for a in rotation_angle_deg(torch.as_tensor(turns)).numpy()]
        entry["methods"][label] = result
        logger.info("%s %s: %.0f s wall, %s", kind, label, time.time() - t0, json.dumps(
            {k: round(v, 3) for k, v in result.items() if isinstance(v, float)}))

    def estimated(folder, references=None, pose_cpu=0.0, poses=None):
        """SwiftRes into ``folder`` (or ``poses``: (STAR, wall, CPU) made otherwise), its pose error, deepcryo and
        the consensus on its poses."""
        star, wall, cpu = poses or run_swiftres(data, os.path.join(work, kind, folder), args, references)
        figures = dict(pose_figures(star, truth, conformation_of), wall_s=wall, cpu_s=cpu + pose_cpu)
        entry.setdefault("pose_runs", {})[folder] = figures
        logger.info("%s %s: pose error median %.2f°, %.1f %% > 10°; %.0f CPU s", kind, folder,
                    figures["median_deg"], figures["pct_over_10"], cpu)
        for name, run in (("deepcryo", run_deepcryo), ("consensus", None)):
            score_run("%s, %s poses" % (name, folder), "estimated", star, run,
                      os.path.join(work, kind, "%s_%s" % (name, folder.replace(" + ", "_").replace(" ", "_"))), figures["cpu_s"])
        return os.path.join(work, kind, "deepcryo_" + folder.replace(" + ", "_").replace(" ", "_")), figures["cpu_s"]

    if "true" in args.poses:
        score_run("deepcryo", "true", data.star, run_deepcryo, os.path.join(work, kind, "deepcryo"), 0.0)
        if args.cryodrgn:
            score_run("cryoDRGN", "true", data.star, run_cryodrgn, os.path.join(work, kind, "cryoDRGN"), 0.0)
        if args.recovar:
            score_run("RECOVAR", "true", data.star, run_recovar, os.path.join(work, kind, "RECOVAR"), 0.0)
        score_run("consensus", "true", data.star, None, os.path.join(work, kind, "consensus"), 0.0)
    if "estimated" in args.poses:
        folder = swiftres_name(args)
        vae_dir, pose_cpu = estimated(folder)
        source, source_dir, source_cpu = folder, vae_dir, pose_cpu
        for round_ in range(1, args.body_frame_rounds + 1 if args.body_frame else 1):
            tag = "%s%d %gA" % (args.body_frame_groups, args.body_frame, args.body_frame_resolution) + (
                " interpolated" if args.body_frame_interpolate else "") + (" x%d" % round_ if round_ > 1 else "")
            made = body_frame_particles(source_dir, os.path.join(work, kind, "%s_bodyframe_%s" % (
                folder, tag.replace(" ", "_"))), args)
            vae_cpu = entry["methods"]["deepcryo, %s poses" % source]["cpu_s"] - source_cpu
            source = "%s + body frame %s" % (folder, tag)
            source_dir, source_cpu = estimated(source, pose_cpu=source_cpu + vae_cpu, poses=made)
            entry.setdefault("body_frames", []).append(dict(body_frame_figures(made[0], truth, conformation_of),
                                                            run=source))
        if args.two_pass:
            refs, _, cpu = second_pass_references(vae_dir, data, args)
            vae_cpu = entry["methods"]["deepcryo, %s poses" % folder]["cpu_s"] - pose_cpu
            estimated("%s_%dclass" % (folder, args.two_pass), refs, pose_cpu + vae_cpu + cpu)
    return entry


SCORES = ("auc_whole", "auc_moving", "per_image_auc_whole", "per_image_auc_moving", "rho", "ari")


def ratios(entry):
    """label -> {score: value / the same method's value on the true poses} for each run on estimated poses."""
    methods = entry["methods"]
    out = {}
    for label, r in methods.items():
        true = methods.get(label.split(", ")[0])
        if r["poses"] == "estimated" and true is not None:
            out[label] = {k: r[k] / true[k] for k in SCORES if k in r and true.get(k)}
    return out


def table(kind, entry):
    """The set's markdown table, the estimated/true ratios and SwiftRes's pose error."""
    key, label = ("rho", "\\|ρ\\| PC1 vs conformation") if kind == "motion" else ("ari", "ARI")
    spec = entry["spec"]
    lines = ["%s: %d particles, %d conformations, box %d scored at %d, SNR %.3g, moving region %.1f %% of the box" % (
                 kind, spec["n"], spec["states"], spec["box"], entry["work_box"], entry["snr_measured"],
                 100 * entry["moving_mask_fraction"]), "",
             "| method | FSC-AUC whole | FSC-AUC moving | per-image FSC-AUC whole / moving (%d images) | %s | CPU s |" % (
                 len(entry.get("per_image_rows", ())), label), "|---|---|---|---|---|---|"]
    for name, r in entry["methods"].items():
        ordering = "%.3f" % r[key] if key in r else "—"
        if "rho_neighbours" in r:
            ordering += " (neighbours %.3f%s)" % (r["rho_neighbours"], ", dcOrder %.3f" % r["rho_order"]
                                                   if "rho_order" in r else "")
        cpu = "%.0f" % r["cpu_s"] + (" (poses %.0f)" % r["pose_cpu_s"] if r.get("pose_cpu_s") else "")
        per_image = ("%.3f / %.3f" % (r["per_image_auc_whole"], r["per_image_auc_moving"])
                     if "per_image_auc_whole" in r else "—")
        lines.append("| %s | %.3f | %.3f | %s | %s | %s |" % (name, r["auc_whole"], r["auc_moving"], per_image,
                                                            ordering, cpu))
    for name, r in entry["methods"].items():
        if "auc_whole_turn_out" in r:
            lines.append("| %s, each conformation's shared turn taken out | %.3f | %.3f | | | |" % (
                name, r["auc_whole_turn_out"], r["auc_moving_turn_out"]))
    for name, ratio in ratios(entry).items():
        lines.append("| ratio %s / true poses | %s | %s | %s | %s | |" % (name, *(
            "%.3f" % ratio[k] if k in ratio else "—"
            for k in ("auc_whole", "auc_moving", "per_image_auc_whole", key))))
    for folder, p in entry.get("pose_runs", {}).items():
        lines += ["", "%s pose error: median %.2f°, %.1f %% > 10°; after each conformation's best rotation %.2f°, "
                  "%.1f %% > 10°" % (folder, p["median_deg"], p["pct_over_10"], p["aligned_median_deg"],
                                      p["aligned_pct_over_10"]),
                  "per conformation, median (aligned): " + ", ".join(
                      "%.1f (%.1f)" % pair for pair in zip(p["per_conformation_median_deg"],
                                                           p["per_conformation_aligned_median_deg"]))]
    for b in entry.get("body_frames", []):
        lines += ["", "%s (`frames` on %d groups, aligned to group %d, static body %.0f %% of the particle mask): per "
                  "group, particles, turn found, turn its input poses share (from the truth), angle between them:" % (
                      b["run"], len(b["clusters"]), b["reference_cluster"], 100 * b["static_body_fraction_of_particle"]),
                  "; ".join("%d: %d, %.1f°, %.1f°, %.1f°" % (c["cluster"], c["particles"], c["turn_found_deg"],
                                                             c["swiftres_shared_turn_deg"], c["found_vs_shared_deg"])
                            for c in b["clusters"]),
                  "shared turn left per conformation: " + ", ".join("%.1f" % a for a in b["turn_left_deg"])]
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
    pairwise.add_cryodrgn_batch_size_argument(p)
    p.add_argument("--recovar", default=None, help="python interpreter of RECOVAR 1.0.5's own virtual environment")
    p.add_argument("--per-image", type=int, default=20, metavar="I",
                   help="images of CryoBench's per-image FSC (a volume at each one's own latent; 0: none)")
    p.add_argument("--sets", default=",".join(SETS), help="comma-separated: " + ", ".join(SETS))
    p.add_argument("--poses", default="true", choices=("true", "estimated", "true,estimated"),
                   help="train on the true poses, on SwiftRes's poses of the unaligned particles, or both")
    p.add_argument("--align-mask", default="sphere", choices=("sphere", "static"),
                   help="SwiftRes mask: its soft sphere, or (static) a local refinement from those poses against "
                        "the reference without the true moving region")
    p.add_argument("--swiftres-extra", default="", help="more options of swiftalign refine (one string)")
    p.add_argument("--beta", type=float, default=None,
                   help="deepcryo's --beta, the KL weight (default: the program's; give each setting its own --workdir)")
    p.add_argument("--volume-steps", type=int, default=None,
                   help="deepcryo's --volume-steps (default: the program's; give each setting its own --workdir)")
    p.add_argument("--two-pass", type=int, default=0, metavar="K",
                   help="then SwiftRes again from the K cluster maps of the VAE on the first poses (one class each), "
                        "and the VAE on its poses (landscape_path's --two-pass)")
    p.add_argument("--body-frame", type=int, default=0, metavar="K",
                   help="then analyze --clusters K of the VAE on SwiftRes's poses, frames (each cluster's poses "
                        "turned into one body frame) and the VAE on the turned poses")
    p.add_argument("--body-frame-groups", default="pc1", choices=(*BIN_COLUMNS, "clusters"),
                   help="the --body-frame groups: K equal bins along the latent's PC1 or along analyze's order "
                        "along the landscape (dcOrder), or analyze's K k-means clusters")
    p.add_argument("--body-frame-resolution", type=float, default=10.0,
                   help="low-pass of the group maps in frames (Å)")
    p.add_argument("--body-frame-interpolate", action="store_true",
                   help="with pc1 or order groups: frames --interpolate (each particle's turn interpolated along "
                        "the group column)")
    p.add_argument("--body-frame-rounds", type=int, default=1,
                   help="--body-frame again on the VAE of the previous round's poses, this many rounds in all")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="output JSON (default <workdir>/cryobench.json)")
    args = p.parse_args(argv)
    args.work_box = args.work_box or args.box
    sets = args.sets.split(",")
    if not set(sets) <= set(SETS) or args.work_box > args.box or args.work_box % 2:
        p.error("--sets from %s; --work-box even and <= --box" % (SETS,))
    pairwise.refuse_missing_peers(p, args, ("cryodrgn", "recovar"))
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
