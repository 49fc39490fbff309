# **************************************************************************
# *
# * Authors:     the deepcryo developers
# *
# * This program is free software; you can redistribute it and/or modify
# * it under the terms of the GNU General Public License as published by
# * the Free Software Foundation; either version 3 of the License, or
# * (at your option) any later version.
# *
# * This program is distributed in the hope that it will be useful,
# * but WITHOUT ANY WARRANTY; without even the implied warranty of
# * MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.  See the
# * GNU General Public License for more details.
# *
# * You should have received a copy of the GNU General Public License
# * along with this program.  If not, see <https://www.gnu.org/licenses/>.
# *
# **************************************************************************
"""Viewer of 'deep micrograph defocus': PSD with the fitted CTF over half of it, the 1D rotational average,
defocus per micrograph with ±2σ, fit-resolution histogram, flagged micrographs, and pwem's CTF table. The
figures are plain functions (headless, Agg)."""
import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from pyworkflow.viewer import DESKTOP_TKINTER, Viewer  # noqa: E402

from deepcryo.core.mrc import read_mrc, read_mrc_header  # noqa: E402
from deepcryo.convert import (CTF_AVROT_ATTR, CTF_MODEL_IMAGE_ATTR, CTF_SIGMA_ATTR, CTF_THICKNESS_ATTR,  # noqa: E402
                              CTF_TILT_ANGLE_ATTR)
from deepcryo.protocols.protocol_defocus import FLAG_ATTR, DeepCryoProtDeepDefocus  # noqa: E402


def psd_with_ctf(psd, ctf2):
    """Image (S, S): the PSD on the right half (x >= centre), the fitted CTF² ``ctf2`` (S, S; the program's
    ``_ctf.mrc``, scaled to the PSD's range) on the left half, so the Thon rings can be checked for continuity
    across the middle."""
    psd = np.asarray(psd, dtype=np.float32)
    size = psd.shape[-1]
    model = np.asarray(ctf2, dtype=np.float32).reshape(psd.shape)
    lo, hi = np.percentile(psd[psd != 0], [2, 98]) if np.any(psd != 0) else (0.0, 1.0)
    out = psd.copy()
    out[:, :size // 2] = lo + (hi - lo) * model[:, :size // 2]
    return np.clip(out, lo, hi)


def plot_rotational_average(ax, rows):
    """CTFFIND-style 1D plot on ``ax`` from an ``_avrot.txt``'s 6 rows: the astigmatism-corrected rotational
    average of the PSD and the fitted CTF² (rescaled to it), their windowed correlation and its 2σ noise level."""
    s, epa, model, cc, two_sigma = rows[0], rows[2], rows[3], rows[4], rows[5]
    filled = epa != 0
    lo, hi = (np.percentile(epa[filled], [2, 98]) if filled.any() else (-1.0, 1.0))
    ax.plot(s, epa, lw=0.8, label="rotational average (astigmatism corrected)")
    ax.plot(s, lo + (hi - lo) * model, lw=0.8, label="fitted CTF²")
    ax.plot(s, cc * (hi - lo) / 2 + hi + (hi - lo) * 0.6, lw=0.8, label="correlation (shifted up)")
    ax.plot(s, two_sigma * (hi - lo) / 2 + hi + (hi - lo) * 0.6, "k:", lw=0.8, label="2σ of the correlation")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_yticks([])
    ax.legend(fontsize=7, loc="lower left")


def plot_tilt_thickness(ax, records):
    """Specimen tilt angle (degrees) and ice thickness (Å, right axis) per micrograph on ``ax``, from the records'
    optional ``tilt_angle_deg`` / ``ice_thickness_A`` (``--fit-tilt`` / ``--fit-thickness``); the panel is left
    empty when neither was fitted."""
    idx = np.arange(len(records))
    tilt = np.array([r.get("tilt_angle_deg", np.nan) for r in records], dtype=float)
    thick = np.array([r.get("ice_thickness_A", np.nan) for r in records], dtype=float)
    if not (np.isfinite(tilt).any() or np.isfinite(thick).any()):
        ax.axis("off")
        return
    handles = []
    if np.isfinite(thick).any():
        ax2 = ax.twinx() if np.isfinite(tilt).any() else ax
        handles.append(ax2.bar(idx, np.nan_to_num(thick), width=0.5, alpha=0.4, color="C3",
                               label="ice thickness (Å; 0 = no node seen)"))
        ax2.set_ylabel("ice thickness (Å)")
    if np.isfinite(tilt).any():  # the line over the bars
        handles += ax.plot(idx, tilt, "o-", ms=4, color="C2", label="tilt angle (°)")
        ax.set_ylabel("tilt angle (°)")
        ax.set_zorder(2)
        ax.patch.set_visible(False)
    ax.set_xlabel("micrograph")
    ax.legend(handles=handles, fontsize=8)
    ax.set_title("specimen tilt and thickness (CTFFIND5-style)", fontsize=9)


def plot_defocus_summary(records, path=None):
    """Four panels from ``records`` (dicts with micrograph, defocus_u_A, defocus_v_A, defocus_angle_deg,
    resolution_A, flagged, and optionally psd (MRC path), psd_sampling_A, ctf_image (the program's fitted CTF²
    beside the PSD, MRC path), phase_shift_deg, defocus_sigma_A, avrot (``_avrot.txt`` path)): PSD|CTF² (PSD only
    without ctf_image) of the first record and its 1D rotational average with the fitted CTF², U and V per micrograph with
    ±2σ bars (flagged ones marked), histogram of fit resolution, list of flagged micrographs (and the phase
    shifts when any), and :func:`plot_tilt_thickness` when the records have a tilt or thickness. Saves to
    ``path``; returns the figure."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    first = next((r for r in records if r.get("psd")), None)
    ax = axes[0, 0]
    if first is not None:
        psd, _ = read_mrc(first["psd"])
        img = psd_with_ctf(psd, read_mrc(first["ctf_image"])[0]) if first.get("ctf_image") else psd
        ax.imshow(img, cmap="gray", origin="lower")
        title = ("fitted CTF² | PSD (%s)" if first.get("ctf_image") else "PSD (%s)") % first["micrograph"].split("/")[-1]
        if first.get("phase_shift_deg"):
            title += ", phase shift %.0f°" % first["phase_shift_deg"]
        ax.set_title(title, fontsize=9)
    ax.axis("off")
    ax = axes[0, 1]
    if first is not None and first.get("avrot"):
        plot_rotational_average(ax, np.loadtxt(first["avrot"]))
        ax.set_title("1D rotational average (%s)" % first["micrograph"].split("/")[-1], fontsize=9)
    else:
        ax.axis("off")
    idx = np.arange(len(records))
    u = np.array([r["defocus_u_A"] for r in records])
    v = np.array([r["defocus_v_A"] for r in records])
    flagged = np.array([bool(r["flagged"]) for r in records])
    ax = axes[0, 2]
    sigma = np.array([r.get("defocus_sigma_A") or np.nan for r in records], dtype=float)
    ax.plot(idx, u, "o-", ms=3, label="defocus U")
    ax.plot(idx, v, "s-", ms=3, label="defocus V")
    if np.isfinite(sigma).any():
        ax.errorbar(idx, 0.5 * (u + v), yerr=2 * sigma, fmt="none", ecolor="k", capsize=2,
                    label="±2σ (mean defocus)")
    if flagged.any():
        ax.plot(idx[flagged], u[flagged], "rx", ms=9, label="flagged")
    ax.set_xlabel("micrograph")
    ax.set_ylabel("defocus (Å)")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    res = np.array([r["resolution_A"] for r in records], dtype=float)
    ax.hist(res[np.isfinite(res)], bins=20)
    ax.set_xlabel("fit resolution (Å)")
    ax.set_ylabel("micrographs")
    plot_tilt_thickness(axes[1, 2], records)
    ax = axes[1, 1]
    ax.axis("off")
    names = [r["micrograph"].split("/")[-1] for r, f in zip(records, flagged) if f]
    text = "flagged (CNN and fit disagree, or low figure of merit): %d\n" % len(names) + "\n".join(names[:20])
    phases = [r.get("phase_shift_deg") or 0.0 for r in records]
    if any(phases):
        text += "\n\nphase shift (°): " + ", ".join("%.0f" % p for p in phases[:20])
    ax.text(0, 1, text, va="top", fontsize=8, family="monospace")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=100)
    return fig


def ctf_records(ctfSet):
    """Records for :func:`plot_defocus_summary` from a SetOfCTF of :class:`DeepCryoProtDeepDefocus`."""
    records = []
    extras = {CTF_TILT_ANGLE_ATTR: "tilt_angle_deg", CTF_THICKNESS_ATTR: "ice_thickness_A"}
    for ctf in ctfSet.iterItems(orderBy="id"):
        psd = ctf.getPsdFile()
        records.append(dict(
            {key: getattr(ctf, attr).get() for attr, key in extras.items() if hasattr(ctf, attr)},
            micrograph=ctf.getMicrograph().getFileName() if ctf.getMicrograph() else str(ctf.getObjId()),
            defocus_u_A=ctf.getDefocusU(), defocus_v_A=ctf.getDefocusV(), defocus_angle_deg=ctf.getDefocusAngle(),
            resolution_A=ctf.getResolution(), phase_shift_deg=ctf.getPhaseShift() or 0.0,
            defocus_sigma_A=getattr(ctf, CTF_SIGMA_ATTR).get() if hasattr(ctf, CTF_SIGMA_ATTR) else None,
            avrot=getattr(ctf, CTF_AVROT_ATTR).get() if hasattr(ctf, CTF_AVROT_ATTR) else None,
            ctf_image=getattr(ctf, CTF_MODEL_IMAGE_ATTR).get() if hasattr(ctf, CTF_MODEL_IMAGE_ATTR) else None,
            flagged=bool(getattr(ctf, FLAG_ATTR).get())
            if hasattr(ctf, FLAG_ATTR) else False,
            psd=psd, psd_sampling_A=read_mrc_header(psd)[1] if psd else None))
    return records


class DeepCryoDefocusViewer(Viewer):
    """PSD with the fitted CTF, 1D rotational average, defocus per micrograph with ±2σ, fit-resolution
    histogram, flagged micrographs; and pwem's CTF table (PSD thumbnails, sortable columns)."""
    _environments = [DESKTOP_TKINTER]
    _targets = [DeepCryoProtDeepDefocus]
    _name = "deep defocus viewer"

    def _visualize(self, obj, **kwargs):
        ctfs = getattr(obj, "outputCTF", None)
        if ctfs is None:
            return []
        path = obj._getExtraPath("defocus_summary.png")
        plt.close(plot_defocus_summary(ctf_records(ctfs), path))
        from pyworkflow.gui.plotter import Plotter
        plotter = Plotter(windowTitle="deep micrograph defocus")
        ax = plotter.createSubPlot("deep micrograph defocus", "", "")
        ax.imshow(plt.imread(path))
        ax.axis("off")
        from pwem.viewers.views import CtfView
        # pwem's CTF table: PSD thumbnails, defocus, resolution, sortable columns (as for CTFFIND's output)
        return [plotter, CtfView(self.getProject(), ctfs)]
