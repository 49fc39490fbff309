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
"""DeepCryoProtVaeTrain / DeepCryoProtVaeAnalyze / DeepCryoProtVaeVolumes headless on a small simulated two-state set (CPU).

Checks the Scipion wiring (flexible particles with latent coordinates and their σ, resume, gold-standard
halves resumed and summarised, classes with one volume each, trajectory, the landscape viewer drawn
headless, PC and path volumes); the accuracy of the engine is tested in
``test_landscape.py``.

The project has a name unique to this process: ``setupTestProject`` names it after the class, and
``Manager.createProject`` deletes an existing project of that name, so two runs of this test sharing one
Scipion user-data folder (an existing Scipion configuration, or two runners at once) deleted each other's
project mid-run and the protocol subprocess failed with "project path ... does not exist" (the flaky
failure seen before).
"""
import os
import uuid

import numpy as np
import torch
from pyworkflow.project import Manager

from deepcryo.constants import OUTPUT_PARTICLES
from deepcryo.core import simulate
from deepcryo.protocols import DeepCryoProtVaeAnalyze, DeepCryoProtVaeTrain, DeepCryoProtVaeVolumes
from deepcryo.protocols.protocol_vae import (OUTPUT_CLASSES, OUTPUT_PATH_VOLUMES, OUTPUT_PC_VOLUMES, OUTPUT_TRAJECTORY,
                                             SIGMA_ATTR)
from deepcryo.tests.harness import ProtocolTest
from deepcryo.tests.sets import importParticleSet, particleSetFromStar

BOX, PX, N = 32, 3.0, 400


class TestDeepCryoVae(ProtocolTest):

    @classmethod
    def setUpClass(cls):
        cls.projName = "%s_%d_%s" % (cls.__name__, os.getpid(), uuid.uuid4().hex[:8])
        cls.proj = Manager().createProject(cls.projName)
        cls.outputPath = cls.proj.path
        os.chdir(cls.outputPath)     # pyworkflow launches protocols relative to the project folder
        folder = os.path.abspath(cls.proj.getPath("simulated"))
        vols = simulate.phantom_states(BOX, 2, seed=5)
        state_of = np.random.default_rng(5).permutation(np.arange(N) % 2)
        star = simulate.write_particle_set(folder, vols, N, PX, snr=0.1, seed=5, state_of=state_of)
        cls.importProt = importParticleSet(cls, particleSetFromStar(star, os.path.join(folder, "aligned.sqlite")), PX)

    def _train(self, **kwargs):
        prot = self.newProtocol(DeepCryoProtVaeTrain, latentDim=2, workingBox=16, batchSize=50, basis=4,
                                useGpu=False, numberOfThreads=1, **kwargs)
        prot.inputParticles.set(self.importProt.outputParticles)
        self.assertEqual(prot.validate(), [])
        self.launchProtocol(prot)
        return prot

    def testTrainContinueAnalyze(self):
        first = self._train(epochs=1, goldStandard=True, objLabel="vae 1 epoch, halves")
        second = self._train(epochs=2, goldStandard=True, continueRun=True, previousRun=first,
                             objLabel="vae continued, halves")
        flex = getattr(second, OUTPUT_PARTICLES)
        self.assertEqual(flex.getSize(), N)
        self.assertEqual(len(flex.getFirstItem().getZFlex()), 2)
        sigma = [float(v) for v in getattr(flex.getFirstItem(), SIGMA_ATTR)]
        self.assertEqual(len(sigma), 2)
        self.assertTrue(all(v > 0 for v in sigma))
        # the halves continued too (epoch 2 of their checkpoints), and the summary shows their agreement
        for half in ("half1", "half2"):
            ckpt = torch.load(os.path.join(second.getHalvesDir(), half, "checkpoint.pt"), weights_only=True)
            self.assertEqual(ckpt["epoch"], 2)
        summary = "\n".join(second.summary())
        self.assertIn("Gold-standard halves", summary)
        self.assertIn("half-map FSC 0.5", summary)

        analyze = self.newProtocol(DeepCryoProtVaeAnalyze, numberOfClusters=2, trajectorySteps=3,
                                   numberOfThreads=1)
        analyze.trainRun.set(second)
        self.launchProtocol(analyze)
        classes = getattr(analyze, OUTPUT_CLASSES)
        self.assertEqual(classes.getSize(), 2)
        self.assertEqual(sum(c.getSize() for c in classes), N)
        for cls in classes:
            self.assertTrue(os.path.exists(cls.getRepresentative().getFileName()))
        self.assertEqual(getattr(analyze, OUTPUT_TRAJECTORY).getSize(), 3)
        self.assertTrue(any("clusters" in line for line in analyze.summary()))
        self._checkViewer(analyze)
        self._checkVolumes(analyze)

    def _checkVolumes(self, analyze):
        """PC trajectories and a path between the two clusters, as sets of volumes at the working pixel size."""
        prot = self.newProtocol(DeepCryoProtVaeVolumes, pcs=2, pcPoints=3, doPath=True, pathFrom=2, pathTo=1,
                                pathPoints=4, neighbors=5)
        prot.analyzeRun.set(analyze)
        self.assertEqual(prot.validate(), [])
        self.launchProtocol(prot)
        pcs, path = getattr(prot, OUTPUT_PC_VOLUMES), getattr(prot, OUTPUT_PATH_VOLUMES)
        self.assertEqual((pcs.getSize(), path.getSize()), (6, 4))
        workPx = PX * BOX / 16
        for vols in (pcs, path):
            self.assertAlmostEqual(vols.getSamplingRate(), workPx, places=5)
            vol = vols.getFirstItem()
            self.assertAlmostEqual(vol.getSamplingRate(), workPx, places=5)
            self.assertEqual(vol.getDim(), (16, 16, 16))
        self.assertTrue(any("path of" in line for line in prot.summary()))
        bad = self.newProtocol(DeepCryoProtVaeVolumes, pcs=0, doPath=True, pathFrom=1, pathTo=3)
        bad.analyzeRun.set(analyze)
        self.assertIn("clusters 1 to 2", "\n".join(bad.validate()))

    def _checkViewer(self, analyze):
        """Every view of the landscape viewer, drawn headless (Agg) and saved."""
        from deepcryo.viewers import DeepCryoLandscapeViewer
        viewer = DeepCryoLandscapeViewer(project=self.proj, protocol=analyze)
        viewer.setProtocol(analyze)
        views = viewer._getVisualizeDict()
        for name in ("doShowLandscape", "doShowClusterVolumes", "doShowTraversal", "doShowBic", "doShowFsc"):
            plotters = views[name](name)
            self.assertEqual(len(plotters), 1, name)
            path = self.proj.getTmpPath(name + ".png")
            plotters[0].savefig(path)
            plotters[0].close()
            self.assertGreater(os.path.getsize(path), 5000, name)
        scatter = viewer._showLandscape()[0]
        self.assertEqual(len(scatter.getFigure().axes[0].collections[0].get_offsets()), N)
        scatter.close()

    def testPoseFreeForm(self):
        """The pose-free form validates, and cannot continue a run trained with given poses."""
        prot = self.newProtocol(DeepCryoProtVaeTrain, poseFree=True, workingBox=16)
        prot.inputParticles.set(self.importProt.outputParticles)
        self.assertEqual(prot.validate(), [])
        withPoses = self.newProtocol(DeepCryoProtVaeTrain, poseFree=False)
        prot.continueRun.set(True)
        prot.previousRun.set(withPoses)
        self.assertIn("cannot continue", "\n".join(prot.validate()))

    def testValidateNeedsPreviousRun(self):
        prot = self.newProtocol(DeepCryoProtVaeTrain, continueRun=True, workingBox=15, symmetryGroup="q5")
        prot.inputParticles.set(self.importProt.outputParticles)
        errors = "\n".join(prot.validate())
        self.assertIn("previous run", errors)
        self.assertIn("even", errors)
        self.assertIn("Unknown symmetry group 'q5'", errors)
        prot.symmetryGroup.set("d2")
        prot.previousRun.set(self.newProtocol(DeepCryoProtVaeTrain, symmetryGroup="c2"))
        self.assertIn("the previous run's (c2)", "\n".join(prot.validate()))
