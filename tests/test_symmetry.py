"""Point groups: RELION's own operators (``relion_refine --print_symmetry_ops``), known axes, and the consumers
(pose distance, asymmetric-unit sampling, symmetrised reconstruction) for proper and improper groups."""
import itertools
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from deepcryo.constants import SYMMETRY_PATTERN
from deepcryo.core import geometry, projector, reconstruct

#: Every kind of name RELION accepts, several orders each, in RELION's spelling and in other cases.
GROUPS = ("C1", "C2", "C4", "C7", "C12", "C99", "Ci", "Cs", "C1v", "C2v", "C3v", "C6v", "C1h", "C2h", "C3h",
          "C5h", "S2", "S4", "S6", "S10", "D1", "D2", "D3", "D4", "D7", "D12", "D2v", "D3v", "D4v", "D2h", "D3h",
          "D4h", "D6h", "T", "Td", "Th", "O", "Oh", "I", "I1", "I2", "I3", "I4", "Ih", "I1h", "I2h", "I3h", "I4h",
          "c4", "d7H", "td", "i3", "oH")

#: Group orders (RELION's Sn is the C(n/2) axis with an inversion centre: order n).
ORDERS = {"C1": 1, "C7": 7, "Ci": 2, "Cs": 2, "C3v": 6, "C3h": 6, "S2": 2, "S4": 4, "S6": 6, "D1": 2, "D7": 14,
          "D3v": 12, "D4h": 16, "T": 12, "Td": 24, "Th": 24, "O": 24, "Oh": 48, "I": 60, "I1": 60, "I2": 60,
          "I3": 60, "I4": 60, "Ih": 120, "I1h": 120, "I3h": 120, "I4h": 120}


def _rotation(axis, angle_deg):
    """Active rotation by ``angle_deg`` about ``axis`` (Rodrigues)."""
    u = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    a = math.radians(angle_deg)
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


def _contains(group, matrix, tol=1e-9):
    return bool((np.abs(group - matrix).max(axis=(1, 2)) < tol).any())


def _same_set(a, b, tol):
    """True when the (G, 3, 3) stacks a and b hold the same matrices (a one-to-one match within ``tol``)."""
    if len(a) != len(b):
        return False
    close = np.abs(a[:, None] - b[None]).max(axis=(2, 3)) < tol
    return bool((close.sum(1) == 1).all() and (close.sum(0) == 1).all())


# ------------------------------------------------------------------------------------------ against RELION
def _relion_operators(name):
    """The R matrices (G, 3, 3) that ``relion_refine --print_symmetry_ops --sym name`` prints (5-6 digits);
    the L matrices it also prints for some improper operators act on Euler angles, not on the map."""
    out = subprocess.run(["relion_refine", "--print_symmetry_ops", "--sym", name], capture_output=True,
                         text=True, timeout=60).stdout
    lines = out.splitlines()
    mats = [np.array([[float(v) for v in lines[i + r].split()] for r in (1, 2, 3)])
            for i, line in enumerate(lines) if re.match(r"\s*R\(\d+\)=", line)]
    order = int(re.search(r"with the following (\d+) transformation matrices", out).group(1))
    assert len(mats) == order, out
    return np.stack(mats)


@pytest.mark.skipif(shutil.which("relion_refine") is None,
                    reason="relion_refine (RELION) not installed: symmetry operators not compared with RELION's")
@pytest.mark.parametrize("name", GROUPS)
def test_operators_are_relions(name):
    ours = geometry.symmetry_matrices(name).numpy()
    assert _same_set(ours, _relion_operators(name), tol=1e-4), name


# -------------------------------------------------------------------------------------- RELION-free facts
def test_known_axes_and_orders():
    t = geometry.symmetry_matrices("T").numpy()
    assert _contains(t, _rotation([0, 0, 1], 120))                                  # 3-fold on z
    assert _contains(t, _rotation([0, math.sqrt(2 / 3), math.sqrt(1 / 3)], 180))    # 2-fold on (0, .816, .577)
    assert not _contains(t, _rotation([0, 0, 1], 180))                              # not the 2-fold-on-z setting
    for name in ("I", "I2"):
        ico = geometry.symmetry_matrices(name).numpy()
        for axis in np.eye(3):                                                      # 2-folds on x, y, z
            assert _contains(ico, _rotation(axis, 180))
        assert _contains(ico, _rotation([0.525731, 0, 0.850651], 72), tol=1e-5)    # 5-fold (±0.526, 0, 0.851)
        assert _contains(ico, _rotation([-0.525731, 0, 0.850651], 72), tol=1e-5)
    i1 = geometry.symmetry_matrices("I1").numpy()                                   # 5-fold in the yz plane
    assert _contains(i1, _rotation([0, 0.525731, 0.850651], 72), 1e-5) and _contains(i1, _rotation([1, 0, 0], 180))
    for name, sign in (("I3", -1), ("I4", 1)):                                      # 5-fold on z
        ico = geometry.symmetry_matrices(name).numpy()
        assert _contains(ico, _rotation([0, 0, 1], 72))
        assert _contains(ico, _rotation([sign * 0.525731, 0, 0.850651], 180), 1e-5)
    assert _contains(geometry.symmetry_matrices("Cs").numpy(), np.diag([1.0, 1.0, -1.0]))
    assert _contains(geometry.symmetry_matrices("Ci").numpy(), -np.eye(3))
    for name, order in ORDERS.items():
        assert len(geometry.symmetry_matrices(name)) == order, name


@pytest.mark.parametrize("name", GROUPS)
def test_groups_are_closed_orthogonal_sets(name):
    g = geometry.symmetry_matrices(name).numpy()
    assert np.allclose(g[0], np.eye(3))
    assert np.allclose(g @ g.transpose(0, 2, 1), np.eye(3), atol=1e-12)
    det = np.linalg.det(g)
    assert np.allclose(np.abs(det), 1.0)
    assert (det < 0).sum() in (0, len(g) // 2)                       # an improper group is half mirrors
    products = (g[:, None] @ g[None]).reshape(-1, 3, 3)
    assert (np.abs(products[:, None] - g[None]).max(axis=(2, 3)) < 1e-9).any(1).all()
    assert _same_set(g, geometry.symmetry_matrices(name.swapcase()).numpy(), 1e-12)


def test_accepted_names_are_relions_and_the_pattern_agrees():
    numbers = ["", "0", "1", "2", "3", "4", "5", "01", "12", "99", "100"]
    candidates = ["".join(p) for p in itertools.product("CDSTOIXcdi", numbers, ["", "V", "H", "h", "D", "S", "I"])]
    candidates += [" c4 ", "C 4", "C4,", "I2h", "IH", "i5", "I5H", "S3", "S98", "S99", "D99H", "C", "", "c1x"]
    for name in candidates:
        try:
            geometry.symmetry_matrices(name)
            ok = True
        except ValueError as exc:
            assert "I1" in str(exc) and "Cs" in str(exc)                 # the message lists the names
            ok = False
        assert ok == bool(re.match(SYMMETRY_PATTERN, name)), name
    for name in ("C0", "C100", "S3", "I5", "I5h", "T2", "X"):           # RELION fails or makes no group
        assert not re.match(SYMMETRY_PATTERN, name), name


# -------------------------------------------------------------------------------------------- consumers
def _symmetrised_random_volume(name, box, seed):
    """A random volume that has exactly the symmetry ``name`` (operators mapping voxels onto voxels about
    the centre N//2: axis-aligned 2- and 4-folds, mirrors and the inversion)."""
    idx = np.stack(np.meshgrid(*[np.arange(box) - box // 2] * 3, indexing="ij"), -1)     # (z, y, x) offsets
    vol = np.random.default_rng(seed).normal(size=(box, box, box)) * ((idx ** 2).sum(-1) < (box // 2 - 1) ** 2)
    out = np.zeros_like(vol)
    for s in geometry.symmetry_matrices(name).numpy():
        src = np.rint(idx @ s[::-1, ::-1].T).astype(int) + box // 2     # S on (z, y, x) offsets: V'(x) = Σ V(S x)
        out += vol[tuple(np.moveaxis(src % box, -1, 0))]
    return out


@pytest.mark.parametrize("name", ["Cs", "Ci", "C2v", "C4h", "D2h", "S4"])
def test_equivalent_poses_give_the_same_projection(name):
    """Every copy that :func:`equivalent_poses` lists, proper ones made of improper operators included,
    projects a map of that symmetry to the same image; :func:`pose_distance_deg` finds them at 0°."""
    vol = _symmetrised_random_volume(name, 16, 1)
    proj = projector.Projector(vol)
    angles = np.array([[30.0, 50.0, 70.0], [200.0, 120.0, -40.0]])
    copies = geometry.equivalent_poses(geometry.euler_to_matrix(angles), name)         # (2, G, 3, 3)
    assert np.allclose(np.linalg.det(copies.numpy()), 1.0)
    ref = proj.project_ft(geometry.euler_to_matrix(angles).float())
    for g in range(copies.shape[1]):
        img = proj.project_ft(copies[:, g].float())
        assert torch.allclose(img, ref, atol=1e-3 * ref.abs().max().item()), (name, g)
        same = geometry.matrix_to_euler(copies[:, g])
        assert geometry.pose_distance_deg(angles, same, name).max().item() < 1e-4
    # and not a no-op: without the symmetry these poses differ (but for the identity)
    far = geometry.pose_distance_deg(np.repeat(angles, copies.shape[1], 0),
                                     geometry.matrix_to_euler(copies.reshape(-1, 3, 3)), "C1")
    assert (far > 1.0).sum().item() == 2 * (copies.shape[1] - 1)


@pytest.mark.parametrize("name", ["Cs", "Ci", "C3v", "D2h", "S4"])
def test_symmetrised_reconstruction_has_the_improper_symmetry(name):
    """Images inserted with an improper group make a map invariant under its mirrors and inversion, as
    RELION's symmetrisation does (exact on the grid for these axis-aligned operators)."""
    box, rng = 16, np.random.default_rng(2)
    rec = reconstruct.Reconstructor(box, symmetry=name)
    angles = np.stack([rng.uniform(0, 360, 20), np.degrees(np.arccos(rng.uniform(-1, 1, 20))),
                       rng.uniform(0, 360, 20)], 1)
    rec.insert_images(torch.as_tensor(rng.normal(size=(20, box, box)), dtype=torch.float32),
                      geometry.euler_to_matrix(angles))
    vol = rec.reconstruct()
    improper = [s for s in geometry.symmetry_matrices(name).numpy() if np.linalg.det(s) < 0]
    idx = np.stack(np.meshgrid(*[np.arange(box) - box // 2] * 3, indexing="ij"), -1)
    for s in improper:
        if not np.allclose(np.abs(s), np.round(np.abs(s))):
            continue                                                     # C3v's oblique mirrors: off the grid
        src = np.rint(idx @ s[::-1, ::-1].T).astype(int) + box // 2
        mirrored = vol[tuple(np.moveaxis(src % box, -1, 0))]
        inner = (slice(1, None),) * 3                  # offset -N/2 has its mirror image outside the box
        assert np.abs(mirrored - vol)[inner].max() < 1e-4 * np.abs(vol).max(), name


def _random_rotations(n, seed):
    q = np.random.default_rng(seed).normal(size=(n, 4))
    return geometry.quaternion_to_matrix(torch.as_tensor(q / np.linalg.norm(q, axis=1, keepdims=True)))


@pytest.mark.parametrize("name", ["C1", "C4", "Ci", "Cs", "C3v", "C4h", "S4", "D3", "D2h", "T", "Td", "Th", "O",
                                  "Oh", "I", "I1", "I3", "I4", "Ih", "I4h"])
def test_sample_poses_cover_every_pose(name):
    """Every direction is within about a step of a symmetry copy of a sampled direction, and every pose
    within about a step of a symmetry copy of a sampled pose, while the sampling shrinks with the group's
    order. "About": the spiral is cut along the asymmetric unit's edges, where the gaps reach 1.2 steps
    (measured: C1 0.71, I1 1.21 steps for poses; as before for C4, D3, T, O and I)."""
    step = 15.0
    poses = geometry.sample_poses(step, symmetry=name)
    copies = geometry.equivalent_poses(geometry.euler_to_matrix(poses), name)           # (M, G, 3, 3)
    truth = _random_rotations(300, 5)
    dirs = copies[..., 2, :].reshape(-1, 3)
    nearest_dir = torch.rad2deg(torch.arccos((truth[:, 2, :] @ dirs.T).max(1).values.clamp(-1, 1)))
    assert nearest_dir.max().item() < 1.25 * step, name
    trace = torch.einsum("nij,mij->nm", truth, copies.reshape(-1, 3, 3))
    nearest_pose = torch.rad2deg(torch.arccos(((trace.max(1).values - 1) / 2).clamp(-1, 1)))
    assert nearest_pose.max().item() < 1.25 * step, name
    order = len(geometry.symmetry_matrices(name))
    assert len(poses) < 1.5 * len(geometry.sample_poses(step)) / order + 2 * 360 / step, name
