"""Rotations: Euler ZYZ angles (RELION/Xmipp convention), matrices, quaternions, sphere sampling, symmetry.

Convention
----------
Angles (rot, tilt, psi) are in degrees. The matrix ``A = euler_to_matrix(rot, tilt, psi)`` is RELION's
``Euler_angles2matrix``: ``A = Rz(psi) · Ry(tilt) · Rz(rot)`` with the *passive* elementary rotations
``Rz(a) = [[c, s, 0], [-s, c, 0], [0, 0, 1]]`` and ``Ry(b) = [[c, 0, -s], [0, 1, 0], [s, 0, c]]``.
``A`` maps volume coordinates (x, y, z) to the projection frame: the projection image is
``P(x, y) = ∫ V(Aᵀ (x, y, z)) dz`` and, by the Fourier-slice theorem, ``P̂(k) = V̂(Aᵀ (kx, ky, 0))``.
The viewing direction in volume coordinates is ``Aᵀ e_z = (sin t cos r, sin t sin r, cos t)``.

Symmetry: a pose ``A`` is equivalent to ``A · S`` for every operator ``S`` of the point group (the volume
satisfies ``V(S x) = V(x)``). Groups are built as sets of 3×3 matrices in volume coordinates with the
RELION/Xmipp axis choice: Cn about z; Dn adds a 2-fold about x; T, O and I in their standard settings.

Quaternions are (w, x, y, z), unit norm, w >= 0, representing the same rotation as the matrix ``A``.
All functions are batched over leading dimensions and work on float32/float64 torch tensors.
"""
import math

import numpy as np
import torch

__all__ = ["euler_to_matrix", "matrix_to_euler", "matrix_to_quaternion", "quaternion_to_matrix",
           "rotation_angle_deg", "pose_distance_deg", "viewing_direction", "direction_distance_deg",
           "sphere_directions", "sample_poses", "symmetry_matrices", "in_plane_rotation_matrix"]


def _as_tensor(x, dtype=None):
    if isinstance(x, torch.Tensor):
        return x if dtype is None else x.to(dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype or torch.float64)


def euler_to_matrix(angles_deg):
    """(..., 3) rot, tilt, psi in degrees → (..., 3, 3) rotation matrices (RELION convention)."""
    a = torch.deg2rad(_as_tensor(angles_deg))
    ca, sa = torch.cos(a[..., 0]), torch.sin(a[..., 0])
    cb, sb = torch.cos(a[..., 1]), torch.sin(a[..., 1])
    cg, sg = torch.cos(a[..., 2]), torch.sin(a[..., 2])
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    row0 = torch.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], dim=-1)
    row1 = torch.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], dim=-1)
    row2 = torch.stack([sc, ss, cb], dim=-1)
    return torch.stack([row0, row1, row2], dim=-2)


def matrix_to_euler(matrix):
    """(..., 3, 3) rotation matrices → (..., 3) rot, tilt, psi in degrees, tilt in [0, 180].

    Inverse of :func:`euler_to_matrix`; at tilt 0 or 180 the split between rot and psi is arbitrary and
    psi is set to 0 (RELION's choice).
    """
    m = _as_tensor(matrix)
    cos_tilt = m[..., 2, 2].clamp(-1.0, 1.0)
    sin_tilt = torch.sqrt(m[..., 2, 0] ** 2 + m[..., 2, 1] ** 2)
    tilt = torch.atan2(sin_tilt, cos_tilt)
    regular = sin_tilt > 1e-6
    # at the poles A = Rz(psi) Ry(0 or 180) Rz(rot) collapses to one in-plane angle, read off row 0
    flip = torch.where(cos_tilt < 0, -1.0, 1.0).to(m.dtype)
    rot = torch.where(regular, torch.atan2(m[..., 2, 1], m[..., 2, 0]),
                      torch.atan2(flip * m[..., 0, 1], flip * m[..., 0, 0]))
    psi = torch.where(regular, torch.atan2(m[..., 1, 2], -m[..., 0, 2]), torch.zeros_like(rot))
    return torch.rad2deg(torch.stack([rot, tilt, psi], dim=-1))


def matrix_to_quaternion(matrix):
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


def quaternion_to_matrix(q):
    """(..., 4) quaternions (w, x, y, z) → (..., 3, 3) rotation matrices."""
    q = _as_tensor(q)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], dim=-2)


def rotation_angle_deg(matrix):
    """Angle (degrees) of the rotation(s) ``matrix`` (..., 3, 3)."""
    m = _as_tensor(matrix)
    c = ((m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2] - 1.0) / 2.0).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(c))


def pose_distance_deg(angles1_deg, angles2_deg, symmetry="C1"):
    """Smallest rotation angle (degrees) between poses, over the symmetry-equivalent copies of pose 2.

    ``angles1_deg``, ``angles2_deg``: (N, 3) Euler angles. Returns (N,).
    """
    a1 = euler_to_matrix(angles1_deg)
    a2 = euler_to_matrix(angles2_deg)
    sym = symmetry_matrices(symmetry).to(a1.dtype)
    rel = a1[:, None] @ sym[None].transpose(-1, -2) @ a2[:, None].transpose(-1, -2)
    return rotation_angle_deg(rel).min(dim=1).values


def viewing_direction(angles_deg):
    """(..., 3) unit viewing directions in volume coordinates (third row of A)."""
    return euler_to_matrix(angles_deg)[..., 2, :]


def direction_distance_deg(angles1_deg, angles2_deg, symmetry="C1"):
    """Angle (degrees) between projection directions (ignores the in-plane angle), over symmetry copies."""
    d1 = viewing_direction(angles1_deg)
    a2 = euler_to_matrix(angles2_deg)
    sym = symmetry_matrices(symmetry).to(a2.dtype)
    d2 = (a2[:, None] @ sym[None])[..., 2, :]
    c = (d1[:, None] * d2).sum(-1).clamp(-1, 1)
    return torch.rad2deg(torch.arccos(c)).min(dim=1).values


def sphere_directions(step_deg, hemisphere=False):
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


def sample_poses(step_deg, psi_step_deg=None, symmetry="C1"):
    """(M, 3) poses: sphere directions × in-plane angles, reduced to the asymmetric unit of ``symmetry``.

    Directions whose symmetry copy lies closer to an already kept direction are dropped (greedy), which
    gives an even sampling of the asymmetric unit for any group.
    """
    dirs = sphere_directions(step_deg)
    if symmetry.upper() != "C1":
        dirs = _reduce_to_asymmetric_unit(dirs, symmetry)
    psi_step = psi_step_deg or step_deg
    psis = np.arange(0.0, 360.0, psi_step)
    rot = np.repeat(dirs[:, 0], len(psis))
    tilt = np.repeat(dirs[:, 1], len(psis))
    psi = np.tile(psis, len(dirs))
    return np.stack([rot, tilt, psi], axis=1)


def _reduce_to_asymmetric_unit(dirs_deg, symmetry):
    """Keep one direction per symmetry orbit: the copy with the largest (z, then rot-closest-to-0) wins."""
    sym = symmetry_matrices(symmetry)
    angles = np.concatenate([dirs_deg, np.zeros((len(dirs_deg), 1))], axis=1)
    d = viewing_direction(torch.as_tensor(angles))            # (M, 3)
    copies = (d[:, None, None, :] @ sym.to(d.dtype)[None]).squeeze(-2)  # (M, G, 3): directions of A·S
    # canonical representative: highest z, then smallest azimuth
    az = torch.remainder(torch.atan2(copies[..., 1], copies[..., 0]), 2 * math.pi)
    key = torch.round(copies[..., 2] * 1e6) * 10 - az / (2 * math.pi)
    return dirs_deg[(key[:, 0] >= key.max(dim=1).values - 1e-9).numpy()]


def in_plane_rotation_matrix(psi_deg):
    """(..., 2, 2) matrices rotating image coordinates (x, y) by ``psi_deg`` counter-clockwise."""
    p = torch.deg2rad(_as_tensor(psi_deg))
    c, s = torch.cos(p), torch.sin(p)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


# ---------------------------------------------------------------------------------------------- symmetry
def _rot_axis(axis, angle_rad):
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    x, y, z = axis
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    C = 1 - c
    return np.array([[c + x * x * C, x * y * C - z * s, x * z * C + y * s],
                     [y * x * C + z * s, c + y * y * C, y * z * C - x * s],
                     [z * x * C - y * s, z * y * C + x * s, c + z * z * C]])


def _close_group(generators):
    mats = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for m in frontier:
            for g in generators:
                p = g @ m
                if not any(np.allclose(p, q, atol=1e-6) for q in mats):
                    mats.append(p)
                    new.append(p)
        frontier = new
        if len(mats) > 60:
            raise ValueError("symmetry group did not close")
    return mats


def symmetry_matrices(symmetry="C1"):
    """(G, 3, 3) float64 operators of point group ``symmetry``: Cn, Dn, T, O, I (RELION axis choice)."""
    s = symmetry.strip().upper()
    if s[0] == "C" and s[1:].isdigit():
        n = int(s[1:])
        gens = [_rot_axis([0, 0, 1], 2 * math.pi / n)]
    elif s[0] == "D" and s[1:].isdigit():
        n = int(s[1:])
        gens = [_rot_axis([0, 0, 1], 2 * math.pi / n), _rot_axis([1, 0, 0], math.pi)]
    elif s == "T":
        gens = [_rot_axis([0, 0, 1], math.pi), _rot_axis([1, 1, 1], 2 * math.pi / 3)]
    elif s == "O":
        gens = [_rot_axis([0, 0, 1], math.pi / 2), _rot_axis([1, 1, 1], 2 * math.pi / 3)]
    elif s == "I":  # I2 setting (RELION default): 2-folds on x, y, z; 5-fold in the xz plane
        phi = (1 + math.sqrt(5)) / 2
        gens = [_rot_axis([0, 0, 1], math.pi), _rot_axis([0, 1, phi], 2 * math.pi / 5),
                _rot_axis([1, 1, 1], 2 * math.pi / 3)]
    else:
        raise ValueError("unknown symmetry %r (use C<n>, D<n>, T, O or I)" % symmetry)
    return torch.as_tensor(np.stack(_close_group(gens)))
