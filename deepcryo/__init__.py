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

        Nothing is downloaded or compiled: the programs are Python modules of this package, run by
        ``DEEPCRYO_PYTHON`` (default: the Python running Scipion).
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
            cls._defineVar(DEEPCRYO_PYTHON, sys.executable, var_type=VarTypes.PATH,
                           description="Python interpreter that runs deepcryo's programs "
                                       "(needs torch, numpy, mrcfile, emtable, faiss and deepcryo).")

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
            """The optional separate environment ``deepcryo-env`` (not installed by default).

            By default nothing is installed: the programs are this package's modules and run under
            Scipion's Python, which then needs torch and faiss (installed with the plugin). Instead,
            ``scipion3 installb deepcryo-env`` makes a virtual environment with Scipion's Python (venv
            module) and installs into it torch (CPU build), faiss-cpu, the other libraries of the programs
            and this plugin without its Scipion dependencies; ``DEEPCRYO_PYTHON`` set to
            :meth:`getEnvPython` then selects it. Scipion's ``PYTHONPATH`` is unset for the installation,
            so that pip does not take Scipion's packages for the environment's.
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
            env.addPackage(ENV_PACKAGE, version=__version__, tar="void.tgz", commands=commands, default=False)

    Plugin.__qualname__ = "Plugin"
    return Plugin


def __getattr__(name):
    if name == "Plugin":
        plugin = _buildPluginClass()
        globals()["Plugin"] = plugin
        return plugin
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
