"""Wiener weight of the decoder's variation (deepcryo.landscape.shrinkage), against a known truth."""
import numpy as np
import torch

from deepcryo.core.fsc import spherical_mask
from deepcryo.landscape.shrinkage import solvent_mask, variation_variance, variation_weight

BOX = 32


def _blob(centre, sigma_px):
    z, y, x = np.indices((BOX,) * 3, dtype=np.float64)
    return np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / (2 * sigma_px ** 2))


def test_variation_variance_is_the_decoded_variations_variance_over_the_particles():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn((4, 6, 6, 6), generator=g, dtype=torch.float64)
    c = torch.randn((500, 4), generator=g, dtype=torch.float64) @ torch.randn((4, 4), generator=g, dtype=torch.float64)
    decoded = torch.einsum("nm,mzyx->nzyx", c, basis)
    torch.testing.assert_close(variation_variance(basis, c), decoded.var(0), rtol=1e-10, atol=1e-12)


def test_weight_keeps_the_moving_part_and_brings_the_decoded_volumes_closer_to_the_truth():
    rng = np.random.default_rng(0)
    mean = _blob((16, 16, 16), 3.0) + 0.8 * _blob((16, 16, 21), 2.0)
    motion = _blob((16, 16, 23), 2.0) - _blob((16, 16, 20), 2.0)        # the small domain slides 3 px along z
    t = rng.uniform(-1, 1, 2000)
    # a learned basis: the motion and three maps of noise, each with noise over the whole box
    noise_px = 0.03
    basis = np.stack([motion] + [np.zeros_like(mean)] * 3) + noise_px * rng.normal(size=(4,) + mean.shape)
    coefficients = np.column_stack([t + 0.1 * rng.normal(size=t.size), rng.normal(size=(t.size, 3))])
    sphere = spherical_mask(BOX, edge_px=2.0).numpy()     # the decoder's sphere at box 32
    basis = basis * sphere
    variance = variation_variance(torch.as_tensor(basis), torch.as_tensor(coefficients)).numpy()
    solvent = solvent_mask(mean * sphere, sphere > 0.99)
    assert solvent.sum() > 100 and not solvent[16, 16, 16]
    weight = variation_weight(variance, solvent)
    moving = np.abs(motion) > 0.5 * np.abs(motion).max()
    static = (sphere > 0.99) & (np.abs(motion) < 1e-3)
    assert weight.min() >= 0 and weight.max() <= 1
    assert weight[moving].mean() > 0.8 and weight[static].mean() < 0.3, (weight[moving].mean(), weight[static].mean())
    decoded = np.einsum("nm,mzyx->nzyx", coefficients[:50], basis)
    error_raw = ((decoded - t[:50, None, None, None] * motion * sphere) ** 2).mean()
    error_weighted = ((decoded * weight - t[:50, None, None, None] * motion * sphere) ** 2).mean()
    assert error_weighted < 0.5 * error_raw, (error_weighted, error_raw)


def test_weight_is_ones_without_solvent_or_variation():
    assert np.all(variation_weight(np.zeros((8, 8, 8)), np.ones((8, 8, 8), bool)) == 1)
    assert np.all(variation_weight(np.ones((8, 8, 8)), np.zeros((8, 8, 8), bool)) == 1)
