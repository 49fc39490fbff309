"""Volumes anywhere in the landscape, the encoder's σ and the gold-standard halves, on the small two-state
simulation of test_landscape (48 px particles at SNR 0.1, 24 px working box, 1200 particles, 3 epochs).

One fixture trains the two halves (``train_halves``); half 1 is then the trained VAE of the volume tests, and a
third VAE trained on half 2 with its images shuffled among its particles (each image at another particle's
pose and CTF: noise to the VAE) is the landscape that must not agree.
"""
import json
import os

import numpy as np
import pytest
import torch

from deepcryo.core.mrc import read_mrc, read_mrc_header
from deepcryo.core.particles import read_particles, write_particles
from deepcryo.core.simulate import phantom_states, write_particle_set
from deepcryo.landscape import __main__ as cli
from deepcryo.landscape import metrics
from deepcryo.landscape.analyze import analyze
from deepcryo.landscape.halves import compare_halves, train_halves
from deepcryo.landscape.train import LATENT_STAR, latent_columns, load_model, sigma_columns, train
from deepcryo.landscape.volumes import volumes

BOX, WORK_BOX, N, PIXEL_A, LATENT = 48, 24, 1200, 2.0, 8
TRAIN = dict(latent_dim=LATENT, epochs=3, box=WORK_BOX, batch_size=64, learning_rate=3e-3)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("halves")
    vols = phantom_states(BOX, 2, seed=0)
    state_of = np.random.default_rng(1).permutation(np.arange(N) % 2)
    star = write_particle_set(str(root / "sim"), vols, N, PIXEL_A, snr=0.1, seed=0, state_of=state_of)
    summary = train_halves(star, str(root / "halves"), n_clusters=2, **TRAIN)
    analyze(str(root / "halves" / "half1"), n_clusters=2, max_clusters=3, trajectory_steps=3, n_pcs=1, umap=False)
    half2 = read_particles(str(root / "halves" / "half2.star"))
    scrambled = half2.copy()
    names = np.asarray(scrambled.particles["rlnImageName"])
    scrambled.particles["rlnImageName"] = names[np.random.default_rng(2).permutation(len(names))]
    write_particles(str(root / "halves" / "scrambled.star"), scrambled)
    train(str(root / "halves" / "scrambled.star"), str(root / "halves" / "scrambled"), **TRAIN)
    with open(summary) as f:
        return root, star, json.load(f)


def _latents(train_dir):
    star = read_particles(os.path.join(train_dir, LATENT_STAR), require_images=False)
    return np.stack([np.asarray(star.particles[c]) for c in latent_columns(LATENT)], 1), star


def test_volume_at_cluster_centre_is_the_analysis_volume(halves):
    root, _, _ = halves
    train_dir = root / "halves" / "half1"
    out = root / "vols_centres"
    volumes(str(train_dir), str(out), zfile=str(train_dir / "analysis" / "cluster_centres.txt"))
    for k in (1, 2):
        ours, px = read_mrc(str(out / ("vol_%03d.mrc" % k)))
        ref, ref_px = read_mrc(str(train_dir / "analysis" / ("cluster_%02d_decoded.mrc" % k)))
        assert px == pytest.approx(ref_px) and px == pytest.approx(PIXEL_A * BOX / WORK_BOX)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert np.loadtxt(str(out / "vol_z.txt")).shape == (2, LATENT)


def test_pc_points_lie_on_the_principal_component(halves):
    """PC volumes lie on the principal components of the latents scaled by the encoder's root-mean-square σ
    (the truth by SVD), between the chosen percentiles of the particles' scores; the analysis' dcPC1 is the same
    component's scores."""
    root, _, _ = halves
    train_dir = root / "halves" / "half1"
    out = root / "vols_pc"
    summary = volumes(str(train_dir), str(out), n_pcs=2, pc_points_n=5, percentiles=(10, 90))
    z, star = _latents(str(train_dir))
    scale = np.sqrt((np.stack([np.asarray(star.particles[c]) for c in sigma_columns(LATENT)], 1) ** 2).mean(0))
    assert scale.max() > 1.05 * scale.min()       # unequal scales: the plain PCA would not pass
    mean = (z / scale).mean(0)
    _, _, vt = np.linalg.svd(z / scale - mean, full_matrices=False)      # the truth: PCA by SVD
    for j in (0, 1):
        points = np.loadtxt(str(out / ("pc%d_z.txt" % (j + 1)))) / scale
        assert points.shape == (5, LATENT)
        offsets = points - mean
        along = offsets @ vt[j]
        assert np.abs(offsets - along[:, None] * vt[j]).max() < 1e-6 * np.abs(offsets).max()
        scores = (z / scale - mean) @ vt[j]
        ends = np.sort(np.percentile(scores, [10, 90]))
        np.testing.assert_allclose(np.sort(along[[0, -1]]), ends, rtol=1e-6, atol=1e-9)
        assert np.all(np.diff(along) > 0) or np.all(np.diff(along) < 0)
    analysed = read_particles(str(train_dir / "analysis" / "particles.star"), require_images=False)
    pc1 = np.asarray(analysed.particles["dcPC1"], dtype=np.float64)
    assert abs(np.corrcoef(pc1, (z / scale - mean) @ vt[0])[0, 1]) > 1 - 1e-9
    model, ckpt = load_model(str(train_dir))
    vol = read_mrc(str(out / "pc2_003.mrc"))[0]
    expected = model.volume(torch.as_tensor(np.loadtxt(str(out / "pc2_z.txt"))[2:3], dtype=torch.float32))[0]
    np.testing.assert_allclose(vol, expected.numpy() * ckpt["config"]["scale"], atol=1e-5 * np.abs(vol).max())
    with open(summary) as f:
        assert sorted(json.load(f)["sets"]) == ["pc1", "pc2"]


def _states_beside_a_wide_uninformative_coordinate(n=3000):
    """Latents (n, 3) of two states on a coordinate the encoder pins down (σ 0.1) beside a wider one it does not
    (spread 0.9, σ 0.9) and a third (spread 0.3, σ 1); (state, z, σ)."""
    rng = np.random.default_rng(0)
    state = np.arange(n) % 2
    z = np.stack([state - 0.5 + 0.1 * rng.normal(size=n), 0.9 * rng.normal(size=n), 0.3 * rng.normal(size=n)], 1)
    sigma = np.broadcast_to([0.1, 0.9, 1.0], z.shape) * rng.uniform(0.8, 1.2, size=z.shape)
    return state, z, sigma


def test_latent_pca_ranks_directions_by_spread_per_unit_of_sigma():
    """The plain first component follows the wide uninformative coordinate, the σ-scaled one the states (and the
    scaling inverts exactly)."""
    from sklearn.metrics import adjusted_rand_score
    from deepcryo.landscape.volumes import LatentPCA
    state, z, sigma = _states_beside_a_wide_uninformative_coordinate()
    plain, scaled = LatentPCA(z), LatentPCA(z, sigma)
    assert adjusted_rand_score(state, plain.transform(z)[:, 0] > 0) < 0.05
    assert adjusted_rand_score(state, scaled.transform(z)[:, 0] > 0) > 0.99
    np.testing.assert_allclose(scaled.inverse_transform(scaled.transform(z)), z, atol=1e-9)
    np.testing.assert_allclose(scaled.noise_sd_, np.sqrt((sigma ** 2).mean(0)))
    np.testing.assert_allclose(plain.noise_sd_, 1.0)


def test_clusters_in_units_of_sigma_follow_the_states():
    """Plain k-means cuts the same latents along the wide coordinate the encoder does not pin down, k-means in units
    of σ (as analyze clusters) along the states; the centres are the clusters' mean latents; the BIC on σ units
    suggests the two states; the ARI of metrics is that clustering."""
    from sklearn.metrics import adjusted_rand_score
    from deepcryo.landscape import metrics
    from deepcryo.landscape.analyze import cluster_latents, suggest_clusters
    state, z, sigma = _states_beside_a_wide_uninformative_coordinate()
    plain, _ = cluster_latents(z, 2)
    labels, centres = cluster_latents(z, 2, sigma=sigma)
    assert adjusted_rand_score(state, plain) < 0.05
    assert adjusted_rand_score(state, labels) > 0.99
    np.testing.assert_allclose(centres, [z[labels == c].mean(0) for c in range(2)], atol=1e-6)
    assert suggest_clusters(z, 6, sigma=sigma)[0] == 2
    scale = np.sqrt((sigma ** 2).mean(0))
    assert metrics.state_ari(z / scale, state) == pytest.approx(adjusted_rand_score(state, labels))


def test_path_ends_at_the_chosen_particles_through_neighbours(halves):
    root, _, _ = halves
    train_dir = root / "halves" / "half1"
    z, star = _latents(str(train_dir))
    state = np.asarray(star.particles["rlnClassNumber"])
    start, end = int(np.nonzero(state == 1)[0][0]), int(np.nonzero(state == 2)[0][0])
    out = root / "vols_path"
    volumes(str(train_dir), str(out), path_particles=(start, end), path_points=6, neighbours=8)
    nodes = np.loadtxt(str(out / "path_particles.txt"), dtype=np.int64)
    assert nodes[0] == start and nodes[-1] == end and len(set(nodes.tolist())) == len(nodes)
    d = ((z[:, None] - z[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nearest = np.argsort(d, 1)[:, :8]
    for a, b in zip(nodes[:-1], nodes[1:]):
        assert b in nearest[a] or a in nearest[b], (a, b)
    points = np.loadtxt(str(out / "path_z.txt"))
    assert points.shape == (6, LATENT)
    np.testing.assert_allclose(points[0], z[start], rtol=1e-6)
    np.testing.assert_allclose(points[-1], z[end], rtol=1e-6)
    assert len([f for f in os.listdir(out) if f.startswith("path_") and f.endswith(".mrc")]) == 6
    # between two cluster centres: the path runs between the particles nearest to them
    centres = np.loadtxt(str(train_dir / "analysis" / "cluster_centres.txt"))
    out2 = root / "vols_path_centres"
    volumes(str(train_dir), str(out2), path_zfile=str(train_dir / "analysis" / "cluster_centres.txt"),
            path_rows=(2, 1), path_points=4)
    nodes = np.loadtxt(str(out2 / "path_particles.txt"), dtype=np.int64)
    assert nodes[0] == np.argmin(((z - centres[1]) ** 2).sum(1))
    assert nodes[-1] == np.argmin(((z - centres[0]) ** 2).sum(1))
    assert read_mrc_header(str(out2 / "path_004.mrc"))[0] == (WORK_BOX,) * 3


def test_volumes_bad_input(halves, tmp_path, capsys):
    root, _, _ = halves
    train_dir = str(root / "halves" / "half1")
    np.savetxt(str(tmp_path / "z3.txt"), np.zeros((2, 3)))
    np.save(str(tmp_path / "z.npy"), np.zeros((2, LATENT + 1)))
    (tmp_path / "text.txt").write_text("a b c\n")
    (tmp_path / "empty.txt").write_text("# no points\n")
    cases = [(["--zfile", str(tmp_path / "z3.txt")], "3 values"),
             (["--zfile", str(tmp_path / "z.npy")], "%d values" % (LATENT + 1)),
             (["--zfile", str(tmp_path / "text.txt")], "not a table"),
             (["--zfile", str(tmp_path / "none.txt")], "not found"),
             (["--zfile", str(tmp_path / "empty.txt")], "one latent point per row"),
             (["--path-particles", "0", str(N // 2)], "out of range"),
             (["--path-zfile", str(tmp_path / "z3.txt")], "3 values"),
             (["--pc", str(LATENT + 1)], "--pc"),
             (["--pc", "1", "--percentiles", "90", "10"], "--percentiles"),
             ([], "nothing to decode")]
    for extra, message in cases:
        code = cli.main(["volumes", train_dir, "--output-dir", str(tmp_path / "out")] + extra)
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not (tmp_path / "out").exists(), extra
    broken = tmp_path / "broken"                  # a training folder whose STAR lost its sigmas' values
    broken.mkdir()
    for name in ("checkpoint.pt", "consensus.mrc"):
        (broken / name).write_bytes((root / "halves" / "half1" / name).read_bytes())
    star = read_particles(os.path.join(train_dir, LATENT_STAR), require_images=False)
    star.particles[sigma_columns(LATENT)[0]] = np.zeros(len(star))
    write_particles(str(broken / LATENT_STAR), star)
    code = cli.main(["volumes", str(broken), "--output-dir", str(tmp_path / "out"), "--pc", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "dcZSigma" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_latent_sigma_beside_z(halves):
    """The encoder's σ is written beside z, positive, not taken for a latent coordinate by readers of
    ``dcLatent…``, and calibrated: along PC1 (the direction of the two states) it matches the scatter of the
    latent means of particles of one state about their state's mean (the error of the positions, which the
    simulation knows), and it is smaller than the distance between the states."""
    root, _, _ = halves
    z, star = _latents(str(root / "halves" / "half1"))
    sigma = np.stack([np.asarray(star.particles[c]) for c in sigma_columns(LATENT)], 1)
    assert sigma.shape == z.shape and np.all(sigma > 0)
    assert metrics.latents(star).shape == (len(star), LATENT)
    np.testing.assert_allclose(metrics.latents(star, sigma_units=True), z / np.sqrt((sigma ** 2).mean(0)), rtol=1e-6)
    _, _, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
    pc1 = (z - z.mean(0)) @ vt[0]
    sigma_pc1 = np.sqrt((sigma ** 2 * vt[0] ** 2).sum(1))     # diagonal Gaussian, projected on PC1
    state = np.asarray(star.particles["rlnClassNumber"])
    centres = [pc1[state == s].mean() for s in (1, 2)]
    scatter = np.sqrt(np.mean(np.concatenate([(pc1[state == s] - c) ** 2 for s, c in zip((1, 2), centres)])))
    ratio = np.median(sigma_pc1) / scatter
    assert 0.5 < ratio < 2.0, (np.median(sigma_pc1), scatter)
    assert np.median(sigma_pc1) < abs(centres[1] - centres[0]) / 2


def test_active_coordinates_counted_and_collapse_warned(halves, caplog):
    """The count of active latent coordinates (variance of the means over the particles > 0.01) reaches the
    analysis' summary and finds the two-state coordinate; latents at the prior's mean for every particle (a
    collapsed VAE) count 0 and are warned about."""
    import logging
    from deepcryo.landscape.train import report_active_coordinates
    root, _, _ = halves
    with open(str(root / "halves" / "half1" / "analysis" / "summary.json")) as f:
        summary = json.load(f)
    z, star = _latents(str(root / "halves" / "half1"))
    assert summary["active_coordinates"] == int((z.var(0) > 0.01).sum()) >= 1
    with caplog.at_level(logging.INFO, logger="deepcryo.landscape.train"):
        assert report_active_coordinates(1e-3 * np.random.default_rng(0).normal(size=(500, LATENT))) == 0
    assert any(r.levelno == logging.WARNING and "no active latent coordinate" in r.getMessage() for r in caplog.records)


def test_halves_agree(halves):
    _, _, summary = halves
    assert summary["cluster_ari"] >= 0.6, summary["cluster_ari"]
    assert summary["r2_half2_to_half1"] >= 0.5 and summary["canonical_correlations"][0] >= 0.8, summary
    for c in summary["conformations"]:
        assert c["mean_fsc"] >= 0.6 and c["fsc05_A"] <= 16.0, c


def test_scrambled_half_agrees_poorly(halves):
    root, star, good = halves
    bad = compare_halves(str(root / "halves" / "half1"), str(root / "halves" / "scrambled"), star, n_clusters=2)
    assert bad["cluster_ari"] < 0.2, bad["cluster_ari"]
    assert bad["r2_half2_to_half1"] < 0.2 and bad["canonical_correlations"][0] < 0.5, bad
    for g, b in zip(good["conformations"], bad["conformations"]):
        assert b["mean_fsc"] < g["mean_fsc"] - 0.2, (g["mean_fsc"], b["mean_fsc"])


# ------------------------------------------------------------------------------------------------- symmetry
def _c2(volume):
    """The exact 2-fold about z of a (D, D, D) array centred at D//2: V(−x, −y, z)."""
    return np.roll(np.flip(volume, (1, 2)), 1, axis=(1, 2))


def test_symmetric_decoder_slices_are_those_of_its_volume():
    """With a point group the decoder's slices (mean over the copies A·Sᵀ) are the projector's slices of the
    group-averaged volume it writes; for C4 (exact on the grid) to float precision. Copies taken as S·A instead
    of A·Sᵀ differ by far more."""
    from deepcryo.core.geometry import quaternion_to_matrix
    from deepcryo.core.projector import Projector
    from deepcryo.landscape.model import LandscapeVAE
    torch.manual_seed(0)
    box = 24
    vol = torch.as_tensor(phantom_states(box, 1, seed=7)[0], dtype=torch.float32)
    model = LandscapeVAE(box, 2, 3, 16, vol, torch.ones(box, box), symmetry="C4")
    with torch.no_grad():
        model.volumes[1:] = 0.3 * vol.std() * torch.randn_like(model.volumes[1:])
    z, rot = torch.randn(4, 2), quaternion_to_matrix(torch.randn(4, 4))
    volumes = model.volume(z)
    rot90 = np.roll(np.rot90(volumes[0].numpy(), 1, axes=(1, 2)), 1, axis=1)   # 90° about z, about D//2
    np.testing.assert_allclose(rot90, volumes[0].numpy(), atol=1e-5 * float(volumes.abs().max()))
    with torch.no_grad():
        predicted = model.decode_slice(z, model._symmetric_slices(rot, model.basis_ft(), None))
    for i in range(len(z)):
        expected = model.select(Projector(volumes[i]).project_ft(rot[i:i + 1]))[0]
        err = float((predicted[i] - expected).abs().pow(2).sum() / expected.abs().pow(2).sum())
        assert err < 1e-6, (i, err)      # C1 gives the same 1e-13 … 4e-7 (float32); C3 (interpolated) 3e-4


@pytest.mark.parametrize("group", ["C4", "D2", "C3"])
def test_symmetrize_volumes_is_the_trilinear_group_average(group):
    """``symmetrize_volumes`` is (1/G) Σ_S V(S x), trilinear: equal to scipy's ``map_coordinates`` (order 1, an
    independent interpolation) on a random volume that is zero near the box edge, to 1e-9 in float64 and 1e-5 of
    its maximum in float32 (C4 and D2 are exact on the grid, C3 interpolates); and to the mean of
    ``frames.rotate_volumes`` by the Sᵀ, which samples the same way (``core.geometry.sample_volumes``)."""
    from scipy.ndimage import map_coordinates

    from deepcryo.core.geometry import symmetry_matrices, voxel_positions
    from deepcryo.landscape.frames import rotate_volumes
    from deepcryo.landscape.model import symmetrize_volumes
    box = 20
    pos = voxel_positions(box).numpy()                                        # (x, y, z) from the centre
    vol = np.random.default_rng(3).normal(size=(box,) * 3) * (np.linalg.norm(pos, axis=-1) < box // 2 - 2)
    ops = symmetry_matrices(group).to(torch.float64)
    expected = np.mean([map_coordinates(vol, np.moveaxis((pos @ s.T + box // 2)[..., ::-1], -1, 0), order=1)
                        for s in ops.numpy()], 0)
    got = symmetrize_volumes(torch.as_tensor(vol)[None], ops)[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    got32 = symmetrize_volumes(torch.as_tensor(vol, dtype=torch.float32)[None], ops)[0].numpy()
    np.testing.assert_allclose(got32, expected, rtol=0, atol=1e-5 * np.abs(vol).max())
    turned = rotate_volumes(torch.as_tensor(vol), ops.transpose(1, 2)).mean(0).numpy()
    np.testing.assert_allclose(turned, got, rtol=0, atol=1e-12)


def test_symmetric_particles_two_states(tmp_path):
    """A C2-symmetric two-state set trained with --symmetry C2: the states separate, the decoded cluster
    volumes are C2-symmetric and closer to their own state than to the other."""
    from deepcryo.core.fourier import crop_to, fft3c, ifft3c
    from deepcryo.core.fsc import fsc
    vols = [(v + _c2(v)) / 2 for v in phantom_states(BOX, 2, seed=0)]
    state_of = np.random.default_rng(1).permutation(np.arange(N) % 2)
    star = write_particle_set(str(tmp_path / "sim"), vols, N, PIXEL_A, snr=0.1, seed=0, state_of=state_of)
    out = str(tmp_path / "vae")
    train(star, out, symmetry="c2", **TRAIN)
    assert load_model(out)[1]["config"]["symmetry"] == "C2"
    analyze(out, n_clusters=2, max_clusters=2, trajectory_steps=2, n_pcs=1, umap=False)
    result = read_particles(os.path.join(out, "analysis", "particles.star"))
    labels = np.asarray(result.particles["dcCluster"], dtype=np.int64)
    truth = np.asarray(result.particles["rlnClassNumber"], dtype=np.int64)
    from sklearn.metrics import adjusted_rand_score
    assert adjusted_rand_score(truth, labels) >= 0.8
    small = [ifft3c(crop_to(fft3c(torch.as_tensor(v, dtype=torch.float64)), WORK_BOX, 3)).real.numpy() for v in vols]
    for c in (1, 2):
        decoded = read_mrc(os.path.join(out, "analysis", "cluster_%02d_decoded.mrc" % c))[0]
        np.testing.assert_allclose(_c2(decoded), decoded, atol=1e-5 * np.abs(decoded).max())
        state = np.bincount(truth[labels == c]).argmax() - 1
        own, other = (fsc(decoded, small[s])[1:WORK_BOX // 2].mean() for s in (state, 1 - state))
        assert own > other, (c, own, other)
