"""Prediction: micrographs → CNN guess → (optional) physics refinement → RELION CTF STAR + PSD images.

Per micrograph, :func:`estimate_batch` computes

1. the CNN input with :func:`deepcryo.defocus.psd.compute_psd` (samplings 1, 2, 3 Å/px, 128 px);
2. the fit PSD with the same function at ``fit_sampling_A(pixel_size, high_A)`` Å/px, :data:`FIT_SIZE_PX` px;
3. the CNN's U, V, angle; then :func:`deepcryo.defocus.fit.refine_ctf` from it (or, with ``refine=False``,
   only the CNN's values, scored on the fit PSD);
4. figure of merit (band correlation with CTF²), fit resolution (Å), the defocus's standard error σ (Å, from
   the fit's curvature: :func:`deepcryo.defocus.fit.parameter_covariance`, plus the given amplitude contrast's
   uncertainty: :data:`deepcryo.defocus.fit.AMPLITUDE_PHASE_SIGMA_DEG`), and a low-confidence flag when
   the CNN and the fit disagree (:func:`deepcryo.defocus.fit.disagreement_flag`);
5. optionally (CTFFIND5's extras, off by default) the specimen's tilt angle and axis from the defoci of 512 px
   tiles (:mod:`deepcryo.defocus.tilt`, on PSDs at the fit's sampling) and its thickness from the Thon rings'
   nodes (:mod:`deepcryo.defocus.thickness`, on a PSD at the micrograph's pixel size, band to
   :func:`deepcryo.defocus.thickness.thickness_band_end_A`), both with the fitted defocus held. Where a
   thickness node is seen inside the defocus band (thick ice: ≳ 1000 Å at 300 kV and 5 Å), steps 3-5 are done
   once more with the band ended before the node (:func:`deepcryo.defocus.thickness.defocus_band_end_A`):
   the thin CTF² model fits the inverted rings beyond a node with the wrong sign, which moves the defocus and
   the tiles' defoci (false tilts).

The pixel size is the STAR's ``rlnMicrographPixelSize``, else the one given (``--pixel-size``), else the
MRC header's x/y size (EPU's micrographs carry ``(p, p, 0)``). A micrograph that cannot be used
(unreadable, NaN/Inf, smaller than a PSD tile, no pixel size anywhere) is reported and skipped; the
others go on.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
from collections import Counter, OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..core import ctf as ctf_mod
from ..core.errors import InputError
from ..core.mrc import read_mrc, write_mrc
from ..core.star import read_star, write_star
from . import fit as fit_mod
from . import model as model_mod
from . import thickness as thickness_mod
from . import tilt as tilt_mod
from .psd import CNN_SAMPLINGS_A, CNN_SIZE_PX, compute_psds

logger = logging.getLogger(__name__)

__all__ = ["MicrographEntry", "list_micrographs", "fit_sampling_A", "estimate_batch", "predict", "write_ctf_star",
           "write_avrot", "fitted_ctf2", "FIT_SIZE_PX", "STAR_EXTRAS"]

FIT_SIZE_PX = 384
#: result key -> STAR column of the optional fits: the specimen's tilt angle and axis (degrees, CTFFIND5's
#: convention, :mod:`deepcryo.defocus.tilt`; RELION has no column for a micrograph's specimen tilt, its
#: rlnMicrographTiltAngle being a tomography stage angle) and its thickness (Å, RELION 5's column for CTFFIND5's
#: sample thickness), with the smallest thickness the band could measure (Å; a thickness of 0 means "no node seen":
#: thinner than that, or the rings beyond the first node too weak to show it)
STAR_EXTRAS = OrderedDict([("tilt_angle_deg", "dcCtfTiltAngle"), ("tilt_axis_deg", "dcCtfTiltAxis"),
                           ("ice_thickness_A", "rlnCtfIceThickness"), ("ice_thickness_min_A", "dcCtfIceThicknessMin")])


class MicrographEntry:
    """A micrograph to process: ``path`` and its acquisition (None = not known yet)."""

    def __init__(self, path: str, pixel_size_A: Optional[float] = None, voltage_kV: Optional[float] = None,
                 cs_mm: Optional[float] = None, amplitude_contrast: Optional[float] = None) -> None:
        self.path = path
        self.pixel_size_A = pixel_size_A
        self.voltage_kV = voltage_kV
        self.cs_mm = cs_mm
        self.amplitude_contrast = amplitude_contrast


def list_micrographs(spec: str) -> List[MicrographEntry]:
    """Micrograph entries from a glob pattern or a STAR file (``rlnMicrographName`` relative to the STAR's
    folder; per-row or ``data_optics`` ``rlnMicrographPixelSize``, ``rlnVoltage``, ``rlnSphericalAberration``,
    ``rlnAmplitudeContrast`` when present)."""
    if spec.endswith(".star"):
        blocks = read_star(spec)
        name = "micrographs" if "micrographs" in blocks else next((b for b in blocks if b != "optics"), None)
        cols = blocks.get(name, {})
        if "rlnMicrographName" not in cols:
            raise InputError("%s: no rlnMicrographName column" % spec)
        optics = blocks.get("optics", {})
        folder = os.path.dirname(os.path.abspath(spec))
        group_row = {}
        if "rlnOpticsGroup" in optics:
            group_row = {int(g): i for i, g in enumerate(optics["rlnOpticsGroup"])}
        entries = []
        for i, mic in enumerate(cols["rlnMicrographName"]):
            orow = group_row.get(int(cols["rlnOpticsGroup"][i]), 0) if "rlnOpticsGroup" in cols else 0

            def get(column):
                if column in cols:
                    return float(cols[column][i])
                if column in optics and len(optics[column]) > orow:
                    return float(optics[column][orow])
                return None

            entries.append(MicrographEntry(mic if os.path.isabs(mic) else os.path.join(folder, mic),
                                           get("rlnMicrographPixelSize"), get("rlnVoltage"),
                                           get("rlnSphericalAberration"), get("rlnAmplitudeContrast")))
        return entries
    paths = sorted(glob.glob(spec))
    if not paths:
        raise InputError("%s: no micrograph matches" % spec)
    return [MicrographEntry(p) for p in paths]


def fit_sampling_A(pixel_size_A: float, high_A: float) -> float:
    """Sampling (Å/px) of the fit PSD: ``high_A / 2.5`` (the band ends below Nyquist), not finer than the
    micrograph."""
    return max(float(pixel_size_A), high_A / 2.5)


def _complete(entry, defaults, header_pixel_size_A):
    """Fill the acquisition of ``entry``: the STAR's values first, then ``defaults`` (the command line);
    the pixel size last from the MRC header (0 = the header records none). Returns where the pixel size
    came from."""
    source = ("STAR" if entry.pixel_size_A is not None
              else "command line" if defaults.get("pixel_size_A") is not None else "MRC header")
    for key in ("pixel_size_A", "voltage_kV", "cs_mm", "amplitude_contrast"):
        if defaults.get(key) is not None and getattr(entry, key) is None:
            setattr(entry, key, float(defaults[key]))
    if entry.pixel_size_A is None and header_pixel_size_A > 0:
        entry.pixel_size_A = header_pixel_size_A
    if entry.pixel_size_A is None:
        raise InputError("%s: missing pixel size: the MRC header records none (0 Å/px); give --pixel-size "
                            "or rlnMicrographPixelSize in the STAR" % entry.path)
    for key in ("pixel_size_A", "voltage_kV", "cs_mm", "amplitude_contrast"):
        value = getattr(entry, key)
        if value is None or not math.isfinite(value) or (key != "cs_mm" and value <= 0) or value < 0:
            raise InputError("%s: missing or invalid %s" % (entry.path, key.replace("_", " ")))
    if entry.amplitude_contrast >= 1:
        raise InputError("%s: amplitude contrast must be < 1" % entry.path)
    return source


def estimate_batch(entries: Sequence[MicrographEntry], model: torch.nn.Module, refine: bool = True, low_A: float = 30.0,
                   high_A: float = 5.0, fit_phase: bool = False, device: Union[str, torch.device] = "cpu",
                   psd_dir: Optional[str] = None, defaults: Optional[Dict[str, float]] = None,
                   on_skip: Optional[Callable[[str, str], None]] = None,
                   defocus_range_A: Tuple[float, float] = (500.0, math.inf), fit_tilt: bool = False,
                   fit_thickness: bool = False) -> List[Dict[str, Any]]:
    """Estimate the CTF of a list of :class:`MicrographEntry`; returns a list of result dicts (skipped
    micrographs are left out and passed to ``on_skip(path, message)``). Each dict: ``micrograph``,
    ``defocus_u_A``, ``defocus_v_A``, ``defocus_angle_deg``, ``phase_shift_deg``, ``resolution_A``,
    ``figure_of_merit``, ``defocus_sigma_A``, ``cnn_u_A``, ``cnn_v_A``, ``cnn_angle_deg``, ``flagged``, ``psd``,
    ``avrot`` and ``ctf_image`` (files, with ``psd_dir``, else None),
    ``pixel_size_A`` and ``pixel_size_from`` ("STAR", "command line" for ``defaults``, or "MRC header").
    ``defocus_range_A``: (min, max) defocus (Å): the CNN's U and V are clipped to it and the fit's scan stays
    in it. ``fit_tilt``: also ``tilt_angle_deg``, ``tilt_axis_deg`` (:mod:`deepcryo.defocus.tilt`; needs 2 × 2
    tiles of :data:`deepcryo.defocus.tilt.TILE_PX` px, else the micrograph is skipped). ``fit_thickness``: also
    ``ice_thickness_A`` (0 = no node seen; never below ``ice_thickness_min_A``, :mod:`deepcryo.defocus.thickness`).
    Both need the
    refinement (``refine``)."""
    with _one_thread_on_cpu(device):
        defaults = defaults or {}
        items = []
        for e in entries:
            try:
                image, header_px = read_mrc(e.path, check_finite=False)  # compute_psds checks (cheaper)
                px_source = _complete(e, defaults, header_px)
                if image.ndim == 3 and image.shape[0] == 1:
                    image = image[0]
                if image.ndim != 2:
                    raise InputError("%s: not a single 2D micrograph" % e.path)
                mic = torch.as_tensor(image, device=device)
                samp = fit_sampling_A(e.pixel_size_A, high_A)
                if high_A < 2.0 * samp:
                    raise InputError("%s: resolution limit %.2f Å beyond the micrograph's Nyquist" % (e.path, high_A))
                # all inputs in one pass of validation/normalisation: identical to separate compute_psd calls
                requests = [(CNN_SAMPLINGS_A, CNN_SIZE_PX), ((samp,), FIT_SIZE_PX)]
                if fit_thickness and samp != e.pixel_size_A:
                    requests.append(((e.pixel_size_A,), FIT_SIZE_PX))
                psds = compute_psds(mic, e.pixel_size_A, requests)
                cnn_in, fit_in = psds[0], psds[1][:, 0]
                extras = {}
                if fit_thickness:
                    extras["thickness_psd"] = psds[-1][:, 0]
                if fit_tilt:
                    extras["tiles"] = tilt_mod.tile_psds(mic, e.pixel_size_A, samp)
                    extras["field_A"] = (mic.shape[-1] * e.pixel_size_A, mic.shape[-2] * e.pixel_size_A)
                items.append((e, cnn_in, fit_in, samp, px_source, extras))
            except InputError as exc:
                if on_skip is None:
                    raise
                on_skip(e.path, str(exc))
        if not items:
            return []
        cnn_in = torch.cat([it[1] for it in items])
        acq = model_mod.acquisition_features([it[0].voltage_kV for it in items], [it[0].cs_mm for it in items],
                                             len(items)).to(device)
        with torch.no_grad():
            cu, cv, ca = model_mod.decode(model(cnn_in, acq))
            cu, cv = (t.clamp(min=defocus_range_A[0], max=defocus_range_A[1]) for t in (cu, cv))
        results = [None] * len(items)
        by_sampling = OrderedDict()
        for i, it in enumerate(items):
            by_sampling.setdefault(it[3], []).append(i)
        for samp, idx in by_sampling.items():
            _fit_group(items, idx, samp, cu, cv, ca, results, refine, low_A, high_A, fit_phase, psd_dir, defocus_range_A)
            for i in idx:
                extra = _tilt_thickness(items[i], results[i], low_A, high_A)
                band_end = thickness_mod.defocus_band_end_A(items[i][0].voltage_kV, extra.get("ice_thickness_A", 0.0))
                if band_end > high_A:
                    # a node seen inside the band: the thin fit and the tiles' fits saw inverted rings, so the
                    # defocus and tilt are fitted again on a band ended before the node (from the CNN's start, as
                    # the first fit), and the thickness measured again from that defocus
                    logger.info("%s: ice %.0f Å thick, its first node inside the %.1f Å band: defocus and tilt "
                                "fitted again to %.1f Å", items[i][0].path, extra["ice_thickness_A"], high_A, band_end)
                    _fit_group(items, [i], samp, cu, cv, ca, results, refine, low_A, band_end, fit_phase, psd_dir,
                               defocus_range_A)
                    extra = _tilt_thickness(items[i], results[i], low_A, band_end)
                results[i].update(extra)
        return results


@contextlib.contextmanager
def _one_thread_on_cpu(device):
    """torch's intra-op threads set to one inside the block on the CPU (restored after). Per micrograph the work
    is thousands of small operations (a row of PSD tiles, the band pixels of a 384² PSD): there, the threads'
    synchronisation costs more than it saves (benchmarks/RESULTS.md, "Defocus CPU per micrograph"). Micrographs
    are processed in parallel by running several programs (the protocol's batches), not by threads inside these
    operations."""
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit_group(items, idx, samp, cu, cv, ca, results, refine, low_A, high_A, fit_phase, psd_dir, defocus_range_A):
    """Fit (or score) the micrographs ``idx`` of ``items`` whose fit PSDs share the sampling ``samp`` (Å/px),
    write their PSD, ``_avrot.txt`` and CTF² files into ``psd_dir`` (when given) and fill ``results[i]``."""
    psd = torch.cat([items[i][2] for i in idx])
    sub = [items[i][0] for i in idx]
    volt = [e.voltage_kV for e in sub]
    cs = [e.cs_mm for e in sub]
    amp = [e.amplitude_contrast for e in sub]
    if refine:
        res = fit_mod.refine_ctf(psd, samp, cu[idx], cv[idx], ca[idx], volt, cs, amp, low_A=low_A, high_A=high_A,
                                 fit_phase=fit_phase, defocus_range_A=defocus_range_A)
    else:
        res = fit_mod.score_only(psd, samp, cu[idx], cv[idx], ca[idx], volt, cs, amp, low_A=low_A, high_A=high_A)
    flags = fit_mod.disagreement_flag(cu[idx], cv[idx], res)
    acq_t = [torch.as_tensor(x, dtype=torch.float32, device=psd.device) for x in (volt, cs, amp)]
    avrot = fit_mod.rotational_average(psd, samp, res, acq_t).cpu().numpy() if psd_dir else None
    for j, i in enumerate(idx):
        e = items[i][0]
        psd_path = avrot_path = model_path = None
        if psd_dir:
            base = os.path.splitext(os.path.basename(e.path))[0]
            psd_path = os.path.join(psd_dir, "%s_psd.mrc" % base)
            write_mrc(psd_path, psd[j].cpu().numpy(), samp)
            avrot_path = os.path.join(psd_dir, "%s_avrot.txt" % base)
            write_avrot(avrot_path, avrot[j])
            model_path = os.path.join(psd_dir, "%s_ctf.mrc" % base)
            write_mrc(model_path, fitted_ctf2(psd.shape[-1], samp, res, j, e), samp)
        results[i] = OrderedDict([
            ("micrograph", e.path), ("defocus_u_A", float(res.defocus_u_A[j])),
            ("defocus_v_A", float(res.defocus_v_A[j])), ("defocus_angle_deg", float(res.defocus_angle_deg[j])),
            ("phase_shift_deg", float(res.phase_shift_deg[j])), ("resolution_A", float(res.resolution_A[j])),
            ("figure_of_merit", float(res.figure_of_merit[j])),
            ("defocus_sigma_A", float(res.defocus_sigma_A[j])), ("cnn_u_A", float(cu[i])),
            ("cnn_v_A", float(cv[i])), ("cnn_angle_deg", float(ca[i])), ("flagged", bool(flags[j])),
            ("psd", psd_path), ("avrot", avrot_path), ("ctf_image", model_path), ("psd_sampling_A", samp), ("pixel_size_A", e.pixel_size_A),
            ("pixel_size_from", items[i][4]), ("voltage_kV", e.voltage_kV), ("cs_mm", e.cs_mm),
            ("amplitude_contrast", e.amplitude_contrast),
            ("_fit", (res._z[j:j + 1], res._ax[j:j + 1], res._ay[j:j + 1], res._phase[j:j + 1]))])


def _tilt_thickness(item, result, low_A, high_A):
    """The optional tilt and thickness of one micrograph (``item`` of :func:`estimate_batch`), from its fitted
    CTF (``result["_fit"]``: z, ax, ay, phase, (1,) tensors, removed here). Returns the result keys to add."""
    e, samp, extras = item[0], item[3], item[5]
    z, ax, ay, phase = result.pop("_fit")
    out = OrderedDict()
    if "tiles" in extras:
        tiles, centres = extras["tiles"]
        fitted = tilt_mod.fit_tilt(tiles, centres, samp, float(z), float(ax), float(ay), float(phase), e.voltage_kV,
                                   e.cs_mm, e.amplitude_contrast, low_A=low_A, high_A=high_A)
        out["tilt_angle_deg"], out["tilt_axis_deg"] = fitted["tilt_angle_deg"], fitted["tilt_axis_deg"]
        gradient = fitted["defocus_gradient"]
    if "thickness_psd" in extras:
        psd = extras["thickness_psd"]
        end = thickness_mod.thickness_band_end_A(e.pixel_size_A, result["defocus_u_A"], e.voltage_kV, psd.shape[-1])
        acq = [torch.tensor([v], dtype=torch.float32, device=psd.device)
               for v in (e.voltage_kV, e.cs_mm, e.amplitude_contrast)]
        fit = fit_mod.FitResult(z, ax, ay, phase, torch.zeros_like(z))
        # a tilt spreads the defocus over the micrograph: the slab model is averaged over that spread, else the
        # tilt's height range reads as thickness (CTFFIND5 fits the thickness on a tilt-corrected spectrum)
        spread = None
        if "tiles" in extras and all(math.isfinite(g) for g in gradient):
            spread = thickness_mod.tilt_defocus_spread(gradient, *extras["field_A"])
        thick, _ = thickness_mod.fit_thickness(psd, e.pixel_size_A, fit, acq, low_A=low_A, high_A=end,
                                               defocus_spread=spread)
        out["ice_thickness_A"] = float(thick[0])
        out["ice_thickness_min_A"] = thickness_mod.min_thickness_A(e.voltage_kV, end)
    return out


def fitted_ctf2(size_px: int, sampling_A: float, result: fit_mod.FitResult, index: int,
                entry: MicrographEntry) -> np.ndarray:
    """The fitted CTF² (size_px, size_px) of micrograph ``index`` of ``result`` on its PSD's grid (``sampling_A``
    Å/px), written beside the PSD as CTFFIND writes its diagnostic image: the viewer, in Scipion's Python,
    shows it without computing a CTF (and without torch)."""
    ctf = ctf_mod.ctf_2d(size_px, sampling_A, float(result.defocus_u_A[index]), float(result.defocus_v_A[index]),
                         float(result.defocus_angle_deg[index]), entry.voltage_kV, entry.cs_mm,
                         entry.amplitude_contrast, float(result.phase_shift_deg[index]))[0]
    return (ctf ** 2).numpy()


def write_avrot(path: str, rows: np.ndarray) -> None:
    """CTFFIND's ``_avrot.txt``: 6 rows (:func:`deepcryo.defocus.fit.rotational_average`) of one micrograph,
    behind ``#`` comment lines saying what each row is."""
    header = ("deepcryo rotational average (CTFFIND _avrot.txt layout), one row each:\n"
              "1: spatial frequency (1/Angstroms); 2: rotational average of the PSD (background subtracted);\n"
              "3: rotational average, astigmatism taken out; 4: fitted CTF^2 (round, mean defocus);\n"
              "5: cross-correlation of rows 3 and 4 (one-ring window); 6: 2sigma of that correlation for noise")
    np.savetxt(path, np.asarray(rows, dtype=np.float64), fmt="%.6g", header=header)


def write_ctf_star(path: str, results: Sequence[Dict[str, Any]], with_phase: bool = False) -> None:
    """RELION CTF STAR (``data_micrographs``): rlnMicrographName, rlnDefocusU/V (Å), rlnDefocusAngle (deg),
    rlnCtfMaxResolution (Å), rlnCtfFigureOfMerit, rlnCtfImage (PSD MRC), [rlnPhaseShift], plus
    rlnMicrographPixelSize/rlnVoltage/rlnSphericalAberration/rlnAmplitudeContrast and deepcryo's
    dcCtfAvrot (the micrograph's :func:`write_avrot` file), dcCtfModelImage (its :func:`fitted_ctf2` MRC),
    dcDefocusSigma (standard error of the mean defocus, Å), dcCnnDefocusU/V/Angle and dcCtfFlagged (1 = CNN
    and fit disagree); with the tilt and thickness fits, the columns of :data:`STAR_EXTRAS`."""
    def col(key, dtype=np.float64):
        return np.array([r[key] for r in results], dtype=dtype)

    cols = OrderedDict([("rlnMicrographName", col("micrograph", object)), ("rlnDefocusU", col("defocus_u_A")),
                        ("rlnDefocusV", col("defocus_v_A")), ("rlnDefocusAngle", col("defocus_angle_deg")),
                        ("rlnCtfMaxResolution", col("resolution_A")), ("rlnCtfFigureOfMerit", col("figure_of_merit"))])
    if all(r["psd"] for r in results):
        cols["rlnCtfImage"] = col("psd", object)
        cols["dcCtfAvrot"] = col("avrot", object)
        cols["dcCtfModelImage"] = col("ctf_image", object)
    if with_phase:
        cols["rlnPhaseShift"] = col("phase_shift_deg")
    cols["rlnMicrographPixelSize"] = col("pixel_size_A")
    cols["rlnVoltage"] = col("voltage_kV")
    cols["rlnSphericalAberration"] = col("cs_mm")
    cols["rlnAmplitudeContrast"] = col("amplitude_contrast")
    cols["dcDefocusSigma"] = col("defocus_sigma_A")
    cols["dcCnnDefocusU"] = col("cnn_u_A")
    cols["dcCnnDefocusV"] = col("cnn_v_A")
    cols["dcCnnDefocusAngle"] = col("cnn_angle_deg")
    cols["dcCtfFlagged"] = np.array([int(r["flagged"]) for r in results], dtype=np.int64)
    for key, column in STAR_EXTRAS.items():
        if all(key in r for r in results):
            cols[column] = col(key)
    write_star(path, OrderedDict([("micrographs", cols)]))


def predict(spec: str, output: str, model_path: Optional[str] = None, refine: bool = True, low_A: float = 30.0,
            high_A: float = 5.0, fit_phase: bool = False, batch_size: int = 8, device: Union[str, torch.device] = "cpu",
            defaults: Optional[Dict[str, float]] = None,
            defocus_range_A: Tuple[float, float] = (500.0, math.inf), fit_tilt: bool = False,
            fit_thickness: bool = False) -> List[Dict[str, Any]]:
    """Whole program: micrographs (glob or STAR) → ``output`` STAR (+ PSDs in ``<output stem>_psd/``).

    Returns the list of result dicts. Raises InputError when no micrograph could be processed, or when the tilt
    or thickness fit is asked for without the refinement.
    """
    if (fit_tilt or fit_thickness) and not refine:
        raise InputError("the tilt and thickness fits start from the refined CTF: they need the refinement "
                         "(drop --no-refine)")
    entries = list_micrographs(spec)
    model, _ = model_mod.load_model(model_path, device=device)
    psd_dir = os.path.splitext(os.path.abspath(output))[0] + "_psd"
    os.makedirs(psd_dir, exist_ok=True)
    results, skipped = [], []

    def on_skip(p, m):
        skipped.append(m if m.startswith(p) else "%s: %s" % (p, m))
        if len(entries) > 1:  # a single micrograph's problem is the error itself
            logger.warning("skipped %s", skipped[-1])

    for i in range(0, len(entries), batch_size):
        results += estimate_batch(entries[i:i + batch_size], model, refine, low_A, high_A, fit_phase, device,
                                  psd_dir, defaults, on_skip=on_skip, defocus_range_A=defocus_range_A,
                                  fit_tilt=fit_tilt, fit_thickness=fit_thickness)
        logger.info("%d/%d micrographs", min(i + batch_size, len(entries)), len(entries))
    for (px, source), n in Counter((r["pixel_size_A"], r["pixel_size_from"]) for r in results).items():
        logger.info("pixel size %.4f Å/px (%s): %d micrograph%s", px, source, n, "s" * (n != 1))
    if not results:
        with contextlib.suppress(OSError):
            os.rmdir(psd_dir)  # nothing was written: leave no empty folder behind
        if len(skipped) == 1:
            raise InputError(skipped[0])
        raise InputError("%s: no micrograph could be processed%s"
                            % (spec, " (first: %s)" % skipped[0] if skipped else " (none listed)"))
    write_ctf_star(output, results, with_phase=fit_phase)
    return results

