"""Pose refinement inside the landscape VAE (``train --refine-poses``) against known pose errors (issue 17).

A two-state set (deepcryo's simulator, SNR 0.1, CTF, random poses and shifts) whose poses are perturbed by a
known error: 30 % of the particles turned by 8° about random axes. Trained on the perturbed poses, the VAE with
pose refinement must bring the poses closer to the truth than the perturbed ones and separate the states
better than the same training without refinement. Small and CPU-only (box 48, working box 24, one thread).
"""
import numpy as np
import pytest
import torch

from deepcryo.core.geometry import euler_to_matrix, matrix_to_euler, rotation_angle_deg
from deepcryo.core.particles import read_particles, write_particles
from deepcryo.core.simulate import phantom_states, write_particle_set
from deepcryo.landscape import metrics
from deepcryo.landscape.pose_refine import axis_angle_to_matrix, refine_batch
from deepcryo.landscape.train import LATENT_STAR, train

BOX, WORK_BOX, N, PIXEL_A = 48, 24, 1200, 2.0
ERROR_DEG, FRACTION = 8.0, 0.3
TRAIN = dict(latent_dim=8, epochs=5, box=WORK_BOX, batch_size=64, learning_rate=3e-3)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _errors_deg(star, true):
    a = euler_to_matrix(torch.as_tensor(star.angles_deg()))
    return rotation_angle_deg(true.transpose(1, 2) @ a).numpy()


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory):
    """(folder, perturbed STAR, true pose matrices, perturbed particle mask)."""
    root = tmp_path_factory.mktemp("perturbed")
    state_of = np.random.default_rng(1).permutation(np.arange(N) % 2)
    star = write_particle_set(str(root / "sim"), phantom_states(BOX, 2, seed=0), N, PIXEL_A, snr=0.1, seed=0,
                              state_of=state_of)
    truth = read_particles(star)
    true = euler_to_matrix(torch.as_tensor(truth.angles_deg()))
    rng = np.random.default_rng(3)
    bad = rng.random(N) < FRACTION
    axis = rng.normal(size=(N, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    turned = axis_angle_to_matrix(torch.as_tensor(axis * np.radians(ERROR_DEG) * bad[:, None])) @ true
    out = truth.copy()
    out.set_poses(matrix_to_euler(turned).numpy(), truth.origins_A())
    path = str(root / "perturbed.star")
    write_particles(path, out)
    return root, path, true, bad


def _train(root, star, name, **extra):
    torch.manual_seed(0)
    train(star, str(root / name), **TRAIN, **extra)
    out = read_particles(str(root / name / LATENT_STAR))
    ari = metrics.two_state_ari(metrics.latents(out), np.asarray(out.particles["rlnClassNumber"]))
    return out, ari


def test_axis_angle_matches_rotation_angle():
    """|ω| is the angle of exp([ω]×), about ω; zero gives the identity and a zero shift leaves spectra."""
    omega = torch.tensor([[0.0, 0.0, 0.0], [0.1, -0.2, 0.3], [0.0, 0.0, np.pi / 2]], dtype=torch.float64)
    rot = axis_angle_to_matrix(omega)
    assert torch.allclose(rotation_angle_deg(rot), torch.rad2deg(omega.norm(dim=1)), atol=1e-8)
    assert torch.allclose(rot @ omega[:, :, None], omega[:, :, None], atol=1e-12)
    spectra = torch.randn(3, 8, 8, dtype=torch.complex64)
    same, turned = refine_batch(spectra, torch.eye(3).expand(3, 3, 3), omega.float(), torch.zeros(3, 2))
    assert torch.allclose(same, spectra) and torch.allclose(turned, rot.float(), atol=1e-6)


def test_refine_poses_recovers_perturbed_poses(perturbed):
    root, star, true, bad = perturbed
    plain, ari_plain = _train(root, star, "plain")
    refined, ari_refined = _train(root, star, "refined", refine_poses=True)
    err_plain, err_refined = _errors_deg(plain, true), _errors_deg(refined, true)
    # the perturbed particles come closer to the truth, the others stay where they were
    assert err_refined[bad].mean() < 0.6 * err_plain[bad].mean(), (err_refined[bad].mean(), err_plain[bad].mean())
    assert np.median(err_refined[~bad]) < 3.0, np.median(err_refined[~bad])
    assert ari_refined > ari_plain + 0.1, (ari_refined, ari_plain)
