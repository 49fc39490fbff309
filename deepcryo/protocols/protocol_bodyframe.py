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
"""One body frame for the particles of a landscape: the Scipion step of ``python -m deepcryo.landscape frames``
(:mod:`deepcryo.landscape.frames`), between a first landscape VAE and a second one trained on the moved poses."""
import json
import os

import pyworkflow.protocol.params as params
from pyworkflow.constants import BETA
from pyworkflow.utils import Message
from pwem.objects import SetOfParticles
from pwem.protocols import ProtProcessParticles

from deepcryo.constants import OUTPUT_PARTICLES
from deepcryo.convert import updateParticlesFromStar
from deepcryo.protocols.protocol_base import DeepCryoProtBase
from deepcryo.protocols.protocol_vae import OUTPUT_CLASSES

GROUP_COLUMN = "dcFrameGroup"


class DeepCryoProtVaeBodyFrame(DeepCryoProtBase, ProtProcessParticles):
    """Moves the poses of the particles of a landscape into one frame of the particle's static body, so that a
    second landscape VAE trained on them sees the motion and not the turns of a consensus alignment.

    A consensus refinement aligns every particle to one map: the particles of a conformation whose domain is
    turned share a turn of their frame (about half the domain's turn, between body and domain), and the VAE
    decodes each conformation in its own turned frame. Here the particles of the analysis are split into groups
    (equal bins along the latent's first principal component, or the analysis' k-means clusters), a map of each
    group is reconstructed from its particles at their poses, and the rigid motion (R, t) that overlays each
    group's static body (where the group maps agree) on the common frame is measured. Each group's poses A
    become A·Rᵀ and its origins move with t; then each particle's pose is refined by a local search against its
    own group's map, now in the common frame ("Then refine each particle at"); the images are unchanged. Train the landscape VAE again on the
    output; for a continuous motion, with the turns interpolated along PC1 and thousands of particles per group,
    run a second round on the second landscape. The README ("Continuous motion: the body frame") gives the measured gain.

    Output: the particles of the analysis' training run (CTF, everything else kept) with the moved poses, and
    their group (attribute ``_dcFrameGroup``). The program's files (STAR, ``particles_frames.json`` with the
    turns, ``particles_static_body.mrc``, the static body mask) are in the extra folder.
    """
    _label = "landscape VAE body frame"
    _devStatus = BETA
    _possibleOutputs = {OUTPUT_PARTICLES: SetOfParticles}

    GROUP_PC1, GROUP_CLUSTERS = 0, 1
    GROUPINGS = ["bins along PC1", "k-means clusters"]

    # --------------------------- DEFINE param functions --------------------------------------------
    def _defineParams(self, form):
        form.addSection(label=Message.LABEL_INPUT)
        form.addParam("analyzeRun", params.PointerParam, pointerClass="DeepCryoProtVaeAnalyze", important=True,
                      label="Landscape analysis",
                      help="A finished landscape VAE analysis: the particles' poses, their PC1 and clusters "
                           "come from it. The output holds its training run's input particles with moved poses.")
        form.addParam("groupBy", params.EnumParam, choices=self.GROUPINGS, default=self.GROUP_PC1,
                      display=params.EnumParam.DISPLAY_HLIST, label="Groups",
                      help="Bins along PC1: equal groups of particles along the latent's first principal "
                           "component, where a continuous motion runs (k-means may cut across it). k-means "
                           "clusters: the analysis' clusters, one group each.")
        form.addParam("bins", params.IntParam, default=8, validators=[params.GE(2)],
                      condition="groupBy == %d" % self.GROUP_PC1, label="Number of groups",
                      help="Equal groups along PC1. Each group's map is reconstructed from its own particles: "
                           "fewer, larger groups give less noisy maps but each spans more of the motion and takes "
                           "one turn for all of it. In our benchmarks of a continuous motion 8 was best at 4 000 "
                           "particles (against 4 and 16) and at 20 000 (against 6 and 16).")
        form.addParam("interpolate", params.BooleanParam, default=False,
                      condition="groupBy == %d" % self.GROUP_PC1, label="Interpolate the turns along PC1?",
                      help="Yes: each particle takes the turn and shift interpolated along PC1 between its "
                           "group's and the neighbouring groups' (each placed at its group's median PC1, and carried "
                           "on past the end groups' medians to their outer tenth), for a continuous motion; with thousands "
                           "of particles per group run two rounds (train, analyse and this protocol twice), with a "
                           "few hundred one (a second round was unreliable there). "
                           "No: one turn and shift for every particle of a group, for discrete states.")
        form.addParam("mapBox", params.IntParam, default=32, validators=[params.GE(8)], label="Map box (px)",
                      help="Box of the group maps (the particles' images Fourier-cropped to it; at most the "
                           "particles' box). The search costs grow as the box cubed.")
        form.addParam("resolution", params.FloatParam, default=10.0, validators=[params.Positive],
                      label="Low-pass of the maps (Å)",
                      help="The group maps are compared at this resolution (at least twice the maps' pixel "
                           "size). Maps of a few hundred noisy particles need it; 15 Å at 4 Å/px lost most of "
                           "the turn in our tests.")
        form.addParam("refineResolution", params.FloatParam, default=8.0, validators=[params.GE(0)],
                      label="Then refine each particle at (Å)",
                      help="After the turns, each particle's pose is refined by a local search against its own "
                           "group's map at the particles' box, low-passed to this resolution (at most the "
                           "particles' Nyquist limit). 0: no refinement. It pays with thousands of particles per "
                           "group (sharp maps); with a few hundred it gains little.")
        form.addParam("referenceGroup", params.IntParam, default=0, validators=[params.GE(0)],
                      expertLevel=params.LEVEL_ADVANCED, label="Frame of group (0: their mean)",
                      help="0: all groups move into the mean of their frames (the consensus's frame on "
                           "average). k: all groups take group k's frame (1-based, in PC1 order or the "
                           "cluster number).")
        form.addParam("maxAngle", params.FloatParam, default=20.0, validators=[params.Range(1.0, 90.0)],
                      expertLevel=params.LEVEL_ADVANCED, label="Largest turn (deg)",
                      help="Turns of a group's map searched, up to this angle.")

    # --------------------------- INSERT steps functions --------------------------------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.framesStep)
        self._insertFunctionStep(self.createOutputStep)

    # --------------------------- STEPS functions ---------------------------------------------------
    def _analysisStar(self):
        return os.path.join(self.analyzeRun.get()._getExtraPath("analysis"), "particles.star")

    def _outputStar(self):
        return self._getExtraPath("particles.star")

    def _summaryJson(self):
        return self._getExtraPath("particles_frames.json")

    def _inputParticles(self):
        """The particles the analysed VAE was trained on (poses, CTF and images of the analysis' STAR)."""
        return self.analyzeRun.get().trainRun.get().inputParticles

    def framesStep(self):
        args = ["frames", "--particles", self._analysisStar(), "--output", self._outputStar(),
                "--box", self.mapBox.get(), "--resolution", self.resolution.get(), "--max-angle", self.maxAngle.get(),
                "--refine-resolution", self.refineResolution.get()]
        if self.groupBy.get() == self.GROUP_PC1:
            args += ["--group-column", "dcPC1", "--bins", self.bins.get()]
            if self.interpolate.get():
                args.append("--interpolate")
        else:
            args += ["--group-column", "dcCluster"]
        if self.referenceGroup.get() > 0:
            args += ["--reference", self.referenceGroup.get()]
        self._runProgram("landscape", args)

    def createOutputStep(self):
        particles = self._createSetOfParticles()
        updateParticlesFromStar(self._inputParticles().get(), self._outputStar(), particles,
                                extraColumns=(GROUP_COLUMN,))
        self._defineOutputs(**{OUTPUT_PARTICLES: particles})
        self._defineTransformRelation(self._inputParticles(), particles)

    # --------------------------- INFO functions ----------------------------------------------------
    def _groups(self):
        """Number of groups: the bins asked for, or the clusters of the (finished) analysis."""
        if self.groupBy.get() == self.GROUP_PC1:
            return self.bins.get()
        return getattr(self.analyzeRun.get(), OUTPUT_CLASSES).getSize()

    def _validate(self):
        run = self.analyzeRun.get()
        if run is None:
            return []
        if not hasattr(run, OUTPUT_CLASSES):
            return ["The analysis has not finished."]
        if not os.path.exists(self._analysisStar()):
            return ["The analysis has no particles with PC1 and clusters (%s): run the analysis again."
                    % self._analysisStar()]
        errors = []
        if run.trainRun.get().poseFree:
            errors.append("The analysed VAE was trained pose-free: its poses are its own, in no consensus "
                          "frame. Use a landscape trained on the poses of a consensus refinement.")
        particles = self._inputParticles().get()
        groups = self._groups()
        if self.groupBy.get() == self.GROUP_CLUSTERS and groups < 2:
            errors.append("The analysis has %d cluster: the body frame compares 2 or more groups (analyse "
                          "with more clusters, or use bins along PC1)." % groups)
        if groups > particles.getSize():
            errors.append("%d groups for %d particles: use fewer groups." % (groups, particles.getSize()))
        if self.referenceGroup.get() > groups:
            errors.append("Frame of group %d: there are %d groups (0: the mean of their frames)."
                          % (self.referenceGroup.get(), groups))
        box = particles.getXDim()
        if self.mapBox.get() > box:
            errors.append("Map box %d px: at most the particles' box, %d px." % (self.mapBox.get(), box))
        else:
            nyquist = 2 * particles.getSamplingRate() * box / self.mapBox.get()
            if self.resolution.get() < nyquist:
                errors.append("Low-pass %g Å: finer than the Nyquist limit of the %d px maps (%.2f Å); use a "
                              "larger map box or a lower resolution." % (self.resolution.get(), self.mapBox.get(),
                                                                         nyquist))
        return errors

    def _frames(self):
        with open(self._summaryJson()) as f:
            return json.load(f)

    @staticmethod
    def _frameWords(summary):
        return ("the mean of the groups' frames" if summary["frame"] == "mean"
                else "the frame of %s" % summary["frame"])

    def _grouping(self, summary):
        if summary["bins"]:
            return "%d equal bins along PC1" % summary["bins"]
        return "the %d k-means clusters" % len(summary["group_sizes"])

    def _summary(self):
        if not hasattr(self, OUTPUT_PARTICLES):
            return ["Poses not moved yet."]
        summary = self._frames()
        frame = self._frameWords(summary)
        lines = ["%d particles in %s, moved into %s. Static body: %.0f %% of the particle."
                 % (getattr(self, OUTPUT_PARTICLES).getSize(), self._grouping(summary), frame,
                    100 * summary["static_body_fraction_of_particle"])]
        if summary.get("interpolated"):
            lines.append("Each particle's turn and shift interpolated along PC1 between the groups' (at their "
                         "median PC1).")
        measured = summary.get("measured", [True] * len(summary["group_sizes"]))
        for g, (size, turn, shift, corr) in enumerate(zip(summary["group_sizes"], summary["turn_deg"],
                                                          summary["shifts_A"], summary["static_body_correlation"])):
            if g + 1 == summary["aligned_to_group"]:
                overlay = "the others' static bodies overlaid on its"
            elif measured[g]:
                overlay = "static-body correlation %.2f" % corr
            else:
                overlay = ("its own motion not applied: static-body correlation %.2f, under %.2f (too few particles, "
                           "or a mix of conformations)" % (corr, summary["min_static_correlation"]))
            lines.append("group %d (%d particles): turned %.1f°, shifted (%s) Å; %s"
                         % (g + 1, size, turn, ", ".join("%.1f" % s for s in shift), overlay))
        return lines

    def _methods(self):
        if not hasattr(self, OUTPUT_PARTICLES):
            return []
        summary = self._frames()
        particles = self._inputParticles().get()
        frame = self._frameWords(summary)
        return ["The poses of the %d particles of %s were moved into one frame of the particle's static body "
                "with deepcryo's landscape frames. The particles were split into %s of the conformational "
                "landscape analysed by %s ([Zhong2021]); each group's map was reconstructed from its particles at "
                "their poses (%d px, %.2f Å/px) and low-passed to %g Å; the static body is where the group maps "
                "agree, and the rigid motion (a rotation of at most %g° and a shift) that overlays each group's "
                "static body on the common frame was found by masked correlation (one rigid motion per group of "
                "the landscape, where multi-body refinement [Nakane2018] refines one per particle and body). "
                "%s, all groups into %s%s (output %s)."
                % (particles.getSize(), self.getObjectTag(self._inputParticles()), self._grouping(summary),
                   self.getObjectTag("analyzeRun"), self.mapBox.get(),
                   particles.getSamplingRate() * particles.getXDim() / self.mapBox.get(), self.resolution.get(),
                   self.maxAngle.get(), self._turnWords(summary), frame, self._refineWords(summary),
                   self.getObjectTag(OUTPUT_PARTICLES))]

    @staticmethod
    def _turnWords(summary):
        if summary.get("interpolated"):
            return ("Each particle's pose A became A·Rᵀ and its origin moved with the shift, R and the shift "
                    "interpolated along PC1 between the groups' motions placed at their median PC1")
        return "Each group's poses A became A·Rᵀ and its origins moved with the shift"

    @staticmethod
    def _refineWords(summary):
        resolution = summary.get("refine_resolution_A", 0)
        return ("; then each particle's pose was refined by a local search against its group's map at the "
                "particles' box, low-passed to %g Å" % resolution) if resolution else ""

    def _citations(self):
        return ["Zhong2021", "Nakane2018"]
