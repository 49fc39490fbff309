"""Device choice (issue #14): which device each program and protocol asks for, which faiss index it builds,
and the one line a user gets when a GPU is asked for and cannot be given.

Everything runs on the CPU: CUDA is simulated by patching ``torch.cuda.is_available``/``device_count``, and
faiss-gpu by patching the faiss GPU entry points (``StandardGpuResources``, ``index_cpu_to_gpu_multiple_py``,
``get_num_gpus``) with recorders. The GPU paths themselves run in ``benchmarks/gpu.py`` on a GPU machine.
"""
import logging

import faiss
import numpy as np
import pytest
import torch
from pyworkflow.object import Pointer
from pyworkflow.protocol.executor import StepExecutor

from deepcryo.core.cli import parse_devices
from deepcryo.core.errors import InputError
from deepcryo.core.mrc import read_mrc, write_mrc
from deepcryo.core.particles import read_particles
from deepcryo.core.projector import Projector
from deepcryo.core.simulate import phantom_volume, write_particle_set
from deepcryo.protocols import (DeepCryoProtDeepDefocus, DeepCryoProtDeepDefocusTrain, DeepCryoProtSwiftAlign,
                                DeepCryoProtSwiftRefine, DeepCryoProtVaeTrain)
from deepcryo.protocols.protocol_base import GPU_DEVICE
from deepcryo.swiftalign import index as swindex
from deepcryo.swiftalign import refine as swrefine
from deepcryo.tests.protocol_inputs import _micrographs, _particles, _volume


@pytest.fixture(autouse=True)
def _fresh_warnings():
    swindex._warn_once.cache_clear()  # each test sees its own one-time warnings
    yield
    swindex._warn_once.cache_clear()


def _fake_cuda(monkeypatch, n_gpus):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n_gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n_gpus)


class _FakeFaissGpu:
    """Records what :func:`deepcryo.swiftalign.index.to_devices` asks faiss-gpu for."""

    def __init__(self, monkeypatch, n_gpus):
        self.calls = []
        monkeypatch.setattr(faiss, "StandardGpuResources", lambda: "resources", raising=False)
        monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", _Options, raising=False)
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: n_gpus)
        monkeypatch.setattr(faiss, "index_cpu_to_gpu_multiple_py", self._clone, raising=False)

    def _clone(self, resources, index, opts, gpus):
        self.calls.append(dict(n_resources=len(resources), index=index, shard=opts.shard,
                               float16_tables=opts.useFloat16LookupTables, gpus=list(gpus)))
        return "gpu index"


class _Options:
    shard = False
    useFloat16LookupTables = False


# ------------------------------------------------------------------------------------------ --device parsing
def test_parse_devices_names_and_refusals(monkeypatch):
    assert parse_devices(["cpu"]) == ["cpu"]
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]  # landscape: two CPU processes (DDP, gloo)
    _fake_cuda(monkeypatch, 2)
    assert parse_devices(["cuda"]) == ["cuda:0"]
    assert parse_devices(["cuda:1"]) == ["cuda:1"]
    assert parse_devices(["cuda:0,cuda:1"]) == parse_devices(["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:1"]
    for words, reason in [(["gpu"], "not a device"), (["cuda:x"], "not a device"), ([""], "no device"),
                          (["cpu", "cuda:0"], "not both"), (["cuda:0", "cuda"], "named twice"),
                          (["cuda:2"], "only 2 GPU(s) visible")]:
        with pytest.raises(InputError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            parse_devices(words)
    _fake_cuda(monkeypatch, 0)
    with pytest.raises(InputError, match="CUDA is not available"):
        parse_devices(["cuda"])


@pytest.mark.parametrize("argv", [
    ["swiftalign", "train", "--reference", "missing.mrc", "--particles", "missing.star", "--angular-step", "10",
     "--output", "idx", "--device", "cuda"],
    ["swiftalign", "query", "--index", "missing", "--particles", "missing.star", "--output", "o.star",
     "--device", "cuda:0", "cuda:1"],
    ["swiftalign", "refine", "--reference", "missing.mrc", "--particles", "missing.star", "--output-dir", "out",
     "--device", "cuda:0"],
    ["defocus", "predict", "--micrographs", "missing/*.mrc", "--output", "ctf.star", "--device", "cuda:0"],
    ["defocus", "train", "--simulate", "8", "--output", "m.pt", "--device", "cuda"],
    ["landscape", "train", "--particles", "missing.star", "--output-dir", "vae", "--device", "cuda:0,cuda:1"],
])
def test_cuda_without_cuda_is_one_line_at_the_start(argv, monkeypatch, capsys, tmp_path):
    """Asked for CUDA on a host without it, every program stops before reading its inputs (all missing
    here) with one line and status 2."""
    import importlib
    monkeypatch.chdir(tmp_path)
    _fake_cuda(monkeypatch, 0)
    main = importlib.import_module("deepcryo.%s.__main__" % argv[0]).main
    assert main(argv[1:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device cuda") and "CUDA is not available" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_refine_takes_one_device(monkeypatch, capsys):
    from deepcryo.swiftalign.__main__ import main
    _fake_cuda(monkeypatch, 2)
    assert main(["refine", "--reference", "m.mrc", "--particles", "p.star", "--output-dir", "out",
                 "--device", "cuda:0", "cuda:1"]) == 2
    assert capsys.readouterr().err == "error: refine runs on one device, got --device cuda:0 cuda:1\n"


# ------------------------------------------------------------------------------------------ faiss factory
@pytest.mark.parametrize("dim", [40, 150, 192, 384, 2000])
def test_gpu_factory_is_one_faiss_gpu_holds_with_the_cpu_code_size(dim):
    """The CUDA factory builds an IVF-PQ with 8-bit codes and a sub-quantizer count GpuIndexIVFPQ implements;
    its code is at most as large as the CPU fast-scan default's, which faiss-gpu cannot hold."""
    cpu, gpu = swindex.default_factory(10 ** 6, dim), swindex.default_factory(10 ** 6, dim, gpu=True)
    assert cpu.endswith("fs") and not swindex.gpu_capable(faiss.index_factory(dim, cpu))
    index = faiss.index_factory(dim, gpu)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    assert swindex.gpu_capable(index) and isinstance(ivf, faiss.IndexIVFPQ)
    assert ivf.pq.nbits == 8 and ivf.pq.M in swindex.GPU_PQ_SUBQUANTIZERS and ivf.d % ivf.pq.M == 0
    assert ivf.code_size <= faiss.extract_index_ivf(faiss.index_factory(dim, cpu)).code_size
    if dim >= 192:
        assert gpu == "PCA192,IVF1024,PQ48" and ivf.code_size == 48
    assert swindex.default_factory(9999, dim, gpu=True) == swindex.default_factory(9999, dim) == "Flat"


def test_gpu_capable_index_types():
    for factory, capable in [("Flat", True), ("IVF16,Flat", True), ("IVF16,SQ8", True), ("PCA64,IVF16,PQ16", True),
                             ("OPQ48_192,IVF64,PQ48", True), ("IVF16,PQ16x4fs", False), ("IVF16,PQ32x4", False),
                             ("IVF16,PQ6", False), ("HNSW16", False)]:
        assert swindex.gpu_capable(faiss.index_factory(192, factory)) is capable, factory


# ------------------------------------------------------------------------------------------ to_devices
def test_to_devices_cpu_and_faiss_without_gpu(caplog):
    index = faiss.index_factory(16, "Flat")
    assert swindex.to_devices(index, ["cpu"]) is index and swindex.to_devices(index, None) is index
    assert not caplog.records
    if hasattr(faiss, "StandardGpuResources"):
        pytest.skip("this faiss has GPU support")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # one line, not one per shard
            assert swindex.to_devices(index, ["cuda:0"]) is index
    assert [r.getMessage() for r in caplog.records] == [
        "faiss %s has no GPU support (faiss-cpu): the index is searched on the CPU, the projections run on cuda:0"
        % faiss.__version__]


def test_to_devices_shards_a_gpu_index_over_the_gpus(monkeypatch, caplog):
    fake = _FakeFaissGpu(monkeypatch, n_gpus=2)
    index = faiss.index_factory(192, "PCA192,IVF16,PQ48")
    assert swindex.to_devices(index, ["cuda:0", "cuda:1"]) == "gpu index"
    assert fake.calls == [dict(n_resources=2, index=index, shard=True, float16_tables=True, gpus=[0, 1])]
    assert not caplog.records


def test_to_devices_keeps_a_cpu_only_index_on_the_cpu_with_one_warning(monkeypatch, caplog):
    fake = _FakeFaissGpu(monkeypatch, n_gpus=1)
    fast_scan = faiss.index_factory(192, swindex.default_factory(10 ** 6, 192))
    with caplog.at_level(logging.WARNING):
        assert swindex.to_devices(fast_scan, ["cuda:0"]) is fast_scan
        assert swindex.to_devices(fast_scan, ["cuda:0"]) is fast_scan
        flat = faiss.index_factory(16, "Flat")
        assert swindex.to_devices(flat, ["cuda:1"]) is flat  # faiss sees one GPU only
    assert fake.calls == []
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "cannot be searched by faiss-gpu: it is searched on the CPU" in messages[0]
    assert messages[1] == "faiss sees 1 GPU(s), cuda:1 asked for: the index is searched on the CPU"


# ------------------------------------------------------------------------------------------ train / refine
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("devices")
    vol = phantom_volume(24, seed=0)
    write_mrc(str(d / "map.mrc"), vol, 4.0)
    star = write_particle_set(str(d / "sim"), vol, 6, 4.0, snr=1.0, seed=1, max_shift_px=1.0,
                              defocus_range_A=(15000.0, 20000.0))
    return d, star


class _Stop(Exception):
    pass


def test_train_chooses_the_factory_for_its_devices(small, monkeypatch, tmp_path):
    """train(devices=[cuda…]) projects on the first device and asks for the GPU factory when faiss can use the
    GPUs; a factory faiss-gpu cannot search is refused before the index is built."""
    d, star = small
    projector_devices, factories = [], []
    monkeypatch.setattr(swindex, "Projector", lambda vol, device: projector_devices.append(device) or Projector(vol))

    def build(gallery, factory, memory_bytes, directory):
        factories.append((len(gallery), gallery.band.dim, factory))
        raise _Stop

    monkeypatch.setattr(swindex, "build_index", build)
    kw = dict(angular_step_deg=10.0, max_resolution_A=16.0, max_shift_px=2.0, shift_step_px=0.5)
    with pytest.raises(_Stop):
        swindex.train(str(d / "map.mrc"), star, str(tmp_path / "cpu"), devices=["cpu"], **kw)
    _FakeFaissGpu(monkeypatch, n_gpus=1)
    with pytest.raises(_Stop):
        swindex.train(str(d / "map.mrc"), star, str(tmp_path / "gpu"), devices=["cuda:0"], **kw)
    (n, dim, cpu), (_, _, gpu) = factories
    assert n >= 10000 and cpu == swindex.default_factory(n, dim) and gpu == swindex.default_factory(n, dim, True)
    assert projector_devices == ["cpu", "cuda:0"]
    with pytest.raises(InputError, match="cannot be searched by faiss-gpu"):
        swindex.train(str(d / "map.mrc"), star, str(tmp_path / "fs"), devices=["cuda:0"], index_factory=cpu, **kw)
    assert len(factories) == 2 and not (tmp_path / "fs").exists()


def test_refine_gives_its_device_to_the_index_and_the_search(small, monkeypatch, tmp_path):
    """The global alignment of a refinement builds and searches its index for ``params.device`` (it used to
    search on the CPU whatever the device)."""
    d, star = small
    seen = {}
    monkeypatch.setattr(swrefine.swindex, "train", lambda *a, **kw: seen.update(train=kw.get("devices")))
    monkeypatch.setattr(swrefine.swindex, "load", lambda path, device: seen.update(load=device) or "bundle")
    monkeypatch.setattr(swrefine, "align", lambda bundle, s, **kw: seen.update(align=kw.get("devices")) or {})
    params = swrefine.RefineParams(device="cuda:0")
    swrefine._align_global(phantom_volume(24), read_particles(star), 16.0, 15.0, 1.0, params, None,
                           str(tmp_path))
    assert seen == {"train": ["cuda:0"], "load": "cuda:0", "align": ["cuda:0"]}


# ------------------------------------------------------------------------------------------ protocols
def _run_jobs(monkeypatch, prot, fail=False):
    """Record the jobs ``prot`` runs instead of running them (``fail``: each then fails like a program would)."""
    jobs = []

    def run_job(program, args, **kw):
        jobs.append((program, args))
        if fail:
            raise RuntimeError("recorded, not run")

    monkeypatch.setattr(prot, "runJob", run_job)
    return jobs


def _device_words(args):
    """The value of ``--device`` in a program's arguments, as a one-word list ([] without the option)."""
    words = str(args).split()
    return words[words.index("--device") + 1:words.index("--device") + 2] if "--device" in words else []


def test_vae_protocol_uses_a_gpu_only_when_asked(monkeypatch, tmp_path):
    """The VAE's one step trains on every GPU Scipion gave it (here, serial steps: the whole list)."""
    monkeypatch.chdir(tmp_path)
    particles = _particles(tmp_path)
    for use_gpu, gpus, device in [(None, None, []), (True, "0 2", ["cuda:0,cuda:2"])]:
        prot = DeepCryoProtVaeTrain()
        prot.inputParticles.set(particles)
        if use_gpu is not None:
            prot.useGpu.set(use_gpu)
            prot.gpuList.set(gpus)
        prot.setStepsExecutor(StepExecutor(None, gpuList=prot.getGpuList()))
        jobs = _run_jobs(monkeypatch, prot)
        prot.trainStep()
        (program, args), = jobs
        assert "CUDA_VISIBLE_DEVICES" not in program
        assert _device_words(args) == device


def test_defocus_protocols_pass_their_device(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    mics = _micrographs(tmp_path)
    for use_gpu, device in [(False, "cpu"), (True, GPU_DEVICE)]:
        prot = DeepCryoProtDeepDefocusTrain()
        prot.useSimulation.set(True)
        prot.useGpu.set(use_gpu)
        jobs = _run_jobs(monkeypatch, prot)
        prot.trainStep()
        (program, args), = jobs
        assert "CUDA_VISIBLE_DEVICES" not in program and _device_words(args)[:1] == [device]

        prot = DeepCryoProtDeepDefocus()
        prot.inputMicrographs.set(mics)
        prot.useGpu.set(use_gpu)
        prot._defineCtfParamsDict()
        jobs = _run_jobs(monkeypatch, prot, fail=True)
        monkeypatch.setattr(prot, "warning", lambda msg: None)
        prot._estimateCtfList(list(mics))  # the failed batch is reported and skipped
        (program, args), = jobs
        assert "CUDA_VISIBLE_DEVICES" not in program and _device_words(args)[:1] == [device]
        prot.gpuList.set("0 1 2")  # one GPU per batch step, 2 step threads (Scipion threads 3)
        assert any("one GPU" in e for e in prot._validate()) == use_gpu
        prot.gpuList.set("0 1")
        assert not any("one GPU" in e for e in prot._validate())


def test_swiftalign_protocols_pass_their_devices(monkeypatch, tmp_path):
    prot = DeepCryoProtSwiftAlign()
    assert "--device" not in prot._common()
    prot.useGpu.set(True)
    prot.gpuList.set("1 3")
    assert _device_words(" ".join(map(str, prot._common()))) == [GPU_DEVICE]  # each step on the GPU it is given
    assert not any("one GPU" in e for e in prot._validate())
    prot.numberOfThreads.set(2)  # one step at a time: one GPU
    assert any("one GPU" in e for e in prot._validate())

    monkeypatch.chdir(tmp_path)
    import deepcryo.protocols.protocol_swiftrefine as module
    monkeypatch.setattr(module, "convertVolume", lambda vol, folder: "ref.mrc")
    for use_gpu, device in [(False, []), (True, [GPU_DEVICE])]:
        prot = DeepCryoProtSwiftRefine()
        prot.inputVolumes.append(Pointer(_volume(tmp_path)))
        prot.useGpu.set(use_gpu)
        prot.gpuList.set("2")
        jobs = _run_jobs(monkeypatch, prot)
        prot.refineStep()
        (program, args), = jobs
        assert "CUDA_VISIBLE_DEVICES" not in program and _device_words(args)[:1] == device


def test_gpu_defaults_are_off():
    """No protocol asks for a GPU unless the user does (CUDA is not guaranteed where Scipion runs)."""
    for cls in (DeepCryoProtDeepDefocus, DeepCryoProtDeepDefocusTrain, DeepCryoProtSwiftAlign,
                DeepCryoProtSwiftRefine, DeepCryoProtVaeTrain):
        assert not cls().usesGpu(), cls.__name__


def test_gallery_vectors_come_back_on_the_cpu(small):
    """The gallery computes on its projector's device and hands faiss CPU arrays (here both are the CPU; on a
    GPU, benchmarks/gpu.py compares the two)."""
    d, star = small
    vol, _ = read_mrc(str(d / "map.mrc"))
    from deepcryo.swiftalign.features import Band
    from deepcryo.swiftalign.gallery import Gallery, gallery_poses
    band = Band(24, 4.0, 16.0)
    g = Gallery(Projector(vol), band, gallery_poses(30.0), sqrt_weights=torch.ones(len(band)))
    v = g.vectors(np.arange(5))
    assert v.device.type == "cpu" and torch.allclose(v, next(g.batches(5))[1][:5])
