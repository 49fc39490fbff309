"""Streaming under load (issue #8): 200 micrographs (512², CPU, CNN only) arrive in irregular bursts — one
of 50, an empty one — in a folder watched by a streaming import; micrograph 100 is unusable (NaN). The
defocus protocol must give exactly 199 CTFs, each micrograph once, report the bad one and go on, close its
output when the input closes, and a downstream protocol (pwem's ProtSubSet) run while the stream is open and
again after it closed must see the set grow.
"""
import os
import time

import mrcfile
import numpy as np
from pwem.protocols import ProtImportMicrographs, ProtSubSet
from pyworkflow.object import Set
from pyworkflow.tests import setupTestProject

from deepcryo.constants import OUTPUT_CTF
from deepcryo.core.micrographs import simulate_micrograph
from deepcryo.core.mrc import write_mrc
from deepcryo.protocols import DeepCryoProtDeepDefocus
from deepcryo.tests.harness import ProtocolTest, deliverFile, loadRun, waitForProtocol

PX, VOLTAGE, CS, AMP = 1.2, 300.0, 2.7, 0.07
N, SIZE, BAD = 200, 512, 100
BURSTS = (25, 0, 50, 3, 1, 40, 0, 81)  # sums to N
STREAMED = {}  # figures for RELIABILITY.md


class TestDeepCryoDefocusStreamingLoad(ProtocolTest):

    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.folder = os.path.abspath(cls.proj.getPath("incoming"))
        cls.source = os.path.abspath(cls.proj.getPath("source"))
        os.makedirs(cls.folder)
        os.makedirs(cls.source)
        rng = np.random.default_rng(3)
        for k in range(8):  # 8 distinct micrographs, copied under 200 names
            mean = rng.uniform(8000, 30000)
            img, _ = simulate_micrograph(SIZE, pixel_size_A=PX, voltage_kV=VOLTAGE, cs_mm=CS, amplitude_contrast=AMP,
                                         defocus_u_A=mean + 300, defocus_v_A=mean - 300, defocus_angle_deg=20 * k,
                                         seed=k)
            write_mrc(os.path.join(cls.source, "src_%d.mrc" % k), img, PX)
        bad = np.zeros((SIZE, SIZE), np.float32)
        bad[::7, ::5] = np.nan
        with mrcfile.new(os.path.join(cls.source, "bad.mrc")) as m:
            m.set_data(bad)
            m.voxel_size = PX

    def _write(self, first, count):
        for i in range(first, first + count):
            src = os.path.join(self.source, "bad.mrc" if i == BAD else "src_%d.mrc" % (i % 8))
            deliverFile(src, self.folder, "mic_%03d.mrc" % i)

    def _ctfSize(self, prot):
        ctfs = getattr(loadRun(prot), OUTPUT_CTF, None)
        if ctfs is None:
            return 0
        ctfs.loadAllProperties()
        size = ctfs.getSize()
        ctfs.close()
        return size

    def _subset(self, prot, label):
        """ProtSubSet of every CTF ``prot`` (the project's instance) has output now."""
        self.proj._updateProtocol(prot)  # what the GUI's refresh does: outputs of the run reach the project
        sub = self.newProtocol(ProtSubSet, objLabel=label, selectIds=True, range="1-100000")
        sub.inputFullSet.set(prot)
        sub.inputFullSet.setExtended(OUTPUT_CTF)
        self.launchProtocol(sub)
        return sub.outputCTF.getSize()

    def testStream200WithBadMicrograph(self):
        self.assertEqual(sum(BURSTS), N)
        self._write(0, BURSTS[0])
        imp = self.newProtocol(ProtImportMicrographs, filesPath=self.folder, filesPattern="mic_*.mrc",
                               samplingRate=PX, voltage=VOLTAGE, sphericalAberration=CS, amplitudeContrast=AMP,
                               dataStreaming=True, fileTimeout=1, timeout=12)
        self.proj.launchProtocol(imp, wait=False)
        self._waitOutput(imp, "outputMicrographs", sleepTime=2)
        prot = self.newProtocol(DeepCryoProtDeepDefocus, streamingBatchSize=0, numberOfThreads=1, doRefine=False)
        prot.inputMicrographs.set(imp)
        prot.inputMicrographs.setExtended("outputMicrographs")
        self.proj.launchProtocol(prot, wait=False)
        written, sizes = BURSTS[0], []
        for burst in BURSTS[1:]:
            time.sleep(3)
            self._write(written, burst)
            written += burst
            sizes.append(self._ctfSize(prot))
        # downstream while the stream is open
        self._waitOutput(prot, OUTPUT_CTF, sleepTime=2)
        midSize = self._subset(prot, "subset while streaming")
        running = prot

        def finished(run):  # the import closes 12 s after the last file; the protocol then finishes
            if run.isActive():
                sizes.append(self._ctfSize(run))
            return run.isFinished()
        prot = waitForProtocol(running, finished, poll_s=3)
        ctfs = getattr(prot, OUTPUT_CTF)
        ctfs.loadAllProperties()
        self.assertEqual(ctfs.getStreamState(), Set.STREAM_CLOSED)
        names = [os.path.basename(c.getMicrograph().getFileName()) for c in ctfs]
        ids = [c.getObjId() for c in ctfs]
        expected = ["mic_%03d.mrc" % i for i in range(N) if i != BAD]
        self.assertEqual(len(names), N - 1)
        self.assertEqual(len(set(names)), len(names), "duplicate CTFs")
        self.assertEqual(len(set(ids)), len(ids))
        self.assertEqual(sorted(names), expected)
        log = open(prot.getLogPaths()[0]).read() + open(prot.getLogPaths()[1]).read()
        self.assertIn("mic_%03d.mrc" % BAD, log)
        self.assertIn("NaN", log)
        # the set grew while streaming, and the downstream protocol saw it grow
        self.assertEqual(sizes, sorted(sizes))
        self.assertGreater(len(set(sizes + [N - 1])), 2, "output did not grow in steps: %s" % sizes)
        endSize = self._subset(running, "subset after the stream closed")
        self.assertGreater(midSize, 0)
        self.assertLess(midSize, N - 1)
        self.assertEqual(endSize, N - 1)
        STREAMED.update(streamed=N, bad=1, ctfs=len(names), lost=N - 1 - len(set(names) & set(expected)),
                        downstream=(midSize, endSize))
        path = os.environ.get("DEEPCRYO_STREAM_FIGURES")
        if path:
            with open(path, "w") as f:
                f.write("%s\nsizes seen while streaming: %s\n" % (STREAMED, sizes))
