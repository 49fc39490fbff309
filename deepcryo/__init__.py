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

__version__ = "0.1.0"
_logo = "deepcryo_logo.png"
_references = ["delaRosaTrevin2016"]


def expandPath(path):
    """``path`` with ``~`` and ``$VARS`` expanded.

    ``scipion config`` writes every plugin variable into ``scipion.conf`` with the home folder
    abbreviated (``DEEPCRYO_PYTHON = ~/miniconda3/envs/scipion3/bin/python``) and Scipion puts the
    values into the environment as written: unexpanded, a quoted ``~`` reaches the shell literally.
    """
    return os.path.expandvars(os.path.expanduser(path))


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
        def defineBinaries(cls, env):
            """Nothing to install: the programs are this package's Python modules; their
            dependencies are installed with the plugin (``pip install scipion-em-deepcryo``)."""

    Plugin.__qualname__ = "Plugin"
    return Plugin


def __getattr__(name):
    if name == "Plugin":
        plugin = _buildPluginClass()
        globals()["Plugin"] = plugin
        return plugin
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
