"""The landscape's order along a curve (``deepcryo.landscape.ordering``): where PC1 mixes the ends of a motion."""
import numpy as np
from scipy.stats import spearmanr

from deepcryo.landscape import metrics
from deepcryo.landscape.ordering import landscape_order, order_points


def horseshoe(n, seed, noise=0.5):
    """(t, z): a motion t in [0, 1] along a U in the first two of 8 latent coordinates — 12 units along y = +2, a
    half circle of radius 2, 12 units back along y = −2 — the shape a linear decoder gave a 40° hinge at working
    box 64; both ends of the motion have the same first principal component."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 1, n)
    s = t * (24 + 2 * np.pi)
    turn = (s - 12) / 2
    on_turn = (s >= 12) & (s < 12 + 2 * np.pi)
    x = np.where(s < 12, -6 + s, np.where(on_turn, 6 + 2 * np.sin(turn), 6 - (s - 12 - 2 * np.pi)))
    y = np.where(s < 12, 2.0, np.where(on_turn, 2 * np.cos(turn), -2.0))
    z = rng.normal(0, 0.01, (n, 8))
    z[:, 0] += x + rng.normal(0, noise, n)
    z[:, 1] += y + rng.normal(0, noise, n)
    return t, z


def test_order_follows_a_horseshoe_that_pc1_folds():
    t, z = horseshoe(3000, seed=0)
    assert metrics.hinge_rho(z, t) < 0.1                     # PC1 puts both ends together
    order = landscape_order(z)
    assert abs(spearmanr(order, t).correlation) > 0.98
    assert abs(order.mean()) < 1e-9 and abs(order.std() - 1) < 1e-9
    # fitted on a subset and carried to the rest by neighbours: the same order
    assert abs(spearmanr(landscape_order(z, max_fit=800), t).correlation) > 0.98
    assert metrics.order_rho(z, t) > 0.98


def test_order_is_pc1_on_a_straight_landscape_and_signed_by_the_reference():
    rng = np.random.default_rng(1)
    t = rng.uniform(0, 1, 2000)
    z = np.outer(t, rng.normal(size=8)) * 10 + rng.normal(0, 0.3, (2000, 8))
    pc1 = (z - z.mean(0)) @ np.linalg.svd(z - z.mean(0), full_matrices=False)[2][0]
    order = landscape_order(z, reference=pc1)
    assert spearmanr(order, pc1).correlation > 0.98
    assert spearmanr(landscape_order(z, reference=-pc1), pc1).correlation < -0.98


def test_order_points_walk_along_the_curve():
    """Volumes are decoded at these points: each bin's mean latent lies on the U, in the order of the motion (a
    straight line between PC1 scores would cut across it)."""
    t, z = horseshoe(3000, seed=2)
    order = landscape_order(z, reference=t)
    points = order_points(z, order, 6)
    truth = order_points(z, t, 6)
    assert points.shape == (6, 8)
    assert np.abs(points - truth).max() < 1.0, np.round(points[:, :2], 1)
    assert np.all(np.abs(points[:, 1]) > 1.0)                # on an arm or the turn, never between the arms


def test_order_of_tiny_sets():
    assert landscape_order(np.zeros((2, 8))).shape == (2,)
    assert np.all(np.isfinite(landscape_order(np.random.default_rng(0).normal(0, 1e-6, (50, 8)))))
