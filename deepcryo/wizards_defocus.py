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
"""Wizard of 'deep micrograph defocus': the fit's resolution band picked on a micrograph's PSD, as CTFFIND's
(pwem's :class:`~pwem.wizards.wizard.CtfWizard` and its ring dialog; the previews are deepcryo's own PSD, the one
the fit uses, so no Xmipp is needed). Self-contained: to be merged into the plugin's ``wizards`` module."""
import numpy as np
import pyworkflow.gui.dialog as dialog
from pwem.wizards.wizard import CtfDialog, CtfWizard

from deepcryo.core.mrc import read_mrc
from deepcryo.defocus.psd import compute_psd
from deepcryo.protocols.protocol_defocus import DeepCryoProtDeepDefocus


def band_to_frequencies(low_A, high_A, pixel_size_A):
    """Resolution band (Å) → (low, high) digital frequencies (cycles/px of the micrograph, ≤ 0.5)."""
    return min(0.5, pixel_size_A / low_A), min(0.5, pixel_size_A / high_A)


def frequencies_to_band(low_freq, high_freq, pixel_size_A):
    """Digital frequencies (cycles/px) → resolution band (Å), rounded to 0.1 Å."""
    return round(pixel_size_A / max(low_freq, 1e-3), 1), round(pixel_size_A / max(high_freq, 1e-3), 1)


def preview_images(path, pixel_size_A, size_px=256):
    """(micrograph binned to ≤ ``size_px``, its PSD over the whole micrograph's Nyquist (``size_px``²)), from
    :func:`deepcryo.defocus.psd.compute_psd`, the function the fit uses."""
    image, _ = read_mrc(path)
    image = np.asarray(image, dtype=np.float32).reshape(image.shape[-2:])
    step = max(1, int(np.ceil(max(image.shape) / size_px)))
    h, w = (image.shape[0] // step) * step, (image.shape[1] // step) * step
    binned = image[:h, :w].reshape(h // step, step, w // step, step).mean(axis=(1, 3))
    psd = compute_psd(image, pixel_size_A, (pixel_size_A,), size_px)[0, 0].numpy()
    return binned, psd


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
