"""Generic STAR files: every ``data_`` block as ``{column: np.ndarray}``, read and written.

Reading goes through emtable; numeric columns become float64 arrays, the others object arrays of str.
Writing is atomic (:func:`deepcryo.core.files.atomic_output`) and gives every block as a ``loop_``;
integral floats are written as integers, because reading makes every numeric column float64 and integer
columns (``rlnOpticsGroup``, ``rlnImageSize``, ``rlnClassNumber``) must stay integers in the file.
Particle tables (``data_optics`` + ``data_particles``) are in :mod:`deepcryo.core.particles`.
"""
from collections import OrderedDict
from typing import Dict, Mapping

import numpy as np
from emtable import Table

from .errors import InputError
from .files import atomic_output, check_exists

__all__ = ["read_star", "write_star"]


def _block_names(path):
    names = []
    with open(path) as f:
        for line in f:
            s = line.strip()
            if s.startswith("data_"):
                names.append(s[5:])
    return names


def _to_array(values):
    try:
        return np.asarray(values, dtype=np.float64)
    except ValueError:
        return np.asarray(values, dtype=object)


def read_star(path: str) -> Dict[str, Dict[str, np.ndarray]]:
    """Read every block of a STAR file: ``{block_name: OrderedDict(column -> np.ndarray)}``.

    Numeric columns become float64 arrays, the others object arrays of str.
    """
    check_exists(path, "STAR file")
    blocks = OrderedDict()
    try:
        for name in _block_names(path):
            table = Table()
            table.read(path, tableName=name, guessType=False)
            cols = table.getColumnNames()
            rows = [tuple(r) for r in table]
            blocks[name] = OrderedDict(
                (c, _to_array([r[i] for r in rows])) for i, c in enumerate(cols))
    except InputError:
        raise
    except Exception as exc:
        raise InputError("%s: not a readable STAR file (%s)" % (path, str(exc).splitlines()[0]))
    if not blocks:
        raise InputError("%s: no data_ block found (not a STAR file)" % path)
    return blocks


def as_written(values) -> np.ndarray:
    """``values`` (any shape) as :func:`write_star` writes them (floats to 6 decimals), read back: what a
    program continuing from the file sees, so that a run resumed from its files equals one that never stopped."""
    values = np.asarray(values)
    if values.dtype.kind != "f":
        return values
    return np.asarray([float(s) for s in _format_column(values.ravel())], dtype=values.dtype).reshape(values.shape)


def _format_column(values):
    values = np.asarray(values)
    if values.dtype.kind in "iu":
        return ["%d" % v for v in values]
    if values.dtype.kind == "f":
        if np.all(np.isfinite(values)) and np.all(values == np.round(values)) and np.abs(values).max(initial=0) < 1e15:
            return ["%d" % v for v in values]
        return ["%.6f" % v for v in values]
    return [str(v) for v in values]


def write_star(path: str, blocks: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Write ``{block_name: {column: array}}`` as a STAR file (atomically), each block as a loop."""
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            f.write("\n# version 30001\n")
            for name, cols in blocks.items():
                f.write("\ndata_%s\n\nloop_\n" % name)
                names = list(cols)
                for i, c in enumerate(names):
                    f.write("_%s #%d\n" % (c, i + 1))
                formatted = [_format_column(cols[c]) for c in names]
                n = len(formatted[0]) if formatted else 0
                widths = [max((len(s) for s in col), default=1) for col in formatted]
                for r in range(n):
                    f.write(" ".join(col[r].rjust(w) for col, w in zip(formatted, widths)) + "\n")
                f.write("\n")
