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
"""Map reconstruction from aligned particles by direct Fourier inversion (``deepcryo.core.reconstruct``)."""

import pyworkflow.protocol.params as params
from pyworkflow.constants import BETA
from pyworkflow.utils import Message
from pwem.objects import FSC, Volume
from pwem.protocols import ProtReconstruct3D

from deepcryo.constants import DEFAULT_DIAMETER_BOX_FRACTION, OUTPUT_FSC, OUTPUT_VOLUME, SYMMETRY_HELP
from deepcryo.convert import fscResolution, readFscStar
from deepcryo.protocols.protocol_base import DeepCryoProtBase, addGpuParams
from deepcryo.protocols.validation import particleErrors, symmetryErrors


class DeepCryoProtReconstruct(DeepCryoProtBase, ProtReconstruct3D):
    """Reconstructs a 3D map from particles with CTF and 3D alignment (angles and shifts).

    Each particle image is CTF-multiplied and inserted into a padded Fourier grid at the central
    slice of its orientation (and of every symmetry copy); the map is the CTF²-weighted average
    (direct Fourier inversion, as relion_reconstruct). Optionally two half maps are reconstructed
    from independent halves of the particles, and their Fourier shell correlation (FSC) gives the
    resolution (0.143 threshold).
    """
    _label = "reconstruct"
    _devStatus = BETA
    _possibleOutputs = {OUTPUT_VOLUME: Volume, OUTPUT_FSC: FSC}

    # --------------------------- DEFINE param functions --------------------------------------------
    def _defineParams(self, form):
        form.addSection(label=Message.LABEL_INPUT)
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles",
                      pointerCondition="hasAlignmentProj", important=True, label="Input particles",
                      help="Particles with CTF and 3D alignment (Euler angles and shifts), for "
                           "example the output of a 3D refinement.")
        form.addParam("symmetryGroup", params.StringParam, default="c1", label="Symmetry group",
                      help=SYMMETRY_HELP)
        form.addParam("maxResolution", params.FloatParam, default=0.0, validators=[params.GE(0)],
                      label="Maximum resolution (Å)",
                      help="Highest resolution inserted into the map, in Å. 0: all frequencies, "
                           "up to Nyquist (twice the pixel size).")
        form.addParam("doHalfMaps", params.BooleanParam, default=True,
                      label="Compute half maps and FSC?",
                      help="Also reconstruct two half maps, each from one half of the particles, and "
                           "their FSC. The halves are the particles' random subsets when they have "
                           "them (e.g. from a RELION refinement), otherwise a random split.")
        form.addParam("maskDiameter", params.FloatParam, default=0.0, validators=[params.GE(0)],
                      condition="doHalfMaps", label="Mask diameter (Å)",
                      help="Diameter of the particle, in Å: the FSC of the half maps is measured inside a soft "
                           "sphere of this diameter and corrected for the mask by phase randomisation, as "
                           "relion_postprocess does, so the solvent's noise around the particle does not lower "
                           "the resolution. 0: no mask, the FSC of the whole box. The wizard draws it on the "
                           "particles (%d%% of their box is the usual particle size)."
                           % round(100 * DEFAULT_DIAMETER_BOX_FRACTION))
        addGpuParams(form, gpuHelp="The one GPU to use, e.g. 0.",
                     useGpuHelp="Reconstruct on a CUDA GPU instead of the CPU threads.")
        form.addParallelSection(threads=4, mpi=0)

    # --------------------------- INSERT steps functions --------------------------------------------
    def _insertAllSteps(self):
        self._createFilenameTemplates()
        self._insertEngineSteps(self.reconstructStep)

    def _createFilenameTemplates(self):
        self._updateFilenamesDict({
            "input_star": self._inputParticlesStar(),
            "map": self._getExtraPath("map.mrc"),
            "half1": self._getExtraPath("map_half1.mrc"),
            "half2": self._getExtraPath("map_half2.mrc"),
            "fsc": self._getExtraPath("map_fsc.star"),
        })

    # --------------------------- STEPS functions ---------------------------------------------------
    def reconstructStep(self):
        args = ["--particles", self._getFileName("input_star"), "--output", self._getFileName("map"),
                "--symmetry", self.symmetryGroup.get().strip(), "--threads", self.numberOfThreads.get()]
        if self.maxResolution.get() > 0:
            args += ["--max-resolution", self.maxResolution.get()]
        if self.doHalfMaps:
            args.append("--halves")
            if self.maskDiameter.get() > 0:
                args += ["--mask-diameter", self.maskDiameter.get()]
        if self.usesGpu():
            args += self._deviceArgs()
        self._runProgram("core.reconstruct", args)

    def createOutputStep(self):
        particles = self.inputParticles.get()
        volume = Volume()
        volume.setFileName(self._getFileName("map"))
        volume.setSamplingRate(particles.getSamplingRate())
        outputs = {OUTPUT_VOLUME: volume}
        if self.doHalfMaps:
            volume.setHalfMaps([self._getFileName("half1"), self._getFileName("half2")])
            outputs[OUTPUT_FSC] = readFscStar(self._getFileName("fsc"), label="Half maps FSC")
        self._defineOutputs(**outputs)
        for output in outputs.values():
            self._defineSourceRelation(self.inputParticles, output)

    # --------------------------- INFO functions ----------------------------------------------------
    def _validate(self):
        errors = []
        particles = self.inputParticles.get()
        if particles is not None:
            errors += particleErrors(particles, "The input particles have no CTF: estimate the CTF of their "
                                     "micrographs before extracting them, or import particles with CTF.")
            if not particles.hasAlignmentProj():
                errors.append("The input particles have no 3D alignment (angles and shifts): use the "
                              "output of a 3D refinement or alignment.")
            sr = particles.getSamplingRate()
            if 0 < self.maxResolution.get() < 2 * sr:
                errors.append("Maximum resolution %.2f Å is beyond Nyquist (%.2f Å for %.3f Å/px); use 0 "
                              "for Nyquist." % (self.maxResolution.get(), 2 * sr, sr))
            if self.doHalfMaps and particles.getSize() == 1:
                errors.append("Half maps need at least 2 particles.")
            box = particles.getXDim() or 0
            if self.doHalfMaps and sr and box and self.maskDiameter.get() > 1.5 * box * sr:
                errors.append("Mask diameter %.1f Å is larger than 1.5 × the box (%.1f Å); 0 measures the FSC of "
                              "the whole box." % (self.maskDiameter.get(), box * sr))
            if self.doHalfMaps and sr and 0 < self.maskDiameter.get() < 8 * sr:
                errors.append("Mask diameter %.1f Å is below 8 pixels (%.1f Å): nothing of the particle would be "
                              "left inside its soft edge." % (self.maskDiameter.get(), 8 * sr))
        errors += symmetryErrors(self.symmetryGroup.get())
        errors += self._oneGpuErrors("The reconstruction")
        return errors

    def _summary(self):
        if not hasattr(self, OUTPUT_VOLUME):
            return ["Output map not ready yet."]
        summary = ["Map reconstructed from %d particles with symmetry %s."
                   % (self.inputParticles.get().getSize(), self.symmetryGroup.get())]
        if hasattr(self, OUTPUT_FSC):
            where = ("in a %.0f Å sphere, corrected by phase randomisation" % self.maskDiameter.get()
                     if self.maskDiameter.get() > 0 else "unmasked")
            summary.append("Half-map FSC resolution (%s; the last shell above the threshold, as RELION "
                           "reports): %.2f Å (FSC 0.143), %.2f Å (FSC 0.5)."
                           % (where, self._fscResolution(0.143), self._fscResolution(0.5)))
        return summary

    def _fscResolution(self, threshold):
        return fscResolution(getattr(self, OUTPUT_FSC), getattr(self, OUTPUT_VOLUME).getSamplingRate(), threshold)

    def _methods(self):
        if not hasattr(self, OUTPUT_VOLUME):
            return []
        limit = ("%.2f Å" % self.maxResolution.get()) if self.maxResolution.get() > 0 else "Nyquist"
        methods = ["A 3D map (%s) was reconstructed with deepcryo from %d particles of %s at their given orientations "
                   "and shifts, by CTF-weighted direct Fourier inversion ([Vilas2022]) as relion_reconstruct does "
                   "([Scheres2012a]), imposing %s symmetry with RELION's symmetry operators ([Zivanov2018]) and using "
                   "frequencies up to %s."
                   % (self.getObjectTag(OUTPUT_VOLUME), self.inputParticles.get().getSize(),
                      self.getObjectTag("inputParticles"), self.symmetryGroup.get(), limit)]
        if hasattr(self, OUTPUT_FSC):
            where = ("in a soft sphere of %.0f Å diameter, corrected by phase randomisation ([Chen2013]) as "
                     "relion_postprocess does" % self.maskDiameter.get() if self.maskDiameter.get() > 0 else "unmasked")
            methods.append("Two half maps were reconstructed from independent halves of the particles; their "
                           "Fourier shell correlation (%s, %s) reaches the 0.143 threshold at %.2f Å."
                           % (self.getObjectTag(OUTPUT_FSC), where, self._fscResolution(0.143)))
        return methods

    def _citations(self):
        return ["Vilas2022", "Scheres2012a", "Zivanov2018"] + (["Chen2013"] if self.maskDiameter.get() > 0 else [])
