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
"""Deep micrograph defocus (``python -m deepcryo.defocus``): streaming CTF estimation and training."""
import os

import pyworkflow.protocol.params as params
from pyworkflow.constants import BETA
from pyworkflow.protocol.constants import STEPS_PARALLEL
from pyworkflow.object import Boolean, Integer
from pyworkflow.utils import Message
from pwem.objects import CTFModel, EMFile, SetOfCTF
from pwem.protocols import EMProtocol, ProtCTFMicrographs

from deepcryo.constants import OUTPUT_CTF
from deepcryo.convert import (ctfRowToModel, readCtfStar, writeCtfLabelsStar, writeCtfRowStar,
                              writeMicrographListStar)
from deepcryo.protocols.protocol_base import DeepCryoProtBase, addGpuParams
from deepcryo.protocols.validation import acquisitionErrors, defocusModelErrors

FLAG_ATTR = "_deepcryo_flagged"
OUTPUT_MODEL = "outputModel"


class DeepCryoProtDeepDefocus(DeepCryoProtBase, ProtCTFMicrographs):
    """Estimates the CTF (defocus U/V, astigmatism angle, optional phase shift) of every micrograph as
    it arrives: a small CNN reads background-subtracted PSDs at 1, 2 and 3 Å/px and gives a first guess,
    which a physics fit of the 2D CTF to the PSD refines over a resolution band. The output SetOfCTF
    carries the fit resolution, a figure of merit (correlation of the PSD with CTF²), the defocus's standard
    error (Å, ``_deepcryo_defocusSigma``), the phase shift when fitted, the PSD file, the 1D rotational average
    with the fitted CTF (``_deepcryo_ctfAvrot``, CTFFIND's ``_avrot.txt`` layout) and a flag when the CNN and
    the fit disagree. Micrographs are processed in batches, each exactly once;
    unusable ones (unreadable, NaN, too small) are reported in the log and skipped.
    """
    _label = "deep micrograph defocus"
    _devStatus = BETA
    _possibleOutputs = {OUTPUT_CTF: SetOfCTF}
    recalculate = Boolean(False, objDoStore=False)
    stepsExecutionMode = STEPS_PARALLEL  # (as ProtCTFMicrographs): batches run side by side

    # --------------------------- DEFINE param functions --------------------------------------------
    def _defineParams(self, form):
        form.addSection(label=Message.LABEL_INPUT)
        form.addParam("inputMicrographs", params.PointerParam, pointerClass="SetOfMicrographs", important=True,
                      label="Input micrographs",
                      help="Micrographs (may be a stream). Voltage, Cs and amplitude contrast come from "
                           "their acquisition, the pixel size from the set.")
        form.addParam("trainedModel", params.PointerParam, pointerClass="EMFile", allowsNull=True,
                      label="Trained model (optional)",
                      help="A model from 'deep micrograph defocus training'. Empty: the model shipped "
                           "with deepcryo (trained on simulated micrographs, 200/300 kV, 0.5-2.5 Å/px, "
                           "defocus 0.3-5 µm).")
        form.addParam("doRefine", params.BooleanParam, default=True, label="Refine with the CTF fit?",
                      help="Fit the 2D CTF to the PSD from the CNN's guess (accurate). No: CNN only.")
        line = form.addLine("Resolution band (Å)", expertLevel=params.LEVEL_ADVANCED,
                            help="Frequencies used by the fit, in Å (CTFFIND's 'resolution range'): from the "
                                 "first Thon ring to where the rings fade.")
        line.addParam("lowRes", params.FloatParam, default=30.0, label="Lowest")
        line.addParam("highRes", params.FloatParam, default=5.0, label="Highest")
        line = form.addLine("Defocus search range (Å)", expertLevel=params.LEVEL_ADVANCED,
                            help="Mean defocus searched, in Å (positive = underfocus). The CNN's guess is "
                                 "clipped to this range and the fit stays inside it. Highest 0: no limit.")
        line.addParam("minDefocus", params.FloatParam, default=500.0, label="Min")
        line.addParam("maxDefocus", params.FloatParam, default=0.0, label="Max")
        form.addParam("fitPhaseShift", params.BooleanParam, default=False, expertLevel=params.LEVEL_ADVANCED,
                      label="Fit a phase shift?", help="For phase-plate data.")
        form.addParam("fitTilt", params.BooleanParam, default=False, expertLevel=params.LEVEL_ADVANCED,
                      condition="doRefine", label="Estimate the specimen tilt?",
                      help="As CTFFIND5: the defocus of 512 px tiles, fitted as a plane over the micrograph, gives "
                           "the tilt angle and axis (degrees; CTFFIND5's convention: the defocus grows along "
                           "(sin axis, cos axis)), stored as _deepcryo_tiltAngle and _deepcryo_tiltAxis. For "
                           "lamellae and tilted specimens; micrographs under 1024 px are skipped.")
        form.addParam("fitThickness", params.BooleanParam, default=False, expertLevel=params.LEVEL_ADVANCED,
                      condition="doRefine", label="Estimate the ice thickness?",
                      help="As CTFFIND5: the Thon rings fade and come back inverted at 'thickness nodes' whose "
                           "frequencies give the thickness of the specimen (Å, _deepcryo_iceThickness; "
                           "rlnCtfIceThickness in the STAR). Measured up to near Nyquist; 0 means no node was seen "
                           "(thinner than _deepcryo_iceThicknessMin, or rings too weak beyond it). On a tilted "
                           "specimen estimate the tilt too: its defocus range is then taken out, else it reads as "
                           "thickness. Where a node lies inside the defocus fit's band (ice thicker than ~1000 Å "
                           "at 300 kV and 5 Å), the defocus and the tilt are fitted again, automatically, with the "
                           "band ended before it. For thick specimens (lamellae); see benchmarks/RESULTS.md.")
        addGpuParams(form, gpuHelp="The GPU to use, e.g. 0.",
                     useGpuHelp="Estimate on a CUDA GPU (a batch fails with one line if CUDA is not available).")
        self._defineStreamingParams(form)
        form.getParam("streamingBatchSize").setDefault(Integer(8))
        # no threads per program: a batch's program works on one CPU thread (``predict._one_thread_on_cpu``);
        # Scipion threads - 1 batches run side by side, each on its own GPU when GPUs are used
        form.addParallelSection(threads=3, mpi=0)

    # --------------------------- INSERT steps functions --------------------------------------------
    def _insertCtfStep(self, mic, prerequisites, *args):
        return self._insertCtfListStep([mic], prerequisites, *args)

    def _insertCtfListStep(self, micList, prerequisites, *args):
        """One step per batch of micrographs (one program, one model load); it waits for a GPU slot only when
        the user asked for GPUs, so CPU batches run side by side."""
        return self._insertFunctionStep(self.estimateCtfListStep, [mic.getMicName() for mic in micList], *args,
                                        prerequisites=prerequisites, needsGPU=self.usesGpu())

    # --------------------------- STEPS functions ---------------------------------------------------
    def _defineCtfParamsDict(self):
        mics = self.getInputMicrographs()
        self._params = {"samplingRate": mics.getSamplingRate(), "acquisition": mics.getAcquisition()}

    def _estimateCTF(self, mic, *args):
        self._estimateCtfList([mic])

    def _estimateCtfList(self, micList, *args):
        batch = "batch_%06d" % micList[0].getObjId()
        inStar = self._getTmpPath(batch + "_mics.star")
        outStar = self._getExtraPath(batch + "_ctf.star")
        writeMicrographListStar(inStar, micList, self._params["acquisition"], self._params["samplingRate"])
        args = ["--micrographs", inStar, "--output", outStar, "--batch-size", len(micList),
                "--low-resolution", self.lowRes.get(), "--high-resolution", self.highRes.get(),
                "--defocus-min", self.minDefocus.get(), "--threads", 1] + self._deviceArgs()
        if self.maxDefocus.get() > 0:
            args += ["--defocus-max", self.maxDefocus.get()]
        if not self.doRefine:
            args.append("--no-refine")
        if self.fitPhaseShift:
            args.append("--phase-shift")
        if self.doRefine and self.fitTilt:
            args.append("--fit-tilt")
        if self.doRefine and self.fitThickness:
            args.append("--fit-thickness")
        if self.trainedModel.get() is not None:
            args += ["--model", self.trainedModel.get().getFileName()]
        try:
            self._runProgram("defocus", args, "predict")
        except Exception as exc:  # the stream goes on; these micrographs get no CTF
            self.warning("CTF estimation failed for micrographs %s: %s"
                         % ([m.getObjId() for m in micList], str(exc).splitlines()[0] if str(exc) else exc))
            return
        if not os.path.exists(outStar):  # a program that failed in a queue job: Scipion sees no exit status there
            self.warning("CTF estimation failed for micrographs %s: no %s (see the job's log in the run's logs)"
                         % ([m.getObjId() for m in micList], outStar))
            return
        rows = {row["rlnMicrographName"]: row for row in readCtfStar(outStar)}
        for mic in micList:
            row = rows.get(os.path.abspath(mic.getFileName()))
            if row is None:
                self.warning("micrograph %s skipped (see the log above)" % mic.getFileName())
                continue
            writeCtfRowStar(row, self._getMicCtfStar(mic))

    def _getMicCtfStar(self, mic):
        return self._getExtraPath("ctf", "mic_%06d_ctf.star" % mic.getObjId())

    def _createCtfModel(self, mic, updateSampling=False):
        row = readCtfStar(self._getMicCtfStar(mic))[0]  # raises for a skipped micrograph: reported, not output
        ctf = ctfRowToModel(row, CTFModel())
        setattr(ctf, FLAG_ATTR, Boolean(bool(row.get("dcCtfFlagged", 0))))
        ctf.setMicrograph(mic)
        return ctf

    def _createOutputStep(self):
        pass

    # --------------------------- INFO functions ----------------------------------------------------
    def _validate(self):
        errors = []
        mics = self.inputMicrographs.get()
        if mics is not None:
            errors += acquisitionErrors(mics, "Input micrographs")  # pixel size, kV, Cs, empty closed set
        if self.trainedModel.get() is not None:
            errors += defocusModelErrors(self.trainedModel.get().getFileName())
        if not 0 < self.highRes.get() < self.lowRes.get():
            errors.append("The resolution band needs 0 < highest < lowest (Å).")
        if not 0 < self.minDefocus.get() or 0 < self.maxDefocus.get() <= self.minDefocus.get():
            errors.append("The defocus search range needs 0 < min < max (Å), or max 0 for no limit.")
        errors += self._gpuPerStepErrors()
        return errors

    def _summary(self):
        if not hasattr(self, OUTPUT_CTF):
            return ["No CTF estimated yet."]
        ctfs = getattr(self, OUTPUT_CTF)
        flagged = sum(1 for c in ctfs if getattr(c, FLAG_ATTR, Boolean(False)).get())
        return ["CTF estimated for %d micrographs (%d flagged: CNN and fit disagree, or low figure of merit)."
                % (ctfs.getSize(), flagged)]

    def _methods(self):
        mics = self.inputMicrographs.get()
        if mics is None or not hasattr(self, OUTPUT_CTF):
            return []
        ctfs = getattr(self, OUTPUT_CTF)
        network = ("the convolutional network of %s" % self.getObjectTag("trainedModel")
                   if self.trainedModel.get() is not None
                   else "the convolutional network shipped with deepcryo (trained on simulated micrographs)")
        text = ("The contrast transfer function (CTF) of %d micrographs of %s was estimated with deepcryo's deep "
                "micrograph defocus ([MarchanTorres2021]): %s gave a first guess of the defocus from the "
                "background-subtracted power spectra (PSDs) of each micrograph at 1, 2 and 3 Å/px"
                % (ctfs.getSize(), self.getObjectTag("inputMicrographs"), network))
        if self.doRefine:
            text += (", refined by fitting the 2D CTF (defocus U and V, astigmatism angle%s) to the PSD between "
                     "%.1f and %.1f Å" % (" and phase shift" if self.fitPhaseShift else "", self.lowRes.get(),
                                          self.highRes.get()))
        extras = [name for name, on in (("the specimen tilt from the defocus of tiles", self.fitTilt),
                                         ("the ice thickness from the Thon rings' nodes", self.fitThickness))
                  if self.doRefine and on]
        if extras:
            text += ("; %s %s estimated as in CTFFIND5 (Elferich et al. 2024, eLife 13:RP97227)"
                     % (" and ".join(extras), "were" if len(extras) > 1 else "was"))
        text += (". The output %s holds, for each micrograph, the defocus, the fit resolution and a figure of "
                 "merit (correlation of the PSD with the CTF²)." % self.getObjectTag(OUTPUT_CTF))
        return [text]

    def _citations(self):
        return ["MarchanTorres2021"]


class DeepCryoProtDeepDefocusTrain(DeepCryoProtBase, EMProtocol):
    """Trains the deep-defocus CNN (or fine-tunes the shipped one) on micrographs with defocus labels
    from any previous CTF estimation (a SetOfCTF), or on simulated micrographs. The output model is
    used by 'deep micrograph defocus'."""
    _label = "deep micrograph defocus training"
    _devStatus = BETA
    _possibleOutputs = {OUTPUT_MODEL: EMFile}

    def _defineParams(self, form):
        form.addSection(label=Message.LABEL_INPUT)
        form.addParam("useSimulation", params.BooleanParam, default=False, label="Train on simulated micrographs?",
                      help="Yes: simulated micrographs with known CTF. No: your micrographs with a SetOfCTF.")
        form.addParam("inputCTF", params.PointerParam, pointerClass="SetOfCTF", condition="not useSimulation",
                      label="Labels (SetOfCTF)", help="CTF estimation of the micrographs (e.g. CTFFIND, Gctf).")
        form.addParam("numberOfSimulated", params.IntParam, default=2000, condition="useSimulation",
                      label="Number of simulated micrographs")
        form.addParam("fineTune", params.BooleanParam, default=True, label="Fine-tune the shipped model?",
                      help="Start from the shipped weights (fewer examples needed) instead of from scratch.")
        form.addParam("epochs", params.IntParam, default=30, label="Maximum epochs",
                      help="Training stops earlier when the validation error stops improving.")
        addGpuParams(form, gpuHelp="The GPU to use, e.g. 0.",
                     useGpuHelp="Train on a CUDA GPU (the run stops with one line if CUDA is not available).")
        form.addParallelSection(threads=2, mpi=0)

    def _insertAllSteps(self):
        self._insertEngineSteps(self.trainStep)

    def convertInputStep(self):
        if not self.useSimulation:
            writeCtfLabelsStar(self.inputCTF.get(), self._getExtraPath("labels.star"))

    def trainStep(self):
        args = ["--output", self._getExtraPath("defocus_model.pt"), "--epochs", self.epochs.get(),
                "--threads", self.numberOfThreads.get()] + self._deviceArgs()
        if self.useSimulation:
            args += ["--simulate", self.numberOfSimulated.get()]
        else:
            args += ["--star", self._getExtraPath("labels.star")]
        if self.fineTune:
            args += ["--init", "shipped"]
        self._runProgram("defocus", args, "train")

    def createOutputStep(self):
        model = EMFile(filename=self._getExtraPath("defocus_model.pt"))
        self._defineOutputs(**{OUTPUT_MODEL: model})
        if not self.useSimulation:
            self._defineSourceRelation(self.inputCTF, model)

    def _validate(self):
        errors = []
        if not self.useSimulation and self.inputCTF.get() is None:
            errors.append("Give a SetOfCTF as labels, or train on simulated micrographs.")
        elif not self.useSimulation:
            ctfs = self.inputCTF.get()
            if ctfs.getSize() == 0:
                errors.append("Labels (%s): the set of CTFs is empty." % ctfs.getFileName())
            elif ctfs.getMicrographs() is not None:
                errors += acquisitionErrors(ctfs.getMicrographs(), "Micrographs of the labels")
        errors += self._oneGpuErrors("The training")
        return errors

    def _summary(self):
        if hasattr(self, OUTPUT_MODEL):
            return ["Model: %s" % getattr(self, OUTPUT_MODEL).getFileName()]
        return ["Not trained yet."]

    def _methods(self):
        if not hasattr(self, OUTPUT_MODEL):
            return []
        start = ("fine-tuned from the weights shipped with deepcryo" if self.fineTune
                 else "trained from random initial weights")
        data = ("%d simulated micrographs of known CTF" % self.numberOfSimulated.get() if self.useSimulation
                else "the micrographs of %s, with their defocus as labels" % self.getObjectTag("inputCTF"))
        return ["The defocus network of deepcryo's deep micrograph defocus ([MarchanTorres2021]) was %s on %s, "
                "for at most %d epoch%s (training stops earlier when the error on held-out micrographs stops "
                "improving). The trained model is %s." % (start, data, self.epochs.get(),
                                                          "" if self.epochs.get() == 1 else "s",
                                                          self.getObjectTag(OUTPUT_MODEL))]

    def _citations(self):
        return ["MarchanTorres2021"]
