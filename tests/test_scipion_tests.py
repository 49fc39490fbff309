"""``scipion tests`` as users run it: in a Scipion installed with ``scipion3 installp`` there is no pytest, and
Scipion's runner (``pyworkflow.apps.pw_run_tests``: unittest discovery of ``<plugin>/tests/test*.py``) must load
every module of ``deepcryo.tests`` and find Scipion tests in each. Engine tests written for pytest belong in this
folder (``tests/``), not in the plugin.

Both checks run in a subprocess whose ``import pytest`` fails (``sys.modules["pytest"] = None``, set by a
``sitecustomize.py`` first on ``PYTHONPATH``, so also in the processes Scipion starts) and whose Scipion home is a
new, empty folder.
"""
import os
import subprocess
import sys

import deepcryo

PLUGIN_TESTS = os.path.join(os.path.dirname(deepcryo.__file__), "tests")
TEST_MODULES = sorted("deepcryo.tests." + name[:-3] for name in os.listdir(PLUGIN_TESTS)
                      if name.startswith("test") and name.endswith(".py"))
NO_PYTEST = 'import sys\nsys.modules["pytest"] = None\nsys.modules["_pytest"] = None\n'
#: Imports every module of deepcryo.tests (helpers too); prints those that fail, and fails if pytest imports.
IMPORT_ALL = """
import importlib, pkgutil, sys
import deepcryo.tests
failed = []
for module in pkgutil.iter_modules(deepcryo.tests.__path__):
    try:
        importlib.import_module("deepcryo.tests." + module.name)
    except ImportError as error:
        failed.append("%s: %s" % (module.name, error))
try:
    import pytest
    failed.append("pytest is importable: the check is void")
except ImportError:
    pass
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _run_without_pytest(tmp_path, argv):
    blocker = tmp_path / "no_pytest"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_PYTEST)
    home = tmp_path / "scipion_home"
    home.mkdir()
    env = dict(os.environ, SCIPION_HOME=str(home),
               PYTHONPATH=os.pathsep.join(p for p in (str(blocker), os.environ.get("PYTHONPATH")) if p))
    for name in ("SCIPION_CONFIG", "SCIPION_LOCAL_CONFIG", "SCIPION_HOSTS", "SCIPION_USER_DATA"):
        env.pop(name, None)  # this process's private Scipion home (deepcryo.tests.harness) is not the user's
    return subprocess.run([sys.executable] + argv, env=env, cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=300)


def test_every_plugin_test_module_imports_without_pytest(tmp_path):
    run = _run_without_pytest(tmp_path, ["-c", IMPORT_ALL])
    assert run.returncode == 0, "modules of deepcryo.tests that need pytest:\n" + run.stdout + run.stderr[-2000:]


def test_scipion_tests_lists_every_plugin_test_module(tmp_path):
    run = _run_without_pytest(tmp_path, ["-m", "scipion", "tests", "--grep", "deepcryo", "--mode", "modules"])
    output = run.stdout + run.stderr
    assert run.returncode == 0 and "Error loading the test" not in output, output
    listed = sorted(line.split()[-1] for line in run.stdout.splitlines() if "pw_run_tests.py deepcryo.tests." in line)
    assert listed == TEST_MODULES, output
