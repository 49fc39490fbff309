"""Euler ZYZ angles (RELION/Xmipp convention) ↔ rotation matrices, written once for numpy and torch.

The convention is :mod:`deepcryo.core.geometry`'s (RELION's ``Euler_angles2matrix``): angles (rot, tilt,
psi) in degrees, ``A = Rz(psi) · Ry(tilt) · Rz(rot)`` with passive elementary rotations, ``A`` mapping
volume coordinates to the projection frame.

Why a module of its own: the Scipion side of the plugin (:mod:`deepcryo.convert`) converts poses to
Scipion's 4×4 matrices in a Python that may have no torch (the engines can live in their own environment,
``DEEPCRYO_PYTHON``). The formulas are written once against an array namespace ``xp`` (numpy or torch,
whose functions used here share names and arguments): numpy arrays by default, and
:func:`deepcryo.core.geometry.euler_to_matrix` / :func:`~deepcryo.core.geometry.matrix_to_euler` call them
with ``xp=torch`` (batched, on the GPU, differentiable). pwem's ``transformations.euler_from_matrix`` (what
scipion-em-relion uses) was not chosen: it returns tilt in [-180, 0] for this convention and splits rot and
psi differently at the poles, so a pose written back to STAR would change its numbers, not its rotation.
"""
from types import ModuleType

import numpy as np

__all__ = ["euler_to_matrix", "matrix_to_euler"]


def euler_to_matrix(angles_deg, xp: ModuleType = np):
    """(..., 3) rot, tilt, psi in degrees → (..., 3, 3) rotation matrices (RELION convention); arrays of
    ``xp`` (numpy, or torch for tensors)."""
    a = xp.deg2rad(angles_deg if xp is not np else np.asarray(angles_deg, dtype=np.float64))
    ca, sa = xp.cos(a[..., 0]), xp.sin(a[..., 0])
    cb, sb = xp.cos(a[..., 1]), xp.sin(a[..., 1])
    cg, sg = xp.cos(a[..., 2]), xp.sin(a[..., 2])
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    row0 = xp.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1)
    row1 = xp.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1)
    row2 = xp.stack([sc, ss, cb], -1)
    return xp.stack([row0, row1, row2], -2)


def matrix_to_euler(matrix, xp: ModuleType = np):
    """(..., 3, 3) rotation matrices → (..., 3) rot, tilt, psi in degrees, tilt in [0, 180]; arrays of ``xp``.

    Inverse of :func:`euler_to_matrix`; at tilt 0 or 180 the split between rot and psi is arbitrary and
    psi is set to 0 (RELION's choice).
    """
    m = matrix if xp is not np else np.asarray(matrix, dtype=np.float64)
    cos_tilt = xp.clip(m[..., 2, 2], -1.0, 1.0)
    sin_tilt = xp.sqrt(m[..., 2, 0] ** 2 + m[..., 2, 1] ** 2)
    tilt = xp.arctan2(sin_tilt, cos_tilt)
    regular = sin_tilt > 1e-6
    # at the poles A = Rz(psi) Ry(0 or 180) Rz(rot) collapses to one in-plane angle, read off row 0
    one = xp.ones_like(cos_tilt)
    flip = xp.where(cos_tilt < 0, -one, one)
    rot = xp.where(regular, xp.arctan2(m[..., 2, 1], m[..., 2, 0]),
                   xp.arctan2(flip * m[..., 0, 1], flip * m[..., 0, 0]))
    psi = xp.where(regular, xp.arctan2(m[..., 1, 2], -m[..., 0, 2]), xp.zeros_like(rot))
    return xp.rad2deg(xp.stack([rot, tilt, psi], -1))
