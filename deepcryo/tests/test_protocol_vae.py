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
"""DeepCryoProtVaeTrain / DeepCryoProtVaeAnalyze headless on a small simulated two-state set (CPU).

Checks the Scipion wiring (flexible particles with latent coordinates, resume, classes with one
volume each, trajectory, the landscape viewer drawn headless); the accuracy of the engine is tested in
``tests/test_landscape.py``.

The project has a name unique to this process: ``setupTestProject`` names it after the class, and
``Manager.createProject`` deletes an existing project of that name, so two runs of this test sharing one
Scipion user-data folder (an existing Scipion configuration, or two runners at once) deleted each other's
project mid-run and the protocol subprocess failed with "project path ... does not exist" (the flaky
failure seen before).
"""
import os
import uuid

import numpy as np
from pyworkflow.project import Manager

from deepcryo.constants import OUTPUT_PARTICLES
from deepcryo.core import simulate
from deepcryo.protocols import DeepCryoProtVaeAnalyze, DeepCryoProtVaeTrain
from deepcryo.protocols.protocol_vae import OUTPUT_CLASSES, OUTPUT_TRAJECTORY
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
        first = self._train(epochs=1, objLabel="vae 1 epoch")
        second = self._train(epochs=2, continueRun=True, previousRun=first, objLabel="vae continued")
        flex = getattr(second, OUTPUT_PARTICLES)
        self.assertEqual(flex.getSize(), N)
        self.assertEqual(len(flex.getFirstItem().getZFlex()), 2)

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
        prot = self.newProtocol(DeepCryoProtVaeTrain, continueRun=True, workingBox=15)
        prot.inputParticles.set(self.importProt.outputParticles)
        errors = "\n".join(prot.validate())
        self.assertIn("previous run", errors)
        self.assertIn("even", errors)
