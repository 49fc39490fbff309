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
"""A headless, self-contained Scipion environment for deepcryo's tests and demo.

Import this module before pyworkflow: pyworkflow reads its configuration (``SCIPION_HOME``,
``SCIPION_USER_DATA``, ``SCIPION_HOSTS``...) from the environment once, when it is first imported.
``deepcryo/tests/__init__.py`` imports it first, and ``import deepcryo`` does not import pyworkflow, so
under ``pytest tests deepcryo/tests`` it runs before pyworkflow. Scipion's runners import pyworkflow first:
``python -m scipion tests deepcryo.tests`` (needs ``SCIPION_HOME`` set, to any folder) and
``SCIPION_DOMAIN=pwem python -m pyworkflow.apps.pw_run_tests deepcryo.tests``; there the settings
below are applied to the loaded ``pyworkflow.Config`` as well.

What :func:`setup` does:

* Always: ``SCIPION_DOMAIN=pwem`` (unless set), ``SCIPION_TEST_NOSYNC=1`` (never download test data),
  ``SCIPION_NOTIFY=False`` (no usage reports), ``SCIPION_PYTHON`` = this interpreter (unless set) and
  this interpreter's ``bin`` folder first on ``PATH``: protocols run in a subprocess started with
  ``$SCIPION_PYTHON``, which must import pyworkflow, pwem and deepcryo.
* When no Scipion configuration exists (``SCIPION_HOME`` unset, or without ``config/hosts.conf``): a
  private, temporary Scipion home with ``config/scipion.conf`` and ``config/hosts.conf`` (scipion-app's
  template), and temporary ``SCIPION_USER_DATA`` (where test projects go) and ``HOME``. It is deleted
  at exit unless ``DEEPCRYO_KEEP_TEST_HOME=1``. An existing configuration is used as it is and never
  written to.
* When pyworkflow is already loaded, the same settings (and the private home's paths) are also
  applied to the loaded ``pyworkflow.Config``.
"""
import atexit
import importlib.util
import os
import shutil
import sys
import tempfile

#: The private Scipion root of this process (None when an existing configuration is used).
PRIVATE_ROOT = None


def _hasScipionConfig():
    home = os.environ.get("SCIPION_HOME")
    return bool(home) and os.path.exists(os.path.join(home, "config", "hosts.conf"))


def _hostsTemplate():
    spec = importlib.util.find_spec("scipion")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scipion-app is not installed: cannot create a Scipion configuration for the tests")
    return os.path.join(spec.submodule_search_locations[0], "templates", "hosts.template")


def _createPrivateHome(root=None):
    """Create ``<root>/scipion_home/config/{scipion.conf,hosts.conf}``, ``<root>/userdata`` and
    ``<root>/home`` (reused when they exist). Without ``root``: a temporary root, deleted at exit unless
    ``DEEPCRYO_KEEP_TEST_HOME=1``. Returns the root and the environment variables that point at it."""
    temporary = root is None
    root = tempfile.mkdtemp(prefix="deepcryo-scipion-") if temporary else os.path.abspath(root)
    home = os.path.join(root, "scipion_home")
    config = os.path.join(home, "config")
    userData = os.path.join(root, "userdata")
    for folder in (config, userData, os.path.join(root, "home")):
        os.makedirs(folder, exist_ok=True)
    if not os.path.exists(os.path.join(config, "hosts.conf")):
        shutil.copyfile(_hostsTemplate(), os.path.join(config, "hosts.conf"))
    with open(os.path.join(config, "scipion.conf"), "w") as f:
        f.write("[PYWORKFLOW]\nSCIPION_DOMAIN = pwem\nSCIPION_NOTIFY = False\nSCIPION_TEST_NOSYNC = 1\n"
                "SCIPION_USER_DATA = %s\n" % userData)
    if temporary and os.environ.get("DEEPCRYO_KEEP_TEST_HOME") != "1":
        atexit.register(shutil.rmtree, root, True)
    return root, {
        "SCIPION_HOME": home,
        "SCIPION_CONFIG": os.path.join(config, "scipion.conf"),
        "SCIPION_LOCAL_CONFIG": os.path.join(config, "scipion.conf"),
        "SCIPION_HOSTS": os.path.join(config, "hosts.conf"),
        "SCIPION_USER_DATA": userData,
        "SCIPION_LOGS": os.path.join(userData, "logs"),
        "SCIPION_LOG": os.path.join(userData, "logs", "scipion.log"),
        "SCIPION_TESTS_OUTPUT": os.path.join(userData, "Tests"),
        "HOME": os.path.join(root, "home"),
    }


def _updateLoadedPyworkflow(pythonWasSet, privateEnv):
    """Apply the test settings (and the private home's paths) to an already imported pyworkflow."""
    import pyworkflow
    for name, value in privateEnv.items():
        if hasattr(pyworkflow.Config, name):
            setattr(pyworkflow.Config, name, value)
    pyworkflow.Config.SCIPION_NOTIFY = False
    pyworkflow.Config.SCIPION_TEST_NOSYNC = True
    if not pythonWasSet:
        pyworkflow.PYTHON = sys.executable


def setup(root=None):
    """Prepare the environment (see the module docstring); safe to call more than once.

    ``root``: folder for a persistent private Scipion home (the demo's); default a temporary one, made
    only when no Scipion configuration exists."""
    global PRIVATE_ROOT
    pythonWasSet = "SCIPION_PYTHON" in os.environ
    os.environ.setdefault("SCIPION_DOMAIN", "pwem")
    os.environ.setdefault("SCIPION_PYTHON", sys.executable)
    os.environ["SCIPION_TEST_NOSYNC"] = "1"
    os.environ["SCIPION_NOTIFY"] = "False"
    binDir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != binDir:
        os.environ["PATH"] = binDir + os.pathsep + path if path else binDir
    privateEnv = {}
    if PRIVATE_ROOT is None and (root is not None or not _hasScipionConfig()):
        PRIVATE_ROOT, privateEnv = _createPrivateHome(root)
        os.environ.update(privateEnv)
    if "pyworkflow" in sys.modules:
        _updateLoadedPyworkflow(pythonWasSet, privateEnv)
    return PRIVATE_ROOT
