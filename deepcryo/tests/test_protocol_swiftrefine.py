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
"""DeepCryoProtSwiftRefine on simulated particles (headless Scipion, CPU, small).

600 particles (48 px, 3 Å/px, SNR 0.2, CTF) of a phantom, imported without alignment, refined from the
phantom low-passed to 30 Å for 3 iterations; outputs and accuracy (median angular error < 5°, map better than
16 Å against the truth) are checked; then the headless figures of the viewer. A second run is SIGKILLed
(all its processes) as iteration 2 begins and resumed with Scipion's continue mode.
"""
import ctypes
import os
import time

import numpy as np
import psutil
import torch
from pwem.protocols import ProtImportVolumes
from pyworkflow.tests import setupTestProject

from deepcryo.constants import OUTPUT_FSC, OUTPUT_PARTICLES, OUTPUT_VOLUME
from deepcryo.convert import fscResolution, posesFromMatrices
from deepcryo.core import fourier, geometry, simulate
from deepcryo.core.fsc import fsc, fsc_resolution_A
from deepcryo.core.mrc import read_mrc, write_mrc
from deepcryo.core.particles import read_particles
from deepcryo.protocols import DeepCryoProtSwiftRefine
from deepcryo.tests.harness import TIMEOUT_S, ProtocolTest, isAlive, waitForProtocol
from deepcryo.tests.sets import importParticleSet, particleSetFromStar

BOX, PX, N = 48, 3.0, 600
PR_SET_CHILD_SUBREAPER = 36  # prctl(2), Linux


def _freezeWhen(prot, path, what):
    """Stop (SIGSTOP) every process of the launched run ``prot`` as soon as ``path`` exists and return them,
    the run's own process first. Polled every 20 ms, so that a kill lands at a known point of the run even on a
    fast machine (a fixed sleep after ``path`` appeared once let a whole iteration finish)."""
    deadline = time.monotonic() + TIMEOUT_S
    while not os.path.exists(path):
        if not isAlive(prot.getPid()) or time.monotonic() > deadline:
            waitForProtocol(prot, lambda run: os.path.exists(path), what, timeout_s=0)  # fails with the run's log
            break
        time.sleep(0.02)
    root = psutil.Process(prot.getPid())
    victims = [root] + root.children(recursive=True)
    for v in reversed(victims):                                   # children first: no parent sees a child stop
        v.suspend()
    return victims


class TestDeepCryoSwiftRefine(ProtocolTest):

    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        folder = os.path.abspath(cls.proj.getPath("simulated"))
        cls.vol = simulate.phantom_volume(BOX, seed=5)
        cls.star = simulate.write_particle_set(folder, cls.vol, N, PX, snr=0.2, seed=6, max_shift_px=2.0,
                                               defocus_range_A=(15000.0, 25000.0))
        write_mrc(os.path.join(folder, "ref.mrc"),
                     fourier.lowpass_volume(torch.as_tensor(cls.vol), 30.0, PX).numpy(), PX)
        cls.importParts = importParticleSet(
            cls, particleSetFromStar(cls.star, os.path.join(folder, "raw.sqlite"), withAlignment=False), PX)
        cls.importVol = cls.newProtocol(ProtImportVolumes, filesPath=folder, filesPattern="ref.mrc", samplingRate=PX)
        cls.launchProtocol(cls.importVol)

    def testRefine(self):
        prot = self.newProtocol(DeepCryoProtSwiftRefine, maxIterations=3, numberOfThreads=2)
        prot.inputParticles.set(self.importParts.outputParticles)
        prot.inputVolumes.append(self.importVol.outputVolume)
        self.launchProtocol(prot)
        out = getattr(prot, OUTPUT_PARTICLES)
        self.assertSetSize(out, N)
        self.assertTrue(out.hasAlignmentProj())
        first = out.getFirstItem()
        self.assertIn(first._rlnRandomSubset.get(), (1, 2))
        self.assertTrue(hasattr(first, "_dcSwiftScore"))
        mats = np.stack([p.getTransform().getMatrix() for p in out.iterItems(orderBy="id")])
        angles, _ = posesFromMatrices(mats)
        truth = read_particles(self.star, require_images=False).angles_deg()
        err = geometry.pose_distance_deg(torch.as_tensor(truth), torch.as_tensor(np.asarray(angles))).numpy()
        self.assertLess(np.median(err), 5.0)
        volume = getattr(prot, OUTPUT_VOLUME)
        self.assertEqual(len(volume.getHalfMaps().split(",")), 2)
        self.assertAlmostEqual(volume.getSamplingRate(), PX)
        final, _ = read_mrc(volume.getFileName())
        self.assertLess(fsc_resolution_A(fsc(self.vol, final), PX, 0.5), 16.0)     # 30 Å at the start
        res = fscResolution(getattr(prot, OUTPUT_FSC), PX)
        self.assertLess(res, 16.0)
        self.assertIn("iterations", prot.summary()[0])

        # viewer figures, headless
        from deepcryo.viewers.plots import plot_fsc_curves
        from deepcryo.viewers.viewer_swiftrefine import iteration_fsc_curves, plot_refine_history
        curves = iteration_fsc_curves(prot._getExtraPath("refine"))
        self.assertEqual(len(curves), len(prot.history()))
        for i, fig in enumerate((plot_fsc_curves(curves, PX), plot_refine_history(prot.history()))):
            fn = os.path.abspath(self.proj.getPath("refine_%d.png" % i))
            fig.savefig(fn)
            self.assertGreater(os.path.getsize(fn), 0)

    def testContinueAfterKill(self):
        """Scipion's continue mode after every process of the run was SIGKILLed as iteration 2 began: the finished
        steps and iteration 1 are not redone, the run finishes with the same accuracy as an uninterrupted one."""
        from pyworkflow.protocol.constants import MODE_RESUME
        prot = self.newProtocol(DeepCryoProtSwiftRefine, maxIterations=2, numberOfThreads=2,
                                objLabel="killed, then continued")
        prot.inputParticles.set(self.importParts.outputParticles)
        prot.inputVolumes.append(self.importVol.outputVolume)
        libc = ctypes.CDLL(None)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of the killed run are reaped here, as init would
        self.addCleanup(libc.prctl, PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        self.proj.launchProtocol(prot, wait=False)
        victims = _freezeWhen(prot, prot._getExtraPath("refine", "it001_model.json"), "iteration 1 to finish")
        self.assertTrue(any("deepcryo.swiftalign" in " ".join(v.cmdline()) for v in victims[1:]))
        for v in victims:
            v.kill()
        deadline = time.time() + 30
        while any(psutil.pid_exists(v.pid) for v in victims) and time.time() < deadline:
            for v in victims:
                try:
                    os.waitpid(v.pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            time.sleep(0.1)
        self.assertFalse(os.path.exists(prot._getExtraPath("refine", "it002_model.json")))
        stamps = {f: os.path.getmtime(prot._getExtraPath(f)) for f in ("input_particles.star", "refine/it001_half1.mrc")}

        self.proj._updateProtocol(prot)
        self.proj.checkPid(prot)                                    # what Scipion's GUI does on refresh
        self.assertTrue(prot.isFailed(), prot.getStatus())          # Scipion sees the dead run as failed
        prot.runMode.set(MODE_RESUME)
        self.launchProtocol(prot)
        for f, t in stamps.items():
            self.assertEqual(os.path.getmtime(prot._getExtraPath(f)), t, "%s was redone" % f)
        self.assertEqual([h["iteration"] for h in prot.history()], [1, 2])
        mats = np.stack([p.getTransform().getMatrix() for p in getattr(prot, OUTPUT_PARTICLES).iterItems(orderBy="id")])
        angles, _ = posesFromMatrices(mats)
        truth = read_particles(self.star, require_images=False).angles_deg()
        err = geometry.pose_distance_deg(torch.as_tensor(truth), torch.as_tensor(np.asarray(angles))).numpy()
        self.assertLess(np.median(err), 5.0)
        final, _ = read_mrc(getattr(prot, OUTPUT_VOLUME).getFileName())
        self.assertLess(fsc_resolution_A(fsc(self.vol, final), PX, 0.5), 16.0)

    def testValidateMismatchedMap(self):
        folder = os.path.abspath(self.proj.getPath("simulated"))
        write_mrc(os.path.join(folder, "small.mrc"), np.zeros((32, 32, 32), np.float32), PX)
        small = self.newProtocol(ProtImportVolumes, filesPath=folder, filesPattern="small.mrc", samplingRate=PX)
        self.launchProtocol(small)
        prot = self.newProtocol(DeepCryoProtSwiftRefine, initialResolution=4.0)
        prot.inputParticles.set(self.importParts.outputParticles)
        prot.inputVolumes.append(small.outputVolume)
        errors = prot.validate()
        self.assertTrue(any("box 32 px differs" in e for e in errors), errors)
        self.assertTrue(any("beyond Nyquist" in e for e in errors), errors)
