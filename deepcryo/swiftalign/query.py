"""Alignment of particles against a trained index: global search, exact re-ranking, local refinement.

For each particle (batched):

1. **Search**: its CTF-multiplied band (:mod:`.features`), moved back by each origin of the index's search
   grid (:func:`.gallery.search_grid`, 1.5 shift steps apart), one search vector per origin
   (:meth:`ParticleBatch.search_vectors`; why: :mod:`.gallery`) → the ``4·k`` nearest gallery references of
   each vector over every shard of the index, visiting ``nprobe`` inverted lists (:func:`.index.search`; top-k
   lists merged across shards), then the ``4·k`` nearest over all origins, one per pose (:func:`nearest_poses`).
   Each match gives a pose and an origin. An index of several shards is read from disk one shard at a time, so
   the particles are searched in blocks as large as the memory limit allows (:func:`index_matches`; their
   images are read twice, once for the search and once for the scoring).
2. **Exact re-ranking** (:func:`rerank_matches`): each match is scored by the full-precision normalised
   Fourier correlation over the band between the particle and the reference projected at the match's pose,
   multiplied by the particle's *own* CTF and moved by the match's origin and by each offset that covers that
   origin's cell of the search grid, the best offset kept (:func:`score_slices`). When the particles' matches
   (4·k each) outnumber the gallery's poses, every pose is projected once and the matches read from that table
   (:meth:`.gallery.Gallery.keep_slices`, within a quarter of the memory limit).
3. **Local refinement** (:func:`refine_best`): a pattern search over small rotations about the three axes of
   the projection frame and sub-pixel origin offsets, halving both steps at each level (:func:`refine_poses`,
   from half the gallery steps down to 1/32): one pass of the first level over those of the ``k`` best that lie
   more than 1.5 angular steps from a better one (:func:`distinct_candidates`; local mode: over all ``k``), then
   the leader alone through the finer levels, each level also trying the vertex of the parabolas through the
   scores along each axis (:func:`parabola_vertex`).
4. The refined leader wins. Its **confidence** is the score gap to the best match more than two angular
   steps away from the winner (over the symmetry copies), refined through the first level (two passes); when
   none of the ``4·k`` matches is that far, the gap to the lowest exact score among them.

**When the index pays.** Steps 1–2 replace scoring every gallery pose at every origin, which costs the
gallery's size per particle; step 3 costs the same whichever search found the candidates. The index's gain
over the whole alignment is therefore bounded by how much the exhaustive scoring costs beside the
refinement: large at fine steps, small for a coarse gallery (a few tens of thousands of poses), which one
matrix product per block of particles scores nearly as cheaply as the candidates are refined.

**Local mode** (:func:`local_candidates`) replaces step 1: the pool is every rotation of the prior on a
grid of axis-angle steps within ±N angular steps, each with its best origin within ±M px of the prior
origin, all scored exactly; the k best are refined as above ("far" then means more than one step).

Angles are RELION ZYZ (degrees), origins RELION's (px here, Å in STAR files): the particle centre sits at
``N//2 - origin``.
"""
import logging
import math
import time
from typing import Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from deepcryo.core.ctf import ctf_from_freqs
from deepcryo.core.errors import InputError
from deepcryo.core.geometry import (axis_angle_matrices, euler_to_matrix, matrix_to_euler, pose_distance_deg,
                                     rotation_grid)
from deepcryo.core.mrc import ImageStack
from deepcryo.core.particles import ParticleStar, read_particles, write_particles
from deepcryo.core.projector import Projector

from . import index as swindex
from .features import Band, vectors_from_band
from .gallery import band_slices, cell_offsets, shift_grid
from .target import AlignTarget, SearchIndex

__all__ = ["AlignTarget", "SearchIndex", "ParticleBatch", "score_slices", "pose_slices", "score_poses",
           "parabola_vertex", "refine_poses", "distinct_candidates", "refine_best",
           "nearest_poses", "global_candidates", "rerank_matches", "index_matches", "local_candidates",
           "pose_posterior", "Selection", "select_and_refine", "align", "query"]

logger = logging.getLogger(__name__)

RUNNER_UP_LEVELS = 1   # refinement levels of the runner-up (:func:`select_and_refine`; why only the first: there)
DISTINCT_STEPS = 1.5   # candidates this many angular steps from a better one skip the first level (:func:`refine_best`)


class ParticleBatch:
    """Band coefficients (B, P) complex of particle images and their CTFs (B, P) at the band frequencies."""

    def __init__(self, band: Band, images: Union[np.ndarray, torch.Tensor], ctf_params: Mapping[str, np.ndarray],
                 sqrt_weights: Optional[torch.Tensor] = None) -> None:
        self.coeffs = band.from_images(images)
        self.ctf = ctf_from_freqs(band.freqs_invA, *(torch.as_tensor(ctf_params[k], dtype=torch.float32) for k in (
            "defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kV", "cs_mm", "amplitude_contrast",
            "phase_shift_deg", "bfactor_A2")))
        self.sqrt_weights = sqrt_weights

    def __len__(self) -> int:
        return self.coeffs.shape[0]

    def rows(self, index: torch.Tensor) -> "ParticleBatch":
        """The particles at ``index`` (R,) (repeats allowed) as a batch of R."""
        out = ParticleBatch.__new__(ParticleBatch)
        out.coeffs, out.ctf, out.sqrt_weights = self.coeffs[index], self.ctf[index], self.sqrt_weights
        return out

    def search_vectors(self, band: Band, origins_px: Union[np.ndarray, torch.Tensor], normalise: bool = True,
                       ctf_rms: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B·S, dim) index search vectors, particle-major: each particle's band multiplied by its CTF (divided
        by the index's ``ctf_rms`` (P,) when given) and moved back by each of the S origins (S, 2) px (the
        reference a particle with that origin matches is the centred projection; see :mod:`.gallery`)."""
        undo = band.phase_ramps(torch.as_tensor(origins_px, dtype=torch.float32)).conj()          # (S, P)
        corrected = self.coeffs * self.ctf if ctf_rms is None else self.coeffs * self.ctf / ctf_rms.to(self.coeffs.device)
        moved = corrected[:, None] * undo[None]                                                 # (B, S, P)
        return vectors_from_band(moved, self.sqrt_weights, normalise).reshape(-1, band.dim)


def score_slices(band: Band, particles: ParticleBatch, slices: torch.Tensor, origins_px: torch.Tensor,
                 offsets_px: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """Normalised Fourier correlation (B, C, M, S) of particles with the central slices ``slices`` (B, C, M, P)
    (band values of the map at C × M poses of each particle), the M slices of a candidate c sharing its origin
    ``origins_px[:, c]`` (B, C, 2) px, each at the S origin offsets ``offsets_px`` (S, 2) px.

    The reference is ``CTF_particle · slice · ramp(origin + offset)``; the correlation is
    ``Re Σ w conj(ref) x / sqrt(Σ w |ref|² · Σ w |x|²)`` over the band, w the whitening weights (or 1). The
    origin's ramp is applied to the particle (conjugated) rather than to each slice: once per candidate.
    """
    b, c = slices.shape[:2]
    ref = slices.to(particles.coeffs.device) * particles.ctf[:, None, None]
    x = particles.coeffs
    if particles.sqrt_weights is not None:
        ref = ref * particles.sqrt_weights
        x = x * particles.sqrt_weights
    moved = x[:, None] * band.phase_ramps(origins_px.reshape(-1, 2)).reshape(b, c, -1).conj()   # (B, C, P)
    cross = ref.conj() * moved[:, :, None]                                                     # (B, C, M, P)
    offs = band.phase_ramps(torch.as_tensor(offsets_px, dtype=torch.float32)).conj()            # (S, P)
    num = torch.einsum("bcmp,sp->bcms", cross, offs).real
    norm = torch.sqrt(torch.view_as_real(ref).square().sum((-1, -2))
                      * torch.view_as_real(x).square().sum((-1, -2))[:, None, None]).clamp_min(1e-20)
    return num / norm[..., None]


def pose_slices(projector: Projector, band: Band, rotations: torch.Tensor) -> torch.Tensor:
    """Band slices (..., P) complex of the map at pose matrices ``rotations`` (..., 3, 3), on the projector's device."""
    return band_slices(projector, rotations.reshape(-1, 3, 3), band.freqs_px).reshape(rotations.shape[:-2] + (-1,))


def score_poses(projector: Projector, band: Band, particles: ParticleBatch, rotations: torch.Tensor,
                origins_px: torch.Tensor, offsets_px: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """Normalised Fourier correlation (B, C, S) of particles with references at C poses × S origin offsets
    (:func:`score_slices`).

    Args:
        particles: :class:`ParticleBatch` of B particles.
        rotations: (B, C, 3, 3) pose matrices; origins_px: (B, C, 2) origins (px).
        offsets_px: (S, 2) offsets added to every origin (px).
    """
    return score_slices(band, particles, pose_slices(projector, band, rotations)[:, :, None], origins_px,
                        offsets_px)[:, :, 0]


def _axis_moves(h_rad):
    """(6, 3, 3): rotations by ±h about x, y, z (projection frame)."""
    vecs = torch.zeros(6, 3, dtype=torch.float64)
    for axis in range(3):
        vecs[2 * axis, axis] = h_rad
        vecs[2 * axis + 1, axis] = -h_rad
    return axis_angle_matrices(vecs).to(torch.float32)


def _gather(x, index):
    """x (B, C, M, ...) at index (B, C) along dim 2 → (B, C, ...)."""
    index = index.reshape(index.shape + (1,) * (x.dim() - 2)).expand(x.shape[:2] + (1,) + x.shape[3:])
    return torch.gather(x, 2, index)[:, :, 0]


def refine_poses(projector: Projector, band: Band, particles: ParticleBatch, rotations: torch.Tensor,
                 origins_px: torch.Tensor, angular_step_deg: float, shift_step_px: float, levels: int = 5,
                 passes: int = 2, first_level: int = 1, scores: Optional[torch.Tensor] = None,
                 newton: bool = False, slices: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pattern-search refinement of (B, C) candidate poses; returns refined (rotations, origins, scores (B, C),
    band slices (B, C, P) of the refined rotations).

    Level ``l`` (``first_level``..``levels``) tries the current rotation and the 6 rotations by ±h about x, y,
    z left-multiplied (projection frame), ``h = step / 2^l``, each at the 3×3 origin offsets
    {0, ±step_s / 2^l}², keeping the best, ``passes`` times per level. The current rotation's slice is kept
    from the pass that chose it, so a pass projects 6 rotations per candidate. ``scores`` (B, C) and ``slices``
    (B, C, P): the candidates' exact scores and band slices when already known (a candidate is then never
    projected twice).

    ``newton``: levels from 2 on take one pass that also tries the rotation at the vertices of the three
    parabolas through each axis' scores at −h, 0, +h (best origin offset of each; the vertex clamped to ±h, and
    +h or −h where the parabola opens upwards) combined into one rotation: 7 projections per level instead of 12
    for two passes. Why: near the optimum the score is close to quadratic in the small rotation, so the vertex
    lands where a second pass would only have stepped towards, and it is not confined to the ±h grid
    (``benchmarks/RESULTS.md``). Level 1, where a candidate may still be far from its peak, keeps its passes.
    """
    b, c = rotations.shape[:2]
    rot, org = rotations.clone(), origins_px.clone()
    device = particles.coeffs.device                      # scores, choices and kept slices live beside the particles
    slices = (pose_slices(projector, band, rot) if slices is None else slices).to(device).reshape(b, c, -1)
    if scores is None:
        score = score_slices(band, particles, slices[:, :, None], org, torch.zeros(1, 2))[:, :, 0, 0]
    else:
        score = scores.clone()
    for level in range(first_level, levels + 1):
        moves = _axis_moves(math.radians(angular_step_deg) / 2 ** level)
        hs = shift_step_px / 2 ** level
        offsets = torch.as_tensor(shift_grid(hs, hs), dtype=torch.float32)                   # {−hs, 0, hs}²
        vertex_level = newton and level >= 2
        for _ in range(1 if vertex_level else passes):
            cand = torch.cat([rot[:, :, None], moves[None, None] @ rot[:, :, None]], 2)      # (B, C, 7, 3, 3)
            cand_slices = torch.cat([slices[:, :, None], pose_slices(projector, band, cand[:, :, 1:]).to(device)], 2)
            s = score_slices(band, particles, cand_slices, org, offsets)                      # (B, C, 7, S)
            if vertex_level:
                turn = parabola_vertex(s.max(-1).values.cpu(), math.radians(angular_step_deg) / 2 ** level)
                vertex = axis_angle_matrices(turn).to(rot.dtype) @ rot                         # (B, C, 3, 3)
                v_slice = pose_slices(projector, band, vertex[:, :, None]).to(device)             # (B, C, 1, P)
                cand = torch.cat([cand, vertex[:, :, None]], 2)
                cand_slices = torch.cat([cand_slices, v_slice], 2)
                s = torch.cat([s, score_slices(band, particles, v_slice, org, offsets)], 2)
            best, arg = s.reshape(b, c, -1).max(-1)
            better = best > score
            mi, oi = arg // len(offsets), arg % len(offsets)
            rot = torch.where(better[..., None, None], _gather(cand, mi), rot)
            slices = torch.where(better[..., None], _gather(cand_slices, mi), slices)
            org = torch.where(better[..., None], org + offsets[oi], org)
            score = torch.maximum(best, score)
    return rot, org, score, slices


def parabola_vertex(scores: torch.Tensor, h_rad: float) -> torch.Tensor:
    """Rotation vectors (…, 3) (radians, projection-frame axes) at the maxima of the parabolas through the scores
    (…, 7) of the current rotation and of the turns by +h, −h about x, then y, then z (:func:`_axis_moves`'
    order): per axis ``h (s₊ − s₋) / (2 (2 s₀ − s₊ − s₋))``, clamped to ±h; where the parabola has no maximum
    (``2 s₀ ≤ s₊ + s₋``), ±h towards the better side."""
    s0, plus, minus = scores[..., :1], scores[..., 1::2], scores[..., 2::2]
    fall = 2 * s0 - plus - minus
    step = torch.where(fall > 0, h_rad * (plus - minus) / (2 * fall.clamp_min(1e-30)), h_rad * torch.sign(plus - minus))
    return step.clamp(-h_rad, h_rad)


def distinct_candidates(rotations: torch.Tensor, scores: torch.Tensor, min_angle_deg: float) -> torch.Tensor:
    """(B, C) bool: the candidates (B, C, 3, 3) with ``scores`` (B, C) that lie farther than ``min_angle_deg`` from
    every better candidate kept before them (greedy non-maximum suppression, best first; the best is always kept).
    The rotation angle between pose matrices, without symmetry copies (a symmetry mate is kept: it costs only the
    projections that suppressing it would save)."""
    b, c = scores.shape
    order = scores.argsort(1, descending=True).to(rotations.device)
    rot = _take(rotations, order).to(torch.float64)
    cos_min = math.cos(math.radians(min_angle_deg))
    trace = (rot[:, :, None] * rot[:, None]).sum((-1, -2))                  # tr(Ri Rjᵀ) (B, C, C)
    near = (trace - 1) / 2 >= cos_min
    keep = torch.ones(b, c, dtype=torch.bool)
    for j in range(1, c):
        keep[:, j] = ~(near[:, :j, j] & keep[:, :j]).any(1)
    return torch.zeros_like(keep).scatter_(1, order, keep)


def refine_best(projector: Projector, band: Band, particles: ParticleBatch, rotations: torch.Tensor,
                origins_px: torch.Tensor, scores: torch.Tensor, angular_step_deg: float, shift_step_px: float,
                levels: int = 5, passes: int = 2, newton: bool = True, slices: Optional[torch.Tensor] = None,
                distinct_steps: Optional[float] = DISTINCT_STEPS
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Refine the best of (B, C) candidates (exact ``scores`` (B, C), band ``slices`` (B, C, P) when already
    projected): one pass of level 1 of :func:`refine_poses` over the candidates that are distinct
    (:func:`distinct_candidates`: farther than ``distinct_steps`` angular steps from every better one; None: all
    C), then only the best of them through levels 2 … ``levels``: one pass with the parabolas' vertex per level
    (``newton``), or else ``passes`` pattern-search passes per level. Returns its rotation (B, 3, 3), origin
    (B, 2), score (B,) and candidate index (B,).

    Why not every candidate to the end: after one pass at half the gallery's step, the candidates that
    trail almost never overtake the leader at finer steps (on RELION-rendered particles, no winner changed
    basin), while refining all C to the end costs C times as many projections; the projections saved pay
    for the fifth level, which makes the winner's pose finer than four levels over all C did
    (``benchmarks/RESULTS.md``). Why not the candidates next to a better one: the gallery's neighbours of a
    peak score high together (most of the k best are one peak's grid neighbours), and the better one's pass,
    which moves half a step about each axis, covers the same peak; the trailing neighbour's pass only repeats
    it (``benchmarks/RESULTS.md``: the same accuracy at SNR 0.1 to 0.01 for a fifth less CPU). :func:`align` uses
    it in global mode only: a local pool is a dense grid around a prior, whose k best are always neighbours, and
    SwiftRes's local iterations (heterogeneous particles included) were measured refining each of them.
    """
    b, c = rotations.shape[:2]
    ar = torch.arange(b)
    if distinct_steps is None:
        active = torch.ones(b, c, dtype=torch.bool)
    else:
        active = distinct_candidates(rotations, scores, distinct_steps * angular_step_deg)
    pi, ci = active.nonzero(as_tuple=True)
    r1, o1, s1, sl1 = refine_poses(projector, band, particles.rows(pi), rotations[pi, ci][:, None],
                                   origins_px[pi, ci][:, None], angular_step_deg, shift_step_px,
                                   levels=min(levels, 1), passes=1, scores=scores[pi, ci][:, None],
                                   slices=None if slices is None else slices[pi, ci][:, None])
    score = torch.full_like(scores, -math.inf)
    score[pi, ci] = s1[:, 0]
    lead = score.argmax(1)
    slot = torch.zeros(b, c, dtype=torch.int64)                    # each refined candidate's row in r1, o1, …
    slot[pi, ci] = torch.arange(len(pi))
    pick = slot[ar, lead]
    rot, org, score, _ = refine_poses(projector, band, particles, r1[pick], o1[pick], angular_step_deg,
                                      shift_step_px, levels, passes, first_level=2, scores=s1[pick],
                                      newton=newton, slices=sl1[pick])
    return rot[:, 0], org[:, 0], score[:, 0], lead


def nearest_poses(distances: np.ndarray, ids: np.ndarray, n_origins: int, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """The ``n`` nearest distinct poses of each particle over its ``n_origins`` search vectors.

    Args:
        distances, ids: (B·S, m) index results of :meth:`ParticleBatch.search_vectors` (ids -1: no match).
    Returns:
        pose ids (B, n) and origin indices (B, n), nearest first, each pose at the origin where it matched
        best; a particle with fewer than ``n`` distinct matches repeats its nearest one (pose 0 if none).
    """
    m = ids.shape[1]
    b = ids.shape[0] // n_origins
    dist = np.where(ids < 0, np.inf, distances).reshape(b, n_origins * m)
    ids = ids.reshape(b, n_origins * m)
    origin = np.repeat(np.arange(n_origins), m)
    poses, origins = np.zeros((b, n), dtype=np.int64), np.zeros((b, n), dtype=np.int64)
    for i in range(b):
        order = np.argsort(dist[i], kind="stable")
        order = order[np.isfinite(dist[i, order])]
        _, first = np.unique(ids[i, order], return_index=True)
        keep = order[np.sort(first)][:n]
        if len(keep) == 0:
            continue
        keep = np.concatenate([keep, np.full(n - len(keep), keep[0])])
        poses[i], origins[i] = ids[i, keep], origin[keep]
    return poses, origins


def global_candidates(bundle: SearchIndex, poses: np.ndarray,
                      origins: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pose ids and origin indices (B, n) of :func:`nearest_poses` → rotations (B, n, 3, 3), origins (B, n, 2) px."""
    rot = bundle.gallery.rotations[torch.as_tensor(poses)]
    return rot, torch.as_tensor(bundle.origins_px[origins], dtype=torch.float32)


def rerank_matches(bundle: SearchIndex, particles: ParticleBatch, poses: np.ndarray,
                   origins: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact re-ranking of index matches (pose ids and origin indices (B, n) of :func:`nearest_poses`): each
    match's band slice (:meth:`.gallery.Gallery.slices`: projected, or read from the gallery's kept table)
    scored at its search origin and at the offsets that cover that origin's cell of the search grid
    (:func:`.gallery.cell_offsets`; the particle's origin lies somewhere in it), the best offset kept. Returns
    rotations (B, n, 3, 3), origins (B, n, 2) px, exact scores (B, n) and band slices (B, n, P) (for
    :func:`select_and_refine`)."""
    rot, org = global_candidates(bundle, poses, origins)
    slices = bundle.gallery.slices(torch.as_tensor(poses))
    offsets = cell_offsets(bundle.origins_px)
    score, best = score_slices(bundle.band, particles, slices[:, :, None], org, offsets)[:, :, 0].max(-1)
    return rot, org + offsets[best], score, slices


def index_matches(bundle: SearchIndex, stack: ImageStack, ctf: Mapping[str, np.ndarray], rows: np.ndarray, n: int,
                  nprobe: int, batch_size: int, memory_bytes: float,
                  devices: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Pose ids and origin indices (len(rows), n) (:func:`nearest_poses`) of the particles ``rows`` of the
    open ``stack`` (``ctf``: the STAR's CTF parameter arrays): their search vectors are computed
    ``batch_size`` images at a time into one array, then searched in one pass over the shards
    (:func:`.index.search`), so a streamed index is read once per call, not once per batch."""
    n_origins = len(bundle.origins_px)
    vectors = np.empty((len(rows) * n_origins, bundle.band.dim), dtype=np.float32)
    for s in range(0, len(rows), batch_size):
        idx = rows[s:s + batch_size]
        parts = ParticleBatch(bundle.band, stack.read(idx), {key: v[idx] for key, v in ctf.items()},
                              bundle.sqrt_weights)
        vectors[s * n_origins:(s + len(idx)) * n_origins] = parts.search_vectors(
            bundle.band, bundle.origins_px, bundle.manifest["normalise"], bundle.gallery.ctf_rms).numpy()
    distances, ids = swindex.search(bundle.shards(devices), vectors, n, nprobe, memory_bytes)
    return nearest_poses(distances, ids, n_origins, n)


def _search_block(bundle, n_matches, batch_size, memory_bytes, n):
    """Particles per :func:`index_matches` call for a streamed index: as many batches as an eighth of the
    memory holds (a vector and the running top-k per particle)."""
    if bundle.shard_bytes > memory_bytes / 2:
        logger.warning("warning: index shards of %.2f GB were built for a larger memory limit than %.2f GB; "
                       "rebuild the index with this --memory-limit to stay within it",
                       bundle.shard_bytes / 1e9, memory_bytes / 1e9)
    per_particle = len(bundle.origins_px) * (4 * bundle.band.dim + 12 * n_matches)
    return min(n, max(1, int(memory_bytes // 8 // per_particle) // batch_size) * batch_size)


def local_candidates(projector: Projector, band: Band, particles: ParticleBatch, prior_rotations: torch.Tensor,
                     prior_origins_px: torch.Tensor, angular_step_deg: float, shift_step_px: float, max_steps: int,
                     max_shift_px: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rotation within ±``max_steps`` angular steps of the prior (a cubic grid of axis-angle vectors
    of spacing one step, inside the ball of radius ``max_steps`` steps), each with its best origin within
    ±``max_shift_px`` of the prior origin: rotations (B, Q, 3, 3), origins (B, Q, 2), exact scores (B, Q) and
    band slices (B, Q, P) (for :func:`select_and_refine`, which then projects none of them again)."""
    moves = rotation_grid(max_steps * angular_step_deg, angular_step_deg).to(torch.float32)
    offsets = torch.as_tensor(shift_grid(max_shift_px, shift_step_px), dtype=torch.float32)
    b, q = len(particles), len(moves)
    rot = moves[None] @ prior_rotations[:, None]                                      # (B, Q, 3, 3)
    slices = pose_slices(projector, band, rot)
    s = score_slices(band, particles, slices[:, :, None], prior_origins_px[:, None].expand(b, q, 2), offsets)[:, :, 0]
    score, arg = s.max(-1)
    return rot, prior_origins_px[:, None] + offsets[arg], score, slices


def pose_posterior(projector: Projector, band: Band, particles: ParticleBatch, rotations: torch.Tensor,
                   origins_px: torch.Tensor, angular_step_deg: float, shift_step_px: float, max_steps: int = 2,
                   temper: float = 4.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tempered posterior over the poses near each particle's pose: the rotations of :func:`local_candidates`
    within ±``max_steps`` steps of ``angular_step_deg`` around ``rotations`` (B, 3, 3), each with its best
    origin within ±``shift_step_px`` of ``origins_px`` (B, 2), weighted by
    ``softmax(P · (c² − c_max²) / temper)`` over the candidates of each particle.

    For an image dominated by Gaussian noise, fitted with its best scale, the log-likelihood of a pose is
    ``−|x|²(1 − c²)/σ² ≈ −P(1 − c²)`` (``P`` complex band coefficients, ``c`` the normalised correlation),
    so ``temper=1`` is that likelihood. It ignores the errors of the reference, which broaden the real
    posterior, hence the default temper of 4 (better final maps than 1 or 2 or a hard assignment on
    simulated particles: ``benchmarks/RESULTS.md``). A nearly flat weight over the candidates would spread
    every particle alike, whatever its signal; the tempered likelihood sharpens with the particle's
    correlation and band size.

    Returns rotations (B, Q, 3, 3), origins (B, Q, 2) px and weights (B, Q) summing to 1 per particle.
    """
    rot, org, score, _ = local_candidates(projector, band, particles, rotations, origins_px, angular_step_deg,
                                          shift_step_px, max_steps, shift_step_px)
    logw = len(band) * (score ** 2 - score.max(1, keepdim=True).values ** 2) / temper
    return rot, org, torch.softmax(logw, dim=1)


def significant_poses(weights: torch.Tensor, fraction: float = 0.999) -> torch.Tensor:
    """(B, Q) bool: per particle, the fewest poses of ``weights`` (B, Q) (rows summing to 1) that together hold at
    least ``fraction`` of the weight, heaviest first (RELION's "significant" poses, its ``--adaptive_fraction``).
    A tempered posterior at a refinement's final resolution puts nearly all its weight on a few of its poses,
    so inserting only these leaves the maps unchanged to ``1 - fraction`` of the weight and skips most insertions."""
    ordered, order = weights.sort(dim=1, descending=True)
    before = ordered.cumsum(1) - ordered                   # weight of the heavier poses
    keep_sorted = before < fraction
    return torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)


def _take(x, index):
    """x (B, C, ...) gathered at index (B, K) along dim 1."""
    return x[torch.arange(x.shape[0])[:, None], index]


class Selection(NamedTuple):
    """The winner of :func:`select_and_refine` and its runner-up (the far candidate of the confidence gap)."""
    rotation: torch.Tensor  # (B, 3, 3)
    origin_px: torch.Tensor  # (B, 2)
    score: torch.Tensor  # (B,)
    confidence: torch.Tensor  # (B,)
    pool_index: torch.Tensor  # (B,)
    runner_up_rotation: torch.Tensor  # (B, 3, 3)
    runner_up_origin_px: torch.Tensor  # (B, 2)
    runner_up_score: torch.Tensor  # (B,)


def select_and_refine(projector: Projector, band: Band, particles: ParticleBatch, pool_rot: torch.Tensor,
                      pool_org: torch.Tensor, pool_score: torch.Tensor, k: int, angular_step_deg: float,
                      shift_step_px: float, far_deg: float, symmetry: str, levels: int = 5, passes: int = 2,
                      refine_far: bool = True, newton: bool = True,
                      pool_slices: Optional[torch.Tensor] = None,
                      distinct_steps: Optional[float] = DISTINCT_STEPS) -> Selection:
    """Refine the k best pool candidates (by exact score) to the winner (:func:`refine_best`), and measure its
    confidence: the gap to the best pool candidate farther than ``far_deg`` from the winner, refined through
    levels 1 … ``RUNNER_UP_LEVELS``, ``passes`` times each (or, when the pool has none, to the pool's lowest
    exact score). ``refine_far=False`` takes that far candidate's exact pool score unrefined (cheaper, a larger
    gap). ``levels``, ``passes``, ``newton``, ``distinct_steps``: see :func:`refine_best`. ``pool_slices``
    (B, C, P): the pool's band slices when already projected (by the exact re-ranking), so that no candidate is
    projected twice.

    Why the runner-up stops after the first level: a match two steps from the winner mostly lies on the flank
    of the winner's own peak, and finer levels walk it back up that peak (refined to level 4, three in four
    runners-up ended within one step of the winner on RELION-rendered particles at SNR 0.1, two in five at SNR
    0.01), so the gap then measured the peak's sharpness more than a second hypothesis, told wrong winners from
    right ones worse than the first level's gap does, and cost a quarter of the query. The first level's two
    passes keep it a second hypothesis for SwiftRes (:mod:`.refine`): of the wrong winners, its runner-up lay
    near the truth as often as the level-4 one did; with one pass, or unrefined, less often
    (``benchmarks/RESULTS.md``).

    Returns a :class:`Selection`: the runner-up is that far candidate (refined
    when ``refine_far``), or the winner itself when the pool has none.
    """
    b = pool_rot.shape[0]
    ar = torch.arange(b)
    top = pool_score.topk(min(k, pool_score.shape[1]), dim=1).indices
    w_rot, w_org, w_score, lead = refine_best(projector, band, particles, _take(pool_rot, top), _take(pool_org, top),
                                              _take(pool_score, top), angular_step_deg, shift_step_px, levels, passes,
                                              newton, None if pool_slices is None else _take(pool_slices, top),
                                              distinct_steps)
    w_angles = matrix_to_euler(w_rot.double())
    pool_angles = matrix_to_euler(pool_rot.reshape(-1, 3, 3).double())
    dist = pose_distance_deg(w_angles[:, None].expand(b, pool_rot.shape[1], 3).reshape(-1, 3), pool_angles,
                             symmetry).reshape(b, -1)
    far = dist > far_deg
    far_pick = torch.where(far, pool_score, torch.full_like(pool_score, -np.inf)).argmax(1)
    f_rot, f_org, f_score = pool_rot[ar, far_pick], pool_org[ar, far_pick], pool_score[ar, far_pick]
    if refine_far:
        f_slice = None if pool_slices is None else pool_slices[ar, far_pick][:, None]
        f_rot, f_org, f_score = (x[:, 0] for x in refine_poses(
            projector, band, particles, f_rot[:, None], f_org[:, None], angular_step_deg, shift_step_px,
            RUNNER_UP_LEVELS, passes, scores=f_score[:, None], newton=newton, slices=f_slice)[:3])
    has_far = far.any(1)
    gap = w_score - torch.where(has_far, f_score, pool_score.min(1).values)
    f_rot = torch.where(has_far[:, None, None], f_rot, w_rot)
    f_org = torch.where(has_far[:, None], f_org, w_org)
    f_score = torch.where(has_far, f_score, w_score)
    return Selection(w_rot, w_org, w_score, gap, top[ar, lead], f_rot, f_org, f_score)


def align(bundle: AlignTarget, star: ParticleStar, k: int = 5, nprobe: int = 8, local: bool = False,
          prior_angles_deg: Optional[np.ndarray] = None, prior_origins_A: Optional[np.ndarray] = None,
          local_steps: int = 2, local_shift_px: Optional[float] = None, batch_size: Optional[int] = None,
          memory_limit_GB: float = 4.0, devices: Optional[Sequence[str]] = None, levels: int = 5, passes: int = 2,
          refine_far: bool = True, newton: bool = True) -> Dict[str, np.ndarray]:
    """Align the particles of ``star`` (a checked :class:`ParticleStar`) with ``bundle``: any
    :class:`AlignTarget` in local mode (``refine.LocalReference``: a map without an index), a
    :class:`SearchIndex` (:class:`.index.IndexBundle`) in global mode.

    Global mode searches ``4·k`` index matches, re-ranks them exactly and refines the best ``k``; local mode
    scores every pose within ±``local_steps`` angular steps and ±``local_shift_px`` px of the prior and
    refines the best ``k`` (see the module docstring). ``levels``, ``passes``, ``refine_far`` and ``newton`` set the
    cost of the refinement (:func:`select_and_refine`); the defaults are the most thorough.

    Returns dict of arrays: ``angles_deg`` (N, 3), ``origins_A`` (N, 2), ``score`` (N,) the normalised
    correlation of the winner, ``confidence`` (N,), and the runner-up far from the winner (:func:`select_and_refine`):
    ``alt_angles_deg`` (N, 3), ``alt_origins_A`` (N, 2), ``alt_score`` (N,).
    """
    m = bundle.manifest
    px, step, sstep, symmetry = m["pixel_size_A"], m["angular_step_deg"], m["shift_step_px"], m["symmetry"]
    band = bundle.band
    n = len(star)
    ctf = star.ctf_params()
    if batch_size is None:
        per_particle = 8 * len(band) * (k * 7 * 9 + 8 * k + 130)
        batch_size = int(max(8, min(512, memory_limit_GB * 1e9 / 8 / per_particle)))
    out = {"angles_deg": np.zeros((n, 3)), "origins_A": np.zeros((n, 2)), "score": np.zeros(n),
           "confidence": np.zeros(n),
           "alt_angles_deg": np.zeros((n, 3)), "alt_origins_A": np.zeros((n, 2)), "alt_score": np.zeros(n)}
    if local:
        prior_rot = euler_to_matrix(torch.as_tensor(prior_angles_deg)).to(torch.float32)
        prior_org = torch.as_tensor(np.asarray(prior_origins_A) / px, dtype=torch.float32)
        local_shift_px = m["max_shift_px"] if local_shift_px is None else local_shift_px
    else:
        memory_bytes = memory_limit_GB * 1e9
        block_size = batch_size if bundle.resident else _search_block(bundle, 4 * k, batch_size, memory_bytes, n)
        if 4 * k * n >= len(bundle.gallery):            # fewer projections: the whole gallery once, not each match
            bundle.gallery.keep_slices(memory_bytes / 4)
        block_start, block = 0, (np.zeros((0, 4 * k), dtype=np.int64),) * 2   # matches of particles block_start…
    t0 = time.time()
    with star.open_images() as stack:
        for idx, images in stack.batches(batch_size):
            parts = ParticleBatch(band, images, {key: v[idx] for key, v in ctf.items()}, bundle.sqrt_weights)
            if local:
                rot, org, pool_score, pool_slices = local_candidates(bundle.projector, band, parts, prior_rot[idx],
                                                                     prior_org[idx], step, sstep, local_steps,
                                                                     local_shift_px)
                far_deg = step
            else:
                if idx[-1] >= block_start + len(block[0]):
                    block_start = idx[0]
                    if bundle.resident:
                        distances, ids = swindex.search(bundle.shards(devices), parts.search_vectors(
                            band, bundle.origins_px, m["normalise"], bundle.gallery.ctf_rms).numpy(), 4 * k, nprobe,
                            memory_bytes)
                        block = nearest_poses(distances, ids, len(bundle.origins_px), 4 * k)
                    else:
                        block = index_matches(bundle, stack, ctf, np.arange(block_start, min(block_start + block_size, n)),
                                              4 * k, nprobe, batch_size, memory_bytes, devices)
                rot, org, pool_score, pool_slices = rerank_matches(bundle, parts, block[0][idx - block_start],
                                                                   block[1][idx - block_start])
                far_deg = 2 * step
            (w_rot, w_org, w_score, gap, _,
             f_rot, f_org, f_score) = select_and_refine(bundle.projector, band, parts, rot, org, pool_score, k, step,
                                                        sstep, far_deg, symmetry, levels, passes, refine_far,
                                                        newton, pool_slices, None if local else DISTINCT_STEPS)
            out["angles_deg"][idx] = matrix_to_euler(w_rot.double()).numpy()
            out["origins_A"][idx] = (w_org * px).numpy()
            out["score"][idx] = w_score.numpy()
            out["confidence"][idx] = gap.numpy()
            out["alt_angles_deg"][idx] = matrix_to_euler(f_rot.double()).numpy()
            out["alt_origins_A"][idx] = (f_org * px).numpy()
            out["alt_score"][idx] = f_score.numpy()
            logger.debug("aligned %d / %d particles (%.1f s, %.1f ms/particle)",
                         idx[-1] + 1, n, time.time() - t0, 1e3 * (time.time() - t0) / (idx[-1] + 1))
    return out


def query(index_dir: str, particles: Union[str, ParticleStar], output: Optional[str], k: int = 5, nprobe: int = 8,
          local: bool = False, prior: Optional[Union[str, ParticleStar]] = None, local_steps: int = 2,
          local_shift_px: Optional[float] = None, devices: Optional[Sequence[str]] = None,
          memory_limit_GB: float = 4.0) -> Dict[str, np.ndarray]:
    """Align the particles of STAR ``particles`` with ``index_dir`` and write ``output`` (STAR).

    Local mode takes the prior poses from STAR ``prior`` (default: the particles' own angles and origins).
    The output is the input table with rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst replaced and the columns
    ``dcSwiftScore`` and ``dcSwiftConfidence`` added. Returns the result arrays.
    """
    if k < 1 or nprobe < 1:
        raise InputError("k and nprobe must be >= 1")
    star = read_particles(particles) if isinstance(particles, str) else particles
    bundle = swindex.load(index_dir, devices[0] if devices and devices[0].startswith("cuda") else "cpu")
    swindex.check_particles(star, bundle.manifest["box"], bundle.manifest["pixel_size_A"], "index %s" % index_dir)
    prior_angles = prior_origins = None
    if local:
        pstar = star if prior is None else (read_particles(prior, require_images=False)
                                           if isinstance(prior, str) else prior)
        if not pstar.has_poses():
            raise InputError("local mode needs prior angles: %s has no rlnAngleRot/Tilt/Psi columns"
                                % (prior or "the particle STAR"))
        if len(pstar) != len(star):
            raise InputError("prior has %d particles, the particle STAR %d" % (len(pstar), len(star)))
        prior_angles, prior_origins = pstar.angles_deg(), pstar.origins_A()
    result = align(bundle, star, k=k, nprobe=nprobe, local=local, prior_angles_deg=prior_angles,
                   prior_origins_A=prior_origins, local_steps=local_steps, local_shift_px=local_shift_px,
                   memory_limit_GB=memory_limit_GB, devices=devices)
    if output is not None:
        out = star.copy()
        out.set_poses(result["angles_deg"], result["origins_A"])
        out.particles["dcSwiftScore"] = result["score"]
        out.particles["dcSwiftConfidence"] = result["confidence"]
        write_particles(output, out)
    return result
