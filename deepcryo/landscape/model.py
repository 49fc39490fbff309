"""Landscape VAE: a pose- and CTF-aware encoder and a latent-conditioned volume decoder.

Decoder (choice argued by measurement)
--------------------------------------
The volume of latent ``z`` is ``V(z) = V₀ + Σ_m c_m(z) V_m``: a mean volume V₀ (initialised from the
consensus reconstruction) plus ``n_basis`` learned basis volumes weighted by a small MLP ``c(z)``. All
volumes are real-space (D, D, D) grids under a soft spherical mask; the particle's Fourier slice is taken
exactly as :class:`deepcryo.core.projector.Projector` does (gridding correction, 2× zero padding, centred
3D FFT, trilinear sampling at ``k·A``, see :meth:`deepcryo.core.projector.Projector.sample`), so decoded
volumes and reconstructions share one convention. The padded transforms of the ``n_basis + 1`` volumes are
computed once per optimisation step, whatever the batch size, by FFTs (:func:`padded_half_transform`,
O((M+1) D³ log D), and its adjoint in the backward pass); each particle then costs one trilinear lookup of
``n_basis + 1`` values per Fourier pixel (half plane ``kx >= 0`` within radius D/2, by Friedel symmetry),
O((M+1) D²), and its scatter in the backward pass. The transform, its adjoint and the optimiser's step over
the volumes do not depend on the batch and grow as D³ log D, against D² per particle, so training updates
the volumes once per several batches (:func:`deepcryo.landscape.train.train_epoch`, with their gradient
accumulated in the table's rows), (D/64)² by default: the cost per particle then grows with the pixel count.
The volume decoder is cheaper per particle than a coordinate-MLP decoder (figures for both in
``benchmarks/RESULTS.md``) but not by orders of magnitude; it was chosen above all because the per-basis
slices it produces are what the encoder consumes, and because V₀ starts at the consensus map. The price
is expressiveness: motions are represented in an ``n_basis``-dimensional space of volumes, with a
non-linear map from the latent to the mixing weights.

Encoder (pose- and CTF-aware)
-----------------------------
Given the particle's consensus pose, the encoder does not see raw pixels: it sees the noise-whitened
correlations of the particle's residual ``r = X − CTF·S₀`` with each CTF-weighted basis slice
``CTF·S_m`` (``f_m = Re Σ_k conj(CTF S_m) r / σ²(k)``), normalised by their norms
``g_m = Σ_k |CTF S_m|² / σ²(k)``: inputs ``f_m / √g_m`` and ``log g_m``. These are the sufficient statistics
of a linear model of the particle's conformation at its pose, so the encoder never has to learn
rotation invariance (the cost that makes image-encoders slow to train).

Pose-free mode
--------------
With ``pose_free=True`` the given poses are not used: a pose head (MLP on the noise-whitened half-plane
spectrum, 3 × 256) predicts ``pose_heads`` candidate poses per particle, each a unit quaternion and an
in-plane shift (px of the working box, bounded to ±``max_shift_px`` by a tanh). Guards:

- *Mirror hand.* An image of the volume V at pose A is exactly the image of its mirror V(M·x),
  M = diag(1, 1, −1), at pose M·A·M, whose slice points are those of A with the z component negated
  (``k·MAM = (k·A)·M`` for the in-plane k). So every head's candidate is scored in both hands and the
  better one is kept (a loss symmetric over hands, as cryoAI's symmetrised loss). The decoder then never
  needs to represent both hands: one hand of V explains every particle through the pose alone, and the
  latent has no incentive to encode the hand (a network without such a guard can learn both hands).
  A fixed-hand regulariser would need a reference of known hand, which a pose-free run does not
  have; the min over hands costs one extra lookup of V₀ per candidate.
- *Local minima of amortised poses.* A pose head trained only by the gradient of the likelihood through
  the interpolation does not leave its random start (measured: see ``benchmarks/RESULTS.md``). So the
  candidates also include an exhaustive search against V₀
  (a 20° grid of 1872 poses × 9 shifts, scored with two matmuls per batch, then ±7° about each
  projection-frame axis around the winner); all candidates are scored against V₀ only (two real channels,
  cheap), the best one wins, is decoded with the full basis, and, when the search won, the best head is
  pulled towards it (``distill_weight`` × chordal distance + shift error): the search teaches the head,
  the head's gradient refines below the grid step where it wins.

The chosen pose and shift are then used exactly as given poses are in the main mode (the encoder sees the
spectrum centred by the chosen shift). V₀ starts from a reference map when one is given, otherwise from a
soft sphere (no consensus map exists without poses); a sphere carries no orientation, so without a
reference the search has nothing to lock onto (measured figures: README).

Symmetry
--------
With a point group G (``symmetry``, RELION's names and operators, :func:`deepcryo.core.geometry.symmetry_matrices`)
the decoded volume is the group average ``V_G(x) = (1/|G|) Σ_S V(S x)`` of the decoder's volume. Its Fourier
transform is the average of ``V̂(S q)``, so its central slice at pose A is the average of the slices of V at the
symmetry-copy poses ``A Sᵀ`` (the copies :class:`deepcryo.core.reconstruct.Reconstructor` inserts): every
conformation the decoder can produce is G-symmetric, and the encoder sees slices of symmetric volumes. The
slices cost |G| lookups per particle (the memory of a batch grows by |G|): fine for Cn and Dn; for T, O and I,
RELION's symmetry expansion of the particles with C1 here is the cheaper route. Decoded volumes
(:meth:`LandscapeVAE.volume`) are averaged in real space (trilinear, exact for 2- and 4-folds on the grid axes).

Likelihood
----------
Gaussian noise with a radial spectrum σ²(k) estimated from the consensus residuals; for centred
unnormalised spectra of real images the negative log-likelihood is ``½ Σ_k |X − CTF·S(z)|² / σ²(k)``
over the full plane within radius D/2 (Parseval: equal to the real-space Gaussian NLL for white noise).
Loss per particle: NLL + β·KL(q(z|X) ‖ N(0, I)).
"""
from __future__ import annotations

import ctypes
import dataclasses
import itertools
import sys
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..core import fourier
from ..core.fsc import spherical_mask
from ..core.geometry import sample_volumes, symmetry_matrices, voxel_positions
from ..core.projector import gridding_kernel_1d

__all__ = ["HalfBall", "LandscapeVAE", "Workspace", "half_ball", "padded_half_transform", "padded_half_transform_adjoint",
           "radial_noise_variance", "soft_sphere", "symmetrize_volumes"]


def soft_sphere(box: int, radius_px: Optional[float] = None) -> torch.Tensor:
    """(D, D, D) soft-edged sphere (value 1 inside, radius ``box/4`` px by default): pose-free V₀ start."""
    r = fourier.radius_grid_3d(box)
    radius = box / 4.0 if radius_px is None else radius_px
    return fourier.soft_edge(r, radius, max(1.0, box / 12.0))


def symmetrize_volumes(volumes: torch.Tensor, operators: torch.Tensor) -> torch.Tensor:
    """Group average ``(1/G) Σ_S V(S x)`` of real-space volumes (K, D, D, D) over operators (G, 3, 3).

    ``x = (x, y, z)`` in px from the centre ``D//2`` along array axes (2, 1, 0) (the projector's convention);
    trilinear interpolation, zero outside the box (:func:`deepcryo.core.geometry.sample_volumes`).
    """
    d = volumes.shape[-1]
    points = voxel_positions(d, volumes.dtype, volumes.device)                         # (D, D, D, 3)
    out = torch.zeros_like(volumes)
    for op in operators.to(volumes):
        out += sample_volumes(volumes, (points @ op.T).expand(len(volumes), d, d, d, 3))
    return out / len(operators)


class Workspace:
    """Large arrays reused from one training step to the next (the decoder's table and the transform's
    intermediate), so that a step does not allocate, and page-fault, gigabytes afresh: at box 128 the table is
    (R, M+1) complex (:class:`HalfBall`), 0.6 GB for 16 basis volumes. An array handed out is overwritten by the next
    request under the same name; autograd's version counter turns any use of an overwritten saved table (two
    forward passes before one backward pass) into an error instead of a silent wrong gradient."""

    def __init__(self) -> None:
        self._arrays: Dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The array ``name`` of this shape, dtype and device (the previous one, or a new one): uninitialised."""
        a = self._arrays.get(name)
        if a is None or a.shape != shape or a.dtype != dtype or a.device != device:
            self._arrays.pop(name, None)
            a = self._arrays[name] = torch.empty(shape, dtype=dtype, device=device)
            _advise_huge_pages(a)
        return a


_HUGE_PAGE, _MADV_HUGEPAGE = 2 << 20, 14


def _advise_huge_pages(a: torch.Tensor) -> None:
    """Ask Linux for transparent huge pages (2 MB) under a large CPU array not yet touched (``madvise``): the
    decoder's gathers and scatters reach the table's rows at random, and with 4 kB pages each also misses the
    TLB. Best effort: nothing happens on other systems, on GPUs, for arrays under 64 MB, or where the kernel
    refuses (``/sys/kernel/mm/transparent_hugepage/enabled`` set to ``never``)."""
    size = a.numel() * a.element_size()
    if a.device.type != "cpu" or not sys.platform.startswith("linux") or size < (64 << 20):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    start = -(-a.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (a.data_ptr() + size) // _HUGE_PAGE * _HUGE_PAGE
    if end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)


def _array(workspace: Optional[Workspace], name: str, shape, dtype, device) -> torch.Tensor:
    """``workspace.get(...)``, or a new uninitialised array when there is no workspace."""
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return workspace.get(name, tuple(shape), dtype, device)


def _rolled_pad(x: torch.Tensor, padded: int, dims: Tuple[int, ...]) -> torch.Tensor:
    """Zero-pad axes ``dims`` (each of length D) to ``padded`` with sample D//2 at index 0 (the second half of the
    samples first, the first half at the end): an FFT of the result has its phase origin at the centre D//2."""
    d = x.shape[dims[0]]
    shape = list(x.shape)
    for dim in dims:
        shape[dim] = padded
    out = x.new_zeros(shape)
    halves = ((slice(0, d - d // 2), slice(d // 2, d)), (slice(padded - d // 2, padded), slice(0, d // 2)))
    for parts in itertools.product(halves, repeat=len(dims)):
        dst, src = [slice(None)] * x.dim(), [slice(None)] * x.dim()
        for dim, (to, fro) in zip(dims, parts):
            dst[dim], src[dim] = to, fro
        out[tuple(dst)] = x[tuple(src)]
    return out


def _rolled_crop(x: torch.Tensor, box: int, dims: Tuple[int, ...]) -> torch.Tensor:
    """Adjoint of :func:`_rolled_pad`: the D samples of each padded axis, back in their order."""
    for dim in dims:
        p = x.shape[dim]
        x = torch.cat([x.narrow(dim, p - box // 2, box // 2), x.narrow(dim, 0, box - box // 2)], dim)
    return x


def _chunk(rows: int, row_bytes: int) -> int:
    """Rows per chunk of a loop over a large array: about 8 MB of temporaries, whatever the box."""
    return max(1, min(rows, (1 << 23) // row_bytes))


def _channel_group(channels: int, channel_bytes: int) -> int:
    """Channels per pass of the transforms: the intermediate (D, P, P/2+1, group) stays under 1 GB."""
    return max(1, min(channels, (1 << 30) // channel_bytes))


@dataclasses.dataclass(frozen=True)
class HalfBall:
    """The rows of the decoder's table: the half-volume frequencies it keeps.

    Frequencies kx = 0 … P/2, kz, ky = −P/2 … P/2 − 1 (padded-grid units, P = 2D) with kx² + ky² + kz² ≤ (D + 2)²:
    the slices' points ``k·A`` reach radius D (the model's pixels lie within the Nyquist circle) and their
    interpolation corners lie within √3 of a point, so nothing outside is ever read. The corners of the half
    cube are not stored: about half of it at large boxes (and the same for the gradient's accumulator), which
    is what lets a box-256 decoder train within 24 GB of memory (``benchmarks/RESULTS.md``). Lines of constant
    (ky, kz) are stored one after the other in (ky, kz) order, each a run of ``length[ky + P/2, kz + P/2]``
    entries x = 0 … length − 1 starting at row ``start[ky + P/2, kz + P/2]``; a chunk of ky planes is one block
    of rows."""
    start: torch.Tensor          # (P, P) long, [ky + P/2, kz + P/2]
    length: torch.Tensor         # (P, P) long
    rows: int

    def block(self, y0: int, y1: int) -> slice:
        """The rows of the ky planes y0 … y1 − 1 (indices of the padded axis)."""
        end = self.rows if y1 >= len(self.start) else int(self.start[y1, 0])
        return slice(int(self.start[y0, 0]), end)

    def kept(self, y0: int, y1: int) -> torch.Tensor:
        """(y1 − y0, P, P/2+1) bool: which (ky, kz, kx) of those planes are rows, in the rows' order."""
        x = torch.arange(len(self.start) // 2 + 1, device=self.length.device)
        return x < self.length[y0:y1, :, None]


def half_ball(box: int, device: Optional[torch.device] = None) -> HalfBall:
    """The :class:`HalfBall` of working box ``box`` (even)."""
    p = 2 * box
    k = torch.arange(p, dtype=torch.long) - box
    room = (box + 2) ** 2 - k[:, None] ** 2 - k[None, :] ** 2                     # [ky, kz]: kx² allowed
    root = torch.sqrt(room.clamp(min=0).to(torch.float64)).floor().long()
    root = root - (root * root > room).long() + ((root + 1) ** 2 <= room).long()    # exact integer square root
    length = torch.where(room >= 0, root + 1, 0).clamp(max=box + 1)
    flat = length.reshape(-1)
    start = (torch.cumsum(flat, 0) - flat).reshape(p, p)
    return HalfBall(start.to(device), length.to(device), int(flat.sum()))


def padded_half_transform(weighted: torch.Tensor, ball: HalfBall, workspace: Optional[Workspace] = None
                          ) -> torch.Tensor:
    """Table (R, C) of the 2× zero-padded, centred volumes' transform on the frequencies of ``ball``.

    ``weighted`` (C, D, D, D) real, indexed [z, y, x], already multiplied by the mask, the gridding correction
    and the sign ``(−1)^(z+y)`` (which puts the zero frequency of the kz and ky axes at index P/2, as
    :func:`deepcryo.core.fourier.fft3c` does, without shifting the transform). Row r holds, for the r-th
    frequency (kx, ky, kz) of ``ball``, ``fft3c(pad_to(V, P))`` at [kz + P/2, ky + P/2, kx] (V times the mask and
    gridding folded in ``weighted``); by Friedel symmetry, the whole transform within the ball. Three 1D FFTs,
    each axis padded by :func:`_rolled_pad`, the channels innermost throughout (the table's layout, which the
    slices' gather needs): a real FFT along x, then along y over the D non-zero z planes only, then along z,
    in chunks of planes so that every temporary is ~8 MB and every copy runs over contiguous rows, and in
    groups of channels so that the intermediate stays under 1 GB. O(D³ log D) operations, against O(D⁴) for
    matrix DFTs. With a ``workspace`` the table and the intermediate are its arrays.
    """
    c, d = weighted.shape[0], weighted.shape[-1]
    p, x = 2 * d, d + 1
    ctype = torch.complex128 if weighted.dtype == torch.float64 else torch.complex64
    table = _array(workspace, "table", (ball.rows, c), ctype, weighted.device)
    size = torch.empty((), dtype=ctype).element_size()
    group = _channel_group(c, d * p * x * size)
    mid = _array(workspace, "mid", (d, p, x, group), ctype, weighted.device)          # (z, ky, kx, channels)
    for c0 in range(0, c, group):
        part = weighted[c0:c0 + group].permute(1, 2, 3, 0)                             # (z, y, x, g)
        g = part.shape[-1]
        m = mid[..., :g]
        step = _chunk(d, p * x * g * size)
        for z0 in range(0, d, step):
            half = torch.fft.rfft(_rolled_pad(part[z0:z0 + step], p, (2,)), dim=2)
            m[z0:z0 + step] = torch.fft.fft(_rolled_pad(half, p, (1,)), dim=1)
        step = _chunk(p, p * x * g * size)
        for y0 in range(0, p, step):
            y1 = min(p, y0 + step)
            column = torch.fft.fft(_rolled_pad(m[:, y0:y1], p, (0,)), dim=0).transpose(0, 1)   # (ky, kz, kx, g)
            table[ball.block(y0, y1), c0:c0 + g] = column[ball.kept(y0, y1)]
    return table


def padded_half_transform_adjoint(grad: torch.Tensor, box: int, ball: HalfBall,
                                  workspace: Optional[Workspace] = None) -> torch.Tensor:
    """Adjoint of :func:`padded_half_transform`: (C, D, D, D) real from a complex (R, C) table.

    For a real loss L and ``grad = ∂L/∂Re T + i ∂L/∂Im T`` this is ``∂L/∂weighted``: the rows spread back
    onto their planes (zeros elsewhere), then the conjugate transposes of the padded DFTs in reverse order
    (unnormalised inverse FFTs, then :func:`_rolled_crop`); for the real FFT along x every bin but kx = 0 and
    P/2 stands for a conjugate pair, hence the halves before the Hermitian inverse.
    """
    p, x, c = 2 * box, box + 1, grad.shape[1]
    size = grad.element_size()
    group = _channel_group(c, box * p * x * size)
    mid = _array(workspace, "mid", (box, p, x, group), grad.dtype, grad.device)
    real = grad.new_empty((box, box, box, c), dtype=torch.float64 if grad.dtype == torch.complex128 else
                          torch.float32)
    for c0 in range(0, c, group):
        g = min(group, c - c0)
        m = mid[..., :g]
        step = _chunk(p, p * x * g * size)
        for y0 in range(0, p, step):
            y1 = min(p, y0 + step)
            planes = grad.new_zeros((y1 - y0, p, x, g))                                # (ky, kz, kx, g)
            planes[ball.kept(y0, y1)] = grad[ball.block(y0, y1), c0:c0 + g]
            m[:, y0:y1] = _rolled_crop(torch.fft.ifft(planes.transpose(0, 1), dim=0, norm="forward"), box, (0,))
        step = _chunk(box, p * x * g * size)
        for z0 in range(0, box, step):
            half = _rolled_crop(torch.fft.ifft(m[z0:z0 + step], dim=1, norm="forward"), box, (1,))
            half[:, :, 1:-1] *= 0.5
            real[z0:z0 + step, ..., c0:c0 + g] = _rolled_crop(torch.fft.irfft(half, n=p, dim=2, norm="forward"),
                                                              box, (2,))
    return real.permute(3, 0, 1, 2)


class _HalfTransform(torch.autograd.Function):
    """:func:`padded_half_transform` as (R, C, 2) real, with its adjoint as the backward pass."""

    @staticmethod
    def forward(ctx, weighted, ball, workspace):
        ctx.box, ctx.ball, ctx.workspace = weighted.shape[-1], ball, workspace
        return torch.view_as_real(padded_half_transform(weighted, ball, workspace))

    @staticmethod
    def backward(ctx, grad):
        g = torch.view_as_complex(grad.contiguous())
        return padded_half_transform_adjoint(g, ctx.box, ctx.ball, ctx.workspace), None, None


class _Trilinear(torch.autograd.Function):
    """Rows (R, F) = Σ_j w[:, j] · table[index[:, j]] over the 8 corners of each point, without the (R, 8, F) array.

    Backward scatters ``∂L/∂table`` (``index_add_``) into ``table_grad`` when one is given (the training loop's
    accumulator, see :func:`deepcryo.landscape.train.train_epoch`; the table itself then gets no gradient), or
    else into a new dense table gradient; when the weights need it (poses learnt in the pose-free mode), it
    returns their gradient from the same gathered rows.
    """

    @staticmethod
    def forward(ctx, table, index, weight, table_grad):
        out = torch.zeros((len(index), table.shape[1]), dtype=table.dtype, device=table.device)
        for j in range(index.shape[1]):
            out.addcmul_(table.index_select(0, index[:, j]), weight[:, j:j + 1])
        ctx.save_for_backward(table if ctx.needs_input_grad[2] else None, index, weight)
        ctx.rows, ctx.table_grad = table.shape[0], table_grad
        return out

    @staticmethod
    def backward(ctx, grad):
        table, index, weight = ctx.saved_tensors
        grad_table = grad_weight = None
        if ctx.table_grad is not None or ctx.needs_input_grad[0]:
            into = ctx.table_grad
            if into is None:
                into = grad_table = torch.zeros((ctx.rows, grad.shape[1]), dtype=grad.dtype, device=grad.device)
            for j in range(index.shape[1]):
                into.index_add_(0, index[:, j], grad * weight[:, j:j + 1])
        if ctx.needs_input_grad[2]:
            grad_weight = torch.stack([(grad * table.index_select(0, index[:, j])).sum(1)
                                       for j in range(index.shape[1])], 1)
        return grad_table, None, grad_weight, None


def _mlp(n_in, hidden, n_out, layers=2):
    mods, width = [], n_in
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    mods.append(nn.Linear(width, n_out))
    return nn.Sequential(*mods)


def radial_noise_variance(residuals: torch.Tensor, box: int) -> torch.Tensor:
    """(D, D) per-pixel noise variance from residual spectra (B, D, D): ``mean |r|²`` per integer shell."""
    r = torch.round(fourier.radius_grid_2d(box, device=residuals.device)).long().clamp(max=box // 2)
    power = (residuals.abs() ** 2).mean(0)
    shells = box // 2 + 1
    total = torch.zeros(shells, device=residuals.device).index_add_(0, r.reshape(-1), power.reshape(-1))
    count = torch.zeros(shells, device=residuals.device).index_add_(0, r.reshape(-1),
                                                                    torch.ones_like(power).reshape(-1))
    per_shell = total / count.clamp(min=1)
    per_shell = torch.maximum(per_shell, 1e-6 * per_shell.max())
    return per_shell[r]


class LandscapeVAE(nn.Module):
    """VAE over particle spectra at the working box D.

    Args:
        box: working box D (px, even).
        latent_dim: latent dimension.
        n_basis: number of basis volumes of the decoder.
        hidden: width of the encoder and coefficient MLPs.
        mean_volume: (D, D, D) initial V₀ (consensus map at the working box, in the dataset's intensity scale).
        noise_var: (D, D) noise variance per Fourier pixel (see :func:`radial_noise_variance`).
        symmetry: point group of every decoded volume (RELION's names; C1: none); not with ``pose_free``.
    """

    def __init__(self, box: int, latent_dim: int, n_basis: int, hidden: int, mean_volume: torch.Tensor,
                 noise_var: torch.Tensor, pose_free: bool = False, pose_heads: int = 8,
                 max_shift_px: Optional[float] = None, symmetry: str = "C1") -> None:
        super().__init__()
        self.symmetry = str(symmetry).strip().upper()
        self.register_buffer("sym_ops", symmetry_matrices(self.symmetry).to(torch.float32), persistent=False)
        if pose_free and len(self.sym_ops) > 1:
            raise ValueError("the pose-free mode does not take a symmetry group")
        self.box, self.latent_dim, self.n_basis, self.hidden = int(box), int(latent_dim), int(n_basis), int(hidden)
        self.pose_free, self.pose_heads = bool(pose_free), int(pose_heads)
        self.max_shift_px = float(self.box / 8.0 if max_shift_px is None else max_shift_px)
        self.grid_step_deg, self.distill_weight = 20.0, 10.0
        self.padded_box = 2 * self.box
        g = gridding_kernel_1d(self.box, self.padded_box)
        self.register_buffer("gridding", g[:, None, None] * g[None, :, None] * g[None, None, :])
        self.register_buffer("mask3d", spherical_mask(self.box, edge_px=max(2.0, self.box / 16)))
        # half plane kx >= 0 within radius D/2; Friedel mates (kx > 0) count twice in the likelihood
        k = fourier.freq_grid_2d(self.box)
        keep = ((k[..., 0] >= 0) & (fourier.radius_grid_2d(self.box) <= self.box / 2)).reshape(-1)
        pixels = torch.nonzero(keep).squeeze(1)
        k = k.reshape(-1, 2)[pixels]
        self.register_buffer("pixels", pixels)
        self.register_buffer("freqs", torch.cat([k, torch.zeros_like(k[:, :1])], 1))
        self.register_buffer("pixel_weight", torch.where(k[:, 0] > 0, 2.0, 1.0))
        self.register_buffer("noise_var", torch.as_tensor(noise_var, dtype=torch.float32))
        mean_volume = torch.as_tensor(mean_volume, dtype=torch.float32)
        basis = 1e-3 * mean_volume.std() * torch.randn((self.n_basis,) + mean_volume.shape)
        self.volumes = nn.Parameter(torch.cat([mean_volume[None], basis], 0))
        # Wiener weight of the decoded variation (deepcryo.landscape.shrinkage), fixed after training; ones before
        self.register_buffer("variation_weight", torch.ones(mean_volume.shape))
        self.encoder = _mlp(2 * self.n_basis, hidden, 2 * self.latent_dim)
        self.coefficients = _mlp(self.latent_dim, hidden, self.n_basis)
        if self.pose_free:
            from ..core.geometry import euler_to_matrix, sample_poses
            self.pose_net = _mlp(2 * len(pixels), 256, 6 * self.pose_heads, layers=3)
            grid = euler_to_matrix(torch.as_tensor(sample_poses(self.grid_step_deg))).to(torch.float32)
            self.register_buffer("pose_grid", grid, persistent=False)
            half = self.grid_step_deg / 3.0
            small = [(0.0, 0.0, 0.0)] + [tuple(sgn * half * (i == j) for j in range(3))
                                         for i in range(3) for sgn in (-1, 1)]
            axes = torch.as_tensor(small, dtype=torch.float64) * torch.pi / 180.0       # rotation vectors
            self.register_buffer("local_rotations", torch.linalg.matrix_exp(torch.stack([
                torch.tensor([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]]) for v in axes])).float(),
                persistent=False)
            d = torch.tensor([-1.0, 0.0, 1.0])
            self.register_buffer("grid_shifts", torch.stack(torch.meshgrid(d, d, indexing="xy"), -1).reshape(-1, 2),
                                 persistent=False)
        # mask, gridding correction and the sign (−1)^(z+y) that centres the kz, ky axes (see basis_ft)
        sign = 1.0 - 2.0 * (torch.arange(self.box) % 2).to(torch.float32)
        self.register_buffer("_weight", self.mask3d / self.gridding * sign[:, None, None] * sign[None, :, None],
                             persistent=False)
        ball = half_ball(self.box)
        self.register_buffer("ball_start", ball.start, persistent=False)
        self.register_buffer("ball_length", ball.length, persistent=False)
        self.ball_rows = ball.rows
        self.workspace = Workspace()       # the decoder's table and intermediate, reused by basis_ft

    def config(self) -> Dict[str, Any]:
        """Constructor arguments other than the tensors (for checkpoints)."""
        return {"box": self.box, "latent_dim": self.latent_dim, "n_basis": self.n_basis, "hidden": self.hidden,
                "pose_free": self.pose_free, "pose_heads": self.pose_heads, "max_shift_px": self.max_shift_px,
                "symmetry": self.symmetry}

    def chunk_particles(self) -> int:
        """Particles per chunk of the per-particle work (slices, encoder, likelihood): its (chunk, M+1, K) complex
        arrays stay near 4 MB, within the CPU's caches. These element-wise passes are bound by memory traffic,
        and at a batch of 64 their arrays outgrow the caches from box ~100 on, so that a particle's cost would
        otherwise grow faster than its pixel count (:func:`deepcryo.landscape.train.train_epoch` and
        :func:`deepcryo.landscape.train.encode_posterior` run a batch chunk by chunk, with the same result). In
        the pose-free mode a batch stays whole: each call projects the whole search grid, a cost per call."""
        if self.pose_free:
            return 1 << 30
        return max(1, (4 << 20) // (8 * (self.n_basis + 1) * len(self.pixels)))

    def select(self, images_ft: torch.Tensor) -> torch.Tensor:
        """The model's Fourier pixels (..., K) of centred (..., D, D) arrays (spectra, CTFs)."""
        return images_ft.reshape(images_ft.shape[:-2] + (-1,))[..., self.pixels]

    # ----------------------------------------------------------------------------------------- decoder
    @property
    def ball(self) -> HalfBall:
        """The table's frequencies (:class:`HalfBall`), on the model's device."""
        return HalfBall(self.ball_start, self.ball_length, self.ball_rows)

    def basis_ft(self, workspace: Optional[Workspace] = None) -> torch.Tensor:
        """(R, M+1, 2) table of the padded centred transforms of the masked volumes (real, imaginary).

        Rows: the half-volume frequencies of :attr:`ball` (kx ≥ 0, Friedel; radius ≤ D + 2 of the padded grid,
        P = 2D); row r equals ``fft3c(pad_to(V·mask/gridding, P))`` at its frequency (kx = P/2 taken periodically
        from −P/2), computed by :func:`padded_half_transform` (FFTs, O(D³ log D) per step) with its adjoint as
        the backward pass. With a ``workspace`` (:meth:`forward` passes the model's own) the table is that
        workspace's array, overwritten by the next call.
        """
        return _HalfTransform.apply(self.volumes * self._weight, self.ball, workspace)

    def slices(self, rotations: torch.Tensor, table: torch.Tensor, hand: Optional[torch.Tensor] = None,
               table_grad: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Central slices (B, C, K) complex of the C volumes of ``table`` (:meth:`basis_ft`, or some of its
        volumes, ``table[:, :1]`` for V₀) at (B, 3, 3) poses (trilinear, as the projector).

        ``hand`` (B,) ±1: −1 samples the mirror pose M·A·M (z of the slice points negated). Corners outside the
        padded grid or the table's ball weigh zero (the projector's zero padding; no kept pixel reaches them).
        ``table_grad`` (R, 2C) real: the backward pass adds ``∂L/∂table`` into it (see :class:`_Trilinear`).
        """
        pts = torch.matmul(self.freqs, rotations)                                     # (B, K, 3), k·A
        if hand is not None:
            pts = torch.cat([pts[..., :2], pts[..., 2:] * hand[:, None, None]], -1)
        conj = torch.where(pts[..., 0] < 0, -1.0, 1.0)                               # Friedel: V(−k) = V(k)*
        p = self.padded_box
        pts = pts * (conj * p)[..., None]
        pts = pts + torch.tensor([0.0, 1.0, 1.0], device=pts.device) * (p // 2)
        base = torch.floor(pts)
        frac = pts - base
        lower = base.long()
        corners = torch.stack([lower, lower + 1], -1)                                  # (B, K, 3 axes, 2)
        size = torch.tensor([p // 2 + 1, p, p], device=pts.device)[:, None]
        inside = (corners >= 0) & (corners < size)
        w = torch.stack([1 - frac, frac], -1) * inside                                 # (B, K, 3, 2)
        corners = torch.minimum(corners.clamp(min=0), size - 1)
        line = corners[..., 1, None, :] * p + corners[..., 2, :, None]                 # (B, K, z, y): ky·P + kz
        start, length = self.ball_start.reshape(-1)[line], self.ball_length.reshape(-1)[line]
        x = corners[..., 0, None, None, :]
        stored = x < length[..., None]                                                 # (B, K, z, y, x)
        index = torch.where(stored, start[..., None] + x, 0).reshape(-1, 8)
        w = (w[..., 2, :, None, None] * w[..., 1, None, :, None] * w[..., 0, None, None, :] * stored).reshape(-1, 8)
        out = _Trilinear.apply(table.reshape(len(table), -1), index, w, table_grad).reshape(pts.shape[:2] + (-1, 2))
        return torch.complex(out[..., 0], out[..., 1] * conj[..., None]).transpose(1, 2)

    # -------------------------------------------------------------------------------------- pose head
    def predict_poses(self, spectra: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pose-free mode: the pose head's candidates for selected spectra (B, K).

        Returns rotations (B, H, 3, 3) (gradients flow to the pose head) and shifts (B, H, 2) px (the origin
        that centres the particle, as ``rlnOrigin`` / pixel size), H = ``pose_heads``.
        """
        from ..core.geometry import quaternion_to_matrix
        b, h = spectra.shape[0], self.pose_heads
        whitened = spectra / self.select(self.noise_var).sqrt()
        out = self.pose_net(torch.cat([whitened.real, whitened.imag], 1)).reshape(b, h, 6)
        rot = quaternion_to_matrix(out[..., :4] + 1e-6)                               # (B, H, 3, 3)
        shifts = self.max_shift_px * torch.tanh(out[..., 4:])                          # (B, H, 2)
        return rot, shifts

    def choose_poses(self, spectra: torch.Tensor, ctf: torch.Tensor, table: torch.Tensor) -> Tuple[torch.Tensor,
                     torch.Tensor, torch.Tensor, torch.Tensor]:
        """Best pose per particle against V₀ among the heads (both hands) and the search grid.

        Candidates: the heads' poses in both hands (with their shifts); the grid (``grid_step_deg`` sphere ×
        in-plane sampling, × 3×3 shifts of −1, 0, +1 px), scored with two matmuls; and the grid winner
        turned by ±``grid_step_deg``/3 about each projection-frame axis. Returns rotations (B, 3, 3),
        hand (B,) ±1, shifts (B, 2) px and the per-particle distillation loss (B,): the chordal distance
        ``‖R_head − R_search‖²`` (closer hand) of the best head to the searched pose plus its squared
        shift error in units of ``max_shift_px``, where the search won; 0 elsewhere.
        """
        rot, shifts = self.predict_poses(spectra)
        b, h = rot.shape[:2]
        weight = self.pixel_weight / self.select(self.noise_var)
        with torch.no_grad():
            t0 = table[:, :1]
            flat = rot.detach().reshape(b * h, 3, 3).repeat(2, 1, 1)
            hand = torch.cat([torch.ones(b * h), -torch.ones(b * h)]).to(rot)
            s0 = self.slices(flat, t0, hand)[:, 0].reshape(2, b, h, -1)              # (2, B, H, K)
            centred = spectra[:, None] * self._shift_phase(shifts.detach())             # (B, H, K)
            err = ((centred[None] - s0 * ctf[None, :, None]).abs() ** 2 * weight).sum(-1)   # (2, B, H)
            head_err, best = err.permute(1, 0, 2).reshape(b, 2 * h).min(1)
            hand_idx, head = best // h, best % h
            # exhaustive search over the fixed grid × 3×3 shifts (±1 px): |X − C·P_g|² as two matmuls
            grid = self.slices(self.pose_grid, t0)[:, 0]                                  # (G, K)
            power = torch.matmul(weight * ctf * ctf, (grid.abs() ** 2).T)                   # (B, G)
            x2 = (weight * spectra.abs() ** 2).sum(1, keepdim=True)
            steps = self.grid_shifts.to(spectra.device)                                     # (S, 2)
            shifted = spectra[:, None] * self._shift_phase(steps)[None]                      # (B, S, K)
            cross = torch.matmul(weight * shifted * ctf[:, None], grid.conj().T).real      # (B, S, G)
            grid_err, flat_idx = (x2[:, None] - 2 * cross + power[:, None]).reshape(b, -1).min(1)
            s_idx, g = flat_idx // grid.shape[0], flat_idx % grid.shape[0]
            # local refinement of the grid winner: small rotations about the projection-frame axes
            local = torch.matmul(self.local_rotations[None], self.pose_grid[g][:, None])     # (B, R, 3, 3)
            r = local.shape[1]
            ls = self.slices(local.reshape(b * r, 3, 3), t0)[:, 0].reshape(b, r, -1)
            lc = spectra * self._shift_phase(steps[s_idx])
            local_err = ((lc[:, None] - ls * ctf[:, None]).abs() ** 2 * weight).sum(-1)       # (B, R)
            local_err, li = local_err.min(1)
            use_grid = local_err < head_err
            target = local[torch.arange(b), li]
            grid_shift = steps[s_idx]
        idx = torch.arange(b, device=rot.device)
        best_rot = rot[idx, head]
        mirror = torch.diag(torch.tensor([1.0, 1.0, -1.0], device=rot.device))
        dist = torch.minimum(((best_rot - target) ** 2).sum((1, 2)),
                             ((mirror @ best_rot @ mirror - target) ** 2).sum((1, 2)))
        dist = dist + ((shifts[idx, head] - grid_shift) ** 2).sum(1) / self.max_shift_px ** 2
        chosen = torch.where(use_grid[:, None, None], target, best_rot)
        hand_out = torch.where(use_grid, 1.0, 1.0 - 2.0 * hand_idx.to(rot.dtype))
        shift_out = torch.where(use_grid[:, None], grid_shift, shifts[idx, head])
        return chosen, hand_out, shift_out, dist * use_grid

    def _shift_phase(self, shifts):
        """Phase ramps (..., K) that centre a particle whose origin is ``shifts`` (..., 2) px."""
        k = self.freqs[:, :2]
        return torch.polar(torch.ones((), device=shifts.device),
                           -2.0 * torch.pi * torch.einsum("kc,...c->...k", k, shifts))

    def decode_slice(self, z: torch.Tensor, slices: torch.Tensor) -> torch.Tensor:
        """Predicted spectra (B, K) (before CTF) for latents z (B, L) and :meth:`slices` output."""
        c = self.coefficients(z)
        return slices[:, 0] + torch.einsum("bm,bmk->bk", c.to(slices.dtype), slices[:, 1:])

    def volume(self, z: torch.Tensor) -> torch.Tensor:
        """Real-space volumes (K, D, D, D) for latents z (K, L) (dataset intensity scale): V₀ + w ⊙ Σₘ cₘ(z) Bₘ,
        with w the :attr:`variation_weight` set after training (:func:`deepcryo.landscape.shrinkage`), so that
        the basis' noise stays out of the volume where the particles do not vary."""
        with torch.no_grad():
            c = self.coefficients(torch.as_tensor(z, dtype=torch.float32, device=self.volumes.device))
            variation = torch.einsum("km,mzyx->kzyx", c, self.volumes[1:]) * self.variation_weight
            vols = (self.volumes[0] + variation) * self.mask3d
            return symmetrize_volumes(vols, self.sym_ops) if len(self.sym_ops) > 1 else vols

    # ----------------------------------------------------------------------------------------- encoder
    def encode(self, spectra: torch.Tensor, ctf: torch.Tensor, slices: torch.Tensor) -> Tuple[torch.Tensor,
               torch.Tensor]:
        """Latent mean and log-variance (B, L) from selected spectra and CTFs (B, K) and :meth:`slices`."""
        weighted = slices * ctf[:, None]
        residual = spectra - weighted[:, 0]
        inv_var = self.pixel_weight / self.select(self.noise_var)
        f = torch.einsum("bmk,bk->bm", weighted[:, 1:].conj() * inv_var, residual).real
        g = torch.einsum("bmk,k->bm", weighted[:, 1:].abs() ** 2, inv_var).clamp(min=1e-12)
        out = self.encoder(torch.cat([f / g.sqrt(), torch.log(g)], 1))
        return out[:, :self.latent_dim], out[:, self.latent_dim:].clamp(-10.0, 5.0)

    # ------------------------------------------------------------------------------------------- loss
    def _posed(self, spectra, rotations, ctf, table, table_grad=None):
        """Selected spectra (centred by the predicted shift in pose-free mode), slices and pose outputs."""
        spectra, ctf = self.select(spectra), self.select(ctf)
        hand = shifts = distill = None
        if self.pose_free:
            rotations, hand, shifts, distill = self.choose_poses(spectra, ctf, table)
            spectra = spectra * self._shift_phase(shifts)
        return (spectra, ctf, self._symmetric_slices(rotations, table, hand, table_grad),
                (rotations, hand, shifts, distill))

    def _symmetric_slices(self, rotations, table, hand, table_grad=None):
        """:meth:`slices` of the group-averaged volumes: the mean of the slices at the copies ``A Sᵀ``."""
        g = len(self.sym_ops)
        if g == 1:
            return self.slices(rotations, table, hand, table_grad)
        copies = (rotations[:, None] @ self.sym_ops.transpose(1, 2)[None]).reshape(-1, 3, 3)
        sl = self.slices(copies, table, table_grad=table_grad)
        return sl.reshape((len(rotations), g) + sl.shape[1:]).mean(1)

    def forward(self, spectra: torch.Tensor, rotations: Optional[torch.Tensor], ctf: torch.Tensor,
                beta: float = 1.0, table: Optional[torch.Tensor] = None, table_grad: Optional[torch.Tensor] = None
                ) -> Dict[str, torch.Tensor]:
        """Per-batch mean loss terms ``{"loss", "nll", "kl"}`` for spectra and CTFs (B, D, D), poses (B, 3, 3).

        In pose-free mode ``rotations`` is ignored (and may be None). Without ``table`` the decoder's table is
        computed here (:meth:`basis_ft`) and the loss's gradient reaches the volumes through it. With a
        ``table`` (:meth:`basis_ft` output, used detached) and its accumulator ``table_grad`` (same rows, 2C
        real columns), the backward pass adds ``∂loss/∂table`` into ``table_grad`` and the volumes get no
        gradient: the caller carries it to them (:func:`deepcryo.landscape.train.train_epoch`).
        """
        if table is None:
            table = self.basis_ft(self.workspace)
        elif table_grad is not None:
            table = table.detach().requires_grad_()  # so that autograd runs the slices' backward into table_grad
        spectra, ctf, sl, (_, _, _, distill) = self._posed(spectra, rotations, ctf, table, table_grad)
        mu, logvar = self.encode(spectra, ctf, sl)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        pred = self.decode_slice(z, sl) * ctf
        weight = 0.5 * self.pixel_weight / self.select(self.noise_var)
        nll = ((spectra - pred).abs() ** 2 * weight).sum(1)
        kl = 0.5 * (mu * mu + logvar.exp() - 1.0 - logvar).sum(1)
        loss = nll + beta * kl
        if distill is not None:
            loss = loss + self.distill_weight * distill
        return {"loss": loss.mean(), "nll": nll.mean(), "kl": kl.mean()}

    def posterior(self, spectra: torch.Tensor, rotations: Optional[torch.Tensor], ctf: torch.Tensor,
                  table: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The encoder's Gaussian q(z|X) without gradients: mean (B, L), standard deviation σ (B, L) (latent
        units; the prior is N(0, I), so σ near 1 means the image says little about that coordinate), and the
        poses used: (B, 3, 3) matrices A (mirror hand applied) and shifts (B, 2) px of the
        working box (the given poses and None in the main mode, the predicted ones when pose-free).
        ``table``: :meth:`basis_ft` of the current volumes, computed once for a pass over many batches."""
        with torch.no_grad():
            spectra, ctf, sl, (rot, hand, shifts, _) = self._posed(spectra, rotations, ctf, table)
            mu, logvar = self.encode(spectra, ctf, sl)
            if hand is not None:
                mirror = torch.diag(torch.tensor([1.0, 1.0, -1.0], device=rot.device))
                rot = torch.where(hand[:, None, None] < 0, mirror @ rot @ mirror, rot)
            return mu, torch.exp(0.5 * logvar), rot, shifts
