"""DeepCryoProtDeepDefocus in streaming (headless Scipion, CPU): simulated micrographs with known CTF
arrive in three bursts in a folder watched by a streaming import; every micrograph must get exactly one
CTF, close to the truth, and the output must close after the input closes."""
import os
import time

import numpy as np
from pwem.protocols import ProtImportMicrographs
from pyworkflow.object import Set
from pyworkflow.tests import setupTestProject

from deepcryo.constants import OUTPUT_CTF
from deepcryo.convert import CTF_AVROT_ATTR, CTF_SIGMA_ATTR
from deepcryo.core.ctf import ctf_2d
from deepcryo.core.micrographs import simulate_micrograph
from deepcryo.core.mrc import read_mrc, write_mrc
from deepcryo.core.star import read_star
from deepcryo.defocus.model import load_model
from deepcryo.protocols import DeepCryoProtDeepDefocus, DeepCryoProtDeepDefocusTrain
from deepcryo.protocols.protocol_defocus import OUTPUT_MODEL
from deepcryo.tests.harness import ProtocolTest, waitForProtocol

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


class TestDeepCryoDeepDefocusStreaming(ProtocolTest):

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
            write_mrc(os.path.join(self.folder, "mic_%02d.mrc" % i), img, PX)

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
        prot = waitForProtocol(prot, poll_s=3)
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


class TestDeepCryoDeepDefocusTrainAndViewer(ProtocolTest):
    """Predict (shipped model) → its SetOfCTF as labels → fine-tune 1 epoch (training protocol) → predict with
    the trained model (the predict protocol accepts it; CTFs still close to the simulation's truth) → viewer
    (headless: Agg) writes its summary PNG."""

    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)
        folder = os.path.abspath(cls.proj.getPath("mics"))
        os.makedirs(folder, exist_ok=True)
        cls.truths = _truths()[:4]
        for i, t in enumerate(cls.truths):
            img, _ = simulate_micrograph(768, pixel_size_A=PX, voltage_kV=VOLTAGE, cs_mm=CS, amplitude_contrast=AMP,
                                         seed=200 + i, **t)
            write_mrc(os.path.join(folder, "mic_%02d.mrc" % i), img, PX)
        cls.imp = cls.newProtocol(ProtImportMicrographs, filesPath=folder, filesPattern="mic_*.mrc", samplingRate=PX,
                                  voltage=VOLTAGE, sphericalAberration=CS, amplitudeContrast=AMP)
        cls.launchProtocol(cls.imp)

    def _predict(self, model=None):
        prot = self.newProtocol(DeepCryoProtDeepDefocus, streamingBatchSize=4, numberOfThreads=2)
        prot.inputMicrographs.set(self.imp)
        prot.inputMicrographs.setExtended("outputMicrographs")
        if model is not None:
            prot.trainedModel.set(model)
            prot.trainedModel.setExtended(OUTPUT_MODEL)
        self.launchProtocol(prot)
        ctfs = getattr(prot, OUTPUT_CTF)
        errors = []
        for ctf in ctfs:
            t = self.truths[int(os.path.basename(ctf.getMicrograph().getFileName())[4:6])]
            errors += [abs(ctf.getDefocusU() - t["defocus_u_A"]), abs(ctf.getDefocusV() - t["defocus_v_A"])]
            self.assertGreater(getattr(ctf, CTF_SIGMA_ATTR).get(), 0)  # the defocus's standard error (Å)
            self.assertEqual(np.loadtxt(getattr(ctf, CTF_AVROT_ATTR).get()).shape[0], 6)  # CTFFIND's avrot rows
        self.assertEqual(ctfs.getSize(), len(self.truths))
        self.assertLess(np.mean(errors), 150.0, "MAE %.0f Å" % np.mean(errors))
        return prot

    def testTrainThenPredictThenView(self):
        first = self._predict()
        train = self.newProtocol(DeepCryoProtDeepDefocusTrain, useSimulation=False, fineTune=True, epochs=1,
                                 numberOfThreads=2)
        train.inputCTF.set(first)
        train.inputCTF.setExtended(OUTPUT_CTF)
        self.launchProtocol(train)
        path = getattr(train, OUTPUT_MODEL).getFileName()
        model, config = load_model(path)  # a deepcryo defocus model file, fine-tuned from the shipped one
        self.assertEqual(config["arch"], load_model()[1]["arch"])
        labels = read_star(train._getExtraPath("labels.star"))["micrographs"]
        self.assertEqual(len(labels["rlnDefocusU"]), len(self.truths))
        second = self._predict(train)
        bad = self.newProtocol(DeepCryoProtDeepDefocus, minDefocus=20000.0, maxDefocus=10000.0)
        bad.inputMicrographs.set(self.imp)
        bad.inputMicrographs.setExtended("outputMicrographs")
        self.assertTrue(any("defocus search range" in e for e in bad.validate()))

        # viewer, headless: the PNG summary and one plotter
        import matplotlib
        matplotlib.use("Agg")
        from deepcryo.viewers.viewer_defocus import DeepCryoDefocusViewer, ctf_records, psd_with_ctf
        from pwem.viewers.views import CtfView
        views = DeepCryoDefocusViewer(project=self.proj)._visualize(second)
        png = second._getExtraPath("defocus_summary.png")
        self.assertEqual(len(views), 2)
        self.assertIsInstance(views[1], CtfView)  # pwem's CTF table of the output
        self.assertTrue(os.path.getsize(png) > 10000)
        # the overlay's left half is the CTF² of the fitted values: its rings match the PSD's right half
        records = ctf_records(getattr(second, OUTPUT_CTF))
        r = records[0]
        psd, _ = read_mrc(r["psd"])
        img = psd_with_ctf(psd, read_mrc(r["ctf_image"])[0])  # the program's fitted CTF² beside the PSD
        size, samp = psd.shape[-1], r["psd_sampling_A"]
        half = size // 2  # the PSD is centrosymmetric: its left half mirrors the right half shown
        yy, xx = np.mgrid[:size, :half] - half
        radius = np.hypot(xx, yy)
        band = (radius >= size * samp / 30.0) & (radius <= size * samp / 8.0) & (psd[:, :half] != 0)  # 30-8 Å
        left, data = img[:, :half][band], psd[:, :half][band]
        self.assertGreater(np.corrcoef(left, data)[0, 1], 0.25)
        t = self.truths[int(os.path.basename(r["micrograph"])[4:6])]
        truth = ctf_2d(size, samp, t["defocus_u_A"], t["defocus_v_A"], t["defocus_angle_deg"], VOLTAGE, CS,
                       AMP)[0].numpy()[:, :half][band] ** 2
        self.assertGreater(np.corrcoef(left, truth)[0, 1], 0.9)  # the drawn rings are the true ones
        self.assertTrue(np.allclose(img[:, half:], np.clip(psd[:, half:], img.min(), img.max()), atol=1e-5))


def _runBatchStepsConcurrently(monkeypatch, tmp_path, useGpu, gpuList):
    """Run two batch steps of a defocus protocol through Scipion's ThreadStepExecutor (2 step threads, as with
    3 Scipion threads) without running the program: Scipion builds each command line (``buildRunCommand``,
    which replaces ``%(GPU)s`` with the step's GPUs) and the recorder holds it until both steps are running.
    Returns the command lines and how many steps met while running."""
    import threading

    import pyworkflow.utils.process as process
    from pyworkflow.protocol.executor import ThreadStepExecutor

    from deepcryo.tests.protocol_inputs import _micrographs

    mics = _micrographs(tmp_path, n=2)
    prot = DeepCryoProtDeepDefocus(workingDir=str(tmp_path / "run"))
    prot.inputMicrographs.set(mics)
    prot.useGpu.set(useGpu)
    prot.gpuList.set(gpuList)
    prot.numberOfThreads.set(3)
    for folder in (prot._getTmpPath(), prot._getExtraPath("DONE")):
        os.makedirs(folder, exist_ok=True)
    prot._defineCtfParamsDict()
    prot.micDict = {}
    for m in mics:
        m.setMicName(os.path.basename(m.getFileName()))
        prot.micDict[m.getMicName()] = m.clone()
    for m in prot.micDict.values():
        prot._insertCtfListStep([m], [])
    for i, step in enumerate(prot._steps):
        step.setObjId(i + 1)  # the ids a stored run gives its steps; the executor books GPU slots by them
    monkeypatch.setattr(prot, "getSubmitDict", lambda: {})
    monkeypatch.setattr(prot, "warning", lambda msg: None)
    commands, met = [], []
    together = threading.Barrier(2, timeout=10)

    def recordJob(log, program, params, numberOfMpi, numberOfThreads, hostConfig, env=None, cwd=None,
                  gpuList=None, executable=None, context=None):
        commands.append(process.buildRunCommand(program, params, numberOfMpi, hostConfig, gpuList=gpuList))
        together.wait()
        met.append(True)
        raise RuntimeError("recorded, not run")  # the batch reports it and the stream goes on

    monkeypatch.setattr(process, "runJob", recordJob)
    executor = ThreadStepExecutor(None, 2, gpuList=prot.getGpuList())
    executor.setProtocol(prot)
    prot.setStepsExecutor(executor)
    executor.runSteps(prot._steps, lambda step: None, lambda step: True, lambda: None, stepsCheckSecs=60)
    return commands, len(met)


def _devices(command):
    words = command.split()
    return words[words.index("--device") + 1]


def test_concurrent_batches_get_their_own_gpu(monkeypatch, tmp_path):
    """GPUs "0 1", 2 step threads: the two batches run at once, one with --device cuda:0, the other cuda:1 (the ids
    Scipion gave them, in their command lines); no CUDA_VISIBLE_DEVICES of the user's list."""
    commands, met = _runBatchStepsConcurrently(monkeypatch, tmp_path, True, "0 1")
    assert met == 2, commands
    assert sorted(_devices(c) for c in commands) == ["cuda:0", "cuda:1"], commands
    assert not any("CUDA_VISIBLE_DEVICES" in c for c in commands), commands


def test_cpu_batches_do_not_wait_for_a_gpu(monkeypatch, tmp_path):
    """Without "Use GPU" the steps need no GPU: two CPU batches run side by side even though the (hidden) GPU
    list holds one id, which would give a single GPU slot."""
    commands, met = _runBatchStepsConcurrently(monkeypatch, tmp_path, False, "0")
    assert met == 2, commands
    assert [_devices(c) for c in commands] == ["cpu", "cpu"], commands


def test_batch_whose_queue_job_failed_is_skipped(monkeypatch, tmp_path):
    """Through a queue, runJob returns when the job ends, whatever the program's exit status: a batch whose
    program wrote no CTF is reported and skipped (the stream goes on), as when runJob raises."""
    from deepcryo.tests.protocol_inputs import _micrographs

    mics = _micrographs(tmp_path, n=2)
    prot = DeepCryoProtDeepDefocus(workingDir=str(tmp_path / "run"))
    prot.inputMicrographs.set(mics)
    os.makedirs(prot._getTmpPath(), exist_ok=True)
    prot._defineCtfParamsDict()
    warnings = []
    monkeypatch.setattr(prot, "runJob", lambda program, args, **kw: None)  # the job ran, the program failed
    monkeypatch.setattr(prot, "warning", warnings.append)
    prot._estimateCtfList([m.clone() for m in mics])
    assert len(warnings) == 1 and "CTF estimation failed for micrographs [1, 2]" in warnings[0], warnings
