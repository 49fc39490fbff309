"""Unit tests of deepcryo.core against ground truth (no Scipion, no RELION needed)."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from deepcryo.core import ctf, fourier, fsc, geometry, projector, reconstruct, simulate
from deepcryo.core.errors import InputError
from deepcryo.core.mrc import ImageStack, read_mrc, write_mrc
from deepcryo.core.particles import read_particles, write_particles
from deepcryo.core.star import write_star


# ------------------------------------------------------------------------------------------------- CTF
def test_ctf_sign_and_zero_frequency():
    c = ctf.ctf_2d(64, 1.0, 15000, 15000, 0, 300, 2.7, 0.1)
    assert c.shape == (1, 64, 64)
    assert c[0, 32, 32].item() == pytest.approx(0.1, abs=1e-6)        # CTF(0) = +w (RELION sign)


def test_ctf_first_zero_matches_analytic():
    # first zero of sin(γ) for γ = π λ Δf s² + φ_amp (Cs = 0): s² = (π − φ_amp) / (π λ Δf)
    d, w, kv = 20000.0, 0.07, 300.0
    lam = ctf.wavelength_A(kv)
    s0 = math.sqrt((math.pi - math.atan(w / math.sqrt(1 - w * w))) / (math.pi * lam * d))
    vals = ctf.ctf_1d(torch.tensor([s0 * 0.999, s0 * 1.001]), d, kv, 0.0, w)[0]
    assert vals[0] > 0 > vals[1]


def test_ctf_astigmatism_angle_convention():
    # along the U direction (angle from x) the defocus is U; along the perpendicular, V
    u, v, ang = 20000.0, 15000.0, 30.0
    a = math.radians(ang)
    f = torch.tensor([[0.1 * math.cos(a), 0.1 * math.sin(a)], [-0.1 * math.sin(a), 0.1 * math.cos(a)]])
    c = ctf.ctf_from_freqs(f, u, v, ang, 300, 2.7, 0.1)[0]
    cu = ctf.ctf_from_freqs(f[:1], u, u, 0, 300, 2.7, 0.1)[0, 0]
    cv = ctf.ctf_from_freqs(f[1:], v, v, 0, 300, 2.7, 0.1)[0, 0]
    assert c[0].item() == pytest.approx(cu.item(), abs=1e-5)
    assert c[1].item() == pytest.approx(cv.item(), abs=1e-5)


def test_wavelength_300kv():
    assert ctf.wavelength_A(300) == pytest.approx(0.019687, rel=1e-4)


# --------------------------------------------------------------------------------------------- Fourier
def test_fft_centring_and_shift():
    img = torch.zeros(1, 32, 32)
    img[0, 16, 16] = 1.0
    assert torch.allclose(fourier.fft2c(img).imag, torch.zeros(1, 32, 32), atol=1e-6)   # centred point: real FT
    moved = fourier.shift_images(img, torch.tensor([[3.0, -2.0]]))
    assert moved[0].argmax().item() == (16 - 2) * 32 + (16 + 3)


def test_resize_preserves_mean_and_lowpass():
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.normal(size=(2, 64, 64)).astype(np.float32)) + 3.0
    small = fourier.resize_images(img, 32)
    assert small.shape == (2, 32, 32)
    assert small.mean().item() == pytest.approx(img.mean().item(), abs=1e-4)


# -------------------------------------------------------------------------------------------- geometry
def test_euler_matrix_round_trip_and_quaternions():
    rng = np.random.default_rng(1)
    angles = simulate.random_poses(200, rng)
    m = geometry.euler_to_matrix(angles)
    assert torch.allclose(m @ m.transpose(-1, -2), torch.eye(3, dtype=m.dtype).expand_as(m), atol=1e-10)
    assert torch.allclose(geometry.euler_to_matrix(geometry.matrix_to_euler(m)), m, atol=1e-9)
    assert torch.allclose(geometry.quaternion_to_matrix(geometry.matrix_to_quaternion(m)), m, atol=1e-9)


def test_euler_round_trip_at_the_poles():
    poles = np.array([[-50.0, 180.0, 10.0], [30.0, 0.0, 20.0], [170.0, 180.0, -100.0]])
    m = geometry.euler_to_matrix(poles)
    assert torch.allclose(geometry.euler_to_matrix(geometry.matrix_to_euler(m)), m, atol=1e-9)


def test_euler_matches_relion_formula():
    # RELION Euler_angles2matrix for rot=10, tilt=20, psi=30, spelled out
    r, t, p = (math.radians(x) for x in (10, 20, 30))
    ca, sa, cb, sb, cg, sg = math.cos(r), math.sin(r), math.cos(t), math.sin(t), math.cos(p), math.sin(p)
    ref = np.array([[cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
                    [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
                    [sb * ca, sb * sa, cb]])
    assert np.allclose(geometry.euler_to_matrix([10, 20, 30]).numpy(), ref)


def test_symmetry_groups_and_distance():
    assert [len(geometry.symmetry_matrices(s)) for s in ("C1", "C5", "D3", "T", "O", "I")] == [1, 5, 6, 12, 24, 60]
    a = np.array([[10.0, 40.0, 70.0]])
    assert geometry.pose_distance_deg(a, a + [90, 0, 0], "C4").item() < 1e-4
    assert geometry.pose_distance_deg(a, a + [90, 0, 0], "C1").item() == pytest.approx(90.0, abs=1e-6)
    assert geometry.pose_distance_deg(a, a + [0, 0, 15], "C1").item() == pytest.approx(15.0, abs=1e-6)


def test_sphere_sampling_is_even():
    dirs = geometry.sphere_directions(10.0)
    d = geometry.viewing_direction(np.concatenate([dirs, np.zeros((len(dirs), 1))], 1))
    cos = (d @ d.T).fill_diagonal_(-1)
    nearest = torch.rad2deg(torch.arccos(cos.max(1).values.clamp(-1, 1)))
    assert nearest.max().item() < 12.0 and nearest.min().item() > 5.0
    assert len(geometry.sample_poses(15, symmetry="C4")) < len(geometry.sample_poses(15)) / 3.5


# -------------------------------------------------------------------------------- projector/reconstruct
@pytest.fixture(scope="module")
def phantom32():
    return simulate.phantom_volume(32, seed=3)


def test_projection_of_rotated_volume_is_rotated_image(phantom32):
    p = projector.Projector(phantom32)
    a = p.project(np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 90.0]]))
    # psi = 90°: the image turns by 90° about the centre pixel N//2 (rot90 turns about (N-1)/2: roll by 1)
    rotated = torch.roll(torch.rot90(a[0], k=1, dims=(0, 1)), shifts=1, dims=0)
    assert np.corrcoef(rotated.ravel(), a[1].ravel())[0, 1] > 0.9999
    # top view of the volume is the sum over z
    direct = torch.as_tensor(phantom32).sum(0)
    assert np.corrcoef(direct.ravel(), a[0].ravel())[0, 1] > 0.995


def test_cropped_tables_sample_as_the_whole_half_table(phantom32):
    """A band request reads a copy cropped to its radius: a whole cube (kx < 0 unfolded and conjugated) at small
    radii, the folded half table at larger ones. Both must give the slices of the uncropped half table, including
    points with kx < 0 and the kx = 0 plane (``max_radius`` 0.5 reads the uncropped table)."""
    p = projector.Projector(phantom32)
    rot = geometry.euler_to_matrix(torch.as_tensor(np.random.default_rng(0).uniform(0, 360, (40, 3)))).float()
    f = torch.stack(torch.meshgrid(torch.fft.fftfreq(32), torch.fft.fftfreq(32), indexing="xy"), -1).reshape(-1, 2)
    for radius, whole in ((0.12, True), (0.4, False)):
        band = f[f.norm(dim=1) <= radius]
        full = p.central_slices(band, rot, 0.5)
        cropped = p.central_slices(band, rot, radius)
        assert p._cropped[2] is whole
        assert torch.allclose(cropped, full, rtol=0, atol=1e-5 * float(full.abs().max()))
        assert torch.allclose(p.sample(band @ rot[0, :2], radius), full[0], rtol=0,
                              atol=1e-5 * float(full.abs().max()))


def test_origin_convention(phantom32):
    p = projector.Projector(phantom32)
    centred = p.project(np.zeros((1, 3)))
    moved = p.project(np.zeros((1, 3)), origins_px=np.array([[2.0, 0.0]]))
    # origin +2 px: the particle centre sits at N//2 - 2
    assert torch.allclose(torch.roll(centred, shifts=-2, dims=-1), moved, atol=1e-3 * centred.abs().max().item())


def test_reconstruction_recovers_volume_with_ctf_and_symmetry(tmp_path, phantom32):
    star_path = simulate.write_particle_set(str(tmp_path), phantom32, 1500, 2.0, snr=None, seed=4)
    star = read_particles(star_path)
    out = reconstruct.reconstruct_star(star, halves=True)
    curve = fsc.fsc(phantom32, out["map"])
    assert fsc.fsc_resolution_A(curve, 2.0, 0.5) <= 2.5 * 2.0
    assert np.corrcoef(phantom32.ravel(), out["map"].ravel())[0, 1] > 0.99
    # symmetrised reconstruction of a C1 set makes a map of C4 symmetry
    sym = reconstruct.reconstruct_star(star.subset(np.arange(300)), symmetry="C4")["map"]
    turned = np.roll(np.rot90(sym, 1, axes=(1, 2)), 1, axis=1)      # 90° about z through voxel N//2
    assert np.corrcoef(sym.ravel(), turned.ravel())[0, 1] > 0.99
    assert np.corrcoef(sym.ravel(), np.roll(np.rot90(sym, 2, axes=(0, 1)), 1, axis=(0, 1)).ravel())[0, 1] < 0.9


def test_noisy_halves_fsc_tracks_truth(tmp_path, phantom32):
    star_path = simulate.write_particle_set(str(tmp_path), phantom32, 2000, 2.0, snr=0.1, seed=5)
    out = reconstruct.reconstruct_star(read_particles(star_path), halves=True)
    res_half = fsc.fsc_resolution_A(out["fsc"], 2.0, 0.143)
    res_truth = fsc.fsc_resolution_A(fsc.fsc(phantom32, out["map"]), 2.0, 0.5)
    assert res_half < 12.0 and res_truth < 12.0
    assert abs(res_half - res_truth) < 3.0          # the gold-standard estimate agrees with the truth


def test_reconstruction_corners_and_wiener_term(tmp_path, phantom32):
    star = read_particles(simulate.write_particle_set(str(tmp_path), phantom32, 600, 2.0, snr=0.05, seed=6))
    rec = reconstruct.Reconstructor(32)
    with star.open_images() as stack:
        images, rot, origins, ctf2d = reconstruct.batch_inputs(star, np.arange(len(star)), stack, "cpu")
    rec.insert_images(images, rot, origins, ctf2d)
    plain = rec.reconstruct()
    r = fourier.radius_grid_3d(32).numpy()
    assert plain[r > 16 + 3].std() < 1e-6                   # beyond N/2 + edge: one constant, the corners' mean
    inside = r < 14
    assert plain[inside].std() > 10 * plain[r > 16 + 3].std() + 1e-3
    # Wiener term W̄/SSNR: with SSNR = 1 everywhere a voxel of average weight is halved
    halved = rec.reconstruct(ssnr=np.ones(17))
    mid = (r > 3) & (r < 10)
    ft_plain, ft_half = np.fft.fftn(plain)[np.fft.ifftshift(mid)], np.fft.fftn(halved)[np.fft.ifftshift(mid)]
    ratio = np.real(np.vdot(ft_plain, ft_half)) / np.real(np.vdot(ft_plain, ft_plain))
    assert 0.35 < ratio < 0.65, ratio
    assert np.allclose(rec.reconstruct(ssnr=np.full(17, 1e6)), plain, atol=1e-4 * np.abs(plain).max())


def test_simulation_is_deterministic(tmp_path, phantom32):
    a = simulate.write_particle_set(str(tmp_path / "a"), phantom32, 20, 2.0, seed=9)
    b = simulate.write_particle_set(str(tmp_path / "b"), phantom32, 20, 2.0, seed=9)
    ia, _ = read_mrc(os.path.join(os.path.dirname(a), "particles.mrcs"))
    ib, _ = read_mrc(os.path.join(os.path.dirname(b), "particles.mrcs"))
    assert np.array_equal(ia, ib)


def test_states_and_hinge_differ():
    s = simulate.phantom_states(24, 2, seed=1)
    assert np.corrcoef(s[0].ravel(), s[1].ravel())[0, 1] < 0.95
    h0, h1 = simulate.hinge_volume(24, 0.0, seed=1), simulate.hinge_volume(24, 1.0, seed=1)
    assert np.allclose(h0, s[0], atol=1e-5) and np.corrcoef(h0.ravel(), h1.ravel())[0, 1] < 0.95


# ---------------------------------------------------------------------------------------------- STAR IO
def test_star_round_trip_keeps_every_column(tmp_path, phantom32):
    path = simulate.write_particle_set(str(tmp_path), phantom32, 30, 2.0, seed=2)
    star = read_particles(path)
    star.particles["rlnRandomSubset"] = np.arange(30) % 2 + 1
    out = str(tmp_path / "sub" / "copy.star")
    write_particles(out, star)
    back = read_particles(out)
    assert list(back.particles) == list(star.particles)
    for k, v in star.particles.items():
        if k == "rlnImageName":
            assert back.image_refs() == star.image_refs()
        else:
            assert np.allclose(np.asarray(back.particles[k], float), np.asarray(v, float), atol=1e-6)
    assert back.pixel_size_A == 2.0 and back.box_size == 32


def test_relion30_star_is_converted(tmp_path, phantom32):
    path = simulate.write_particle_set(str(tmp_path), phantom32, 5, 2.0, seed=2)
    star = read_particles(path)
    cols = {
        "rlnImageName": star.particles["rlnImageName"],
        "rlnDefocusU": star.particles["rlnDefocusU"], "rlnDefocusV": star.particles["rlnDefocusV"],
        "rlnDefocusAngle": star.particles["rlnDefocusAngle"],
        "rlnAngleRot": star.particles["rlnAngleRot"], "rlnAngleTilt": star.particles["rlnAngleTilt"],
        "rlnAnglePsi": star.particles["rlnAnglePsi"],
        "rlnOriginX": star.particles["rlnOriginXAngst"] / 2.0, "rlnOriginY": star.particles["rlnOriginYAngst"] / 2.0,
        "rlnVoltage": np.full(5, 200.0), "rlnSphericalAberration": np.full(5, 2.0),
        "rlnAmplitudeContrast": np.full(5, 0.07), "rlnDetectorPixelSize": np.full(5, 5.0),
        "rlnMagnification": np.full(5, 25000.0),
    }
    old = str(tmp_path / "old.star")
    write_star(old, {"": cols})
    back = read_particles(old)
    assert back.pixel_size_A == pytest.approx(2.0)
    assert np.allclose(back.origins_A(), star.origins_A(), atol=1e-5)
    assert np.allclose(back.ctf_params()["voltage_kV"], 200.0)
    assert back.box_size == 32


# ------------------------------------------------------------------------------------------- bad inputs
def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)


def test_reconstruct_program_bad_inputs(tmp_path, phantom32):
    out = str(tmp_path / "map.mrc")
    r = _run("deepcryo.core.reconstruct", "--particles", str(tmp_path / "missing.star"), "--output", out)
    assert r.returncode != 0 and "missing.star: STAR file not found" in r.stderr
    path = simulate.write_particle_set(str(tmp_path / "s"), phantom32, 10, 2.0, seed=2)
    # STAR without angles
    star = read_particles(path)
    for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
        del star.particles[c]
    write_particles(str(tmp_path / "s" / "noangles.star"), star)
    r = _run("deepcryo.core.reconstruct", "--particles", str(tmp_path / "s" / "noangles.star"), "--output", out)
    assert r.returncode != 0 and "rlnAngleRot" in r.stderr
    # truncated stack
    stack = os.path.join(os.path.dirname(path), "particles.mrcs")
    with open(stack, "r+b") as f:
        f.truncate(os.path.getsize(stack) // 2)
    r = _run("deepcryo.core.reconstruct", "--particles", path, "--output", out)
    assert r.returncode != 0 and "particles.mrcs" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(out) and not [f for f in os.listdir(tmp_path) if f.endswith(".part.mrc")]


def test_mixed_box_sizes_refused(tmp_path):
    write_mrc(str(tmp_path / "a.mrcs"), np.zeros((2, 16, 16)), 1.0, is_stack=True)
    write_mrc(str(tmp_path / "b.mrcs"), np.zeros((2, 20, 20)), 1.0, is_stack=True)
    with pytest.raises(InputError, match="mixed box sizes"):
        ImageStack([(0, str(tmp_path / "a.mrcs")), (0, str(tmp_path / "b.mrcs"))])


def test_nan_image_refused(tmp_path):
    data = np.zeros((2, 16, 16), dtype=np.float32)
    data[1, 3, 3] = np.nan
    write_mrc(str(tmp_path / "n.mrcs"), data, 1.0, is_stack=True)
    with ImageStack([(0, str(tmp_path / "n.mrcs")), (1, str(tmp_path / "n.mrcs"))]) as s:
        with pytest.raises(InputError, match="image 2 contains NaN"):
            s.read([0, 1])
