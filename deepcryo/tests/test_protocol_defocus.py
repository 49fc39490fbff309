"""DeepCryoProtDeepDefocus in streaming (headless Scipion, CPU): simulated micrographs with known CTF
arrive in three bursts in a folder watched by a streaming import; every micrograph must get exactly one
CTF, close to the truth, and the output must close after the input closes."""
import os
import time

import numpy as np
from pwem.protocols import ProtImportMicrographs
from pyworkflow.object import Set
from pyworkflow.protocol import getProtocolFromDb
from pyworkflow.tests import BaseTest, setupTestProject

from deepcryo.constants import OUTPUT_CTF
from deepcryo.core import io
from deepcryo.core.micrographs import simulate_micrograph
from deepcryo.protocols import DeepCryoProtDeepDefocus

PX, VOLTAGE, CS, AMP = 1.2, 300.0, 2.7, 0.07
BURSTS = ((0, 1), (2, 3), (4, 5))


def _truths():
    rng = np.random.default_rng(8)
    out = []
    for i in range(6):
        mean, astig = rng.uniform(8000, 30000), rng.uniform(0, 1500)
        out.append(dict(defocus_u_A=mean + astig / 2, defocus_v_A=mean - astig / 2,
                        defocus_angle_deg=rng.uniform(0, 180)))
    return out


class TestDeepCryoDeepDefocusStreaming(BaseTest):

    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        cls.folder = os.path.abspath(cls.proj.getPath("incoming"))
        os.makedirs(cls.folder, exist_ok=True)
        cls.truths = _truths()

    def _writeBurst(self, indices):
        for i in indices:
            img, _ = simulate_micrograph(768, pixel_size_A=PX, voltage_kV=VOLTAGE, cs_mm=CS, amplitude_contrast=AMP,
                                         seed=100 + i, **self.truths[i])
            io.write_mrc(os.path.join(self.folder, "mic_%02d.mrc" % i), img, PX)

    @staticmethod
    def _load(prot):
        """The protocol as its run writes it (its own database)."""
        loaded = getProtocolFromDb(prot.getProject().path, prot.getDbPath(), prot.getObjId())
        loaded.getProject().closeMapper()
        loaded.closeMappers()
        return loaded

    def testStreamingThreeBursts(self):
        self._writeBurst(BURSTS[0])
        imp = self.newProtocol(ProtImportMicrographs, filesPath=self.folder, filesPattern="mic_*.mrc",
                               samplingRate=PX, voltage=VOLTAGE, sphericalAberration=CS, amplitudeContrast=AMP,
                               dataStreaming=True, fileTimeout="1", timeout="40")
        self.proj.launchProtocol(imp, wait=False)
        self._waitOutput(imp, "outputMicrographs", sleepTime=2)
        prot = self.newProtocol(DeepCryoProtDeepDefocus, streamingBatchSize=2, numberOfThreads=1)
        prot.inputMicrographs.set(imp)
        prot.inputMicrographs.setExtended("outputMicrographs")
        self.proj.launchProtocol(prot, wait=False)
        for burst in BURSTS[1:]:
            time.sleep(12)
            self._writeBurst(burst)
        deadline = time.time() + 300
        while time.time() < deadline:
            prot = self._load(prot)
            if not prot.isActive():
                break
            time.sleep(3)
        if prot.isFailed():
            self.fail("defocus protocol failed:\n" + "\n".join(prot.getLogsLastLines()))
        self.assertTrue(prot.isFinished(), "protocol did not finish (status %s)" % prot.getStatus())
        ctfs = getattr(prot, OUTPUT_CTF)
        ctfs.loadAllProperties()
        self.assertEqual(ctfs.getStreamState(), Set.STREAM_CLOSED)
        names = []
        errors = []
        for ctf in ctfs:
            name = os.path.basename(ctf.getMicrograph().getFileName())
            names.append(name)
            t = self.truths[int(name[4:6])]
            errors += [abs(ctf.getDefocusU() - t["defocus_u_A"]), abs(ctf.getDefocusV() - t["defocus_v_A"])]
            self.assertTrue(os.path.exists(ctf.getPsdFile()))
            self.assertGreater(ctf.getResolution(), 0)
        self.assertEqual(sorted(names), ["mic_%02d.mrc" % i for i in range(6)])  # each exactly once
        self.assertLess(np.mean(errors), 150.0, "MAE %.0f Å" % np.mean(errors))
