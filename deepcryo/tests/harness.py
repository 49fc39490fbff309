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
"""Prepares the headless Scipion environment of the tests (see :mod:`deepcryo.scipion_env`), and gives every
wait of a test for a protocol run a deadline.

Import this module before pyworkflow: pyworkflow reads its configuration from the environment once,
when it is first imported. ``deepcryo/tests/__init__.py`` imports it first.

Protocol tests derive from :class:`ProtocolTest` (pyworkflow's ``BaseTest``, whose ``launchProtocol`` and
``_waitOutput`` wait here) and poll running protocols with :func:`waitForProtocol`: a run that fails at start,
dies, or stalls makes the test fail with the run's name, status, what was awaited and its log tail, instead of
hanging.
"""
import os
import re
import shutil
import time
import uuid
import types

from deepcryo import scipion_env

PRIVATE_ROOT = scipion_env.setup()

import psutil  # noqa: E402
from pyworkflow.protocol import Protocol, getProtocolFromDb  # noqa: E402 -- pyworkflow only after setup()
from pyworkflow.tests import BaseTest  # noqa: E402

#: Longest wait of a test for one protocol run or state, in s. The slowest run of the suite takes a few
#: minutes on 2 CPU cores; ``DEEPCRYO_TEST_TIMEOUT_S`` overrides.
TIMEOUT_S = float(os.environ.get("DEEPCRYO_TEST_TIMEOUT_S", 900))
LOG_LINES = 25


def loadRun(prot):
    """The protocol as its run wrote it (the run's own database), with the database closed again."""
    run = getProtocolFromDb(prot.getProject().path, prot.getDbPath(), prot.getObjId())
    run.getProject().closeMapper()
    run.closeMappers()
    return run


def isAlive(pid):
    """False once process ``pid`` has exited (also when it is an unreaped zombie); True for pid 0 (unknown)."""
    if not pid:
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def describeRun(prot, run):
    """``Class 'label' (run id), status ...`` of the launched ``prot`` as its ``run`` (:func:`loadRun`) has it,
    with the error message and the tail of the logs."""
    text = "%s %r (run %s), status %r" % (prot.getClassName(), prot.getObjLabel(), prot.getObjId(), run.getStatus())
    if run.getErrorMessage():
        text += ": %s" % run.getErrorMessage()
    for index, name in enumerate(("stdout", "stderr")):
        lines = run.getLogsLastLines(LOG_LINES, logFile=index)
        if lines:
            text += "\n--- last lines of its %s ---\n%s" % (name, "\n".join(lines))
    return text


def waitForProtocol(prot, until=None, what="the run to finish", timeout_s=None, poll_s=1.0):
    """Wait until ``until(run)`` holds for the run of the launched protocol ``prot`` (``run``: the protocol as
    :func:`loadRun` reads it; default: the run has finished) and return that ``run``.

    Fails (``AssertionError``, message from :func:`describeRun`) when the run ends first, when its process
    (``prot.getPid()``) has exited while its status still says active, or after ``timeout_s`` (default
    :data:`TIMEOUT_S`). The run's database is read every ``poll_s`` s, and at once when its process exits.
    """
    until = until or (lambda r: r.isFinished())
    timeout_s = TIMEOUT_S if timeout_s is None else timeout_s
    start = time.monotonic()
    while True:
        exited = not isAlive(prot.getPid())  # looked at before reading: an exited run has written its end
        run = loadRun(prot)
        if until(run):
            return run
        waited = time.monotonic() - start
        if not run.isActive():
            problem = "the run ended after %.0f s" % waited
        elif exited:
            problem = "its process %s exited after %.0f s without a final status" % (prot.getPid(), waited)
        elif waited > timeout_s:
            problem = "still not there after %.0f s (DEEPCRYO_TEST_TIMEOUT_S)" % timeout_s
        else:
            nextRead = time.monotonic() + poll_s
            while time.monotonic() < nextRead and isAlive(prot.getPid()):
                time.sleep(0.1)
            continue
        raise AssertionError("waiting for %s: %s. %s" % (what, problem, describeRun(prot, run)))


def checkFinishedRun(prot):
    """What every finished deepcryo run must give Scipion: each output declared in ``_possibleOutputs`` with its
    exact class (Scipion offers these to the protocols scheduled after it), and a methods text whose
    ``[references]`` are keys of the plugin's BibTeX that ``_citations`` lists. Raises ``AssertionError``."""
    possible = dict(prot.getPossibleOutputs() or {})
    defined = {name: type(output) for name, output in prot.iterOutputAttributes()}
    wrong = {name: (cls.__name__, getattr(possible.get(name), "__name__", possible.get(name)))
             for name, cls in defined.items() if possible.get(name) is not cls}
    assert not wrong, "%s: outputs (defined, declared in _possibleOutputs): %s" % (prot.getClassName(), wrong)
    assert type(prot)._methods is not Protocol._methods, "%s has no _methods" % prot.getClassName()
    methods = " ".join(prot._methods())
    assert methods, "%s: no methods text after a finished run" % prot.getClassName()
    text = re.sub(r"\[\[[^\]]*\]\[[^\]]*\]\]", "", methods)  # without the links to objects ([[sci-open:id][name]])
    keys = set(re.findall(r"\[([^\[\]]*)\]", text))  # Scipion links "[Key]", one key per bracket
    bibtex = prot.getClassPackage()._bibtex
    assert keys <= set(bibtex) and keys <= set(prot._citations()), \
        "%s: methods cite %s; bibtex has %s, _citations() %s" % (prot.getClassName(), sorted(keys),
                                                                sorted(keys & set(bibtex)), prot._citations())


class ProtocolTest(BaseTest):
    """pyworkflow's ``BaseTest`` whose waits for protocols have a deadline (:func:`waitForProtocol`)."""

    @classmethod
    def setUpOwnProject(cls):
        """A new project for this test class, made the working folder (pyworkflow launches protocols relative
        to it). ``Manager.createProject`` deletes a project of the same name, so the name carries the process id
        and a random tag: two runs of a test side by side never share one."""
        from pyworkflow.project import Manager  # pyworkflow only after setup()
        cls.projName = "%s_%d_%s" % (cls.__name__, os.getpid(), uuid.uuid4().hex[:8])
        cls.proj = Manager().createProject(cls.projName)
        cls.outputPath = cls.proj.path
        os.chdir(cls.outputPath)

    @classmethod
    def launchProtocol(cls, prot, waitForOutput=()):
        """``BaseTest.launchProtocol``: launch ``prot`` and wait until it finishes (or, with
        ``waitForOutput=[names]``, until it has those outputs); fails if it fails or stalls."""
        cls.proj.launchProtocol(prot, wait=False)
        if waitForOutput:
            waitForProtocol(prot, lambda run: all(run.hasAttribute(o) for o in waitForOutput),
                            "outputs %s" % list(waitForOutput))
        else:
            waitForProtocol(prot)
        cls.proj._updateProtocol(prot)
        if prot.getClassPackageName() == "deepcryo" and prot.isFinished():
            checkFinishedRun(prot)
        return prot

    @classmethod
    def _waitOutput(cls, prot, outputAttributeName, sleepTime=2, timeOut=None):
        """``BaseTest._waitOutput``: wait until the running ``prot`` has the output (at most ``timeOut`` s);
        fails instead of returning when the run ends without it or stalls."""
        waitForProtocol(prot, lambda run: run.hasAttribute(outputAttributeName),
                        "output %r" % outputAttributeName, timeOut, poll_s=sleepTime)
        cls.proj._updateProtocol(prot)


def fakeChimeraModule(program, calls):
    """A stand-in for scipion-em-chimera's module ``chimera``: its ``Plugin`` has the plugin's ``getProgram``
    (``program``) and ``runChimeraProgram``, which appends ``(program, args, cwd)`` to ``calls``."""
    class Plugin:
        @classmethod
        def getProgram(cls):
            return program

        @classmethod
        def runChimeraProgram(cls, program, args="", cwd=None, extraEnv=None):
            calls.append((program, args, cwd))

    module = types.ModuleType("chimera")
    module.Plugin = Plugin
    return module


def deliverFile(source, folder, name):
    """Put a copy of ``source`` into the watched ``folder`` as ``name`` the way a microscope's transfer does:
    copied beside it under a hidden name, then renamed, so a streaming import never sees a partial file."""
    tmp = os.path.join(folder, ".%s.part" % name)
    shutil.copy(source, tmp)
    os.replace(tmp, os.path.join(folder, name))
