"""SwiftRes: iterative gold-standard 3D refinement driven by SwiftAlign (Lauzirika's "swiftres" loop).

Each iteration, for each half set h ∈ {1, 2} and each class k (one class unless several initial maps are
given):

1. **Align** the half's particles against that half's reference only (gold standard):

   * *global* iterations (the first ``global_iterations``): a SwiftAlign index of the reference at the
     current angular and shift steps (:func:`.index.train`, faiss, CTF groups), searched and re-ranked
     exactly with each particle's own CTF, then refined by pattern search (:func:`.query.align`);
   * *local* iterations: every pose within ±``local_steps`` angular steps and ±2 shift steps of the
     previous one, scored exactly (no index needed), the best one refined by pattern search (one pass
     per level: on 300 simulated particles at SNR 0.1 this costs 4× less CPU than the global mode's
     three candidates with two passes, for a median angular error of 2.29° instead of 2.18°).

   With several classes each particle takes the class whose reference it matches best.

   **Two hypotheses across the switch to local searches.** A global search at low resolution cannot
   tell a pose from its mate under a pseudo-symmetry of the particle: on the simulated phantom of
   ``benchmarks/refine.py`` (2000 particles, SNR 0.1, 30 Å start) 5 % of the particles took a pose
   150–180° off in the 17° global iteration, and no local iteration could leave it. RELION avoids this by
   searching globally until its sampling is fine (≈ 7 iterations, most of its time); here each global
   iteration also keeps each particle's runner-up, the best refined candidate more than two angular
   steps from the winner (:func:`.query.select_and_refine`), and the next iteration runs its local search
   from both and keeps the better-scoring result, at that iteration's much finer reference. On that set
   the runner-up lies within 20° of the truth for 82 % of the wrong winners.
2. **Reconstruct** both halves (:class:`deepcryo.core.reconstruct.Reconstructor`, CTF-weighted), compute
   their FSC inside the refinement mask, corrected for the mask by phase randomisation as relion_postprocess
   does (:func:`deepcryo.core.fsc.masked_fsc`; a tight mask alone makes the FSC, and so the steps, the filter
   and the stopping, optimistic), and the resolution at FSC 0.143 as RELION reports it (the last shell
   above 0.143, :func:`deepcryo.core.fsc.fsc_resolution_A`). This corrected FSC is the one used below and
   written to ``fsc.star``.
3. **New references**: each half map reconstructed again with RELION's Wiener term (τ² from the half-map
   FSC, :func:`deepcryo.core.fsc.fsc_to_half_ssnr`; on the benchmark's 2000 particles this lowers the
   median angular error from 2.07° to 1.96°), weighted by ``sqrt(2·FSC / (1 + FSC))`` (Rosenthal &
   Henderson's C_ref, the filter cisTEM and RELION's post-processing use), cut at the resolution, its
   Fourier components below ``join_resolution_A`` (40 Å) averaged with the other half's (RELION's ``--low_resol_join_halves``,
   which keeps the halves in one frame and hand), and multiplied by the mask (the user's, or a soft sphere
   of the particle diameter).
4. **Next sampling** from the resolution r (Å) and the particle diameter D (Å):

   * angular step ``asin(r / D)``. A rotation by θ moves the particle's edge by ``D·θ/2``; at θ = r/D that is
     half a resolution element, the width of the correlation peak at resolution r, so a grid this fine
     puts every particle in its peak's basin. The seed's text uses the box (N·px) for D (finer and more
     costly than needed: the particle, not the box, rotates) and its code twice the angle (which can miss
     the basin). The pattern search of :func:`.query.refine_poses` then halves the step four times (to
     step/16), so the grid does not limit the accuracy;
   * shift step ``r / (4·px)`` (≥ 0.5 px): a shift of r/4 turns the phase at the band edge by 90°. The
     seed's text has r/(2·px), its code r/(4·px); the pattern search refines it to step/16 as well.

Optional **repetition consensus** (the seed's idea, ``repetitions=2``): each half is aligned twice, with
galleries rotated rigidly by two different random rotations (global) or priors moved by half a step
about a random axis (local); particles whose two poses differ by more than one angular step are left out
of that iteration's reconstruction (kept in the set, realigned next iteration). The better-scoring pose
is kept.

**Convergence**: stop after the first local iteration at which the resolution has not improved by 1 % for
two iterations and the median pose change is below the angular step, or at ``max_iterations``.

**Final maps with pose posteriors.** At SNR 0.1 a particle's pose is uncertain by about the median error
(2°), and inserting it at one pose throws that uncertainty away; RELION marginalises over it in every
iteration. Once, after the last iteration, each half is reconstructed again with every kept particle
inserted at the 33 poses within ±2 half angular steps of its final pose (each with its best origin within
± half a shift step), weighted by a tempered posterior against its own half's latest reference
(:func:`.query.pose_posterior`). On the benchmark's 2000 particles this moves the half-map FSC 0.143 from
7.23 to 6.56 Å (masked 6.35 → 6.20 Å) and the map against the truth from 7.33 to 6.72 Å (masked 6.38 →
6.23 Å), for 41 s (a third of the run). ``half1.mrc``, ``half2.mrc``, their FSC (``fsc.star``) and
``map.mrc`` (both halves' data together) are these reconstructions; the per-iteration files keep the best
poses only. ``model.json`` gives both resolutions (``resolution_A``: the last iteration's;
``final_resolution_A``: the final maps').

Files in ``output_dir`` (one class; with K classes ``it###_class###_half1.mrc`` and so on):

* per iteration: ``it###_half1.mrc``, ``it###_half2.mrc``, ``it###_fsc.star``, ``it###_particles.star``,
  ``it###_model.json`` (resolution, steps, mode, pose change, fraction kept, seconds, and the whole history
  and settings). The model file is written last: an iteration counts as done only when it exists, which is
  what ``resume`` looks for;
* at the end: ``map.mrc``, ``half1.mrc``, ``half2.mrc``, ``fsc.star``, ``particles.star``, then ``model.json``
  (the last iteration's record with the history, the settings and the final resolution). Like the iteration's
  model file it is written last, so its presence says the final outputs are complete: ``resume`` after the
  last iteration redoes the final pass unless it finds it, and removes it before running further iterations.

Every file is written atomically (:func:`deepcryo.core.files.atomic_output`) and ``it###_model.json`` also
holds the state of the random generator of the perturbations (``random_state``), so a run killed at any point
and resumed gives the result of an uninterrupted run.

Particles are written with rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst, rlnRandomSubset (1/2), rlnClassNumber
(1-based), dcSwiftScore and dcSwiftKept (1 if used in the last reconstruction).
"""
import glob
import json
import math
import os
import re
import shutil
import time

import numpy as np
import torch

from deepcryo.core import fourier
from deepcryo.core.errors import InputError
from deepcryo.core.files import atomic_output, remove_stale_parts_in
from deepcryo.core.fsc import fsc_resolution_A, fsc_to_half_ssnr, masked_fsc, spherical_mask
from deepcryo.core.geometry import euler_to_matrix, matrix_to_euler, pose_distance_deg, symmetry_matrices
from deepcryo.core.mrc import read_mrc, write_mrc
from deepcryo.core.particles import read_particles, write_particles
from deepcryo.core.projector import Projector
from deepcryo.core.reconstruct import Reconstructor, batch_inputs, half_split, insert_particles, write_fsc_star

from . import index as swindex
from .features import Band
from .gallery import gallery_poses, shift_grid
from .query import ParticleBatch, align, pose_posterior
from .sampling import angular_step_for_diameter, shift_step_for_resolution

__all__ = ["reference_filter", "join_halves", "refinement_mask",
           "RefineParams", "refine_3d", "LocalReference"]


# ------------------------------------------------------------------------------------------ references
def reference_filter(curve, resolution_A, box, pixel_size_A):
    """Per-shell filter (N//2 + 1,): ``sqrt(2·FSC / (1 + FSC))`` for FSC > 0, zero beyond ``resolution_A``."""
    c = np.clip(np.asarray(curve, dtype=np.float64), 0.0, 1.0)
    w = np.sqrt(2.0 * c / (1.0 + c))
    shells = np.arange(len(c))
    w[shells > box * pixel_size_A / resolution_A] = 0.0
    w[0] = 1.0
    return w


def _apply_shell_filter(volume, weights):
    v = torch.as_tensor(volume, dtype=torch.float32)
    n = v.shape[-1]
    r = torch.round(fourier.radius_grid_3d(n)).long().clamp(max=len(weights) - 1)
    w = torch.as_tensor(weights, dtype=torch.float32)[r]
    w = torch.where(fourier.radius_grid_3d(n) > n // 2, torch.zeros_like(w), w)
    return fourier.ifft3c(fourier.fft3c(v) * w).real


def join_halves(half1, half2, join_resolution_A, pixel_size_A):
    """Both halves with their Fourier components below ``join_resolution_A`` (Å) replaced by the halves' mean."""
    v1, v2 = torch.as_tensor(half1, dtype=torch.float32), torch.as_tensor(half2, dtype=torch.float32)
    n = v1.shape[-1]
    low = (fourier.radius_grid_3d(n) <= n * pixel_size_A / join_resolution_A).to(torch.float32)
    f1, f2 = fourier.fft3c(v1), fourier.fft3c(v2)
    mean = 0.5 * (f1 + f2)
    return (fourier.ifft3c(low * mean + (1 - low) * f1).real.numpy(),
            fourier.ifft3c(low * mean + (1 - low) * f2).real.numpy())


def refinement_mask(box, pixel_size_A, diameter_A, mask=None):
    """The user's mask (N, N, N) or a soft sphere of ``diameter_A`` with a 3 px cosine edge."""
    if mask is not None:
        return torch.as_tensor(mask, dtype=torch.float32)
    radius = min(box / 2 - 1, diameter_A / (2 * pixel_size_A))
    return spherical_mask(box, radius_px=max(1.0, radius - 3.0), edge_px=3.0)


# ------------------------------------------------------------------------------------------ alignment
class LocalReference:
    """What :func:`.query.align` needs for a local search, without a faiss index: the projector of the
    reference, the band up to ``max_resolution_A`` and the sampling steps."""

    def __init__(self, volume, pixel_size_A, max_resolution_A, angular_step_deg, shift_step_px, max_shift_px,
                 symmetry, sqrt_weights=None, device="cpu"):
        box = volume.shape[-1]
        self.projector = Projector(volume, device=device)
        self.band = Band(box, pixel_size_A, max_resolution_A)
        self.sqrt_weights = sqrt_weights
        self.manifest = {"pixel_size_A": pixel_size_A, "angular_step_deg": angular_step_deg,
                         "shift_step_px": shift_step_px, "symmetry": symmetry, "max_shift_px": max_shift_px,
                         "normalise": True}


def _random_rotation(angle_deg, rng):
    axis = rng.normal(size=3)
    axis *= math.radians(angle_deg) / np.linalg.norm(axis)
    from .query import axis_angle_matrices
    return axis_angle_matrices(torch.as_tensor(axis[None]))[0]


class RefineParams:
    """Settings of :func:`refine` (see the module docstring for their role).

    Args:
        symmetry: point group, RELION's name and operators (``constants.SYMMETRY_NAMES``).
        initial_resolution_A: the initial reference is low-passed to this (Å); the first iteration aligns to it.
        particle_diameter_A: diameter of the particle (Å) for the angular step and the automatic mask
            (default 0.8 × box × pixel size).
        max_iterations: iterations at most; global_iterations: iterations with a global search.
        local_steps: local search range, ± angular steps; max_shift_px: global origin search range, ± px.
        join_resolution_A: the halves share their Fourier components below this (Å).
        repetitions: 1, or 2 for the repetition consensus.
        n_ctf_groups: CTF groups of the global index; k: candidates refined per particle; nprobe: faiss probes.
        whiten: weight frequencies by the inverse noise power of the particles.
        flat_index_GB: galleries whose raw vectors fit in this many GB get an exact ``Flat`` index (no
            training, exhaustive search: faster than training a compressed index for the small galleries
            of the first, low-resolution iteration); larger ones get SwiftAlign's compressed default.
        seed: seed of the half split (when rlnRandomSubset is absent) and of the perturbations.
        device: 'cpu' or 'cuda[:i]'; batch_size: particles per reconstruction batch.
    """

    def __init__(self, symmetry="C1", initial_resolution_A=30.0, particle_diameter_A=None, max_iterations=12,
                 global_iterations=1, local_steps=2, max_shift_px=None, join_resolution_A=40.0, repetitions=1,
                 n_ctf_groups=4, k=3, nprobe=32, whiten=False, seed=0, device="cpu", batch_size=256,
                 memory_limit_GB=4.0, flat_index_GB=1.0):
        self.symmetry = symmetry
        self.initial_resolution_A = float(initial_resolution_A)
        self.particle_diameter_A = particle_diameter_A
        self.max_iterations = int(max_iterations)
        self.global_iterations = int(global_iterations)
        self.local_steps = int(local_steps)
        self.max_shift_px = max_shift_px
        self.join_resolution_A = float(join_resolution_A)
        self.repetitions = int(repetitions)
        self.n_ctf_groups = int(n_ctf_groups)
        self.k = int(k)
        self.nprobe = int(nprobe)
        self.whiten = bool(whiten)
        self.seed = int(seed)
        self.device = device
        self.batch_size = int(batch_size)
        self.memory_limit_GB = float(memory_limit_GB)
        self.flat_index_GB = float(flat_index_GB)

    def check(self, box, pixel_size_A):
        """Raise InputError on values that cannot work for particles of ``box`` px at ``pixel_size_A``."""
        try:
            symmetry_matrices(self.symmetry)
        except ValueError as exc:
            raise InputError(str(exc))
        nyquist = 2 * pixel_size_A
        if self.initial_resolution_A < nyquist:
            raise InputError("initial resolution %.3g Å is beyond Nyquist (%.3g Å)" % (self.initial_resolution_A,
                                                                                        nyquist))
        if self.particle_diameter_A is not None and not 0 < self.particle_diameter_A <= box * pixel_size_A * 1.5:
            raise InputError("particle diameter %.4g Å must be in (0, %.4g] Å for a %d px box at %.4g Å/px"
                                % (self.particle_diameter_A, 1.5 * box * pixel_size_A, box, pixel_size_A))
        if self.max_iterations < 1 or self.global_iterations < 0:
            raise InputError("max iterations must be >= 1 and global iterations >= 0")
        if self.local_steps < 1:
            raise InputError("local steps must be >= 1")
        if self.repetitions not in (1, 2):
            raise InputError("repetitions must be 1 or 2, got %d" % self.repetitions)
        if self.max_shift_px is not None and self.max_shift_px < 0:
            raise InputError("max shift must be >= 0 px")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError("device %s requested but CUDA is not available" % self.device)

    def as_dict(self):
        return dict(vars(self))


def _max_shift_px(params, box):
    return params.max_shift_px if params.max_shift_px is not None else max(1.0, round(0.1 * box))


def _align_global(reference, star, res_A, step_deg, sstep_px, params, rotation, work_dir, log):
    """Align ``star`` to ``reference`` (N, N, N) at resolution ``res_A`` through a SwiftAlign index of it;
    returns the :func:`.query.align` dict."""
    px = star.pixel_size_A
    box = star.box_size
    max_shift = _max_shift_px(params, box)
    ref_path = os.path.join(work_dir, "reference.mrc")
    write_mrc(ref_path, reference, px)
    index_dir = os.path.join(work_dir, "index")
    n_refs = (len(gallery_poses(step_deg, params.symmetry)) * params.n_ctf_groups
              * len(shift_grid(max_shift, sstep_px)))
    flat = n_refs * Band(box, px, res_A).dim * 4 <= params.flat_index_GB * 1e9
    swindex.train(ref_path, star, index_dir, angular_step_deg=step_deg, max_resolution_A=res_A,
                  index_factory="Flat" if flat else None,
                  max_shift_px=max_shift, shift_step_px=sstep_px, n_ctf_groups=params.n_ctf_groups,
                  symmetry=params.symmetry, whiten=params.whiten, memory_limit_GB=params.memory_limit_GB,
                  grid_rotation=None if rotation is None else rotation.numpy(), devices=[params.device])
    bundle = swindex.load(index_dir, params.device)
    out = align(bundle, star, k=params.k, nprobe=params.nprobe, memory_limit_GB=params.memory_limit_GB,
                devices=[params.device])
    shutil.rmtree(index_dir, ignore_errors=True)
    return out


def _align_local(reference, star, res_A, step_deg, sstep_px, params, prior, rotation):
    """Align ``star`` to ``reference`` (N, N, N) at resolution ``res_A`` around the prior poses
    ``(angles_deg, origins_A)``, scored exactly; returns the :func:`.query.align` dict."""
    px = star.pixel_size_A
    box = star.box_size
    max_shift = _max_shift_px(params, box)
    angles, origins_A = prior
    if rotation is not None:
        angles = matrix_to_euler(euler_to_matrix(torch.as_tensor(angles)) @ rotation).numpy()
    sqrt_w = None
    band = Band(box, px, res_A)
    if params.whiten:
        sqrt_w = torch.sqrt(swindex.particle_noise_weights(band, star))
    ref = LocalReference(reference, px, res_A, step_deg, sstep_px, max_shift, params.symmetry, sqrt_w, params.device)
    return align(ref, star, k=1, local=True, prior_angles_deg=angles, prior_origins_A=origins_A,
                 local_steps=params.local_steps, local_shift_px=min(max_shift, 2 * sstep_px),
                 memory_limit_GB=params.memory_limit_GB, passes=1, refine_far=False)


def _align_class(reference, sub, is_global, prior, alternatives, res_A, step_deg, sstep_px, params, rng, work_dir,
                 log):
    """Align the particles ``sub`` of one half to one class's ``reference``: ``params.repetitions`` searches (the
    second on a grid rotated by half a step, drawn from ``rng``), the better score per particle kept and the
    two searches' agreement recorded; a local iteration also tries the runner-up poses ``alternatives``."""
    reps = []
    for r in range(params.repetitions):
        rotation = _random_rotation(0.5 * step_deg, rng).to(torch.float64) if r == 1 else None
        if is_global:
            reps.append(_align_global(reference, sub, res_A, step_deg, sstep_px, params, rotation, work_dir, log))
        else:
            reps.append(_align_local(reference, sub, res_A, step_deg, sstep_px, params, prior, rotation))
    best = reps[0]
    if len(reps) == 2:
        d = pose_distance_deg(torch.as_tensor(reps[0]["angles_deg"]), torch.as_tensor(reps[1]["angles_deg"]),
                              params.symmetry).numpy()
        second = reps[1]["score"] > reps[0]["score"]
        best = {key: np.where(second.reshape((-1,) + (1,) * (v.ndim - 1)), reps[1][key], v)
                for key, v in reps[0].items()}
        best["agree"] = d <= step_deg
    if alternatives is not None and not is_global:
        best = _better_of(best, prior[0], alternatives, reference, sub, res_A, step_deg, sstep_px, params, log)
    return best


# ------------------------------------------------------------------------------------------ files
def _name(output_dir, iteration, n_classes, cls, what):
    prefix = "" if iteration is None else "it%03d_" % iteration
    cpart = "" if n_classes == 1 else "class%03d_" % (cls + 1)
    return os.path.join(output_dir, prefix + cpart + what)


def _write_json(path, data):
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)


def _copy(src, dst):
    with atomic_output(dst) as tmp:
        shutil.copyfile(src, tmp)


def _remove(path):
    if os.path.exists(path):
        os.remove(path)


def _model(history, params, n_classes):
    """What ``it###_model.json`` and ``model.json`` hold: the last iteration's record (``history[-1]``), the
    whole ``history``, the settings and the number of classes."""
    return dict(history[-1], history=history, params=params.as_dict(), n_classes=n_classes)


def _finished_model(path, last):
    """The final model ``path`` when it exists and belongs to iteration ``last`` (so the final outputs beside
    it are complete), else None."""
    try:
        with open(path) as f:
            model = json.load(f)
    except (FileNotFoundError, ValueError):
        return None
    complete = model.get("iteration") == last and "history" in model and "final_resolution_A" in model
    return model if complete else None


def last_completed_iteration(output_dir):
    """The highest iteration with an ``it###_model.json`` in ``output_dir`` (0 when none)."""
    done = [int(m.group(1)) for p in glob.glob(os.path.join(output_dir, "it[0-9][0-9][0-9]_model.json"))
            for m in [re.match(r"it(\d{3})_model\.json$", os.path.basename(p))] if m]
    return max(done) if done else 0


# ------------------------------------------------------------------------------------------ the loop
def _reconstruct(star, halves, classes, keep, n_classes, params):
    """Half-map reconstructors recs[k][h-1] of the kept particles."""
    device = torch.device(params.device)
    box = star.box_size
    recs = [[Reconstructor(box, symmetry=params.symmetry, device=device) for _ in range(2)]
            for _ in range(n_classes)]
    labels = np.where(keep, 2 * classes + halves - 1, -1)
    with star.open_images() as stack:
        insert_particles(star, stack, labels, {2 * k + h - 1: recs[k][h - 1] for k in range(n_classes) for h in (1, 2)},
                         params.batch_size, device)
    return recs


def _posterior_reconstruct(star, halves, classes, keep, refs, resolution_A, diameter_A, n_classes, params):
    """Half-map reconstructors recs[k][h-1] with each kept particle inserted at every pose of its tempered
    posterior (:func:`.query.pose_posterior`: 33 rotations within ±2 half angular steps and the best origin
    within ±half a shift step), scored against its own half's reference ``refs[k][h-1]``."""
    device = torch.device(params.device)
    box, px = star.box_size, star.pixel_size_A
    res_A = max(resolution_A, 2 * px)
    step, sstep = 0.5 * angular_step_for_diameter(res_A, diameter_A), 0.5 * shift_step_for_resolution(res_A, px)
    band = Band(box, px, res_A)
    projectors = [[Projector(refs[k][h], device=device) for h in range(2)] for k in range(n_classes)]
    recs = [[Reconstructor(box, symmetry=params.symmetry, device=device) for _ in range(2)]
            for _ in range(n_classes)]
    ctf_params = star.ctf_params()
    batch = max(1, params.batch_size // 8)            # each particle is inserted at 33 poses
    with star.open_images() as stack:
        for start in range(0, len(star), batch):
            idx = np.arange(start, min(start + batch, len(star)))
            images, rot, origins, ctf = batch_inputs(star, idx, stack, device)
            spectra = fourier.fft2c(images)
            for k in range(n_classes):
                for h in (1, 2):
                    sel = np.nonzero((halves[idx] == h) & (classes[idx] == k) & keep[idx])[0]
                    if len(sel) == 0:
                        continue
                    parts = ParticleBatch(band, images[sel].cpu(), {key: v[idx[sel]] for key, v in ctf_params.items()})
                    q_rot, q_org, weight = pose_posterior(projectors[k][h - 1], band, parts, rot[sel].cpu(),
                                                          origins[sel].cpu(), step, sstep)
                    b, q = weight.shape
                    w = weight.to(device).reshape(b * q, 1, 1)
                    ramps = fourier.phase_shift_2d(box, q_org.to(device).reshape(b * q, 2), device=device)
                    data = (spectra[sel] * ctf[sel]).repeat_interleave(q, dim=0) * ramps * w
                    recs[k][h - 1].insert(data, (ctf[sel] ** 2).repeat_interleave(q, dim=0) * w,
                                          q_rot.to(device).reshape(b * q, 3, 3))
    return recs


def refine_3d(particles, references, output_dir, params=None, mask=None, resume=False, log=print):
    """Run the refinement (module docstring). Returns the final model dict.

    Args:
        particles: particle STAR path (or :class:`~deepcryo.core.particles.ParticleStar`) with CTF columns.
        references: initial map path(s) (MRC), same box and pixel size; several → multi-reference refinement.
        output_dir: folder for every output.
        params: :class:`RefineParams`.
        mask: optional MRC path of a mask (values 0–1) for FSC and references.
        resume: continue after the last completed iteration found in ``output_dir``; a finished run (complete
            ``model.json``) is left as it is.
    """
    params = params or RefineParams()
    star = read_particles(particles) if isinstance(particles, str) else particles
    references = [references] if isinstance(references, str) else list(references)
    if len(star) < 4:
        raise InputError("refinement needs at least 4 particles, got %d" % len(star))
    star.require("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
    px, box = star.pixel_size_A, star.box_size
    params.check(box, px)
    maps = []
    for path in references:
        vol, vpx = read_mrc(path)
        if vol.ndim != 3 or set(vol.shape) != {box}:
            raise InputError("%s: reference shape %s does not match the %d px particles" % (path, vol.shape, box))
        if abs(vpx - px) > 1e-3 * px:
            raise InputError("%s: pixel size %.4f Å/px differs from the particles' %.4f Å/px" % (path, vpx, px))
        maps.append(vol)
    mask_vol = None
    if mask:
        mask_vol, mpx = read_mrc(mask)
        if mask_vol.shape != (box,) * 3:
            raise InputError("%s: mask shape %s does not match the %d px particles" % (mask, mask_vol.shape, box))
        if mask_vol.min() < -1e-3 or mask_vol.max() > 1 + 1e-3 or mask_vol.max() <= 0:
            raise InputError("%s: a mask must have values in [0, 1] and not be empty" % mask)
    diameter = params.particle_diameter_A or 0.8 * box * px
    mask_t = refinement_mask(box, px, diameter, mask_vol)
    n_classes = len(maps)
    os.makedirs(output_dir, exist_ok=True)
    work_dir = os.path.join(output_dir, "work")
    os.makedirs(work_dir, exist_ok=True)
    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)

    halves = half_split(star, params.seed)
    n = len(star)
    classes = np.zeros(n, dtype=np.int64)
    angles, origins = (star.angles_deg(), star.origins_A()) if star.has_poses() else (np.zeros((n, 3)), np.zeros((n, 2)))
    keep = np.ones(n, dtype=bool)
    score = np.zeros(n)
    alternatives = None    # runner-up (angles, origins) of the last global iteration, for the next local one
    refs = [[fourier.lowpass_volume(torch.as_tensor(m), params.initial_resolution_A, px).numpy() * mask_t.numpy()
             for _ in range(2)] for m in maps]
    resolution = params.initial_resolution_A
    history, start = [], 1
    if resume:
        remove_stale_parts_in(output_dir)  # temporaries of a run killed while writing
        start = last_completed_iteration(output_dir) + 1
        if start > 1:
            it = start - 1
            with open(os.path.join(output_dir, "it%03d_model.json" % it)) as f:
                model = json.load(f)
            history = model["history"]
            prev = read_particles(os.path.join(output_dir, "it%03d_particles.star" % it))
            if len(prev) != n:
                raise InputError("cannot continue: %s has %d particles, the input %d"
                                    % (output_dir, len(prev), n))
            angles, origins = prev.angles_deg(), prev.origins_A()
            halves = np.asarray(prev.particles["rlnRandomSubset"], dtype=np.int64)
            classes = np.asarray(prev.particles["rlnClassNumber"], dtype=np.int64) - 1
            keep = np.asarray(prev.particles["dcSwiftKept"], dtype=bool)
            score = np.asarray(prev.particles["dcSwiftScore"], dtype=np.float64)
            alternatives = _read_alternatives(prev)
            if "random_state" in model:         # the draws of an uninterrupted run (older files lack it)
                rng.bit_generator.state = model["random_state"]
            resolution = model["resolution_A"]
            refs = [[read_mrc(_name(output_dir, it, n_classes, k, "ref_half%d.mrc" % h))[0] for h in (1, 2)]
                    for k in range(n_classes)]
            log("continuing after iteration %d (resolution %.2f Å)" % (it, resolution))
    model = _model(history, params, n_classes) if history else None
    best_res, stalls = (min(h["resolution_A"] for h in history), history[-1]["stalls"]) if history else (math.inf, 0)
    converged = bool(history and history[-1].get("converged"))
    iteration = start
    final_path = os.path.join(output_dir, "model.json")
    if iteration <= params.max_iterations and not converged:
        _remove(final_path)                # the final outputs, if any, are those of an earlier iteration
    elif model is not None:
        finished = _finished_model(final_path, model["iteration"])
        if finished is not None:
            shutil.rmtree(work_dir, ignore_errors=True)
            log("%s: finished after iteration %d, nothing to do" % (output_dir, model["iteration"]))
            return finished
    while iteration <= params.max_iterations and not converged:
        t0, cpu0 = time.time(), time.process_time()
        is_global = iteration <= params.global_iterations or (iteration == 1 and not star.has_poses())
        res_align = max(resolution, 2 * px)
        step = angular_step_for_diameter(res_align, diameter)
        sstep = shift_step_for_resolution(res_align, px)
        new_angles, new_origins, new_score = angles.copy(), origins.copy(), np.full(n, -np.inf)
        new_classes = classes.copy()
        agree = np.ones(n, dtype=bool)
        alt_angles, alt_origins = new_angles.copy(), new_origins.copy()
        for h in (1, 2):
            sel = np.nonzero(halves == h)[0]
            sub = star.subset(sel)
            per_class = []
            for k in range(n_classes):
                per_class.append(_align_class(
                    refs[k][h - 1], sub, is_global, (angles[sel], origins[sel]),
                    None if alternatives is None else (alternatives[0][sel], alternatives[1][sel]),
                    res_align, step, sstep, params, rng, work_dir, log))
            scores = np.stack([c["score"] for c in per_class])
            win = scores.argmax(0)
            ar = np.arange(len(sel))
            new_classes[sel] = win
            new_angles[sel] = np.stack([c["angles_deg"] for c in per_class])[win, ar]
            new_origins[sel] = np.stack([c["origins_A"] for c in per_class])[win, ar]
            new_score[sel] = scores[win, ar]
            if is_global:
                alt_angles[sel] = np.stack([c["alt_angles_deg"] for c in per_class])[win, ar]
                alt_origins[sel] = np.stack([c["alt_origins_A"] for c in per_class])[win, ar]
            if params.repetitions == 2:
                agree[sel] = np.stack([c["agree"] for c in per_class])[win, ar]
        change = pose_distance_deg(torch.as_tensor(angles), torch.as_tensor(new_angles), params.symmetry).numpy()
        shift_change = np.linalg.norm(new_origins - origins, axis=1)
        angles, origins, score, classes, keep = new_angles, new_origins, new_score, new_classes, agree
        alternatives = (alt_angles, alt_origins) if is_global else None
        t_align = time.time() - t0
        recs = _reconstruct(_with_poses(star, angles, origins), halves, classes, keep, n_classes, params)
        curves, half_maps, res_k = [], [], []
        for k in range(n_classes):
            if min(recs[k][0].count, recs[k][1].count) == 0:
                log("class %d has no particles in one half: its reference is kept" % (k + 1))
                half_maps.append(refs[k])
                curves.append(np.zeros(box // 2 + 1))
                res_k.append(math.inf)
                continue
            h1, h2 = recs[k][0].reconstruct(), recs[k][1].reconstruct()
            curve = masked_fsc(h1, h2, mask_t.numpy(), seed=params.seed + iteration).corrected
            curves.append(curve)
            half_maps.append((h1, h2))
            res_k.append(fsc_resolution_A(curve, px, 0.143))
        finite = [r for r in res_k if math.isfinite(r)]
        new_resolution = max(2 * px, float(np.mean(finite))) if finite else resolution
        # references for the next iteration
        new_refs = []
        for k in range(n_classes):
            if not math.isfinite(res_k[k]):
                new_refs.append(refs[k])
                continue
            filt = reference_filter(curves[k], res_k[k], box, px)
            ssnr = fsc_to_half_ssnr(curves[k])
            f1 = _apply_shell_filter(recs[k][0].reconstruct(ssnr=ssnr), filt).numpy()
            f2 = _apply_shell_filter(recs[k][1].reconstruct(ssnr=ssnr), filt).numpy()
            j1, j2 = join_halves(f1, f2, params.join_resolution_A, px)
            new_refs.append([j1 * mask_t.numpy(), j2 * mask_t.numpy()])
        refs = new_refs
        improved = new_resolution < best_res * 0.99
        best_res = min(best_res, new_resolution)
        stalls = 0 if improved else stalls + 1
        median_change = float(np.median(change))
        converged = (not is_global and stalls >= 2 and median_change < step)
        resolution = new_resolution
        entry = {"iteration": iteration, "mode": "global" if is_global else "local", "align_resolution_A": res_align,
                 "angular_step_deg": step, "shift_step_px": sstep, "resolution_A": new_resolution,
                 "class_resolution_A": [float(r) for r in res_k], "median_angle_change_deg": median_change,
                 "mean_shift_change_A": float(np.mean(shift_change)), "fraction_kept": float(keep.mean()),
                 "class_fractions": [float(np.mean(classes == k)) for k in range(n_classes)],
                 "mean_score": float(np.mean(score)), "stalls": stalls, "converged": converged,
                 "align_seconds": t_align, "seconds": time.time() - t0, "cpu_seconds": time.process_time() - cpu0}
        history.append(entry)
        out_star = _output_star(star, angles, origins, halves, classes, score, keep, alternatives)
        for k in range(n_classes):
            write_mrc(_name(output_dir, iteration, n_classes, k, "half1.mrc"), half_maps[k][0], px)
            write_mrc(_name(output_dir, iteration, n_classes, k, "half2.mrc"), half_maps[k][1], px)
            write_mrc(_name(output_dir, iteration, n_classes, k, "ref_half1.mrc"), refs[k][0], px)
            write_mrc(_name(output_dir, iteration, n_classes, k, "ref_half2.mrc"), refs[k][1], px)
            write_fsc_star(_name(output_dir, iteration, n_classes, k, "fsc.star"), curves[k], box, px)
        write_particles(os.path.join(output_dir, "it%03d_particles.star" % iteration), out_star)
        model = _model(history, params, n_classes)
        _write_json(os.path.join(output_dir, "it%03d_model.json" % iteration),
                    dict(model, random_state=rng.bit_generator.state))
        log("iteration %d (%s): align %.2f Å, step %.2f°, shift step %.2f px -> resolution %.2f Å; "
            "median pose change %.2f°, kept %.1f%%, %.1f s"
            % (iteration, entry["mode"], res_align, step, sstep, new_resolution, median_change,
               100 * keep.mean(), entry["seconds"]))
        iteration += 1
    if model is None:
        raise InputError("%s: nothing to continue from and no iteration to run" % output_dir)
    last = model["iteration"]
    # final outputs: the last particles; both halves reconstructed with pose posteriors, their FSC, the map
    final_star = read_particles(os.path.join(output_dir, "it%03d_particles.star" % last))
    final_halves = np.asarray(final_star.particles["rlnRandomSubset"])
    final_classes = np.asarray(final_star.particles["rlnClassNumber"]) - 1
    final_keep = np.asarray(final_star.particles["dcSwiftKept"], dtype=bool)
    t0 = time.time()
    recs = _posterior_reconstruct(final_star, final_halves, final_classes, final_keep, refs, model["resolution_A"],
                                  diameter, n_classes, params)
    final_res = []
    for k in range(n_classes):
        if min(recs[k][0].count, recs[k][1].count) == 0:
            final_res.append(math.inf)
            for name in ("half1.mrc", "half2.mrc", "fsc.star"):
                _copy(_name(output_dir, last, n_classes, k, name), _name(output_dir, None, n_classes, k, name))
        else:
            h1, h2 = recs[k][0].reconstruct(), recs[k][1].reconstruct()
            curve = masked_fsc(h1, h2, mask_t.numpy(), seed=params.seed + last + 1).corrected
            final_res.append(fsc_resolution_A(curve, px, 0.143))
            write_mrc(_name(output_dir, None, n_classes, k, "half1.mrc"), h1, px)
            write_mrc(_name(output_dir, None, n_classes, k, "half2.mrc"), h2, px)
            write_fsc_star(_name(output_dir, None, n_classes, k, "fsc.star"), curve, box, px)
        total = Reconstructor(box, symmetry=params.symmetry, device=torch.device(params.device))
        total.add(recs[k][0])
        total.add(recs[k][1])
        write_mrc(_name(output_dir, None, n_classes, k, "map.mrc"), total.reconstruct(), px)
    finite = [r for r in final_res if math.isfinite(r)]
    model = dict(model, final_resolution_A=float(np.mean(finite)) if finite else model["resolution_A"],
                 final_class_resolution_A=[float(r) for r in final_res], final_seconds=time.time() - t0)
    _copy(os.path.join(output_dir, "it%03d_particles.star" % last), os.path.join(output_dir, "particles.star"))
    _write_json(final_path, model)                         # last: it marks the final outputs as complete
    shutil.rmtree(work_dir, ignore_errors=True)
    log("final: %d iterations (%s); pose-weighted half maps: resolution %.2f Å (FSC 0.143; the last iteration's "
        "best poses alone: %.2f Å), %.1f s"
        % (last, "converged" if model["converged"] else "stopped at the iteration limit",
           model["final_resolution_A"], model["resolution_A"], model["final_seconds"]))
    return model


# The name commands/refine.py imports until its call site follows the rename (at merge).
refine = refine_3d


def _with_poses(star, angles, origins):
    out = star.copy()
    out.set_poses(angles, origins)
    return out


ALT_COLUMNS = ("dcSwiftAltAngleRot", "dcSwiftAltAngleTilt", "dcSwiftAltAnglePsi", "dcSwiftAltOriginXAngst",
               "dcSwiftAltOriginYAngst")


def _output_star(star, angles, origins, halves, classes, score, keep, alternatives=None):
    """Particles with the iteration's poses and columns; after a global iteration also the runner-up poses
    (``dcSwiftAlt*``, read back by ``resume``)."""
    out = _with_poses(star, angles, origins)
    out.particles["rlnRandomSubset"] = halves.astype(np.int64)
    out.particles["rlnClassNumber"] = (classes + 1).astype(np.int64)
    out.particles["dcSwiftScore"] = np.asarray(score, dtype=np.float64)
    out.particles["dcSwiftKept"] = keep.astype(np.int64)
    if alternatives is not None:
        for name, column in zip(ALT_COLUMNS, np.concatenate(alternatives, axis=1).T):
            out.particles[name] = column
    return out


def _read_alternatives(star):
    """The runner-up (angles (N, 3), origins Å (N, 2)) written by :func:`_output_star`, or None."""
    if not all(c in star.particles for c in ALT_COLUMNS):
        return None
    values = np.stack([np.asarray(star.particles[c], dtype=np.float64) for c in ALT_COLUMNS], axis=1)
    return values[:, :3], values[:, 3:]


def _better_of(result, prior_angles, alternatives, reference, sub, res_A, step_deg, sstep_px, params, log):
    """``result`` (a local :func:`.query.align` dict over the particles ``sub`` from ``prior_angles``) with each
    particle whose runner-up pose (``alternatives``: angles (M, 3), origins Å (M, 2)) differs from its prior
    by more than one step searched locally from the runner-up too, the better-scoring pose kept."""
    alt_angles, alt_origins = alternatives
    differ = pose_distance_deg(torch.as_tensor(prior_angles), torch.as_tensor(alt_angles),
                               params.symmetry).numpy() > step_deg
    rows = np.nonzero(differ)[0]
    if len(rows) == 0:
        return result
    second = _align_local(reference, sub.subset(rows), res_A, step_deg, sstep_px, params,
                          (alt_angles[rows], alt_origins[rows]), None)
    better = second["score"] > result["score"][rows]
    merged = {key: value.copy() for key, value in result.items()}
    for key, value in second.items():
        merged[key][rows[better]] = value[better]
    log("runner-up poses searched for %d particles, %d of them better" % (len(rows), int(better.sum())))
    return merged
