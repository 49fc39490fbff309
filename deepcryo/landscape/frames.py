"""One frame for the static body of every group of a landscape: the frame turn that a consensus alignment gives
each conformation, measured on the group maps and taken out of the poses.

Why: a consensus refinement (SwiftRes, RELION) aligns every particle to one map. A particle whose domain is turned
by θ from that map's is then aligned in a frame turned by about θ/2, between its body and its domain, and all
particles of that conformation share the turn. A VAE trained on those poses decodes each conformation in its own
turned frame. Here the frames are measured and made one, from what a user has after a first landscape: the
particles' poses, a grouping of the particles (the k-means clusters of ``python -m deepcryo.landscape analyze``)
and a map of each group (its ``cluster_KK_reconstructed.mrc``, the group's particles at their poses):

1. :func:`static_body_mask`: where the group maps agree once turned into one frame (low standard deviation across
   them inside the particle), the varying region dilated and removed;
2. :func:`align_group_map`: the small rotation R_k about the box centre that overlays group k's static body on the
   reference group's (coarse grid then finer grids, masked correlation). The first static body is found on the
   maps turned by the rotations that overlay the most density (:func:`agreeing_mass`), so that the larger rigid
   part of the particle is taken as the body (a turn between body and domain, as the consensus's, overlays
   neither);
3. :func:`turn_poses`: each of group k's poses A becomes A·R_kᵀ, so that its particles reconstruct the map turned by
   R_k, the static body in the reference group's frame.

Conventions: volumes are indexed [z, y, x]; positions are (x, y, z) in pixels from the box centre (index N // 2,
the centre of :class:`deepcryo.core.projector.Projector` and of RELION). A pose A (RELION Euler ZYZ, see
:mod:`deepcryo.core.geometry`) maps volume coordinates to the projection frame: the image is ∫ V(Aᵀ x) dz. Turning a
volume by R means V_R(x) = V(Rᵀ x) (:func:`rotate_volumes`). The projection of V_R at pose A·Rᵀ equals the
projection of V at pose A, which is why the turned poses reconstruct the turned map. A rotation is given by a
rotation vector ω (axis times angle in radians) or its 3×3 matrix (:func:`rotation_vector_matrix`). The turn is
about the box centre only: a turn about another point is a turn about the centre plus a shift, and the shift of
each particle (its origin) is left as the consensus found it.
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
from ..core.geometry import euler_to_matrix, matrix_to_euler, rotation_angle_deg
from ..core.mrc import read_mrc, write_mrc
from ..core.particles import ParticleStar, read_particles, write_particles

logger = logging.getLogger(__name__)

__all__ = ["rotation_vector_matrix", "rotation_grid", "rotate_volumes", "particle_mask", "static_body_mask",
           "agreeing_mass", "masked_correlation", "align_group_map", "body_frames", "turn_poses", "turn_particles", "correct_frames"]


def rotation_vector_matrix(omega: np.ndarray) -> np.ndarray:
    """(..., 3) rotation vectors (axis × angle, radians) → (..., 3, 3) rotation matrices (Rodrigues), acting on
    (x, y, z) column vectors: a positive angle turns counter-clockwise about the axis."""
    omega = np.asarray(omega, dtype=np.float64)
    angle = np.linalg.norm(omega, axis=-1)[..., None, None]
    k = np.zeros(omega.shape[:-1] + (3, 3))
    k[..., 0, 1], k[..., 0, 2], k[..., 1, 2] = -omega[..., 2], omega[..., 1], -omega[..., 0]
    k = k - np.swapaxes(k, -1, -2)
    safe = np.where(angle > 1e-12, angle, 1.0)
    sin_term = np.where(angle > 1e-12, np.sin(angle) / safe, 1.0)
    cos_term = np.where(angle > 1e-12, (1 - np.cos(angle)) / safe ** 2, 0.5)
    return np.eye(3) + sin_term * k + cos_term * (k @ k)


def rotation_grid(max_angle_deg: float, step_deg: float) -> np.ndarray:
    """(M, 3, 3) rotations whose rotation vectors lie on a cubic grid of spacing ``step_deg`` inside the ball of
    radius ``max_angle_deg`` (degrees), the identity included."""
    n = int(np.floor(max_angle_deg / step_deg + 1e-9))
    axis = np.arange(-n, n + 1) * step_deg
    omega = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    omega = omega[np.linalg.norm(omega, axis=1) <= max_angle_deg + 1e-9]
    return rotation_vector_matrix(np.radians(omega))


def rotate_volumes(volume: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """``volume`` (N, N, N) turned by each of ``rotations`` (M, 3, 3) about the box centre N // 2:
    out[m](x) = volume(R_mᵀ x), trilinear, zero outside the box; (M, N, N, N) in the volume's dtype."""
    n = volume.shape[-1]
    rotations = torch.as_tensor(rotations, dtype=volume.dtype)
    centre = n // 2
    c = torch.arange(n, dtype=volume.dtype) - centre
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    pts = torch.stack([x, y, z], -1)                                        # (N, N, N, 3) (x, y, z)
    src = torch.einsum("dhwj,mjk->mdhwk", pts, rotations)                   # row vector x·R = (Rᵀ x)ᵀ
    grid = (src + centre) / (n - 1) * 2 - 1                                 # align_corners=True
    vol = volume[None, None].expand(len(rotations), 1, n, n, n)
    return F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0]


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


def particle_mask(maps: np.ndarray, threshold: float = 0.15, dilate_px: int = 2) -> np.ndarray:
    """(N, N, N) bool: where the mean of ``maps`` (K, N, N, N) exceeds ``threshold`` times its maximum, dilated by
    ``dilate_px`` pixels: the particle, whatever its conformation."""
    mean = np.asarray(maps, dtype=np.float64).mean(0)
    core = torch.as_tensor(mean > threshold * mean.max())
    return _dilate(core, dilate_px).numpy()


def static_body_mask(aligned_maps: np.ndarray, inside: np.ndarray, weights: Optional[np.ndarray] = None,
                     varying_fraction: float = 0.25, dilate_px: int = 2) -> np.ndarray:
    """(N, N, N) bool, the static body: voxels of ``inside`` (the particle mask) where the group maps agree.

    ``aligned_maps`` (K, N, N, N) are the group maps in one frame, normalised alike; the varying region is where
    their standard deviation across groups (weighted by ``weights``, e.g. the groups' sizes) exceeds
    ``varying_fraction`` of its maximum inside the particle, dilated by ``dilate_px`` pixels and removed."""
    w = np.ones(len(aligned_maps)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
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


def _best(volume, reference, rotations, score, batch=256):
    """(best rotation, its score) of ``score(turned, reference)`` over ``rotations`` (M, 3, 3), in batches."""
    best, best_score = None, -np.inf
    for start in range(0, len(rotations), batch):
        chunk = torch.as_tensor(rotations[start:start + batch])
        s = score(rotate_volumes(volume, chunk), reference)
        i = int(torch.argmax(s))
        if float(s[i]) > best_score:
            best, best_score = rotations[start + i], float(s[i])
    return best, best_score


def align_group_map(volume: np.ndarray, reference: np.ndarray, mask: np.ndarray, max_angle_deg: float = 20.0,
                    coarse_step_deg: float = 4.0, refinements: int = 3) -> Tuple[np.ndarray, float]:
    """The rotation R (3, 3) about the box centre, at most ``max_angle_deg`` degrees, that best overlays
    ``volume`` turned by R (V_R(x) = V(Rᵀ x)) on ``reference`` inside ``mask`` (masked correlation): the best of a
    grid of step ``coarse_step_deg`` over the whole range, then ``refinements`` times the best of a grid of step
    s/4 and half-width s/2 about the best so far (s the previous step: 4°, then 1°, 0.25°, 0.0625° by default);
    (R, correlation)."""
    v = torch.as_tensor(np.asarray(volume, dtype=np.float64))
    ref = torch.as_tensor(np.asarray(reference, dtype=np.float64))
    mask = torch.as_tensor(mask)

    def score(t, r):
        return masked_correlation(t, r, mask)

    rotation, correlation = _best(v, ref, rotation_grid(max_angle_deg, coarse_step_deg), score)
    step = coarse_step_deg
    for _ in range(refinements):
        step /= 4
        local = rotation_grid(2 * step, step) @ rotation
        local = local[rotation_angle_deg(torch.as_tensor(local)).numpy() <= max_angle_deg + 1e-6]
        rotation, correlation = _best(v, ref, local, score)
    return rotation, correlation


def _agreeing_start(volume, reference, inside, max_angle_deg, step_deg, tolerance):
    """The rotation whose turn of ``volume`` agrees with ``reference`` over the most density
    (:func:`agreeing_mass`): on a grid of ``step_deg`` within ``max_angle_deg``, then on a grid of a quarter of that
    step about the best."""
    v, ref = torch.as_tensor(volume), torch.as_tensor(reference)
    inside = torch.as_tensor(inside)

    def score(t, r):
        return agreeing_mass(t, r, inside, tolerance)

    best = _best(v, ref, rotation_grid(max_angle_deg, step_deg), score)[0]
    local = rotation_grid(step_deg, step_deg / 4) @ best
    local = local[rotation_angle_deg(torch.as_tensor(local)).numpy() <= max_angle_deg + 1e-6]
    return _best(v, ref, local, score)[0]


def body_frames(maps: np.ndarray, sizes: Optional[Sequence[int]] = None, reference: Optional[int] = None,
                max_angle_deg: float = 20.0, coarse_step_deg: float = 4.0, iterations: int = 2,
                varying_fraction: float = 0.25, tolerance: float = 0.1) -> Dict[str, np.ndarray]:
    """The turn R_k (3, 3) of each group map (K, N, N, N) that brings its static body onto the reference group's.

    ``reference``: index of the reference group (default the most populated one by ``sizes``, else the middle
    one); its turn is the identity. Each group is first turned onto the reference by the rotation (grid of
    ``coarse_step_deg`` within ``max_angle_deg``, then a finer one) that overlays the most density
    (:func:`agreeing_mass` with ``tolerance``: the larger rigid part is taken as the body); then, ``iterations``
    times, the static body is found on the maps so turned (:func:`static_body_mask` with ``varying_fraction``) and
    each turn searched again by masked correlation on it (:func:`align_group_map`). The maps are first brought to
    zero mean and unit standard deviation inside the particle mask (:func:`particle_mask`).

    Returns ``rotations`` (K, 3, 3), ``angles_deg`` (K,), ``correlation`` (K,) on the static body, ``static`` and
    ``particle`` masks (N, N, N) bool, and ``reference`` (the index used).
    """
    maps = np.asarray(maps, dtype=np.float64)
    k = len(maps)
    if maps.ndim != 4 or k < 2 or len(set(maps.shape[1:])) != 1:
        raise InputError("need 2 or more cubic group maps of one box, got shape %s" % (maps.shape,))
    weights = np.ones(k) if sizes is None else np.asarray(sizes, dtype=np.float64)
    if reference is None:
        reference = int(np.argmax(weights)) if sizes is not None else k // 2
    inside = particle_mask(maps)
    maps = _normalise(maps, inside)
    ref = maps[reference]
    rotations = np.stack([np.eye(3) if g == reference else
                          _agreeing_start(maps[g], ref, inside, max_angle_deg, coarse_step_deg,
                                                          tolerance) for g in range(k)])
    correlation = np.ones(k)
    static = inside
    for _ in range(iterations):
        turned = np.stack([rotate_volumes(torch.as_tensor(m), torch.as_tensor(r[None]))[0].numpy()
                           for m, r in zip(maps, rotations)])
        static = static_body_mask(turned, inside, weights, varying_fraction)
        for g in range(k):
            if g != reference:
                rotations[g], correlation[g] = align_group_map(maps[g], ref, static, max_angle_deg,
                                                               coarse_step_deg)
    angles = rotation_angle_deg(torch.as_tensor(rotations)).numpy()
    logger.info("static body %.0f %% of the particle mask; turns (deg) %s", 100 * static.sum() / inside.sum(),
                np.round(angles, 2).tolist())
    return {"rotations": rotations, "angles_deg": angles, "correlation": correlation, "static": static,
            "particle": inside, "reference": np.int64(reference)}


def turn_poses(angles_deg: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """(N, 3) Euler angles (degrees, RELION ZYZ) of the poses A·Rᵀ: the images, unchanged, then reconstruct the map
    turned by R (V_R(x) = V(Rᵀ x)), as the projection of V_R at A·Rᵀ is that of V at A."""
    a = euler_to_matrix(torch.as_tensor(np.asarray(angles_deg, dtype=np.float64)))
    return matrix_to_euler(a @ torch.as_tensor(np.asarray(rotation, dtype=np.float64)).T).numpy()


def turn_particles(star: ParticleStar, groups: np.ndarray, rotations: np.ndarray) -> ParticleStar:
    """A copy of ``star`` with group g's poses (``groups`` (N,), 0-based) turned by ``rotations[g]``
    (:func:`turn_poses`); origins and every other column are kept."""
    groups = np.asarray(groups, dtype=np.int64)
    if len(groups) != len(star) or groups.min() < 0 or groups.max() >= len(rotations):
        raise InputError("%d group labels for %d particles and %d turns" % (len(groups), len(star), len(rotations)))
    angles = star.angles_deg()
    out = star.copy()
    new = angles.copy()
    for g, r in enumerate(rotations):
        members = groups == g
        if members.any():
            new[members] = turn_poses(angles[members], r)
    out.set_poses(new)
    return out


def correct_frames(particles: str, maps: Sequence[str], output: str, group_column: str = "dcCluster",
                   reference: Optional[int] = None, max_angle_deg: float = 20.0) -> Dict[str, object]:
    """Write ``output``, the particles of ``particles`` with each group's poses turned into the reference group's
    body frame (:func:`body_frames`, :func:`turn_particles`), beside it ``<output stem>_frames.json`` (the turns
    and the correlations on the static body) and ``<output stem>_static_body.mrc`` (the static body mask, 0/1, at
    the maps' box); returns the JSON's content.

    ``maps``: one map per group, group g (1-based in ``group_column``) first to last, as ``analyze``'s
    ``cluster_KK_reconstructed.mrc`` (any box: the turns are angles); ``reference``: 1-based group (default the
    most populated)."""
    star = read_particles(particles)
    if group_column not in star.particles:
        raise InputError("%s: no %s column (the groups; analyze writes dcCluster)" % (particles, group_column))
    groups = np.asarray(star.particles[group_column], dtype=np.int64) - 1
    if groups.min() < 0 or groups.max() >= len(maps):
        raise InputError("%s: groups %d … %d in %s but %d maps" % (particles, groups.min() + 1, groups.max() + 1,
                                                                  group_column, len(maps)))
    if reference is not None and not 1 <= reference <= len(maps):
        raise InputError("--reference %d: not a group 1 … %d" % (reference, len(maps)))
    volumes = [read_mrc(path) for path in maps]
    sizes = group_sizes(groups, len(maps))
    found = body_frames(np.stack([v for v, _ in volumes]), sizes=sizes,
                        reference=None if reference is None else reference - 1, max_angle_deg=max_angle_deg)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_particles(output, turn_particles(star, groups, found["rotations"]))
    stem = os.path.splitext(output)[0]
    write_mrc(stem + "_static_body.mrc", found["static"].astype(np.float32), volumes[0][1])
    summary = {"particles": os.path.abspath(particles), "maps": [os.path.abspath(m) for m in maps],
               "group_column": group_column, "reference_group": int(found["reference"]) + 1, "group_sizes": sizes,
               "turn_deg": found["angles_deg"].tolist(), "rotations": found["rotations"].tolist(),
               "static_body_correlation": found["correlation"].tolist(),
               "static_body_fraction_of_particle": float(found["static"].sum() / found["particle"].sum())}
    with open(stem + "_frames.json", "w") as f:
        json.dump(summary, f, indent=1)
    logger.info("%s: %d particles in %d groups, turned by %s degrees (reference group %d)", output, len(star),
                len(maps), np.round(found["angles_deg"], 2).tolist(), summary["reference_group"])
    return summary


def group_sizes(groups: np.ndarray, n_groups: int) -> List[int]:
    """Particles per group (``groups`` 0-based)."""
    return np.bincount(np.asarray(groups, dtype=np.int64), minlength=n_groups).tolist()
