"""The landscape decoder's table and slices: FFT transform and gather against their definitions.

:meth:`LandscapeVAE.basis_ft` must equal ``fft3c(pad_to(V·mask/gridding, 2D))`` on its half volume; its slices
must equal the :class:`deepcryo.core.projector.Projector`'s; and the gradients of a loss through both, with
respect to the volumes and to the poses (learnt in the pose-free mode), must equal those of the previous
implementation (three separable matrix DFTs over a zero-bordered table, gathered by plain indexing), written
out here as the reference.
"""
import torch
import torch.nn.functional as F

from deepcryo.core import fourier
from deepcryo.core.geometry import quaternion_to_matrix
from deepcryo.core.projector import Projector, gridding_kernel_1d
from deepcryo.landscape.model import LandscapeVAE, _HalfTransform, half_ball, padded_half_transform, \
    padded_half_transform_adjoint

BOX = 16


def _model(box=BOX, n_basis=3, seed=0):
    torch.manual_seed(seed)
    model = LandscapeVAE(box, 2, n_basis, 16, torch.randn(box, box, box), torch.ones(box, box))
    with torch.no_grad():
        model.volumes.normal_()                       # every volume with power up to Nyquist
    return model


def _half_of_fft3c(model):
    """(R, C) reference: the centred transform of the padded volumes, kx = P/2 taken from −P/2, at the rows of
    the model's ball (its (ky, kz, kx) order)."""
    p = model.padded_box
    vol = (model.volumes * model.mask3d / model.gridding).detach().to(torch.float64)
    ft = fourier.fft3c(fourier.pad_to(vol, p, 3))
    half = torch.cat([ft[..., p // 2:], ft[..., :1]], -1).permute(2, 1, 3, 0)            # (ky, kz, kx, C)
    return half[model.ball.kept(0, p)]


def _matrix_dft_slices(model, rotations):
    """The decoder's slices as first written: separable DFT matrices and autograd through a gather."""
    d, pb = model.box, model.padded_box
    g = gridding_kernel_1d(d, pb).to(torch.float64)[:, None]
    n = torch.arange(d, dtype=torch.float64) - d // 2
    kx = torch.arange(pb // 2 + 1, dtype=torch.float64)
    kyz = torch.arange(pb, dtype=torch.float64) - pb // 2
    dft_x = F.pad(torch.polar(1.0 / g.expand(-1, len(kx)), -2 * torch.pi * n[:, None] * kx[None] / pb), (0, 1))
    dft_yz = F.pad(torch.polar(1.0 / g.expand(-1, len(kyz)), -2 * torch.pi * n[:, None] * kyz[None] / pb), (0, 2))
    vols = (model.volumes * model.mask3d).to(torch.complex128)
    a = torch.matmul(vols, dft_x)
    b = torch.einsum("czyk,yj->czjk", a, dft_yz)
    t = torch.einsum("czjk,zi->ijkc", b, dft_yz)
    table = torch.cat([t.real, t.imag], -1).reshape(-1, 2 * t.shape[-1])
    sx, syz = pb // 2 + 2, pb + 2
    corners = torch.tensor([dz * syz * sx + dy * sx + dx for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)])
    pts = torch.matmul(model.freqs.to(torch.float64), rotations)
    conj = torch.where(pts[..., 0] < 0, -1.0, 1.0)
    pts = pts * (conj * pb)[..., None] + torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64) * (pb // 2)
    base = torch.floor(pts)
    frac = pts - base
    base = base.long()
    origin = (base[..., 2] * syz + base[..., 1]) * sx + base[..., 0]
    wx, wy, wz = (torch.stack([1 - frac[..., i], frac[..., i]], -1) for i in range(3))
    w = (wz[..., :, None, None] * wy[..., None, :, None] * wx[..., None, None, :]).reshape(origin.shape + (8,))
    vals = table[(origin[..., None] + corners).reshape(-1)].reshape(origin.shape + (8, -1))
    out = (w[..., None] * vals).sum(-2)
    m = table.shape[-1] // 2
    return torch.complex(out[..., :m], out[..., m:] * conj[..., None]).transpose(1, 2)


def test_basis_ft_is_the_padded_centred_transform():
    """Table = ``fft3c(pad_to(V·mask/gridding, P))`` on kz, ky = −P/2 … P/2−1, kx = 0 … P/2 within the ball, to
    float32 precision (fails if the centring phase or the (−1)^(z+y) sign is dropped, or a row is misplaced:
    errors of order 1). Box 16 and 18 keep part of the half cube (the ball's radius D + 2 < its corner)."""
    for box in (BOX, 18):
        model = _model(box)
        assert model.ball.rows < (2 * box) ** 2 * (box + 1)
        table = torch.view_as_complex(model.basis_ft().detach().contiguous()).to(torch.complex128)
        ref = _half_of_fft3c(model).reshape(table.shape)
        assert float((table - ref).abs().max() / ref.abs().max()) < 1e-5, box


def test_half_ball_holds_every_corner_the_slices_read():
    """Every interpolation corner of a point within radius D (the slices' reach) is a row of the ball, and the
    ball keeps about half of the half cube at a large box (53 % at box 256)."""
    box = BOX
    ball = half_ball(box)
    pts = torch.nn.functional.normalize(torch.randn(20000, 3), dim=1) * torch.rand(20000, 1) ** (1 / 3) * box
    pts = torch.cat([pts, torch.nn.functional.normalize(torch.randn(2000, 3), dim=1) * box])
    pts[:, 0] = pts[:, 0].abs()
    base = torch.floor(pts).long()
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                x, y, z = base[:, 0] + dx, base[:, 1] + dy + box, base[:, 2] + dz + box
                inside = (y < 2 * box) & (z < 2 * box)
                assert bool((x[inside] < ball.length[y[inside], z[inside]]).all())
    big = half_ball(256)
    assert 0.5 < big.rows / (512 ** 2 * 257) < 0.56


def test_slices_are_the_projectors():
    """Slices of every volume at random poses = the projector's central slices at every kept pixel, up to the
    Nyquist circle: both read the Hermitian half of the padded transform, kx = P/2 periodic."""
    model = _model()
    rot = quaternion_to_matrix(torch.randn(6, 4))
    sl = model.slices(rot, model.basis_ft()).detach()
    for c in range(model.n_basis + 1):
        ref = model.select(Projector((model.volumes[c] * model.mask3d).detach()).project_ft(rot))
        assert float((sl[:, c] - ref).abs().max() / ref.abs().max()) < 1e-5, c


def test_gradients_match_the_matrix_dft_decoder():
    """Values and gradients (volumes, rotations) of a weighted loss on the slices, against the matrix-DFT
    decoder computed in float64: relative errors at float32 precision."""
    model = _model()
    rot = quaternion_to_matrix(torch.randn(5, 4))
    weights = torch.rand(5, model.n_basis + 1, len(model.pixels), dtype=torch.complex128)
    results = []
    for slices in (lambda r: model.slices(r.to(torch.float32), model.basis_ft()),
                   lambda r: _matrix_dft_slices(model, r)):
        r = rot.to(torch.float64).clone().requires_grad_()
        model.volumes.grad = None
        sl = slices(r)
        loss = (weights * sl.to(torch.complex128)).real.sum() + (sl.abs() ** 2).sum()
        loss.backward()
        results.append((sl.detach().to(torch.complex128), model.volumes.grad.clone(), r.grad.clone()))
    for new, ref in zip(results[0], results[1]):
        ref = ref.to(new.dtype)
        assert float((new - ref).abs().max() / ref.abs().max()) < 1e-4


def test_half_transform_adjoint_float64_gradcheck():
    """The hand-written backward pass is the adjoint of the forward transform: torch.autograd.gradcheck in
    float64 at boxes 4 and 6 (the ball holds the whole half cube there), and ⟨T x, y⟩ = ⟨x, T* y⟩ at box 16
    and 18, where the ball leaves out the cube's corners."""
    for box in (4, 6):
        weighted = torch.randn(2, box, box, box, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(_HalfTransform.apply, (weighted, half_ball(box), None), eps=1e-6, atol=1e-6)
    for box in (BOX, 18):
        ball = half_ball(box)
        x = torch.randn(3, box, box, box, dtype=torch.float64)
        y = torch.randn(ball.rows, 3, dtype=torch.complex128)
        forward = (padded_half_transform(x, ball).conj() * y).real.sum()
        adjoint = (x * padded_half_transform_adjoint(y, box, ball)).sum()
        assert abs(float(forward - adjoint)) < 1e-9 * abs(float(forward))


def _batches(model, n_batches, batch=4, seed=1):
    """Random spectra, poses and CTFs at the model's box, as ``ParticleBatches.batches`` yields them."""
    g = torch.Generator().manual_seed(seed)
    d = model.box
    out = []
    for i in range(n_batches):
        spectra = torch.complex(torch.randn(batch, d, d, generator=g), torch.randn(batch, d, d, generator=g))
        rot = quaternion_to_matrix(torch.randn(batch, 4, generator=g))
        ctf = 0.5 + torch.rand(batch, d, d, generator=g)
        out.append((torch.arange(i * batch, (i + 1) * batch), spectra, rot, ctf))
    return out


def _plain_steps(model, batches, volume_steps):
    """Reference of :func:`train_epoch`: autograd through ``basis_ft`` at every batch, the networks stepped at
    every batch, the volumes' gradients kept aside and their mean applied once per ``volume_steps`` batches."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    kept = []
    for i, (_, spectra, rot, ctf) in enumerate(batches):
        optimizer.zero_grad()
        model(spectra, rot, ctf)["loss"].backward()
        kept.append(model.volumes.grad)
        model.volumes.grad = None
        if len(kept) == volume_steps or i == len(batches) - 1:
            model.volumes.grad = torch.stack(kept).mean(0)
            kept = []
        optimizer.step()


def test_train_epoch_steps_the_volumes_on_the_mean_gradient_of_volume_steps_batches(monkeypatch):
    """:func:`train_epoch` (one table per ``volume_steps`` batches, its gradient accumulated and carried to the
    volumes by the adjoint; each batch run in chunks of particles) leaves every parameter where the plain
    autograd reference does, for 1 (the plain training step) and for 3 steps per update over 7 batches (two
    full windows and one of 1 at the end), with the batch of 4 in one chunk or in chunks of 3 and 1 (the
    encoder's noise draws set to zero, so that the chunks draw what the batch would). Fails if the accumulator
    is not zeroed between windows, if the volumes step every batch, if the last window is dropped, or if a
    chunk's loss is not weighted by its share of the batch."""
    from deepcryo.landscape.train import default_volume_steps, train_epoch
    assert [default_volume_steps(d) for d in (32, 64, 90, 128, 256)] == [1, 1, 2, 4, 16]
    # large sets: up to 4 batches per update while an epoch keeps 64 updates; small sets: every step
    assert [default_volume_steps(32, b) for b in (0, 63, 64, 191, 192, 256, 5000)] == [1, 1, 1, 2, 3, 4, 4]
    assert [default_volume_steps(d, 5000) for d in (64, 128, 256)] == [4, 4, 16]
    assert [_model(box).chunk_particles() >= 64 for box in (16, 32)] == [True, True]
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    for volume_steps, chunk in ((1, None), (3, None), (3, 3)):
        batches = _batches(_model(), 7)
        ours, ref = _model(), _model()
        torch.manual_seed(5)
        sums = train_epoch(ours, ours, torch.optim.Adam(ours.parameters(), lr=1e-2), batches, 1.0, volume_steps,
                           chunk)
        torch.manual_seed(5)
        _plain_steps(ref, batches, volume_steps)
        assert sums.shape == (3,) and sums[0] > 0
        for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
            scale = float(b.detach().abs().max())
            assert float((a - b).detach().abs().max()) <= 1e-4 * scale, (volume_steps, name)
        moved = float((ours.volumes - _model().volumes).detach().abs().max())
        assert moved > 1e-3, volume_steps


def test_train_epoch_weighs_the_kl_term_batch_by_batch():
    """A KL weight given to :func:`train_epoch` as a function of the batch's index (the warm-up's ramp,
    :func:`deepcryo.landscape.train.kl_weight`) reaches every batch's loss: it rises within the epoch."""
    from deepcryo.landscape.train import train_epoch
    model, seen = _model(), []
    forward = model.forward

    def spy(*args, beta=1.0, **kwargs):
        seen.append(beta)
        return forward(*args, beta=beta, **kwargs)

    model.forward = spy
    train_epoch(model, model, torch.optim.Adam(model.parameters(), lr=1e-2), _batches(model, 3), lambda s: s / 4, 1)
    assert seen == [0.0, 0.25, 0.5]
