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
"""The body frame in Scipion (issue 17): landscape VAE → analysis → ``DeepCryoProtVaeBodyFrame`` → VAE again.

Particles of three states of a hinge (:func:`deepcryo.core.simulate.phantom_states`, domain at 0°, 30° and 60°),
rendered by RELION's ``relion_project`` (:mod:`deepcryo.tests.relion_data`; 1500 particles, box 64 at 2 Å/px, SNR
0.1; the VAE and the group maps at box 32), are imported with their true poses, except that the poses of states 1
and 3 carry a known shared turn (10° and 9° about the hinge axis, as a consensus alignment gives the conformations
on either side of its map). The
body frame, on 3 bins along the PC1 of the first landscape, must take those turns out: the poses of each state in
one common frame, the median error per state (angle to the common rotation between true and moved poses) below
4° where it was 9–10°. Also checked: the output's poses are the program's STAR (through Scipion's matrices), valid
rotations, one per particle, and a second VAE trains on them; a second round of the body frame on that VAE's
k-means clusters keeps the poses in the common frame; the form's checks on bad inputs.

Why these states: the test asserts what the body frame does with a first landscape whose PC1 follows the states.
With the domain at 0°, 20° and 40° (box 32 at 4 Å/px, or 64 at 2 Å/px), the VAE's PC1 followed the states in
about half of the training seeds (elsewhere they lay along PC2, and the first round failed or fell short), so the
test passed or failed with the CPU's rounding; at 0°, 30° and 60° both rounds stayed below 4° for every seed tried
(benchmarks/RESULTS.md, "The body frame's test, made robust").
"""
import logging
import os
import unittest

import numpy as np
import torch

from deepcryo.constants import OUTPUT_PARTICLES
from deepcryo.convert import projectionMatrices
from deepcryo.core.geometry import axis_angle_matrices, rotation_angle_deg
from deepcryo.core.particles import read_particles, write_particles
from deepcryo.landscape import frames
from deepcryo.protocols import DeepCryoProtVaeAnalyze, DeepCryoProtVaeBodyFrame, DeepCryoProtVaeTrain
from deepcryo.tests.harness import ProtocolTest
from deepcryo.tests.relion_data import RELION_PROJECT, SKIP_REASON, RenderSpec, render
from deepcryo.tests.sets import importParticleSet, particleSetFromStar, relionPoseToScipionMatrix

SPEC = RenderSpec(n=1500, box=64, pixel_size_A=2.0, snr=0.1, states=3, hinge_deg=60.0, seed=0)
WORK_BOX = 32      # the VAE's working box and the body frame's map box (4 Å/px)
TURNS_DEG = [[0.0, 10.0, 0.0], [0.0, 0.0, 0.0], [0.0, -9.0, 0.0]]    # rotation vectors (x, y, z) per state
EPOCHS = 12
logger = logging.getLogger(__name__)


def stateErrorsDeg(matrices, truth, states):
    """Median angle (degrees) per state between each particle's frame turn and the common one: D_i = T_iᵀ·A_i
    (T_i the true pose, A_i the pose of the Scipion ALIGN_PROJ matrix ``matrices[i]``, whose 3×3 part is A_iᵀ),
    C the mean of the D_i projected onto the rotations, the error of particle i the angle of Cᵀ·D_i. Poses that
    differ from the truth by one common rotation (the frame of the whole set) have no error."""
    d = np.einsum("nij,nkj->nik", truth, matrices)      # T_iᵀ A_i = (M_true)_i · (M_i)ᵀ
    u, _, vt = np.linalg.svd(d.mean(0))
    common = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt
    angles = rotation_angle_deg(torch.as_tensor(np.einsum("ji,njk->nik", common, d))).numpy()
    return [float(np.median(angles[states == k])) for k in range(states.max() + 1)]


def rotationsOf(particles):
    """{image index (1-based): 3×3 rotation of the Scipion matrix} of a SetOfParticles."""
    return {p.getIndex(): np.array(p.getTransform().getMatrix())[:3, :3] for p in particles.iterItems()}


class TestDeepCryoBodyFrame(ProtocolTest):

    @classmethod
    def setUpClass(cls):
        if RELION_PROJECT is None:
            raise unittest.SkipTest(SKIP_REASON)
        cls.setUpOwnProject()
        data = render(os.path.abspath(cls.proj.getPath("relion")), SPEC)
        truth = read_particles(data.star)
        cls.states = np.asarray(truth.particles["rlnClassNumber"], dtype=np.int64) - 1
        cls.truth = np.stack([relionPoseToScipionMatrix(*a, 0.0, 0.0)[:3, :3] for a in truth.angles_deg()])
        turned = frames.turn_particles(truth, cls.states, axis_angle_matrices(np.radians(TURNS_DEG)).numpy(),
                                       np.zeros((3, 3)))
        turnedStar = os.path.join(data.folder, "turned.star")
        write_particles(turnedStar, turned)
        cls.importParts = importParticleSet(
            cls, particleSetFromStar(turnedStar, os.path.join(data.folder, "turned.sqlite")), SPEC.pixel_size_A)

    def _train(self, particles, label):
        train = self.newProtocol(DeepCryoProtVaeTrain, latentDim=8, workingBox=WORK_BOX, epochs=EPOCHS,
                                 useGpu=False, numberOfThreads=2, objLabel=label)
        train.inputParticles.set(particles)
        self.assertEqual(train.validate(), [])
        return self.launchProtocol(train)

    def _analyze(self, train, label):
        analyze = self.newProtocol(DeepCryoProtVaeAnalyze, numberOfClusters=3, trajectorySteps=2,
                                   numberOfThreads=2, objLabel=label)
        analyze.trainRun.set(train)
        return self.launchProtocol(analyze)

    def _bodyFrame(self, analyze, label, **values):
        frame = self.newProtocol(DeepCryoProtVaeBodyFrame, mapBox=WORK_BOX, objLabel=label, **values)
        frame.analyzeRun.set(analyze)
        self.assertEqual(frame.validate(), [])
        return self.launchProtocol(frame)

    def _errors(self, particles):
        rotations = rotationsOf(particles)
        return stateErrorsDeg(np.stack([rotations[i + 1] for i in range(SPEC.n)]), self.truth, self.states)

    def testVaeBodyFrameVae(self):
        first = self._train(self.importParts.outputParticles, "VAE on turned poses")
        analyze = self._analyze(first, "analysis of the first VAE")
        frame = self._bodyFrame(analyze, "body frame, 3 bins along PC1", groupBy=DeepCryoProtVaeBodyFrame.GROUP_PC1,
                                bins=3)

        moved = getattr(frame, OUTPUT_PARTICLES)
        self.assertSetSize(moved, SPEC.n)
        self.assertTrue(moved.hasAlignmentProj() and moved.hasCTF())
        # the poses are the program's STAR, through Scipion's matrices, and rotations
        star = read_particles(frame._getExtraPath("particles.star"), require_images=False)
        expected = projectionMatrices(star.angles_deg(), star.origins_A() / SPEC.pixel_size_A)
        rows = {int(i): r for r, i in enumerate(star.particles["rlnImageId"])}
        groups = star.particles["dcFrameGroup"]
        for particle in moved.iterItems():
            r = rows[particle.getObjId()]
            np.testing.assert_allclose(np.array(particle.getTransform().getMatrix()), expected[r], atol=1e-6)
            self.assertEqual(int(getattr(particle, "_dcFrameGroup").get()), int(groups[r]))
        rotations = np.stack(list(rotationsOf(moved).values()))
        np.testing.assert_allclose(np.einsum("nij,nkj->nik", rotations, rotations),
                                   np.broadcast_to(np.eye(3), rotations.shape), atol=1e-9)
        np.testing.assert_allclose(np.linalg.det(rotations), 1.0, atol=1e-9)
        # against the truth: each state's poses in one common frame
        before, after = self._errors(self.importParts.outputParticles), self._errors(moved)
        figures = "median error per state (deg): before %s, after %s" % (np.round(before, 2).tolist(),
                                                                        np.round(after, 2).tolist())
        logger.info(figures)
        self.assertGreater(max(before), 8.0, figures)
        self.assertLess(max(after), 4.0, figures)
        summary = frame.summary()
        logger.info("summary: %s", " / ".join(summary))
        self.assertIn("moved into the mean of the groups' frames", summary[0])
        self.assertEqual(sum("turned" in line for line in summary), 3)

        second = self._train(moved, "VAE on the moved poses")
        self.assertSetSize(getattr(second, OUTPUT_PARTICLES), SPEC.n)
        self._secondRoundByClusters(second)
        self._checkValidation(analyze)

    def _secondRoundByClusters(self, second):
        """A second round in the other mode: the second landscape's k-means clusters as the groups. Its input
        poses are already in one frame, so they must stay there: one group per cluster, each group's turn
        applied to its particles, and the errors against the truth still below 4°."""
        analyze = self._analyze(second, "analysis of the second VAE")
        frame = self._bodyFrame(analyze, "body frame again, k-means clusters",
                                groupBy=DeepCryoProtVaeBodyFrame.GROUP_CLUSTERS)
        moved = getattr(frame, OUTPUT_PARTICLES)
        self.assertSetSize(moved, SPEC.n)
        star = read_particles(frame._getExtraPath("particles.star"), require_images=False)
        analysis = read_particles(analyze._getExtraPath("analysis", "particles.star"), require_images=False)
        byId = dict(zip(np.asarray(analysis.particles["rlnImageId"], dtype=int), analysis.particles["dcCluster"]))
        clusters = np.array([byId[int(i)] for i in star.particles["rlnImageId"]])
        groups = np.asarray(star.particles["dcFrameGroup"], dtype=int)
        self.assertEqual(len(set(groups.tolist())), 3)
        for g in set(groups.tolist()):                         # a group is a cluster
            self.assertEqual(len(set(clusters[groups == g].tolist())), 1)
        again = self._errors(moved)
        logger.info("second round, clusters as groups: median error per state (deg) %s", np.round(again, 2).tolist())
        self.assertLess(max(again), 4.0, again)
        self.assertEqual(sum("turned" in line for line in frame.summary()), 3)

    def _checkValidation(self, analyze):
        """One clear error per bad input, from the form, before anything runs."""
        def errors(analysisRun=analyze, **values):
            prot = self.newProtocol(DeepCryoProtVaeBodyFrame, **values)
            prot.analyzeRun.set(analysisRun)
            return prot.validate()

        self.assertEqual(errors(groupBy=DeepCryoProtVaeBodyFrame.GROUP_CLUSTERS, referenceGroup=3), [])
        unfinished = self.newProtocol(DeepCryoProtVaeAnalyze)
        unfinished.trainRun.set(analyze.trainRun.get())
        self.proj.saveProtocol(unfinished)
        cases = {"has not finished": dict(analysisRun=unfinished),
                 "Frame of group 4: there are 3 groups": dict(bins=3, referenceGroup=4),
                 "at most the particles' box, 64 px": dict(mapBox=128),
                 "finer than the Nyquist limit": dict(mapBox=16, resolution=12.0),
                 "groups for 1500 particles": dict(bins=2000)}
        for message, values in cases.items():
            with self.subTest(message=message):
                found = errors(**values)
                self.assertEqual(len(found), 1, found)
                self.assertIn(message, found[0])
        self.assertEqual(len(errors(bins=1)), 1)        # the form's own check: at least 2 groups
