"""Landscape VAE on simulated sets with ground truth (SNR 0.1, CTF, random poses and shifts).

Small and CPU-only: 48 px particles, 24 px working box, 2000 particles, 4 epochs.
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
from deepcryo.core.io import read_mrc, read_particles, write_particles
from deepcryo.core.simulate import hinge_volume, phantom_states, write_particle_set
from deepcryo.landscape import __main__ as cli
from deepcryo.landscape.analyze import analyze
from deepcryo.landscape.train import CHECKPOINT, LATENT_STAR, latent_columns, train

BOX, WORK_BOX, N, PIXEL_A = 48, 24, 2000, 2.0
TRAIN = dict(latent_dim=8, epochs=4, box=WORK_BOX, batch_size=64, learning_rate=3e-3, log=lambda *a: None)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


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
    summary = analyze(str(root / "vae"), n_clusters=2, trajectory_steps=3, n_pcs=1, umap=False,
                      log=lambda *a: None)
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


def test_resume_from_checkpoint(tmp_path):
    vols = phantom_states(32, 2, seed=3)
    star = write_particle_set(str(tmp_path / "sim"), vols, 200, PIXEL_A, snr=0.1, seed=3)
    out = str(tmp_path / "vae")
    opts = dict(latent_dim=2, box=16, batch_size=50, n_basis=4, log=lambda *a: None)
    train(star, out, epochs=1, **opts)
    first = torch.load(os.path.join(out, CHECKPOINT), weights_only=True)
    assert first["epoch"] == 1
    train(star, out, epochs=2, resume=True, **opts)
    second = torch.load(os.path.join(out, CHECKPOINT), weights_only=True)
    assert second["epoch"] == 2 and len(second["history"]) == 2
    assert second["history"][0] == first["history"][0]
    assert not torch.equal(first["model"]["volumes"], second["model"]["volumes"])
    assert len(read_particles(os.path.join(out, LATENT_STAR))) == 200


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
