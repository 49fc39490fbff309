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
import pyworkflow.protocol.params as params
from pyworkflow.constants import BETA
from pyworkflow.utils import Message
from pwem.constants import ALIGN_NONE
from pwem.objects import ParticleFlex, SetOfClasses3D, SetOfParticlesFlex, SetOfVolumes, Volume
from pwem.protocols import ProtAnalysis3D, ProtFlexBase, ProtProcessParticles

from deepcryo.constants import OUTPUT_PARTICLES
from deepcryo.convert import copyVolumeMrc, rowToAlignment
from deepcryo.core.errors import InputError
from deepcryo.core.particles import read_particles
from deepcryo.landscape import selection
from deepcryo.protocols.protocol_base import DeepCryoProtBase, addGpuParams
from deepcryo.protocols.validation import particleErrors

OUTPUT_CLASSES = "outputClasses"
OUTPUT_TRAJECTORY = "outputTrajectory"
PROG_NAME = "deepcryo.landscape"
POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")


def _latentColumns(star):
    return sorted(c for c in star.particles if c.startswith("dcLatent"))


def _rowsById(star):
    """{Scipion id: row} of a STAR written from a Scipion set (``rlnImageId``)."""
    star.require("rlnImageId")
    return {int(i): r for r, i in enumerate(np.asarray(star.particles["rlnImageId"], dtype=np.int64))}


class DeepCryoProtVaeTrain(DeepCryoProtBase, ProtProcessParticles, ProtFlexBase):
    """Learns the conformational landscape of aligned particles with a variational autoencoder.

    The particles' consensus poses and CTF are used: the encoder maps each particle to a point of a
    low-dimensional latent space, the decoder maps a latent point to a volume whose projection at the
    particle's pose, times its CTF, should match the image. Images are Fourier-cropped to the working
    box. The output particles carry their latent coordinates (flexibility hub "zFlex").

    Pose-free mode (experimental, the original method of the seed thesis): the particles' poses are not
    used; a pose head predicts them (quaternion + shift, both hands scored). Its measured accuracy is in
    the README ("Pose-free mode"); the output particles then carry the predicted poses.
    """
    _label = "landscape VAE train"
    _devStatus = BETA
    _possibleOutputs = {OUTPUT_PARTICLES: SetOfParticlesFlex}

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
        form.addParam("latentDim", params.IntParam, default=8, validators=[params.GE(1)],
                      label="Latent dimension", help="Dimension of the latent (conformational) space.")
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
        form.addParam("basis", params.IntParam, default=16, validators=[params.GE(1)],
                      expertLevel=params.LEVEL_ADVANCED, label="Basis volumes", help="Number of basis volumes of the decoder.")
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

    def trainStep(self):
        args = ["train", "--particles", self._inputParticlesStar(), "--output-dir",
                self.getTrainDir(), "--latent-dim", self.latentDim.get(), "--epochs", self.epochs.get(),
                "--box", min(self.workingBox.get(), self.inputParticles.get().getXDim()),
                "--batch-size", self.batchSize.get(), "--beta", self.beta.get(), "--basis", self.basis.get(),
                "--threads", self.numberOfThreads.get()]
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
        if self.usesGpu():  # several GPUs: the list %(GPU)s would become is no device name, so it is written out
            args += ["--device", ",".join(self._stepGpuDevices())]
        self._runProgram("landscape", args)

    def createOutputStep(self):
        inputSet = self.inputParticles.get()
        star = read_particles(os.path.join(self.getTrainDir(), "particles_latent.star"), require_images=False)
        rows = _rowsById(star)
        z = np.stack([np.asarray(star.particles[c], dtype=np.float64) for c in _latentColumns(star)], 1)
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
            if poseFree:   # the predicted poses, in the learned volume's frame and hand
                flex.setTransform(rowToAlignment({c: star.particles[c][r] for c in POSE_COLUMNS}, px))
            outSet.append(flex)
        self._defineOutputs(**{OUTPUT_PARTICLES: outSet})
        self._defineSourceRelation(self.inputParticles, outSet)

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
        if self.continueRun and self.previousRun.get() is None:
            errors.append("Choose the previous run to continue.")
        return errors

    def _summary(self):
        if not hasattr(self, OUTPUT_PARTICLES):
            return ["Training not finished yet."]
        return ["%d particles with %d-dimensional latent coordinates%s."
                % (getattr(self, OUTPUT_PARTICLES).getSize(), self.latentDim.get(),
                   " and predicted poses (pose-free)" if self.poseFree else "")]

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
        return [text + " The output particles (%s) carry their latent coordinates."
                % self.getObjectTag(OUTPUT_PARTICLES)]

    def _citations(self):
        return ["Kingma2014", "Zhong2021", "Bunzel2022"]


class DeepCryoProtVaeAnalyze(DeepCryoProtBase, ProtAnalysis3D):
    """Analyses a trained landscape VAE: embeddings (PCA, optionally UMAP), a landscape plot (density
    and −ln density), clusters (k-means; K suggested by a Gaussian-mixture BIC when not given), one volume
    per cluster (reconstructed from its particles; the decoded volume is kept in the extra folder) and
    volumes along the first principal component (trajectory; the second one's volumes are in the extra
    folder for the viewer).
    """
    _label = "landscape VAE analyze"
    _devStatus = BETA
    _possibleOutputs = {OUTPUT_CLASSES: SetOfClasses3D, OUTPUT_TRAJECTORY: SetOfVolumes}

    EMBEDDINGS = ["PCA", "PCA and UMAP"]

    def _defineParams(self, form):
        form.addSection(label=Message.LABEL_INPUT)
        form.addParam("trainRun", params.PointerParam, pointerClass="DeepCryoProtVaeTrain", important=True,
                      label="Training run")
        form.addParam("numberOfClusters", params.IntParam, default=0, validators=[params.GE(0)],
                      label="Number of clusters", help="0: automatic (elbow of the Gaussian-mixture BIC).")
        form.addParam("embedding", params.EnumParam, choices=self.EMBEDDINGS, default=0,
                      label="Embedding", help="UMAP needs umap-learn in deepcryo's Python.")
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

        def updateClass(cls):
            fn = os.path.join(folder, "cluster_%02d_reconstructed.mrc" % cls.getObjId())
            rep = Volume(location=fn)
            rep.setSamplingRate(px)
            cls.setRepresentative(rep)

        classes = self._createSetOfClasses3D(particles)
        classes.classifyItems(updateItemCallback=updateItem, updateClassCallback=updateClass)
        trajectory = self._createSetOfVolumes("trajectory")
        trajectory.setSamplingRate(px)
        for fn in sorted(glob(os.path.join(folder, "pc1_step*.mrc"))):
            vol = Volume(location=fn)
            vol.setSamplingRate(px)
            trajectory.append(vol)
        self._defineOutputs(**{OUTPUT_CLASSES: classes, OUTPUT_TRAJECTORY: trajectory})
        self._defineSourceRelation(self.trainRun.get().inputParticles, classes)
        self._defineSourceRelation(self.trainRun.get().inputParticles, trajectory)

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
                "reconstructed from its particles at their consensus poses (output %s), and %d volumes decoded "
                "along the first principal component from −2 to +2 standard deviations (output %s)."
                % (self.getObjectTag("trainRun"), self.EMBEDDINGS[self.embedding.get()], clusters,
                   self.getObjectTag(OUTPUT_CLASSES), self.trajectorySteps.get(),
                   self.getObjectTag(OUTPUT_TRAJECTORY))]

    def _citations(self):
        return ["Zhong2021", "Bunzel2022"]


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
