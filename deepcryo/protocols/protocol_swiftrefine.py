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
"""Gold-standard iterative 3D refinement driven by SwiftAlign (``python -m deepcryo.swiftalign refine``)."""
import os

import pyworkflow.protocol.params as params
from pyworkflow.constants import BETA
from pyworkflow.utils import Message
from pwem.objects import FSC, SetOfClasses3D, SetOfParticles, Volume
from pwem.protocols import ProtRefine3D

from deepcryo.constants import (DEFAULT_DIAMETER_BOX_FRACTION, OUTPUT_FSC, OUTPUT_PARTICLES, OUTPUT_VOLUME,
                                SYMMETRY_HELP)
from deepcryo.convert import convertVolume, readFscStar, updateParticlesFromStar
from deepcryo.protocols.protocol_base import DeepCryoProtBase, addGpuParams
from deepcryo.protocols.validation import particleErrors, symmetryErrors
from deepcryo.swiftalign.layout import RefineLayout

OUTPUT_CLASSES = "outputClasses"
SCORE_COLUMNS = ("dcSwiftScore", "dcSwiftKept", "rlnClassNumber")


class DeepCryoProtSwiftRefine(DeepCryoProtBase, ProtRefine3D):
    """Refines the 3D alignment of particles and their map, gold-standard (two independent halves).

    Each iteration aligns each half of the particles against its own reference with SwiftAlign
    (a faiss index of reference projections for the first, global iteration; an exact local search
    around the previous poses afterwards), reconstructs the two half maps (CTF-weighted), measures
    their FSC in the mask, corrected by phase randomisation as relion_postprocess does, and the
    resolution (0.143, as RELION reports it), and makes the next references: FSC-weighted, cut at the
    resolution, joined below 40 Å, masked. The angular and shift steps follow the resolution. It
    stops when neither the resolution nor the poses change any more. With several initial maps it
    refines one class per map and assigns each particle to the class it matches best.
    Outputs: the map with its half maps and FSC (or the 3D classes), and the aligned particles.
    """
    _label = "swiftrefine"
    _devStatus = BETA
    _possibleOutputs = {OUTPUT_VOLUME: Volume, OUTPUT_FSC: FSC, OUTPUT_PARTICLES: SetOfParticles,
                        OUTPUT_CLASSES: SetOfClasses3D}

    # --------------------------- DEFINE param functions --------------------------------------------
    def _defineParams(self, form):
        form.addSection(label=Message.LABEL_INPUT)
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles",
                      pointerCondition="hasCTF", important=True, label="Input particles",
                      help="Particles with CTF. Their alignment, if any, is not used: the first "
                           "iteration searches all orientations. Particles with a half set "
                           "(_rlnRandomSubset, e.g. from a previous refinement) keep it.")
        form.addParam("inputVolumes", params.MultiPointerParam, pointerClass="Volume", important=True,
                      minNumObjects=1, label="Initial map(s)",
                      help="The particles' box and pixel size, or the same physical box at another pixel size "
                           "(e.g. the landscape's cluster maps at its working box), which is resampled to the "
                           "particles' box. One map: a single refinement. "
                           "Several maps: a multi-reference refinement, one 3D class per map; e.g. the items of "
                           "the output volumes of a landscape VAE analysis (one map per cluster), so that each "
                           "particle is aligned to the map of its own state before the landscape is trained "
                           "again on the new poses (the measured path started them at 15 Å).")
        form.addParam("symmetryGroup", params.StringParam, default="c1", label="Symmetry group",
                      help=SYMMETRY_HELP)
        form.addParam("initialResolution", params.FloatParam, default=30.0, validators=[params.Positive],
                      label="Initial resolution (Å)",
                      help="The initial map(s) are low-pass filtered to this resolution, and the first "
                           "iteration aligns up to it. 30-60 Å avoids reference bias.")
        form.addParam("particleDiameter", params.FloatParam, default=0.0, validators=[params.GE(0)],
                      label="Particle diameter (Å)",
                      help="Largest diameter of the particle, in Å. It sets the angular step (asin(resolution / "
                           "diameter)) and the automatic spherical mask (a soft sphere of this diameter). 0: "
                           "%d%% of the input's box (box × pixel size of the particles), right for particles "
                           "boxed with the usual margin. The wizard draws it on a central slice of the initial "
                           "map. It must exceed the initial resolution and stay within 1.5 × the box."
                           % round(100 * DEFAULT_DIAMETER_BOX_FRACTION))
        form.addParam("inputMask", params.PointerParam, pointerClass="VolumeMask", allowsNull=True,
                      label="Mask (optional)",
                      help="Applied to the references and to the half maps for the FSC. Default: a "
                           "soft sphere of the particle diameter.")
        form.addSection(label="Refinement")
        form.addParam("maxIterations", params.IntParam, default=12, validators=[params.Positive],
                      label="Maximum iterations",
                      help="The refinement stops earlier when it has converged.")
        form.addParam("globalIterations", params.IntParam, default=1, validators=[params.GE(1)],
                      label="Global iterations",
                      help="First iterations that search all orientations; the later ones search "
                           "around the previous poses.")
        form.addParam("localSteps", params.IntParam, default=2, validators=[params.Positive],
                      label="Local range (± angular steps)")
        form.addParam("maxShift", params.FloatParam, default=0.0, validators=[params.GE(0)],
                      label="Max shift (px)", help="Origin search range of the global iterations, "
                                                    "± px. 0: 10% of the box.")
        form.addParam("doConsensus", params.BooleanParam, default=False, label="Repetition consensus?",
                      help="Align each half twice with differently perturbed samplings and leave out "
                           "of each reconstruction the particles whose two poses disagree by more "
                           "than one angular step (about twice the alignment time).")
        form.addParam("numberOfMatches", params.IntParam, default=3, validators=[params.Positive],
                      label="Candidates refined (k)", expertLevel=params.LEVEL_ADVANCED)
        form.addParam("nprobe", params.IntParam, default=32, validators=[params.Positive], label="nprobe",
                      expertLevel=params.LEVEL_ADVANCED,
                      help="Inverted lists of the global index visited per particle.")
        form.addParam("doWhiten", params.BooleanParam, default=False, label="Whiten by the noise?",
                      expertLevel=params.LEVEL_ADVANCED,
                      help="Weight frequencies by the inverse noise power of the particles in the "
                           "alignment.")
        form.addParam("joinResolution", params.FloatParam, default=40.0, validators=[params.Positive],
                      label="Join halves below (Å)", expertLevel=params.LEVEL_ADVANCED,
                      help="The two half references share their Fourier components at resolutions lower "
                           "than this (RELION's --low_resol_join_halves).")
        form.addParam("randomSeed", params.IntParam, default=0, label="Random seed",
                      expertLevel=params.LEVEL_ADVANCED,
                      help="Seed of the half split (when the particles have none) and of the "
                           "perturbed samplings of the repetition consensus.")
        form.addParam("memoryLimit", params.FloatParam, default=4.0, validators=[params.Positive],
                      label="Memory limit (GB)", expertLevel=params.LEVEL_ADVANCED,
                      help="Bounds the index build and search of the global iterations.")
        addGpuParams(form, gpuHelp="The one GPU to use, e.g. 0.")
        form.addParallelSection(threads=2, mpi=0)

    # --------------------------- INSERT steps functions --------------------------------------------
    def _insertAllSteps(self):
        self._insertEngineSteps(self.refineStep)

    def _refineDir(self, *paths):
        return self._getExtraPath("refine", *paths)

    def _nClasses(self):
        return len(self.inputVolumes)

    def _layout(self):
        return RefineLayout(self._refineDir(), self._nClasses())

    def _classFile(self, k, what):
        """Final file ``what`` of class ``k`` (0-based) in the refinement folder."""
        return self._layout().class_path(what, k)

    # --------------------------- STEPS functions ---------------------------------------------------
    def refineStep(self):
        refs = [convertVolume(p.get(), self._getExtraPath("references")) for p in self.inputVolumes]
        args = ["refine", "--particles", self._inputParticlesStar(), "--reference"] + refs
        args += ["--output-dir", self._refineDir(), "--symmetry", self.symmetryGroup.get().strip().upper(),
                 "--initial-resolution", self.initialResolution.get(),
                 "--max-iterations", self.maxIterations.get(), "--global-iterations", self.globalIterations.get(),
                 "--local-steps", self.localSteps.get(),
                 "--k", self.numberOfMatches.get(), "--threads", self.numberOfThreads.get(),
                 "--repetitions", 2 if self.doConsensus else 1, "--nprobe", self.nprobe.get(),
                 "--join-resolution", self.joinResolution.get(), "--seed", self.randomSeed.get(),
                 "--memory-limit", self.memoryLimit.get(),
                 "--continue"]  # resumes after the last finished iteration (Scipion's continue mode)
        if self.particleDiameter.get() > 0:
            args += ["--particle-diameter", self.particleDiameter.get()]
        if self.maxShift.get() > 0:
            args += ["--max-shift", self.maxShift.get()]
        if self.inputMask.get() is not None:
            args += ["--mask", convertVolume(self.inputMask.get(), self._getExtraPath("references"))]
        if self.usesGpu():
            args += self._deviceArgs()
        if self.doWhiten:
            args += ["--whiten"]
        self._runProgram("swiftalign", args)

    def createOutputStep(self):
        inputSet = self.inputParticles.get()
        px = inputSet.getSamplingRate()
        particles = self._createSetOfParticles()
        updateParticlesFromStar(inputSet, self._layout().path("particles.star"), particles, extraColumns=SCORE_COLUMNS)
        outputs = {OUTPUT_PARTICLES: particles}
        if self._nClasses() == 1:
            volume = self._volume(0, px)
            outputs[OUTPUT_VOLUME] = volume
            outputs[OUTPUT_FSC] = readFscStar(self._classFile(0, "fsc.star"), label="Half maps FSC")
        else:
            classes = self._createSetOfClasses3D(particles)

            def updateItem(item, _row=None):
                item.setClassId(int(round(item._rlnClassNumber.get())))

            def updateClass(cls):
                cls.setRepresentative(self._volume(cls.getObjId() - 1, px))
                cls.setAlignmentProj()

            classes.classifyItems(updateItemCallback=updateItem, updateClassCallback=updateClass)
            outputs[OUTPUT_CLASSES] = classes
        self._defineOutputs(**outputs)
        for name, output in outputs.items():
            self._defineSourceRelation(self.inputParticles, output)
            for pointer in self.inputVolumes:
                self._defineSourceRelation(pointer, output)

    def _volume(self, k, px):
        volume = Volume()
        volume.setFileName(self._classFile(k, "map.mrc"))
        volume.setSamplingRate(px)
        volume.setHalfMaps([self._classFile(k, "half1.mrc"), self._classFile(k, "half2.mrc")])
        return volume

    # --------------------------- INFO functions ----------------------------------------------------
    def history(self):
        """The per-iteration records of the refinement (list of dicts; empty before the first iteration): from
        ``model.json`` at the end, else (running, or a ``model.json`` that an earlier version's ``--continue`` wrote
        without them) from the last iteration's ``it###_model.json``."""
        return RefineLayout(self._refineDir()).history()

    def finalResolution(self):
        """Resolution (Å, half-map FSC 0.143, masked and corrected by phase randomisation) of the final
        pose-weighted half maps, or None before the end."""
        return RefineLayout(self._refineDir()).final_resolution()

    def _validate(self):
        errors = []
        particles = self.inputParticles.get()
        volumes = [p.get() for p in self.inputVolumes]
        if particles is not None:
            errors += particleErrors(particles, "The input particles have no CTF: estimate it before extraction "
                                     "or import particles with CTF.")
            if particles.getSize() < 4:
                errors.append("A gold-standard refinement needs at least 4 particles (2 per half).")
            sr = particles.getSamplingRate() or 0
            if self.initialResolution.get() < 2 * sr:
                errors.append("Initial resolution %.2f Å is beyond Nyquist (%.2f Å)."
                              % (self.initialResolution.get(), 2 * sr))
            box = particles.getXDim()
            for what, vol in [("Initial map %d" % (i + 1), v) for i, v in enumerate(volumes)] + \
                    [("Mask", self.inputMask.get())]:
                if vol is None:
                    continue
                if what != "Mask" and sr and vol.getXDim() != box and \
                        abs(vol.getXDim() * vol.getSamplingRate() - box * sr) <= 0.01 * box * sr:
                    continue    # the particles' physical box at another voxel size: the program resamples it
                if vol.getXDim() != box:
                    errors.append("%s (%s): box %d px differs from the particles' %d px."
                                  % (what, vol.getFileName(), vol.getXDim(), box))
                if sr and abs(vol.getSamplingRate() - sr) > 1e-3 * sr:
                    errors.append("%s (%s): pixel size %.4f Å/px differs from the particles' %.4f Å/px."
                                  % (what, vol.getFileName(), vol.getSamplingRate(), sr))
            diameter = self.particleDiameter.get()
            if sr and diameter > 1.5 * box * sr:
                errors.append("Particle diameter %.1f Å is larger than 1.5 × the box (%.1f Å)."
                              % (diameter, box * sr))
            if 0 < diameter <= self.initialResolution.get():
                errors.append("Particle diameter %.1f Å must exceed the initial resolution %.1f Å (the angular "
                              "step is asin(resolution / diameter)); 0 takes %d%% of the box."
                              % (diameter, self.initialResolution.get(), round(100 * DEFAULT_DIAMETER_BOX_FRACTION)))
        if not volumes:
            errors.append("Give at least one initial map.")
        errors += symmetryErrors(self.symmetryGroup.get())
        if self.globalIterations.get() > self.maxIterations.get():
            errors.append("Global iterations (%d) exceed the maximum iterations (%d)."
                          % (self.globalIterations.get(), self.maxIterations.get()))
        errors += self._oneGpuErrors("The refinement")
        return errors

    def _summary(self):
        hist = self.history() if self.getOutputsSize() or os.path.isdir(self._refineDir()) else []
        if not hist:
            return ["No iteration finished yet."]
        last = hist[-1]
        lines = ["%d iterations, %s: resolution %.2f Å (half-map FSC 0.143 in the mask, corrected by phase "
                 "randomisation), angular step %.2f°, median pose change in the last iteration %.2f°."
                 % (len(hist), "converged" if last["converged"] else "not converged (iteration limit)",
                    last["resolution_A"], last["angular_step_deg"], last["median_angle_change_deg"])]
        final = self.finalResolution()
        if final is not None:
            lines.append("Final half maps, each particle inserted at its pose posterior: %.2f Å (half-map FSC "
                         "0.143 in the mask, corrected by phase randomisation)." % final)
        if self._nClasses() > 1:
            lines.append("Class fractions: " + ", ".join("%.1f%%" % (100 * f) for f in last["class_fractions"]))
        if last["fraction_kept"] < 1:
            lines.append("%.1f%% of the particles agreed between repetitions and were reconstructed."
                         % (100 * last["fraction_kept"]))
        return lines

    def _methods(self):
        hist = self.history() if os.path.isdir(self._refineDir()) else []
        if not hist:
            return []
        globalIterations = self.globalIterations.get()
        text = ("%d particles of %s were refined against %s with deepcryo swiftrefine, a gold-standard refinement "
                "([ScheresChen2012]) that follows RELION's conventions ([Scheres2012a] [Zivanov2018]), with %s "
                "symmetry, from an initial resolution of %.0f Å. In each iteration the two halves of the particles "
                "were aligned independently against their own references with SwiftAlign ([Lauzirika2023]): "
                "against a faiss index ([Johnson2019] [Douze2024]) of compressed projections ([Jegou2011]) in the "
                "first %s, then by local searches within ±%d angular steps of the previous poses. The half maps "
                "were reconstructed by CTF-weighted direct Fourier inversion%s."
                % (self.inputParticles.get().getSize(), self.getObjectTag("inputParticles"),
                   ", ".join(self.getObjectTag(p.get()) for p in self.inputVolumes), self.symmetryGroup.get(),
                   self.initialResolution.get(),
                   "iteration" if globalIterations == 1 else "%d iterations" % globalIterations,
                   self.localSteps.get(),
                   ", leaving out the particles whose poses disagreed between two differently perturbed "
                   "alignments" if self.doConsensus else ""))
        text += (" The half-map Fourier shell correlation in the mask, corrected by phase randomisation "
                 "([Chen2013]) as relion_postprocess does, reached %.2f Å (0.143 threshold) after %d iterations "
                 "(%s)." % (self.finalResolution() or hist[-1]["resolution_A"], len(hist),
                            "converged" if hist[-1]["converged"] else "iteration limit"))
        if self._nClasses() > 1:
            text += (" With %d initial maps, each particle was assigned to the class it matched best (output %s)."
                     % (self._nClasses(), self.getObjectTag(OUTPUT_CLASSES) if hasattr(self, OUTPUT_CLASSES)
                        else "3D classes"))
        return [text]

    def _citations(self):
        return ["Lauzirika2023", "ScheresChen2012", "Chen2013", "Johnson2019", "Douze2024", "Jegou2011",
                "Scheres2012a", "Zivanov2018"]
