"""One body frame for the groups of a landscape (:mod:`deepcryo.landscape.frames`): the rotation convention against
the projector, and the recovery of known frame turns of a two-part phantom from maps reconstructed at turned poses
(about a minute of CPU)."""
import numpy as np
import pytest
import torch

from deepcryo.core import fourier
from deepcryo.core.geometry import euler_to_matrix, matrix_to_euler, pose_distance_deg, rotation_angle_deg
from deepcryo.core.projector import Projector
from deepcryo.core.reconstruct import Reconstructor
from deepcryo.core.simulate import hinge_volume, random_poses
from deepcryo.landscape import frames

BOX = 32


def test_rotation_vector_matrix_turns_counter_clockwise():
    r = frames.rotation_vector_matrix(np.array([0.0, 0.0, np.pi / 2]))
    np.testing.assert_allclose(r @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], atol=1e-12)
    angles = rotation_angle_deg(torch.as_tensor(frames.rotation_grid(20.0, 4.0))).numpy()
    assert angles.max() <= 20.0 + 1e-6 and angles.min() == pytest.approx(0.0, abs=1e-6)


def test_rotate_volumes_moves_a_point_to_r_p():
    """V_R(x) = V(Rᵀ x): density at p (x, y, z from the centre N // 2, array [z, y, x]) moves to R p."""
    vol = torch.zeros(BOX, BOX, BOX, dtype=torch.float64)
    p = np.array([6, 0, 0])
    vol[BOX // 2 + p[2], BOX // 2 + p[1], BOX // 2 + p[0]] = 1.0
    r = frames.rotation_vector_matrix(np.array([0.0, 0.0, np.pi / 2]))
    out = frames.rotate_volumes(vol, torch.as_tensor(r[None]))[0]
    z, y, x = np.unravel_index(int(torch.argmax(out)), out.shape)
    np.testing.assert_allclose(np.array([x, y, z]) - BOX // 2, r @ p, atol=1e-9)


def test_turned_poses_project_the_turned_map():
    """The projection of the map turned by R at the turned pose A·Rᵀ (:func:`frames.turn_poses`) equals the
    projection of the map at A: the convention checked with the project's projector (the reverse turn fails)."""
    vol = hinge_volume(BOX, 0.5)
    r = frames.rotation_vector_matrix(np.radians([4.0, -9.0, 6.0]))
    turned = frames.rotate_volumes(torch.as_tensor(vol, dtype=torch.float64), torch.as_tensor(r[None]))[0].numpy()
    poses = random_poses(6, np.random.default_rng(1))
    expected = Projector(vol).project(poses).numpy()
    got = Projector(turned).project(frames.turn_poses(poses, r)).numpy()
    wrong = Projector(turned).project(frames.turn_poses(poses, r.T)).numpy()
    err, wrong_err = (np.linalg.norm(x - expected) / np.linalg.norm(expected) for x in (got, wrong))
    assert err < 0.05 and wrong_err > 4 * err


@pytest.fixture(scope="module")
def turned_groups():
    """Three conformations of the hinge phantom (domain at −20°, 0°, +20° about its hinge) whose particles carry a
    known shared turn Q_k of their poses (about the hinge axis, about half the domain's turn, as a consensus
    alignment gives them): images projected from the true map at the true poses A, each group's map reconstructed
    at the turned poses A·Q_kᵀ, so the map is the true one turned by Q_k."""
    ts = (0.0, 0.5, 1.0)
    turns = frames.rotation_vector_matrix(np.radians([[0.0, -10.6, 0.0], [0.0, 0.0, 0.0], [2.0, 9.0, -3.0]]))
    rng = np.random.default_rng(0)
    maps, true_poses, turned_poses = [], [], []
    for t, q in zip(ts, turns):
        poses = random_poses(1500, rng)
        images = Projector(hinge_volume(BOX, t)).project(poses)
        est = frames.turn_poses(poses, q)
        rec = Reconstructor(BOX)
        spectra = fourier.fft2c(images)
        rec.insert(spectra, torch.ones(spectra.shape), euler_to_matrix(torch.as_tensor(est)).to(torch.float32))
        maps.append(np.asarray(rec.reconstruct()))
        true_poses.append(poses)
        turned_poses.append(est)
    return np.stack(maps), turns, true_poses, turned_poses


def test_body_frames_recover_known_turns_within_1_degree(turned_groups):
    """The turn found for each group map undoes its poses' shared turn (R_k·Q_k = I within 1°: the body, the
    larger part, is in the reference group's frame), and the turned poses are the true ones within 1°."""
    maps, turns, true_poses, turned_poses = turned_groups
    found = frames.body_frames(maps, sizes=[1500, 1600, 1500])
    assert int(found["reference"]) == 1
    errors = rotation_angle_deg(torch.as_tensor(found["rotations"] @ turns)).numpy()
    assert errors.max() < 1.0, errors
    for g in (0, 2):
        restored = frames.turn_poses(turned_poses[g], found["rotations"][g])
        assert np.median(pose_distance_deg(torch.as_tensor(restored), torch.as_tensor(true_poses[g])).numpy()) < 1.0
    static = found["static"]
    assert 0.2 < static.sum() / found["particle"].sum() < 0.9


def test_turn_particles_turns_each_groups_poses(tmp_path):
    from deepcryo.core.particles import ParticleStar, make_optics
    poses = random_poses(4, np.random.default_rng(2))
    star = ParticleStar(make_optics(2.0, BOX), {"rlnAngleRot": poses[:, 0], "rlnAngleTilt": poses[:, 1],
                                                "rlnAnglePsi": poses[:, 2], "rlnOriginXAngst": np.arange(4.0)},
                        str(tmp_path))
    turns = np.stack([np.eye(3), frames.rotation_vector_matrix(np.radians([0.0, 10.0, 0.0]))])
    out = frames.turn_particles(star, np.array([0, 1, 0, 1]), turns)
    moved = pose_distance_deg(torch.as_tensor(out.angles_deg()), torch.as_tensor(poses)).numpy()
    np.testing.assert_allclose(moved, [0.0, 10.0, 0.0, 10.0], atol=1e-6)
    np.testing.assert_array_equal(out.particles["rlnOriginXAngst"], np.arange(4.0))
    expected = matrix_to_euler(euler_to_matrix(torch.as_tensor(poses[1])) @ torch.as_tensor(turns[1]).T).numpy()
    np.testing.assert_allclose(out.angles_deg()[1], expected, atol=1e-9)
