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
"""deepcryo in a Scipion home configured by ``scipion config``, with Scipion's Python under the home folder.

``scipion config`` writes every plugin variable into ``scipion.conf`` with the home folder abbreviated
(``DEEPCRYO_PYTHON = ~/miniconda/bin/python``) and Scipion puts the values into the environment as written;
the private Scipion home of the other tests never has this. :class:`TestScipionConfigHome` builds the setup of
a new user — a home folder holding ``miniconda`` (a link to this Python's environment, whose ``bin`` comes
first on ``PATH`` as in an activated environment) and an empty Scipion home configured by the real
``python -m scipion config --unattended`` — and runs :class:`TestReconstructInConfiguredHome` there with
``python -m scipion tests``: a DeepCryoProtReconstruct on 40 particles of 24 px must finish.
"""
import configparser
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

from pyworkflow.tests import setupTestProject

from deepcryo.constants import DEEPCRYO_PYTHON, OUTPUT_VOLUME
from deepcryo.core import simulate
from deepcryo.core.mrc import read_mrc
from deepcryo.protocols import DeepCryoProtReconstruct
from deepcryo.tests.harness import TIMEOUT_S, ProtocolTest
from deepcryo.tests.sets import importParticleSet, particleSetFromStar

BOX, PX, N = 24, 4.0, 40


@unittest.skipUnless(os.environ.get(DEEPCRYO_PYTHON, "").startswith("~"),
                     "runs in a Scipion home whose scipion.conf has DEEPCRYO_PYTHON = ~/... (TestScipionConfigHome)")
class TestReconstructInConfiguredHome(ProtocolTest):
    """Run by :class:`TestScipionConfigHome` in the home it configured."""

    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        folder = os.path.abspath(cls.proj.getPath("simulated"))
        star = simulate.write_particle_set(folder, simulate.phantom_volume(BOX, seed=1), N, PX, snr=1.0, seed=2)
        cls.importParts = importParticleSet(cls, particleSetFromStar(star, os.path.join(folder, "aligned.sqlite")), PX)

    def testReconstructFinishes(self):
        prot = self.newProtocol(DeepCryoProtReconstruct, doHalfMaps=False, numberOfThreads=1)
        prot.inputParticles.set(self.importParts.outputParticles)
        self.launchProtocol(prot)
        data, px = read_mrc(getattr(prot, OUTPUT_VOLUME).getFileName())
        self.assertEqual((data.shape, px), ((BOX, BOX, BOX), PX))


class TestScipionConfigHome(unittest.TestCase):

    def setUp(self):
        root = tempfile.mkdtemp(prefix="deepcryo-scipion-config-")
        if os.environ.get("DEEPCRYO_KEEP_TEST_HOME") != "1":
            self.addCleanup(shutil.rmtree, root, True)
        self.home = os.path.join(root, "home")
        self.scipionHome = os.path.join(root, "scipion")
        os.makedirs(self.home)
        os.makedirs(self.scipionHome)
        os.symlink(sys.prefix, os.path.join(self.home, "miniconda"))
        self.python = os.path.join(self.home, "miniconda", os.path.relpath(sys.executable, sys.prefix))
        # a new user's environment: none of the harness's Scipion settings, no DEEPCRYO_PYTHON (it would win over
        # scipion.conf); usage reports and test-data downloads off, as in every test (no network)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SCIPION_") and k != DEEPCRYO_PYTHON}
        self.env.update(HOME=self.home, SCIPION_HOME=self.scipionHome, SCIPION_NOTIFY="False",
                        SCIPION_TEST_NOSYNC="1", PATH=os.path.dirname(self.python) + os.pathsep + os.environ["PATH"])

    def _scipion(self, *args):
        return subprocess.run([self.python, "-m", "scipion"] + list(args), env=self.env, cwd=self.home,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S)

    def testProtocolRunsWithPythonUnderHome(self):
        config = self._scipion("config", "--unattended")
        self.assertEqual(config.returncode, 0, config.stdout[-3000:])
        conf = configparser.RawConfigParser()
        conf.optionxform = str
        conf.read(os.path.join(self.scipionHome, "config", "scipion.conf"))
        self.assertEqual(conf["PLUGINS"][DEEPCRYO_PYTHON], "~/miniconda/bin/python")  # the setup of the issue

        # by its package path: ``scipion tests deepcryo.tests`` loads this module by its bare name
        module = "deepcryo.tests." + __name__.rpartition(".")[2]
        tests = self._scipion("tests", "%s.%s" % (module, TestReconstructInConfiguredHome.__name__))
        self.assertEqual(tests.returncode, 0, tests.stdout[-6000:])
        project = os.path.join(self.home, "ScipionUserData", "projects", TestReconstructInConfiguredHome.__name__)
        maps = glob.glob(os.path.join(project, "Runs", "*DeepCryoProtReconstruct", "extra", "*.mrc"))
        self.assertTrue(maps, "no map in %s (the test was not run?):\n%s" % (project, tests.stdout[-3000:]))
