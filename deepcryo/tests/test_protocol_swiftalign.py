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
"""DeepCryoProtSwiftAlign on simulated particles with known poses (headless Scipion, CPU, small).

150 particles (48 px, 3 Å/px, SNR 0.1, CTF) of a phantom, imported without alignment, are aligned
against the phantom (exact flat index, 12° step, two query steps) and compared with the truth.
"""
import os

import numpy as np
import torch
from pwem.protocols import ProtImportVolumes
from pyworkflow.tests import setupTestProject

from deepcryo.constants import OUTPUT_PARTICLES
from deepcryo.convert import posesFromMatrices
from deepcryo.core import geometry, simulate
from deepcryo.core.mrc import write_mrc
from deepcryo.core.particles import read_particles
from deepcryo.protocols import DeepCryoProtSwiftAlign
from deepcryo.tests.harness import ProtocolTest
from deepcryo.tests.sets import importParticleSet, particleSetFromStar

BOX, PX, N = 48, 3.0, 150


class TestDeepCryoSwiftAlign(ProtocolTest):

    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        folder = os.path.abspath(cls.proj.getPath("simulated"))
        vol = simulate.phantom_volume(BOX, seed=5)
        cls.star = simulate.write_particle_set(folder, vol, N, PX, snr=0.1, seed=6, max_shift_px=2.0,
                                               defocus_range_A=(15000.0, 20000.0))
        write_mrc(os.path.join(folder, "ref.mrc"), vol, PX)
        cls.importParts = importParticleSet(
            cls, particleSetFromStar(cls.star, os.path.join(folder, "raw.sqlite"), withAlignment=False), PX)
        cls.importVol = cls.newProtocol(ProtImportVolumes, filesPath=folder, filesPattern="ref.mrc", samplingRate=PX)
        cls.launchProtocol(cls.importVol)

    def testAlign(self):
        prot = self.newProtocol(DeepCryoProtSwiftAlign, samplingMode=0, angularStep=12.0, maxResolution=15.0,
                                maxShift=2.0, indexType=1, particlesPerStep=80, numberOfThreads=2)
        prot.inputParticles.set(self.importParts.outputParticles)
        prot.inputVolume.set(self.importVol.outputVolume)
        self.launchProtocol(prot)
        out = getattr(prot, OUTPUT_PARTICLES)
        self.assertSetSize(out, N)
        self.assertTrue(out.hasAlignmentProj())
        mats = np.stack([p.getTransform().getMatrix() for p in out.iterItems(orderBy="id")])
        angles, _ = posesFromMatrices(mats)
        truth = read_particles(self.star, require_images=False).angles_deg()
        err = geometry.pose_distance_deg(torch.as_tensor(truth), torch.as_tensor(np.asarray(angles))).numpy()
        self.assertGreater((err < 24.0).mean(), 0.9)
        self.assertTrue(hasattr(out.getFirstItem(), "_dcSwiftConfidence"))

    def testViewerPlotsHeadless(self):
        from deepcryo.viewers.viewer_swiftalign import plotAngularDistribution, plotScoreHistograms
        fn = os.path.abspath(self.proj.getPath("plots.png"))
        rng = np.random.default_rng(0)
        for plotter in (plotAngularDistribution(rng.uniform(0, 180, (50, 3))),
                        plotScoreHistograms(rng.random(50), rng.random(50))):
            plotter.savefig(fn)
            plotter.close()
            self.assertTrue(os.path.getsize(fn) > 0)
