"""Landscape VAE on simulated sets with ground truth (SNR 0.1, CTF, random poses and shifts).

Small and CPU-only: 48 px particles, 24 px working box, 1200 particles, 3 epochs, one torch thread (two
threads spin-wait on a loaded machine and cost twice the CPU for the same result); the viewer's
figures are drawn headless from the two-state analysis; the pose-free mode's guard is checked exactly and
its end-to-end run against the truth at what it reliably reaches.
"""
import json
import os

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import adjusted_rand_score

from deepcryo.core import fourier
from deepcryo.core.fsc import fsc
from deepcryo.core.mrc import read_mrc
from deepcryo.core.particles import read_particles, write_particles
from deepcryo.core.simulate import hinge_volume, phantom_states, write_particle_set
from deepcryo.landscape import __main__ as cli
from deepcryo.landscape.analyze import analyze
from deepcryo.landscape import metrics
from deepcryo.landscape.model import LandscapeVAE
from deepcryo.landscape.train import CHECKPOINT, LATENT_STAR, latent_columns, load_model, train

BOX, WORK_BOX, N, PIXEL_A = 48, 24, 1200, 2.0
TRAIN = dict(latent_dim=8, epochs=3, box=WORK_BOX, batch_size=64, learning_rate=3e-3)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _crop_volume(volume, box):
    """Fourier-crop a (N, N, N) volume to (box, box, box)."""
    ft = fourier.fft3c(torch.as_tensor(volume, dtype=torch.float64))
    return fourier.ifft3c(fourier.crop_to(ft, box, 3)).real.numpy()


@pytest.fixture(scope="module")
def two_state(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_state")
    vols = phantom_states(BOX, 2, seed=0)
    state_of = np.random.default_rng(1).permutation(np.arange(N) % 2)
    star = write_particle_set(str(root / "sim"), vols, N, PIXEL_A, snr=0.1, seed=0, state_of=state_of)
    torch.manual_seed(0)
    train(star, str(root / "vae"), **TRAIN)
    summary = analyze(str(root / "vae"), n_clusters=2, max_clusters=3, trajectory_steps=3, n_pcs=1, umap=False)
    return root, vols, summary


@pytest.fixture(scope="module")
def hinge(tmp_path_factory):
    root = tmp_path_factory.mktemp("hinge")
    star = write_particle_set(str(root / "sim"), lambda t: hinge_volume(BOX, t, seed=0), N, PIXEL_A, snr=0.1,
                              seed=2)
    train(star, str(root / "vae"), **TRAIN)
    return root


def test_two_states_adjusted_rand_index(two_state):
    root, _, _ = two_state
    star = read_particles(str(root / "vae" / "analysis" / "particles.star"))
    ari = adjusted_rand_score(star.particles["rlnClassNumber"], star.particles["dcCluster"])
    assert ari >= 0.8, ari


def test_cluster_volumes_match_their_state(two_state):
    root, vols, summary = two_state
    star = read_particles(str(root / "vae" / "analysis" / "particles.star"))
    truth = [_crop_volume(v, WORK_BOX) for v in vols]
    shells = slice(1, WORK_BOX // 2)
    labels = np.asarray(star.particles["rlnClassNumber"], dtype=np.int64) - 1
    clusters = np.asarray(star.particles["dcCluster"], dtype=np.int64)
    for c in (1, 2):
        state = np.bincount(labels[clusters == c]).argmax()
        for kind in ("decoded", "reconstructed"):
            vol = read_mrc(str(root / "vae" / "analysis" / ("cluster_%02d_%s.mrc" % (c, kind))))[0]
            own = fsc(vol, truth[state])[shells].mean()
            other = fsc(vol, truth[1 - state])[shells].mean()
            assert own > other, (c, kind, own, other)
    with open(summary) as f:
        info = json.load(f)
    assert info["clusters_used"] == 2 and len(info["clusters"]) == 2
    assert os.path.exists(root / "vae" / "analysis" / "landscape.png")
    assert os.path.exists(root / "vae" / "analysis" / "pc1_step03.mrc")


def test_hinge_first_principal_component(hinge):
    from sklearn.decomposition import PCA
    star = read_particles(str(hinge / "vae" / LATENT_STAR))
    z = np.stack([star.particles[c] for c in latent_columns(8)], 1)
    pc1 = PCA(1).fit_transform(z)[:, 0]
    rho = spearmanr(pc1, star.particles["dcHingeParameter"]).correlation
    assert abs(rho) >= 0.8, rho


def test_analysis_writes_the_order_along_the_hinge(hinge, tmp_path):
    """``analyze`` writes ``dcOrder`` (the landscape's order along its curve) and volumes along it."""
    summary = json.load(open(analyze(str(hinge / "vae"), n_clusters=2, max_clusters=2, trajectory_steps=4, n_pcs=1,
                                     umap=False, output_dir=str(tmp_path / "analysis"))))
    star = read_particles(str(tmp_path / "analysis" / "particles.star"))
    rho = spearmanr(star.particles["dcOrder"], star.particles["dcHingeParameter"]).correlation
    assert abs(rho) >= 0.8, rho
    assert 0 <= summary["order_pc1_rho"] <= 1
    assert sorted(p.name for p in (tmp_path / "analysis").glob("order_step*.mrc")) == [
        "order_step%02d.mrc" % (i + 1) for i in range(4)]


def test_resume_from_checkpoint(tmp_path):
    vols = phantom_states(32, 2, seed=3)
    star = write_particle_set(str(tmp_path / "sim"), vols, 200, PIXEL_A, snr=0.1, seed=3)
    out = str(tmp_path / "vae")
    opts = dict(latent_dim=2, box=16, batch_size=50, n_basis=4)
    train(star, out, epochs=1, **opts)
    first = torch.load(os.path.join(out, CHECKPOINT), weights_only=True)
    assert first["epoch"] == 1
    train(star, out, epochs=2, resume=True, **opts)
    second = torch.load(os.path.join(out, CHECKPOINT), weights_only=True)
    assert second["epoch"] == 2 and len(second["history"]) == 2
    assert second["history"][0] == first["history"][0]
    assert not torch.equal(first["model"]["volumes"], second["model"]["volumes"])
    assert len(read_particles(os.path.join(out, LATENT_STAR))) == 200
    # the end of training stores the decoder's variation weight; a checkpoint written before it existed loads with ones
    weight = second["model"]["variation_weight"]
    assert weight.shape == (16, 16, 16) and weight.min() >= 0 and weight.max() <= 1
    del second["model"]["variation_weight"]
    torch.save(second, os.path.join(out, CHECKPOINT))
    assert torch.equal(load_model(out)[0].variation_weight, torch.ones_like(weight))


def test_variation_weight_keeps_the_hinge_and_drops_the_static_body(hinge):
    """The Wiener weight of the decoded variation against the truth: high where the hinge's two ends differ,
    low on density that does not move."""
    model, _ = load_model(str(hinge / "vae"))
    weight = model.variation_weight.numpy()
    written, pixel_A = read_mrc(str(hinge / "vae" / "variation_weight.mrc"))
    np.testing.assert_array_equal(written, weight)
    assert pixel_A == pytest.approx(PIXEL_A * BOX / WORK_BOX)
    ends = [_crop_volume(hinge_volume(BOX, t, seed=0), WORK_BOX) for t in (0.0, 1.0)]
    diff, mean = np.abs(ends[1] - ends[0]), (ends[0] + ends[1]) / 2
    moving = diff > 0.3 * diff.max()
    static = (mean > 0.3 * mean.max()) & (diff < 0.05 * diff.max())
    assert moving.sum() > 20 and static.sum() > 20
    assert weight[moving].mean() > weight[static].mean() + 0.2, (weight[moving].mean(), weight[static].mean())


def test_bad_inputs(tmp_path, capsys):
    vols = phantom_states(16, 2, seed=4)
    star_path = write_particle_set(str(tmp_path / "sim"), vols, 20, PIXEL_A, snr=0.1, seed=4)
    star = read_particles(star_path)
    no_pose = star.copy()
    del no_pose.particles["rlnAngleRot"]
    write_particles(str(tmp_path / "sim" / "no_pose.star"), no_pose)
    no_ctf = star.copy()
    del no_ctf.particles["rlnDefocusU"]
    write_particles(str(tmp_path / "sim" / "no_ctf.star"), no_ctf)
    empty = tmp_path / "sim" / "empty.star"
    text = open(star_path).read()
    empty.write_text(text[:text.index("data_particles")] + "data_particles\n\nloop_\n_rlnImageName #1\n")
    cases = [("no_pose.star", [], "rlnAngleRot"), ("no_ctf.star", [], "rlnDefocusU"),
             ("empty.star", [], "empty"), ("particles.star", ["--box", "64"], "--box"),
             ("missing.star", [], "not found")]
    for name, extra, message in cases:
        out = tmp_path / ("out_" + name)
        code = cli.main(["train", "--particles", str(tmp_path / "sim" / name), "--output-dir", str(out)] + extra)
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (name, err)
        assert not out.exists()
    assert cli.main(["analyze", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_viewer_figures_headless(two_state, tmp_path):
    """The viewer's figures from the finished two-state analysis, without a display, agree with the run."""
    from deepcryo.viewers import viewer_landscape as vl
    root, _, summary = two_state
    analysis = vl.load_analysis(str(root / "vae" / "analysis"))
    star = read_particles(str(root / "vae" / "analysis" / "particles.star"))
    assert len(analysis["pca"]) == N and len(analysis["clusters"]) == 2
    # clusters in landscape order: the first has the smaller mean PC1
    order = vl.cluster_order(analysis)
    pc1 = np.asarray(star.particles["dcPC1"])
    labels = np.asarray(star.particles["dcCluster"])
    assert pc1[labels == order[0]].mean() < pc1[labels == order[1]].mean()
    fig = vl.plot_landscape(analysis)
    points = fig.axes[0].collections[0].get_offsets()
    assert points.shape == (N, 2) and np.allclose(points[:, 0], pc1)
    figures = {"landscape": fig, "volumes": vl.plot_cluster_volumes(analysis),
               "traversal": vl.plot_traversal(analysis, 1),
               "order": vl.plot_traversal(analysis, "order"),
               "bic": vl.plot_png(str(root / "vae" / "analysis" / "bic.png"))}
    assert len(figures["volumes"].axes) == 4 * 2 and len(figures["traversal"].axes) == 2 * (3 + 1)
    assert len(figures["order"].axes) == 2 * (3 + 1) and figures["order"].axes[0].get_title() == "order bin 1/3"
    for name, f in figures.items():
        path = tmp_path / (name + ".png")
        f.savefig(str(path))
        assert path.stat().st_size > 5000, name
    with pytest.raises(ValueError):
        vl.plot_landscape(analysis, "UMAP")           # analysed with umap=False


def test_pose_free_mirror_guard():
    """Scoring both hands: a head that predicts the mirror pose M·A·M is matched in the mirror hand, with the
    same error as the true pose (the images of V at A and at MAM of the mirrored V coincide)."""
    from deepcryo.core.geometry import quaternion_to_matrix
    from deepcryo.core.projector import Projector
    torch.manual_seed(0)
    box = 24
    vol = torch.as_tensor(phantom_states(box, 1, seed=7)[0], dtype=torch.float32)
    model = LandscapeVAE(box, 2, 2, 16, vol, torch.ones(box, box), pose_free=True, pose_heads=1)
    with torch.no_grad():
        model.volumes[1:] = 0
    rot = quaternion_to_matrix(torch.randn(6, 4))
    mirror = torch.diag(torch.tensor([1.0, 1.0, -1.0]))
    ctf = torch.ones(6, box, box)
    images = Projector(vol * model.mask3d).project_ft(rot)
    table = model.basis_ft()
    # the pose head is replaced by one that returns the mirror poses, zero shifts
    model.predict_poses = lambda spectra: ((mirror @ rot @ mirror)[:, None], torch.zeros(6, 1, 2))
    model.pose_grid = model.pose_grid[:1]                  # a single (wrong) grid pose
    chosen, hand, shifts, _ = model.choose_poses(model.select(images), model.select(ctf), table)
    assert torch.all(hand == -1)
    sl = model.slices(chosen, table, hand)[:, 0]
    err = (sl - model.select(images)).abs().pow(2).sum(1) / model.select(images).abs().pow(2).sum(1)
    assert float(err.max()) < 1e-6, err


def test_pose_free_end_to_end(tmp_path):
    """Pose-free training on a small two-state set starting from a 20 Å reference: the predicted poses
    beat chance against the truth (see README "Pose-free mode" for the measured accuracy)."""
    vols = phantom_states(BOX, 2, seed=0)
    state_of = np.random.default_rng(1).permutation(np.arange(400) % 2)
    star = write_particle_set(str(tmp_path / "sim"), vols, 400, PIXEL_A, snr=0.1, seed=0, state_of=state_of)
    from deepcryo.core.mrc import write_mrc
    ref = fourier.lowpass_volume(torch.as_tensor((vols[0] + vols[1]) / 2), 20.0, PIXEL_A).numpy()
    write_mrc(str(tmp_path / "ref.mrc"), ref.astype(np.float32), PIXEL_A)
    out = str(tmp_path / "vae")
    train(star, out, latent_dim=2, epochs=2, box=WORK_BOX, batch_size=64, pose_free=True,
          reference=str(tmp_path / "ref.mrc"))
    truth, result = read_particles(star), read_particles(os.path.join(out, LATENT_STAR))
    err, chance = metrics.pose_error_deg(result.angles_deg(), truth.angles_deg())
    assert err < chance - 20.0, (err, chance)
    summary = analyze(out, n_clusters=2, trajectory_steps=2, n_pcs=1, umap=False)
    assert os.path.exists(summary)


def test_training_schedules():
    """The KL term's weight rises linearly with the steps over the warm-up epochs, from 0 to β, over at least
    ``MIN_WARMUP_STEPS`` steps, and is β in the last epoch whatever the warm-up; the learning rate keeps its value
    until the last quarter of the epochs, then falls linearly to a tenth at the last epoch (short trainings keep it)."""
    from deepcryo.landscape.train import MIN_WARMUP_STEPS, kl_weight, learning_rate_factor
    assert MIN_WARMUP_STEPS == 16
    assert [kl_weight(0.5, s, 100, 4, 2) for s in (0, 50, 100, 150, 200, 350)] == [0.0, 0.125, 0.25, 0.375, 0.5, 0.5]
    assert [kl_weight(1.0, s, 100, 20, 0.25) for s in (0, 5, 25, 26)] == [0.0, 0.2, 1.0, 1.0]
    assert [kl_weight(1.0, s, 10, 3, 0.25) for s in (0, 8, 16)] == [0.0, 0.5, 1.0]    # at least 16 steps
    assert kl_weight(1.0, 0, 100, 4, 0) == 1.0
    assert kl_weight(1.0, 0, 10, 1, 1) == 1.0 and [kl_weight(1.0, s, 10, 2, 5) for s in (0, 5, 10)] == [0.0, 0.5, 1.0]
    assert kl_weight(1.0, 5, 10, 2, 0.25) == 0.5                                       # 16 steps, capped at 1 epoch
    factors = [learning_rate_factor(e, 20) for e in range(20)]
    assert factors[:15] == [1.0] * 15 and factors[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(factors[14:], factors[15:]))
    assert [learning_rate_factor(e, 3) for e in range(3)] == [1.0, 1.0, 1.0]
