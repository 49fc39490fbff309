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
"""Viewer of DeepCryoProtReconstruct: the map and its half maps, in ChimeraX when Scipion's ChimeraX plugin is
installed, as central sections otherwise (:mod:`deepcryo.viewers.volumes`)."""
import pyworkflow.protocol.params as params
from pwem.viewers import EmProtocolViewer

from deepcryo.constants import OUTPUT_VOLUME
from deepcryo.protocols import DeepCryoProtReconstruct
from deepcryo.viewers.volumes import addVolumeDisplayParam, show_map_and_half_maps


class DeepCryoReconstructViewer(EmProtocolViewer):
    """The reconstructed map and its half maps (ChimeraX or central sections)."""
    _label = "viewer reconstruct"
    _targets = [DeepCryoProtReconstruct]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        addVolumeDisplayParam(form)
        form.addParam("doShowMaps", params.LabelParam, label="Map and half maps")

    def _getVisualizeDict(self):
        return {"doShowMaps": self._showMaps}

    def _showMaps(self, paramName=None):
        volume = getattr(self.protocol, OUTPUT_VOLUME, None)
        if volume is None:
            return [self.errorMessage("No map yet.")]
        return show_map_and_half_maps(volume, self.protocol._getExtraPath("chimerax_maps.cxc"),
                                      self.displayVolumes.get())
