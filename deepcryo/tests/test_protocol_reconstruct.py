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
"""DeepCryoProtReconstruct on simulated particles with known truth (headless Scipion, CPU, < 1 min).

600 particles (40 px, 3 Å/px, SNR 0.5, CTF, random poses and shifts) of a phantom are imported from a
sqlite whose alignment matrices follow Scipion's convention (relion plugin formula), reconstructed
by the protocol, and the map is compared with the phantom.
"""
import os

import numpy as np
from pyworkflow.tests import setupTestProject

from deepcryo.constants import OUTPUT_FSC, OUTPUT_VOLUME
from deepcryo.core import fsc, simulate
from deepcryo.core.mrc import read_mrc
from deepcryo.protocols import DeepCryoProtReconstruct
from deepcryo.tests.harness import ProtocolTest
from deepcryo.tests.sets import importParticleSet, particleSetFromStar

BOX, PX, N, SNR = 40, 3.0, 600, 0.5
MAX_RESOLUTION_A = 15.0   # measured: 11.5 Å (FSC 0.5 against the phantom), 10.8 Å (half maps, FSC 0.143)


class TestDeepCryoReconstruct(ProtocolTest):

    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        folder = os.path.abspath(cls.proj.getPath("simulated"))
        cls.truth = simulate.phantom_volume(BOX, seed=3)
        star = simulate.write_particle_set(folder, cls.truth, N, PX, snr=SNR, seed=4)
        cls.importAligned = cls._importSqlite(particleSetFromStar(star, os.path.join(folder, "aligned.sqlite")))
        cls.importRaw = cls._importSqlite(particleSetFromStar(star, os.path.join(folder, "raw.sqlite"),
                                                              withAlignment=False, withCtf=False))

    @classmethod
    def _importSqlite(cls, partSet):
        return importParticleSet(cls, partSet, PX)

    def _newReconstruct(self, particles, **kwargs):
        prot = self.newProtocol(DeepCryoProtReconstruct, numberOfThreads=2, **kwargs)
        prot.inputParticles.set(particles)
        return prot

    def testMapMatchesTruth(self):
        prot = self._newReconstruct(self.importAligned.outputParticles, objLabel="reconstruct c1 + half maps")
        self.assertEqual(prot.validate(), [])
        self.launchProtocol(prot)

        volume = getattr(prot, OUTPUT_VOLUME)
        self.assertEqual(volume.getSamplingRate(), PX)
        data, px = read_mrc(volume.getFileName())
        self.assertEqual((data.shape, px), ((BOX, BOX, BOX), PX))
        against_truth = fsc.fsc_resolution_A(fsc.fsc(self.truth, data), PX, 0.5)
        self.assertLessEqual(against_truth, MAX_RESOLUTION_A, "FSC 0.5 against the phantom at %.1f Å" % against_truth)

        half1, half2 = volume.getHalfMaps().split(",")
        self.assertTrue(os.path.exists(half1) and os.path.exists(half2))
        x, y = getattr(prot, OUTPUT_FSC).getData()
        np.testing.assert_allclose([float(v) for v in x], fsc.shell_frequencies(BOX, PX), atol=1e-6)
        halves = fsc.fsc_resolution_A([float(v) for v in y], PX, 0.143)
        self.assertLessEqual(halves, MAX_RESOLUTION_A, "half-map FSC 0.143 at %.1f Å" % halves)
        self.assertTrue(any("resolution" in line for line in prot.summary()))

    def testMaskedFsc(self):
        """With a mask diameter, the output FSC is the half maps' FSC in that sphere, corrected by phase
        randomisation; summary and methods say so."""
        diameter = 0.8 * BOX * PX
        prot = self._newReconstruct(self.importAligned.outputParticles, maskDiameter=diameter)
        self.launchProtocol(prot)
        half1, half2 = (read_mrc(path)[0] for path in getattr(prot, OUTPUT_VOLUME).getHalfMaps().split(","))
        expected = fsc.masked_fsc(half1, half2, fsc.particle_mask(BOX, PX, diameter).numpy())
        _, y = getattr(prot, OUTPUT_FSC).getData()
        np.testing.assert_allclose([float(v) for v in y], expected.corrected, atol=1e-5)
        self.assertTrue(any("in a 96 Å sphere, corrected by phase randomisation" in line for line in prot.summary()))
        self.assertIn("[Chen2013]", " ".join(prot.methods()))

    def testValidateRejectsBadInput(self):
        prot = self._newReconstruct(self.importRaw.outputParticles, symmetryGroup="x3", maxResolution=4.0)
        errors = "\n".join(prot.validate())
        for expected in ("no CTF", "no 3D alignment", "Unknown symmetry group 'x3'", "beyond Nyquist"):
            self.assertIn(expected, errors)
        prot = self._newReconstruct(self.importAligned.outputParticles, symmetryGroup=" D7 ", maxResolution=6.0)
        self.assertEqual(prot.validate(), [])
