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
"""Viewer of DeepCryoProtSwiftRefine: the final map and half maps (ChimeraX when its Scipion plugin is installed,
central sections otherwise), FSC per iteration, resolution and sampling per iteration, pose changes, fraction of
particles kept, angular distribution.

The figures come from plain functions of the refinement folder (:func:`iteration_fsc_curves`,
:func:`plot_refine_history`), usable headless (Agg) as well as from the viewer.
"""
import os

import matplotlib.pyplot as plt
import numpy as np

import pyworkflow.protocol.params as params
from pwem.viewers import EmProtocolViewer

from deepcryo.constants import OUTPUT_VOLUME
from deepcryo.core.particles import read_particles
from deepcryo.core.star import read_star
from deepcryo.protocols import DeepCryoProtSwiftRefine
from deepcryo.swiftalign.layout import RefineLayout
from deepcryo.viewers.plots import plot_fsc_curves
from deepcryo.viewers.viewer_swiftalign import plotAngularDistribution
from deepcryo.viewers.volumes import addVolumeDisplayParam, show_map_and_half_maps


def iteration_fsc_curves(refine_dir, class_number=None):
    """``{"iteration N": curve}`` from ``it###[_class###]_fsc.star`` of a refinement folder, in order."""
    curves = {}
    for it, path in RefineLayout(refine_dir).iteration_fsc_paths(class_number):
        table = next(iter(read_star(path).values()))
        curves["iteration %d" % it] = np.asarray(table["rlnFourierShellCorrelation"], dtype=np.float64)
    return curves


def plot_refine_history(history, path=None):
    """2×2 figure of a refinement's history (list of per-iteration dicts): resolution (Å), angular step (°),
    median pose change (°) and fraction of particles kept, against the iteration. Saved to ``path``."""
    its = [h["iteration"] for h in history]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5))
    panels = [("resolution_A", "resolution (Å), masked FSC 0.143,\ncorrected by phase randomisation"),
              ("angular_step_deg", "angular step (°)"),
              ("median_angle_change_deg", "median pose change (°)"), ("fraction_kept", "fraction reconstructed")]
    for ax, (key, label) in zip(axes.ravel(), panels):
        ax.plot(its, [h[key] for h in history], "o-")
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
        ax.set_xticks(its)
    axes[1, 1].set_ylim(0, 1.05)
    for h in history:
        if h["mode"] == "global":
            axes[0, 0].axvspan(h["iteration"] - 0.5, h["iteration"] + 0.5, color="0.9")
    axes[0, 0].set_title("grey: global search")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=100)
    return fig


def _show_png(fig, path, title):
    from pyworkflow.gui.plotter import Plotter
    fig.savefig(path, dpi=100)
    plt.close(fig)
    plotter = Plotter(windowTitle=title)
    ax = plotter.createSubPlot(title, "", "")
    ax.imshow(plt.imread(path))
    ax.axis("off")
    return plotter


class DeepCryoSwiftRefineViewer(EmProtocolViewer):
    """Map and half maps, FSC per iteration, resolution vs iteration, angular distribution, particles kept."""
    _label = "viewer swiftrefine"
    _targets = [DeepCryoProtSwiftRefine]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        form.addParam("classNumber", params.IntParam, default=1, label="Class",
                      help="Class whose maps and FSC curves are shown (multi-reference runs).")
        addVolumeDisplayParam(form)
        form.addParam("doShowMaps", params.LabelParam, label="Final map and half maps")
        form.addParam("doShowFsc", params.LabelParam, label="FSC per iteration")
        form.addParam("doShowHistory", params.LabelParam,
                      label="Resolution, sampling, pose change and particles kept per iteration")
        form.addParam("doShowAngles", params.LabelParam, label="Angular distribution (final)")

    def _getVisualizeDict(self):
        return {"doShowMaps": self._showMaps, "doShowFsc": self._showFsc, "doShowHistory": self._showHistory,
                "doShowAngles": self._showAngles}

    def _refineDir(self):
        return self.protocol._getExtraPath("refine")

    def _finalVolume(self):
        """The output map of the class shown (None before the end)."""
        if hasattr(self.protocol, OUTPUT_VOLUME):
            return getattr(self.protocol, OUTPUT_VOLUME)
        classes = getattr(self.protocol, "outputClasses", None)
        if classes is None or self.classNumber.get() not in [c.getObjId() for c in classes]:
            return None
        return classes[self.classNumber.get()].getRepresentative()

    def _showMaps(self, paramName=None):
        volume = self._finalVolume()
        if volume is None:
            return [self.errorMessage("No final map yet (or no class %d)." % self.classNumber.get())]
        return show_map_and_half_maps(volume, self.protocol._getExtraPath("chimerax_maps.cxc"),
                                      self.displayVolumes.get())

    def _showFsc(self, paramName=None):
        multi = len(self.protocol.inputVolumes) > 1
        curves = iteration_fsc_curves(self._refineDir(), self.classNumber.get() if multi else None)
        if not curves:
            return [self.errorMessage("No iteration finished yet.")]
        px = self.protocol.inputParticles.get().getSamplingRate()
        fig = plot_fsc_curves(curves, px, title="Half-map FSC per iteration")
        return [_show_png(fig, self.protocol._getExtraPath("fsc_iterations.png"), "FSC per iteration")]

    def _showHistory(self, paramName=None):
        history = self.protocol.history()
        if not history:
            return [self.errorMessage("No iteration finished yet.")]
        fig = plot_refine_history(history)
        return [_show_png(fig, self.protocol._getExtraPath("refine_history.png"), "Refinement history")]

    def _showAngles(self, paramName=None):
        path = RefineLayout(self._refineDir()).path("particles.star")
        if not os.path.exists(path):
            return [self.errorMessage("No output particles yet.")]
        star = read_particles(path, require_images=False)
        return [plotAngularDistribution(star.angles_deg(), "Angular distribution (%d particles)" % len(star))]

