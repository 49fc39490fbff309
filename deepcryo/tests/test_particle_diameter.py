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
"""The particle diameter of SwiftRes and the mask diameter of the reconstruction: their wizard as Scipion finds it
(the plugin's ``wizards`` module, ``Domain.findWizards``) and what it opens at, without a display (the Tk dialog
itself is pwem's); what the forms refuse; and what reaches the program."""
import tempfile
import unittest
from pathlib import Path

import pwem
from pyworkflow.object import Pointer
from pyworkflow.viewer import DESKTOP_TKINTER

from deepcryo.protocols import DeepCryoProtReconstruct, DeepCryoProtSwiftRefine
from deepcryo.tests.protocol_inputs import _particles, _volume
from deepcryo.wizards import DeepCryoParticleDiameterWizard


class _Form:
    """What a wizard sees of the protocol form: the protocol, and ``setVar`` recorded."""

    def __init__(self, protocol):
        self.protocol, self.values = protocol, {}

    def setVar(self, name, value):
        self.values[name] = value


class TestDiameterWizard(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.folder = Path(self.tmp.name)

    def tearDown(self):
        self.tmp.cleanup()

    def testRegisteredForTheDiameterOfRefineAndReconstruct(self):
        self.assertIn(DeepCryoParticleDiameterWizard, pwem.Domain.getWizards().values())
        self.assertEqual(pwem.Domain.findWizards(DeepCryoProtSwiftRefine(), DESKTOP_TKINTER),
                         {"particleDiameter": DeepCryoParticleDiameterWizard})
        self.assertEqual(pwem.Domain.findWizards(DeepCryoProtReconstruct(), DESKTOP_TKINTER),
                         {"maskDiameter": DeepCryoParticleDiameterWizard})

    def testDefocusBandWizardRegistered(self):
        """The deep defocus band wizard is found by Scipion for both ends of the band."""
        from deepcryo.protocols import DeepCryoProtDeepDefocus
        from deepcryo.wizards import DeepCryoDefocusBandWizard
        self.assertEqual(pwem.Domain.findWizards(DeepCryoProtDeepDefocus(), DESKTOP_TKINTER),
                         {"lowRes": DeepCryoDefocusBandWizard, "highRes": DeepCryoDefocusBandWizard})

    def testRefineOpensOnTheMapAtTheDefaultDiameter(self):
        wizard = DeepCryoParticleDiameterWizard()
        prot = DeepCryoProtSwiftRefine()
        prot.inputParticles.set(_particles(self.folder, px=2.0))  # 16 px box
        self.assertAlmostEqual(wizard.startingDiameterA(prot), 0.8 * 16 * 2.0)  # no map yet: the particles' box
        prot.inputVolumes.append(Pointer(_volume(self.folder, px=1.5, box=40)))
        self.assertAlmostEqual(wizard.startingDiameterA(prot), 0.8 * 40 * 1.5)  # the map's box
        items = wizard._getProvider(prot).getObjects()
        self.assertEqual([type(i).__name__ for i in items], ["Volume"])  # the circle is drawn on the map
        prot.particleDiameter.set(36.0)
        self.assertEqual(wizard.startingDiameterA(prot), 36.0)  # the form's own value
        form = _Form(prot)
        wizard.setVar(form, "particleDiameter", 21)  # the dialog's radius, Å
        self.assertEqual(form.values, {"particleDiameter": 42})

    def testReconstructOpensOnTheParticles(self):
        wizard = DeepCryoParticleDiameterWizard()
        prot = DeepCryoProtReconstruct()
        self.assertEqual(wizard.startingDiameterA(prot), 0.0)  # nothing chosen yet
        prot.inputParticles.set(_particles(self.folder, px=2.0))
        self.assertAlmostEqual(wizard.startingDiameterA(prot), 0.8 * 16 * 2.0)
        self.assertEqual([type(i).__name__ for i in wizard._getProvider(prot).getObjects()], ["Particle"] * 3)
        form = _Form(prot)
        wizard.setVar(form, "maskDiameter", 10)
        self.assertEqual(form.values, {"maskDiameter": 20})


class TestDiameterValidation(unittest.TestCase):
    """Particles: 16 px at 2 Å/px (a 32 Å box)."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.folder = Path(self.tmp.name)

    def tearDown(self):
        self.tmp.cleanup()

    def _newName(self):
        return "particles_%d" % len(list(self.folder.iterdir()))

    def _refineErrors(self, **values):
        prot = DeepCryoProtSwiftRefine(**values)
        prot.inputParticles.set(_particles(self.folder, n=4, name=self._newName()))
        prot.inputVolumes.append(Pointer(_volume(self.folder)))
        return [e for e in prot._validate() if "diameter" in e]

    def _reconstructErrors(self, **values):
        prot = DeepCryoProtReconstruct(**values)
        prot.inputParticles.set(_particles(self.folder, name=self._newName()))
        return [e for e in prot._validate() if "diameter" in e]

    def testRefine(self):
        self.assertEqual(self._refineErrors(), [])  # 0: from the box
        self.assertEqual(self._refineErrors(particleDiameter=30.0, initialResolution=20.0), [])
        errors = self._refineErrors(particleDiameter=15.0, initialResolution=20.0)
        self.assertEqual(len(errors), 1)
        self.assertIn("must exceed the initial resolution 20.0 Å", errors[0])
        self.assertIn("larger than 1.5 × the box (32.0 Å)", self._refineErrors(particleDiameter=49.0)[0])

    def testReconstruct(self):
        self.assertEqual(self._reconstructErrors(), [])  # 0: no mask
        self.assertEqual(self._reconstructErrors(maskDiameter=30.0), [])
        self.assertIn("below 8 pixels (16.0 Å)", self._reconstructErrors(maskDiameter=10.0)[0])
        self.assertIn("larger than 1.5 × the box (32.0 Å)", self._reconstructErrors(maskDiameter=49.0)[0])
        self.assertEqual(self._reconstructErrors(maskDiameter=49.0, doHalfMaps=False), [])  # no FSC, no mask


class TestMaskDiameterReachesTheProgram(unittest.TestCase):

    def _args(self, **values):
        prot = DeepCryoProtReconstruct(**values)
        jobs = []
        prot._createFilenameTemplates = lambda: None
        prot._getFileName = lambda key: key
        prot._runProgram = lambda engine, args: jobs.append((engine, [str(a) for a in args]))
        prot.reconstructStep()
        return jobs[0][1]

    def testMaskDiameter(self):
        args = self._args(maskDiameter=120.0)
        self.assertEqual(args[args.index("--mask-diameter") + 1], "120.0")
        self.assertIn("--halves", args)
        self.assertNotIn("--mask-diameter", self._args())
        self.assertNotIn("--mask-diameter", self._args(maskDiameter=120.0, doHalfMaps=False))
