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


# ------------------------------------------------------- the estimated-pose path (benchmarks/landscape_cryobench.py)

@pytest.fixture(scope="module")
def cryobench():
    """The benchmark module (benchmarks/ is no package: put it on the path, as the benchmark itself does)."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
    import landscape_cryobench
    return landscape_cryobench


def test_alignment_mask_leaves_out_the_moving_domain(cryobench, hinge):
    """SwiftRes's ``--align-mask static``: in [0, 1], about 0 where the conformations differ, about 1 on density
    that all conformations share."""
    mask = cryobench.alignment_mask(hinge)
    masks = metrics.scoring_masks(hinge)
    assert mask.min() >= -1e-9 and mask.max() <= 1 + 1e-9
    assert mask[masks["moving"] > 0.99].max() < 1e-6
    std = hinge.std(0)
    static = (hinge.min(0) > 0.3 * hinge.max()) & (std < 0.01 * std.max())
    assert static.sum() > 20 and mask[static].mean() > 0.9


def test_pose_figures_match_particles_by_image_and_take_out_each_conformations_turn(cryobench, tmp_path):
    """Conformation 1's estimated poses share a 20° turn of its frame (about z, rot + 20°), conformation 0's are
    exact, and the estimated STAR lists the particles in another order: raw medians 0° and 20°, both about 0° after
    each conformation's best rotation."""
    from deepcryo.core.particles import write_particles
    from relion_data import RenderSpec, truth_particles
    truth = truth_particles(RenderSpec(n=60, states=2))
    truth.particles["rlnImageName"] = np.array(["%06d@particles.mrcs" % (i + 1) for i in range(60)], dtype=object)
    conformation_of = {"%d@particles.mrcs" % (i + 1): c - 1 for i, c in enumerate(truth.particles["rlnClassNumber"])}
    order = np.random.default_rng(0).permutation(60)
    est = truth.subset(order)
    turned = np.asarray(est.particles["rlnClassNumber"]) == 2
    est.particles["rlnAngleRot"] = np.asarray(est.particles["rlnAngleRot"]) + 20.0 * turned
    write_particles(str(tmp_path / "est.star"), est)
    p = cryobench.pose_figures(str(tmp_path / "est.star"), truth, conformation_of)
    np.testing.assert_allclose(p["per_conformation_median_deg"], [0.0, 20.0], atol=1e-3)
    np.testing.assert_allclose(p["per_conformation_aligned_median_deg"], [0.0, 0.0], atol=1e-3)
    assert p["pct_over_10"] == pytest.approx(100 * turned.mean())


def test_ratios_are_estimated_over_true(cryobench):
    entry = {"methods": {
        "deepcryo": {"poses": "true", "auc_whole": 0.4, "auc_moving": 0.5, "rho": 0.8},
        "consensus": {"poses": "true", "auc_whole": 0.4, "auc_moving": 0.3},
        "deepcryo, swiftres poses": {"poses": "estimated", "auc_whole": 0.3, "auc_moving": 0.25, "rho": 0.4},
        "consensus, swiftres poses": {"poses": "estimated", "auc_whole": 0.2, "auc_moving": 0.3}}}
    r = cryobench.ratios(entry)
    assert set(r) == {"deepcryo, swiftres poses", "consensus, swiftres poses"}
    assert r["deepcryo, swiftres poses"] == pytest.approx({"auc_whole": 0.75, "auc_moving": 0.5, "rho": 0.5})
    assert r["consensus, swiftres poses"] == pytest.approx({"auc_whole": 0.5, "auc_moving": 1.0})


def test_undo_turn_matches_the_projections_of_turned_poses(cryobench):
    """A volume whose particles carry the frame turn G (A_est = A_true·G), brought back by ``undo_turn``, projects at
    A_true as the turned volume projects at A_true·G: the convention of the projector (A maps the volume frame to
    the projection frame), checked with its projections rather than assumed (the reverse turn fails)."""
    import torch
    from deepcryo.core.geometry import euler_to_matrix, matrix_to_euler
    from deepcryo.core.projector import Projector
    true = hinge_volume(BOX, 0.5)
    turn = euler_to_matrix(torch.tensor([[30.0, 25.0, -40.0]], dtype=torch.float64))[0].numpy()
    turned = cryobench.undo_turn(true, turn.T)                  # V_est(x) = V_true(G x): undo_turn's inverse
    assert np.corrcoef(cryobench.undo_turn(turned, turn).ravel(), true.ravel())[0, 1] > 0.99   # two resamplings
    poses = np.array([[0.0, 0.0, 0.0], [50.0, 70.0, 10.0], [120.0, 100.0, -60.0]])
    a_true = euler_to_matrix(torch.as_tensor(poses))
    a_est = matrix_to_euler(a_true @ torch.as_tensor(turn)).numpy()
    expected = Projector(true).project(poses).numpy()
    got = Projector(turned.astype(np.float32)).project(a_est).numpy()
    wrong = Projector(cryobench.undo_turn(true, turn).astype(np.float32)).project(a_est).numpy()
    err, wrong_err = (np.linalg.norm(x - expected) / np.linalg.norm(expected) for x in (got, wrong))
    assert err < 0.1 and wrong_err > 0.3


def test_shared_turns_of_a_known_turn(cryobench, tmp_path):
    """rot + 20° on every particle of conformation 1: its shared turn is 20° about z, conformation 0's none."""
    import torch
    from deepcryo.core.geometry import rotation_angle_deg
    from deepcryo.core.particles import write_particles
    from relion_data import RenderSpec, truth_particles
    truth = truth_particles(RenderSpec(n=40, states=2))
    truth.particles["rlnImageName"] = np.array(["%06d@particles.mrcs" % (i + 1) for i in range(40)], dtype=object)
    conformation_of = {"%d@particles.mrcs" % (i + 1): c - 1 for i, c in enumerate(truth.particles["rlnClassNumber"])}
    est = truth.copy()
    est.particles["rlnAngleRot"] = np.asarray(est.particles["rlnAngleRot"]) + 20.0 * (
        np.asarray(est.particles["rlnClassNumber"]) == 2)
    write_particles(str(tmp_path / "est.star"), est)
    turns = cryobench.shared_turns(str(tmp_path / "est.star"), truth, conformation_of)
    np.testing.assert_allclose(rotation_angle_deg(torch.as_tensor(turns)).numpy(), [0.0, 20.0], atol=1e-3)
    np.testing.assert_allclose(abs(turns[1][2, 2]), 1.0, atol=1e-6)     # about z


def test_neighbour_rho_follows_a_curved_motion_that_pc1_misses():
    """A motion that swings one latent coordinate back and forth while another creeps along (a curve that does not
    cross itself): the straight first component, the swing, orders it badly, the hinge predicted from latent
    neighbours well; latents unrelated to the hinge order nothing."""
    rng = np.random.default_rng(0)
    hinge = rng.uniform(0, 1, 2000)
    z = np.stack([np.cos(3 * np.pi * hinge), 0.5 * hinge], 1) + 0.02 * rng.normal(size=(2000, 2))
    assert metrics.hinge_rho(z, hinge) < 0.3
    assert metrics.neighbour_rho(z, hinge) > 0.98
    assert metrics.neighbour_rho(rng.normal(size=(2000, 2)), hinge) < 0.15


def test_a_finished_peer_step_is_reused_not_run_again(cryobench, tmp_path):
    """RECOVAR's steps (hours on a CPU) are recorded once finished and reused by a later run on the same folder: the
    command fails if it runs a second time, and the second call returns the first call's (wall, CPU)."""
    import sys
    marker = tmp_path / "ran"
    once = [sys.executable, "-c", "import pathlib, sys; p = pathlib.Path(sys.argv[1]); "
            "sys.exit('ran twice') if p.exists() else p.touch()", str(marker)]
    first = cryobench._timed_once(str(tmp_path / "out"), "step", [once], None)
    second = cryobench._timed_once(str(tmp_path / "out"), "step", [once], None)
    assert marker.exists() and first == second and len(first) == 2
    assert not (tmp_path / "out" / "step_time_s.json.part").exists()


def test_recovar_runs_on_the_cpu_without_deepcryos_path(cryobench, monkeypatch):
    """RECOVAR's environment: JAX on the CPU, the benchmark's threads, and not deepcryo's PYTHONPATH (its own venv)."""
    import argparse
    monkeypatch.setenv("PYTHONPATH", "/somewhere/deepcryo")
    env = cryobench.recovar_environ(argparse.Namespace(threads=1))
    assert env["JAX_PLATFORMS"] == "cpu" and "PYTHONPATH" not in env
    assert "intra_op_parallelism_threads=1" in env["XLA_FLAGS"] and "multi_thread_eigen=false" in env["XLA_FLAGS"]


def test_per_image_rows_are_cryobenchs_evenly_spaced_images(cryobench):
    np.testing.assert_array_equal(cryobench.per_image_rows(20000, 20), np.arange(0, 20000, 1000))
    np.testing.assert_array_equal(cryobench.per_image_rows(7, 20), np.arange(7))
    assert len(cryobench.per_image_rows(100, 0)) == 0


def test_per_image_scores_read_each_image_against_its_own_conformation_in_the_methods_hand(cryobench, hinge):
    """Volumes equal to their images' true conformations score 0.5 (CryoBench's identical maps), also when written
    mirrored and scored in the mirrored hand; a volume of another conformation lowers its image's score, inside the
    moving region more than over the whole particle."""
    masks = metrics.scoring_masks(hinge)
    conformation = np.array([0, 4, 4, 2])
    truths = hinge[conformation]
    exact = cryobench.per_image_scores(truths, truths, masks, "as written")
    assert exact["per_image_auc_whole"] == pytest.approx(0.5) and exact["per_image_auc_moving"] == pytest.approx(0.5)
    assert len(exact["per_image_auc_whole_each"]) == 4
    flipped = cryobench.per_image_scores(cryobench.mirrored(truths), truths, masks, "mirrored")
    assert flipped["per_image_auc_whole"] == pytest.approx(0.5)
    wrong = cryobench.per_image_scores(hinge[[0, 0, 4, 2]], truths, masks, "as written")
    whole, moving = wrong["per_image_auc_whole_each"], wrong["per_image_auc_moving_each"]
    assert whole[0] == pytest.approx(0.5) and whole[1] < 0.5 and moving[1] < whole[1]


def test_cryodrgn_trains_at_its_own_minibatch_not_deepcryos(cryobench):
    """cryoDRGN's ``train_vae`` gets its own minibatch (8) whatever deepcryo's ``--batch-size`` is, and the one
    given when asked (every peer run before 2026-12-07 was handed deepcryo's 64, which understated cryoDRGN)."""
    import argparse
    import landscape as pairwise
    args = argparse.Namespace(cryodrgn="cryodrgn", latent_dim=8, epochs=20, batch_size=64, work_box=32, box=64)

    def minibatch(cmds):
        train = cmds[-1]
        assert train[1] == "train_vae"
        return int(train[train.index("-b") + 1])
    assert minibatch(pairwise.cryodrgn_commands("/d/particles.star", "/o", args)) == 8
    assert minibatch(pairwise.cryodrgn_commands("/d/particles.star", "/o", args, batch_size=32)) == 32
    for program in (pairwise, cryobench):
        for bad in (["--cryodrgn-batch-size", "0"], ["--cryodrgn", "/no/such/venv/bin/cryodrgn"]):
            with pytest.raises(SystemExit) as refused:
                program.main(bad)
            assert refused.value.code == 2
