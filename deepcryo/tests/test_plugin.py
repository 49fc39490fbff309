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
import tempfile
import unittest
from unittest import mock

import pwem
import pyworkflow
from pyworkflow.gui.project.viewprotocols_extra import ProtocolTreeConfig
from pyworkflow.protocol import Protocol
from scipion.install.funcs import Environment

import deepcryo
import deepcryo.protocols
from deepcryo.constants import DEEPCRYO_PYTHON
from deepcryo.protocols.protocol_base import DeepCryoProtBase


def _treeProtocols(nodes):
    for node in nodes:
        if node.get("tag") == "protocol":
            yield node["value"]
        yield from _treeProtocols(node.get("children", []))


def _visibleProtocols(menu):
    """Class names of the protocols that a view of Scipion's protocol tree shows."""
    for node in menu.childs:
        if node.visible:
            if node.tag == "protocol":
                yield node.value
            yield from _visibleProtocols(node)


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

    def testCitationsShowTheirVenueAndLinkToThePaper(self):
        """pwem prints a reference as ``Author et al., <journal or booktitle>, year`` and links its doi (else its
        url): a thesis needs a venue there, and the link must be a web address (a bare DOI opens nothing)."""
        prot = Protocol()
        for key, entry in self.module._bibtex.items():
            with self.subTest(key=key):
                text = prot._getCiteText(entry)
                self.assertNotIn(", ,", text)
                self.assertTrue(entry.get("journal") or entry.get("booktitle"), text)
                link = entry.get("doi") or entry.get("url")
                if link:
                    self.assertRegex(link, r"^https://")
                    self.assertTrue(text.startswith("[[%s][" % link), text)

    def testEveryProtocolCitesAndDescribesItsMethod(self):
        for cls in self._protocolClasses():
            with self.subTest(protocol=cls.__name__):
                self.assertTrue(cls()._citations(), "no references")
                self.assertIsNot(cls._methods, Protocol._methods, "no methods text")
                self.assertEqual(cls()._methods(), [], "a methods text before the run")

    def testPossibleOutputsAreClasses(self):
        """Scipion offers ``_possibleOutputs`` to the protocols scheduled after a run: classes of sets or objects
        (what each run really defines is checked after every protocol test run, ``harness.checkFinishedRun``)."""
        for cls in self._protocolClasses():
            with self.subTest(protocol=cls.__name__):
                for name, outputClass in dict(cls._possibleOutputs).items():
                    self.assertTrue(inspect.isclass(outputClass), "%s: %r" % (name, outputClass))
        self.assertEqual(deepcryo.protocols.DeepCryoProtVaeTrain._possibleOutputs,
                         {"outputParticles": pwem.objects.SetOfParticlesFlex,
                          "outputVariationMap": pwem.objects.Volume})
        self.assertIs(deepcryo.protocols.DeepCryoProtVaeAnalyze._possibleOutputs["outputClasses"],
                      pwem.objects.SetOfClasses3D)

    @unittest.skipIf(sys.version_info < (3, 11), "reads pyproject.toml with tomllib (Python 3.11+)")
    def testUrlIsTheProjectsHomepage(self):
        """Scipion links the plugin to ``Plugin._url``: the ``Homepage`` of pyproject's ``[project.urls]`` (one
        place for it), not pwem's."""
        import tomllib
        with open(os.path.join(os.path.dirname(os.path.dirname(deepcryo.__file__)), "pyproject.toml"), "rb") as f:
            urls = tomllib.load(f)["project"]["urls"]
        self.assertEqual(urls["Homepage"], "https://github.com/deepcryo/scipion-em-deepcryo")
        self.assertEqual(self.Plugin.getUrl(), urls["Homepage"])
        self.assertEqual(self.module._pluginInstance.getUrl(), urls["Homepage"])
        self.assertNotEqual(self.Plugin.getUrl(), pwem.Plugin.getUrl())

    def testUrlOfAnInstalledPlugin(self):
        """Installed from a wheel (no pyproject beside the package), the home page comes from the distribution's
        metadata: its ``Project-URL: Homepage, ...`` whatever other project URLs come first."""
        from email.message import Message
        meta = Message()
        meta["Project-URL"] = "Source, https://example.org/src"
        meta["Project-URL"] = "Homepage, https://example.org/home"
        with mock.patch("importlib.metadata.metadata", return_value=meta):
            self.assertEqual(deepcryo._installedHomepage(), "https://example.org/home")
        with mock.patch("importlib.metadata.metadata", return_value=Message()):
            self.assertEqual(deepcryo._installedHomepage(), "")
        with mock.patch.object(deepcryo, "_checkoutRoot", return_value=None), \
                mock.patch.object(deepcryo, "_installedHomepage", return_value="https://example.org/home"):
            self.assertEqual(deepcryo._projectUrl(), "https://example.org/home")

    def testProgramsRunWithoutScipionPythonPath(self):
        """Every program goes through ``_runProgram``, which passes ``Plugin.getEnviron()`` to ``runJob``: with
        ``DEEPCRYO_PYTHON`` another Python, a PYTHONPATH set for Scipion does not reach the program."""
        self._setEnv(PYTHONPATH="/scipion/site-packages")
        self.Plugin._addVar(DEEPCRYO_PYTHON, "/opt/deepcryo-env/bin/python")
        for cls in self._protocolClasses():
            with self.subTest(protocol=cls.__name__):
                self.assertTrue(issubclass(cls, DeepCryoProtBase))
                prot, jobs = cls(), []
                prot.runJob = lambda program, args, **kwargs: jobs.append((program, args, kwargs))
                prot._gpus = lambda: None
                prot._runProgram("core.reconstruct", ["--threads", 2])
                program, args, kwargs = jobs[0]
                self.assertTrue(program.startswith("/opt/deepcryo-env/bin/python -m deepcryo."), program)
                self.assertIn("PATH", kwargs["env"])
                self.assertNotIn("PYTHONPATH", kwargs["env"])
        for module in (deepcryo.protocols.protocol_defocus, deepcryo.protocols.protocol_reconstruct,
                       deepcryo.protocols.protocol_swiftalign, deepcryo.protocols.protocol_swiftrefine,
                       deepcryo.protocols.protocol_vae, deepcryo.protocols.protocol_bodyframe):
            self.assertNotIn(".runJob(", inspect.getsource(module), module.__name__)

    def testSeparateEnvironmentRecipe(self):
        """``scipion3 installb deepcryo-env`` (optional, not installed by default): a venv of Scipion's Python
        with torch (CPU build), faiss and deepcryo, installed without Scipion's PYTHONPATH; what Scipion would
        run is read from its own installer (``--show`` runs nothing)."""
        env = Environment(args=["deepcryo-env", "--show"])
        self.Plugin.defineBinaries(env)
        target = env.getTarget("deepcryo-env-%s" % deepcryo.__version__)
        self.assertFalse(target.isDefault())
        folder = self.Plugin.getEnvFolder()
        commands = [c for c in target.getCommands() if isinstance(c._cmd, str) and "venv" in c._cmd]
        self.assertEqual([c._cwd for c in commands], [folder, folder])
        create, install = commands
        self.assertEqual(create._cmd, "unset PYTHONPATH && %s -m venv venv" % shlex.quote(sys.executable))
        self.assertEqual(create._targets, [os.path.join(folder, "venv/bin/python")])
        words = install._cmd.split(" && ")
        self.assertEqual(words[0], "unset PYTHONPATH")
        self.assertIn("venv/bin/python -m pip install --no-cache-dir torch==2.13.0 "
                      "--index-url https://download.pytorch.org/whl/cpu", words)
        self.assertTrue(any(w.startswith("venv/bin/python -m pip install") and " faiss-cpu " in w for w in words))
        self.assertIn("venv/bin/python -m pip install --no-cache-dir --no-deps %s" % deepcryo._pluginRequirement(),
                      words)
        self.assertEqual(install._targets, [os.path.join(folder, "deepcryo_env_installed")])
        self.assertEqual(self.Plugin.getEnvPython(), os.path.join(folder, "venv", "bin", "python"))
        # a checkout (installp --devel) goes in editable, an installed release by its version
        root = os.path.dirname(os.path.dirname(os.path.abspath(deepcryo.__file__)))
        with mock.patch("os.path.isfile", lambda path: path == os.path.join(root, "pyproject.toml")):
            self.assertEqual(deepcryo._pluginRequirement(), "-e %s" % shlex.quote(root))
        with mock.patch("os.path.isfile", lambda path: False):
            self.assertEqual(deepcryo._pluginRequirement(), "scipion-em-deepcryo==%s" % deepcryo.__version__)

    def testWithoutEnginesTheSeparateEnvironmentIsTheDefault(self):
        """The pip package has no torch or faiss (extra ``engines``): where Scipion's Python lacks them,
        ``installp`` installs ``deepcryo-env`` (a default binary), its Python becomes ``DEEPCRYO_PYTHON``'s
        default once it exists, and until then every protocol reports one line naming both ways to install them;
        with them, the environment stays optional and Scipion's Python runs the programs."""
        envPython = os.path.join(tempfile.mkdtemp(prefix="deepcryo-env-"), "python")
        self._setEnv()
        os.environ.pop(DEEPCRYO_PYTHON, None)
        for missing, envExists, python, default in ((["torch", "faiss"], True, envPython, True),
                                                    (["faiss"], False, sys.executable, True),
                                                    ([], True, sys.executable, False)):
            with self.subTest(missing=missing, envExists=envExists):
                if envExists:  # an executable stands in for the environment's Python
                    with open(envPython, "w") as f:
                        f.write("#!/bin/sh\n")
                    os.chmod(envPython, 0o755)
                elif os.path.exists(envPython):
                    os.remove(envPython)
                with mock.patch("deepcryo.missingEngineModules", lambda: list(missing)), \
                        mock.patch.object(self.Plugin, "getEnvPython", lambda: envPython):
                    env = Environment(args=["deepcryo-env", "--show"])
                    self.Plugin.defineBinaries(env)
                    self.assertEqual(env.getTarget("deepcryo-env-%s" % deepcryo.__version__).isDefault(), default)
                    self.Plugin._defineVariables()
                    self.assertEqual(self.Plugin.getPython(), python)
                    errors = self.Plugin.validateInstallation()
                    if python == sys.executable and missing:
                        self.assertEqual(len(errors), 1, errors)
                        self.assertIn("need faiss, which Scipion's Python", errors[0])
                        self.assertIn("scipion3 installb deepcryo-env", errors[0])
                        self.assertIn('pip install "scipion-em-deepcryo[engines]"', errors[0])
                        self.assertFalse(deepcryo.protocols.DeepCryoProtReconstruct.isInstalled())
                    else:
                        self.assertEqual(errors, [])

    def testMissingOwnPythonIsReported(self):
        self.Plugin._addVar(DEEPCRYO_PYTHON, "/opt/no-such-env/bin/python")
        errors = self.Plugin.validateInstallation()
        self.assertEqual(len(errors), 1, errors)
        self.assertTrue(errors[0].startswith("DEEPCRYO_PYTHON = /opt/no-such-env/bin/python is not an executable"),
                        errors)
        self.assertFalse(deepcryo.protocols.DeepCryoProtSwiftAlign.isInstalled())

    def testPackageLeavesTorchAndFaissToTheEnginesExtra(self):
        """``pip install scipion-em-deepcryo`` (what ``installp`` does) brings no torch or faiss into Scipion's
        Python; the extras ``engines`` and ``gpu`` do."""
        try:
            import tomllib
        except ImportError:
            self.skipTest("reading pyproject.toml needs Python 3.11's tomllib")
        root = os.path.dirname(os.path.dirname(os.path.abspath(deepcryo.__file__)))
        with open(os.path.join(root, "pyproject.toml"), "rb") as f:
            project = tomllib.load(f)["project"]
        names = [d.split(">")[0].split("=")[0].split("[")[0].strip() for d in project["dependencies"]]
        self.assertFalse({"torch", "faiss-cpu", "faiss-gpu-cu12"} & set(names), names)
        self.assertIn("torch>=2.1", project["optional-dependencies"]["engines"])
        self.assertIn("faiss-cpu", project["optional-dependencies"]["engines"])

    def testPythonFollowsDeepcryoPython(self):
        """``DEEPCRYO_PYTHON = <the environment's python>`` in scipion.conf (Scipion exports it) selects it."""
        envPython = self.Plugin.getEnvPython()
        self._setEnv(DEEPCRYO_PYTHON=envPython, PYTHONPATH="/scipion/site-packages")
        self.Plugin._defineVariables()
        self.assertEqual(self.Plugin.getPython(), envPython)
        self.assertTrue(self.Plugin.usesOwnPython())
        self.assertTrue(self.Plugin.getProgram("swiftalign").startswith(shlex.quote(envPython) + " -m "))
        self.assertNotIn("PYTHONPATH", self.Plugin.getEnviron())

    def testVaeProtocolsInTheFlexibilityHubView(self):
        """The protocol tree Scipion's GUI builds (pwem's protocols.conf and every plugin's) shows the VAE
        protocols in the Flexibility Hub view, as cryoDRGN's, and keeps them in the SPA view."""
        views = ProtocolTreeConfig.load(pwem.Domain, pyworkflow.Config.SCIPION_PROTOCOLS)
        vae = {"DeepCryoProtVaeTrain", "DeepCryoProtVaeAnalyze", "DeepCryoProtVaeSelect", "DeepCryoProtVaeVolumes",
               "DeepCryoProtVaeBodyFrame"}
        self.assertEqual(vae & set(_visibleProtocols(views["Flexibility Hub"])), vae)
        self.assertEqual(vae & set(_visibleProtocols(views["Protocols SPA"])), vae)

    def testEveryProtocolIsInTheProtocolTree(self):
        config = configparser.ConfigParser()
        config.optionxform = str
        config.read(os.path.join(os.path.dirname(deepcryo.__file__), "protocols.conf"))
        placed = set(_treeProtocols(json.loads(config["PROTOCOLS"]["Protocols SPA"])))
        self.assertEqual([c.__name__ for c in self._protocolClasses() if c.__name__ not in placed], [])

    @staticmethod
    def _protocolClasses():
        return [c for _, c in inspect.getmembers(deepcryo.protocols, inspect.isclass) if issubclass(c, Protocol)]
