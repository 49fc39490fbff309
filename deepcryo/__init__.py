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
"""deepcryo: fast single-particle cryo-EM methods for Scipion, on a shared, tested cryo-EM core.

Importing this package imports neither pyworkflow nor pwem. The engines (``deepcryo.core``,
``deepcryo.defocus``, ``deepcryo.swiftalign``, ``deepcryo.landscape``) are plain Python + torch and
run as programs (``python -m deepcryo.<engine>``) under ``DEEPCRYO_PYTHON``, which need not have
Scipion. The Scipion :class:`Plugin` class is built on first access to ``deepcryo.Plugin`` (as
Scipion's plugin discovery and ``from deepcryo import Plugin`` do), so a test harness can also
configure Scipion before pyworkflow reads its configuration.
"""
import importlib.util
import os
import shlex
import shutil
import sys

from .constants import DEEPCRYO_PYTHON, ENGINES

# OpenMP threads that wait at a barrier sleep instead of spinning. On the shared nodes deepcryo runs on (a
# cluster node, a workstation busy with other jobs) a spinning thread burns the CPU its descheduled partner
# needs: the reconstruction of 2000 particles at 2 threads on a loaded 2-core machine took 4 times the CPU
# seconds and 3.5 times the wall time of a passive wait (benchmarks/RESULTS.md). Set before torch loads
# OpenMP, i.e. before any engine module is imported; a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
_logo = "deepcryo_logo.png"
_references = ["delaRosaTrevin2016"]

#: The optional separate environment of the programs (``Plugin.defineBinaries``): package name, the
#: torch build (CPU; the CUDA build can replace it in the environment), the other libraries, and the file
#: that marks a finished installation.
ENV_PACKAGE = "deepcryo-env"
ENV_TORCH = "torch==2.13.0"
ENV_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
ENV_REQUIREMENTS = ("faiss-cpu", "numpy", "scipy", "mrcfile", "emtable", "matplotlib", "scikit-learn")
ENV_FLAG = "deepcryo_env_installed"
DISTRIBUTION = "scipion-em-deepcryo"
#: Modules the programs need beyond the Scipion side's (pip extra ``engines``, or the separate environment).
ENGINE_MODULES = ("torch", "faiss")


def missingEngineModules():
    """Which of :data:`ENGINE_MODULES` the Python running Scipion cannot import (found without importing them,
    so that Scipion's GUI, which asks every protocol whether it is installed, stays fast)."""
    return [name for name in ENGINE_MODULES if importlib.util.find_spec(name) is None]


def expandPath(path):
    """``path`` with ``~`` and ``$VARS`` expanded.

    ``scipion config`` writes every plugin variable into ``scipion.conf`` with the home folder
    abbreviated (``DEEPCRYO_PYTHON = ~/miniconda3/envs/scipion3/bin/python``) and Scipion puts the
    values into the environment as written: unexpanded, a quoted ``~`` reaches the shell literally.
    """
    return os.path.expandvars(os.path.expanduser(path))


def _checkoutRoot():
    """The source checkout the plugin runs from (the folder of ``pyproject.toml`` above the package), or None
    when it runs from an installed wheel."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return root if os.path.isfile(os.path.join(root, "pyproject.toml")) else None


def _checkoutHomepage(root):
    """``Homepage`` of ``[project.urls]`` in the checkout's ``pyproject.toml`` ('' without one, or on a Python
    older than 3.11, which has no TOML reader: the installed metadata then gives it)."""
    try:
        import tomllib
    except ImportError:
        return ""
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        return tomllib.load(f).get("project", {}).get("urls", {}).get("Homepage", "")


def _installedHomepage():
    """``Homepage`` of the installed distribution's metadata (``Project-URL: Homepage, <url>``, which pip writes
    from pyproject's ``[project.urls]``), or ''."""
    from importlib import metadata
    try:
        meta = metadata.metadata(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return ""
    for entry in meta.get_all("Project-URL") or []:
        label, _, url = entry.partition(",")
        if label.strip().lower() == "homepage":
            return url.strip()
    return ""


def _projectUrl():
    """The project's home page, ``Homepage`` of pyproject's ``[project.urls]``: read from the source checkout
    the plugin runs from (the metadata of an editable install dates from its installation), else from the
    installed distribution's metadata; '' when neither has it (Scipion then shows no link rather than pwem's)."""
    root = _checkoutRoot()
    return (_checkoutHomepage(root) if root else "") or _installedHomepage()


def _pluginRequirement():
    """What pip installs as this plugin into the separate environment: the source checkout itself
    (editable) when the plugin runs from one (``scipion3 installp --devel``), else this release."""
    root = _checkoutRoot()
    if root:
        return "-e %s" % shlex.quote(root)
    return "%s==%s" % (DISTRIBUTION, __version__)


def _buildPluginClass():
    """Define ``Plugin(pwem.Plugin)``; its ``__module__`` is ``deepcryo`` as Scipion expects."""
    import pwem
    import pyworkflow.utils as pwutils
    from pyworkflow import VarTypes

    class Plugin(pwem.Plugin):
        """deepcryo's Scipion plugin: configuration and command lines of the internal programs.

        Nothing is compiled: the programs are Python modules of this package, run by ``DEEPCRYO_PYTHON``:
        Scipion's own Python when torch and faiss are installed there (``pip install
        "scipion-em-deepcryo[engines]"``), else the separate environment ``deepcryo-env``, which ``scipion3
        installp`` then installs as the plugin's default binaries.
        """
        _pathVars = []
        _url = _projectUrl()

        @classmethod
        def _defineVar(cls, varName, defaultValue, description="Missing", var_type=None):
            """pyworkflow's ``_defineVar`` (environment first, then the default), with paths
            (``VarTypes.PATH``/``FOLDER``) expanded by :func:`expandPath`; pwem's ``_defineEmVar``
            expands ``~`` too, pyworkflow's ``_defineVar`` does not."""
            value = os.environ.get(varName, defaultValue)
            if var_type in (VarTypes.PATH, VarTypes.FOLDER) and value:
                value = expandPath(value)
            cls._addVar(varName, value, default=defaultValue, description=description, var_type=var_type)

        @classmethod
        def _defineVariables(cls):
            cls._defineVar(DEEPCRYO_PYTHON, cls.defaultPython(), var_type=VarTypes.PATH,
                           description="Python interpreter that runs deepcryo's programs "
                                       "(needs torch, numpy, mrcfile, emtable, faiss and deepcryo).")

        @classmethod
        def defaultPython(cls):
            """``DEEPCRYO_PYTHON`` when scipion.conf does not set it: Scipion's own Python if it has torch and
            faiss, else the separate environment's once installed (else Scipion's, which
            :meth:`validateInstallation` then reports)."""
            if missingEngineModules() and os.path.exists(cls.getEnvPython()):
                return cls.getEnvPython()
            return sys.executable

        @classmethod
        def validateInstallation(cls):
            """Why the programs cannot run, one line each (none when they can); Scipion shows it on the form and
            greys the protocols in its tree. Nothing is started: an interpreter of its own is only checked to
            exist; Scipion's own Python, to find torch and faiss."""
            python = cls.getPython()
            if cls.usesOwnPython():
                if shutil.which(python) is None:
                    return ["DEEPCRYO_PYTHON = %s is not an executable file: install the separate environment "
                            "(scipion3 installb %s) or set DEEPCRYO_PYTHON in scipion.conf to a Python with "
                            "torch and faiss." % (python, ENV_PACKAGE)]
                return []
            missing = missingEngineModules()
            if missing:
                return ["deepcryo's programs need %s, which Scipion's Python (%s) does not have. Either "
                        "install the separate environment (scipion3 installb %s, then set DEEPCRYO_PYTHON = %s "
                        "in scipion.conf) or install them into Scipion's Python (pip install "
                        "\"scipion-em-deepcryo[engines]\")." % (" and ".join(missing), python, ENV_PACKAGE,
                                                                cls.getEnvPython())]
            return []

        @classmethod
        def getPython(cls):
            """The interpreter of the internal programs (``DEEPCRYO_PYTHON``, ``~`` and ``$VARS``
            expanded)."""
            if cls.getVar(DEEPCRYO_PYTHON) is None:  # used before Scipion registered the plugin
                cls._defineVariables()
            return cls.getVar(DEEPCRYO_PYTHON)

        @classmethod
        def usesOwnPython(cls):
            """True when ``DEEPCRYO_PYTHON`` is another interpreter than the one running Scipion."""
            python = cls.getPython()
            return os.path.abspath(shutil.which(python) or python) != os.path.abspath(sys.executable)

        @classmethod
        def getEnviron(cls):
            """Environment of the internal programs: Scipion's, without ``PYTHONPATH`` when they run
            under another interpreter (Scipion's packages must not leak into it)."""
            environ = pwutils.Environ(os.environ)
            if cls.usesOwnPython():
                environ.pop("PYTHONPATH", None)
            return environ

        @classmethod
        def getProgram(cls, engine, *args):
            """Command line ``<python> -m deepcryo.<engine> [args...]``.

            Args:
                engine: one of ``constants.ENGINES`` (e.g. ``'core.reconstruct'``, ``'defocus'``).
                args: optional leading words, e.g. a subcommand (``'predict'``); the protocol passes
                    the options to ``runJob``, the GPU among them as ``--device cuda:%(GPU)s`` (the
                    GPU Scipion gave the step; see ``protocols.protocol_base.GPU_DEVICE``).
            """
            if engine not in ENGINES:
                raise ValueError("unknown deepcryo engine %r (known: %s)" % (engine, ", ".join(ENGINES)))
            return " ".join([shlex.quote(cls.getPython()), "-m", "deepcryo." + engine] + [str(a) for a in args])

        @classmethod
        def getEnvFolder(cls):
            """Folder of the optional separate environment that ``scipion3 installb deepcryo-env`` makes
            (``$EM_ROOT/deepcryo-env-<version>``)."""
            return os.path.join(pwem.Config.EM_ROOT, "%s-%s" % (ENV_PACKAGE, __version__))

        @classmethod
        def getEnvPython(cls):
            """The interpreter of the separate environment: set ``DEEPCRYO_PYTHON`` to it to use it."""
            return os.path.join(cls.getEnvFolder(), "venv", "bin", "python")

        @classmethod
        def defineBinaries(cls, env):
            """The separate environment ``deepcryo-env``, so that torch and faiss need not live in Scipion's
            Python.

            The plugin's pip package does not depend on torch or faiss (they are its extra ``engines``). When
            Scipion's Python lacks them, ``deepcryo-env`` is a default binary: ``scipion3 installp`` makes it
            (``installb`` at any time): a virtual environment of Scipion's Python (venv module) with torch
            (CPU build), faiss-cpu, the other libraries of the programs and this plugin without its Scipion
            dependencies; :meth:`defaultPython` then selects it (or ``DEEPCRYO_PYTHON`` set to
            :meth:`getEnvPython`). When Scipion's Python has them (``pip install
            "scipion-em-deepcryo[engines]"``), it is optional. Scipion's ``PYTHONPATH`` is unset for the
            installation, so that pip does not take Scipion's packages for the environment's.
            """
            python = "venv/bin/python"
            pip = "%s -m pip install --no-cache-dir" % python
            commands = [
                ("unset PYTHONPATH && %s -m venv venv" % shlex.quote(sys.executable), python),
                (" && ".join(["unset PYTHONPATH",
                              "%s --upgrade pip" % pip,
                              "%s %s --index-url %s" % (pip, ENV_TORCH, ENV_TORCH_INDEX),
                              "%s %s" % (pip, " ".join(ENV_REQUIREMENTS)),
                              "%s --no-deps %s" % (pip, _pluginRequirement()),
                              "%s -c 'import torch, faiss, deepcryo.core.cli'" % python,
                              "touch %s" % ENV_FLAG,
                              "echo 'deepcryo-env installed: set DEEPCRYO_PYTHON = %s in scipion.conf'"
                              % cls.getEnvPython()]),
                 ENV_FLAG),
            ]
            env.addPackage(ENV_PACKAGE, version=__version__, tar="void.tgz", commands=commands,
                           default=bool(missingEngineModules()))

    Plugin.__qualname__ = "Plugin"
    return Plugin


def __getattr__(name):
    if name == "Plugin":
        plugin = _buildPluginClass()
        globals()["Plugin"] = plugin
        return plugin
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
