"""SwiftAlign: particle alignment as a nearest-neighbour search over compressed Fourier vectors
(Lauzirika, 2023), with exact re-ranking and local refinement.

Modules: :mod:`.features` (image → vector), :mod:`.gallery` (lazy reference gallery), :mod:`.index`
(faiss index: train, fill, shards, save/load), :mod:`.query` (search, re-rank, refine, local mode).
Library entry points: :func:`.index.train`, :func:`.query.query` (files) and :func:`.query.align`
(arrays, for refinement loops). Programs: ``python -m deepcryo.swiftalign train|query`` (see :mod:`.__main__`).
"""
from .index import load, train
from .query import align

__all__ = ["train", "load", "align"]
