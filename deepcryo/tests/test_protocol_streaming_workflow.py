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
"""A streaming workflow as a user schedules it (headless Scipion, CPU): a streaming import of micrographs
that arrive over time in a watched folder → deep defocus → the facility's CTF monitor (scipion-em-facilities'
"ctf monitor", which reads the growing SetOfCTF while acquisition goes on, records every CTF and raises alarms)
and a CTF-based selection (pwem's "filter set" with a defocus formula). The four protocols are saved and
*scheduled* together (``Project.scheduleProtocol``, what the GUI's "Schedule" and
``pyworkflow.project.scripts.schedule`` do), so Scipion's scheduler starts each one when its input is there: the
defocus as soon as the import has micrographs (it works in streaming), the monitor with it, the selection when
the CTFs are complete (pwem's filter does not work in streaming, the scheduler waits for its input set to close).

Asserted: every micrograph gets exactly one CTF close to the simulated truth; the CTF set grows while the import
still runs (an observation with fewer CTFs than the end, taken while the import is active); the monitor has
recorded some CTFs while the defocus was still running and, at the end, every CTF with the defocus values of the
set; every output is closed once the import closes; the selection holds exactly the micrographs whose true
defocus passes its formula.
"""
import os
import sqlite3
import time

from emfacilities.protocols import CTF_LOG_SQLITE, ProtMonitorCTF

from pwem.protocols import ProtImportMicrographs, ProtSetFilter
from pyworkflow.object import Set
from pyworkflow.tests import setupTestProject

from deepcryo.constants import OUTPUT_CTF
from deepcryo.core.micrographs import simulate_micrograph
from deepcryo.core.mrc import write_mrc
from deepcryo.protocols import DeepCryoProtDeepDefocus
from deepcryo.tests.harness import TIMEOUT_S, ProtocolTest, deliverFile, describeRun, loadRun

PX, VOLTAGE, CS, AMP = 1.2, 300.0, 2.7, 0.07
SIZE = 512
#: Mean defocus (Å) of the six micrographs: three below and three above the selection's threshold.
MEANS = (11000.0, 27000.0, 13000.0, 29000.0, 9000.0, 25000.0)
THRESHOLD_A = 19000.0
BURSTS = ((0, 1), (2, 3), (4, 5))
#: Largest error of one CTF's mean defocus (Å); the shipped model with the fit is within 40 Å on these 512²
#: micrographs (a few hundred Å would already move the rings by a good fraction of a period at 5 Å).
TOLERANCE_A = 300.0


def _truth(i):
    astig = 400.0 + 100.0 * i
    return dict(defocus_u_A=MEANS[i] + astig / 2, defocus_v_A=MEANS[i] - astig / 2, defocus_angle_deg=25.0 * i)


def _waitRun(prot, until, what, observe=None, poll_s=1.0):
    """Wait until ``until(run)`` holds for the scheduled ``prot`` (``run``: :func:`harness.loadRun`), calling
    ``observe(run)`` at each poll; fails when the run ends without it, or after ``harness.TIMEOUT_S``.

    (``harness.waitForProtocol`` also watches the run's process id; a scheduled protocol's id is that of the
    scheduler, which forks and exits, so this only reads the run's status.)"""
    start = time.monotonic()
    while True:
        run = loadRun(prot)
        if observe is not None:
            observe(run)
        if until(run):
            return run
        if run.isFailed() or run.isAborted() or (run.isFinished() and not until(run)):
            raise AssertionError("waiting for %s: the run ended. %s" % (what, describeRun(prot, run)))
        if time.monotonic() - start > TIMEOUT_S:
            raise AssertionError("waiting for %s: not there after %.0f s. %s" % (what, TIMEOUT_S,
                                                                                describeRun(prot, run)))
        time.sleep(poll_s)


def _monitored(monitor):
    """(ctfID, defocus U, defocus V) rows the CTF monitor has recorded so far (none before its database exists)."""
    path = monitor._getPath(CTF_LOG_SQLITE)
    if not os.path.exists(path):
        return []
    with sqlite3.connect(path) as db:
        try:
            return db.execute("SELECT ctfID, defocusU, defocusV FROM log ORDER BY ctfID").fetchall()
        except sqlite3.OperationalError:  # the table is not created yet
            return []


def _size(run, name):
    """Size of output ``name`` of a run read by :func:`loadRun` (0 without the output)."""
    output = getattr(run, name, None)
    if output is None:
        return 0
    output.loadAllProperties()
    size = output.getSize()
    output.close()
    return size


class TestDeepCryoScheduledStreamingWorkflow(ProtocolTest):

    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.folder = os.path.abspath(cls.proj.getPath("incoming"))
        cls.source = os.path.abspath(cls.proj.getPath("source"))
        os.makedirs(cls.folder)
        os.makedirs(cls.source)
        for i in range(len(MEANS)):
            img, _ = simulate_micrograph(SIZE, pixel_size_A=PX, voltage_kV=VOLTAGE, cs_mm=CS, amplitude_contrast=AMP,
                                         seed=300 + i, **_truth(i))
            write_mrc(os.path.join(cls.source, "mic_%02d.mrc" % i), img, PX)

    def _deliver(self, indices):
        """Micrographs arrive complete in the watched folder (copied beside it, then renamed), as from a
        microscope's transfer."""
        for i in indices:
            name = "mic_%02d.mrc" % i
            deliverFile(os.path.join(self.source, name), self.folder, name)

    def testScheduledImportDefocusSelection(self):
        self._deliver(BURSTS[0])
        imp = self.newProtocol(ProtImportMicrographs, filesPath=self.folder, filesPattern="mic_*.mrc",
                               samplingRate=PX, voltage=VOLTAGE, sphericalAberration=CS, amplitudeContrast=AMP,
                               dataStreaming=True, fileTimeout="1", timeout="45")
        self.proj.saveProtocol(imp)
        defocus = self.newProtocol(DeepCryoProtDeepDefocus, streamingBatchSize=2, numberOfThreads=1)
        defocus.inputMicrographs.set(imp)
        defocus.inputMicrographs.setExtended("outputMicrographs")
        self.proj.saveProtocol(defocus)
        select = self.newProtocol(ProtSetFilter, operation=ProtSetFilter.CHOICE_FORMULA,
                                  formula="item.getDefocusU() + item.getDefocusV() < %r" % (2 * THRESHOLD_A))
        select.inputSet.set(defocus)
        select.inputSet.setExtended(OUTPUT_CTF)
        self.proj.saveProtocol(select)
        monitor = self.newProtocol(ProtMonitorCTF, samplingInterval=1, monitorTime=TIMEOUT_S / 60.0)
        monitor.inputProtocol.set(defocus)
        self.proj.saveProtocol(monitor)
        for prot in (imp, defocus, monitor, select):  # the whole workflow at once, as the GUI's "Schedule" does
            self.proj.scheduleProtocol(prot)

        seen = []  # (import active, CTFs) at each poll
        monitored_while_running = []  # CTFs the monitor had recorded at each poll while the defocus ran

        def observe(run):
            seen.append((loadRun(imp).isActive(), _size(run, OUTPUT_CTF)))
            if run.isActive():
                monitored_while_running.append(len(_monitored(monitor)))

        # the scheduler starts the defocus once the import has micrographs; more arrive while both run
        _waitRun(defocus, lambda run: run.isActive() and not run.isScheduled(), "the scheduler to start the defocus")
        self._deliver(BURSTS[1])
        _waitRun(defocus, lambda run: _size(run, OUTPUT_CTF) >= len(BURSTS[0]), "the first CTFs", observe)
        self._deliver(BURSTS[2])
        defocus = _waitRun(defocus, lambda run: run.isFinished(), "the defocus to finish", observe)
        select = _waitRun(select, lambda run: run.isFinished(), "the selection to finish")
        _waitRun(monitor, lambda run: run.isFinished(), "the monitor to finish")
        imp = loadRun(imp)

        # the CTF set grew while the import was still running, and everything closed
        n = len(MEANS)
        self.assertTrue(any(active and 0 < size < n for active, size in seen), seen)
        self.assertEqual([size for _, size in seen], sorted(size for _, size in seen))
        for run, name in ((imp, "outputMicrographs"), (defocus, OUTPUT_CTF), (select, OUTPUT_CTF)):
            output = getattr(run, name)
            output.loadAllProperties()
            self.assertEqual(output.getStreamState(), Set.STREAM_CLOSED, "%s of %s" % (name, run.getObjLabel()))

        # every micrograph has one CTF close to its truth
        ctfs = {}
        for ctf in getattr(defocus, OUTPUT_CTF):
            name = os.path.basename(ctf.getMicrograph().getFileName())
            self.assertNotIn(name, ctfs)
            ctfs[name] = (ctf.getDefocusU(), ctf.getDefocusV())
        self.assertEqual(sorted(ctfs), ["mic_%02d.mrc" % i for i in range(n)])
        errors = {name: abs((u + v) / 2 - MEANS[int(name[4:6])]) for name, (u, v) in ctfs.items()}
        self.assertLess(max(errors.values()), TOLERANCE_A, errors)

        # the monitor consumed the set while it grew, and recorded every CTF as the set holds it
        self.assertTrue(any(0 < k < n for k in monitored_while_running), monitored_while_running)
        recorded = {ctf_id: (u, v) for ctf_id, u, v in _monitored(monitor)}
        expected = {ctf.getObjId(): (ctf.getDefocusU(), ctf.getDefocusV()) for ctf in getattr(defocus, OUTPUT_CTF)}
        self.assertEqual(sorted(recorded), sorted(expected))
        for ctf_id, (u, v) in expected.items():
            self.assertAlmostEqual(recorded[ctf_id][0], u, places=2)
            self.assertAlmostEqual(recorded[ctf_id][1], v, places=2)

        # the selection consumed the complete set: exactly the micrographs whose true defocus passes
        selected = sorted(os.path.basename(c.getMicrograph().getFileName()) for c in getattr(select, OUTPUT_CTF))
        self.assertEqual(selected, ["mic_%02d.mrc" % i for i in range(n) if MEANS[i] < THRESHOLD_A])
