"""SwiftAlign on simulated particles with known poses (phantom, 64 px, 2 Å/px, SNR 0.1, CTF).

Gallery: 12° steps (directions and psi), 16 Å band, origins within ±3 px (1.5 px grid).
"""

import faiss
import numpy as np
import pytest
import torch

from deepcryo.core.geometry import axis_angle_matrices, euler_to_matrix, matrix_to_euler, pose_distance_deg
from deepcryo.core.mrc import write_mrc
from deepcryo.core.particles import read_particles, write_particles
from deepcryo.core.simulate import phantom_volume, write_particle_set
from deepcryo.swiftalign import __main__ as cli
from deepcryo.swiftalign.index import load, merge_topk, train
from deepcryo.swiftalign.query import (ParticleBatch, distinct_candidates, query, refine_best,
                                       score_poses, significant_poses)

STEP_DEG = 12.0
TRAIN = dict(angular_step_deg=STEP_DEG, max_resolution_A=16.0, max_shift_px=3.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    d = tmp_path_factory.mktemp("swiftalign")
    vol = phantom_volume(64, seed=0)
    write_mrc(str(d / "map.mrc"), vol, 2.0)
    star = write_particle_set(str(d / "sim"), vol, 120, 2.0, snr=0.1, seed=3, max_shift_px=3.0,
                              defocus_range_A=(15000.0, 20000.0))
    return d, star


def _accuracy(truth_star, aligned):
    t = read_particles(truth_star, require_images=False)
    ang = pose_distance_deg(torch.as_tensor(t.angles_deg()), torch.as_tensor(aligned["angles_deg"])).numpy()
    shift = np.linalg.norm(t.origins_A() - aligned["origins_A"], axis=1) / t.pixel_size_A
    return (ang < 2 * STEP_DEG) & (shift < 1.0)


@pytest.fixture(scope="module")
def flat(data):
    d, star = data
    train(str(d / "map.mrc"), star, str(d / "flat"), index_factory="Flat", **TRAIN)
    return query(str(d / "flat"), star, str(d / "flat.star"), k=5)


def test_exact_index_accuracy(data, flat):
    d, star = data
    good = _accuracy(star, flat)
    assert good.mean() >= 0.9, good.mean()
    out = read_particles(str(d / "flat.star"))
    assert {"dcSwiftScore", "dcSwiftConfidence"} <= set(out.particles)
    assert np.median(flat["confidence"][good]) > 0
    # the runner-up: the best match more than two steps from the winner, refined (which may bring it back near
    # the winner), or the winner itself when no match is that far; never better than the winner
    gap = pose_distance_deg(torch.as_tensor(flat["angles_deg"]), torch.as_tensor(flat["alt_angles_deg"])).numpy()
    assert (gap > 2 * STEP_DEG).any()
    assert np.all(flat["alt_score"] <= flat["score"] + 1e-6)


def test_index_is_one_vector_per_pose_and_an_old_index_asks_to_be_rebuilt(data, flat, tmp_path):
    """The gallery holds the poses only (no shifts, no CTF groups): its size is the pose count whatever the
    shift range; an index of the earlier format (shifted, CTF-grouped references) is refused with one line."""
    import json
    import shutil
    from deepcryo.core.errors import InputError
    from deepcryo.swiftalign.gallery import gallery_poses, search_grid
    from deepcryo.swiftalign.index import load
    d, _ = data
    with open(d / "flat" / "manifest.json") as f:
        manifest = json.load(f)
    assert manifest["n_references"] == len(gallery_poses(STEP_DEG))
    assert np.allclose(manifest["origins_px"], search_grid(3.0, manifest["shift_step_px"]))
    old = tmp_path / "old"
    shutil.copytree(d / "flat", old)
    manifest["format"] = "deepcryo-swiftalign-1"
    with open(old / "manifest.json", "w") as f:
        json.dump(manifest, f)
    with pytest.raises(InputError, match="earlier deepcryo.*rebuild it"):
        load(str(old))


def test_search_grid_cells_cover_every_origin_within_the_range():
    """The search grid spans ±max shift at 1.5 shift steps or less, and its cell offsets reach every origin in
    the range: no point of [−6, 6]² is farther than half a cell (per axis) from a search origin + offset."""
    from deepcryo.swiftalign.gallery import cell_offsets, search_grid
    grid = search_grid(6.0, 2.0)
    axis = np.unique(grid[:, 0])
    assert axis.min() == -6.0 and axis.max() == 6.0 and np.diff(axis).max() <= 3.0 + 1e-9 and len(grid) == 25
    offsets = cell_offsets(grid).numpy()
    assert len(offsets) == 9 and np.isclose(np.abs(offsets).max(), 1.5)
    reach = (grid[:, None] + offsets[None]).reshape(-1, 2)
    points = np.random.default_rng(0).uniform(-6, 6, (2000, 2))
    gap = np.abs(points[:, None] - reach[None]).max(-1).min(1)
    assert gap.max() <= 0.75 + 1e-9
    assert cell_offsets(search_grid(0.0, 2.0)).tolist() == [[0.0, 0.0]]


def test_compressed_index_vs_exact(data, flat):
    d, star = data
    m = train(str(d / "map.mrc"), star, str(d / "pq"), index_factory="PCA96,IVF64,PQ48x4fs", **TRAIN)
    assert m["bytes_per_reference"] <= 64
    res = query(str(d / "pq"), star, None, k=5, nprobe=32)
    exact_good = _accuracy(star, flat)
    assert (_accuracy(star, res) & exact_good).sum() >= 0.95 * exact_good.sum()


def test_parabola_vertex_finds_the_maximum_of_a_quadratic_score():
    """The vertex of each axis' parabola is the maximum of a score quadratic in the turn (inside ±h), clamped to
    ±h beyond, and a step of h towards the better side where the scores curve upwards."""
    from deepcryo.swiftalign.query import parabola_vertex
    h = 0.1
    best = torch.tensor([0.03, -0.07, 0.25], dtype=torch.float64)  # the last beyond +h: clamped

    def score(turn):                                               # separable quadratic, maximum at ``best``
        return 1.0 - ((turn - best) ** 2).sum()

    moves = [torch.zeros(3, dtype=torch.float64)]
    for axis in range(3):
        for sign in (1.0, -1.0):
            moves.append(torch.zeros(3, dtype=torch.float64).index_fill(0, torch.tensor([axis]), sign * h))
    s = torch.stack([score(m) for m in moves])                      # current, then ±h about x, y, z
    np.testing.assert_allclose(parabola_vertex(s, h).numpy(), [0.03, -0.07, h], atol=1e-6)
    upward = torch.tensor([0.0, 0.2, 0.1, 0.1, 0.3, 0.0, 0.0])   # s₊ + s₋ ≥ 2 s₀ on every axis
    np.testing.assert_allclose(parabola_vertex(upward, h).numpy(), [h, -h, 0.0], atol=1e-12)


def test_distinct_candidates_keep_the_best_of_each_neighbourhood():
    """Greedy suppression, best score first: a candidate within the angle of a better *kept* one is dropped, one
    near only a dropped candidate is kept, whatever order the candidates come in."""
    base = euler_to_matrix(torch.tensor([[30.0, 60.0, 90.0]], dtype=torch.float64))[0]

    def turn(deg, axis):
        return axis_angle_matrices(torch.tensor(axis, dtype=torch.float64) * np.radians(deg))

    x, y, z = [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]
    rots = torch.stack([base, turn(5, x) @ base, turn(20, y) @ base, turn(20, y) @ turn(6, z) @ base,
                        turn(40, x) @ base]).to(torch.float32)
    scores = torch.tensor([0.5, 0.9, 0.7, 0.8, 0.1])
    # 0.9 kept; 0.8 (≈ 21° from it) kept; 0.7 (6° from 0.8) and 0.5 (5° from 0.9) dropped; 0.1 (≥ 35°) kept
    assert distinct_candidates(rots[None], scores[None], 11.25)[0].tolist() == [False, True, False, True, True]
    chain = torch.stack([turn(a, x) @ base for a in (16.0, 0.0, 8.0)]).to(torch.float32)   # C, A, B
    assert distinct_candidates(chain[None], torch.tensor([[0.7, 0.9, 0.8]]), 11.25)[0].tolist() == [True, True, False]


def test_refined_score_is_the_exact_score_of_the_refined_pose(data, flat):
    """refine_best keeps each candidate's slice from the pass that chose it and carries the leader's score
    across levels: what it returns must be the exact score of the pose and origin it returns (a stale slice
    or score would belong to another pose), and the refined pose must be nearer the truth than the starts."""
    d, star = data
    bundle = load(str(d / "flat"))
    truth = read_particles(star)
    idx = np.arange(32)
    with truth.open_images() as stack:
        parts = ParticleBatch(bundle.band, stack.read(idx), {k: v[idx] for k, v in truth.ctf_params().items()})
    rng = np.random.default_rng(4)
    true_rot = euler_to_matrix(torch.as_tensor(truth.angles_deg()[idx])).to(torch.float32)
    axes = rng.normal(size=(len(idx), 3, 3))
    turns = axes / np.linalg.norm(axes, axis=-1, keepdims=True) * np.radians([8.0, 12.0, 16.0])[None, :, None]
    starts = axis_angle_matrices(turns).to(torch.float32) @ true_rot[:, None]               # (B, 3, 3, 3)
    origins = torch.as_tensor(truth.origins_A()[idx] / truth.pixel_size_A, dtype=torch.float32)[:, None]
    origins = (origins + torch.as_tensor(rng.uniform(-1, 1, (len(idx), 3, 2)), dtype=torch.float32))
    scores = score_poses(bundle.projector, bundle.band, parts, starts, origins, torch.zeros(1, 2))[..., 0]
    step, sstep = bundle.manifest["angular_step_deg"], bundle.manifest["shift_step_px"]
    rot, org, score, lead = refine_best(bundle.projector, bundle.band, parts, starts, origins, scores, step, sstep)
    exact = score_poses(bundle.projector, bundle.band, parts, rot[:, None], org[:, None], torch.zeros(1, 2))[:, 0, 0]
    assert torch.allclose(score, exact, rtol=0, atol=1e-5), (score - exact).abs().max()
    assert bool((score >= scores.max(1).values - 1e-6).all())
    true_angles = torch.as_tensor(truth.angles_deg()[idx])
    before = pose_distance_deg(true_angles, matrix_to_euler(starts[:, 0].double())).numpy()
    after = pose_distance_deg(true_angles, matrix_to_euler(rot.double())).numpy()
    assert np.median(after) < 0.5 * np.median(before), (np.median(after), np.median(before))
    assert lead.shape == (len(idx),) and int(lead.max()) < 3


def test_local_mode_recovers_perturbed_poses(data):
    d, star = data
    truth = read_particles(star)
    rng = np.random.default_rng(1)
    prior = truth.copy()
    prior.set_poses(truth.angles_deg() + rng.uniform(-8, 8, size=(len(truth), 3)),
                    truth.origins_A() + rng.uniform(-2, 2, size=(len(truth), 2)))
    write_particles(str(d / "sim" / "prior.star"), prior)
    res = query(str(d / "flat"), star, str(d / "local.star"), k=3, local=True, prior=str(d / "sim" / "prior.star"),
                local_steps=2, local_shift_px=3.0)
    before = pose_distance_deg(torch.as_tensor(truth.angles_deg()), torch.as_tensor(prior.angles_deg())).numpy()
    after = pose_distance_deg(torch.as_tensor(truth.angles_deg()), torch.as_tensor(res["angles_deg"])).numpy()
    shift = np.linalg.norm(truth.origins_A() - res["origins_A"], axis=1) / 2.0
    assert np.median(after) < 0.5 * np.median(before)
    assert ((after < STEP_DEG) & (shift < 1.0)).mean() >= 0.9


def test_merge_topk_across_shards():
    d1, l1 = np.array([[0.1, 0.5, 0.9]]), np.array([[3, 4, 5]])
    d2, l2 = np.array([[0.2, 0.3, np.inf]]), np.array([[10, 11, -1]])
    d, lab = merge_topk([d1, d2], [l1, l2], 4)
    assert lab.tolist() == [[3, 10, 11, 4]] and np.allclose(d, [[0.1, 0.2, 0.3, 0.5]])


def test_bad_inputs(data, tmp_path, capsys):
    d, star = data
    write_mrc(str(tmp_path / "small.mrc"), np.zeros((48, 48, 48), np.float32), 2.0)
    write_mrc(str(tmp_path / "px.mrc"), np.zeros((64, 64, 64), np.float32), 1.5)
    base = ["train", "--particles", star, "--angular-step", "20", "--max-shift", "1", "--max-resolution", "20"]
    for ref, word in [("small.mrc", "box size mismatch"), ("px.mrc", "pixel size mismatch")]:
        out = tmp_path / ("idx_" + ref)
        assert cli.main(base + ["--reference", str(tmp_path / ref), "--output", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert word in err and "\n" not in err and not out.exists()
    nocft = read_particles(star)
    for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"):
        del nocft.particles[c]
    write_particles(str(d / "sim" / "noctf.star"), nocft)
    assert cli.main(["query", "--index", str(d / "flat"), "--particles", str(d / "sim" / "noctf.star"),
                     "--output", str(tmp_path / "a.star")]) == 2
    assert "rlnDefocus" in capsys.readouterr().err and not (tmp_path / "a.star").exists()
    empty = tmp_path / "empty.star"
    empty.write_text("data_optics\nloop_\n_rlnOpticsGroup\n_rlnImagePixelSize\n_rlnVoltage\n"
                     "_rlnSphericalAberration\n_rlnAmplitudeContrast\n1 2.0 300 2.7 0.1\n\n"
                     "data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n")
    assert cli.main(["query", "--index", str(d / "flat"), "--particles", str(empty),
                     "--output", str(tmp_path / "b.star")]) == 2
    assert capsys.readouterr().err.startswith("error:") and not (tmp_path / "b.star").exists()
    assert cli.main(["query", "--index", str(tmp_path), "--particles", star, "--output", str(tmp_path / "c.star")]) == 2
    assert "not a swiftalign index" in capsys.readouterr().err


def test_significant_poses_hold_the_fraction_with_the_fewest_poses():
    """RELION's significant poses: per particle the heaviest poses whose weights reach the fraction, no more."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 33, generator=g) * torch.linspace(0.1, 8.0, 50)[:, None]   # flat to peaked rows
    weights = torch.softmax(logits, dim=1)
    keep = significant_poses(weights, 0.999)
    kept_mass = (weights * keep).sum(1)
    assert bool((kept_mass >= 0.999 - 1e-6).all())
    dropped = weights.masked_fill(keep, -1.0).max(1).values       # the heaviest pose left out, -1 if none
    lightest_kept = weights.masked_fill(~keep, 2.0).min(1).values
    assert bool((dropped <= lightest_kept).all())                 # heaviest first
    assert bool(((kept_mass - lightest_kept) < 0.999 + 1e-6).all())  # one fewer would not reach the fraction
    assert int(keep.sum(1)[0]) == 33 and int(keep.sum(1)[-1]) < 15   # a flat row keeps all, a peaked one few
    assert significant_poses(torch.eye(4)).equal(torch.eye(4, dtype=torch.bool))
