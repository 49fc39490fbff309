"""The order of the particles along a curved landscape: a one-dimensional Laplacian eigenmap of the latent.

Why not the first principal component alone: a decoder that is linear in the latent (a mean map plus learned
basis maps, :mod:`deepcryo.landscape.model`) follows a large continuous motion through several coordinates, and
the conformations then lie along a curve, often a horseshoe, whose two ends share the same first-component score.
On a RELION-rendered 40° hinge at working box 64 the first component ordered the 20 conformations with |Spearman ρ|
0.10 while the latent's neighbourhoods ordered them with 1.00 (``benchmarks/RESULTS.md``, "The landscape's order
along its curve"); volumes along PC1 or groups binned on it then mix the two ends of the motion. The first
non-trivial eigenvector of the k-nearest-neighbour graph's Laplacian (Belkin & Niyogi 2003; the diffusion maps of
ManifoldEM) follows the curve instead, and equals PC1's order where the landscape is straight.

Cost: the eigenmap is fitted on at most ``max_fit`` particles drawn at random and carried to the others as the
mean of their ``n_neighbors`` nearest fitted particles, so a million particles cost one k-nearest-neighbour query.
For discrete states (a disconnected graph) the coordinate separates components rather than ordering anything;
it is meant for continuous landscapes.
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np

from .frames import quantile_groups

__all__ = ["landscape_order", "order_points"]


def landscape_order(z: np.ndarray, n_neighbors: int = 15, max_fit: int = 20000, seed: int = 0,
                    reference: Optional[np.ndarray] = None) -> np.ndarray:
    """(N,) each particle's position along the landscape's main curve, zero mean and unit standard deviation.

    Args:
        z: (N, L) latent coordinates, in the units the analysis measures them (each coordinate divided by the
            encoder's root-mean-square σ, :class:`deepcryo.landscape.volumes.LatentPCA`).
        n_neighbors: neighbours of the graph (and of the extension to the particles not fitted).
        max_fit: at most this many particles (drawn with ``seed``) define the eigenmap.
        reference: (N,) a score the result is signed to agree with (e.g. PC1), so that reruns read the same way;
            default: the first latent coordinate with any spread.
    """
    from sklearn.manifold import SpectralEmbedding
    from sklearn.neighbors import KNeighborsRegressor

    z = np.asarray(z, dtype=np.float64)
    n = len(z)
    if n < 3:
        return np.zeros(n)
    fit = np.sort(np.random.default_rng(seed).choice(n, max_fit, replace=False)) if n > max_fit else np.arange(n)
    neighbours = max(2, min(n_neighbors, len(fit) - 1))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        fitted = SpectralEmbedding(n_components=1, affinity="nearest_neighbors", n_neighbors=neighbours,
                                   random_state=seed).fit_transform(z[fit])[:, 0]
    if len(fit) < n:
        order = KNeighborsRegressor(neighbours).fit(z[fit], fitted).predict(z)
        order[fit] = fitted
    else:
        order = fitted
    order = order - order.mean()
    sd = order.std()
    order = order / sd if sd > 0 else order
    if reference is None:
        spread = z.std(0)
        reference = z[:, int(np.argmax(spread > 0))] if np.any(spread > 0) else order
    if np.corrcoef(order, reference)[0, 1] < 0:
        order = -order
    return order


def order_points(z: np.ndarray, order: np.ndarray, steps: int) -> np.ndarray:
    """(steps, L) the mean latent of each of ``steps`` equal-count bins of the particles along ``order`` (N,),
    first bin first: points on the curve the particles occupy (a straight line between two PC scores can leave
    it), for :func:`deepcryo.landscape.volumes.decode_volumes`; the bins are ``frames``' groups
    (:func:`deepcryo.landscape.frames.quantile_groups`)."""
    z = np.asarray(z, dtype=np.float64)
    bins = quantile_groups(order, steps)
    return np.stack([z[bins == b].mean(0) for b in range(steps)])
