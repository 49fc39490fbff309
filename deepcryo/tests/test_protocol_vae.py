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
"""DeepCryoProtVaeTrain / Analyze / Select / Volumes headless on a small simulated two-state set (CPU).

Checks the Scipion wiring (flexible particles with latent coordinates and their σ, resume, gold-standard
halves resumed and summarised, classes with one volume each, trajectory, the landscape viewer drawn
headless, its volumes in ChimeraX through a stand-in for Scipion's ChimeraX plugin, particle subsets
chosen on the landscape by polygon, clusters or the viewer's lasso, PC and path volumes); the accuracy
of the engine is tested in ``tests/test_landscape.py``.

The project has a name unique to this process: ``setupTestProject`` names it after the class, and
``Manager.createProject`` deletes an existing project of that name, so two runs of this test sharing one
Scipion user-data folder (an existing Scipion configuration, or two runners at once) deleted each other's
project mid-run and the protocol subprocess failed with "project path ... does not exist" (the flaky
failure seen before).
"""
import glob
import os
import sys
from unittest import mock

import numpy as np
import torch
from pwem.objects import SetOfParticlesFlex

from deepcryo.constants import OUTPUT_PARTICLES
from deepcryo.core import simulate
from deepcryo.core.mrc import read_mrc_header
from deepcryo.core.particles import read_particles
from deepcryo.protocols import (DeepCryoProtVaeAnalyze, DeepCryoProtVaeSelect, DeepCryoProtVaeTrain,
                                DeepCryoProtVaeVolumes)
from deepcryo.protocols.protocol_vae import (OUTPUT_CLASSES, OUTPUT_ORDER_TRAJECTORY, OUTPUT_PATH_VOLUMES,
                                             OUTPUT_PC_VOLUMES, OUTPUT_TRAJECTORY, OUTPUT_VARIATION, SIGMA_ATTR)
from deepcryo.tests.harness import ProtocolTest, fakeChimeraModule, waitForProtocol
from deepcryo.viewers.volumes import CHIMERAX, SLICES
from deepcryo.tests.sets import importParticleSet, particleSetFromStar

BOX, PX, N = 32, 3.0, 400


class TestDeepCryoVae(ProtocolTest):

    @classmethod
    def setUpClass(cls):
        cls.setUpOwnProject()
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
        self.assertTrue(flex.hasCTF())          # so that protocols asking for particles with CTF accept them
        sigma = [float(v) for v in getattr(flex.getFirstItem(), SIGMA_ATTR)]
        self.assertEqual(len(sigma), 2)
        self.assertTrue(all(v > 0 for v in sigma))
        variation = getattr(second, OUTPUT_VARIATION)     # where the decoded volumes vary, at the working box
        self.assertEqual(variation.getDim(), (16, 16, 16))
        self.assertAlmostEqual(variation.getSamplingRate(), PX * BOX / 16)
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
        self.assertEqual(getattr(analyze, OUTPUT_ORDER_TRAJECTORY).getSize(), 3)
        self.assertTrue(any("clusters" in line for line in analyze.summary()))
        self._checkViewer(analyze)
        self._checkChimerax(analyze)
        self._checkSelect(analyze, flex)
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
        for name in ("doShowLandscape", "doShowClusterVolumes", "doShowTraversal", "doShowOrderTraversal",
                     "doShowBic", "doShowFsc"):
            plotters = views[name](name)
            self.assertEqual(len(plotters), 1, name)
            path = self.proj.getTmpPath(name + ".png")
            plotters[0].savefig(path)
            plotters[0].close()
            self.assertGreater(os.path.getsize(path), 5000, name)
        scatter = viewer._showLandscape()[0]
        self.assertEqual(len(scatter.getFigure().axes[0].collections[0].get_offsets()), N)
        scatter.close()

    def _chimeraScripts(self, analyze, fakeProgram):
        """The cluster and traversal views of a viewer made while ``chimera`` is a stand-in plugin module:
        (scripts written, calls of the plugin's runner)."""
        calls = []
        module = fakeChimeraModule(fakeProgram, calls)
        from deepcryo.viewers import DeepCryoLandscapeViewer
        with mock.patch.dict(sys.modules, {"chimera": module}):
            viewer = DeepCryoLandscapeViewer(project=self.proj, protocol=analyze)
            viewer.setProtocol(analyze)
            self.assertEqual(viewer.displayVolumes.get(), CHIMERAX)   # the default when installed
            self.assertEqual(viewer._showClusterVolumes(), [])
            self.assertEqual(viewer._showTraversal(), [])
            self.assertEqual(viewer._showOrderTraversal(), [])
        scripts = [analyze._getExtraPath(n) for n in ("chimerax_clusters.cxc", "chimerax_traversal_pc1.cxc",
                                                      "chimerax_traversal_order.cxc")]
        return [open(p).read().splitlines() for p in scripts], scripts, calls

    def _checkChimerax(self, analyze):
        """Without the ChimeraX plugin the viewer shows slices; with it (a stand-in module), it writes .cxc
        scripts opening the analysis' volumes with their voxel size and Scipion's origin, and runs them with the
        plugin's runner."""
        from deepcryo.viewers import DeepCryoLandscapeViewer
        with mock.patch.dict(sys.modules, {"chimera": None}):          # import chimera fails
            viewer = DeepCryoLandscapeViewer(project=self.proj, protocol=analyze)
            viewer.setProtocol(analyze)
            self.assertEqual(viewer.displayVolumes.get(), SLICES)
            viewer.displayVolumes.set(CHIMERAX)                  # asked for, but absent: slices
            views = viewer._showClusterVolumes()
            self.assertEqual(len(views), 1)
            views[0].close()
        fakeProgram = self.proj.getTmpPath("ChimeraX")
        open(fakeProgram, "w").close()
        (clusters, traversal, orderTraversal), scripts, calls = self._chimeraScripts(analyze, fakeProgram)
        self.assertEqual([c[:2] for c in calls], [(fakeProgram, '"%s" &' % os.path.abspath(p)) for p in scripts])

        folder = analyze._getExtraPath("analysis")
        from deepcryo.viewers.viewer_landscape import cluster_order, load_analysis
        order = cluster_order(load_analysis(folder))
        expected = ([os.path.abspath(os.path.join(folder, "cluster_%02d_decoded.mrc" % c)) for c in order]
                    + [os.path.abspath(os.path.join(folder, "cluster_%02d_reconstructed.mrc" % c)) for c in order])
        self.assertEqual([line for line in clusters if line.startswith("open")], ['open "%s"' % p for p in expected])
        box, px = read_mrc_header(expected[0])[0][-1], read_mrc_header(expected[0])[1]
        settings = [line.split() for line in clusters if line.startswith("volume")]
        self.assertEqual([w[1] for w in settings], ["#%d" % (i + 1) for i in range(len(expected))])
        for w in settings:
            self.assertAlmostEqual(float(w[w.index("voxelSize") + 1]), px, places=4)
            origin = [float(x) for x in w[w.index("origin") + 1].split(",")]
            np.testing.assert_allclose(origin, [-box / 2 * px] * 3, atol=1e-3)   # Scipion's default origin
        self.assertEqual(len({w[w.index("level") + 1] for w in settings}), 1)    # one contour level for all
        self.assertIn("tile #1-4 columns 2 spacingFactor 1.2", clusters)

        steps = sorted(os.path.abspath(p) for p in glob.glob(os.path.join(folder, "pc1_step*.mrc")))
        self.assertEqual(traversal[0], "open %s vseries true" % " ".join('"%s"' % p for p in steps))
        self.assertEqual([line.split()[1] for line in traversal if line.startswith("volume")],
                         ["#1.%d" % (i + 1) for i in range(len(steps))])
        self.assertIn("vseries play #1 loop true direction oscillate", traversal)
        steps = sorted(os.path.abspath(p) for p in glob.glob(os.path.join(folder, "order_step*.mrc")))
        self.assertEqual(len(steps), 3)
        self.assertEqual(orderTraversal[0], "open %s vseries true" % " ".join('"%s"' % p for p in steps))

    def _launchSelect(self, analyze, **kwargs):
        prot = self.newProtocol(DeepCryoProtVaeSelect, **kwargs)
        prot.analyzeRun.set(analyze)
        self.assertEqual(prot.validate(), [])
        return self.launchProtocol(prot)

    def _assertSubset(self, prot, flex, ids):
        """The run's output is exactly the training output's particles ``ids``, latent coordinates kept."""
        subset = getattr(prot, OUTPUT_PARTICLES)
        self.assertIsInstance(subset, SetOfParticlesFlex)
        self.assertEqual(sorted(p.getObjId() for p in subset), sorted(ids))
        zOf = {p.getObjId(): list(p.getZFlex()) for p in flex}
        for p in subset:
            self.assertEqual(list(p.getZFlex()), zOf[p.getObjId()])
        self.assertTrue(subset.hasCTF())
        self.assertTrue(subset.hasAlignmentProj())
        self.assertIn("%d of %d particles" % (len(ids), N), prot.summary()[0])

    def _checkSelect(self, analyze, flex):
        """Subsets by a polygon around one cluster (typed, and drawn with the viewer's lasso), and by cluster:
        exactly the particles whose landscape point is inside, or whose label is the cluster."""
        star = read_particles(analyze._getExtraPath("analysis", "particles.star"), require_images=False)
        ids = np.asarray(star.particles["rlnImageId"], dtype=np.int64)
        xy = np.stack([np.asarray(star.particles[c], dtype=float) for c in ("dcPC1", "dcPC2")], 1)
        labels = np.asarray(star.particles["dcCluster"], dtype=np.int64)
        lo, hi = xy[labels == 1].min(0) - 1e-3, xy[labels == 1].max(0) + 1e-3      # box around cluster 1
        inside = (xy[:, 0] > lo[0]) & (xy[:, 0] < hi[0]) & (xy[:, 1] > lo[1]) & (xy[:, 1] < hi[1])
        self.assertTrue(np.all(inside[labels == 1]) and 0 < inside.sum() < N)
        polygon = [(lo[0], lo[1]), (hi[0], lo[1]), (hi[0], hi[1]), (lo[0], hi[1])]
        typed = self._launchSelect(analyze, selectBy=DeepCryoProtVaeSelect.SELECT_POLYGON,
                                   polygon=", ".join("%r %r" % v for v in polygon))
        self._assertSubset(typed, flex, ids[inside])
        byCluster = self._launchSelect(analyze, selectBy=DeepCryoProtVaeSelect.SELECT_CLUSTERS, clusters="2")
        self._assertSubset(byCluster, flex, ids[labels == 2])

        from deepcryo.viewers import DeepCryoLandscapeViewer
        viewer = DeepCryoLandscapeViewer(project=self.proj, protocol=analyze)
        viewer.setProtocol(analyze)
        plotter = viewer._getVisualizeDict()["doSelectParticles"]("doSelectParticles")[0]
        lasso = plotter.getFigure().deepcryo_lasso
        self.assertEqual(sorted(lasso.select(polygon)), sorted(ids[inside].tolist()))
        drawn = lasso.create()
        plotter.close()
        waitForProtocol(drawn)
        self.proj._updateProtocol(drawn)
        self.assertEqual(drawn.selectionFile.get(), analyze._getExtraPath("selection_001.txt"))
        self._assertSubset(drawn, flex, ids[inside])

    def testSelectValidation(self):
        """Each way of selecting refuses a missing choice with one clear message."""
        prot = self.newProtocol(DeepCryoProtVaeSelect, selectBy=DeepCryoProtVaeSelect.SELECT_POLYGON,
                                polygon="0 0, 1 1")
        self.assertIn("at least three vertices", "\n".join(prot.validate()))
        prot.selectBy.set(DeepCryoProtVaeSelect.SELECT_CLUSTERS)
        self.assertIn("clusters to keep", "\n".join(prot.validate()))
        prot.selectBy.set(DeepCryoProtVaeSelect.SELECT_FILE)
        prot.selectionFile.set(self.proj.getTmpPath("none.txt"))
        self.assertIn("selection file", "\n".join(prot.validate()))

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
