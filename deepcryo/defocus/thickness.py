"""Specimen (ice) thickness from the nodes of the Thon rings (CTFFIND5: Elferich, Kong, Zottig, Grigorieff 2024,
eLife 13:RP97227; model of Tichelaar et al. 2020 and McMullan et al. 2015).

A slab of thickness t holds scatterers at every defocus from Δf − t/2 to Δf + t/2. Their images add
incoherently in the PSD, so the PSD carries CTF² averaged over the slab:

    ``⟨sin²(γ + π λ s² z)⟩_z = ½ [1 − sinc(ξ) cos 2γ]``,  ``ξ = π λ s² t``,  ``sinc(ξ) = sin ξ / ξ``

(γ the CTF phase of :mod:`deepcryo.core.ctf` at the slab's centre, s in 1/Å, λ in Å). The rings fade where
sinc(ξ) = 0, at the "thickness nodes" ``s_n² = n / (λ t)``, and come back inverted (sinc < 0) beyond the first
node: the node frequencies measure t.

:func:`fit_thickness`, after the defocus fit: the band correlation of the PSD with this model (the same score
as :mod:`deepcryo.defocus.fit`, which is the t = 0 case) on a 1D grid of t, held defocus, astigmatism and phase;
then a finer grid around the best; the thickness is kept only where it pays for its parameter by the BIC
against t = 0 (as :func:`deepcryo.defocus.fit.select_astigmatism`) and the rings of its first inverted lobe are
seen inverted, otherwise it is reported as 0 ("no node seen").

Degeneracy at small t: for ξ ≪ 1 at every frequency of the band, ``sinc(ξ) ≈ 1 − ξ²/6`` only lowers the ring
contrast smoothly with s⁴ t², which the PSD's per-shell normalisation (:mod:`deepcryo.defocus.psd`) and, in a
raw PSD, the envelope (B-factor) absorb. The thickness is measured through its first node only, so a slab
whose first node lies beyond the band's high-resolution end, ``t < 1 / (λ s_max²)``, cannot be told from t = 0
and is reported as 0 (with a margin, :data:`NODE_MARGIN`: :func:`min_thickness_A`, e.g. 780 Å at 300 kV and
3.5 Å). The band therefore reaches as far as the PSD shows rings (:func:`thickness_band_end_A`). Beyond that
limit too, the sinc's main lobe is only a fade, which rings sinking into the noise (B-factor, a specimen spectrum
falling with s) imitate: a thin specimen with B = 250 Å² read 950 Å. Only the inverted rings beyond the first
node tell a slab, so a thickness is kept only where they are seen (3 standard errors); how thin a slab can be
measured then depends on the rings' strength beyond its first node (on a simulated 2048² micrograph at 1.5 Å/px:
800 Å not seen, its inverted lobe at 1.7 standard errors; 1000 Å and more seen).

Thick specimens: the defocus fit (CTF², t = 0) must end before the first node, ``1/s₁ = sqrt(λ t)`` (6.3 Å for
2000 Å at 300 kV): beyond it the rings are inverted, the thin model fits them with the wrong sign and the mean
defocus moves (by ~350 Å for 2000 Å and a 5 Å band), and so do the tiles' defoci of the tilt fit (false tilts of
7°). CTFFIND5 limits its first fit to the resolution where the thin fit holds. Here the user's band
(``--high-resolution``, default 5 Å) holds to ~1000 Å at 300 kV; beyond, once a node is seen, the defocus and
the tilt are fitted again with the band ended at :func:`defocus_band_end_A` (``deepcryo.defocus.predict``), and
the thickness measured again from that defocus. A tilted specimen's height range over the micrograph averages the PSD over defocus too and
would read as thickness: with its tilt known, the model is averaged over that spread (``defocus_spread``).

Validation (benchmarks/RESULTS.md, "Specimen tilt and ice thickness"): no thin specimen read as thick on either
simulator (tilted ones included); 1170-1694 Å slabs within 7 % on deepcryo's own simulator (whose slab is this
model); on the independent full-wave, multislice simulator no node is seen (0), its rings beyond 4-5 Å being
too weak for the inverted-lobe test.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from ..core import ctf as ctf_mod
from . import fit as fit_mod

__all__ = ["slab_ctf2", "min_thickness_A", "fit_thickness", "thickness_band_end_A", "tilt_defocus_spread",
           "defocus_band_end_A", "NODE_MARGIN", "ENVELOPE_ENDS", "THIN_FIT_XI"]

#: ring envelopes of the models of :func:`fit_thickness`: exponential in s² across the band, down to these
#: fractions at its high-resolution end (1: no fading)
ENVELOPE_ENDS = (1.0, 0.5, 0.25, 0.1, 0.03, 0.01)
#: a thickness counts only when the band's end is beyond its first node by this factor in s² (ξ_max ≥ 1.25 π): a
#: quarter of the first inverted lobe must be inside the band, a node at its very edge being indistinguishable
#: from the rings' fading
NODE_MARGIN = 1.25
#: the thin (t = 0) defocus fit of a slab holds up to ``λ s² t`` = this (ξ = 0.75 π, the rings still at
#: sinc = 0.30 of their contrast, on the near side of the first node, ξ = π): the slab's fading is symmetric
#: about its centre and does not move the fitted defocus, the inverted rings beyond the node do
THIN_FIT_XI = 0.75


def slab_ctf2(cos_2gamma: torch.Tensor, s2_invA2: torch.Tensor, wavelength_A: torch.Tensor,
              thickness_A: torch.Tensor, envelope: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
    """CTF² averaged over a slab: ``½[1 − E · sinc(π λ s² t) cos 2γ]`` (broadcast), given ``cos 2γ`` (γ the CTF
    phase at the slab's centre; linear in it, so an average of cos 2γ over defocus offsets gives the average of the
    model), s² in 1/Å², λ and t in Å (``torch.sinc(x) = sin(πx)/(πx)``, hence its argument ``λ s² t``); ``E`` the
    rings' envelope (1: the plain CTF² average)."""
    return 0.5 * (1.0 - envelope * torch.sinc(wavelength_A * s2_invA2 * thickness_A) * cos_2gamma)


def min_thickness_A(voltage_kV: float, high_A: float) -> float:
    """Smallest thickness (Å) that :func:`fit_thickness` reports with a band ending at ``high_A`` Å: its first
    node ``s₁² = 1/(λ t)`` lies inside the band by :data:`NODE_MARGIN` (``t ≥ NODE_MARGIN · high_A² / λ``)."""
    return float(NODE_MARGIN * high_A ** 2 / ctf_mod.wavelength_A(voltage_kV))


def defocus_band_end_A(voltage_kV: float, thickness_A: float) -> float:
    """High-resolution end (Å) of the band where the thin defocus fit of a slab of ``thickness_A`` Å holds:
    ``sqrt(λ t / THIN_FIT_XI)`` (:data:`THIN_FIT_XI`; 1.15 × the first node's ``sqrt(λ t)``: 7.3 Å for 2000 Å at
    300 kV). 0 for t = 0 (no limit)."""
    return math.sqrt(float(ctf_mod.wavelength_A(voltage_kV)) * thickness_A / THIN_FIT_XI)


def thickness_band_end_A(pixel_size_A: float, defocus_max_A: float, voltage_kV: float, psd_size_px: int) -> float:
    """High-resolution end (Å) of the thickness fit's band on a ``psd_size_px`` PSD at the micrograph's pixel size:
    as far as the rings go in the PSD, i.e. the finer of 2.2 px (below Nyquist, where the PSD's resampling is
    smooth) and where a Thon ring of the largest defocus (Å) spans 3 PSD pixels, ``Δs = 1 / (2 s λ Δf)``."""
    lam = float(ctf_mod.wavelength_A(voltage_kV))
    s_rings = psd_size_px * pixel_size_A / (6.0 * lam * max(defocus_max_A, 1.0))
    return max(2.2 * pixel_size_A, 1.0 / s_rings)


def tilt_defocus_spread(gradient: Tuple[float, float], width_A: float, height_A: float,
                        bins: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """Defocus offsets (Å) and weights (each (1, bins)) of a plane of ``gradient`` (g_x, g_y) (Å/Å,
    :mod:`deepcryo.defocus.tilt`) over a ``width_A`` × ``height_A`` micrograph, relative to its mean: the
    histogram of the height over the area (a 64 × 64 grid of positions), for :func:`fit_thickness`."""
    x = (torch.arange(64, dtype=torch.float64) + 0.5) / 64 - 0.5
    h = (gradient[0] * width_A * x[None, :] + gradient[1] * height_A * x[:, None]).reshape(-1)
    lo, hi = float(h.min()), float(h.max())
    if hi - lo < 1e-6:
        return torch.zeros(1, 1), torch.ones(1, 1)
    k = ((h - lo) / (hi - lo) * bins).long().clamp(max=bins - 1)
    weights = torch.bincount(k, minlength=bins).double() / h.numel()
    offsets = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * (hi - lo) / bins
    return offsets[None].float(), weights[None].float()


def _inverted_beyond_node(data, cos_2gamma, s2, lam, t, n_eff, sigmas=3.0, min_pixels=50):
    """(B,) bool: in the first inverted lobe of the slab (``π ≤ π λ s² t ≤ 2π``, inside the band), the PSD
    (``data``, (B, M) band pixels) correlates with the lobe's inverted rings ``−sinc(ξ) cos 2γ`` (``cos_2gamma``
    (B, M); a matched filter, weighted by |sinc|) by more than ``sigmas`` standard errors
    of a noise correlation (1/√n, n the lobe's share of the ``n_eff`` independent band pixels). The slab model
    also fits rings that merely fade into the noise (its main lobe is one more envelope shape); only rings that
    come back inverted are the mark of a node."""
    xi = lam[:, None] * s2[None, :] * t[:, None]  # ξ/π (B, M)
    lobe = ((xi >= 1.0) & (xi <= 2.0)).to(data.dtype)
    count = lobe.sum(dim=1)
    inverted = -torch.sinc(xi) * cos_2gamma
    d = data - (data * lobe).sum(1, keepdim=True) / count.clamp(min=1)[:, None]
    m = inverted - (inverted * lobe).sum(1, keepdim=True) / count.clamp(min=1)[:, None]
    rho = (d * m * lobe).sum(1) / ((d * d * lobe).sum(1) * (m * m * lobe).sum(1)).sqrt().clamp(min=1e-30)
    n_lobe = n_eff * count / s2.numel()
    return (count >= min_pixels) & (rho > sigmas / n_lobe.clamp(min=1.0).sqrt())


def fit_thickness(psd: torch.Tensor, sampling_A: float, result: fit_mod.FitResult, acq, low_A: float = 30.0,
                  high_A: float = 5.0, thickness_range_A: Tuple[float, float] = (0.0, 4000.0),
                  step_A: float = 20.0, z_half_A: float = 500.0, z_step_A: float = 10.0,
                  defocus_spread: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, chunk: int = 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """Slab thickness (Å) of B micrographs from their fit PSDs (module docstring).

    Args:
        psd: (B, S, S) PSDs of :func:`~deepcryo.defocus.psd.compute_psd` at ``sampling_A`` Å/px.
        result: their defocus fit (:class:`~deepcryo.defocus.fit.FitResult`), held.
        acq: (voltage kV, Cs mm, amplitude contrast), (B,) tensors.
        low_A, high_A: band (Å); only nodes inside it count.
        thickness_range_A, step_A: the grid (Å); then steps of ``step_A / 10`` within ± ``step_A`` of the best.
        z_half_A, z_step_A: after the grid, the mean defocus is scanned again (Å) with the slab model at the best
            t (astigmatism and phase held), then t on the fine grid (CTFFIND5 refines both together).
        defocus_spread: ``(offsets_A (B, H), weights (B, H))``: the PSD averages the slab model over these defocus
            offsets (Å, relative to the fitted mean defocus; weights summing to 1) — a tilted specimen's height
            over the micrograph (:func:`tilt_defocus_spread`), which would otherwise read as thickness.
        chunk: thickness values scored at once (memory: B × chunk × band pixels).
    Returns:
        ``(thickness_A, figure_of_merit)``, (B,) each: the thickness (0 where t = 0 is kept) and the band
        correlation of the PSD with the slab model at that thickness.

    Score: the band correlation (Pearson) of the PSD with the model, as for the defocus (t = 0 is
    :mod:`deepcryo.defocus.fit`'s score), CTFFIND5's choice. |sinc| fades the rings as any envelope does (B-factor,
    drift, noise), so on thin ice the score also rises for a t whose first node lies just beyond the band, where
    the rings of the PSD have faded anyway: such a t is not kept (:data:`NODE_MARGIN`). Inside the band too the
    rings fade into the noise (B-factor, a specimen spectrum falling with s), which a plain correlation would
    read as a node (a thin specimen with B = 250 Å² read 1300 Å): every model, thin or slab, takes the best of
    the smooth envelopes :data:`ENVELOPE_ENDS`; and as the slab's main lobe is still one more envelope shape, the
    thickness is kept only where the rings in its first inverted lobe are seen inverted (3 standard errors). (A free ring scale per
    shell of s², which would ignore the fading, was tried: it lets a large t with many nodes fit noise through
    the signs of near-zero model rings, and failed on tilted micrographs.)
    """
    dev = psd.device
    band = fit_mod.BandPixels(psd.shape[-1], sampling_A, low_A, high_A, dev)
    lam = ctf_mod.wavelength_A(acq[0])[:, None, None]  # (B, 1, 1)
    s2 = band.s2
    with torch.no_grad():
        data = fit_mod._prep(band.take(psd))
        if defocus_spread is None:
            offsets, weights = torch.zeros(psd.shape[0], 1, device=dev), torch.ones(psd.shape[0], 1, device=dev)
        else:
            offsets, weights = (torch.as_tensor(v, dtype=psd.dtype, device=dev) for v in defocus_spread)
        weights = weights[:, :, None, None]  # (B, H, 1, 1)

        def cos_2gamma_at(z):  # (B, 1, M): cos 2γ averaged over the defocus offsets (the model is linear in it)
            zs = (z[:, None] + offsets).reshape(-1)
            rep = offsets.shape[1]
            gam = fit_mod._gamma(band, zs, result._ax.repeat_interleave(rep), result._ay.repeat_interleave(rep),
                                 result._phase.repeat_interleave(rep), *(a.repeat_interleave(rep) for a in acq))
            return (weights * torch.cos(2.0 * gam.reshape(z.shape[0], rep, 1, -1))).sum(dim=1)

        c2 = cos_2gamma_at(result._z)
        # ring envelopes e^((s² − s²_min) / (s²_max − s²_min)), e = the rings' amplitude at the band's end
        x = (s2 - s2.min()) / (s2.max() - s2.min()).clamp(min=1e-30)
        envelopes = [torch.pow(torch.tensor(e, device=dev), x) for e in ENVELOPE_ENDS]

        def scores(c2, ts):  # ts (B, K) -> band correlations (B, K), the best envelope for each
            return torch.stack([torch.cat([fit_mod._corr(data, slab_ctf2(c2, s2, lam, ts[:, i:i + chunk, None], env))
                                           for i in range(0, ts.shape[1], chunk)], dim=1)
                                for env in envelopes]).max(dim=0).values

        b = psd.shape[0]
        grid = torch.arange(thickness_range_A[0], thickness_range_A[1] + 1e-3, step_A, device=dev)
        t = fit_mod._best(scores(c2, grid[None].expand(b, -1)), grid[None].expand(b, -1))[0]
        # the defocus again, with the slab model (rings beyond a node inside the fit band pulled the thin fit)
        dz = torch.linspace(-z_half_A, z_half_A, 2 * int(z_half_A / z_step_A) + 1, device=dev)
        z_scores = torch.stack([scores(cos_2gamma_at(result._z + d), t[:, None])[:, 0] for d in dz.tolist()], dim=1)
        z = result._z + dz[z_scores.argmax(dim=1)]
        c2 = cos_2gamma_at(z)
        fine = (t[:, None] + torch.linspace(-step_A, step_A, 21, device=dev)[None]).clamp(min=0.0)
        fine_scores = scores(c2, fine)
        t = fit_mod._best(fine_scores, fine)[0]
        fom = fine_scores.max(dim=1).values
        fom_0 = scores(c2, torch.zeros(b, 1, device=dev))[:, 0]  # the thin model, with the best envelope
    _, n_eff, _ = fit_mod.parameter_covariance(psd, band, z, result._ax, result._ay, result._phase, acq)
    gain = n_eff * torch.log((1 - fom_0 ** 2).clamp(min=1e-12) / (1 - fom ** 2).clamp(min=1e-12))
    # a node at the band's edge is no evidence: the band must reach into the inverted rings beyond it
    inside = t * s2.max() * ctf_mod.wavelength_A(acq[0]) >= NODE_MARGIN
    keep = (gain > torch.log(n_eff)) & inside & _inverted_beyond_node(data, c2[:, 0], s2, lam[:, 0, 0], t, n_eff)
    return torch.where(keep, t, torch.zeros_like(t)), torch.where(keep, fom, fom_0)
