# **************************************************************************
# *
# * Authors:     the deepcryo developers
# *
# * This program is free software; you can redistribute it and/or modify
# * it under the terms of the GNU General Public License as published by
# * the Free Software Foundation; either version 3 of the License, or
# * (at your option) any later version.
# *
# * This program is distributed in the hope that it will be useful,
# * but WITHOUT ANY WARRANTY; without even the implied warranty of
# * MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.  See the
# * GNU General Public License for more details.
# *
# * You should have received a copy of the GNU General Public License
# * along with this program.  If not, see <https://www.gnu.org/licenses/>.
# *
# **************************************************************************
"""Selecting particles on the 2-D landscape of an analysis: by a polygon drawn (or typed) on an embedding, or
by cluster numbers; and the selection file that carries such a choice from the viewer to a protocol.

Particles are named by their Scipion ids (``rlnImageId`` of the analysis' ``particles.star``, written from the
Scipion set), so a selection survives any reordering. Embedding coordinates are the analysis' columns:
``dcPC1/dcPC2`` (latent PCA, in units of the encoder's σ) or ``dcUMAP1/dcUMAP2``.

Selection file (text): ``#`` header lines ``# embedding: PCA`` and ``# polygon: x,y x,y ...`` (what was
drawn, for the record), then one particle id per line.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from deepcryo.core.errors import InputError

__all__ = ["EMBEDDING_COLUMNS", "embedding_xy", "inside_polygon", "parse_polygon", "format_polygon",
           "select_by_polygon", "select_by_clusters", "write_selection", "read_selection"]

#: Columns of the analysis' particles.star holding each 2-D embedding.
EMBEDDING_COLUMNS = {"PCA": ("dcPC1", "dcPC2"), "UMAP": ("dcUMAP1", "dcUMAP2")}


def embedding_xy(columns: Dict[str, Sequence[float]], embedding: str = "PCA") -> np.ndarray:
    """(N, 2) coordinates of the particles on ``embedding`` ("PCA" or "UMAP") from the analysis' STAR columns."""
    if embedding not in EMBEDDING_COLUMNS:
        raise InputError("unknown embedding %r (use %s)" % (embedding, " or ".join(EMBEDDING_COLUMNS)))
    cx, cy = EMBEDDING_COLUMNS[embedding]
    if cx not in columns:
        raise InputError("the analysis has no %s embedding (no column %s)" % (embedding, cx))
    return np.stack([np.asarray(columns[cx], dtype=np.float64), np.asarray(columns[cy], dtype=np.float64)], 1)


def inside_polygon(xy: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Boolean (N,): which points ``xy`` (N, 2) lie inside the closed polygon ``vertices`` (M, 2), by the
    even-odd rule (a self-crossing lasso stroke selects what a user sees enclosed an odd number of times).
    Points exactly on an edge may fall either side."""
    xy = np.asarray(xy, dtype=np.float64)
    v = np.asarray(vertices, dtype=np.float64)
    x, y = xy[:, :1], xy[:, 1:2]                       # (N, 1) against the M edges
    x0, y0 = v[:, 0], v[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    straddles = (y0 > y) != (y1 > y)                   # the edge crosses the horizontal line through the point
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
    crossings = np.sum(straddles & (x < x_cross), axis=1)
    return crossings % 2 == 1


def parse_polygon(text: str) -> np.ndarray:
    """Vertices (M, 2) from text ``"x1 y1, x2 y2, ..."`` (numbers separated by spaces, commas or semicolons,
    taken in pairs); at least three vertices."""
    tokens = [t for t in re.split(r"[\s,;()\[\]]+", text or "") if t]
    try:
        values = [float(t) for t in tokens]
    except ValueError:
        raise InputError("polygon %r: only numbers, as pairs x y" % text)
    if len(values) % 2 or len(values) < 6:
        raise InputError("polygon %r: give at least three vertices as pairs x y (%d numbers given)"
                         % (text, len(values)))
    return np.asarray(values, dtype=np.float64).reshape(-1, 2)


def format_polygon(vertices: np.ndarray) -> str:
    """Text of ``vertices`` that :func:`parse_polygon` reads back: ``"x1 y1, x2 y2, ..."``."""
    return ", ".join("%.6g %.6g" % (x, y) for x, y in np.asarray(vertices))


def select_by_polygon(ids: Sequence[int], xy: np.ndarray, vertices: np.ndarray) -> List[int]:
    """Ids of the particles whose embedding point ``xy`` lies inside the polygon."""
    return [int(i) for i in np.asarray(ids)[inside_polygon(xy, vertices)]]


def select_by_clusters(ids: Sequence[int], labels: Sequence[int], clusters: Iterable[int]) -> List[int]:
    """Ids of the particles whose cluster label (1-based, as the analysis writes it) is one of ``clusters``."""
    labels = np.asarray(labels, dtype=np.int64)
    wanted = sorted(set(int(c) for c in clusters))
    unknown = [c for c in wanted if c not in set(labels.tolist())]
    if unknown:
        raise InputError("no cluster %s in this analysis (clusters %d to %d)"
                         % (", ".join(map(str, unknown)), labels.min(), labels.max()))
    return [int(i) for i in np.asarray(ids)[np.isin(labels, wanted)]]


def write_selection(path: str, ids: Sequence[int], embedding: Optional[str] = None,
                    vertices: Optional[np.ndarray] = None) -> str:
    """Write a selection file (module docstring) and return ``path``."""
    with open(path, "w") as f:
        f.write("# deepcryo landscape selection: %d particles (Scipion ids)\n" % len(ids))
        if embedding:
            f.write("# embedding: %s\n" % embedding)
        if vertices is not None:
            f.write("# polygon: %s\n" % format_polygon(vertices))
        f.writelines("%d\n" % i for i in ids)
    return path


def read_selection(path: str) -> Tuple[List[int], Dict[str, str]]:
    """(particle ids, header ``{key: value}``) of a selection file."""
    ids, header = [], {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if line.startswith("#"):
                key, sep, value = line[1:].partition(":")
                if sep:
                    header[key.strip()] = value.strip()
            elif line:
                try:
                    ids.append(int(line))
                except ValueError:
                    raise InputError("%s line %d: %r is no particle id" % (path, n, line))
    if not ids:
        raise InputError("%s holds no particle id" % path)
    return ids, header
