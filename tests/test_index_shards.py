"""SwiftAlign index shards within the memory limit: built one at a time and written as they fill, queried
one at a time with a running top-k, and the results of one search over all the references.

Gallery: phantom, 32 px, 2 Å/px, 25° steps, 8 Å band (196 dims), origins within ±1 px (1 px grid), 2 CTF
groups: 18 090 references. A memory limit of 0.01 GB makes Flat shards of 3 188 references (6 shards).
"""
import json
import logging
import os
import weakref

import faiss
import numpy as np
import pytest
import torch

from deepcryo.core.errors import InputError
from deepcryo.core.mrc import read_mrc, write_mrc
from deepcryo.core.particles import read_particles
from deepcryo.core.projector import Projector
from deepcryo.core.simulate import phantom_volume, write_particle_set
from deepcryo.swiftalign import index as swindex
from deepcryo.swiftalign.features import Band
from deepcryo.swiftalign.gallery import Gallery, gallery_poses
from deepcryo.swiftalign.query import align

TRAIN = dict(angular_step_deg=10.0, max_resolution_A=8.0, max_shift_px=1.0, shift_step_px=1.0)
SMALL_GB = 0.01


class _Live:
    """Counts the faiss indexes made by a wrapped function that are still alive, and the most at once."""

    def __init__(self, make):
        self.make, self.now, self.most = make, 0, 0

    def _gone(self):
        self.now -= 1

    def __call__(self, *args):
        index = self.make(*args)
        self.now += 1
        self.most = max(self.most, self.now)
        weakref.finalize(index, self._gone)
        return index


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    d = tmp_path_factory.mktemp("shards")
    vol = phantom_volume(32, seed=0)
    write_mrc(str(d / "map.mrc"), vol, 2.0)
    star = write_particle_set(str(d / "sim"), vol, 40, 2.0, snr=0.3, seed=3, max_shift_px=1.0,
                              defocus_range_A=(15000.0, 20000.0))
    m1 = swindex.train(str(d / "map.mrc"), star, str(d / "one"), index_factory="Flat", memory_limit_GB=4.0, **TRAIN)
    assert len(m1["shards"]) == 1
    return d, star


def test_build_writes_each_shard_when_full_and_holds_one(data, monkeypatch):
    """Fails before the shards were written as they filled: all six were alive at the end of the build."""
    d, star = data
    live = _Live(faiss.clone_index)
    monkeypatch.setattr(faiss, "clone_index", live)
    m = swindex.train(str(d / "map.mrc"), star, str(d / "six"), index_factory="Flat", memory_limit_GB=SMALL_GB,
                      **TRAIN)
    monkeypatch.undo()
    shards = m["shards"]
    assert len(shards) >= 3 and live.most == 1
    assert [s["first_id"] for s in shards] == list(np.cumsum([0] + [s["n"] for s in shards[:-1]]))
    assert sum(s["n"] for s in shards) == m["n_references"] == len(gallery_poses(10.0)) == 14868
    cap = swindex.shard_capacity(m["bytes_per_reference"], SMALL_GB * 1e9)
    for s in shards:
        assert s["n"] <= cap and faiss.read_index(str(d / "six" / s["file"])).ntotal == s["n"]
    assert sorted(os.listdir(d / "six")) == sorted([MANIFEST_NAME, "reference.mrc", "ctf_rms.npy"] + [s["file"] for s in shards])


MANIFEST_NAME = swindex.MANIFEST


def test_sharded_query_equals_one_shard(data, monkeypatch, caplog):
    """The same matches, poses and scores from 6 shards streamed one at a time (in 5 blocks of 8 particles)
    as from one shard in memory; never two shards alive at once."""
    d, star = data
    if not (d / "six").exists():
        swindex.train(str(d / "map.mrc"), star, str(d / "six"), index_factory="Flat", memory_limit_GB=SMALL_GB,
                      **TRAIN)
    particles = read_particles(star)
    one, six = swindex.load(str(d / "one")), swindex.load(str(d / "six"))
    assert one.resident and not six.resident
    with particles.open_images() as stack:
        from deepcryo.swiftalign.query import ParticleBatch
        vecs = ParticleBatch(one.band, stack.read(np.arange(len(particles))), particles.ctf_params(),
                             None).search_vectors(one.band, one.origins_px, ctf_rms=one.gallery.ctf_rms).numpy()
    d1, l1 = swindex.search(one.shards(), vecs, 20, 32)
    d6, l6 = swindex.search(six.shards(), vecs, 20, 32, memory_bytes=1e5)   # chunks of a few vectors
    assert np.array_equal(l1, l6) and np.array_equal(d1, d6) and (l1 >= 0).all()

    live = _Live(swindex._read_faiss)
    monkeypatch.setattr(swindex, "_read_faiss", live)
    with caplog.at_level(logging.WARNING, logger="deepcryo.swiftalign.query"):
        r6 = align(six, particles, k=2, batch_size=8, memory_limit_GB=1e-4)
    logs = [r.getMessage() for r in caplog.records]
    monkeypatch.undo()
    assert live.most == 1 and live.now == 0
    assert any("rebuild the index" in line for line in logs)          # shards larger than this limit
    r1 = align(one, particles, k=2, batch_size=8)
    for key in r1:
        assert np.array_equal(r1[key], r6[key]), key


def _same_up_to_ties(ref, got):
    """Equal distances, and equal ids except in the order of, or the choice among, references whose distances
    tie exactly at the last place kept (fast-scan distances are 16-bit quantized, so ties are frequent, and
    faiss does not order them)."""
    (rd, rl), (gd, gl) = ref, got
    if not np.array_equal(rd, gd):
        return False
    for d, a, b in zip(rd, rl, gl):
        for value in np.unique(d):
            if value < d[-1] and set(a[d == value]) != set(b[d == value]):
                return False
    return True


def test_fast_scan_shards_equal_one_shard(data, tmp_path):
    """The default kind of index (PCA, IVF, 4-bit fast-scan PQ): one trained template filled into >= 3
    shards and streamed gives exactly the lists of the same shards held in memory, and the lists of one
    shard up to the order of exact ties."""
    d, _ = data
    volume, _ = read_mrc(str(d / "map.mrc"))
    band = Band(32, 2.0, 8.0)
    gallery = Gallery(Projector(volume), band, gallery_poses(10.0))
    template = swindex.train_template(gallery, "PCA64,IVF64,PQ32x4fs", 4e9)
    per_ref = swindex.bytes_per_reference(template)
    small = 4 * per_ref * 5000                                                  # 5000 references per shard
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    one = swindex.fill_shards(gallery, template, 4e9, str(tmp_path / "a"))
    many = swindex.fill_shards(gallery, template, small, str(tmp_path / "b"))
    assert len(one) == 1 and len(many) >= 3

    rng = np.random.default_rng(0)
    x = gallery.vectors(rng.choice(len(gallery), 300, replace=False)).numpy()
    x = x + rng.normal(0, 0.5 / np.sqrt(band.dim), x.shape).astype(np.float32)
    streamed = swindex.search(swindex._ShardReader(str(tmp_path / "b"), many, None), x, 20, 8)
    in_memory = swindex.search(list(swindex._ShardReader(str(tmp_path / "b"), many, None)), x, 20, 8)
    assert np.array_equal(streamed[0], in_memory[0]) and np.array_equal(streamed[1], in_memory[1])
    whole = swindex.search(swindex._ShardReader(str(tmp_path / "a"), one, None), x, 20, 8)
    assert _same_up_to_ties(whole, streamed)
    shuffled = (whole[0], whole[1][:, ::-1])                                   # the check can fail
    assert not _same_up_to_ties(shuffled, streamed)


def test_kept_gallery_slices_equal_projected(data):
    """The gallery's kept table of band slices (what the exact re-ranking reads once the particles outnumber
    the poses) holds the slices the re-ranking would project, bit for bit, whatever the chunks it was made in;
    a table over the byte limit is not made."""
    d, _ = data
    volume, _ = read_mrc(str(d / "map.mrc"))
    band = Band(32, 2.0, 8.0)
    gallery = Gallery(Projector(volume), band, gallery_poses(10.0))
    ids = torch.as_tensor(np.random.default_rng(1).choice(len(gallery), (7, 20)))
    projected = gallery.slices(ids)
    assert projected.shape == (7, 20, len(band))
    table_bytes = len(gallery) * len(band) * 8
    assert not gallery.keep_slices(table_bytes - 1) and gallery._slices is None
    assert gallery.keep_slices(table_bytes, chunk=1000)
    assert torch.equal(gallery.slices(ids), projected)
    assert not torch.equal(gallery.slices(ids.roll(1, 1)), projected)          # the check can fail


def test_killed_build_leftovers_and_bad_shard_list(data):
    """A build folder left by a killed train of the same output is removed; a manifest without a usable
    shard list is refused with one line."""
    d, star = data
    stale = d / ".again.building.abc123"
    stale.mkdir()
    (stale / "shard_000.faiss").write_bytes(b"x" * 100)
    swindex.train(str(d / "map.mrc"), star, str(d / "again"), index_factory="Flat", memory_limit_GB=4.0, **TRAIN)
    assert not stale.exists() and not [n for n in os.listdir(d) if n.startswith(".again.")]
    path = d / "again" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    for bad in ([], [{"first_id": 0}], None):
        manifest["shards"] = bad
        path.write_text(json.dumps(manifest))
        with pytest.raises(InputError, match="shard list .* missing or malformed"):
            swindex.load(str(d / "again"))
