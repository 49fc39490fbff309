"""SwiftAlign: particle alignment as a nearest-neighbour search over compressed Fourier vectors
(Lauzirika, 2023), with exact re-ranking and local refinement.

Modules: :mod:`.features` (image → vector), :mod:`.gallery` (lazy reference gallery), :mod:`.sampling`
(angular and shift steps), :mod:`.index` (faiss index: train, fill, shards, save/load), :mod:`.target` (what
:func:`.query.align` searches), :mod:`.query` (search, re-rank, refine, local mode); SwiftRes:
:mod:`.refine` (the iteration loop), :mod:`.references` (filters, halves, masks) and :mod:`.layout` (its
output folder). Library entry points: :func:`.index.train`, :func:`.query.query` (files) and
:func:`.query.align` (arrays, for refinement loops). Programs: ``python -m deepcryo.swiftalign
train|query|refine`` (one module each in :mod:`.commands`).
"""
import importlib

__all__ = ["train", "load", "align"]
_HOME = {"train": ".index", "load": ".index", "align": ".query"}


def __getattr__(name):
    """``train``, ``load`` and ``align`` imported on first use, so that importing :mod:`.layout` (the Scipion
    protocol and viewer do) does not load faiss."""
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name], __name__), name)
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
