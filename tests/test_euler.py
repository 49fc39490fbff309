"""The Euler ZYZ formulas of :mod:`deepcryo.core.euler`, written once for numpy (the Scipion side, without
torch) and torch (:mod:`deepcryo.core.geometry`): the same matrices and angles on both, RELION's matrix for a
pose worked out by hand, and the poles (tilt 0 or 180: psi 0)."""
import numpy as np
import torch

from deepcryo.core import euler, geometry


def _angles():
    rng = np.random.default_rng(11)
    angles = np.column_stack([rng.uniform(-180, 180, 500), rng.uniform(0, 180, 500), rng.uniform(-180, 180, 500)])
    angles[:4] = [[30, 0, 40], [-50, 180, 10], [0, 90, 0], [170, 1e-3, -170]]
    return angles


def test_numpy_and_torch_give_the_same_matrices_and_angles():
    angles = _angles()
    m_np = euler.euler_to_matrix(angles)
    m_t = geometry.euler_to_matrix(torch.as_tensor(angles))
    assert isinstance(m_np, np.ndarray) and m_t.dtype == torch.float64
    np.testing.assert_allclose(m_np, m_t.numpy(), atol=1e-14)
    np.testing.assert_allclose(euler.matrix_to_euler(m_np), geometry.matrix_to_euler(m_t).numpy(), atol=1e-10)
    assert geometry.euler_to_matrix(torch.as_tensor(angles, dtype=torch.float32)).dtype == torch.float32


def test_relion_matrix_and_poles():
    # RELION's Euler_angles2matrix for (rot, tilt, psi) = (90, 90, 0): A = Ry(90) Rz(90), rows by hand
    np.testing.assert_allclose(euler.euler_to_matrix([90.0, 90.0, 0.0]),
                               [[0, 0, -1], [-1, 0, 0], [0, 1, 0]], atol=1e-15)
    back = euler.matrix_to_euler(euler.euler_to_matrix(_angles()))
    np.testing.assert_allclose(euler.euler_to_matrix(back), euler.euler_to_matrix(_angles()), atol=1e-9)
    assert back[:2, 2].tolist() == [0.0, 0.0]  # at the poles psi is 0 (RELION's choice)
    assert np.all((back[:, 1] >= 0) & (back[:, 1] <= 180))
