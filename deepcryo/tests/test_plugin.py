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
"""The plugin as Scipion sees it: discovery through the entry point, program command lines and
environment, citations and the protocol tree."""
import configparser
import inspect
import json
import os
import shlex
import sys
import unittest
from unittest import mock

import pwem
from pyworkflow.protocol import Protocol

import deepcryo
import deepcryo.protocols
from deepcryo.constants import DEEPCRYO_PYTHON


def _treeProtocols(nodes):
    for node in nodes:
        if node.get("tag") == "protocol":
            yield node["value"]
        yield from _treeProtocols(node.get("children", []))


class TestPlugin(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.module = pwem.Domain.getPluginModule("deepcryo")
        cls.Plugin = deepcryo.Plugin

    def setUp(self):
        self.savedPython = self.Plugin.getVar(DEEPCRYO_PYTHON)

    def tearDown(self):
        self.Plugin._addVar(DEEPCRYO_PYTHON, self.savedPython)

    def testDiscoveredThroughEntryPoint(self):
        self.assertIs(self.module, deepcryo)
        self.assertEqual(self.module._pluginInstance.getName(), "deepcryo")
        self.assertEqual(self.module._pluginInstance.getPath(), os.path.dirname(deepcryo.__file__))
        self.assertIs(pwem.Domain.findClass("DeepCryoProtReconstruct"), deepcryo.protocols.DeepCryoProtReconstruct)
        self.assertEqual(self.Plugin.validateInstallation(), [])

    def testProgramCommandLines(self):
        python = self.Plugin.getPython()
        self.assertEqual(python, sys.executable)
        self.assertEqual(self.Plugin.getProgram("core.reconstruct"), "%s -m deepcryo.core.reconstruct" % python)
        # no GPU list in the program: the step's GPU comes as --device cuda:%(GPU)s, substituted by Scipion
        self.assertEqual(self.Plugin.getProgram("defocus", "predict"), "%s -m deepcryo.defocus predict" % python)
        with self.assertRaisesRegex(ValueError, "unknown deepcryo engine"):
            self.Plugin.getProgram("core.refine")

    def testOwnPythonGetsNoScipionPythonPath(self):
        self._setEnv(PYTHONPATH="/scipion/site-packages")
        self.assertIn("PYTHONPATH", self.Plugin.getEnviron())
        self.Plugin._addVar(DEEPCRYO_PYTHON, "/opt/torch-env/bin/python")
        self.assertTrue(self.Plugin.usesOwnPython())
        self.assertNotIn("PYTHONPATH", self.Plugin.getEnviron())
        self.assertTrue(self.Plugin.getProgram("landscape").startswith("/opt/torch-env/bin/python -m "))

    def testPythonFromScipionConfIsExpanded(self):
        """``scipion config`` writes ``DEEPCRYO_PYTHON = ~/...`` (or ``${VAR}/...``) and Scipion exports it
        as written: the plugin expands it, so the quoted command line names an existing file and Scipion's
        own Python is recognised (it keeps PYTHONPATH)."""
        prefix = os.path.dirname(os.path.dirname(sys.executable))
        relative = os.path.relpath(sys.executable, prefix)
        for value in (os.path.join("~", relative), os.path.join("${DEEPCRYO_TEST_PREFIX}", relative)):
            with self.subTest(value=value):
                self._setEnv(HOME=prefix, DEEPCRYO_TEST_PREFIX=prefix, DEEPCRYO_PYTHON=value,
                             PYTHONPATH="/scipion/site-packages")
                self.Plugin._defineVariables()
                self.assertEqual(self.Plugin.getPython(), sys.executable)
                self.assertFalse(self.Plugin.usesOwnPython())
                self.assertIn("PYTHONPATH", self.Plugin.getEnviron())
                self.assertEqual(self.Plugin.getProgram("core.reconstruct"),
                                 "%s -m deepcryo.core.reconstruct" % shlex.quote(sys.executable))

    def _setEnv(self, **values):
        """Set environment variables for this test only."""
        patcher = mock.patch.dict(os.environ, values)
        patcher.start()
        self.addCleanup(patcher.stop)

    def testCitationsExist(self):
        bibtex = self.module._bibtex
        keys = list(deepcryo._references)
        for cls in self._protocolClasses():
            keys += cls()._citations()
        self.assertEqual([k for k in keys if k not in bibtex], [])

    def testEveryProtocolIsInTheProtocolTree(self):
        config = configparser.ConfigParser()
        config.optionxform = str
        config.read(os.path.join(os.path.dirname(deepcryo.__file__), "protocols.conf"))
        placed = set(_treeProtocols(json.loads(config["PROTOCOLS"]["Protocols SPA"])))
        self.assertEqual([c.__name__ for c in self._protocolClasses() if c.__name__ not in placed], [])

    @staticmethod
    def _protocolClasses():
        return [c for _, c in inspect.getmembers(deepcryo.protocols, inspect.isclass) if issubclass(c, Protocol)]
