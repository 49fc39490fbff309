"""SwiftRes: iterative gold-standard 3D refinement driven by SwiftAlign (Lauzirika's "swiftres" loop).

Each iteration (:func:`refine_3d`) runs ``align_global | align_local → reconstruct_halves →
update_references → check_convergence`` over a :class:`RefineState`; for each half set h ∈ {1, 2} and each class k
(one class unless several initial maps are given):

1. **Align** the half's particles against that half's reference only (gold standard):

   * *global* iterations (the first ``global_iterations``): a SwiftAlign index of the reference at the
     current angular and shift steps (:func:`.index.train`, faiss), searched and re-ranked
     exactly with each particle's own CTF, then refined by pattern search (:func:`.query.align`, two passes
     per level);
   * *local* iterations: every pose within ±``local_steps`` angular steps and ±2 shift steps of the
     previous one, scored exactly (no index needed), the best one refined by pattern search (one pass
     per level: cheaper than the global mode's two passes, for nearly the same accuracy).

   SwiftRes does not use the query program's parabola vertex (``newton=False``): on the demo's two-state set its
   two-class pass then gave a lower landscape ARI than with the pattern search (one rendering;
   ``benchmarks/RESULTS.md``), and its figures and tests were measured with the pattern search.

   With several classes each particle takes the class whose reference it matches best.

   **Two hypotheses across the switch to local searches.** A global search at low resolution cannot
   tell a pose from its mate under a pseudo-symmetry of the particle: some particles take a pose 150–180°
   off in the coarse global iteration, and no local iteration can leave it. RELION avoids this by
   searching globally until its sampling is fine (most of its time); here each global iteration also keeps
   each particle's runner-up, the best refined candidate more than two angular steps from the winner
   (:func:`.query.select_and_refine`), and the next iteration runs its local search from both and keeps the
   better-scoring result, at that iteration's much finer reference, where the runner-up of a wrong winner
   usually lies near the truth.
2. **Reconstruct** both halves (:class:`deepcryo.core.reconstruct.Reconstructor`, CTF-weighted), compute
   their FSC inside the refinement mask, corrected for the mask by phase randomisation as relion_postprocess
   does (:func:`deepcryo.core.fsc.masked_fsc`; a tight mask alone makes the FSC, and so the steps, the filter
   and the stopping, optimistic), and the resolution at FSC 0.143 as RELION reports it (the last shell
   above 0.143, :func:`deepcryo.core.fsc.fsc_resolution_A`). This corrected FSC is the one used below and
   written to ``fsc.star``.
3. **New references** (:func:`.references.next_references`): each half map reconstructed again with RELION's
   Wiener term, weighted by Rosenthal & Henderson's C_ref, cut at the resolution, its Fourier components
   below ``join_resolution_A`` (40 Å) averaged with the other half's (RELION's ``--low_resol_join_halves``)
   and masked.
4. **Next sampling** from the resolution r (Å) and the particle diameter D (Å) (:mod:`.sampling`):

   * angular step ``asin(r / D)``. A rotation by θ moves the particle's edge by ``D·θ/2``; at θ = r/D that is
     half a resolution element, the width of the correlation peak at resolution r, so a grid this fine
     puts every particle in its peak's basin (the particle, not the box, rotates, so D and not N·px). The
     pattern search of :func:`.query.refine_best` then halves the step five times (to step/32), so the grid
     does not limit the accuracy;
   * shift step ``r / (4·px)`` (≥ 0.5 px): a shift of r/4 turns the phase at the band edge by 90°; the
     pattern search refines it to step/32 as well.

Optional **repetition consensus** (the seed's idea, ``repetitions=2``): each half is aligned twice, with
galleries rotated rigidly by two different random rotations (global) or priors moved by half a step
about a random axis (local); particles whose two poses differ by more than one angular step are left out
of that iteration's reconstruction (kept in the set, realigned next iteration). The better-scoring pose
is kept.

**Convergence**: stop after the first local iteration at which the resolution has not improved by 1 % for
two iterations and the median pose change is below the angular step, or at ``max_iterations``.

**Final maps with pose posteriors.** At low SNR a particle's pose is uncertain by about the median error,
and inserting it at one pose throws that uncertainty away; RELION marginalises over it in every iteration.
Once, after the last iteration, each half is reconstructed again with every kept particle inserted at the
33 poses within ±2 half angular steps of its final pose (each with its best origin within ± half a shift
step), weighted by a tempered posterior against its own half's latest reference
(:func:`.query.pose_posterior`), at those of its poses that hold 99.9 % of the weight
(:func:`.query.significant_poses`, as RELION inserts only its significant poses); this improves both the
half-map FSC and the map against the truth. ``half1.mrc``, ``half2.mrc``, their FSC (``fsc.star``) and ``map.mrc`` (both
halves' data together) are these reconstructions; the per-iteration files keep the best poses only.
``model.json`` gives both resolutions (``resolution_A``: the last iteration's; ``final_resolution_A``: the
final maps'). Measured figures: ``benchmarks/RESULTS.md``.

**Files** in ``output_dir``: see :mod:`.layout` (``it###_*`` per iteration, ``it###_model.json`` written
last; ``map.mrc`` … ``model.json`` at the end). ``it###_model.json`` also holds the state of the random
generator of the perturbations (``random_state``), so a run killed at any point and resumed gives the result
of an uninterrupted run; ``resume`` after the last iteration redoes the final pass unless it finds a complete
``model.json``, and removes it before running further iterations.

Three records, three names: a *history entry* (one iteration's figures), the *iteration record* written to
``it###_model.json`` (the last entry, the whole history, the settings, the number of classes) and the *final
record* written to ``model.json`` and returned (the iteration record plus the final resolution).

Particles are written with rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst, rlnRandomSubset (1/2), rlnClassNumber
(1-based), dcSwiftScore and dcSwiftKept (1 if used in the last reconstruction).
"""
import dataclasses
import logging
import math
import os
import shutil
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from deepcryo.constants import DEFAULT_DIAMETER_BOX_FRACTION
from deepcryo.core.errors import InputError
from deepcryo.core.files import remove_stale_parts_in
from deepcryo.core.fsc import fsc_resolution_A, masked_fsc
from deepcryo.core.geometry import (axis_angle_matrices, euler_to_matrix, matrix_to_euler, pose_distance_deg,
                                     symmetry_matrices)
from deepcryo.core.mrc import write_mrc
from deepcryo.core.particles import ParticleStar, read_particles
from deepcryo.core.projector import Projector
from deepcryo.core.reconstruct import Reconstructor, batch_inputs, half_split, insert_particles
from deepcryo.core.star import as_written

from . import index as swindex
from .features import Band
from .gallery import gallery_poses
from .layout import RefineLayout
from .query import ParticleBatch, align, pose_posterior, significant_poses
from .references import initial_references, next_references, read_mask, read_references, refinement_mask
from .sampling import angular_step_for_diameter, shift_step_for_resolution
from .target import AlignTarget

__all__ = ["RefineParams", "RefineState", "refine_3d", "LocalReference"]

logger = logging.getLogger(__name__)

#: Galleries whose raw vectors fit in this many GB get an exact ``Flat`` index (no training, exhaustive search:
#: faster than training a compressed index for the small galleries of the first, low-resolution iteration);
#: larger ones get SwiftAlign's compressed default.
FLAT_INDEX_GB = 1.0


# ------------------------------------------------------------------------------------------ alignment
class LocalReference(AlignTarget):
    """The :class:`.target.AlignTarget` of a local search, without a faiss index: the projector of the
    reference, the band up to ``max_resolution_A`` and the sampling steps."""

    def __init__(self, volume: np.ndarray, pixel_size_A: float, max_resolution_A: float, angular_step_deg: float,
                 shift_step_px: float, max_shift_px: float, symmetry: str, sqrt_weights: Optional[torch.Tensor] = None,
                 device: str = "cpu"):
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
    return axis_angle_matrices(torch.as_tensor(axis[None]))[0]


class RefineParams:
    """Settings of :func:`refine_3d` (see the module docstring for their role).

    Args:
        symmetry: point group, RELION's name and operators (``constants.SYMMETRY_NAMES``).
        initial_resolution_A: the initial reference is low-passed to this (Å); the first iteration aligns to it.
        particle_diameter_A: diameter of the particle (Å) for the angular step and the automatic mask
            (default 0.8 × box × pixel size).
        max_iterations: iterations at most; global_iterations: iterations with a global search.
        local_steps: local search range, ± angular steps; max_shift_px: global origin search range, ± px.
        join_resolution_A: the halves share their Fourier components below this (Å).
        repetitions: 1, or 2 for the repetition consensus.
        k: candidates refined per particle; nprobe: faiss probes.
        whiten: weight frequencies by the inverse noise power of the particles.
        memory_limit_GB: bound of the global iterations' index build and search.
        seed: seed of the half split (when rlnRandomSubset is absent) and of the perturbations.
        device: 'cpu' or 'cuda[:i]'; batch_size: particles per reconstruction batch.
    """

    def __init__(self, symmetry="C1", initial_resolution_A=30.0, particle_diameter_A=None, max_iterations=12,
                 global_iterations=1, local_steps=2, max_shift_px=None, join_resolution_A=40.0, repetitions=1, k=3, nprobe=32, whiten=False, seed=0, device="cpu", batch_size=256,
                 memory_limit_GB=4.0):
        self.symmetry = symmetry
        self.initial_resolution_A = float(initial_resolution_A)
        self.particle_diameter_A = particle_diameter_A
        self.max_iterations = int(max_iterations)
        self.global_iterations = int(global_iterations)
        self.local_steps = int(local_steps)
        self.max_shift_px = max_shift_px
        self.join_resolution_A = float(join_resolution_A)
        self.repetitions = int(repetitions)
        self.k = int(k)
        self.nprobe = int(nprobe)
        self.whiten = bool(whiten)
        self.seed = int(seed)
        self.device = device
        self.batch_size = int(batch_size)
        self.memory_limit_GB = float(memory_limit_GB)

    def check(self, box: int, pixel_size_A: float) -> None:
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

    def as_dict(self) -> Dict[str, Any]:
        return dict(vars(self))


def _max_shift_px(params, box):
    return params.max_shift_px if params.max_shift_px is not None else max(1.0, round(0.1 * box))


def _align_global(reference, star, res_A, step_deg, sstep_px, params, rotation, work_dir):
    """Align ``star`` to ``reference`` (N, N, N) at resolution ``res_A`` through a SwiftAlign index of it;
    returns the :func:`.query.align` dict."""
    px = star.pixel_size_A
    box = star.box_size
    max_shift = _max_shift_px(params, box)
    ref_path = os.path.join(work_dir, "reference.mrc")
    write_mrc(ref_path, reference, px)
    index_dir = os.path.join(work_dir, "index")
    flat = len(gallery_poses(step_deg, params.symmetry)) * Band(box, px, res_A).dim * 4 <= FLAT_INDEX_GB * 1e9
    swindex.train(ref_path, star, index_dir, angular_step_deg=step_deg, max_resolution_A=res_A,
                  index_factory="Flat" if flat else None,
                  max_shift_px=max_shift, shift_step_px=sstep_px,
                  symmetry=params.symmetry, whiten=params.whiten, memory_limit_GB=params.memory_limit_GB,
                  grid_rotation=None if rotation is None else rotation.numpy(), devices=[params.device])
    bundle = swindex.load(index_dir, params.device)
    out = align(bundle, star, k=params.k, nprobe=params.nprobe, memory_limit_GB=params.memory_limit_GB,
                devices=[params.device], newton=False)
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
                 memory_limit_GB=params.memory_limit_GB, passes=1, refine_far=False, newton=False)


def _align_class(reference, sub, is_global, prior, alternatives, res_A, step_deg, sstep_px, params, rng,
                 work_dir):
    """Align the particles ``sub`` of one half to one class's ``reference``: ``params.repetitions`` searches (the
    second on a grid rotated by half a step, drawn from ``rng``), the better score per particle kept and the
    two searches' agreement recorded; a local iteration also tries the runner-up poses ``alternatives``."""
    reps = []
    for r in range(params.repetitions):
        rotation = _random_rotation(0.5 * step_deg, rng).to(torch.float64) if r == 1 else None
        if is_global:
            reps.append(_align_global(reference, sub, res_A, step_deg, sstep_px, params, rotation, work_dir))
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
        best = _better_of(best, prior[0], alternatives, reference, sub, res_A, step_deg, sstep_px, params)
    return best


# ------------------------------------------------------------------------------------------ reconstruction
def _reconstruct(star, halves, classes, keep, n_classes, params):
    """Half-map reconstructors recs[k][h-1] of the kept particles."""
    device = torch.device(params.device)
    box = star.box_size
    recs = [[Reconstructor(box, symmetry=params.symmetry, device=device) for _ in range(2)]
            for _ in range(n_classes)]
    labels = np.where(keep, 2 * classes + halves - 1, -1)
    with star.open_images() as stack:
        insert_particles(star, stack, labels, {2 * k + h - 1: recs[k][h - 1] for k in range(n_classes) for h in (1, 2)},
                         params.batch_size)
    return recs


def _posterior_reconstruct(star, halves, classes, keep, refs, resolution_A, diameter_A, n_classes, params):
    """Half-map reconstructors recs[k][h-1] with each kept particle inserted at every pose of its tempered
    posterior (:func:`.query.pose_posterior`: 33 rotations within ±2 half angular steps and the best origin
    within ±half a shift step), scored against its own half's reference ``refs[k][h-1]``, at its significant
    poses (:func:`.query.significant_poses`)."""
    device = torch.device(params.device)
    box, px = star.box_size, star.pixel_size_A
    res_A = max(resolution_A, 2 * px)
    step, sstep = 0.5 * angular_step_for_diameter(res_A, diameter_A), 0.5 * shift_step_for_resolution(res_A, px)
    band = Band(box, px, res_A)
    projectors = [[Projector(refs[k][h], device=device) for h in range(2)] for k in range(n_classes)]
    recs = [[Reconstructor(box, symmetry=params.symmetry, device=device) for _ in range(2)]
            for _ in range(n_classes)]
    ctf_params = star.ctf_params()
    batch = max(1, params.batch_size // 8)            # each particle is scored at 33 poses
    with star.open_images() as stack:
        for start in range(0, len(star), batch):
            idx = np.arange(start, min(start + batch, len(star)))
            images, rot, origins, _ = batch_inputs(star, idx, stack, "cpu", with_ctf=False)
            for k in range(n_classes):
                for h in (1, 2):
                    sel = np.nonzero((halves[idx] == h) & (classes[idx] == k) & keep[idx])[0]
                    if len(sel) == 0:
                        continue
                    rec, rows = recs[k][h - 1], idx[sel]
                    params_sel = {key: v[rows] for key, v in ctf_params.items()}
                    parts = ParticleBatch(band, images[sel], params_sel)
                    q_rot, q_org, weight = pose_posterior(projectors[k][h - 1], band, parts, rot[sel],
                                                          origins[sel], step, sstep)
                    b, q = weight.shape
                    flat = significant_poses(weight).reshape(-1).nonzero().squeeze(1)   # (particle, pose) kept
                    owner = flat // q
                    w = weight.reshape(-1)[flat].to(device)[:, None]
                    ctf = rec.slice_ctf(px, **params_sel)
                    data = (rec.slice_spectra(images[sel]) * ctf)[owner.to(device)]
                    data = data * rec.slice_phase_shift(q_org.reshape(b * q, 2)[flat]) * w
                    rec.insert_slices(data, (ctf * ctf)[owner.to(device)] * w, q_rot.reshape(b * q, 3, 3)[flat])
    return recs


# ------------------------------------------------------------------------------------------ state
class Sampling(NamedTuple):
    """One iteration's search: alignment resolution (Å), angular step (°) and shift step (px)."""
    resolution_A: float
    angular_step_deg: float
    shift_step_px: float


def iteration_sampling(resolution_A: float, pixel_size_A: float, diameter_A: float) -> Sampling:
    """The sampling of an iteration after one at ``resolution_A`` (never beyond Nyquist) for a particle of
    ``diameter_A`` (:mod:`.sampling`)."""
    res_A = max(resolution_A, 2 * pixel_size_A)
    return Sampling(res_A, angular_step_for_diameter(res_A, diameter_A), shift_step_for_resolution(res_A, pixel_size_A))


@dataclasses.dataclass
class RefineState:
    """What the iterations change; per particle (N rows) unless said otherwise. ``history`` holds one entry
    per completed iteration; ``rng`` draws the perturbations of the repetition consensus."""
    halves: np.ndarray                   # (N,) half set, 1 or 2
    classes: np.ndarray                  # (N,) class, 0-based
    angles_deg: np.ndarray               # (N, 3) rlnAngleRot, Tilt, Psi
    origins_A: np.ndarray                # (N, 2) rlnOriginX/YAngst
    keep: np.ndarray                     # (N,) used in the last reconstruction
    scores: np.ndarray                   # (N,) score of the pose
    alternatives: Optional[Tuple[np.ndarray, np.ndarray]]  # runner-up (angles, origins) of the last global iteration
    refs: List[Sequence[np.ndarray]]     # refs[k][h-1]: class k's reference for half h
    resolution_A: float                  # of the last iteration (the initial low-pass before the first)
    rng: np.random.Generator
    history: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    best_resolution_A: float = math.inf
    stalls: int = 0                      # iterations since the resolution last improved by 1 %
    converged: bool = False

    @property
    def iteration(self) -> int:
        """The last completed iteration (0 before the first)."""
        return self.history[-1]["iteration"] if self.history else 0


class Aligned(NamedTuple):
    """The poses of one iteration's alignment (N rows); ``agree``: the two repetitions agree (all True with one),
    ``alternatives``: runner-up (angles, origins) of a global search, None after a local one."""
    angles_deg: np.ndarray
    origins_A: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    agree: np.ndarray
    alternatives: Optional[Tuple[np.ndarray, np.ndarray]]


def _iteration_record(history: List[Dict[str, Any]], params: "RefineParams", n_classes: int) -> Dict[str, Any]:
    """What ``it###_model.json`` holds (besides the random state): the last history entry, the whole
    ``history``, the settings and the number of classes."""
    return dict(history[-1], history=history, params=params.as_dict(), n_classes=n_classes)


def _read_inputs(particles, references, mask, params):
    """The particles, the initial maps and the mask (or None), checked against each other and ``params``."""
    star = read_particles(particles) if isinstance(particles, str) else particles
    references = [references] if isinstance(references, str) else list(references)
    if len(star) < 4:
        raise InputError("refinement needs at least 4 particles, got %d" % len(star))
    star.require("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
    px, box = star.pixel_size_A, star.box_size
    params.check(box, px)
    return star, read_references(references, star), read_mask(mask, box)


def _initial_state(star: ParticleStar, maps: Sequence[np.ndarray], mask: torch.Tensor,
                   params: "RefineParams") -> RefineState:
    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    halves = half_split(star, params.seed)
    n = len(star)
    angles, origins = (star.angles_deg(), star.origins_A()) if star.has_poses() else (np.zeros((n, 3)), np.zeros((n, 2)))
    return RefineState(halves=halves, classes=np.zeros(n, dtype=np.int64), angles_deg=angles, origins_A=origins,
                       keep=np.ones(n, dtype=bool), scores=np.zeros(n), alternatives=None,
                       refs=initial_references(maps, params.initial_resolution_A, star.pixel_size_A, mask),
                       resolution_A=params.initial_resolution_A, rng=rng)


def _resume(state: RefineState, layout: RefineLayout, n_particles: int) -> None:
    """``state`` after the last completed iteration of ``layout`` (unchanged when there is none)."""
    remove_stale_parts_in(layout.output_dir)  # temporaries of a run killed while writing
    it = layout.last_completed_iteration()
    if it == 0:
        return
    record, prev, refs = layout.read_iteration(it)
    if len(prev) != n_particles:
        raise InputError("cannot continue: %s has %d particles, the input %d"
                         % (layout.output_dir, len(prev), n_particles))
    state.history = record["history"]
    state.angles_deg, state.origins_A = prev.angles_deg(), prev.origins_A()
    state.halves = np.asarray(prev.particles["rlnRandomSubset"], dtype=np.int64)
    state.classes = np.asarray(prev.particles["rlnClassNumber"], dtype=np.int64) - 1
    state.keep = np.asarray(prev.particles["dcSwiftKept"], dtype=bool)
    state.scores = np.asarray(prev.particles["dcSwiftScore"], dtype=np.float64)
    state.alternatives = _read_alternatives(prev)
    if "random_state" in record:         # the draws of an uninterrupted run (older files lack it)
        state.rng.bit_generator.state = record["random_state"]
    state.resolution_A = record["resolution_A"]
    state.refs = refs
    state.best_resolution_A = min(h["resolution_A"] for h in state.history)
    state.stalls = state.history[-1]["stalls"]
    state.converged = bool(state.history[-1].get("converged"))
    logger.info("continuing after iteration %d (resolution %.2f Å)", it, state.resolution_A)


# ------------------------------------------------------------------------------------------ the loop
def refine_3d(particles: Union[str, ParticleStar], references: Union[str, Sequence[str]], output_dir: str,
              params: Optional["RefineParams"] = None, mask: Optional[str] = None,
              resume: bool = False) -> Dict[str, Any]:
    """Run the refinement (module docstring). Returns the final record (what ``model.json`` holds).

    Args:
        particles: particle STAR path (or :class:`~deepcryo.core.particles.ParticleStar`) with CTF columns.
        references: initial map path(s) (MRC), same box and pixel size; several → multi-reference refinement.
        output_dir: folder for every output (:class:`.layout.RefineLayout`).
        params: :class:`RefineParams`.
        mask: optional MRC path of a mask (values 0–1) for FSC and references.
        resume: continue after the last completed iteration found in ``output_dir``; a finished run (complete
            ``model.json``) is left as it is.
    """
    params = params or RefineParams()
    star, maps, mask_vol = _read_inputs(particles, references, mask, params)
    px, box = star.pixel_size_A, star.box_size
    diameter_A = params.particle_diameter_A or DEFAULT_DIAMETER_BOX_FRACTION * box * px
    mask_t = refinement_mask(box, px, diameter_A, mask_vol)
    layout = RefineLayout(output_dir, len(maps))
    os.makedirs(output_dir, exist_ok=True)
    os.makedirs(layout.work_dir, exist_ok=True)
    state = _initial_state(star, maps, mask_t, params)
    if resume:
        _resume(state, layout, len(star))
    if state.iteration < params.max_iterations and not state.converged:
        layout.remove_final_record()     # the final outputs, if any, are those of an earlier iteration
    elif state.history:
        finished = layout.finished_record(state.iteration)
        if finished is not None:
            shutil.rmtree(layout.work_dir, ignore_errors=True)
            logger.info("%s: finished after iteration %d, nothing to do", output_dir, state.iteration)
            return finished
    while state.iteration < params.max_iterations and not state.converged:
        t0, cpu0 = time.time(), time.process_time()
        iteration = state.iteration + 1
        is_global = iteration <= params.global_iterations or (iteration == 1 and not star.has_poses())
        sampling = iteration_sampling(state.resolution_A, px, diameter_A)
        if is_global:
            aligned = align_global(state, star, sampling, params, layout.work_dir)
        else:
            aligned = align_local(state, star, sampling, params)
        change_deg, shift_change_A = _accept_poses(state, aligned, params.symmetry)
        t_align = time.time() - t0
        recs, half_maps, curves, class_res = reconstruct_halves(star, state, mask_t, params, iteration)
        new_resolution = update_references(state, recs, curves, class_res, mask_t, params, px)
        entry = check_convergence(state, iteration, is_global, sampling, new_resolution, class_res, change_deg)
        entry.update(mean_shift_change_A=float(np.mean(shift_change_A)), **_population(state, len(maps)))
        entry.update(align_seconds=t_align, seconds=time.time() - t0, cpu_seconds=time.process_time() - cpu0)
        _save_iteration(state, star, layout, entry, half_maps, curves, params)
    if not state.history:
        raise InputError("%s: nothing to continue from and no iteration to run" % output_dir)
    return _final_maps(state, layout, mask_t, diameter_A, params)


def align_global(state: RefineState, star: ParticleStar, sampling: Sampling, params: "RefineParams",
                 work_dir: str) -> Aligned:
    """Every particle searched globally against its half's reference of each class (an index each, built in
    ``work_dir``), with its runner-up pose kept for the next iteration."""
    return _align_halves(state, star, True, sampling, params, work_dir)


def align_local(state: RefineState, star: ParticleStar, sampling: Sampling, params: "RefineParams") -> Aligned:
    """Every particle searched around its pose (and its runner-up after a global iteration) against its half's
    reference of each class, scored exactly."""
    return _align_halves(state, star, False, sampling, params, None)


def _align_halves(state, star, is_global, sampling, params, work_dir):
    """:func:`_align_class` per half and class; each particle takes the class whose reference it matches best."""
    n, n_classes = len(star), len(state.refs)
    new_angles, new_origins, new_score = state.angles_deg.copy(), state.origins_A.copy(), np.full(n, -np.inf)
    new_classes = state.classes.copy()
    agree = np.ones(n, dtype=bool)
    alt_angles, alt_origins = new_angles.copy(), new_origins.copy()
    for h in (1, 2):
        sel = np.nonzero(state.halves == h)[0]
        sub = star.subset(sel)
        prior = (state.angles_deg[sel], state.origins_A[sel])
        alternatives = None if state.alternatives is None else (state.alternatives[0][sel], state.alternatives[1][sel])
        per_class = [_align_class(state.refs[k][h - 1], sub, is_global, prior, alternatives, *sampling, params,
                                  state.rng, work_dir) for k in range(n_classes)]
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
    return Aligned(new_angles, new_origins, new_classes, new_score, agree,
                   (alt_angles, alt_origins) if is_global else None)


def _accept_poses(state: RefineState, aligned: Aligned, symmetry: str) -> Tuple[np.ndarray, np.ndarray]:
    """Take the ``aligned`` poses into ``state``; returns each particle's pose change (°) and shift change (Å)."""
    change = pose_distance_deg(torch.as_tensor(state.angles_deg), torch.as_tensor(aligned.angles_deg),
                               symmetry).numpy()
    shift_change = np.linalg.norm(aligned.origins_A - state.origins_A, axis=1)
    state.angles_deg, state.origins_A, state.scores = aligned.angles_deg, aligned.origins_A, aligned.scores
    state.classes, state.keep, state.alternatives = aligned.classes, aligned.agree, aligned.alternatives
    return change, shift_change


def reconstruct_halves(star: ParticleStar, state: RefineState, mask: torch.Tensor, params: "RefineParams",
                       iteration: int) -> Tuple[List[List[Reconstructor]], List[Sequence[np.ndarray]],
                                            List[np.ndarray], List[float]]:
    """Both half maps of each class from the kept particles at their poses, their masked FSC (corrected by
    phase randomisation) and resolution at 0.143. Returns (recs[k][h-1], half_maps[k], curves[k],
    class_resolution_A[k]); a class without particles in one half keeps its references as half maps, a zero
    FSC and an infinite resolution."""
    n_classes, box, px = len(state.refs), star.box_size, star.pixel_size_A
    recs = _reconstruct(_with_poses(star, state.angles_deg, state.origins_A), state.halves, state.classes,
                        state.keep, n_classes, params)
    curves, half_maps, class_res = [], [], []
    for k in range(n_classes):
        if min(recs[k][0].count, recs[k][1].count) == 0:
            logger.info("class %d has no particles in one half: its reference is kept", k + 1)
            half_maps.append(state.refs[k])
            curves.append(np.zeros(box // 2 + 1))
            class_res.append(math.inf)
            continue
        h1, h2 = recs[k][0].reconstruct(), recs[k][1].reconstruct()
        curve = masked_fsc(h1, h2, mask.numpy(), seed=params.seed + iteration).corrected
        curves.append(curve)
        half_maps.append((h1, h2))
        class_res.append(fsc_resolution_A(curve, px, 0.143))
    return recs, half_maps, curves, class_res


def update_references(state: RefineState, recs: Sequence[Sequence[Reconstructor]], curves: Sequence[np.ndarray], class_resolution_A: Sequence[float],
                      mask: torch.Tensor, params: "RefineParams", pixel_size_A: float) -> float:
    """The next references into ``state`` (:func:`.references.next_references`); returns the iteration's
    resolution (Å): the mean over the classes that have one, never beyond Nyquist."""
    finite = [r for r in class_resolution_A if math.isfinite(r)]
    new_resolution = max(2 * pixel_size_A, float(np.mean(finite))) if finite else state.resolution_A
    state.refs = next_references(recs, curves, class_resolution_A, state.refs, mask, params.join_resolution_A,
                                 pixel_size_A)
    return new_resolution


def check_convergence(state: RefineState, iteration: int, is_global: bool, sampling: Sampling, new_resolution_A: float,
                      class_resolution_A: Sequence[float], change_deg: np.ndarray) -> Dict[str, Any]:
    """Record ``new_resolution_A`` in ``state`` and decide convergence: a local iteration after two without a
    1 % improvement of the resolution, with a median pose change below the angular step. Returns the
    iteration's history entry so far (its sampling, resolution and pose change)."""
    improved = new_resolution_A < state.best_resolution_A * 0.99
    state.best_resolution_A = min(state.best_resolution_A, new_resolution_A)
    state.stalls = 0 if improved else state.stalls + 1
    median_change = float(np.median(change_deg))
    state.converged = (not is_global and state.stalls >= 2 and median_change < sampling.angular_step_deg)
    state.resolution_A = new_resolution_A
    return {"iteration": iteration, "mode": "global" if is_global else "local",
            "align_resolution_A": sampling.resolution_A, "angular_step_deg": sampling.angular_step_deg,
            "shift_step_px": sampling.shift_step_px, "resolution_A": new_resolution_A,
            "class_resolution_A": [float(r) for r in class_resolution_A], "median_angle_change_deg": median_change}


def _population(state: RefineState, n_classes: int) -> Dict[str, Any]:
    """The history entry's figures of the particle set, then the convergence state (in the files' key order)."""
    return {"fraction_kept": float(state.keep.mean()),
            "class_fractions": [float(np.mean(state.classes == k)) for k in range(n_classes)],
            "mean_score": float(np.mean(state.scores)), "stalls": state.stalls, "converged": state.converged}


def _save_iteration(state, star, layout, entry, half_maps, curves, params):
    """Append ``entry`` to the history and write the iteration's files (:meth:`.layout.RefineLayout.write_iteration`)."""
    state.history.append(entry)
    out_star = _output_star(star, state.angles_deg, state.origins_A, state.halves, state.classes, state.scores,
                            state.keep, state.alternatives)
    layout.write_iteration(entry["iteration"], half_maps, state.refs, curves, out_star,
                           _iteration_record(state.history, params, layout.n_classes), state.rng.bit_generator.state,
                           star.pixel_size_A)
    # go on from what the files hold, as a resumed run does: a pose rounded to 6 decimals can tip a near tie
    state.angles_deg, state.origins_A, state.scores = (as_written(state.angles_deg), as_written(state.origins_A),
                                                       as_written(state.scores))
    if state.alternatives is not None:
        state.alternatives = tuple(as_written(a) for a in state.alternatives)
    logger.info("iteration %d (%s): align %.2f Å, step %.2f°, shift step %.2f px -> resolution %.2f Å; "
                "median pose change %.2f°, kept %.1f%%, %.1f s",
                entry["iteration"], entry["mode"], entry["align_resolution_A"], entry["angular_step_deg"],
                entry["shift_step_px"], entry["resolution_A"], entry["median_angle_change_deg"],
                100 * state.keep.mean(), entry["seconds"])


def _final_maps(state: RefineState, layout: RefineLayout, mask: torch.Tensor, diameter_A: float,
                params: "RefineParams") -> Dict[str, Any]:
    """The final outputs from the last iteration's particles: both halves reconstructed with pose posteriors,
    their FSC, the map, then ``model.json``; returns the final record."""
    record = _iteration_record(state.history, params, layout.n_classes)
    last, n_classes = record["iteration"], layout.n_classes
    final_star = read_particles(layout.iteration_particles_path(last))
    px, box = final_star.pixel_size_A, final_star.box_size
    final_halves = np.asarray(final_star.particles["rlnRandomSubset"])
    final_classes = np.asarray(final_star.particles["rlnClassNumber"]) - 1
    final_keep = np.asarray(final_star.particles["dcSwiftKept"], dtype=bool)
    t0 = time.time()
    recs = _posterior_reconstruct(final_star, final_halves, final_classes, final_keep, state.refs,
                                  record["resolution_A"], diameter_A, n_classes, params)
    final_res = []
    for k in range(n_classes):
        if min(recs[k][0].count, recs[k][1].count) == 0:
            final_res.append(math.inf)
            layout.copy_iteration_class_files(last, k)
        else:
            h1, h2 = recs[k][0].reconstruct(), recs[k][1].reconstruct()
            curve = masked_fsc(h1, h2, mask.numpy(), seed=params.seed + last + 1).corrected
            final_res.append(fsc_resolution_A(curve, px, 0.143))
            layout.write_final_class(k, h1, h2, curve, px)
        total = Reconstructor(box, symmetry=params.symmetry, device=torch.device(params.device))
        total.add(recs[k][0])
        total.add(recs[k][1])
        layout.write_final_map(k, total.reconstruct(), px)
    finite = [r for r in final_res if math.isfinite(r)]
    final_record = dict(record, final_resolution_A=float(np.mean(finite)) if finite else record["resolution_A"],
                        final_class_resolution_A=[float(r) for r in final_res], final_seconds=time.time() - t0)
    layout.write_final_record(last, final_record)      # model.json last: it marks the final outputs as complete
    shutil.rmtree(layout.work_dir, ignore_errors=True)
    logger.info("final: %d iterations (%s); pose-weighted half maps: resolution %.2f Å (FSC 0.143; the last "
                "iteration's best poses alone: %.2f Å), %.1f s",
                last, "converged" if final_record["converged"] else "stopped at the iteration limit",
                final_record["final_resolution_A"], final_record["resolution_A"], final_record["final_seconds"])
    return final_record


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


def _better_of(result, prior_angles, alternatives, reference, sub, res_A, step_deg, sstep_px, params):
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
    logger.info("runner-up poses searched for %d particles, %d of them better", len(rows), int(better.sum()))
    return merged
