"""The CryoBench-style scores of ``benchmarks/landscape_cryobench.py`` (:mod:`deepcryo.landscape.metrics`) on
true maps: a map against itself, the consensus (the mean of the conformations) against each conformation, and
the moving-region mask of a phantom hinge (seconds, no training)."""
import numpy as np
import pytest

from deepcryo.core.simulate import hinge_volume, phantom_states
from deepcryo.landscape import metrics

BOX = 32


@pytest.fixture(scope="module")
def hinge():
    return np.stack(phantom_states(BOX, 5, angle_deg=40.0)).astype(np.float64)


def test_phantom_states_sample_the_hinge_motion(hinge):
    """The motion set's K maps are hinge_volume at t = k / (K - 1)."""
    for k in (0, 2, 4):
        np.testing.assert_allclose(hinge[k], hinge_volume(BOX, k / 4, max_angle_deg=40.0), atol=1e-6)


def test_fsc_auc_of_identical_maps_is_half(hinge):
    """CryoBench's normalisation: area under FSC = 1 from 0 to Nyquist, 0.5 in 1/px."""
    whole = metrics.scoring_masks(hinge)["whole"]
    np.testing.assert_allclose(metrics.conformation_fsc_auc(hinge, hinge, whole), 0.5, atol=1e-9)
    assert metrics.fsc_auc(np.zeros(BOX // 2 + 1)) == 0.0


def test_moving_mask_is_the_moving_domain_inside_the_particle(hinge):
    masks = metrics.scoring_masks(hinge)
    mask, whole = masks["moving"], masks["whole"]
    assert mask.min() >= 0 and mask.max() == pytest.approx(1.0)
    support = hinge.max(0) > 0.05 * hinge.max()
    assert support[whole < 0.5].sum() == 0             # the whole-particle sphere holds the particle
    # the moving mask: a part of the particle (the domain), mostly on density of some conformation
    assert 0.005 < (mask > 0.5).mean() < 0.6 * support.mean()
    assert support[mask > 0.5].mean() > 0.5
    assert np.all(mask <= whole)


def test_consensus_scores_lower_in_the_moving_region(hinge):
    """The consensus (mean map) matches the static part: its FSC-AUC against each conformation is well below
    the truth's 0.5 inside the moving mask, and lower there than over the whole particle."""
    consensus = np.repeat(hinge.mean(0, keepdims=True), len(hinge), 0)
    masks = metrics.scoring_masks(hinge)
    moving = metrics.conformation_fsc_auc(consensus, hinge, masks["moving"]).mean()
    whole = metrics.conformation_fsc_auc(consensus, hinge, masks["whole"]).mean()
    assert moving < whole < 0.5
    assert moving < 0.45


def test_conformation_means_and_state_ari():
    rng = np.random.default_rng(0)
    states = np.repeat(np.arange(3), 50)
    z = rng.normal(size=(150, 4)) * 0.1 + states[:, None] * 3.0
    np.testing.assert_allclose(metrics.conformation_means(z, states)[:, 0], [0.0, 3.0, 6.0], atol=0.1)
    assert metrics.state_ari(z, states) == pytest.approx(1.0)
    assert abs(metrics.state_ari(rng.normal(size=(150, 4)), states)) < 0.1
