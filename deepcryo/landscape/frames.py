"""One frame for the static body of every group of a landscape: the frame turn that a consensus alignment gives
each conformation, measured on the group maps and taken out of the poses.

Why: a consensus refinement (SwiftRes, RELION) aligns every particle to one map. A particle whose domain is turned
by θ from that map's is then aligned in a frame turned by about θ/2, between its body and its domain, and all
particles of that conformation share the turn. A VAE trained on those poses decodes each conformation in its own
turned frame. Here the frames are measured and made one, from what a user has after a first landscape: the
particles' poses, a grouping of the particles (equal bins along the latent's first principal component,
:func:`quantile_groups`, or the k-means clusters of ``python -m deepcryo.landscape analyze``) and a map of each
group (its particles at their poses, :func:`group_maps`, or analyze's ``cluster_KK_reconstructed.mrc``):

1. :func:`static_body_mask`: where the group maps agree once turned into one frame (low standard deviation across
   them inside the particle), the varying region dilated and removed;
2. :func:`align_group_map`: the small rigid motion (rotation R_k about the box centre, then shift t_k) that overlays
   group k's static body on the reference group's (coarse grid of rotations, then a local search of rotation and
   shift on finer and finer steps, masked correlation). The first static body is found on the
   maps turned by the rotations that overlay the most density (:func:`agreeing_mass`), so that the larger rigid
   part of the particle is taken as the body (a turn between body and domain, as the consensus's, overlays
   neither);
3. :func:`body_frames` then moves all groups by one common motion into the mean of their frames (the consensus's
   frame on average), and :func:`turn_poses` gives each of group k's poses A the pose A·R_kᵀ and its origin o (Å)
   o + (A·R_kᵀ·t_k)_xy, so that its particles reconstruct the map so moved, the static body in the common frame;
   with groups along a value (PC1 of a continuous motion), each particle may instead take the motion interpolated
   along it between the groups' (:func:`interpolated_motions`).

The overlay of group maps that still mix frames (a group spans several conformations) recovers only part of the
turn, so running the VAE, ``analyze`` and this correction again on the moved poses takes out more (see
benchmarks/RESULTS.md).

Conventions: volumes are indexed [z, y, x]; positions are (x, y, z) in pixels from the box centre (index N // 2,
the centre of :class:`deepcryo.core.projector.Projector` and of RELION). A pose A (RELION Euler ZYZ, see
:mod:`deepcryo.core.geometry`) maps volume coordinates to the projection frame: the image is ∫ V(Aᵀ x) dz. Turning a
volume by R and shifting it by t means V'(x) = V(Rᵀ (x − t)) (:func:`rotate_volumes`). The projection of V' at
pose A' = A·Rᵀ with origin o + (A'·t)_xy equals the projection of V at pose A with origin o (RELION origins: the
shift that brings the particle to the box centre), which is why the moved poses reconstruct the moved map. A
rotation is given by a rotation vector ω (axis times angle in radians) or its 3×3 matrix
(:func:`deepcryo.core.geometry.axis_angle_matrices`). The shift is searched with the rotation because a consensus turns each
conformation's frame about a point that is not the box centre (its hinge lies elsewhere), which is a turn about the
centre plus a shift; a search of the rotation alone settles on a smaller turn.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import InputError
from ..core.files import atomic_output
from ..core.fourier import lowpass_volume, resize_volume
from ..core.geometry import (axis_angle_matrices, euler_to_matrix, matrix_to_axis_angle, matrix_to_euler,
                             pose_distance_deg, rotation_angle_deg, rotation_grid, sample_volumes, voxel_positions)
from ..core.mrc import read_mrc, write_mrc
from ..core.particles import ParticleStar, read_particles, write_particles
from ..core.reconstruct import Reconstructor, insert_particles

logger = logging.getLogger(__name__)

__all__ = ["rotate_volumes", "particle_mask", "static_body_mask",
           "agreeing_mass", "masked_correlation", "align_group_map", "body_frames", "turn_poses", "interpolated_motions", "turn_particles", "quantile_groups", "group_maps", "refine_in_groups", "correct_frames"]


#: Smallest static body, as a fraction of the particle mask, whose overlay is trusted. Measured (2026-12-05): 0.32–0.69
#: in the benchmark runs behind benchmarks/RESULTS.md's body-frame sections, 0.46–0.55 on RELION-rendered three-state sets
#: whose PC1 bins followed the states; 0.001 on 3 bins of 200 particles at SNR 0.1 that the VAE had not separated
#: (ARI 0.3), where the turns found (6–15°) were noise.
MIN_STATIC_FRACTION = 0.05

#: Smallest correlation of a group's static body with the reference group's, after its motion is found, for that
#: motion to be applied. Measured (2026-12-05, RELION-rendered three-state sets, 1 500 particles, maps at box 32,
#: SNR 0.1–0.3): 0.62–0.96 for the groups of 27 body-frame runs (bins along PC1 and k-means clusters, groups of
#: 46 to 543 particles against references of up to 933); 0.07 and 0.10 for two k-means clusters (78 particles; 489
#: mixing two states) when the particle mask was the unweighted mean of the group maps, whose motions (18° and 7°)
#: were noise and moved the poses away from the truth.
MIN_STATIC_CORRELATION = 0.5

#: :func:`interpolated_motions` carries the end intervals' motion on to this quantile of the first group's values
#: (and 1 − it of the last group's). Measured (2026-12-07, benchmarks/RESULTS.md, 20 000 RELION-rendered particles of a
#: continuous motion, 8 bins along PC1): the shared turn left at the first conformation 3.38° / 3.05° (two renderings)
#: against 3.92° / 3.92° with the end groups' motions held past their medians and 3.70° / 3.64° with one motion per group.
END_DECILE = 0.1


def rotate_volumes(volume: torch.Tensor, rotations: torch.Tensor, shifts: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
    """``volume`` (N, N, N) turned by each of ``rotations`` (M, 3, 3) about the box centre N // 2, then shifted by
    ``shifts`` (M, 3) (x, y, z) px (default none): out[m](x) = volume(R_mᵀ (x − t_m)), trilinear, zero outside the
    box; (M, N, N, N) in the volume's dtype."""
    n = volume.shape[-1]
    rotations = torch.as_tensor(rotations, dtype=volume.dtype)
    pts = voxel_positions(n, volume.dtype, volume.device)[None]            # (1, N, N, N, 3) (x, y, z)
    if shifts is not None:
        pts = pts - torch.as_tensor(shifts, dtype=volume.dtype)[:, None, None, None, :]
    src = torch.einsum("mdhwj,mjk->mdhwk", pts.expand(len(rotations), n, n, n, 3), rotations)   # (Rᵀ x)ᵀ
    return sample_volumes(volume[None].expand(len(rotations), n, n, n), src)


def _dilate(mask: torch.Tensor, radius_px: int) -> torch.Tensor:
    """Binary dilation (N, N, N) by a cube of half-width ``radius_px``."""
    if radius_px <= 0:
        return mask
    size = 2 * radius_px + 1
    return F.max_pool3d(mask[None, None].to(torch.float64), size, stride=1, padding=radius_px)[0, 0] > 0.5


def _normalise(maps: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each map (K, N, N, N) to zero mean and unit standard deviation inside ``mask`` (maps of groups of different
    sizes differ in scale)."""
    inside = maps[:, mask]
    return (maps - inside.mean(1)[:, None, None, None]) / inside.std(1)[:, None, None, None]


def _unit_weights(weights: Optional[Sequence[float]], k: int) -> np.ndarray:
    """(k,) weights summing to 1 (equal when ``weights`` is None)."""
    w = np.ones(k) if weights is None else np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def particle_mask(maps: np.ndarray, threshold: float = 0.15, dilate_px: int = 2,
                  weights: Optional[np.ndarray] = None) -> np.ndarray:
    """(N, N, N) bool: where the mean of ``maps`` (K, N, N, N) (weighted by ``weights``, e.g. the groups' sizes:
    a small group's noisy map does not blur the mask) exceeds ``threshold`` times its maximum, dilated by
    ``dilate_px`` pixels: the particle, whatever its conformation."""
    mean = np.tensordot(_unit_weights(weights, len(maps)), np.asarray(maps, dtype=np.float64), 1)
    core = torch.as_tensor(mean > threshold * mean.max())
    return _dilate(core, dilate_px).numpy()


def static_body_mask(aligned_maps: np.ndarray, inside: np.ndarray, weights: Optional[np.ndarray] = None,
                     varying_fraction: float = 0.25, dilate_px: int = 2) -> np.ndarray:
    """(N, N, N) bool, the static body: voxels of ``inside`` (the particle mask) where the group maps agree.

    ``aligned_maps`` (K, N, N, N) are the group maps in one frame, normalised alike; the varying region is where
    their standard deviation across groups (weighted by ``weights``, e.g. the groups' sizes) exceeds
    ``varying_fraction`` of its maximum inside the particle, dilated by ``dilate_px`` pixels and removed."""
    w = _unit_weights(weights, len(aligned_maps))
    mean = np.tensordot(w, aligned_maps, 1)
    std = np.sqrt(np.tensordot(w, (aligned_maps - mean) ** 2, 1))
    varying = inside & (std > varying_fraction * std[inside].max())
    return inside & ~_dilate(torch.as_tensor(varying), dilate_px).numpy()


def agreeing_mass(turned: torch.Tensor, reference: torch.Tensor, inside: torch.Tensor,
                  tolerance: float = 0.1, smooth_px: int = 1) -> torch.Tensor:
    """(M,) the reference's density (its positive part, inside the particle mask) where each turned map (M, N, N, N)
    agrees with the reference (N, N, N): the local mean squared difference, over a cube of half-width
    ``smooth_px``, below ``tolerance`` times the local mean square of the two maps. The turn that overlays the
    larger rigid part of the particle scores highest; a turn between two parts overlays neither."""
    size = 2 * smooth_px + 1

    def local(x):
        return F.avg_pool3d(x[:, None], size, stride=1, padding=smooth_px)[:, 0]

    diff = local((turned - reference) ** 2)
    power = local(0.5 * (turned ** 2 + reference ** 2)) + 1e-12
    density = torch.clamp(reference, min=0) * inside
    return ((diff < tolerance * power) * density).sum((1, 2, 3))


def masked_correlation(turned: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(M,) Pearson correlation of each turned map (M, N, N, N) with the reference (N, N, N) over the voxels of
    ``mask`` (N, N, N, bool)."""
    a, b = turned[:, mask], reference[mask]
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean()
    return (a @ b) / (a.norm(dim=1) * b.norm() + 1e-12)


def _best(volume, reference, rotations, shifts, score, batch=256):
    """(rotation, shift, score) of the best ``score(moved, reference)`` over the candidate motions ``rotations``
    (M, 3, 3) and ``shifts`` (M, 3), in batches."""
    best, best_score = None, -np.inf
    for start in range(0, len(rotations), batch):
        s = score(rotate_volumes(volume, torch.as_tensor(rotations[start:start + batch]),
                                 torch.as_tensor(shifts[start:start + batch])), reference)
        i = int(torch.argmax(s))
        if float(s[i]) > best_score:
            best, best_score = (rotations[start + i], shifts[start + i]), float(s[i])
    return best[0], best[1], best_score


_STEPS = np.concatenate([np.eye(6), -np.eye(6)])      # one step along each rotation-vector and shift coordinate


def _local_search(volume, reference, score, rotation, shift, max_angle_deg, max_shift_px, angle_step_deg=2.0,
                  shift_step_px=0.5, final_angle_step_deg=0.2):
    """Compass search of the rigid motion near (``rotation``, ``shift``): the best of the 12 motions one step away
    along one rotation-vector or shift coordinate, moved to while it improves the score, then the steps halved,
    until the angle step is below ``final_angle_step_deg``; motions kept within ``max_angle_deg`` of the identity and
    ``max_shift_px`` per axis. (rotation, shift, score)."""
    best = _best(volume, reference, rotation[None], shift[None], score)[2]
    while angle_step_deg >= final_angle_step_deg:
        rot = axis_angle_matrices(np.radians(_STEPS[:, :3] * angle_step_deg)).numpy() @ rotation
        sh = shift + _STEPS[:, 3:] * shift_step_px
        keep = ((rotation_angle_deg(torch.as_tensor(rot)).numpy() <= max_angle_deg + 1e-6)
                & (np.abs(sh).max(1) <= max_shift_px + 1e-9))
        r, t, value = _best(volume, reference, rot[keep], sh[keep], score)
        if value > best + 1e-12:
            rotation, shift, best = r, t, value
        else:
            angle_step_deg, shift_step_px = angle_step_deg / 2, shift_step_px / 2
    return rotation, shift, best


def align_group_map(volume: np.ndarray, reference: np.ndarray, mask: np.ndarray, max_angle_deg: float = 20.0,
                    max_shift_px: float = 2.0, coarse_step_deg: float = 4.0, shift: Optional[np.ndarray] = None
                    ) -> Tuple[np.ndarray, np.ndarray, float]:
    """The rigid motion (rotation R (3, 3) about the box centre, at most ``max_angle_deg`` degrees, then shift t
    (3,) px, at most ``max_shift_px`` per axis) that best overlays ``volume`` so moved (V(Rᵀ (x − t))) on
    ``reference`` inside ``mask`` (masked correlation): the best rotation of a grid of step ``coarse_step_deg``
    over the whole range at the shift ``shift`` (default none), then a local search of rotation and shift
    together on finer and finer steps; (R, t, correlation)."""
    v = torch.as_tensor(np.asarray(volume, dtype=np.float64))
    ref = torch.as_tensor(np.asarray(reference, dtype=np.float64))
    mask = torch.as_tensor(mask)
    shift = np.zeros(3) if shift is None else np.asarray(shift, dtype=np.float64)

    def score(t, r):
        return masked_correlation(t, r, mask)

    grid = rotation_grid(max_angle_deg, coarse_step_deg).numpy()
    rotation, _, _ = _best(v, ref, grid, np.repeat(shift[None], len(grid), 0), score)
    return _local_search(v, ref, score, rotation, shift, max_angle_deg, max_shift_px)


def _agreeing_start(volume, reference, inside, max_angle_deg, max_shift_px, step_deg, tolerance):
    """The rigid motion of ``volume`` that agrees with ``reference`` over the most density (:func:`agreeing_mass`):
    the best rotation of a grid of ``step_deg`` within ``max_angle_deg``, then a local search of rotation and
    shift; (rotation, shift)."""
    v, ref = torch.as_tensor(volume), torch.as_tensor(reference)
    inside = torch.as_tensor(inside)

    def score(t, r):
        return agreeing_mass(t, r, inside, tolerance)

    grid = rotation_grid(max_angle_deg, step_deg).numpy()
    best, _, _ = _best(v, ref, grid, np.zeros((len(grid), 3)), score)
    rotation, shift, _ = _local_search(v, ref, score, best, np.zeros(3), max_angle_deg, max_shift_px,
                                       final_angle_step_deg=0.5)
    return rotation, shift


def body_frames(maps: np.ndarray, sizes: Optional[Sequence[int]] = None, reference: Optional[int] = None,
                max_angle_deg: float = 20.0, max_shift_px: float = 2.0, coarse_step_deg: float = 4.0,
                iterations: int = 2, varying_fraction: float = 0.25, tolerance: float = 0.1, frame: str = "mean"
                ) -> Dict[str, np.ndarray]:
    """The rigid motion (R_k, t_k) of each group map (K, N, N, N) that brings its static body onto the reference
    group's (:func:`rotate_volumes`: V(R_kᵀ (x − t_k)), t_k in px of the maps).

    ``reference``: index of the group the others are aligned to (default the most populated one by ``sizes``, else
    the middle one). ``frame``: ``"mean"`` (default) then moves all groups by one common motion, so that their
    motions average to none (weighted by ``sizes``): the body lands in the mean of the groups' frames, which is the
    consensus's frame on average (a consensus aligned to one map turns the conformations on either side of it in
    opposite senses); ``"reference"`` keeps the reference group's frame. Each group is first moved onto the reference by the motion (rotation grid of
    ``coarse_step_deg`` within ``max_angle_deg``, then a local search with shifts up to ``max_shift_px``) that
    overlays the most density (:func:`agreeing_mass` with ``tolerance``: the larger rigid part is taken as the
    body); then, ``iterations`` times, the static body is found on the maps so moved (:func:`static_body_mask` with
    ``varying_fraction``, weighted by ``sizes``) and each motion searched again by masked correlation on it
    (:func:`align_group_map`). The maps are first brought to zero mean and unit standard deviation inside the
    particle mask (:func:`particle_mask`).

    A group whose static body then correlates with the reference's under :data:`MIN_STATIC_CORRELATION` is not
    measured: its map does not show the body well enough for its turn to be found (too few particles, or a mix of
    conformations and frames). It then takes the reference group's motion (none in the reference's frame, the
    common motion in the mean frame), and neither shapes the static body (once more through the iterations,
    without it) nor weighs in the mean of the frames.

    Returns ``rotations`` (K, 3, 3), ``shifts_px`` (K, 3), ``angles_deg`` (K,), ``correlation`` (K,) on the
    static body at the motion found, ``measured`` (K,) bool (False: not moved for low correlation), ``static`` and
    ``particle`` masks (N, N, N) bool, and ``reference`` (the index used). InputError when the static body is
    under :data:`MIN_STATIC_FRACTION` of the particle mask (the maps agree nowhere).
    """
    maps = np.asarray(maps, dtype=np.float64)
    k = len(maps)
    if frame not in ("mean", "reference"):
        raise InputError("frame %r: 'mean' or 'reference'" % frame)
    if maps.ndim != 4 or k < 2 or len(set(maps.shape[1:])) != 1:
        raise InputError("need 2 or more cubic group maps of one box, got shape %s" % (maps.shape,))
    weights = np.ones(k) if sizes is None else np.asarray(sizes, dtype=np.float64)
    if reference is None:
        reference = int(np.argmax(weights)) if sizes is not None else k // 2
    inside = particle_mask(maps, weights=weights)
    maps = _normalise(maps, inside)
    ref = maps[reference]
    rotations, shifts = np.repeat(np.eye(3)[None], k, 0), np.zeros((k, 3))
    for g in range(k):
        if g != reference:
            rotations[g], shifts[g] = _agreeing_start(maps[g], ref, inside, max_angle_deg, max_shift_px,
                                                      coarse_step_deg, tolerance)
    correlation, measured = np.ones(k), np.ones(k, dtype=bool)
    static = inside
    passes, done = iterations, 0
    while done < passes:
        moved = np.stack([rotate_volumes(torch.as_tensor(m), torch.as_tensor(r[None]), torch.as_tensor(t[None]))[0]
                          .numpy() for m, r, t in zip(maps, rotations, shifts)])
        static = static_body_mask(moved, inside, weights * measured, varying_fraction)
        if static.sum() < MIN_STATIC_FRACTION * inside.sum():
            raise InputError("the group maps agree on %.2g %% of the particle only, too little for a static body "
                             "(groups too small or too noisy?): use fewer groups or a lower resolution"
                             % (100 * static.sum() / inside.sum()))
        for g in range(k):
            if g != reference:
                rotations[g], shifts[g], correlation[g] = align_group_map(
                    maps[g], ref, static, max_angle_deg, max_shift_px, coarse_step_deg, shift=shifts[g])
        now = correlation >= MIN_STATIC_CORRELATION
        done += 1
        if done == passes == iterations and (now != measured).any():
            passes += 1                 # once more, the static body from the groups that show it only
        measured = now
    if not measured.all():
        logger.warning("groups %s: static-body correlation %s under %.2g, not moved",
                       (np.flatnonzero(~measured) + 1).tolist(), np.round(correlation[~measured], 2).tolist(),
                       MIN_STATIC_CORRELATION)
        rotations[~measured], shifts[~measured] = np.eye(3), 0.0
    if frame == "mean":
        rotations, shifts = _recentre(rotations, shifts, weights * measured)
    angles = rotation_angle_deg(torch.as_tensor(rotations)).numpy()
    logger.info("static body %.0f %% of the particle mask; turns (deg) %s, shifts (px) %s",
                100 * static.sum() / inside.sum(), np.round(angles, 2).tolist(), np.round(shifts, 2).tolist())
    return {"rotations": rotations, "shifts_px": shifts, "angles_deg": angles, "correlation": correlation,
            "measured": measured, "static": static, "particle": inside, "reference": np.int64(reference)}


def _recentre(rotations, shifts, weights):
    """The motions (R_k, t_k) followed by the common motion C (rotation C, shift c) that makes their weighted mean
    the identity: C = (mean R_k)ᵀ (projected onto the rotations), c = −C·(mean t_k); (rotations, shifts)."""
    w = _unit_weights(weights, len(rotations))
    u, _, vt = np.linalg.svd(np.tensordot(w, rotations, 1))
    mean = u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt
    common = mean.T
    return common @ rotations, (shifts - w @ shifts) @ common.T


def turn_poses(angles_deg: np.ndarray, origins_A: np.ndarray, rotation: np.ndarray, shift_A: np.ndarray
               ) -> Tuple[np.ndarray, np.ndarray]:
    """Poses and origins for the map moved by (R, t): (N, 3) Euler angles (degrees, RELION ZYZ) of A' = A·Rᵀ and
    (N, 2) origins (Å) o + (A'·t)_xy, ``rotation`` R (3, 3) and ``shift_A`` t (3,) in Å, one for all, or (N, 3, 3)
    and (N, 3), one per particle. The images, unchanged, then reconstruct V(Rᵀ (x − t)): its projection at A' with
    origin o + (A'·t)_xy is that of V at A with origin o."""
    a = euler_to_matrix(torch.as_tensor(np.asarray(angles_deg, dtype=np.float64))).numpy()
    turned = a @ np.swapaxes(np.asarray(rotation, dtype=np.float64), -1, -2)
    shift = np.broadcast_to(np.asarray(shift_A, dtype=np.float64), (len(a), 3))
    origins = np.asarray(origins_A, dtype=np.float64) + (turned @ shift[..., None])[:, :2, 0]
    return matrix_to_euler(torch.as_tensor(turned)).numpy(), origins


def interpolated_motions(values: np.ndarray, groups: np.ndarray, rotations: np.ndarray, shifts: np.ndarray
                         ) -> Tuple[np.ndarray, np.ndarray]:
    """Each particle's rigid motion, (N, 3, 3) rotations and (N, 3) shifts (the unit of ``shifts``), interpolated
    along ``values`` (N,) between the groups' motions (``rotations`` (K, 3, 3), ``shifts`` (K, 3)), each placed at
    the median value of its group (``groups`` (N,), 0-based, groups ordered along ``values`` as
    :func:`quantile_groups` makes them): rotation vectors and shifts piecewise linear between the medians and, past
    the end medians, on the end intervals' slopes out to the first group's lower and the last group's upper
    :data:`END_DECILE`, constant beyond.

    Why: a group's motion is the mean over its particles, whose conformations spread along the bin; one motion for
    all leaves the particles at either edge of a bin turned by a step's difference from their neighbours across the
    edge. Interpolated, each particle takes the motion expected at its own value, the group's mean kept at its
    median. At the ends of the motion a group's mean falls short of its end conformation's motion (the bin also
    holds neighbouring conformations, turned less), so the motion goes on past the end medians; not into the far
    tails, which hold a latent coordinate's noisiest particles. Turns are small (within ``correct_frames``'
    ``max_angle_deg``), so rotation vectors interpolate rotations about one hinge exactly and others closely."""
    values, groups = np.asarray(values, dtype=np.float64), np.asarray(groups, dtype=np.int64)
    present = [g for g in range(len(rotations)) if (groups == g).any()]
    medians = np.array([np.median(values[groups == g]) for g in present])
    if (np.diff(medians) <= 0).any():
        raise InputError("group medians %s are not increasing along the values: groups must be bins of them"
                         % np.round(medians, 3).tolist())
    vectors = matrix_to_axis_angle(torch.as_tensor(np.asarray(rotations, dtype=np.float64)[present])).numpy()
    motion = np.concatenate([vectors, np.asarray(shifts, dtype=np.float64)[present]], axis=1)
    if len(present) > 1:                # the end intervals' slopes carried out to the end groups' outer deciles
        outer = np.array([np.percentile(values[groups == present[0]], 100 * END_DECILE),
                          np.percentile(values[groups == present[-1]], 100 * (1 - END_DECILE))])
        ends = motion[[0, -1]] + (motion[[0, -1]] - motion[[1, -2]]) * (
            (outer - medians[[0, -1]]) / (medians[[0, -1]] - medians[[1, -2]]))[:, None]
        medians = np.concatenate([outer[:1], medians, outer[1:]])
        motion = np.concatenate([ends[:1], motion, ends[1:]])
    each = np.stack([np.interp(values, medians, column) for column in motion.T], axis=1)
    return axis_angle_matrices(each[:, :3]).numpy(), each[:, 3:]


def turn_particles(star: ParticleStar, groups: np.ndarray, rotations: np.ndarray, shifts_A: np.ndarray,
                   values: Optional[np.ndarray] = None) -> ParticleStar:
    """A copy of ``star`` with group g's poses and origins (``groups`` (N,), 0-based) moved by ``rotations[g]``
    and ``shifts_A[g]`` (Å) (:func:`turn_poses`), or with ``values`` (N,) by the motion interpolated along them
    (:func:`interpolated_motions`); every other column is kept."""
    groups = np.asarray(groups, dtype=np.int64)
    if len(groups) != len(star) or groups.min() < 0 or groups.max() >= len(rotations):
        raise InputError("%d group labels for %d particles and %d turns" % (len(groups), len(star), len(rotations)))
    if values is None:
        each = np.asarray(rotations, dtype=np.float64)[groups], np.asarray(shifts_A, dtype=np.float64)[groups]
    else:
        each = interpolated_motions(values, groups, rotations, shifts_A)
    out = star.copy()
    out.set_poses(*turn_poses(star.angles_deg(), star.origins_A(), *each))
    return out


def quantile_groups(values: np.ndarray, n_groups: int) -> np.ndarray:
    """(N,) 0-based groups of equal size along ``values`` (e.g. the latent's first principal component, along which
    a continuous motion runs; k-means of the latent may split it across the motion instead)."""
    order = np.argsort(np.asarray(values, dtype=np.float64), kind="stable")
    groups = np.empty(len(order), dtype=np.int64)
    groups[order] = np.arange(len(order)) * n_groups // len(order)
    return groups


def group_maps(star: ParticleStar, groups: np.ndarray, n_groups: int, box: int, batch_size: int = 256
               ) -> Tuple[np.ndarray, float]:
    """Each group's map (n_groups, box, box, box) from its particles at their poses (CTF-weighted direct Fourier
    inversion, :func:`deepcryo.core.reconstruct.insert_particles`), Fourier-cropped to ``box``; (maps, Å/px).
    InputError when ``box`` exceeds the particles' box (the maps would hold no information beyond it)."""
    with star.open_images() as stack:
        if box > stack.box:
            raise InputError("--box %d px: at most the particles' box, %d px" % (box, stack.box))
        recs = {g: Reconstructor(stack.box) for g in range(n_groups)}
        insert_particles(star, stack, np.asarray(groups, dtype=np.int64), recs, batch_size)
        full = stack.box
    maps = np.stack([resize_volume(torch.as_tensor(recs[g].reconstruct()), box).numpy() for g in range(n_groups)])
    return maps, star.pixel_size_A * full / box


def refine_in_groups(star: ParticleStar, groups: np.ndarray, n_groups: int, resolution_A: float = 8.0,
                     angular_step_deg: float = 1.5, steps: int = 3, max_shift_px: float = 1.0) -> ParticleStar:
    """A copy of ``star`` with each particle's pose refined against the map of its own group (``groups`` (N,),
    0-based): the group's particles at their poses reconstructed at the particles' box (:func:`group_maps`) and
    low-passed to ``resolution_A`` (Å; the caller keeps it no finer than the particles' Nyquist limit, as
    :func:`correct_frames` does), then SwiftAlign's local search (:func:`deepcryo.swiftalign.query.align`, local
    mode): rotations within ±``steps`` steps of ``angular_step_deg`` (degrees) of the pose, origins within
    ±``max_shift_px`` px in half-pixel steps, the best candidates refined. Every other column is kept.

    Why: the turn of a group is one rotation for all its particles, so what the consensus left of each particle's
    own scatter stays, and the particles of a group spread over a few neighbouring conformations, each of which
    took a slightly different consensus turn. Against its group's map, which is in the common frame and much
    closer to the particle's conformation than the consensus was, each particle finds its own pose. This pays where
    the groups hold thousands of particles (their maps are sharp); with a few hundred per group the maps are noisy
    and the search gains little, and searching again against maps rebuilt from the new poses drifts
    (benchmarks/RESULTS.md, "The landscape from estimated poses at 20 000 particles"). The maps hold the particles searched against
    them, as a refinement's reference does within its half set."""
    from ..swiftalign.query import align
    from ..swiftalign.refine import LocalReference

    groups = np.asarray(groups, dtype=np.int64)
    maps, pixel_A = group_maps(star, groups, n_groups, star.box_size)
    angles, origins = star.angles_deg(), star.origins_A()
    for g in range(n_groups):
        members = np.flatnonzero(groups == g)
        if len(members) == 0:
            continue
        volume = lowpass_volume(torch.as_tensor(maps[g], dtype=torch.float64), resolution_A, pixel_A)
        reference = LocalReference(volume.numpy().astype(np.float32), pixel_A, resolution_A, angular_step_deg, 0.5,
                                   max_shift_px, "C1")
        part = star.subset(members)
        found = align(reference, part, k=3, local=True, prior_angles_deg=part.angles_deg(),
                      prior_origins_A=part.origins_A(), local_steps=steps, local_shift_px=max_shift_px)
        angles[members], origins[members] = found["angles_deg"], found["origins_A"]
        logger.info("group %d: %d particles refined against its map (%.0f Å), median move %.2f°", g + 1,
                    len(members), resolution_A,
                    float(np.median(pose_distance_deg(part.angles_deg(), found["angles_deg"]).numpy())))
    out = star.copy()
    out.set_poses(angles, origins)
    return out


def correct_frames(particles: str, output: str, maps: Optional[Sequence[str]] = None,
                   group_column: str = "dcCluster", bins: int = 0, box: int = 32, reference: Optional[int] = None,
                   max_angle_deg: float = 20.0, max_shift_A: float = 8.0, resolution_A: float = 10.0,
                   refine_resolution_A: float = 0.0, interpolate: bool = False) -> Dict[str, object]:
    """Write ``output``, the particles of ``particles`` with each group's poses and origins moved into one body
    frame (:func:`body_frames` on the group maps low-passed to ``resolution_A``, shifts up to ``max_shift_A`` per
    axis; :func:`turn_particles`), beside it ``<output stem>_frames.json`` (the groups, turns, shifts and
    correlations on the static body) and ``<output stem>_static_body.mrc`` (the static body mask, 0/1, at the
    maps' box); returns the JSON's content.

    Groups: with ``bins`` > 0, ``bins`` equal groups along ``group_column`` (:func:`quantile_groups`, e.g.
    ``dcPC1``); else ``group_column`` holds the 1-based group (``dcCluster``: analyze's k-means clusters).
    ``maps``: one map per group, group 1 first, as analyze's ``cluster_KK_reconstructed.mrc`` (any box: the turns
    are angles, the shifts are converted with the maps' pixel size); without them each group's particles are
    reconstructed at ``box`` (:func:`group_maps`). Group maps of a few hundred noisy particles need the low-pass.
    ``reference``: 1-based group whose frame the others take (default none: all groups into the mean of their
    frames, :func:`body_frames`). ``refine_resolution_A`` > 0: then each particle's pose is refined against its
    group's map at the particles' box, low-passed to it or to the particles' Nyquist limit if that is coarser
    (:func:`refine_in_groups`; the JSON records the value used). ``interpolate`` (with ``bins``): each particle
    takes the motion interpolated along ``group_column`` between its group's and the neighbouring groups'
    (:func:`interpolated_motions`) instead of its group's."""
    if refine_resolution_A < 0:
        raise InputError("--refine-resolution %g: a resolution in Å, or 0 for no refinement" % refine_resolution_A)
    if interpolate and bins <= 0:
        raise InputError("--interpolate: needs --bins (groups along a value, as dcPC1); clusters have no order")
    star = read_particles(particles)
    if group_column not in star.particles:
        raise InputError("%s: no %s column (analyze writes dcCluster and dcPC1)" % (particles, group_column))
    values = np.asarray(star.particles[group_column], dtype=np.float64)
    if bins > 0:
        groups, n_groups = quantile_groups(values, bins), bins
    else:
        groups = values.astype(np.int64) - 1
        n_groups = len(maps) if maps else int(groups.max()) + 1
    if groups.min() < 0 or groups.max() >= n_groups or (maps and len(maps) != n_groups):
        raise InputError("%s: groups %d … %d in %s but %d maps" % (particles, groups.min() + 1, groups.max() + 1,
                                                                  group_column, len(maps or [])))
    if reference is not None and not 1 <= reference <= n_groups:
        raise InputError("--reference %d: not a group 1 … %d" % (reference, n_groups))
    if maps:
        volumes = [read_mrc(path) for path in maps]
        raw, pixel_A = np.stack([v for v, _ in volumes]), volumes[0][1]
    else:
        raw, pixel_A = group_maps(star, groups, n_groups, box)
    filtered = np.stack([lowpass_volume(torch.as_tensor(v, dtype=torch.float64), resolution_A, pixel_A).numpy()
                         for v in raw])
    sizes = group_sizes(groups, n_groups)
    found = body_frames(filtered, sizes=sizes, reference=None if reference is None else reference - 1,
                        max_angle_deg=max_angle_deg, max_shift_px=max_shift_A / pixel_A,
                        frame="mean" if reference is None else "reference")
    shifts_A = found["shifts_px"] * pixel_A
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    out = turn_particles(star, groups, found["rotations"], shifts_A, values if interpolate else None)
    if refine_resolution_A > 0:
        refine_resolution_A = max(refine_resolution_A, 2 * star.pixel_size_A)      # at most Nyquist; recorded
        out = refine_in_groups(out, groups, n_groups, refine_resolution_A)
    out.particles["dcFrameGroup"] = groups + 1
    write_particles(output, out)
    stem = os.path.splitext(output)[0]
    write_mrc(stem + "_static_body.mrc", found["static"].astype(np.float32), pixel_A)
    summary = {"particles": os.path.abspath(particles), "maps": [os.path.abspath(m) for m in maps or []],
               "group_column": group_column, "bins": bins, "aligned_to_group": int(found["reference"]) + 1,
               "frame": "mean" if reference is None else "group %d" % reference, "group_sizes": sizes,
               "resolution_A": resolution_A, "refine_resolution_A": refine_resolution_A,
               "interpolated": bool(interpolate), "turn_deg": found["angles_deg"].tolist(),
               "rotations": found["rotations"].tolist(), "shifts_A": shifts_A.tolist(),
               "static_body_correlation": found["correlation"].tolist(),
               "measured": found["measured"].tolist(), "min_static_correlation": MIN_STATIC_CORRELATION,
               "static_body_fraction_of_particle": float(found["static"].sum() / found["particle"].sum())}
    with atomic_output(stem + "_frames.json") as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    logger.info("%s: %d particles in %d groups, turned by %s degrees (frame: %s)", output, len(star), n_groups,
                np.round(found["angles_deg"], 2).tolist(), summary["frame"])
    return summary


def group_sizes(groups: np.ndarray, n_groups: int) -> List[int]:
    """Particles per group (``groups`` 0-based)."""
    return np.bincount(np.asarray(groups, dtype=np.int64), minlength=n_groups).tolist()
