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
"""deepcryo's wizards (Scipion finds them by the module's name, ``deepcryo.wizards``): they open in the protocol
form, next to the parameter they fill in."""
from pyworkflow.object import PointerList
from pwem.constants import UNIT_ANGSTROM
from pwem.wizards.wizard import ParticleMaskRadiusWizard

from deepcryo.constants import DEFAULT_DIAMETER_BOX_FRACTION
from deepcryo.protocols import DeepCryoProtReconstruct, DeepCryoProtSwiftRefine


def defaultDiameterA(images):
    """The particle diameter (Å) assumed when none is given: ``DEFAULT_DIAMETER_BOX_FRACTION`` × the box side of
    ``images`` (a set of particles or a map; box × pixel size), 0 when it has no box or pixel size."""
    return DEFAULT_DIAMETER_BOX_FRACTION * (images.getXDim() or 0) * (images.getSamplingRate() or 0)


class DeepCryoParticleDiameterWizard(ParticleMaskRadiusWizard):
    """Particle diameter (SwiftRes) or mask diameter (reconstruction), in Å, drawn as a circle on a central slice:
    of the initial map for SwiftRes (of its particles while no map is chosen), of the particles for the
    reconstruction. pwem's mask dialog (as relion's and cistem's wizards) works with a radius: the wizard
    opens it at half the form's diameter, or half the default diameter when the form says 0, and writes twice
    the chosen radius back."""
    _targets = [(DeepCryoProtSwiftRefine, ["particleDiameter"]),
                (DeepCryoProtReconstruct, ["maskDiameter"])]

    @staticmethod
    def _imagesPointer(protocol):
        """The pointer (or list of pointers) to the images the circle is drawn on."""
        maps = getattr(protocol, "inputVolumes", None)
        if maps is not None and any(pointer.get() is not None for pointer in maps):
            return maps
        return protocol.inputParticles

    def _getProvider(self, protocol):
        return self._getListProvider(self._imagesPointer(protocol))

    def startingDiameterA(self, protocol):
        """The diameter (Å) the dialog opens at: the form's value, or :func:`defaultDiameterA` of the images
        when it is 0 (0 when there are no images yet)."""
        paramName = self._getInputProtocol(self._targets, protocol)[0]
        value = getattr(protocol, paramName).get() or 0.0
        if value > 0:
            return value
        pointer = self._imagesPointer(protocol)
        pointers = pointer if isinstance(pointer, PointerList) else [pointer]
        images = next((p.get() for p in pointers if p.get() is not None), None)
        return defaultDiameterA(images) if images is not None else 0.0

    def show(self, form, *params):
        paramName = self._getInputProtocol(self._targets, form.protocol)[0]
        ParticleMaskRadiusWizard.show(self, form, self.startingDiameterA(form.protocol) / 2, paramName,
                                      units=UNIT_ANGSTROM)

    def setVar(self, form, label, value):
        form.setVar(label, 2 * value)
