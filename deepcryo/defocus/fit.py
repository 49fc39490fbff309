"""Batched physics fit of the 2D CTF to background-subtracted PSDs (torch).

Score: the normalised (Pearson) correlation, over the pixels of a resolution band (half plane), between a
PSD from :func:`deepcryo.defocus.psd.compute_psd` and the model ``CTF²`` (``sin²γ``; ``|CTF|`` is not
used: the PSD is a power). γ follows :mod:`deepcryo.core.ctf`:
``γ = π λ Δf(φ) s² − (π/2) Cs λ³ s⁴ + atan(w/√(1−w²)) + phase shift``, with
``Δf(φ) = z + a·cos(2(φ − θ))``, z the mean defocus (Å), ``a = (U − V)/2`` (Å), θ the angle (degrees from
the x axis to U). The optimiser works on ``(z, a cos 2θ, a sin 2θ)``, smooth at zero astigmatism.

* :func:`refine_ctf` — local fit from a start (the CNN's guess): a 1D scan of the mean defocus around the start
  (± max(5000 Å, 25 % of the start), low-resolution band), then Adam on (z, a cos 2θ, a sin 2θ [, phase]) over a
  low then the full band.
* :func:`exhaustive_search` — CTFFIND-style baseline without any start: a 2D grid of mean defocus ×
  astigmatism × angle over the low-resolution band, then the same local refinement.
* :func:`fit_resolution` — CTFFIND-style: the PSD is averaged over equal-phase bins of the fitted CTF
  (astigmatism removed), and the resolution (Å) is where the correlation between this 1D average and the
  fitted CTF², in a window 3 Thon-ring periods wide moving outwards, first drops below 0.5.
* :func:`parameter_covariance` / :func:`select_astigmatism` — the fit's standard errors (Gauss-Newton; σ of the
  mean defocus also carries the given amplitude contrast's uncertainty, :data:`AMPLITUDE_PHASE_SIGMA_DEG`) and
  the choice, by BIC, between a round and an astigmatic CTF (noise alone would inflate U − V on weak rings).
* :func:`fit_mean_defocus` — the mean defocus alone, astigmatism and phase held (local PSDs of a tilted specimen,
  :mod:`deepcryo.defocus.tilt`).
* :func:`rotational_average` — CTFFIND's ``_avrot.txt`` rows (rotational average, EPA, fitted CTF², correlation).
* :func:`disagreement_flag` — low confidence: CNN and fit disagree, or a low figure of merit.
"""
from __future__ import annotations

import math
from typing import Tuple, Union

import torch

from ..core import ctf as ctf_mod
from ..core import fourier
from ..core.bands import band_indices

__all__ = ["BandPixels", "refine_ctf", "exhaustive_search", "fit_resolution", "score_params", "FitResult",
           "disagreement_flag", "score_only", "parameter_covariance", "select_astigmatism", "rotational_average",
           "fit_mean_defocus"]

SEARCH_LOW_BAND_A = 8.0  # high-resolution limit (Å) of the robust search stages
#: Uncertainty (1σ, degrees) of the CTF's fixed phase (``atan(w/√(1−w²))`` of the given amplitude contrast w,
#: plus a given phase shift) that σ of the mean defocus includes when the phase is not fitted. The effective
#: amplitude contrast of a specimen is not the nominal one: full wave propagation through a particle field of
#: 0.05 rad RMS phase (non-linear, non-Gaussian scattering: its second-order term transfers with cos γ, not
#: sin γ) shifts the Thon rings as an extra phase of a few degrees would, and a fit that holds w = 0.07 turns
#: this into a mean-defocus bias of +0.1 to +0.4 % that its statistical σ cannot cover (benchmarks/RESULTS.md,
#: "Defocus bias and σ calibration (issue 19)"; benchmarks/defocus_bias.py). Fitting the phase instead is no
#: cure: on weak linear rings the phase and the defocus trade off (−0.3 %). 2° is w = 0.07 ± 0.035, chosen on
#: seed 7 of benchmarks/defocus.py and checked on seed 11. Where the given w is exact, σ is conservative.
AMPLITUDE_PHASE_SIGMA_DEG = 2.0


class BandPixels:
    """Half-plane pixels (:mod:`deepcryo.core.bands`) of a centred ``size_px`` PSD at ``sampling_A`` Å/px
    between ``low_A`` and ``high_A``.

    Holds ``size_px``, ``index`` (flat pixel indices), ``s2`` (1/Å²), ``cos2`` and ``sin2`` (of twice the
    azimuth).
    """

    def __init__(self, size_px, sampling_A, low_A, high_A, device=None):
        self.size_px = size_px
        grid = fourier.freq_grid_2d(size_px, device=device).reshape(-1, 2) / sampling_A
        s = grid.norm(dim=1)
        self.index = band_indices(grid, s, 1.0 / low_A, 1.0 / high_A)
        g = grid[self.index]
        phi = torch.atan2(g[:, 1], g[:, 0])
        self.s2 = (g * g).sum(dim=1)
        self.s4 = self.s2 * self.s2
        self.s = self.s2.sqrt()
        self.cos2, self.sin2 = torch.cos(2 * phi), torch.sin(2 * phi)
        # γ = (πλz, πλa_x, πλa_y, −c₄, c₀) · basis: one small matrix product per set of parameters
        self.gamma_basis = torch.stack([self.s2, self.s2 * self.cos2, self.s2 * self.sin2, self.s4,
                                        torch.ones_like(self.s2)])

    def take(self, psd):
        """(B, M) values of (B, size, size) PSDs at the band pixels."""
        return psd.reshape(psd.shape[0], -1)[:, self.index]


def _gamma(band, z, ax, ay, phase_rad, voltage_kV, cs_mm, amplitude_contrast):
    """Phase γ (..., M) for parameter tensors of shape (...,) broadcast over the band pixels."""
    lam = ctf_mod.wavelength_A(voltage_kV)
    w = amplitude_contrast
    c4 = (0.5 * math.pi * 1e7) * cs_mm * lam * lam * lam
    c0 = torch.atan(w / torch.sqrt(1 - w * w)) + phase_rad
    k = math.pi * lam
    coef = torch.stack(torch.broadcast_tensors(k * z, k * ax, k * ay, -c4, c0), dim=-1)
    return coef @ band.gamma_basis


def _gamma_jacobian(band, voltage_kV, fit_astigmatism=True, fit_phase=False):
    """dγ/d(z[, ax, ay][, phase]) (B, M, P) (1/Å, 1/rad) at the band pixels, for (B,) voltages (kV). γ is
    linear in these parameters, so this does not depend on them."""
    kz = (math.pi * ctf_mod.wavelength_A(voltage_kV))[:, None] * band.s2  # dγ/dz
    cols = [kz]
    if fit_astigmatism:
        cols += [kz * band.cos2, kz * band.sin2]
    if fit_phase:
        cols.append(torch.ones_like(kz))
    return torch.stack(cols, dim=-1)


def _corr(data, model):
    """Pearson correlation over the last axis; ``data`` (B, M) centred & unit-norm, ``model`` (B, ..., M).
    ``Σ data·(model − mean) = Σ data·model`` (data centred), and ``‖model − mean‖² = Σ model² − (Σ model)²/M``:
    three passes over ``model``, no centred copy."""
    dot = torch.bmm(model.reshape(model.shape[0], -1, model.shape[-1]), data[..., None]).reshape(model.shape[:-1])
    var = torch.linalg.vector_norm(model, dim=-1) ** 2 - model.sum(-1) ** 2 / model.shape[-1]
    return dot / var.clamp(min=0).sqrt().clamp(min=1e-12)


def _prep(data):
    d = data - data.mean(dim=-1, keepdim=True)
    return d / d.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _acq(values, b, device):
    return torch.as_tensor(values, dtype=torch.float32, device=device).reshape(-1).expand(b).clone()


def score_params(psd: torch.Tensor, sampling_A: float, band, z: torch.Tensor, ax: torch.Tensor, ay: torch.Tensor,
                 phase_rad: torch.Tensor, voltage_kV: torch.Tensor, cs_mm: torch.Tensor,
                 amplitude_contrast: torch.Tensor) -> torch.Tensor:
    """Correlation (B, K) of PSDs (B, S, S) with CTF² for K candidate parameter sets (B, K) each."""
    data = _prep(band.take(psd))
    acq = [v[:, None].expand_as(z) for v in (voltage_kV, cs_mm, amplitude_contrast)]
    return _corr(data, torch.sin(_gamma(band, z, ax, ay, phase_rad, *acq)) ** 2)


def _residual_correlation(resid, band, max_lag_px):
    """Sum of the residual's normalised autocorrelation over lags |dx|, |dy| <= ``max_lag_px`` (B,), >= 1:
    neighbouring PSD pixels are not independent (Hann taper, Welch overlap, resampling), and a sum of
    correlated pixels has this factor more variance than the pixel count says. Each lag's autocorrelation is
    the (circular) sum of products of the residual with its shifted copy, divided by the number of band
    pixel pairs at that lag; all lags at once from one FFT of the residual and one of the band's mask."""
    b, size_px = resid.shape[0], band.size_px
    img = torch.zeros(b + 1, size_px * size_px, device=resid.device, dtype=torch.float64)
    img[:b, band.index] = resid.to(torch.float64)
    img[b, band.index] = 1.0  # the band's mask: pixel pairs per lag
    spec = torch.fft.rfft2(img.reshape(b + 1, size_px, size_px))
    lags = torch.arange(-max_lag_px, max_lag_px + 1, device=resid.device) % size_px
    auto = torch.fft.irfft2(spec.real ** 2 + spec.imag ** 2, s=(size_px, size_px))[:, lags][:, :, lags]
    counts = auto[b].round()
    per_lag = torch.where(counts > 0, auto[:b] / counts.clamp(min=1), torch.zeros_like(auto[:b]))
    var0 = per_lag[:, max_lag_px, max_lag_px]
    return (per_lag.sum(dim=(1, 2)) / var0.clamp(min=1e-30)).clamp(min=1.0).to(resid.dtype)


def _score_outer(scores, band, max_lag_px):
    """Σ over pixel pairs closer than ``max_lag_px`` (in x and y, circularly) of ``g(x) g(x')ᵀ`` for per-pixel
    score vectors ``g`` (B, M, P): the variance of the summed scores when neighbouring pixels are correlated and
    the noise is not the same everywhere (heteroscedasticity- and autocorrelation-consistent, "sandwich").
    The pairs' sum is ``Σ_x g(x) G(x)ᵀ`` with ``G`` the box sum of ``g`` over the neighbourhood (separable)."""
    b, _, p = scores.shape
    size_px = band.size_px
    img = torch.zeros(b, size_px * size_px, p, device=scores.device, dtype=scores.dtype)
    img[:, band.index] = scores
    img = img.reshape(b, size_px, size_px, p)
    for dim in (1, 2):
        img = sum(torch.roll(img, k, dim) for k in range(-max_lag_px, max_lag_px + 1))
    total = torch.einsum("bmi,bmj->bij", scores, img.reshape(b, -1, p)[:, band.index])
    return 0.5 * (total + total.transpose(1, 2))


def _mean_defocus_variance(cov: torch.Tensor, dz_dphase: torch.Tensor) -> torch.Tensor:
    """Variance (B,) (Å²) of the mean defocus: the fit's statistical variance (``cov[:, 0, 0]`` of
    :func:`parameter_covariance`) plus the fixed phase's, ``(dz/dφ · σ_φ)²`` (σ_φ:
    :data:`AMPLITUDE_PHASE_SIGMA_DEG`; ``dz/dφ`` is 0 where the phase is fitted)."""
    return cov[:, 0, 0].clamp(min=0) + (dz_dphase * math.radians(AMPLITUDE_PHASE_SIGMA_DEG)) ** 2


def parameter_covariance(psd: torch.Tensor, band: BandPixels, z: torch.Tensor, ax: torch.Tensor, ay: torch.Tensor,
                         phase_rad: torch.Tensor, acq, fit_astigmatism: bool = True, fit_phase: bool = False,
                         max_lag_px: int = 3, shells: int = 16) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Covariance (B, P, P) of the fitted ``(z[, ax, ay][, phase])`` (Å², rad²) at the optimum, Gauss-Newton,
    the number of independent pixels (B,) (band pixels / residual autocorrelation), and ``dz/dφ`` (B,) (Å/rad):
    how far the fitted mean defocus moves per radian of error in the phase that is held fixed (amplitude
    contrast + phase shift; 0 where the phase is fitted), ``[(J_θᵀJ_θ)⁻¹ J_θᵀ J_φ]_z`` with the same projected
    Jacobian (:data:`AMPLITUDE_PHASE_SIGMA_DEG`).

    Maximising the band correlation is least squares of the PSD on ``α + β sin²γ``. The ring amplitude is
    not the same at every frequency (envelope, specimen): β(s) is estimated in ``shells`` shells of s² (equal
    numbers of Thon rings), so that pixels beyond the rings' reach carry no information. With ``J`` the
    Jacobian of ``β(s) sin²γ`` with respect to the parameters (the per-shell offsets and scales projected
    out) and ``r`` the residuals, the covariance is the sandwich ``(JᵀJ)⁻¹ (Σ r_i r_j J_i J_jᵀ) (JᵀJ)⁻¹`` over
    pixel pairs within ``max_lag_px`` (:func:`_score_outer`): the noise of a log-periodogram is neither the same
    everywhere (it follows the rings) nor independent between neighbours (Hann taper, resampling). This is the
    statistical error of the fit on this PSD; a wrong Thon-ring basin is not in it (:func:`disagreement_flag`),
    nor the error of the fixed phase (the callers add it through ``dz/dφ``).
    """
    with torch.no_grad():
        d = band.take(psd)
        d = d - d.mean(dim=-1, keepdim=True)
        gam = _gamma(band, z, ax, ay, phase_rad, *acq)
        m = torch.sin(gam) ** 2
        s2 = band.s2
        shell = ((s2 - s2.min()) / (s2.max() - s2.min()).clamp(min=1e-30) * shells).long().clamp(max=shells - 1)
        onehot = torch.nn.functional.one_hot(shell, shells).to(d.dtype)  # (M, shells)
        count = onehot.sum(0).clamp(min=1)
        mc = m - (m @ onehot / count) @ onehot.T  # centred within each shell
        dc = d - (d @ onehot / count) @ onehot.T
        mm = ((mc * mc) @ onehot).clamp(min=1e-12)
        beta = (dc * mc) @ onehot / mm  # (B, shells)
        resid = dc - (beta @ onehot.T) * mc
        correlation = _residual_correlation(resid, band, max_lag_px)
        # noise alone gives each shell's β a variance (σ²_shell / Σ mc²) and so information where there is none:
        # shrink β² by it (shells without rings then count for nothing)
        var_beta = (resid * resid) @ onehot / count / mm * correlation[:, None]
        beta = (beta.clamp(min=0) ** 2 - var_beta).clamp(min=0).sqrt()
        beta_px = beta @ onehot.T
        dg = beta_px * torch.sin(2 * gam)  # d(β sin²γ)/dγ
        jac = dg[..., None] * _gamma_jacobian(band, acq[0], fit_astigmatism, True)  # last column: the phase
        nuisance = torch.cat([onehot[None].expand(d.shape[0], -1, -1), mc[..., None] * onehot], dim=-1)
        # project the nuisance (per-shell offsets and scales) out of the Jacobian
        nt = nuisance.transpose(1, 2)
        coef = torch.linalg.lstsq(nt @ nuisance + 1e-9 * torch.eye(nuisance.shape[-1], device=d.device), nt @ jac).solution
        jac = jac - nuisance @ coef
        jac_phase = jac[..., -1:]
        if not fit_phase:
            jac = jac[..., :-1]
        jtj = jac.transpose(1, 2) @ jac
        bread = torch.linalg.inv(jtj)
        cov = bread @ _score_outer(jac * resid[..., None], band, max_lag_px) @ bread
        if fit_phase:
            dz_dphase = torch.zeros_like(z)
        else:
            dz_dphase = (bread @ (jac.transpose(1, 2) @ jac_phase))[:, 0, 0]  # the fit absorbs a phase error
    return cov, band.index.numel() / correlation, dz_dphase


class FitResult:
    """Fitted CTFs (tensors of shape (B,)): defocus_u_A, defocus_v_A (Å, U >= V), defocus_angle_deg
    ([0, 180)), phase_shift_deg, figure_of_merit (band correlation), resolution_A (see :func:`fit_resolution`),
    defocus_sigma_A (standard error of the mean defocus (U + V)/2, Å, see :func:`parameter_covariance`; NaN
    until :func:`_finish` fills it)."""

    def __init__(self, z: torch.Tensor, ax: torch.Tensor, ay: torch.Tensor, phase_rad: torch.Tensor,
                 fom: torch.Tensor) -> None:
        half = torch.sqrt(ax * ax + ay * ay)
        self.defocus_u_A = (z + half).detach()
        self.defocus_v_A = (z - half).detach()
        self.defocus_angle_deg = (torch.rad2deg(torch.atan2(ay, ax)) / 2.0 % 180.0).detach()
        self.phase_shift_deg = (torch.rad2deg(phase_rad) % 180.0).detach()
        self.figure_of_merit = fom.detach()
        self.resolution_A = torch.full_like(z, float("nan"))
        self.defocus_sigma_A = torch.full_like(z, float("nan"))
        self._z, self._ax, self._ay, self._phase = z.detach(), ax.detach(), ay.detach(), phase_rad.detach()


def _corr_gradient(data, gam, jac):
    """dρ/dθ (B, P) of the band correlation ρ of ``data`` (centred, unit norm) with ``m = sin²γ``, for
    dγ/dθ = ``jac`` (B, M, P): dρ/dm = (data − ρ m_c/‖m_c‖)/‖m_c‖ (m_c: m centred; the centring's own
    derivative vanishes against centred data), dm/dγ = sin 2γ."""
    mc = torch.sin(gam) ** 2
    mc = mc - mc.mean(dim=-1, keepdim=True)
    norm = mc.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    rho = (mc * data).sum(-1, keepdim=True) / norm
    dm = (data - rho * mc / norm) / norm * torch.sin(2 * gam)
    return torch.bmm(dm[:, None], jac)[:, 0]


def _local(psd, sampling_A, bands, z, ax, ay, phase, acq, fit_phase, iterations, fit_astigmatism=True):
    """Adam (β = 0.9, 0.999; restarted on each band, cosine-decayed step) on (z[, ax, ay][, phase]) in units of
    10⁴ Å (radians) over successive bands (``ax``, ``ay`` held where ``fit_astigmatism`` is False), maximising
    the summed band correlations. γ is linear in the parameters, so each band's γ and its Jacobian are computed
    once and the gradient is analytic (:func:`_corr_gradient`); the few parameters are updated in place, as
    ``torch.optim.Adam`` would, without its per-step overhead."""
    scale = torch.tensor([1e4] * (3 if fit_astigmatism else 1) + [1.0] * fit_phase, device=psd.device)
    free = [z] + ([ax, ay] if fit_astigmatism else []) + ([phase] if fit_phase else [])
    x = torch.stack(free, dim=1) / scale

    def params(x):
        theta = x * scale
        return (theta[:, 0], *((theta[:, 1], theta[:, 2]) if fit_astigmatism else (ax, ay)),
                theta[:, -1] if fit_phase else phase)

    beta1, beta2, eps = 0.9, 0.999, 1e-8
    with torch.no_grad():
        for band, n_iter, lr0 in zip(bands, iterations, (0.004, 0.002)):
            data = _prep(band.take(psd))
            x0 = x.clone()
            gam0 = _gamma(band, *params(x0), *acq)
            jac = _gamma_jacobian(band, acq[0], fit_astigmatism, fit_phase) * scale
            m1, m2 = torch.zeros_like(x), torch.zeros_like(x)
            for it in range(n_iter):
                lr = lr0 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * it / n_iter)))
                gam = gam0 + torch.bmm(jac, (x - x0)[..., None])[..., 0]
                grad = -_corr_gradient(data, gam, jac)
                m1.lerp_(grad, 1 - beta1)
                m2.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (m2.sqrt() / math.sqrt(1 - beta2 ** (it + 1))).add_(eps)
                x.addcdiv_(m1, denom, value=-lr / (1 - beta1 ** (it + 1)))
        band = bands[-1]
        z, ax, ay, ph = params(x)
        fom = _corr(_prep(band.take(psd)), torch.sin(_gamma(band, z, ax, ay, ph, *acq)) ** 2)
    return z, ax, ay, ph, fom


def select_astigmatism(psd: torch.Tensor, bands, z: torch.Tensor, ax: torch.Tensor, ay: torch.Tensor,
                       phase_rad: torch.Tensor, acq, fit_phase: bool, iterations: Tuple[int, int]):
    """Round or astigmatic model per micrograph (BIC), and the mean defocus's standard error (Å).

    The fitted astigmatism magnitude is never negative and the 2D score has noise-driven astigmatic optima, so
    on weak rings U − V grows by hundreds of Å on round truth. The round model (U = V) is refitted from the
    mean defocus, and the two extra parameters (ax, ay) are kept only where they pay for themselves by the
    Bayesian information criterion: ``N ln((1 − ρ₀²)/(1 − ρ₁²)) > 2 ln N`` (least squares of the PSD on CTF²;
    ρ₀, ρ₁ the band correlations of the round and astigmatic fits, N the independent band pixels of
    :func:`parameter_covariance`). σ: the chosen model's :func:`parameter_covariance`, plus the squared
    difference of the two models' mean defoci, plus ``(dz/dφ · σ_φ)²`` (σ_φ = :data:`AMPLITUDE_PHASE_SIGMA_DEG`)
    where the phase is held fixed. Returns ``(z, ax, ay, phase, fom, sigma_z)``, each (B,).
    """
    band = bands[-1]
    zero = torch.zeros_like(z)
    zr, _, _, pr, fom_r = _local(psd, None, bands, z, zero, zero, phase_rad, acq, fit_phase,
                                 (iterations[0] // 2, iterations[1] // 2), fit_astigmatism=False)
    cov, n_eff, dz_dphase = parameter_covariance(psd, band, z, ax, ay, phase_rad, acq, True, fit_phase)
    cov_r, _, dz_dphase_r = parameter_covariance(psd, band, zr, zero, zero, pr, acq, False, fit_phase)
    with torch.no_grad():
        fom = _corr(_prep(band.take(psd)), torch.sin(_gamma(band, z, ax, ay, phase_rad, *acq)) ** 2)
    gain = n_eff * torch.log((1 - fom_r * fom_r).clamp(min=1e-12) / (1 - fom * fom).clamp(min=1e-12))
    astig = gain > 2.0 * torch.log(n_eff)
    # the model choice is uncertain too: the two models' mean defoci differ by more than their curvature says
    # where the astigmatism is weakly determined (model averaging: their squared difference adds to the variance)
    # and the fixed phase (amplitude contrast) is an assumption: its uncertainty propagates through dz/dφ
    sigma = (torch.where(astig, _mean_defocus_variance(cov, dz_dphase), _mean_defocus_variance(cov_r, dz_dphase_r))
             + (z - zr) ** 2).sqrt()
    pick = [torch.where(astig, x1, x0) for x1, x0 in ((z, zr), (ax, zero), (ay, zero), (phase_rad, pr),
                                                       (fom, fom_r))]
    return (*pick, sigma)


def _finish(psd, sampling_A, bands, z, ax, ay, ph, acq, fit_phase, iterations, low_A):
    """:func:`select_astigmatism`, then the :class:`FitResult` with its resolution and σ."""
    z, ax, ay, ph, fom, sigma = select_astigmatism(psd, bands, z, ax, ay, ph, acq, fit_phase, iterations)
    result = FitResult(z, ax, ay, ph, fom)
    result.defocus_sigma_A = sigma
    result.resolution_A = fit_resolution(psd, sampling_A, result, acq, low_A)
    return result


def _bands(size_px, sampling_A, low_A, high_A, device):
    search_high = max(SEARCH_LOW_BAND_A, high_A)
    return (BandPixels(size_px, sampling_A, low_A, search_high, device),
            BandPixels(size_px, sampling_A, low_A, high_A, device))


def _best(scores, *cands):
    k = scores.argmax(dim=1)
    rows = torch.arange(scores.shape[0], device=scores.device)
    return [c[rows, k] for c in cands]


def refine_ctf(psd: torch.Tensor, sampling_A: float, start_u_A: Union[float, torch.Tensor],
           start_v_A: Union[float, torch.Tensor], start_angle_deg: Union[float, torch.Tensor],
           voltage_kV: Union[float, torch.Tensor], cs_mm: Union[float, torch.Tensor],
           amplitude_contrast: Union[float, torch.Tensor], low_A: float = 30.0, high_A: float = 5.0,
           fit_phase: bool = False, start_phase_deg: Union[float, torch.Tensor] = 0.0,
           iterations: Tuple[int, int] = (60, 100), scan_min_A: float = 5000.0, scan_fraction: float = 0.25,
           scan_steps: int = 101, defocus_range_A: Tuple[float, float] = (500.0, math.inf)) -> FitResult:
    """Local CTF fit from a start (e.g. the CNN's guess), batched over B micrographs.

    Args:
        psd: (B, S, S) PSDs from :func:`~deepcryo.defocus.psd.compute_psd` at ``sampling_A`` Å/px.
        start_u_A, start_v_A, start_angle_deg: (B,) start defoci (Å) and angle (degrees).
        voltage_kV, cs_mm, amplitude_contrast: floats or (B,).
        low_A, high_A: resolution band of the fit (Å), ``high_A >= 2 · sampling_A``.
        fit_phase: also fit a phase shift (phase plates), from ``start_phase_deg`` (degrees).
        iterations: Adam steps on the low-resolution band then on the full band.
        scan_min_A, scan_fraction, scan_steps: the first stage scans the mean defocus over
            start ± max(``scan_min_A``, ``scan_fraction`` · start) Å in ``scan_steps`` steps (low band 30–8 Å),
            so a start that is off by up to 25 % of the defocus still lands in the right Thon-ring basin.
        defocus_range_A: (min, max) mean defocus (Å) of the scan's candidates.
    Returns:
        :class:`FitResult` with ``resolution_A`` filled in.
    """
    dev = psd.device
    b, size = psd.shape[0], psd.shape[-1]
    acq = [_acq(v, b, dev) for v in (voltage_kV, cs_mm, amplitude_contrast)]
    lowband, band = _bands(size, sampling_A, low_A, high_A, dev)
    u, v = _acq(start_u_A, b, dev), _acq(start_v_A, b, dev)
    ang = torch.deg2rad(_acq(start_angle_deg, b, dev))
    z0, a0 = 0.5 * (u + v), 0.5 * (u - v)
    ax0, ay0 = a0 * torch.cos(2 * ang), a0 * torch.sin(2 * ang)
    # robust stage: scan of the mean defocus, start ± max(5000 Å, 25 % of the start) in 101 steps (100-250 Å,
    # finer than a quarter Thon-ring period of the low band, ~650 Å at 5 µm), with and without astigmatism
    half = torch.clamp(scan_fraction * z0, min=scan_min_A)
    dz = torch.linspace(-1.0, 1.0, scan_steps, device=dev)[None, :] * half[:, None]  # (B, steps)
    phases = torch.deg2rad(torch.arange(0.0, 180.0, 30.0, device=dev)) if fit_phase else \
        torch.deg2rad(_acq(start_phase_deg, 1, dev))
    zc = (z0[:, None, None, None] + dz[:, :, None, None]).clamp(min=defocus_range_A[0], max=defocus_range_A[1])
    astig = torch.tensor([1.0, 0.0], device=dev)[None, None, :, None]
    axc, ayc = ax0[:, None, None, None] * astig, ay0[:, None, None, None] * astig
    shape = (b, scan_steps, 2, phases.numel())
    zc, axc, ayc = (t.expand(shape).reshape(b, -1) for t in (zc, axc, ayc))
    phc = phases.reshape(1, 1, 1, -1).expand(shape).reshape(b, -1)
    with torch.no_grad():
        scores = score_params(psd, sampling_A, lowband, zc, axc, ayc, phc, *acq)
    z, ax, ay, ph = _best(scores, zc, axc, ayc, phc)
    z, ax, ay, ph, _ = _local(psd, sampling_A, (lowband, band), z, ax, ay, ph, acq, fit_phase, iterations)
    return _finish(psd, sampling_A, (lowband, band), z, ax, ay, ph, acq, fit_phase, iterations, low_A)


def fit_mean_defocus(psd: torch.Tensor, sampling_A: float, start_z_A: torch.Tensor, ax: torch.Tensor, ay: torch.Tensor,
                     phase_rad: torch.Tensor, acq, low_A: float = 30.0, high_A: float = 5.0,
                     scan_min_A: float = 5000.0, scan_fraction: float = 0.25, scan_steps: int = 101,
                     iterations: Tuple[int, int] = (60, 100)) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean defocus z (Å) of B PSDs with the astigmatism ``(ax, ay)`` (Å, the optimiser's parameters of
    :class:`FitResult`) and the phase (rad) held: the scan of :func:`refine_ctf` around ``start_z_A`` (low band),
    then Adam on z alone over the low then the full band. ``acq``: (voltage kV, Cs mm, amplitude contrast), (B,)
    tensors; all others (B,). Returns ``(z, figure of merit, σ_z)``, each (B,): σ_z is the statistical standard
    error of :func:`parameter_covariance` alone, without the fixed phase's term, which moves every PSD of one
    micrograph alike (a tilt plane's slope does not see it)."""
    dev = psd.device
    size = psd.shape[-1]
    lowband, band = _bands(size, sampling_A, low_A, high_A, dev)
    half = torch.clamp(scan_fraction * start_z_A, min=scan_min_A)
    zc = (start_z_A[:, None] + torch.linspace(-1.0, 1.0, scan_steps, device=dev)[None, :] * half[:, None]).clamp(min=1.0)
    with torch.no_grad():
        scores = score_params(psd, sampling_A, lowband, zc, ax[:, None].expand_as(zc), ay[:, None].expand_as(zc),
                              phase_rad[:, None].expand_as(zc), *acq)
    z = _best(scores, zc)[0]
    z, _, _, _, fom = _local(psd, sampling_A, (lowband, band), z, ax, ay, phase_rad, acq, False, iterations,
                             fit_astigmatism=False)
    cov, _, _ = parameter_covariance(psd, band, z, ax, ay, phase_rad, acq, fit_astigmatism=False)
    return z, fom, cov[:, 0, 0].clamp(min=0).sqrt()


def score_only(psd: torch.Tensor, sampling_A: float, defocus_u_A: Union[float, torch.Tensor],
               defocus_v_A: Union[float, torch.Tensor], defocus_angle_deg: Union[float, torch.Tensor],
               voltage_kV: Union[float, torch.Tensor], cs_mm: Union[float, torch.Tensor],
               amplitude_contrast: Union[float, torch.Tensor], low_A: float = 30.0, high_A: float = 5.0) -> FitResult:
    """No fit: figure of merit and fit resolution of given parameters (e.g. the CNN's) as a :class:`FitResult`."""
    dev = psd.device
    b, size = psd.shape[0], psd.shape[-1]
    acq = [_acq(v, b, dev) for v in (voltage_kV, cs_mm, amplitude_contrast)]
    band = BandPixels(size, sampling_A, low_A, high_A, dev)
    u, v = _acq(defocus_u_A, b, dev), _acq(defocus_v_A, b, dev)
    ang = torch.deg2rad(_acq(defocus_angle_deg, b, dev))
    z, a = 0.5 * (u + v), 0.5 * (u - v)
    ax, ay, ph = a * torch.cos(2 * ang), a * torch.sin(2 * ang), torch.zeros_like(z)
    with torch.no_grad():
        fom = score_params(psd, sampling_A, band, z[:, None], ax[:, None], ay[:, None], ph[:, None], *acq)[:, 0]
    result = FitResult(z, ax, ay, ph, fom)
    cov, _, dz_dphase = parameter_covariance(psd, band, z, ax, ay, ph, acq)
    result.defocus_sigma_A = _mean_defocus_variance(cov, dz_dphase).sqrt()
    result.resolution_A = fit_resolution(psd, sampling_A, result, acq, low_A)
    return result


def exhaustive_search(psd: torch.Tensor, sampling_A: float, voltage_kV: Union[float, torch.Tensor],
                      cs_mm: Union[float, torch.Tensor], amplitude_contrast: Union[float, torch.Tensor],
                      low_A: float = 30.0, high_A: float = 5.0,
                      defocus_range_A: Tuple[float, float] = (1000.0, 60000.0), defocus_step_A: float = 200.0,
                      astigmatism_max_A: float = 2000.0, astigmatism_step_A: float = 500.0,
                      angle_step_deg: float = 15.0, iterations: Tuple[int, int] = (60, 100),
                      chunk: int = 4096) -> FitResult:
    """CTFFIND-style baseline: 2D grid search (no start), then :func:`refine_ctf`'s local optimisation.

    Grid: mean defocus over ``defocus_range_A`` every ``defocus_step_A`` (Å); U − V from 0 to
    ``astigmatism_max_A`` every ``astigmatism_step_A`` (Å); angle every ``angle_step_deg`` degrees; scored on
    the low-resolution band (``low_A`` to 8 Å). Returns a :class:`FitResult`.
    """
    dev = psd.device
    b, size = psd.shape[0], psd.shape[-1]
    acq = [_acq(v, b, dev) for v in (voltage_kV, cs_mm, amplitude_contrast)]
    lowband, band = _bands(size, sampling_A, low_A, high_A, dev)
    zs = torch.arange(defocus_range_A[0], defocus_range_A[1] + 1e-3, defocus_step_A, device=dev)
    halves = torch.arange(astigmatism_step_A, astigmatism_max_A + 1e-3, astigmatism_step_A, device=dev) / 2
    angs = torch.deg2rad(torch.arange(0.0, 180.0, angle_step_deg, device=dev))
    astig = torch.cat([torch.zeros(1, 2, device=dev),
                       torch.stack([(halves[:, None] * torch.cos(2 * angs)).reshape(-1),
                                    (halves[:, None] * torch.sin(2 * angs)).reshape(-1)], dim=1)])
    zc = zs[:, None].expand(-1, astig.shape[0]).reshape(-1)
    axc = astig[:, 0][None].expand(zs.numel(), -1).reshape(-1)
    ayc = astig[:, 1][None].expand(zs.numel(), -1).reshape(-1)
    best = torch.full((b,), -2.0, device=dev)
    bz, bax, bay = torch.zeros(b, device=dev), torch.zeros(b, device=dev), torch.zeros(b, device=dev)
    zero = torch.zeros(b, device=dev)
    with torch.no_grad():
        for i in range(0, zc.numel(), chunk):
            cz, cax, cay = (t[i:i + chunk][None].expand(b, -1) for t in (zc, axc, ayc))
            scores = score_params(psd, sampling_A, lowband, cz, cax, cay, zero[:, None].expand_as(cz), *acq)
            s, k = scores.max(dim=1)
            better = s > best
            best = torch.where(better, s, best)
            bz = torch.where(better, cz[0, k], bz)
            bax = torch.where(better, cax[0, k], bax)
            bay = torch.where(better, cay[0, k], bay)
    z, ax, ay, ph, _ = _local(psd, sampling_A, (lowband, band), bz, bax, bay, zero, acq, False, iterations)
    return _finish(psd, sampling_A, (lowband, band), z, ax, ay, ph, acq, False, iterations, low_A)


def fit_resolution(psd: torch.Tensor, sampling_A: float, result: FitResult, acq, low_A: float,
                   threshold: float = 0.5, bins_per_period: int = 8, window_periods: int = 3) -> torch.Tensor:
    """Resolution (Å) up to which the fitted CTF matches the PSD (CTFFIND-style), (B,) tensor.

    The PSD pixels between ``low_A`` and the PSD's Nyquist (``2 · sampling_A``) are averaged in bins of the
    fitted CTF phase γ (``bins_per_period`` bins per period π of CTF² = sin²γ): an equiphase average, in
    which astigmatism is removed and each bin averages a whole (elliptical) ring, so noise averages out and
    rings stay measurable far beyond where single pixels agree. The Pearson correlation between this 1D
    average and the bins' mean CTF² is computed in a window of ``window_periods`` periods moving outwards;
    the resolution is 1/s at the centre of the first window whose correlation is below ``threshold``
    (the outermost bin's 1/s, ~``2 · sampling_A``, when none is). Vectorised over the batch.
    """
    size = psd.shape[-1]
    b = psd.shape[0]
    band = BandPixels(size, sampling_A, low_A, 2.0 * sampling_A, psd.device)
    with torch.no_grad():
        gam = _gamma(band, result._z, result._ax, result._ay, result._phase, *acq)  # (B, M)
        model = torch.sin(gam) ** 2
        data = band.take(psd)
        q = torch.floor(gam / math.pi * bins_per_period).long()
        q = q - q.min(dim=1, keepdim=True).values
        nb = int(q.max()) + 1
        flat = (q + nb * torch.arange(b, device=psd.device)[:, None]).reshape(-1)

        def binned(values):
            return torch.zeros(b * nb, device=psd.device).index_add_(0, flat, values.reshape(-1)).reshape(b, nb)
        counts = binned(torch.ones_like(data))
        ok = (counts > 0).to(data.dtype)
        n = counts.clamp(min=1)
        epa, mod = binned(data) / n, binned(model) / n
        s_bin = binned(band.s.expand(b, -1)) / n
        w = max(3, int(window_periods * bins_per_period))
        if nb < w:
            return torch.full((b,), 1.0 / float(band.s.min()), device=psd.device)
        def win(x):
            return x.unfold(1, w, 1)  # (B, nb - w + 1, w)
        wk, x, y = win(ok), win(epa), win(mod)
        cnt = wk.sum(-1).clamp(min=1)
        xm = (x * wk).sum(-1, keepdim=True) / cnt[..., None]
        ym = (y * wk).sum(-1, keepdim=True) / cnt[..., None]
        xc, yc = (x - xm) * wk, (y - ym) * wk
        cc = (xc * yc).sum(-1) / ((xc * xc).sum(-1) * (yc * yc).sum(-1)).sqrt().clamp(min=1e-12)
        cc = torch.where(cnt >= w // 2, cc, torch.ones_like(cc))  # windows with few filled bins: no verdict
        centre = win(s_bin * ok)[..., w // 2]
        bad = cc < threshold
        first = torch.where(bad.any(dim=1), bad.float().argmax(dim=1), torch.full((b,), -1, device=psd.device,
                                                                                    dtype=torch.long))
        rows = torch.arange(b, device=psd.device)
        s_fail = centre[rows, first.clamp(min=0)]
        s_last = (s_bin * ok).max(dim=1).values
        s_res = torch.where(first >= 0, s_fail, s_last)
        s_res = torch.where(s_res > 0, s_res, s_last)
    return 1.0 / s_res


def rotational_average(psd: torch.Tensor, sampling_A: float, result: FitResult, acq) -> torch.Tensor:
    """CTFFIND's ``_avrot.txt`` rows for each PSD, (B, 6, S/2): 1. spatial frequency (1/Å, shell centres of the
    PSD's grid); 2. rotational average of the PSD; 3. rotational average with the astigmatism taken out (each
    pixel moved to the frequency where the round CTF of the mean defocus has its phase γ); 4. the fitted CTF²
    (round, mean defocus, with the phase shift); 5. the correlation of rows 3 and 4 in a window one Thon ring
    wide around each frequency; 6. twice the correlation's standard error for noise alone (2/√n, n shells in the
    window). Shells without PSD pixels hold 0. The PSD is that of :func:`~deepcryo.defocus.psd.compute_psd`
    (background subtracted, so rows 2-3 oscillate around 0 and row 4 is on its own scale, as in CTFFIND)."""
    size = psd.shape[-1]
    b, n = psd.shape[0], size // 2
    dev = psd.device
    band = BandPixels(size, sampling_A, size * sampling_A, 2.0 * sampling_A, dev)  # all but the centre pixel
    step = 1.0 / (size * sampling_A)
    s_centre = (torch.arange(n, device=dev, dtype=psd.dtype) + 0.5) * step
    volt, cs, amp = acq
    lam = ctf_mod.wavelength_A(volt)
    with torch.no_grad():
        data = band.take(psd)
        ok = (data != 0).to(data.dtype)
        gam = _gamma(band, result._z, result._ax, result._ay, result._phase, *acq)
        c0 = (torch.atan(amp / torch.sqrt(1 - amp * amp)) + result._phase)[:, None]
        a = (math.pi * lam * result._z)[:, None]
        c4 = ((0.5 * math.pi * 1e7) * cs * lam ** 3)[:, None]
        g = gam - c0
        disc = (a * a - 4 * c4 * g).clamp(min=0)
        s2_eq = torch.where(c4 > 0, (a - disc.sqrt()) / (2 * c4).clamp(min=1e-30), g / a)
        s_eq = s2_eq.clamp(min=0).sqrt()

        def shell_mean(s_px):
            k = torch.floor(s_px / step).long().clamp(max=n)  # shell n: beyond the last, dropped
            flat = (k + (n + 1) * torch.arange(b, device=dev)[:, None]).reshape(-1)
            tot = torch.zeros(b * (n + 1), device=dev).index_add_(0, flat, (data * ok).reshape(-1))
            cnt = torch.zeros(b * (n + 1), device=dev).index_add_(0, flat, ok.expand_as(data).reshape(-1))
            return (tot / cnt.clamp(min=1)).reshape(b, n + 1)[:, :n], cnt.reshape(b, n + 1)[:, :n]

        plain, _ = shell_mean(band.s.expand(b, -1))
        epa, counts = shell_mean(s_eq)
        s2 = s_centre[None] ** 2
        model = torch.sin(a * s2 - c4 * s2 * s2 + c0) ** 2
        # window: one Thon ring, Δs = 1 / (2 s λ z), in shells, 3 to 20 shells either side
        half = (1.0 / (2 * s_centre[None] * lam[:, None] * result._z[:, None]) / step / 2).round().clamp(3, 20).long()
        # windowed sums from cumulative sums (shells without pixels left out)
        w = (counts > 0).to(data.dtype)
        j = torch.arange(n, device=dev)[None]
        lo, hi = (j - half).clamp(min=0), (j + half + 1).clamp(max=n)

        def window_sum(x):
            c = torch.nn.functional.pad(torch.cumsum(x * w, dim=1), (1, 0))
            return c.gather(1, hi) - c.gather(1, lo)
        k = window_sum(torch.ones_like(epa))
        sx, sy = window_sum(epa), window_sum(model)
        sxy, sxx, syy = window_sum(epa * model), window_sum(epa * epa), window_sum(model * model)
        k1 = k.clamp(min=1)
        cov = sxy - sx * sy / k1
        var = ((sxx - sx * sx / k1) * (syy - sy * sy / k1)).clamp(min=1e-24)
        enough = k >= 3
        cc = torch.where(enough, cov / var.sqrt(), torch.zeros_like(cov))
        sig = torch.where(enough, 2.0 / k1.sqrt(), torch.zeros_like(cov))
    return torch.stack([s_centre[None].expand(b, -1), plain, epa, model, cc, sig], dim=1)


def disagreement_flag(start_u_A: torch.Tensor, start_v_A: torch.Tensor, result: FitResult, tolerance_A: float = 1500.0,
                      relative: float = 0.1, min_fom: float = 0.05) -> torch.Tensor:
    """Low-confidence flag (B,) bool: the fitted mean defocus differs from the start's (the CNN's) by more
    than ``max(tolerance_A, relative · defocus)`` (the CNN and the physics disagree; with a CNN error of a few
    hundred Å this means one of them is in a wrong Thon-ring basin), or the figure of merit (band correlation
    with CTF²) is below ``min_fom`` (no rings: empty, drifted or thick-ice micrograph)."""
    start = 0.5 * (torch.as_tensor(start_u_A) + torch.as_tensor(start_v_A))
    fitted = 0.5 * (result.defocus_u_A + result.defocus_v_A)
    far = (start - fitted).abs() > torch.clamp(relative * fitted, min=tolerance_A)
    return far | (result.figure_of_merit < min_fom)
