"""Specimen tilt from the defocus of tiles (CTFFIND5: Elferich, Kong, Zottig, Grigorieff 2024, eLife 13:RP97227).

A tilted specimen is not at one defocus: its height, hence the defocus, changes linearly across the micrograph.
:func:`fit_tilt` measures it as CTFFIND5 does, by local defocus:

1. the micrograph is cut into square tiles (``tile_px`` px, disjoint, whole tiles only); each tile's PSD is
   :func:`deepcryo.defocus.psd.compute_psd` of the tile (Welch over sub-tiles half its side) at the fit's
   sampling;
2. each tile's mean defocus is fitted with the micrograph's astigmatism and phase held
   (:func:`deepcryo.defocus.fit.fit_mean_defocus`), with its standard error σ;
3. a plane ``Δf(x, y) = Δf₀ + g_x x + g_y y`` is fitted by weighted least squares (weights 1/σ²; tiles more
   than 3 robust standard deviations off the first plane, a wrong Thon-ring basin or an empty tile, are left
   out of the second fit), x, y in Å from the micrograph's centre;
4. the gradient (Å of defocus per Å) gives the tilt angle θ = atan |g| and the tilt axis φ.

Convention (CTFFIND5's, ``CTFTilt`` of cisTEM): x along the image columns (the array's last axis, MRC x), y along
its rows (MRC y), both in Å from the centre; defocus positive = underfocus, and

    ``Δf(x, y) = Δf₀ + tan θ · (x sin φ + y cos φ)``,

so the defocus grows fastest along the direction (sin φ, cos φ) and is constant along the axis
(cos φ, −sin φ), i.e. φ is the angle of the axis measured clockwise from x in a frame with y up (CTFFIND5's
figure draws it counter-clockwise with y down). θ in [0, 90), φ in [0, 360): (θ, φ) and the same θ at φ + 180
are different tilts (the opposite side is higher). :func:`tilt_from_gradient` and :func:`gradient_from_tilt`
convert.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import numpy as np
import torch

from ..core.errors import InputError
from . import fit as fit_mod
from .psd import compute_psd

__all__ = ["tile_psds", "fit_plane", "tilt_from_gradient", "gradient_from_tilt", "fit_tilt", "TILE_PX"]

#: default tile side (px): CTFFIND5 fits tiles of a few hundred Å; 512 px keeps Thon rings to 4-5 Å visible
#: in one tile's PSD while leaving >= 4 x 4 tiles on a 2048² micrograph
TILE_PX = 512


def gradient_from_tilt(tilt_angle_deg: float, tilt_axis_deg: float) -> Tuple[float, float]:
    """Defocus gradient ``(g_x, g_y)`` (Å/Å) of a specimen tilted by θ about the axis φ (module convention)."""
    slope = math.tan(math.radians(tilt_angle_deg))
    axis = math.radians(tilt_axis_deg)
    return slope * math.sin(axis), slope * math.cos(axis)


def tilt_from_gradient(gx: float, gy: float) -> Tuple[float, float]:
    """Tilt angle θ (degrees, [0, 90)) and axis φ (degrees, [0, 360)) of a defocus gradient (Å/Å); inverse of
    :func:`gradient_from_tilt` (φ is 0 for a zero gradient)."""
    return math.degrees(math.atan(math.hypot(gx, gy))), math.degrees(math.atan2(gx, gy)) % 360.0


def tile_psds(micrograph: torch.Tensor, pixel_size_A: float, sampling_A: float,
              tile_px: int = TILE_PX) -> Tuple[torch.Tensor, torch.Tensor]:
    """PSDs of the disjoint ``tile_px`` tiles of one micrograph (H, W) and their centres.

    Each PSD is :func:`~deepcryo.defocus.psd.compute_psd` of the tile at ``sampling_A`` Å/px, of side
    ``tile_px · pixel_size_A / (2 · sampling_A)`` px, so its Welch sub-tiles are about half the tile.
    Returns ``(psds (T, S, S), centres (T, 2))``, centres (x, y) in Å from the micrograph's centre (module
    convention). Raises InputError when fewer than 2 × 2 tiles fit.
    """
    mic = torch.as_tensor(micrograph)
    if mic.ndim != 2:
        raise InputError("tilt fit: expected one 2D micrograph, got shape %s" % (tuple(mic.shape),))
    h, w = mic.shape
    ny, nx = h // tile_px, w // tile_px
    if ny < 2 or nx < 2:
        raise InputError("micrograph of %dx%d px is too small for a tilt fit (needs 2x2 tiles of %d px)"
                         % (w, h, tile_px))
    oy, ox = (h - ny * tile_px) // 2, (w - nx * tile_px) // 2
    tiles = mic[oy:oy + ny * tile_px, ox:ox + nx * tile_px].reshape(ny, tile_px, nx, tile_px)
    tiles = tiles.permute(0, 2, 1, 3).reshape(ny * nx, tile_px, tile_px)
    size = max(32, int(round(0.5 * tile_px * pixel_size_A / sampling_A)))
    psds = compute_psd(tiles, pixel_size_A, (sampling_A,), size)[:, 0]
    iy, ix = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
    cx = (ox + (ix.reshape(-1).double() + 0.5) * tile_px - 0.5 * w) * pixel_size_A
    cy = (oy + (iy.reshape(-1).double() + 0.5) * tile_px - 0.5 * h) * pixel_size_A
    return psds, torch.stack([cx, cy], dim=1)


def fit_plane(x_A: np.ndarray, y_A: np.ndarray, defocus_A: np.ndarray, sigma_A: np.ndarray,
              reject: float = 3.0) -> Tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares plane ``Δf₀ + g_x x + g_y y`` through tile defoci (Å) at (x, y) (Å), weights
    1/σ² (σ floored at 1 % of its median, so one overconfident tile cannot pin the plane); then refitted without
    the tiles whose residual exceeds ``reject`` robust standard deviations (1.4826 × median |residual|, at least
    their own σ). Returns ``(coefficients (Δf₀, g_x, g_y), kept tiles (bool))``; NaNs when fewer than 3 tiles
    are usable."""
    x, y, z, s = (np.asarray(a, dtype=np.float64) for a in (x_A, y_A, defocus_A, sigma_A))
    ok = np.isfinite(z) & np.isfinite(s) & (s > 0)
    if ok.sum() >= 3:
        s = np.maximum(s, 0.01 * np.median(s[ok]))
    design = np.stack([np.ones_like(x), x, y], axis=1)

    def solve(keep):
        if keep.sum() < 3:
            return np.full(3, np.nan)
        wts = 1.0 / s[keep]
        coef, *_ = np.linalg.lstsq(design[keep] * wts[:, None], z[keep] * wts, rcond=None)
        return coef

    coef = solve(ok)
    if not np.all(np.isfinite(coef)):
        return coef, ok
    resid = np.abs(z - design @ coef)
    scale = 1.4826 * np.median(resid[ok])
    keep = ok & (resid <= reject * np.maximum(scale, s))
    return solve(keep), keep


def fit_tilt(psds: torch.Tensor, centres_A: torch.Tensor, sampling_A: float, z_A: float, ax_A: float, ay_A: float,
             phase_rad: float, voltage_kV: float, cs_mm: float, amplitude_contrast: float, low_A: float = 30.0,
             high_A: float = 5.0) -> Dict[str, float]:
    """Tilt angle and axis of one micrograph from its tiles' PSDs (module docstring).

    Args:
        psds, centres_A: the tiles' PSDs (T, S, S) at ``sampling_A`` Å/px and centres (T, 2) (Å) of
            :func:`tile_psds`.
        z_A, ax_A, ay_A, phase_rad: the micrograph's fitted mean defocus (Å), astigmatism (Å, ``(U − V)/2 ·
            (cos 2α, sin 2α)``) and phase (rad) (:class:`~deepcryo.defocus.fit.FitResult`); the tiles start from
            z and keep the astigmatism and phase.
        voltage_kV, cs_mm, amplitude_contrast: acquisition. low_A, high_A: the fit band (Å).
    Returns:
        dict: ``tilt_angle_deg``, ``tilt_axis_deg`` (module convention), ``defocus_gradient`` ((g_x, g_y), Å/Å),
        ``centre_defocus_A`` (Δf₀), ``tiles`` / ``tiles_used`` (counts); NaN angles when fewer than 3 tiles fit.
    """
    n = psds.shape[0]
    dev = psds.device

    def col(v):
        return torch.full((n,), float(v), dtype=torch.float32, device=dev)

    acq = [col(voltage_kV), col(cs_mm), col(amplitude_contrast)]
    z, _, sigma = fit_mod.fit_mean_defocus(psds, sampling_A, col(z_A), col(ax_A), col(ay_A), col(phase_rad), acq,
                                           low_A=low_A, high_A=high_A)
    c = centres_A.cpu().numpy()
    coef, keep = fit_plane(c[:, 0], c[:, 1], z.double().cpu().numpy(), sigma.double().cpu().numpy())
    if not np.all(np.isfinite(coef)):
        angle = axis = float("nan")
    else:
        angle, axis = tilt_from_gradient(float(coef[1]), float(coef[2]))
    return dict(tilt_angle_deg=angle, tilt_axis_deg=axis, defocus_gradient=(float(coef[1]), float(coef[2])),
                centre_defocus_A=float(coef[0]), tiles=int(n), tiles_used=int(keep.sum()))
