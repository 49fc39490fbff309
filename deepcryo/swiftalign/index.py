"""The compressed search index: a faiss index over the gallery vectors, trained on a sample and filled
by streaming gallery batches (the whole gallery never exists in memory), saved as ``index_dir/``.

Index types are faiss ``index_factory`` strings (metric L2 on unit vectors, i.e. correlation):

* ``Flat``: exact exhaustive search, 4 · dim bytes per reference (the reference accuracy);
* default from the gallery size (:func:`default_factory`): ``PCA{d},IVF{nlist},PQ{d/2}x4fs`` — a PCA to
  d <= 192 dims, ``nlist`` inverted lists (≈ sqrt(n), a power of 2) and 4-bit fast-scan product codes of
  d/2 sub-vectors (<= 48 bytes): code + 8-byte id <= 56 bytes per reference. Galleries under 10 000
  references get ``Flat``. 8-bit PQ strings such as ``OPQ48_192,IVF<n>,PQ48`` are accepted as custom
  strings; the default uses 4-bit codes because faiss-cpu trains 8-bit codebooks far more slowly
  (``benchmarks/RESULTS.md``).
* for an index searched on CUDA GPUs (``default_factory(..., gpu=True)``): ``PCA{4m},IVF{nlist},PQ{m}``, 8-bit
  codes of 4-dim sub-vectors, m <= 48 one of the sub-quantizer counts faiss-gpu's GpuIndexIVFPQ implements:
  faiss-gpu has no fast-scan index (its cloner refuses ``…fs``) and its IVF-PQ takes only 8-bit codes
  outside cuVS. The code is as small as the CPU default's (m bytes, <= 48), searched with float16 lookup
  tables. It is trained on the CPU like every index, and 8-bit codebooks train slowly there (much more
  slowly than the 4-bit fast-scan codes of the same size: ``benchmarks/RESULTS.md``).

Memory: a gallery larger than the memory limit is split into shards of consecutive entry ids, each a copy
of the one trained index holding at most a quarter of the limit (:func:`shard_capacity`). Each shard is
written to disk as soon as it is full, so building holds one shard, one batch of gallery vectors and the
training sample (an eighth of the limit, :func:`train_size`). A query of a one-shard index keeps it in
memory; a query of several reads them one at a time (:meth:`IndexBundle.shards`) and keeps a running
top-k per particle (:func:`search`), so it holds one shard at a time as well. faiss cannot memory-map the
fast-scan inverted lists of the default factory (``IO_FLAG_MMAP`` maps only plain array lists), hence
explicit reads.

``index_dir/manifest.json`` holds everything the query needs: the map (``reference.mrc``, copied), the
band, the gallery parameters (poses; the origins each particle is searched at), the shards and their first
ids. An index built by deepcryo before the pose-only gallery (format ``deepcryo-swiftalign-1``) is refused
with a request to rebuild it.
"""
import functools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import faiss
import numpy as np
import torch

from deepcryo.core.ctf import ctf_from_freqs
from deepcryo.core.errors import InputError
from deepcryo.core.files import atomic_output
from deepcryo.core.mrc import read_mrc, write_mrc
from deepcryo.core.particles import ParticleStar, read_particles
from deepcryo.core.projector import Projector

from .features import Band, noise_weights
from .sampling import angular_step_for_box, shift_step_for_resolution
from .gallery import Gallery, gallery_poses, search_grid
from .target import SearchIndex

__all__ = ["default_factory", "gpu_capable", "faiss_gpu_ids", "train_size", "shard_capacity", "train_template",
           "fill_shards", "build_index", "merge_topk", "search", "set_nprobe", "to_devices", "train", "IndexBundle",
           "load", "MANIFEST", "check_particles", "check_reference_map", "particle_noise_weights", "particle_ctf_rms"]

MANIFEST = "manifest.json"
FORMAT = "deepcryo-swiftalign-2"
_ID_BYTES = 8
FAST_SCAN_QUERIES = 1024    # queries per faiss call on a CPU fast-scan index (:func:`search`)
GALLERY_BATCH = 4096        # most gallery vectors computed at once when training and filling (:func:`_batch_size`)
# sub-quantizer counts (= code bytes at 8 bits) of faiss-gpu's GpuIndexIVFPQ (IVFPQ::isSupportedPQCodeLength;
# 56, 64 and 96 only with float16 lookup tables)
GPU_PQ_SUBQUANTIZERS = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
logger = logging.getLogger(__name__)


def default_factory(n_entries: int, dim: int, gpu: bool = False) -> str:
    """faiss factory string for a gallery of ``n_entries`` vectors of ``dim`` floats, for a CPU index or,
    with ``gpu``, for one that faiss-gpu can search (see module docstring)."""
    if n_entries < 10000:
        return "Flat"
    nlist = min(65536, 2 ** int(round(math.log2(max(16.0, math.sqrt(n_entries))))))
    if gpu:
        m = max(q for q in GPU_PQ_SUBQUANTIZERS if q <= 48 and 4 * q <= dim)
        return "PCA%d,IVF%d,PQ%d" % (4 * m, nlist, m)
    d = min(192, dim // 2 * 2)
    return "PCA%d,IVF%d,PQ%dx4fs" % (d, nlist, d // 2)


def gpu_capable(index: faiss.Index) -> bool:
    """Whether faiss-gpu can hold ``index`` (a CPU index, trained or not): a flat index, IVF-Flat, IVF-SQ, or
    IVF-PQ with 8-bit codes and a sub-quantizer count of :data:`GPU_PQ_SUBQUANTIZERS`, possibly behind a
    transform (PCA, OPQ). Fast-scan (``…fs``) and graph indexes are CPU-only."""
    _, inner = _core(index)
    if isinstance(inner, (faiss.IndexFlat, faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer)):
        return True
    return isinstance(inner, faiss.IndexIVFPQ) and inner.pq.nbits == 8 and inner.pq.M in GPU_PQ_SUBQUANTIZERS


def _core(index):
    """``(outer, inner)``: ``index`` downcast to its faiss class and, behind a transform (PCA, OPQ), the index
    the transform feeds (else ``outer`` again). Keep the pair alive together: ``inner`` views ``outer``'s memory."""
    outer = faiss.downcast_index(index)
    return outer, faiss.downcast_index(outer.index) if isinstance(outer, faiss.IndexPreTransform) else outer


@functools.lru_cache(maxsize=None)
def _warn_once(message):
    logger.warning(message)


def faiss_gpu_ids(devices: Optional[Sequence[str]]) -> List[int]:
    """GPU ids of the CUDA devices in ``devices`` (['cuda:0', …], as checked by
    :func:`deepcryo.core.cli.parse_devices`) that faiss can search on; [] for CPU devices, and [] with one
    warning line when GPUs are asked for but this faiss has no GPU support or sees fewer GPUs."""
    gpus = [int(d.split(":")[1]) if ":" in d else 0 for d in devices or [] if d.startswith("cuda")]
    if not gpus:
        return []
    if not hasattr(faiss, "StandardGpuResources"):
        _warn_once("faiss %s has no GPU support (faiss-cpu): the index is searched on the CPU, the projections "
                   "run on %s" % (faiss.__version__, devices[0]))
        return []
    if max(gpus) >= faiss.get_num_gpus():
        _warn_once("faiss sees %d GPU(s), %s asked for: the index is searched on the CPU"
                   % (faiss.get_num_gpus(), " ".join(devices)))
        return []
    return gpus


def _nlist(index):
    ivf = faiss.try_extract_index_ivf(index)
    return ivf.nlist if ivf is not None else 0


def train_size(index: faiss.Index, n_entries: int, dim: int, memory_bytes: float) -> int:
    """Training sample size: 30 vectors per inverted list (at least 10 000 for the PQ codebooks), at most
    the gallery and an eighth of the memory limit (faiss holds a few more copies of the sample while it
    trains: the PCA-transformed vectors, the k-means subsample, the residuals)."""
    if index.is_trained:
        return 0
    want = max(10000, 30 * _nlist(index))
    return int(min(n_entries, want, memory_bytes // 8 // (4 * dim)))


def shard_capacity(bytes_per_ref: int, memory_bytes: float) -> int:
    """References per shard: a quarter of the memory limit at ``bytes_per_ref`` bytes each (faiss grows an
    inverted list by doubling its capacity, so a full shard may take up to twice its stored bytes)."""
    return max(1, int(memory_bytes // 4 // bytes_per_ref))


def bytes_per_reference(index: faiss.Index) -> int:
    """Bytes one stored reference takes in ``index`` (code + id for IVF, raw vector for flat)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return ivf.code_size + _ID_BYTES
    return index.sa_code_size() if hasattr(index, "sa_code_size") else 4 * index.d


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set the number of inverted lists a search visits (no-op for non-IVF indexes). A faiss-gpu IVF index
    (from :func:`to_devices`) takes it through faiss' GpuParameterSpace, at most 2048 (its k-selection limit)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = int(min(nprobe, ivf.nlist))
        return
    gpu_ivf = _gpu_ivf(index)
    if gpu_ivf is not None:
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(min(nprobe, gpu_ivf.nlist, 2048)))


def _gpu_ivf(index):
    """The first faiss-gpu IVF index in ``index`` (behind a transform, in shards or replicas), or None."""
    if not hasattr(faiss, "GpuIndexIVF"):
        return None
    outer, inner = _core(index)
    if isinstance(inner, (faiss.IndexShards, faiss.IndexReplicas)) and inner.count():
        inner = faiss.downcast_index(inner.at(0))
    return inner if isinstance(inner, faiss.GpuIndexIVF) else None


def to_devices(index: faiss.Index, devices: Optional[Sequence[str]]) -> faiss.Index:
    """``index`` moved to the CUDA GPUs of ``devices`` (['cuda:0', 'cuda:1', …]), sharded over several, with
    float16 lookup tables; unchanged on CPU. When GPUs are asked for but faiss cannot use them
    (:func:`faiss_gpu_ids`) or cannot hold this index type (:func:`gpu_capable`: a fast-scan index built for
    the CPU), it stays on the CPU and one warning line says so."""
    gpus = faiss_gpu_ids(devices)
    if not gpus:
        return index
    if not gpu_capable(index):
        _warn_once("the index (%s) cannot be searched by faiss-gpu: it is searched on the CPU (build it with "
                   "train --device cuda for a GPU index)" % type(_core(index)[1]).__name__)
        return index
    opts = faiss.GpuMultipleClonerOptions()
    opts.shard = True
    opts.useFloat16LookupTables = True
    resources = [faiss.StandardGpuResources() for _ in gpus]
    return faiss.index_cpu_to_gpu_multiple_py(resources, index, opts, gpus)


def _batch_size(dim, memory_bytes):
    """Gallery vectors per batch: an eighth of the memory limit for three float32 copies of the batch
    (the vectors, faiss's PCA-transformed copy and residuals; the complex band coefficients they come
    from take as much again, briefly), and at most ``GALLERY_BATCH``: a larger batch projects and adds no
    faster, and every batch's buffers are fresh pages to the kernel (``train`` at 7.5°, box 128, 35 232 poses:
    0.87 s of system time and 0.90 GB of peak RSS with the whole gallery in one batch, 0.45 s and 0.53 GB in
    batches of 4 096, the same index byte for byte)."""
    return max(1, min(GALLERY_BATCH, int(memory_bytes // 8 // (3 * 4 * dim))))


def train_template(gallery: Gallery, factory: str, memory_bytes: float, seed: int = 0) -> faiss.Index:
    """The empty index ``factory`` trained on :func:`train_size` random gallery entries (computed batch by
    batch into one float32 array, so the sample is the only large buffer)."""
    dim = gallery.band.dim
    template = faiss.index_factory(dim, factory)
    n_train = train_size(template, len(gallery), dim, memory_bytes)
    if n_train:
        t0 = time.time()
        ids = gallery.sample_ids(n_train, seed)
        sample = np.empty((len(ids), dim), dtype=np.float32)
        step = _batch_size(dim, memory_bytes)
        for s in range(0, len(ids), step):
            sample[s:s + step] = gallery.vectors(ids[s:s + step]).numpy()
        template.train(sample)
        del sample
        logger.info("trained %s on %d vectors in %.1f s", factory, len(ids), time.time() - t0)
    return template


def _write_shard(index, directory, number):
    name = "shard_%03d.faiss" % number
    with atomic_output(os.path.join(directory, name)) as tmp:
        faiss.write_index(index, tmp)
    return name


def fill_shards(gallery: Gallery, template: faiss.Index, memory_bytes: float, directory: str) -> List[Dict[str, Any]]:
    """Add the whole gallery, streamed in batches, to copies of the trained ``template``; each copy is
    written (atomically) to ``directory/shard_###.faiss`` and released as soon as it holds
    :func:`shard_capacity` references, so one shard at a time is in memory.

    Returns the manifest's shard list: [{"file", "first_id", "n"}] in id order.
    """
    capacity = shard_capacity(bytes_per_reference(template), memory_bytes)
    batch = min(_batch_size(gallery.band.dim, memory_bytes), capacity)
    shards, first, current = [], 0, faiss.clone_index(template)
    t0 = time.time()
    next_report = len(gallery) / 10
    for start, vecs in gallery.batches(batch):
        if current.ntotal + len(vecs) > capacity and current.ntotal:
            shards.append({"file": _write_shard(current, directory, len(shards)), "first_id": int(first),
                           "n": int(current.ntotal)})
            del current                       # release this shard before the next one fills
            first, current = start, faiss.clone_index(template)
        current.add(vecs.numpy())
        del vecs
        if first + current.ntotal >= next_report:
            logger.info("added %d / %d references (%.0f s)", first + current.ntotal, len(gallery), time.time() - t0)
            next_report += len(gallery) / 10
    shards.append({"file": _write_shard(current, directory, len(shards)), "first_id": int(first),
                   "n": int(current.ntotal)})
    return shards


def build_index(gallery: Gallery, factory: str, memory_bytes: float, directory: str,
                seed: int = 0) -> Tuple[List[Dict[str, Any]], int]:
    """Train ``factory`` on a gallery sample (:func:`train_template`) and fill it into shards written to
    ``directory`` (:func:`fill_shards`), all within ``memory_bytes`` (see the module docstring).

    Returns (the manifest's shard list, bytes per reference).
    """
    template = train_template(gallery, factory, memory_bytes, seed)
    per_ref = bytes_per_reference(template)
    t0 = time.time()
    shards = fill_shards(gallery, template, memory_bytes, directory)
    logger.info("index filled: %d references in %d shard(s), %d bytes each, %.1f s",
                len(gallery), len(shards), per_ref, time.time() - t0)
    return shards, per_ref


def merge_topk(distances: Sequence[np.ndarray], labels: Sequence[np.ndarray], k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Merge per-shard results: lists of (B, k_i) distances and global labels → the k smallest, sorted.

    Missing results (label -1) carry distance +inf and sort last. Ties keep the order of the lists.
    """
    d = np.concatenate(distances, axis=1)
    lab = np.concatenate(labels, axis=1)
    d = np.where(lab < 0, np.inf, d)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), np.take_along_axis(lab, order, 1)


def _search_bytes_per_query(index, nprobe, k):
    """Bytes faiss allocates per query in one search call: the (PCA-transformed) query, the results and,
    for a fast-scan IVF index, its lookup tables (sub-quantizers × 16 centroids × ``nprobe`` lists,
    float + uint8: faiss's own ``lut_size_per_query``)."""
    per_query = 8 * index.d + 24 * k
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        per_query += int(min(nprobe, ivf.nlist)) * 2 * ivf.code_size * 16 * 5
    return per_query


def search(shards: Iterable[Tuple[int, faiss.Index]], vectors: np.ndarray, k: int, nprobe: int,
           memory_bytes: Optional[float] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k (distances, global entry ids) of (B, dim) float32 ``vectors`` over ``shards``.

    ``shards``: (first id, faiss index) pairs, a list or :meth:`IndexBundle.shards` (read one at a time).
    A running top-k per vector is merged with each shard's (:func:`merge_topk`): the same lists as one
    search over all the references. Each shard is searched in chunks of vectors whose faiss buffers
    fit in an eighth of ``memory_bytes`` (None: one chunk), a CPU fast-scan index in chunks of at most
    ``FAST_SCAN_QUERIES``: its per-query lookup tables then stay in cache (the same lists, for about a quarter
    less CPU than chunks of several thousand queries; ``benchmarks/RESULTS.md``).
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    best_d = np.full((len(x), k), np.inf, dtype=np.float32)
    best_l = np.full((len(x), k), -1, dtype=np.int64)
    for first, index in shards:
        set_nprobe(index, nprobe)
        step = len(x) if memory_bytes is None else int(memory_bytes // 8 // _search_bytes_per_query(index, nprobe, k))
        step = max(1, step)
        if isinstance(faiss.downcast_index(faiss.try_extract_index_ivf(index) or index), faiss.IndexIVFFastScan):
            step = min(step, FAST_SCAN_QUERIES)
        for s in range(0, len(x), step):
            d, lab = index.search(x[s:s + step], k)
            best_d[s:s + step], best_l[s:s + step] = merge_topk(
                [best_d[s:s + step], d], [best_l[s:s + step], np.where(lab >= 0, lab + first, -1)], k)
        del index                             # a streamed shard is released before the next is read
    return best_d, best_l


# ------------------------------------------------------------------------------------------ train / load
def _require_gpu_factory(factory, dim):
    """Raise InputError unless faiss-gpu can search an index of ``factory`` (the user asked for a GPU)."""
    try:
        capable = gpu_capable(faiss.index_factory(dim, factory))
    except RuntimeError as exc:
        raise InputError("faiss could not build index %r: %s" % (factory, str(exc).strip().splitlines()[-1]))
    if not capable:
        raise InputError("index factory %r cannot be searched by faiss-gpu (fast-scan 'fs' codes, 4-bit PQ or "
                            "an index type it lacks): omit --index-factory for the GPU default (%s), or train on "
                            "the CPU" % (factory, default_factory(10 ** 6, dim, gpu=True)))


def _load_npy(path):
    """np.load without pickles (allow_pickle=False), one clear line for a missing or foreign file."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError("%s: not a readable weights file (%s)" % (path, str(exc).splitlines()[0][:100]))


def _read_faiss(path):
    """faiss.read_index with one clear line for a missing or corrupt shard."""
    if not os.path.exists(path):
        raise InputError("%s: index shard not found" % path)
    try:
        return faiss.read_index(path)
    except RuntimeError:
        raise InputError("%s: not a readable faiss index (corrupt, truncated or another format)" % path)


class IndexBundle(SearchIndex):
    """A loaded ``index_dir``: manifest, projector of the map, band, gallery and (lazily) the shards; the
    :class:`.target.SearchIndex` that :func:`.query.align` searches."""

    def __init__(self, directory: str, manifest: Dict[str, Any], device: str = "cpu") -> None:
        self.directory = directory
        self.manifest = manifest
        volume, _ = read_mrc(os.path.join(directory, manifest["reference"]))
        self.projector = Projector(volume, device=device)
        m = manifest
        self.band = Band(m["box"], m["pixel_size_A"], m["max_resolution_A"])
        self.sqrt_weights = (torch.as_tensor(_load_npy(os.path.join(directory, m["weights"])), dtype=torch.float32)
                             if m.get("weights") else None)
        ctf_rms = torch.as_tensor(_load_npy(os.path.join(directory, m["ctf_rms"])), dtype=torch.float32)
        self.gallery = Gallery(self.projector, self.band, gallery_poses(m["angular_step_deg"], m["symmetry"],
                                                                        m.get("grid_rotation")),
                               self.sqrt_weights, m["normalise"], ctf_rms)
        self.origins_px = np.asarray(m["origins_px"], dtype=np.float64)
        self._shards = None

    @property
    def resident(self) -> bool:
        """True when the index is one shard, kept in memory after its first read."""
        return len(self.manifest["shards"]) == 1

    @property
    def shard_bytes(self) -> int:
        """Size (bytes) of the largest shard file: about the memory one shard takes once read."""
        return max(os.path.getsize(os.path.join(self.directory, s["file"])) for s in self.manifest["shards"])

    def shards(self, devices: Optional[Sequence[str]] = None) -> Iterable[Tuple[int, faiss.Index]]:
        """The shards as (first id, faiss index) pairs, for :func:`search`: a list read once and kept when
        the index is :attr:`resident`, else an iterable that reads each shard from disk when reached and
        lets it go before the next (each pass reads the whole index)."""
        if not self.resident:
            return _ShardReader(self.directory, self.manifest["shards"], devices)
        if self._shards is None:
            self._shards = list(_ShardReader(self.directory, self.manifest["shards"], devices))
        return self._shards


class _ShardReader:
    """Iterable over the shards of an index directory, read one at a time (see :meth:`IndexBundle.shards`)."""

    def __init__(self, directory, entries, devices):
        self.directory, self.entries, self.devices = directory, entries, devices

    def __iter__(self):
        for entry in self.entries:
            index = to_devices(_read_faiss(os.path.join(self.directory, entry["file"])), self.devices)
            yield entry["first_id"], index
            del index


def load(index_dir: str, device: str = "cpu") -> IndexBundle:
    """Load an ``index_dir`` written by :func:`train`."""
    path = os.path.join(index_dir, MANIFEST)
    if not os.path.exists(path):
        raise InputError("%s: not a swiftalign index (no %s)" % (index_dir, MANIFEST))
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise InputError("%s: not a readable swiftalign manifest (%s)" % (path, str(exc).splitlines()[0]))
    if isinstance(manifest, dict) and manifest.get("format") == "deepcryo-swiftalign-1":
        raise InputError("%s: an index of an earlier deepcryo (a gallery of shifted, CTF-grouped references); "
                         "rebuild it with train" % index_dir)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError("%s: not a swiftalign index (no %s format tag in %s)" % (index_dir, FORMAT, MANIFEST))
    shards = manifest.get("shards")
    if not shards or not all(isinstance(e, dict) and "file" in e and "first_id" in e for e in shards):
        raise InputError("%s: the shard list of %s is missing or malformed (rebuild the index with train)"
                            % (index_dir, MANIFEST))
    return IndexBundle(os.path.abspath(index_dir), manifest, device)


def check_particles(star: ParticleStar, box: int, pixel_size_A: float, what: str) -> None:
    """Raise InputError unless the particles have CTF columns and match the box and pixel size."""
    star.require("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
    if star.box_size != box:
        raise InputError("box size mismatch: particles %d px, %s %d px" % (star.box_size, what, box))
    if abs(star.pixel_size_A - pixel_size_A) > 1e-3 * pixel_size_A:
        raise InputError("pixel size mismatch: particles %.4f Å/px, %s %.4f Å/px"
                            % (star.pixel_size_A, what, pixel_size_A))


def check_reference_map(volume: np.ndarray, map_pixel_size_A: float, star: ParticleStar, path: str) -> None:
    """Raise InputError unless the map ``volume`` read from ``path`` is cubic and has the box and pixel size of
    the particles ``star`` (:func:`check_particles`); :func:`deepcryo.core.mrc.read_mrc` already refuses
    NaN/Inf. The one check of a reference map, for SwiftAlign's index and SwiftRes's initial maps."""
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise InputError("%s: the reference must be a cubic map, got shape %s" % (path, volume.shape))
    check_particles(star, volume.shape[-1], map_pixel_size_A, "map %s" % path)


def particle_ctf_rms(band: Band, star: ParticleStar, n_particles: int = 5000, floor: float = 0.05) -> torch.Tensor:
    """(P,) root-mean-square CTF of (a seeded sample of up to ``n_particles``) particles at the band
    frequencies, at least ``floor``: the weight that keeps the index's reference norms close to the exact
    score's (:mod:`.gallery`)."""
    rows = np.arange(len(star))
    if len(rows) > n_particles:
        rows = np.sort(np.random.default_rng(0).choice(rows, n_particles, replace=False))
    params = {k: torch.as_tensor(v[rows], dtype=torch.float32) for k, v in star.ctf_params().items()}
    ctf = ctf_from_freqs(band.freqs_invA, **params)
    return torch.sqrt((ctf ** 2).mean(0)).clamp_min(floor)


def particle_noise_weights(band: Band, star: ParticleStar, n_images: int = 2000) -> torch.Tensor:
    """Whitening weights (P,) of :func:`.features.noise_weights` from up to ``n_images`` particles of ``star``
    spread evenly over the stack (at particle SNR their power spectrum is the noise's)."""
    with star.open_images() as stack:
        idx = np.linspace(0, len(star) - 1, min(len(star), n_images)).astype(np.int64)
        return noise_weights(band, band.from_images(stack.read(idx)))


def _build_folder(output_dir):
    """A new temporary folder beside ``output_dir`` where the shards are written while they fill (renamed to
    ``output_dir`` at the end). Those of an earlier build of the same ``output_dir`` that was killed
    (SIGKILL, power loss) before it could clean up are deleted first: they may hold gigabytes of shards."""
    parent, base = os.path.split(output_dir)
    os.makedirs(parent, exist_ok=True)
    prefix = ".%s.building." % base
    for name in os.listdir(parent):
        if name.startswith(prefix) and os.path.isdir(os.path.join(parent, name)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=prefix, dir=parent)


def train(reference: str, particles: Union[str, ParticleStar], output_dir: str,
          angular_step_deg: Optional[float] = None, max_resolution_A: Optional[float] = None,
          max_shift_px: float = 5.0, shift_step_px: Optional[float] = None, index_factory: Optional[str] = None,
          symmetry: str = "C1", whiten: bool = False, normalise: bool = True,
          memory_limit_GB: float = 4.0, grid_rotation: Optional[np.ndarray] = None,
          devices: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Build ``output_dir`` (an index) for aligning ``particles`` (STAR path or ParticleStar) to ``reference``.

    Args:
        reference: map (MRC path), same box and pixel size as the particles.
        angular_step_deg: direction and in-plane step (degrees); default from ``max_resolution_A``.
        max_resolution_A: band limit of the vectors (Å); default: the resolution whose step is
            ``angular_step_deg`` (at least Nyquist). One of the two is needed.
        max_shift_px: largest |origin| per axis searched (px): each particle is searched at every origin
            of the search grid (:func:`.gallery.search_grid`, 1.5 shift steps apart), not stored in the index.
        shift_step_px: shift step (px) of the re-ranking and refinement; default ``max_resolution_A / (4 · pixel
            size)`` (Xmipp's).
        index_factory: faiss factory string, None for :func:`default_factory` (its GPU choice when faiss can
            search on the CUDA ``devices``; a factory faiss-gpu cannot search is then refused).
        whiten: weight frequencies by the inverse noise power estimated from the particles.
        memory_limit_GB: bound on the memory used for batches, the training sample and the shard being
            filled (see the module docstring); the shards are written to ``output_dir`` as they fill.
        grid_rotation: (3, 3) rigid rotation of the pose grid (:func:`.gallery.gallery_poses`), or None.
        devices: torch device names (:func:`deepcryo.core.cli.parse_devices`); the gallery is projected on the
            first, and a CUDA list makes the index one that faiss-gpu can search (:func:`faiss_gpu_ids`).
    Returns the manifest (dict). Nothing is left under ``output_dir`` on failure.
    """
    star = read_particles(particles) if isinstance(particles, str) else particles
    volume, map_px = read_mrc(reference)
    check_reference_map(volume, map_px, star, reference)
    box, px = star.box_size, star.pixel_size_A
    if angular_step_deg is None and max_resolution_A is None:
        raise InputError("give an angular step or a maximum resolution")
    if max_resolution_A is None:
        max_resolution_A = max(2 * px, box * px * math.sin(math.radians(angular_step_deg)))
    if max_resolution_A < 2 * px:
        raise InputError("max resolution %.3g Å is beyond Nyquist (%.3g Å at %.4g Å/px)"
                            % (max_resolution_A, 2 * px, px))
    if angular_step_deg is None:
        angular_step_deg = angular_step_for_box(box, px, max_resolution_A)
    if not 0 < angular_step_deg <= 90:
        raise InputError("angular step must be in (0, 90] degrees, got %g" % angular_step_deg)
    if max_shift_px < 0:
        raise InputError("max shift must be >= 0 px")
    shift_step_px = shift_step_px or shift_step_for_resolution(max_resolution_A, px)
    memory_bytes = memory_limit_GB * 1e9
    band = Band(box, px, max_resolution_A)
    weights = None
    if whiten:
        weights = particle_noise_weights(band, star)
    gpu = bool(faiss_gpu_ids(devices))
    projector = Projector(volume, device=devices[0] if devices else "cpu")
    sqrt_w = None if weights is None else torch.sqrt(weights)
    ctf_rms = particle_ctf_rms(band, star)
    gallery = Gallery(projector, band, gallery_poses(angular_step_deg, symmetry, grid_rotation), sqrt_w, normalise,
                      ctf_rms)
    origins = search_grid(max_shift_px, shift_step_px)
    factory = index_factory or default_factory(len(gallery), band.dim, gpu)
    if gpu:
        _require_gpu_factory(factory, band.dim)
    logger.info("gallery: %d poses = references, %d dims (%.1f Å, step %.2f°); each particle searched at %d "
                "origins %.2f px apart (shift step %.2f px)", len(gallery), band.dim, max_resolution_A,
                angular_step_deg, len(origins), float(origins[1, 0] - origins[0, 0]) if len(origins) > 1 else 0,
                shift_step_px)
    output_dir = os.path.abspath(output_dir)
    tmp = _build_folder(output_dir)
    try:
        try:
            shards, per_ref = build_index(gallery, factory, memory_bytes, tmp)
        except RuntimeError as exc:
            raise InputError("faiss could not build index %r: %s" % (factory, str(exc).strip().splitlines()[-1]))
        manifest = {"format": FORMAT, "reference": "reference.mrc", "box": box,
                    "pixel_size_A": px, "max_resolution_A": max_resolution_A, "angular_step_deg": angular_step_deg,
                    "symmetry": symmetry, "max_shift_px": max_shift_px,
                    "shift_step_px": float(shift_step_px), "origins_px": origins.tolist(), "normalise": normalise,
                    "weights": "weights.npy" if weights is not None else None, "ctf_rms": "ctf_rms.npy",
                    "factory": factory,
                    "grid_rotation": None if grid_rotation is None else np.asarray(grid_rotation).tolist(),
                    "dim": band.dim, "n_references": len(gallery), "bytes_per_reference": per_ref,
                    "shards": shards}
        write_mrc(os.path.join(tmp, "reference.mrc"), volume, px)
        if weights is not None:
            np.save(os.path.join(tmp, "weights.npy"), torch.sqrt(weights).numpy())
        np.save(os.path.join(tmp, "ctf_rms.npy"), ctf_rms.numpy())
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
