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
form, next to the parameter they fill in. The particle or mask diameter drawn on a map or the particles (as
relion's and cistem's), and the deep defocus fit's resolution band picked on a micrograph's PSD, as CTFFIND's
(pwem's :class:`~pwem.wizards.wizard.CtfWizard` and its ring dialog; the previews are deepcryo's own PSD, the
one the fit uses, so no Xmipp is needed)."""
import os
import shlex
import subprocess
import tempfile

import numpy as np
import pyworkflow.gui.dialog as dialog
from pyworkflow.object import PointerList
from pwem.constants import UNIT_ANGSTROM
from pwem.wizards.wizard import CtfDialog, CtfWizard, ParticleMaskRadiusWizard

from deepcryo import Plugin
from deepcryo.constants import DEFAULT_DIAMETER_BOX_FRACTION
from deepcryo.core.mrc import read_mrc
from deepcryo.protocols import DeepCryoProtDeepDefocus, DeepCryoProtReconstruct, DeepCryoProtSwiftRefine


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


def band_to_frequencies(low_A, high_A, pixel_size_A):
    """Resolution band (Å) → (low, high) digital frequencies (cycles/px of the micrograph, ≤ 0.5)."""
    return min(0.5, pixel_size_A / low_A), min(0.5, pixel_size_A / high_A)


def frequencies_to_band(low_freq, high_freq, pixel_size_A):
    """Digital frequencies (cycles/px) → resolution band (Å), rounded to 0.1 Å."""
    return round(pixel_size_A / max(low_freq, 1e-3), 1), round(pixel_size_A / max(high_freq, 1e-3), 1)


def preview_images(path, pixel_size_A, size_px=256):
    """(micrograph binned to ≤ ``size_px``, its PSD over the whole micrograph's Nyquist (``size_px``²)). The PSD
    is :func:`deepcryo.defocus.psd.compute_psd`, the function the fit uses, computed by the programs' Python
    (``python -m deepcryo.defocus psd`` with ``DEEPCRYO_PYTHON``, as Xmipp's wizards run Xmipp programs):
    Scipion's own Python needs no torch. Raises RuntimeError with the program's error line when it fails."""
    image, _ = read_mrc(path)
    image = np.asarray(image, dtype=np.float32).reshape(image.shape[-2:])
    step = max(1, int(np.ceil(max(image.shape) / size_px)))
    h, w = (image.shape[0] // step) * step, (image.shape[1] // step) * step
    binned = image[:h, :w].reshape(h // step, step, w // step, step).mean(axis=(1, 3))
    with tempfile.TemporaryDirectory(prefix="deepcryo_psd_") as tmp:
        output = os.path.join(tmp, "psd.mrc")
        command = Plugin.getProgram("defocus", "psd", "--micrograph", shlex.quote(path), "--pixel-size",
                                    repr(float(pixel_size_A)), "--size", int(size_px), "--output", output)
        done = subprocess.run(command, shell=True, env=Plugin.getEnviron(), capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["exit status %d" % done.returncode]
            raise RuntimeError(lines[-1])
        psd, _ = read_mrc(output)
    return binned, psd.reshape(psd.shape[-2:])


class DeepCryoPsdBandDialog(CtfDialog):
    """pwem's CTF ring dialog with deepcryo's micrograph and PSD previews."""

    def _itemSelected(self, obj):
        self.lastObj = obj
        try:
            mic, psd = preview_images(obj.getFileName(), obj.getSamplingRate(), self.dim)
        except Exception as exc:  # an unreadable micrograph: say so, keep the dialog
            dialog.showError("Micrograph", "Cannot read %s: %s" % (obj.getFileName(), exc), self)
            return
        self.preview.updateData(mic)
        self.rightPreview.updateData(psd)
        self.manageMaskVals()

    def showValues(self, var2set, labSlider):
        """The slider's frequency in cycles/px and, always, in Å (pwem shows only px at 1 Å/px)."""
        freq = max(labSlider.slider.get(), 1e-4)
        var2set.set("{:.3f} 1/px | {:5.1f} Å".format(freq, self.firstItem.getSamplingRate() / freq))


class DeepCryoDefocusBandWizard(CtfWizard):
    """Resolution band of the fit, picked on the PSD of the input micrographs (rings: the band's ends)."""
    _targets = [(DeepCryoProtDeepDefocus, ["lowRes", "highRes"])]

    def _getProvider(self, protocol):
        return self._getListProvider(protocol.inputMicrographs)

    def show(self, form, *params):
        protocol = form.protocol
        provider = self._getProvider(protocol)
        if provider is None:
            dialog.showWarning("Empty input", "Select the input micrographs first", form.root)
            return
        pixel_size_A = protocol.inputMicrographs.get().getSamplingRate()
        low, high = band_to_frequencies(protocol.lowRes.get(), protocol.highRes.get(), pixel_size_A)
        d = DeepCryoPsdBandDialog(form.root, provider, lf=low, hf=high, showInAngstroms=True)
        if d.resultYes():
            low_A, high_A = frequencies_to_band(d.getLowFreq(), d.getHighFreq(), pixel_size_A)
            form.setVar("lowRes", low_A)
            form.setVar("highRes", high_A)
