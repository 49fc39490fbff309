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
"""Viewer of DeepCryoProtSwiftAlign: angular distribution and score/confidence histograms.

The plots are plain functions of arrays (:func:`plotAngularDistribution`, :func:`plotScoreHistograms`)
returning an ``EmPlotter``, usable headless (Agg backend) as well as from the viewer.
"""
import numpy as np

import pyworkflow.protocol.params as params
from pwem.viewers import EmPlotter, EmProtocolViewer

from deepcryo.constants import OUTPUT_PARTICLES
from deepcryo.convert import posesFromMatrices
from deepcryo.protocols import DeepCryoProtSwiftAlign


def plotAngularDistribution(angles_deg, title="Angular distribution"):
    """Mollweide-like scatter of viewing directions: rot (deg) vs tilt (deg), one dot per particle."""
    plotter = EmPlotter(windowTitle=title)
    ax = plotter.createSubPlot(title, "rot (deg)", "tilt (deg)")
    angles_deg = np.asarray(angles_deg)
    ax.scatter(np.mod(angles_deg[:, 0] + 180.0, 360.0) - 180.0, angles_deg[:, 1], s=3, alpha=0.5)
    ax.set_xlim(-180, 180)
    ax.set_ylim(180, 0)
    return plotter


def plotScoreHistograms(scores, confidences, nbins=50):
    """Histograms of the correlation scores and of the confidences (score gaps)."""
    plotter = EmPlotter(x=1, y=2, windowTitle="SwiftAlign scores")
    plotter.createSubPlot("Correlation score", "score", "particles")
    plotter.plotHist(np.asarray(scores), nbins=nbins)
    plotter.createSubPlot("Confidence (score gap)", "gap", "particles")
    plotter.plotHist(np.asarray(confidences), nbins=nbins)
    return plotter


class DeepCryoSwiftAlignViewer(EmProtocolViewer):
    """Angular distribution and score histograms of a swiftalign run."""
    _label = "viewer swiftalign"
    _targets = [DeepCryoProtSwiftAlign]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        form.addParam("doShowAngles", params.LabelParam, label="Angular distribution")
        form.addParam("doShowScores", params.LabelParam, label="Score and confidence histograms")

    def _getVisualizeDict(self):
        return {"doShowAngles": self._showAngles, "doShowScores": self._showScores}

    def _particles(self):
        return getattr(self.protocol, OUTPUT_PARTICLES, None)

    def _showAngles(self, paramName=None):
        parts = self._particles()
        if parts is None:
            return [self.errorMessage("No output particles yet.")]
        mats = np.stack([p.getTransform().getMatrix() for p in parts.iterItems()])
        return [plotAngularDistribution(posesFromMatrices(mats)[0])]

    def _showScores(self, paramName=None):
        parts = self._particles()
        if parts is None:
            return [self.errorMessage("No output particles yet.")]
        values = np.array([(p._dcSwiftScore.get(), p._dcSwiftConfidence.get()) for p in parts.iterItems()])
        return [plotScoreHistograms(values[:, 0], values[:, 1])]
