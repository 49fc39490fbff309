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
"""Conformational landscape VAE (``deepcryo.landscape``): training, analysis and particle-selection protocols."""
import json
import os
import shutil
from glob import glob

import numpy as np
import pyworkflow.object as pwobj
import pyworkflow.protocol.params as params
from pyworkflow.constants import BETA
from pyworkflow.utils import Message
from pwem.constants import ALIGN_NONE
from pwem.objects import ParticleFlex, SetOfClasses3D, SetOfParticlesFlex, SetOfVolumes, Volume
from pwem.protocols import ProtAnalysis3D, ProtFlexBase, ProtProcessParticles

from deepcryo.constants import OUTPUT_PARTICLES, SYMMETRY_HELP
from deepcryo.convert import copyVolumeMrc, rowToAlignment
from deepcryo.core.errors import InputError
from deepcryo.core.mrc import read_mrc_header
from deepcryo.core.particles import read_particles
from deepcryo.landscape import selection
from deepcryo.protocols.protocol_base import DeepCryoProtBase, addGpuParams
from deepcryo.protocols.validation import particleErrors, symmetryErrors

OUTPUT_CLASSES = "outputClasses"
OUTPUT_TRAJECTORY = "outputTrajectory"
OUTPUT_ORDER_TRAJECTORY = "outputOrderTrajectory"
OUTPUT_VOLUMES = "outputVolumes"
OUTPUT_PC_VOLUMES = "outputPcVolumes"
OUTPUT_PATH_VOLUMES = "outputPathVolumes"
OUTPUT_VARIATION = "outputVariationMap"
SIGMA_ATTR = "_deepcryoZSigma"
PROG_NAME = "deepcryo.landscape"
POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")


def _latentColumns(star):
    return sorted(c for c in star.particles if c.startswith("dcLatent"))


def _sigmaColumns(star):
    return sorted(c for c in star.particles if c.startswith("dcZSigma"))


def _halvesLines(path):
    """Summary lines of a ``halves.json`` (gold-standard agreement of two half-set trainings)."""
    with open(path) as f:
        h = json.load(f)
    lines = ["Gold-standard halves (%s): latent R² half 2 → half 1 %.2f, first canonical correlation %.2f, "
             "k-means ARI %.2f." % (h["split"], h["r2_half2_to_half1"], h["canonical_correlations"][0],
                                    h["cluster_ari"])]
    for c in h["conformations"]:
        lines.append("cluster %d (%d particles): half-map FSC 0.5 at %.1f Å, 0.143 at %.1f Å"
                     % (c["cluster"], c["particles"], c["fsc05_A"], c["fsc0143_A"]))
    return lines


def _rowsById(star):
    """{Scipion id: row} of a STAR written from a Scipion set (``rlnImageId``)."""
    star.require("rlnImageId")
    return {int(i): r for r, i in enumerate(np.asarray(star.particles["rlnImageId"], dtype=np.int64))}


class DeepCryoProtVaeTrain(DeepCryoProtBase, ProtProcessParticles, ProtFlexBase):
    """Learns the conformational landscape of aligned particles with a variational autoencoder.

    The particles' consensus poses and CTF are used: the encoder maps each particle to a point of a
    low-dimensional latent space, the decoder maps a latent point to a volume whose projection at the
    particle's pose, times its CTF, should match the image. Images are Fourier-cropped to the working
    box. The output particles carry their latent coordinates (flexibility hub "zFlex") and their uncertainty
    (attribute ``_deepcryoZSigma``: the encoder's standard deviation σ per coordinate, latent units; the
    prior is N(0, I), so σ near 1 means the image does not place the particle along that coordinate).
    A second output, the variation map (working box, values 0 to 1), shows where the decoded volumes vary
    beyond the decoder's noise: the decoded volumes keep their variation there and are the consensus-like
    mean volume elsewhere.

    Gold-standard halves (optional): two more VAEs are trained independently on the two half sets (the
    particles' random subsets when they have them, else a random split) and compared on every particle: R²
    of the best affine map between their latent spaces, k-means agreement (ARI) and the FSC of the two halves'
    volumes at corresponding latent points. The summary shows the figures; a landscape the halves do not
    share is not supported by the data.

    Pose-free mode (experimental, the original method of the seed thesis): the particles' poses are not
    used; a pose head predicts them (quaternion + shift, both hands scored). Its measured accuracy is in
    the README ("Pose-free mode"); the output particles then carry the predicted poses.
    """
    _label = "landscape VAE train"
    _devStatus = BETA
    _possibleOutputs = {OUTPUT_PARTICLES: SetOfParticlesFlex, OUTPUT_VARIATION: Volume}

    def _defineParams(self, form):
        form.addSection(label=Message.LABEL_INPUT)
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles",
                      important=True, label="Input particles",
                      help="Particles with CTF and 3D alignment from a consensus refinement (pose-free mode: "
                           "CTF only).")
        form.addParam("poseFree", params.BooleanParam, default=False, label="Pose-free (experimental)?",
                      help="Ignore the particles' poses and learn them with a pose head (quaternion + shift, "
                           "mirror hand guarded). Much less accurate than using consensus poses: see the "
                           "README's measured figures.")
        form.addParam("referenceVolume", params.PointerParam, pointerClass="Volume", allowsNull=True,
                      condition="poseFree", label="Starting volume (optional)",
                      help="Low-resolution map to start the mean volume from; default a soft sphere.")
        form.addParam("symmetryGroup", params.StringParam, default="c1", condition="not poseFree",
                      label="Symmetry group",
                      help=SYMMETRY_HELP + " Every volume of the landscape has this symmetry; each particle costs "
                                           "one slice per operator, so for t, o and i symmetry-expand the particles "
                                           "(relion_particle_symmetry_expand) and use c1.")
        form.addParam("latentDim", params.IntParam, default=8, validators=[params.GE(1)],
                      label="Latent dimension",
                      help="Dimension of the latent (conformational) space. If the latent collapses (the summary "
                           "of the analysis says so: no active coordinate), a latent of 1 can still follow a "
                           "continuous motion.")
        form.addParam("workingBox", params.IntParam, default=64, validators=[params.GE(8)],
                      label="Working box (px)",
                      help="Images are Fourier-cropped to this even box (at most the particle box); "
                           "the pixel size grows accordingly. 64 or 128 are typical.")
        form.addParam("epochs", params.IntParam, default=20, validators=[params.GE(1)], label="Epochs",
                      help="Total number of passes over the particles (also when continuing).")
        form.addParam("batchSize", params.IntParam, default=64, validators=[params.GE(1)],
                      label="Batch size", help="Particles per optimisation step and GPU.")
        form.addParam("beta", params.FloatParam, default=1.0, validators=[params.GE(0)], label="β (KL weight)",
                      help="Weight of the Kullback-Leibler term of the VAE loss.")
        form.addParam("betaWarmup", params.FloatParam, default=0.25, validators=[params.GE(0)],
                      expertLevel=params.LEVEL_ADVANCED, label="KL warm-up (epochs)",
                      help="Epochs (a fraction allowed) at the start over which the weight of the "
                           "Kullback-Leibler term rises step by step from 0 to β, so that the decoder learns how "
                           "the particles vary before that term can pull every latent to the prior (at a "
                           "signal-to-noise ratio of about 0.01 the latent collapsed without it; a whole epoch "
                           "without the term let a 1-D motion curve over several coordinates). 0: none. The last "
                           "epoch always has the full term.")
        form.addParam("basis", params.IntParam, default=16, validators=[params.GE(1)],
                      expertLevel=params.LEVEL_ADVANCED, label="Basis volumes", help="Number of basis volumes of the decoder.")
        form.addParam("goldStandard", params.BooleanParam, default=False, condition="not poseFree",
                      label="Gold-standard halves?",
                      help="Also train one VAE per half set (the particles' random subsets, else a random split) "
                           "and report how well the two landscapes agree (latent R², cluster ARI, half-map FSC "
                           "per cluster). Triples the training time.")
        form.addParam("halfClusters", params.IntParam, default=2, validators=[params.GE(1)],
                      condition="goldStandard and not poseFree", label="Clusters compared",
                      help="k-means clusters whose labels and volumes are compared between the halves.")
        form.addParam("continueRun", params.BooleanParam, default=False, label="Continue a previous run?",
                      help="Resume from the last epoch of a previous training on the same particles.")
        form.addParam("previousRun", params.PointerParam, pointerClass="DeepCryoProtVaeTrain",
                      condition="continueRun", allowsNull=True, label="Previous run")
        addGpuParams(form, gpuLabel="GPU IDs",
                     gpuHelp="One or several GPUs (e.g. 0 1); several train in parallel (torch DDP).",
                     useGpuHelp="Train on CUDA GPUs (the run stops with one line if CUDA is not available).")
        form.addParallelSection(threads=4, mpi=0)

    def _insertAllSteps(self):
        self._insertEngineSteps(self.trainStep)

    def getTrainDir(self):
        return self._getExtraPath("vae")

    def _inputAlignType(self):
        return ALIGN_NONE if self.poseFree else None

    def convertInputStep(self):
        DeepCryoProtBase.convertInputStep(self)
        ref = self.referenceVolume.get() if self.poseFree else None
        if ref is not None:
            copyVolumeMrc(ref, self._getExtraPath("reference.mrc"))

    def getHalvesDir(self):
        return self._getExtraPath("halves")

    def _doHalves(self):
        return bool(self.goldStandard) and not self.poseFree

    def trainStep(self):
        options = ["--particles", self._inputParticlesStar(), "--latent-dim", self.latentDim.get(),
                   "--epochs", self.epochs.get(), "--box", min(self.workingBox.get(), self.inputParticles.get().getXDim()),
                   "--batch-size", self.batchSize.get(), "--beta", self.beta.get(),
                   "--beta-warmup-epochs", self.betaWarmup.get(), "--basis", self.basis.get(),
                   "--threads", self.numberOfThreads.get()]
        if self.usesGpu():  # several GPUs: the list %(GPU)s would become is no device name, so it is written out
            options += ["--device", ",".join(self._stepGpuDevices())]
        if not self.poseFree:
            options += ["--symmetry", self.symmetryGroup.get().strip()]
        args = ["train", "--output-dir", self.getTrainDir()] + options
        if self.poseFree:
            args.append("--pose-free")
            if self.referenceVolume.get() is not None:
                args += ["--reference", self._getExtraPath("reference.mrc")]
        if self.continueRun:
            os.makedirs(self.getTrainDir(), exist_ok=True)
            previous = self.previousRun.get().getTrainDir()
            for name in ("checkpoint.pt", "consensus.mrc"):
                shutil.copy(os.path.join(previous, name), self.getTrainDir())
            args.append("--continue")
        self._runProgram("landscape", args)
        if self._doHalves():
            self._runProgram("landscape", ["halves", "--output-dir", self.getHalvesDir(), "--clusters",
                                           self.halfClusters.get()] + options + self._continueHalves())

    def _continueHalves(self):
        """``--continue`` with the previous run's half checkpoints copied, when it trained halves."""
        previous = self.previousRun.get() if self.continueRun else None
        if previous is None or not os.path.exists(os.path.join(previous.getHalvesDir(), "half2", "checkpoint.pt")):
            return []
        for half in ("half1", "half2"):
            os.makedirs(os.path.join(self.getHalvesDir(), half), exist_ok=True)
            for name in ("checkpoint.pt", "consensus.mrc"):
                shutil.copy(os.path.join(previous.getHalvesDir(), half, name), os.path.join(self.getHalvesDir(), half))
        return ["--continue"]

    def createOutputStep(self):
        inputSet = self.inputParticles.get()
        star = read_particles(os.path.join(self.getTrainDir(), "particles_latent.star"), require_images=False)
        rows = _rowsById(star)
        z = np.stack([np.asarray(star.particles[c], dtype=np.float64) for c in _latentColumns(star)], 1)
        sigmaColumns = _sigmaColumns(star)
        sigma = (np.stack([np.asarray(star.particles[c], dtype=np.float64) for c in sigmaColumns], 1)
                 if sigmaColumns else None)
        outSet = self._createSetOfParticlesFlex(progName=PROG_NAME)
        outSet.copyInfo(inputSet)
        outSet.setHasCTF(inputSet.hasCTF())   # SetOfParticlesFlex.copyInfo from a SetOfParticles leaves it out
        poseFree = bool(self.poseFree)
        if poseFree:
            outSet.setAlignmentProj()
            px = inputSet.getSamplingRate()
        outSet.getFlexInfo().setAttr("_deepcryoTrainDir", os.path.abspath(self.getTrainDir()))
        for particle in inputSet.iterItems(orderBy="id"):
            r = rows.get(particle.getObjId())
            if r is None:
                continue
            flex = ParticleFlex(progName=PROG_NAME)
            flex.copyInfo(particle)
            flex.setObjId(particle.getObjId())
            flex.setZFlex([float(v) for v in z[r]])
            if sigma is not None:
                setattr(flex, SIGMA_ATTR, pwobj.CsvList(pType=float))
                getattr(flex, SIGMA_ATTR).set([float(v) for v in sigma[r]])
            if poseFree:   # the predicted poses, in the learned volume's frame and hand
                flex.setTransform(rowToAlignment({c: star.particles[c][r] for c in POSE_COLUMNS}, px))
            outSet.append(flex)
        variation = Volume(location=os.path.join(self.getTrainDir(), "variation_weight.mrc"))
        variation.setSamplingRate(read_mrc_header(variation.getFileName())[1])
        self._defineOutputs(**{OUTPUT_PARTICLES: outSet, OUTPUT_VARIATION: variation})
        self._defineSourceRelation(self.inputParticles, outSet)
        self._defineSourceRelation(self.inputParticles, variation)

    def _validate(self):
        errors = []
        particles = self.inputParticles.get()
        if particles is not None:
            errors += particleErrors(particles, "The input particles have no CTF.")
            if not particles.hasAlignmentProj() and not self.poseFree:
                errors.append("The input particles have no 3D alignment (angles and shifts): use the "
                              "output of a consensus refinement.")
        if self.continueRun and self.previousRun.get() is not None \
                and bool(self.poseFree) != bool(self.previousRun.get().poseFree):
            errors.append("A pose-free run cannot continue a run with given poses (or the reverse).")
        if self.workingBox.get() % 2:
            errors.append("The working box must be even.")
        if not self.poseFree:
            errors += symmetryErrors(self.symmetryGroup.get())
        previous = self.previousRun.get() if self.continueRun else None
        if previous is not None and not self.poseFree and not previous.poseFree \
                and previous.symmetryGroup.get().strip().upper() != self.symmetryGroup.get().strip().upper():
            errors.append("The symmetry group must be the previous run's (%s)." % previous.symmetryGroup.get())
        if self.continueRun and self.previousRun.get() is None:
            errors.append("Choose the previous run to continue.")
        return errors

    def _summary(self):
        if not hasattr(self, OUTPUT_PARTICLES):
            return ["Training not finished yet."]
        lines = ["%d particles with %d-dimensional latent coordinates%s."
                 % (getattr(self, OUTPUT_PARTICLES).getSize(), self.latentDim.get(),
                    " and predicted poses (pose-free)" if self.poseFree else "")]
        halves = os.path.join(self.getHalvesDir(), "halves.json")
        if self._doHalves() and os.path.exists(halves):
            lines += _halvesLines(halves)
        return lines

    def _methods(self):
        if not hasattr(self, OUTPUT_PARTICLES):
            return []
        particles = self.inputParticles.get()
        box = min(self.workingBox.get(), particles.getXDim())
        text = ("The conformational landscape of %d particles of %s was learned with deepcryo's landscape VAE, a "
                "variational autoencoder ([Kingma2014]) with a %d-dimensional latent space, trained for %d epoch%s "
                "(batch size %d, KL weight β = %g, %d basis volumes) on the particle images Fourier-cropped to "
                "%d px (%.2f Å/px). "
                % (particles.getSize(), self.getObjectTag("inputParticles"), self.latentDim.get(),
                   self.epochs.get(), "" if self.epochs.get() == 1 else "s", self.batchSize.get(), self.beta.get(),
                   self.basis.get(), box,
                   particles.getSamplingRate() * particles.getXDim() / box))
        if self.poseFree:
            text += ("The particles' poses were not used: a pose head predicted each particle's orientation and "
                     "shift together with its latent coordinates (pose-free mode, after [Bunzel2022]; "
                     "experimental), and the decoded volume's projection at that pose, modulated by the "
                     "particle's CTF, was compared with the image.")
        else:
            text += ("As in cryoDRGN ([Zhong2021]), each particle's consensus pose and CTF were used: the encoder "
                     "maps the particle to latent coordinates, and the decoder maps them to a volume whose "
                     "projection at the particle's pose, modulated by its CTF, is compared with the image "
                     "(after the landscape networks of [Bunzel2022]).")
        if not self.poseFree and self.symmetryGroup.get().strip().upper() != "C1":
            text += (" Every decoded volume had %s symmetry (the average of the decoder's volume over the "
                     "group's operators)." % self.symmetryGroup.get().strip().upper())
        if self._doHalves():
            text += (" Two more VAEs were trained independently on the two half sets of the particles, and their "
                     "landscapes compared on every particle (affine map between the latent spaces, k-means "
                     "agreement, FSC of the halves' volumes at corresponding latent points).")
        return [text + " The output particles (%s) carry their latent coordinates."
                % self.getObjectTag(OUTPUT_PARTICLES)]

    def _citations(self):
        return ["Kingma2014", "Zhong2021", "Bunzel2022"]


class DeepCryoProtVaeAnalyze(DeepCryoProtBase, ProtAnalysis3D):
    """Analyses a trained landscape VAE: embeddings (PCA of the latents in units of the encoder's σ, optionally
    UMAP), a landscape plot (density and −ln density), clusters (k-means; K suggested by a Gaussian-mixture BIC
    when not given), one volume per cluster (reconstructed from its particles at the working box; the decoded
    volume is kept in the extra folder) and volumes along the first principal component (trajectory; the second
    one's volumes are in the extra folder for the viewer), and volumes along the landscape's order (the first
    coordinate of a Laplacian eigenmap of the latent, ``dcOrder``), which follows a continuous motion where the
    landscape is curved and PC1 folds the motion's two ends together.

    Outputs: the clusters as 3D classes (their maps as representatives), the same cluster maps as a set of
    volumes (in cluster order, like RELION's 3D classification), the PC1 trajectory and the order trajectory.
    The cluster maps are the initial maps of a multi-reference SwiftRes refinement (one class per cluster),
    which aligns each particle to the map of its own state; a landscape trained on its poses separates the
    states better than one trained on single-reference poses (README, "Landscape from estimated poses").
    """
    _label = "landscape VAE analyze"
    _devStatus = BETA
    _possibleOutputs = {OUTPUT_CLASSES: SetOfClasses3D, OUTPUT_VOLUMES: SetOfVolumes,
                        OUTPUT_TRAJECTORY: SetOfVolumes, OUTPUT_ORDER_TRAJECTORY: SetOfVolumes}

    EMBEDDINGS = ["PCA", "PCA and UMAP"]

    def _defineParams(self, form):
        form.addSection(label=Message.LABEL_INPUT)
        form.addParam("trainRun", params.PointerParam, pointerClass="DeepCryoProtVaeTrain", important=True,
                      label="Training run")
        form.addParam("numberOfClusters", params.IntParam, default=0, validators=[params.GE(0)],
                      label="Number of clusters", help="0: automatic (elbow of the Gaussian-mixture BIC).")
        form.addParam("embedding", params.EnumParam, choices=self.EMBEDDINGS, default=0,
                      label="Embedding",
                      help="PCA: principal components of the latent coordinates, each measured in units of the "
                           "encoder's uncertainty (its sigma), so that PC1 is the direction along which the images "
                           "place the particles most surely, not merely the widest. UMAP needs umap-learn in "
                           "deepcryo's Python.")
        form.addParam("trajectorySteps", params.IntParam, default=7, validators=[params.GE(2)],
                      label="Trajectory volumes", help="Volumes along PC1, from −2 to +2 standard deviations.")
        form.addParallelSection(threads=4, mpi=0)

    def _insertAllSteps(self):
        self._insertFunctionStep(self.analyzeStep)
        self._insertFunctionStep(self.createOutputStep)

    def analyzeStep(self):
        args = ["analyze", self.trainRun.get().getTrainDir(), "--output-dir", self._getExtraPath("analysis"),
                "--clusters", self.numberOfClusters.get(), "--trajectory-steps", self.trajectorySteps.get(),
                "--pcs", 2, "--threads", self.numberOfThreads.get()]
        if self.embedding.get() == 0:
            args.append("--no-umap")
        self._runProgram("landscape", args)

    def createOutputStep(self):
        folder = self._getExtraPath("analysis")
        with open(os.path.join(folder, "summary.json")) as f:
            summary = json.load(f)
        px = summary["pixel_size_A"]
        particles = self.trainRun.get().inputParticles.get()
        star = read_particles(os.path.join(folder, "particles.star"), require_images=False)
        rows = _rowsById(star)
        labels = np.asarray(star.particles["dcCluster"], dtype=np.int64)

        def updateItem(item, _row=None):
            r = rows.get(item.getObjId())
            if r is None:
                item._appendItem = False
            else:
                item.setClassId(int(labels[r]))

        def clusterMap(k):
            return os.path.join(folder, "cluster_%02d_reconstructed.mrc" % k)

        def updateClass(cls):
            rep = Volume(location=clusterMap(cls.getObjId()))
            rep.setSamplingRate(px)
            cls.setRepresentative(rep)

        classes = self._createSetOfClasses3D(particles)
        classes.classifyItems(updateItemCallback=updateItem, updateClassCallback=updateClass)
        volumes = self._volumeSet([clusterMap(c["cluster"]) for c in summary["clusters"]], px, "clusters",
                                  ["cluster %d" % c["cluster"] for c in summary["clusters"]])
        trajectory = self._volumeSet(sorted(glob(os.path.join(folder, "pc1_step*.mrc"))), px, "trajectory")
        order = self._volumeSet(sorted(glob(os.path.join(folder, "order_step*.mrc"))), px, "order")
        outputs = {OUTPUT_CLASSES: classes, OUTPUT_VOLUMES: volumes, OUTPUT_TRAJECTORY: trajectory,
                   OUTPUT_ORDER_TRAJECTORY: order}
        self._defineOutputs(**outputs)
        for output in outputs.values():
            self._defineSourceRelation(self.trainRun.get().inputParticles, output)

    def _volumeSet(self, paths, px, suffix, labels=None):
        volumes = self._createSetOfVolumes(suffix)
        volumes.setSamplingRate(px)
        for i, fn in enumerate(paths):
            vol = Volume(location=fn)
            vol.setSamplingRate(px)
            if labels:
                vol.setObjLabel(labels[i])
            volumes.append(vol)
        return volumes

    def _validate(self):
        run = self.trainRun.get()
        if run is not None and not hasattr(run, OUTPUT_PARTICLES):
            return ["The training run has not finished."]
        return []

    def _summary(self):
        if not hasattr(self, OUTPUT_CLASSES):
            return ["Analysis not finished yet."]
        with open(self._getExtraPath("analysis", "summary.json")) as f:
            summary = json.load(f)
        lines = ["%d clusters (BIC suggested %d)." % (summary["clusters_used"], summary["suggested_clusters"])]
        if summary.get("active_coordinates") == 0:
            lines.append("No active latent coordinate (posterior collapse: every particle's latent is the prior): "
                         "the VAE found no heterogeneity it can resolve particle by particle; the landscape and its "
                         "clusters are noise. At low signal-to-noise ratios train again with a longer KL "
                         "warm-up (advanced) or latent dimension 1.")
        if summary.get("active_coordinates") != 0 and summary.get("order_pc1_rho", 1.0) < 0.9:
            lines.append("PC1 follows the landscape's order only with |rho| %.2f: if the heterogeneity is a "
                         "continuous motion, the landscape is curved and the PC1 trajectory mixes its two ends; "
                         "use the order trajectory (%s)." % (summary["order_pc1_rho"], OUTPUT_ORDER_TRAJECTORY))
        for c in summary["clusters"]:
            lines.append("cluster %d: %d particles; decoded vs reconstructed FSC 0.5 at %.1f Å"
                         % (c["cluster"], c["particles"], c["decoded_vs_reconstructed_fsc05_A"]))
        return lines

    def _methods(self):
        if not hasattr(self, OUTPUT_CLASSES):
            return []
        with open(self._getExtraPath("analysis", "summary.json")) as f:
            summary = json.load(f)
        clusters = ("%d clusters (the number suggested by the elbow of the Bayesian information criterion of "
                    "Gaussian mixtures)" % summary["clusters_used"] if self.numberOfClusters.get() == 0
                    else "%d clusters" % summary["clusters_used"])
        return ["The latent coordinates learned by %s were analysed with deepcryo as cryoDRGN's analysis does "
                "([Zhong2021]): %s embeddings of the latent space, k-means clustering into %s, one map per cluster "
                "reconstructed from its particles at their consensus poses (outputs %s and %s), and %d volumes "
                "decoded along the first principal component from −2 to +2 standard deviations (output %s) and "
                "as many at the mean latent of equal-count bins along the first coordinate of a Laplacian "
                "eigenmap of the latent ([Belkin2003]; output %s)."
                % (self.getObjectTag("trainRun"), self.EMBEDDINGS[self.embedding.get()], clusters,
                   self.getObjectTag(OUTPUT_CLASSES), self.getObjectTag(OUTPUT_VOLUMES), self.trajectorySteps.get(),
                   self.getObjectTag(OUTPUT_TRAJECTORY), self.getObjectTag(OUTPUT_ORDER_TRAJECTORY))]

    def _citations(self):
        return ["Zhong2021", "Bunzel2022", "Belkin2003"]


class DeepCryoProtVaeSelect(DeepCryoProtBase, ProtProcessParticles, ProtFlexBase):
    """Subset of the particles of a landscape-VAE analysis, chosen on its landscape: the particles inside a
    region drawn in the viewer (its selection file), inside a polygon typed as coordinates, or in given clusters.

    The output holds the training run's particles themselves (latent coordinates, CTF, poses), so it can be
    refined, reconstructed or analysed again.
    """
    _label = "landscape VAE select"
    _devStatus = BETA
    _possibleOutputs = {OUTPUT_PARTICLES: SetOfParticlesFlex}

    SELECT_FILE, SELECT_POLYGON, SELECT_CLUSTERS = 0, 1, 2
    EMBEDDINGS = list(selection.EMBEDDING_COLUMNS)

    def _defineParams(self, form):
        form.addSection(label=Message.LABEL_INPUT)
        form.addParam("analyzeRun", params.PointerParam, pointerClass="DeepCryoProtVaeAnalyze", important=True,
                      label="Analysis run", help="The particles come from its training run's output.")
        form.addParam("selectBy", params.EnumParam, choices=["region drawn in the viewer", "polygon",
                                                             "clusters"],
                      default=self.SELECT_FILE, label="Select by",
                      help="Region drawn in the viewer: the selection file that the analysis viewer's "
                           "'Select particles on the landscape' writes (its button 'Create subset' fills this "
                           "form). Polygon: vertices typed on an embedding. Clusters: the analysis' cluster "
                           "numbers.")
        form.addParam("selectionFile", params.FileParam, condition="selectBy == %d" % self.SELECT_FILE,
                      label="Selection file", help="Particle ids, one per line (lines starting with # ignored).")
        form.addParam("embedding", params.EnumParam, choices=self.EMBEDDINGS, default=0,
                      display=params.EnumParam.DISPLAY_HLIST, condition="selectBy == %d" % self.SELECT_POLYGON,
                      label="Embedding", help="The landscape the polygon is drawn on (UMAP only if computed).")
        form.addParam("polygon", params.StringParam, condition="selectBy == %d" % self.SELECT_POLYGON,
                      label="Polygon vertices", help="x y pairs in the embedding's units, e.g. "
                                                     "'-1 -1, 1 -1, 1 1, -1 1'; the polygon closes itself.")
        form.addParam("clusters", params.NumericListParam, condition="selectBy == %d" % self.SELECT_CLUSTERS,
                      label="Clusters", help="Cluster numbers as the analysis shows them, e.g. '1 3' or '2-4'.")

    def _insertAllSteps(self):
        self._insertFunctionStep(self.selectStep)
        self._insertFunctionStep(self.createOutputStep)

    # --------------------------- STEPS functions ---------------------------------------------------
    def _analysisColumns(self):
        star = read_particles(os.path.join(self.analyzeRun.get()._getExtraPath("analysis"), "particles.star"),
                              require_images=False)
        star.require("rlnImageId")
        return star.particles

    def _selectedIds(self):
        """Ids of the chosen particles, with the choice described in words."""
        if self.selectBy.get() == self.SELECT_FILE:
            ids, header = selection.read_selection(self.selectionFile.get())
            return ids, "a region drawn on the %s landscape" % header.get("embedding", "chosen")
        columns = self._analysisColumns()
        ids = columns["rlnImageId"]
        if self.selectBy.get() == self.SELECT_POLYGON:
            embedding = self.EMBEDDINGS[self.embedding.get()]
            vertices = selection.parse_polygon(self.polygon.get())
            return (selection.select_by_polygon(ids, selection.embedding_xy(columns, embedding), vertices),
                    "the polygon %s on the %s landscape" % (selection.format_polygon(vertices), embedding))
        wanted = self._clusterNumbers()
        return (selection.select_by_clusters(ids, columns["dcCluster"], wanted),
                "cluster%s %s" % ("" if len(wanted) == 1 else "s", ", ".join(map(str, wanted))))

    def _clusterNumbers(self):
        return sorted(set(int(c) for c in self.clusters.getListFromRange()))

    def selectStep(self):
        ids, how = self._selectedIds()
        if not ids:
            raise InputError("No particle selected by %s." % how)
        selection.write_selection(self._getExtraPath("selection.txt"), ids)
        with open(self._getExtraPath("selection_how.txt"), "w") as f:
            f.write(how + "\n")

    def createOutputStep(self):
        wanted, _ = selection.read_selection(self._getExtraPath("selection.txt"))
        wanted = set(wanted)
        inputSet = self._inputParticles()

        def keepSelected(item, _row=None):
            item._appendItem = item.getObjId() in wanted

        outSet = self._createSetOfParticlesFlex(progName=PROG_NAME)
        outSet.copyInfo(inputSet)
        outSet.copyItems(inputSet, updateItemCallback=keepSelected)
        missing = len(wanted) - outSet.getSize()
        if missing:
            raise InputError("%d of the %d selected particle ids are not particles of %s (a selection made on "
                             "another analysis?)" % (missing, len(wanted), self.getObjectTag("analyzeRun")))
        self._defineOutputs(**{OUTPUT_PARTICLES: outSet})
        self._defineSourceRelation(self.analyzeRun.get().trainRun.get().outputParticles, outSet)

    def _inputParticles(self):
        return getattr(self.analyzeRun.get().trainRun.get(), OUTPUT_PARTICLES)

    # --------------------------- INFO functions ----------------------------------------------------
    def _validate(self):
        errors = []
        run = self.analyzeRun.get()
        if run is not None and not hasattr(run, OUTPUT_CLASSES):
            errors.append("The analysis run has not finished.")
        try:
            if self.selectBy.get() == self.SELECT_FILE:
                if not self.selectionFile.get() or not os.path.exists(self.selectionFile.get()):
                    errors.append("Choose the selection file written by the analysis viewer.")
                else:
                    selection.read_selection(self.selectionFile.get())
            elif self.selectBy.get() == self.SELECT_POLYGON:
                selection.parse_polygon(self.polygon.get())
            elif not self.clusters.get() or not self._clusterNumbers():
                errors.append("Give the numbers of the clusters to keep.")
        except (InputError, ValueError) as exc:
            errors.append(str(exc))
        return errors

    def _how(self):
        with open(self._getExtraPath("selection_how.txt")) as f:
            return f.read().strip()

    def _summary(self):
        if not hasattr(self, OUTPUT_PARTICLES):
            return ["Selection not made yet."]
        return ["%d of %d particles, selected by %s."
                % (getattr(self, OUTPUT_PARTICLES).getSize(), self._inputParticles().getSize(), self._how())]

    def _methods(self):
        if not hasattr(self, OUTPUT_PARTICLES):
            return []
        return ["%d of the %d particles analysed by %s were selected by %s on the conformational landscape "
                "(latent space of the VAE, [Zhong2021]); the subset (%s) keeps their latent coordinates."
                % (getattr(self, OUTPUT_PARTICLES).getSize(), self._inputParticles().getSize(),
                   self.getObjectTag("analyzeRun"), self._how(), self.getObjectTag(OUTPUT_PARTICLES))]

    def _citations(self):
        return ["Zhong2021"]


class DeepCryoProtVaeVolumes(DeepCryoProtBase, ProtAnalysis3D):
    """Volumes of a landscape VAE along chosen trajectories: along the first principal components of the
    particles' latent coordinates (between two percentiles of the particles' scores, as cryoDRGN's
    ``analyze --pc``), and along a path through the data between two clusters of an analysis (the shortest
    path in the k-nearest-neighbour graph of the particles' latents, from the particle nearest to one cluster
    centre to the particle nearest to the other, as cryoDRGN's ``graph_traversal``). The volumes are decoded at
    the training's working box and pixel size; their latent points are in the extra folder (``*_z.txt``).
    """
    _label = "landscape VAE volumes"
    _devStatus = BETA
    _possibleOutputs = {OUTPUT_PC_VOLUMES: SetOfVolumes, OUTPUT_PATH_VOLUMES: SetOfVolumes}

    def _defineParams(self, form):
        form.addSection(label=Message.LABEL_INPUT)
        form.addParam("analyzeRun", params.PointerParam, pointerClass="DeepCryoProtVaeAnalyze", important=True,
                      label="Landscape analysis", help="The analysis whose training and clusters are used.")
        form.addParam("pcs", params.IntParam, default=2, validators=[params.GE(0)],
                      label="Principal components", help="Number of principal components with a trajectory (0: none).")
        form.addParam("pcPoints", params.IntParam, default=10, validators=[params.GE(2)], condition="pcs > 0",
                      label="Volumes per component", help="Evenly spaced along the component between the percentiles.")
        form.addParam("pcLow", params.FloatParam, default=5.0, validators=[params.Range(0, 100)],
                      condition="pcs > 0", expertLevel=params.LEVEL_ADVANCED, label="From percentile",
                      help="The trajectory runs between these percentiles of the particles' scores on the component.")
        form.addParam("pcHigh", params.FloatParam, default=95.0, validators=[params.Range(0, 100)],
                      condition="pcs > 0", expertLevel=params.LEVEL_ADVANCED, label="To percentile")
        form.addParam("doPath", params.BooleanParam, default=True, label="Path between two clusters?",
                      help="Volumes along the shortest path through the particles' latents between two clusters.")
        form.addParam("pathFrom", params.IntParam, default=1, validators=[params.GE(1)], condition="doPath",
                      label="From cluster", help="Cluster (class) number of the analysis where the path starts: at "
                                                 "the particle nearest to its centre.")
        form.addParam("pathTo", params.IntParam, default=2, validators=[params.GE(1)], condition="doPath",
                      label="To cluster", help="Cluster (class) number where the path ends.")
        form.addParam("pathPoints", params.IntParam, default=10, validators=[params.GE(2)], condition="doPath",
                      label="Volumes along the path", help="Evenly spaced in latent distance along the path.")
        form.addParam("neighbors", params.IntParam, default=10, validators=[params.GE(1)], condition="doPath",
                      expertLevel=params.LEVEL_ADVANCED, label="Neighbours in the graph",
                      help="Each particle is joined to this many nearest particles in latent space; more joins "
                           "separated groups.")
        form.addParallelSection(threads=1, mpi=0)

    def _insertAllSteps(self):
        self._insertFunctionStep(self.volumesStep)
        self._insertFunctionStep(self.createOutputStep)

    def _analysisDir(self):
        return self.analyzeRun.get()._getExtraPath("analysis")

    def volumesStep(self):
        args = ["volumes", self.analyzeRun.get().trainRun.get().getTrainDir(), "--output-dir",
                self._getExtraPath("volumes"), "--threads", self.numberOfThreads.get()]
        if self.pcs.get() > 0:
            args += ["--pc", self.pcs.get(), "--pc-points", self.pcPoints.get(),
                     "--percentiles", self.pcLow.get(), self.pcHigh.get()]
        if self.doPath:
            args += ["--path-zfile", os.path.join(self._analysisDir(), "cluster_centres.txt"),
                     "--path-rows", self.pathFrom.get(), self.pathTo.get(),
                     "--path-points", self.pathPoints.get(), "--neighbors", self.neighbors.get()]
        self._runProgram("landscape", args)

    def _volumeSet(self, summary, names, suffix):
        volumes = self._createSetOfVolumes(suffix)
        volumes.setSamplingRate(summary["pixel_size_A"])
        for name in names:
            for fn in summary["sets"][name]["volumes"]:
                vol = Volume(location=self._getExtraPath("volumes", fn))
                vol.setSamplingRate(summary["pixel_size_A"])
                volumes.append(vol)
        return volumes

    def createOutputStep(self):
        with open(self._getExtraPath("volumes", "volumes.json")) as f:
            summary = json.load(f)
        outputs = {}
        if self.pcs.get() > 0:
            outputs[OUTPUT_PC_VOLUMES] = self._volumeSet(summary, ["pc%d" % (j + 1) for j in range(self.pcs.get())],
                                                         "pcs")
        if self.doPath:
            outputs[OUTPUT_PATH_VOLUMES] = self._volumeSet(summary, ["path"], "path")
        self._defineOutputs(**outputs)
        particles = self.analyzeRun.get().trainRun.get().inputParticles
        for output in outputs.values():
            self._defineSourceRelation(particles, output)

    def _validate(self):
        errors = []
        run = self.analyzeRun.get()
        if run is not None:
            if not hasattr(run, OUTPUT_CLASSES):
                errors.append("The analysis has not finished.")
            elif self.doPath:
                centres = os.path.join(self._analysisDir(), "cluster_centres.txt")
                if not os.path.exists(centres):
                    errors.append("The analysis has no cluster centres (%s): run the analysis again." % centres)
                else:
                    n = getattr(run, OUTPUT_CLASSES).getSize()
                    for label, k in (("From", self.pathFrom.get()), ("To", self.pathTo.get())):
                        if not 1 <= k <= n:
                            errors.append("%s cluster %d: the analysis has clusters 1 to %d." % (label, k, n))
            latentDim = run.trainRun.get().latentDim.get() if run.trainRun.get() is not None else 0
            if self.pcs.get() > latentDim > 0:
                errors.append("At most %d principal components (the latent dimension)." % latentDim)
        if self.pcs.get() == 0 and not self.doPath:
            errors.append("Nothing to decode: ask for principal components or a path.")
        if self.pcs.get() > 0 and self.pcLow.get() >= self.pcHigh.get():
            errors.append("The first percentile must be below the second.")
        if self.doPath and self.pathFrom.get() == self.pathTo.get():
            errors.append("Choose two different clusters for the path.")
        return errors

    def _summary(self):
        if not (hasattr(self, OUTPUT_PC_VOLUMES) or hasattr(self, OUTPUT_PATH_VOLUMES)):
            return ["Volumes not decoded yet."]
        lines = []
        if hasattr(self, OUTPUT_PC_VOLUMES):
            lines.append("%d volumes along each of %d principal components (percentiles %g to %g)."
                         % (self.pcPoints.get(), self.pcs.get(), self.pcLow.get(), self.pcHigh.get()))
        if hasattr(self, OUTPUT_PATH_VOLUMES):
            with open(self._getExtraPath("volumes", "volumes.json")) as f:
                path = json.load(f)["sets"]["path"]
            lines.append("%d volumes along a path of %d particles from cluster %d to cluster %d."
                         % (len(path["volumes"]), len(path["particles"]), self.pathFrom.get(), self.pathTo.get()))
        return lines

    def _methods(self):
        if not (hasattr(self, OUTPUT_PC_VOLUMES) or hasattr(self, OUTPUT_PATH_VOLUMES)):
            return []
        parts = []
        if hasattr(self, OUTPUT_PC_VOLUMES):
            parts.append("%d volumes along each of the first %d principal components of the particles' latent "
                         "coordinates, between the %g and %g percentiles of their scores (output %s)"
                         % (self.pcPoints.get(), self.pcs.get(), self.pcLow.get(), self.pcHigh.get(),
                            self.getObjectTag(OUTPUT_PC_VOLUMES)))
        if hasattr(self, OUTPUT_PATH_VOLUMES):
            parts.append("%d volumes along the shortest path between clusters %d and %d in the %d-nearest-neighbour "
                         "graph of the latent coordinates (output %s)"
                         % (self.pathPoints.get(), self.pathFrom.get(), self.pathTo.get(), self.neighbors.get(),
                            self.getObjectTag(OUTPUT_PATH_VOLUMES)))
        return ["The landscape of %s was sampled as in cryoDRGN ([Zhong2021]): %s were decoded."
                % (self.getObjectTag("analyzeRun"), " and ".join(parts))]

    def _citations(self):
        return ["Zhong2021"]
