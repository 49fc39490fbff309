"""Rotations: Euler ZYZ angles (RELION/Xmipp convention), matrices, quaternions, sphere sampling, symmetry.

Convention
----------
Angles (rot, tilt, psi) are in degrees. The matrix ``A = euler_to_matrix(rot, tilt, psi)`` is RELION's
``Euler_angles2matrix``: ``A = Rz(psi) · Ry(tilt) · Rz(rot)`` with the *passive* elementary rotations
``Rz(a) = [[c, s, 0], [-s, c, 0], [0, 0, 1]]`` and ``Ry(b) = [[c, 0, -s], [0, 1, 0], [s, 0, c]]``.
``A`` maps volume coordinates (x, y, z) to the projection frame: the projection image is
``P(x, y) = ∫ V(Aᵀ (x, y, z)) dz`` and, by the Fourier-slice theorem, ``P̂(k) = V̂(Aᵀ (kx, ky, 0))``.
The viewing direction in volume coordinates is ``Aᵀ e_z = (sin t cos r, sin t sin r, cos t)``.

Symmetry: the point groups, their names and their operators are RELION's (``relion_refine
--print_symmetry_ops --sym G``), improper groups (mirrors, inversion) included: 3×3 matrices ``S`` in volume
coordinates, the volume satisfying ``V(S x) = V(x)``. A pose ``A`` is equivalent to ``A · S`` for a rotation
``S`` and to ``diag(1, 1, -1) · A · S`` for an improper ``S`` (:func:`equivalent_poses`).

Quaternions are (w, x, y, z), unit norm, w >= 0, representing the same rotation as the matrix ``A``.
All functions are batched over leading dimensions and work on float32/float64 torch tensors.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from deepcryo.constants import SYMMETRY_NAMES

from . import euler

__all__ = ["euler_to_matrix", "matrix_to_euler", "matrix_to_quaternion", "quaternion_to_matrix",
           "rotation_angle_deg", "pose_distance_deg", "viewing_direction", "direction_distance_deg",
           "sphere_directions", "sample_poses", "symmetry_matrices", "equivalent_poses", "SYMMETRY_NAMES",
           "in_plane_rotation_matrix", "axis_angle_matrices", "matrix_to_axis_angle", "rotation_grid", "voxel_positions", "sample_volumes"]


def _as_tensor(x, dtype=None):
    if isinstance(x, torch.Tensor):
        return x if dtype is None else x.to(dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype or torch.float64)


def euler_to_matrix(angles_deg: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
    """(..., 3) rot, tilt, psi in degrees → (..., 3, 3) rotation matrices (RELION convention); the formulas
    of :func:`deepcryo.core.euler.euler_to_matrix` on tensors."""
    return euler.euler_to_matrix(_as_tensor(angles_deg), xp=torch)


def matrix_to_euler(matrix: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
    """(..., 3, 3) rotation matrices → (..., 3) rot, tilt, psi in degrees, tilt in [0, 180].

    Inverse of :func:`euler_to_matrix`; at tilt 0 or 180 the split between rot and psi is arbitrary and
    psi is set to 0 (RELION's choice). The formulas of :func:`deepcryo.core.euler.matrix_to_euler` on tensors.
    """
    return euler.matrix_to_euler(_as_tensor(matrix), xp=torch)


def matrix_to_quaternion(matrix: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
    """(..., 3, 3) → (..., 4) unit quaternions (w, x, y, z) with w >= 0."""
    m = _as_tensor(matrix)
    t = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    cands = torch.stack([
        torch.stack([1 + t, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
        torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2],
                     m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
        torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0],
                     1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], m[..., 1, 2] + m[..., 2, 1]], -1),
        torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1],
                     1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1),
    ], dim=-2)
    diag = torch.stack([t, m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]], dim=-1)
    best = diag.argmax(dim=-1)
    q = torch.gather(cands, -2, best[..., None, None].expand(best.shape + (1, 4))).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return q * torch.where(q[..., :1] < 0, -1.0, 1.0).to(q.dtype)


def quaternion_to_matrix(q: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
    """(..., 4) quaternions (w, x, y, z) → (..., 3, 3) rotation matrices."""
    q = _as_tensor(q)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], dim=-2)


def rotation_angle_deg(matrix: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
    """Angle (degrees) of the rotation(s) ``matrix`` (..., 3, 3)."""
    m = _as_tensor(matrix)
    c = ((m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2] - 1.0) / 2.0).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(c))


def pose_distance_deg(angles1_deg: Union[torch.Tensor, np.ndarray], angles2_deg: Union[torch.Tensor, np.ndarray],
                      symmetry: str = "C1") -> torch.Tensor:
    """Smallest rotation angle (degrees) between poses, over the symmetry-equivalent copies of pose 2
    (:func:`equivalent_poses`).

    ``angles1_deg``, ``angles2_deg``: (N, 3) Euler angles. Returns (N,).
    """
    a1 = euler_to_matrix(angles1_deg)
    copies = equivalent_poses(euler_to_matrix(angles2_deg).to(a1.dtype), symmetry)      # (N, G, 3, 3)
    rel = a1[:, None] @ copies.transpose(-1, -2)
    return rotation_angle_deg(rel).min(dim=1).values


def viewing_direction(angles_deg: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
    """(..., 3) unit viewing directions in volume coordinates (third row of A)."""
    return euler_to_matrix(angles_deg)[..., 2, :]


def direction_distance_deg(angles1_deg: Union[torch.Tensor, np.ndarray], angles2_deg: Union[torch.Tensor, np.ndarray],
                           symmetry: str = "C1") -> torch.Tensor:
    """Angle (degrees) between projection directions (ignores the in-plane angle), over symmetry copies."""
    d1 = viewing_direction(angles1_deg)
    d2 = equivalent_poses(euler_to_matrix(angles2_deg).to(d1.dtype), symmetry)[..., 2, :]
    c = (d1[:, None] * d2).sum(-1).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(c)).min(dim=1).values


def sphere_directions(step_deg: float, hemisphere: bool = False) -> np.ndarray:
    """Approximately even directions on the sphere with mean spacing ``step_deg``: (M, 2) rot, tilt (deg).

    A Fibonacci (golden-angle) spiral: M = ceil(4π / Ω) points, Ω = the area of a spherical cap-like
    cell ``step²`` (rad²). With ``hemisphere`` only tilt <= 90°.
    """
    step = math.radians(step_deg)
    n = max(int(math.ceil(4.0 * math.pi / (step * step))), 2)
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    rot = np.degrees(np.mod(i * math.pi * (3.0 - math.sqrt(5.0)), 2 * math.pi))
    tilt = np.degrees(np.arccos(z))
    if hemisphere:
        keep = tilt <= 90.0
        rot, tilt = rot[keep], tilt[keep]
    return np.stack([rot, tilt], axis=1)


def sample_poses(step_deg: float, psi_step_deg: Optional[float] = None, symmetry: str = "C1") -> np.ndarray:
    """(M, 3) poses: sphere directions × in-plane angles, reduced to the asymmetric unit of ``symmetry``.

    One direction is kept per orbit of the directions under the group (:func:`equivalent_poses`), which
    gives an even sampling of the asymmetric unit for any group. A group with an inversion centre makes
    psi and psi + 180° equivalent (``Mz · A · (-I)`` turns the image by 180°): psi then spans [0°, 180°).
    """
    dirs = sphere_directions(step_deg)
    sym = symmetry_matrices(symmetry)
    if len(sym) > 1:
        dirs = _reduce_to_asymmetric_unit(dirs, symmetry)
    psi_step = psi_step_deg or step_deg
    has_inversion = bool((sym + torch.eye(3, dtype=sym.dtype)).abs().amax(dim=(1, 2)).min() < 1e-9)
    psis = np.arange(0.0, 180.0 if has_inversion else 360.0, psi_step)
    rot = np.repeat(dirs[:, 0], len(psis))
    tilt = np.repeat(dirs[:, 1], len(psis))
    psi = np.tile(psis, len(dirs))
    return np.stack([rot, tilt, psi], axis=1)


def _reduce_to_asymmetric_unit(dirs_deg, symmetry):
    """Keep one direction per symmetry orbit: the copy with the largest (z, then rot-closest-to-0) wins."""
    angles = np.concatenate([dirs_deg, np.zeros((len(dirs_deg), 1))], axis=1)
    copies = equivalent_poses(euler_to_matrix(torch.as_tensor(angles)), symmetry)[..., 2, :]   # (M, G, 3)
    # canonical representative: highest z, then smallest azimuth
    az = torch.remainder(torch.atan2(copies[..., 1], copies[..., 0]), 2 * math.pi)
    key = torch.round(copies[..., 2] * 1e6) * 10 - az / (2 * math.pi)
    return dirs_deg[(key[:, 0] >= key.max(dim=1).values - 1e-9).numpy()]


def in_plane_rotation_matrix(psi_deg: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
    """(..., 2, 2) matrices rotating image coordinates (x, y) by ``psi_deg`` counter-clockwise."""
    p = torch.deg2rad(_as_tensor(psi_deg))
    c, s = torch.cos(p), torch.sin(p)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def axis_angle_matrices(vectors_rad: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """(…, 3) rotation vectors ω (axis · angle, radians) → (…, 3, 3) float64 rotation matrices (Rodrigues), acting
    on (x, y, z) column vectors: a positive angle turns counter-clockwise about the axis."""
    v = torch.as_tensor(vectors_rad, dtype=torch.float64)
    theta = v.norm(dim=-1, keepdim=True)
    k = v / theta.clamp_min(1e-12)
    kx = torch.zeros(v.shape[:-1] + (3, 3), dtype=v.dtype)
    kx[..., 0, 1], kx[..., 0, 2] = -k[..., 2], k[..., 1]
    kx[..., 1, 0], kx[..., 1, 2] = k[..., 2], -k[..., 0]
    kx[..., 2, 0], kx[..., 2, 1] = -k[..., 1], k[..., 0]
    s, c = torch.sin(theta)[..., None], torch.cos(theta)[..., None]
    return torch.eye(3, dtype=v.dtype) + s * kx + (1 - c) * (kx @ kx)


def matrix_to_axis_angle(matrix: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
    """(…, 3, 3) rotation matrices → (…, 3) rotation vectors ω (axis · angle, radians, angle in [0, π]); the inverse
    of :func:`axis_angle_matrices`."""
    q = matrix_to_quaternion(matrix)
    v = q[..., 1:]
    sine = v.norm(dim=-1, keepdim=True)
    return 2 * torch.atan2(sine, q[..., :1]) * v / sine.clamp_min(1e-300)


def rotation_grid(max_angle_deg: float, step_deg: float) -> torch.Tensor:
    """(M, 3, 3) float64 rotations whose rotation vectors lie on a cubic grid of spacing ``step_deg`` inside the
    ball of radius ``max_angle_deg`` (degrees), the identity included; ordered as ``np.meshgrid(…, indexing="ij")``
    of the three coordinates. The neighbourhood a local search of a rotation tries."""
    n = int(math.floor(max_angle_deg / step_deg + 1e-9))
    steps = np.arange(-n, n + 1)
    grid = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[np.linalg.norm(grid, axis=1) * step_deg <= max_angle_deg + 1e-9]
    return axis_angle_matrices(torch.as_tensor(grid * math.radians(step_deg)))


# ----------------------------------------------------------------------------------------------- volumes

def voxel_positions(n: int, dtype: torch.dtype = torch.float64, device: Optional[torch.device] = None
                    ) -> torch.Tensor:
    """(n, n, n, 3) position (x, y, z), in px from the box centre n // 2 (the projector's and RELION's), of each
    voxel of a volume indexed [z, y, x]."""
    c = torch.arange(n, dtype=dtype, device=device) - n // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([x, y, z], -1)


def sample_volumes(volumes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Values of real-space volumes (B, N, N, N), indexed [z, y, x], at ``points`` (B, N, N, N, 3), positions
    (x, y, z) in px from the centre N // 2 (:func:`voxel_positions`): trilinear, zero outside the box (between
    the last voxel and outside, interpolated towards zero); (B, N, N, N), differentiable in ``volumes``.

    The one resampling of volumes under rotations: a volume moved by x → R x + t is V(Rᵀ (x − t)), the volume
    sampled at the points Rᵀ (x − t) of the voxel positions x."""
    n = volumes.shape[-1]
    grid = 2.0 * (points + n // 2) / (n - 1) - 1.0          # grid_sample's [-1, 1] with align_corners=True
    return F.grid_sample(volumes[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0]


# ---------------------------------------------------------------------------------------------- symmetry

_PHI = (1.0 + math.sqrt(5.0)) / 2.0
_NAME = re.compile(r"(?P<family>C|D)(?P<n>[1-9][0-9]?)(?P<suffix>[VH]?)|S(?P<s>[2468]|[1-9][02468])"
                   r"|(?P<special>CI|CS|T|TD|TH|O|OH|I[1-4]?H?)")
# RELION's src/symmetries.cpp (fill_symmetry_class) defines each group by generators: a 2-fold and a 5-fold axis
# for each icosahedral setting (RELION lists a 3-fold axis too, which these two generate) and the normal of
# the mirror plane of its "h" form. RELION writes the axes with 6 to 10 digits; here they are exact.
_ICOSAHEDRAL = {"I1": ((1, 0, 0), (_PHI, 0, -1), (0, 0, 1)),
                "I2": ((0, 0, 1), (1, 0, _PHI), (1, 0, 0)),
                "I3": ((-1, 0, _PHI), (0, 0, 1), (_PHI, 0, 1)),
                "I4": ((1, 0, _PHI), (2, 0, 1), (_PHI, 0, -1))}


def _rot_axis(axis, fold):
    """The rotation by 360°/fold about ``axis`` (any length)."""
    axis = np.asarray(axis, dtype=np.float64)
    x, y, z = axis / np.linalg.norm(axis)
    angle = 2 * math.pi / fold
    c, s = math.cos(angle), math.sin(angle)
    C = 1 - c
    return np.array([[c + x * x * C, x * y * C - z * s, x * z * C + y * s],
                     [y * x * C + z * s, c + y * y * C, y * z * C - x * s],
                     [z * x * C - y * s, z * y * C + x * s, c + z * z * C]])


def _mirror(normal):
    """The reflection through the plane with ``normal`` (any length)."""
    u = np.asarray(normal, dtype=np.float64)
    u = u / np.linalg.norm(u)
    return np.eye(3) - 2.0 * np.outer(u, u)


def _close_group(generators, max_order=400):
    """All products of ``generators`` (3×3 orthogonal matrices): the finite group they generate, identity first."""
    mats = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for p in (g @ m for m in frontier for g in generators):
            if np.abs(np.stack(mats) - p).max(axis=(1, 2)).min() > 1e-6:
                mats.append(p)
                new.append(p)
        frontier = new
        if len(mats) > max_order:
            raise ValueError("symmetry group did not close")
    return np.stack(mats)


def _generators(name):
    """RELION's generators of the group ``name`` (upper case), or None for an unknown name."""
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    z, inversion = (0, 0, 1), -np.eye(3)
    if m["family"]:
        n = int(m["n"])
        gens = [_rot_axis(z, n)] + ([_rot_axis((1, 0, 0), 2)] if m["family"] == "D" else [])
        extra = {("C", "V"): (0, 1, 0), ("C", "H"): z, ("D", "V"): (1, 0, 0), ("D", "H"): z}
        return gens + ([_mirror(extra[m["family"], m["suffix"]])] if m["suffix"] else [])
    if m["s"]:                                   # RELION's Sn: the n/2-fold axis and an inversion centre
        return [_rot_axis(z, int(m["s"]) // 2), inversion]
    special = m["special"]
    tetrahedral = [_rot_axis(z, 3), _rot_axis((0, math.sqrt(2), 1), 2)]
    groups = {"CI": [inversion], "CS": [_mirror(z)], "T": tetrahedral,
              "TD": tetrahedral + [_mirror((1, math.sqrt(3), 0))], "TH": tetrahedral + [inversion],
              "O": [_rot_axis((1, 1, 1), 3), _rot_axis(z, 4)],
              "OH": [_rot_axis((1, 1, 1), 3), _rot_axis(z, 4), _mirror((0, 1, 1))]}
    if special in groups:
        return groups[special]
    setting = "I2" if special in ("I", "IH") else special[:2]
    two, five, plane = _ICOSAHEDRAL[setting]
    return [_rot_axis(two, 2), _rot_axis(five, 5)] + ([_mirror(plane)] if special.endswith("H") else [])


@functools.lru_cache(maxsize=None)
def _group(name):
    gens = _generators(name)
    if gens is None:
        raise ValueError("unknown symmetry group %r: use one of RELION's names (any case): %s"
                         % (name, SYMMETRY_NAMES))
    return _close_group(gens)


def symmetry_matrices(symmetry: str = "C1") -> torch.Tensor:
    """(G, 3, 3) float64 operators of point group ``symmetry``, the identity first: RELION's set.

    The names and the operators are RELION's (``relion_refine --print_symmetry_ops --sym G`` prints the same
    set): Cn about z; Dn adds a 2-fold about x; T has its 3-fold on z and a 2-fold on (0, 0.816, 0.577);
    O its 4-folds on x, y, z; I is I2 (2-folds on x, y, z, 5-fold at (±0.526, 0, 0.851) in the xz plane);
    I1 has 2-folds on x, y, z and a 5-fold at (0, ±0.526, 0.851) in the yz plane; I3 and I4 a 5-fold on z
    and a 2-fold at (∓0.526, 0, 0.851). Ci, Cs, Cnv, Cnh,
    Sn, Dnv, Dnh, Td, Th, Oh, Ih, Inh add RELION's mirror planes or inversion centre: half of their operators
    have determinant -1. RELION's Sn is the n/2-fold axis plus an inversion centre (the true Sn only when
    n/2 is odd); its Dnv puts the mirror normal on x. Names as RELION: see ``SYMMETRY_NAMES``.

    A map of group G satisfies ``V(S x) = V(x)`` for every operator S, improper ones included; a pose is
    equivalent to the poses :func:`equivalent_poses` lists.
    """
    return torch.from_numpy(_group(str(symmetry).strip().upper()).copy())


def equivalent_poses(matrices: Union[torch.Tensor, np.ndarray], symmetry: str = "C1") -> torch.Tensor:
    """(..., G, 3, 3) proper pose matrices that project a map of group ``symmetry`` as (..., 3, 3) ``A`` does.

    ``A · S`` for a rotation S. For an improper S (a mirror or the inversion), ``A · S`` has determinant -1
    and is no pose; ``Mz · A · S`` with ``Mz = diag(1, 1, -1)`` is: it flips the beam axis, along which the
    projection integrates, so its image ``∫ V(Sᵀ Aᵀ (x, y, -z)) dz`` is the image of ``A``. Its viewing
    direction is ``-Sᵀ d``, so directions are reduced by the rotation group ``{det(S) · S}``.
    """
    a = _as_tensor(matrices)
    sym = symmetry_matrices(symmetry).to(device=a.device, dtype=a.dtype)
    beam_sign = torch.ones(sym.shape[0], 3, 1, device=a.device, dtype=a.dtype)
    beam_sign[:, 2, 0] = torch.sign(torch.linalg.det(sym))                      # Mz for the improper S
    return (a[..., None, :, :] @ sym) * beam_sign
