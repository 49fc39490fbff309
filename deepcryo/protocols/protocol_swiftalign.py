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
"""Projection matching of particles against a map on a compressed faiss index (``deepcryo.swiftalign``)."""
import numpy as np

import pyworkflow.protocol.params as params
from pyworkflow.constants import BETA
from pyworkflow.protocol.constants import STEPS_PARALLEL
from pyworkflow.utils import Message
from pwem.objects import SetOfParticles
from pwem.protocols import ProtRefine3D

from deepcryo.constants import OUTPUT_PARTICLES, SYMMETRY_HELP
from deepcryo.convert import (convertVolume, mergeParticlesStars, splitParticlesStar,
                              updateParticlesFromStar)
from deepcryo.protocols.protocol_base import DeepCryoProtBase, addGpuParams
from deepcryo.protocols.validation import particleErrors, symmetryErrors

SCORE_COLUMNS = ("dcSwiftScore", "dcSwiftConfidence")


class DeepCryoProtSwiftAlign(DeepCryoProtBase, ProtRefine3D):
    """Assigns Euler angles and shifts to particles by matching them against projections of a map.

    The projections (an even sampling of directions × in-plane angles) are stored as compressed
    Fourier vectors in a faiss index; each particle, multiplied by its CTF, is searched in the index
    at a grid of origins within the shift range, its best matches are re-scored exactly with its own CTF and refined locally (SwiftAlign,
    Lauzirika 2023). Local mode searches only around the particles' current alignment.
    Outputs: particles with projection alignment, the correlation score (_dcSwiftScore) and a
    confidence (_dcSwiftConfidence, score gap to the best pose far from the winner).
    """
    _label = "swiftalign"
    _devStatus = BETA
    _possibleOutputs = {OUTPUT_PARTICLES: SetOfParticles}
    stepsExecutionMode = STEPS_PARALLEL  # the query chunks run side by side

    # --------------------------- DEFINE param functions --------------------------------------------
    def _defineParams(self, form):
        form.addSection(label=Message.LABEL_INPUT)
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles",
                      pointerCondition="hasCTF", important=True, label="Input particles",
                      help="Particles with CTF; same box and pixel size as the reference.")
        form.addParam("inputVolume", params.PointerParam, pointerClass="Volume", important=True,
                      label="Reference map")
        form.addParam("symmetryGroup", params.StringParam, default="c1", label="Symmetry group",
                      help=SYMMETRY_HELP)
        form.addSection(label="Search")
        form.addParam("samplingMode", params.EnumParam, choices=["angular step", "target resolution"],
                      default=1, display=params.EnumParam.DISPLAY_HLIST, label="Sampling from")
        form.addParam("angularStep", params.FloatParam, default=10.0, condition="samplingMode==0",
                      validators=[params.Range(0.1, 90)], label="Angular step (deg)")
        form.addParam("maxResolution", params.FloatParam, default=15.0, validators=[params.Positive],
                      label="Max resolution (Å)",
                      help="Resolution limit of the search vectors; with 'target resolution' it also "
                           "sets the angular step, asin(resolution / (box · pixel size)).")
        form.addParam("maxShift", params.FloatParam, default=5.0, validators=[params.GE(0)],
                      label="Max shift (px)",
                      help="Largest origin searched per axis. Each particle is searched at the origins of a "
                           "grid within ± this, 1.5 shift steps apart (shift step: max resolution / (4 · pixel "
                           "size)), and its matches are re-scored across each grid cell; the index holds the "
                           "poses only and does not grow with it, the search time does.")
        form.addParam("doWhiten", params.BooleanParam, default=False, label="Whiten by the noise?",
                      expertLevel=params.LEVEL_ADVANCED,
                      help="Weight frequencies by the inverse noise power of the particles (estimated "
                           "from their corners) in the search vectors.")
        form.addParam("indexType", params.EnumParam, choices=["auto", "exact (flat)", "custom"], default=0,
                      display=params.EnumParam.DISPLAY_HLIST, label="Index type")
        form.addParam("indexFactory", params.StringParam, default="OPQ48_192,IVF4096,PQ48",
                      condition="indexType==2", label="faiss factory string")
        form.addParam("nprobe", params.IntParam, default=8, validators=[params.Positive], label="nprobe",
                      expertLevel=params.LEVEL_ADVANCED,
                      help="Inverted lists of the index visited per search. Each particle is searched once per "
                           "origin of its search grid, so its matches already come from many lists: on "
                           "RELION-rendered particles at SNR 0.1 to 0.01, 8 lists found as many correct poses "
                           "as 64, for less time.")
        form.addParam("numberOfMatches", params.IntParam, default=5, validators=[params.Positive],
                      label="Candidates refined (k)", expertLevel=params.LEVEL_ADVANCED)
        form.addParam("localSearch", params.BooleanParam, default=False, label="Local search?",
                      help="Search only around the particles' current alignment.")
        form.addParam("localSteps", params.IntParam, default=2, condition="localSearch",
                      label="Local angular range (± steps)")
        form.addParam("memoryLimit", params.FloatParam, default=4.0, validators=[params.Positive],
                      label="Memory limit (GB)", expertLevel=params.LEVEL_ADVANCED)
        form.addParam("particlesPerStep", params.IntParam, default=5000, validators=[params.Positive],
                      label="Particles per query step", expertLevel=params.LEVEL_ADVANCED)
        addGpuParams(form, gpuLabel="GPU IDs",
                     gpuHelp="GPUs for the steps: each step (index build, one query chunk) runs on one of them.")
        form.addParallelSection(threads=3, mpi=0, binThreads=2,
                                binThreadsHelp="Threads of each step's program. Scipion threads - 1 steps (query "
                                               "chunks) run at a time, each on its own GPU when GPUs are used.")

    # --------------------------- INSERT steps functions --------------------------------------------
    def _insertAllSteps(self):
        convert = self._insertFunctionStep(self.convertInputStep, needsGPU=False)
        train = self._insertFunctionStep(self.trainStep, prerequisites=[convert], needsGPU=self.usesGpu())
        n = self.inputParticles.get().getSize()
        chunks = max(1, int(np.ceil(n / self.particlesPerStep.get())))
        queries = [self._insertFunctionStep(self.queryStep, i, chunks, prerequisites=[train], needsGPU=self.usesGpu())
                   for i in range(chunks)]  # side by side, each loading the index once
        self._insertFunctionStep(self.createOutputStep, chunks, prerequisites=queries, needsGPU=False)

    # --------------------------- STEPS functions ---------------------------------------------------
    def _common(self):
        args = ["--threads", self.getBinThreads(), "--memory-limit", self.memoryLimit.get()]
        if self.usesGpu():
            args += self._deviceArgs()
        return args

    def trainStep(self):
        ref = convertVolume(self.inputVolume.get(), self._getExtraPath())
        args = ["train", "--reference", ref, "--particles", self._inputParticlesStar(),
                "--max-resolution", self.maxResolution.get(), "--max-shift", self.maxShift.get(),
                "--symmetry", self.symmetryGroup.get().strip().upper(),
                "--output", self._getExtraPath("index")] + self._common()
        if self.samplingMode.get() == 0:
            args += ["--angular-step", self.angularStep.get()]
        if self.doWhiten:
            args += ["--whiten"]
        if self.indexType.get() == 1:
            args += ["--index-factory", "Flat"]
        elif self.indexType.get() == 2:
            args += ["--index-factory", "'%s'" % self.indexFactory.get().strip()]
        self._runProgram("swiftalign", args)

    def queryStep(self, chunk, chunks):
        inp = self._getExtraPath("chunk_%03d.star" % chunk)
        splitParticlesStar(self._inputParticlesStar(), inp, chunk, chunks)
        args = ["query", "--index", self._getExtraPath("index"), "--particles", inp,
                "--output", self._getExtraPath("aligned_%03d.star" % chunk), "--nprobe", self.nprobe.get(),
                "--k", self.numberOfMatches.get()] + self._common()
        if self.localSearch:
            args += ["--local", "--local-steps", self.localSteps.get()]
        self._runProgram("swiftalign", args)

    def createOutputStep(self, chunks):
        mergeParticlesStars([self._getExtraPath("aligned_%03d.star" % i) for i in range(chunks)],
                            self._getExtraPath("aligned.star"))
        inputSet = self.inputParticles.get()
        outputSet = self._createSetOfParticles()
        updateParticlesFromStar(inputSet, self._getExtraPath("aligned.star"), outputSet, extraColumns=SCORE_COLUMNS)
        self._defineOutputs(**{OUTPUT_PARTICLES: outputSet})
        self._defineTransformRelation(self.inputParticles, outputSet)
        self._defineSourceRelation(self.inputVolume, outputSet)

    # --------------------------- INFO functions ----------------------------------------------------
    def _validate(self):
        errors = []
        particles, volume = self.inputParticles.get(), self.inputVolume.get()
        if particles is not None:
            errors += particleErrors(particles, "The input particles have no CTF.")
            if self.localSearch and not particles.hasAlignmentProj():
                errors.append("Local search needs particles with a 3D alignment.")
        errors += symmetryErrors(self.symmetryGroup.get())
        errors += self._gpuPerStepErrors()
        if particles is not None and volume is not None:
            if volume.getXDim() != particles.getXDim():
                errors.append("Box size mismatch: particles %d px, map %d px."
                              % (particles.getXDim(), volume.getXDim()))
            if abs(volume.getSamplingRate() - particles.getSamplingRate()) > 1e-3 * particles.getSamplingRate():
                errors.append("Pixel size mismatch: particles %.4f Å/px, map %.4f Å/px."
                              % (particles.getSamplingRate(), volume.getSamplingRate()))
            if self.maxResolution.get() < 2 * particles.getSamplingRate():
                errors.append("Max resolution is beyond Nyquist (%.2f Å)." % (2 * particles.getSamplingRate()))
        return errors

    def _summary(self):
        if not hasattr(self, OUTPUT_PARTICLES):
            return ["Output particles not ready yet."]
        return ["%d particles aligned against %s."
                % (getattr(self, OUTPUT_PARTICLES).getSize(), self.getObjectTag("inputVolume"))]

    def _methods(self):
        if not hasattr(self, OUTPUT_PARTICLES):
            return []
        sampling = ("an angular step of %g°" % self.angularStep.get() if self.samplingMode.get() == 0
                    else "an angular step set by the %g Å target resolution" % self.maxResolution.get())
        text = ("Orientations and shifts of %d particles of %s were assigned with SwiftAlign ([Lauzirika2023]) as "
                "implemented in deepcryo. Projections of %s (%s symmetry, %s) were stored as Fourier "
                "vectors up to %g Å%s in a faiss ([Johnson2019] [Douze2024]) index: %s. Each particle, "
                "multiplied by its CTF, was searched at a grid of origins up to ±%g px; its %d best candidates "
                "(nprobe %d) were re-scored with its own CTF and refined locally%s. Euler angles, shifts and symmetry operators follow RELION's conventions "
                "([Scheres2012a] [Zivanov2018]). The output particles (%s) carry the correlation score and a "
                "confidence."
                % (getattr(self, OUTPUT_PARTICLES).getSize(), self.getObjectTag("inputParticles"),
                   self.getObjectTag("inputVolume"), self.symmetryGroup.get(), sampling, self.maxResolution.get(),
                   ", weighted by the inverse noise power of the particles" if self.doWhiten else "",
                   self._indexText(), self.maxShift.get(), self.numberOfMatches.get(), self.nprobe.get(),
                   "; the search was restricted to ±%d angular steps around the particles' previous orientations"
                   % self.localSteps.get() if self.localSearch else "", self.getObjectTag(OUTPUT_PARTICLES)))
        return [text]

    def _indexFactory(self):
        return self.indexFactory.get().strip()

    def _usesOpq(self):
        return self.indexType.get() == 2 and "OPQ" in self._indexFactory()

    def _indexText(self):
        """The faiss index of the search, as a methods text names it."""
        if self.indexType.get() == 1:
            return "exact (flat)"
        if self.indexType.get() == 2:
            return "'%s', product quantization ([Jegou2011]%s)" % (
                self._indexFactory(), ", optimized: [Ge2013]" if self._usesOpq() else "")
        return ("chosen from the size of the gallery: exact for small galleries, otherwise PCA, inverted lists "
                "and product quantization ([Jegou2011])")

    def _citations(self):
        cites = ["Lauzirika2023", "Johnson2019", "Douze2024", "Jegou2011"]
        if self._usesOpq():
            cites.append("Ge2013")
        return cites + ["Scheres2012a", "Zivanov2018"]
