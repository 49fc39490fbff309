"""What :func:`.query.align` aligns particles against: the interface shared by a trained index
(:class:`.index.IndexBundle`) and a bare reference for local searches (``refine.LocalReference``).

It lives in its own module because :mod:`.index` implements it and :mod:`.query` (which imports
:mod:`.index`) uses it; :mod:`.query` re-exports both names.
"""
from typing import Any, Iterable, Mapping, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np
import torch

from deepcryo.core.projector import Projector

from .features import Band
from .gallery import Gallery

__all__ = ["AlignTarget", "SearchIndex"]


@runtime_checkable
class AlignTarget(Protocol):
    """A reference map prepared for alignment: enough for a local search around prior poses.

    Attributes:
        projector: the map's :class:`deepcryo.core.projector.Projector` (central slices of its transform).
        band: the :class:`.features.Band` the particles are compared over.
        sqrt_weights: (P,) square root of the whitening weights over the band, or None (no whitening).
        manifest: the sampling, with at least ``pixel_size_A`` (Å/px), ``angular_step_deg`` (the angular
            step, degrees), ``shift_step_px`` (px), ``symmetry`` (RELION point group name), ``max_shift_px``
            (default local origin range, px) and ``normalise`` (unit-norm search vectors).
    """

    projector: Projector
    band: Band
    sqrt_weights: Optional[torch.Tensor]
    manifest: Mapping[str, Any]


@runtime_checkable
class SearchIndex(AlignTarget, Protocol):
    """An :class:`AlignTarget` with a searchable gallery: what the global search needs in addition.

    Attributes:
        gallery: the :class:`.gallery.Gallery` whose entry ids (poses) the index returns.
        origins_px: (S, 2) origins (px) each particle is searched at (:meth:`.query.ParticleBatch.search_vectors`).
    """

    gallery: Gallery
    origins_px: np.ndarray

    @property
    def resident(self) -> bool:
        """True when the index is kept in memory between searches (else it is streamed shard by shard)."""
        ...

    @property
    def shard_bytes(self) -> int:
        """Size (bytes) of the largest shard, about the memory one shard takes while it is searched."""
        ...

    def shards(self, devices: Optional[Sequence[str]] = None) -> Iterable[Tuple[int, Any]]:
        """(first entry id, faiss index) pairs covering the gallery, for :func:`.index.search`."""
        ...
