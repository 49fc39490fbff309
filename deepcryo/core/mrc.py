"""MRC files: images, image stacks and volumes, read as float32 whatever their mode.

Conventions
-----------
* Any mode of :data:`MRC_MODES` is read (0 int8, 1 int16, 2 float32, 6 uint16, 12 float16, 101 4-bit),
  with or without an extended header (FEI1/FEI2, SerialEM); integers and float16 convert exactly.
* The pixel size is the header's x/y size; z = 0 (EPU micrographs, some stacks) means "not recorded"; a
  volume's voxels must be cubic. 0.0 means the header records no size: callers that need one say so.
* Particle images are named ``i@stack.mrcs`` with a 1-based ``i``; :class:`ImageStack` reads them lazily
  from memory-mapped stacks.
* Files are written atomically (:func:`deepcryo.core.files.atomic_output`).

Every problem with a file raises :class:`~deepcryo.core.errors.InputError` with one line naming it.
"""
import math
import mmap
import os
import warnings
from collections import OrderedDict
from typing import Iterator, Sequence, Tuple

import mrcfile
import numpy as np

from .errors import InputError
from .files import atomic_output, check_exists

__all__ = ["MRC_MODES", "read_mrc", "read_mrc_header", "write_mrc", "ImageStack"]


# mrcfile's own warnings about damaged files (e.g. "Expected N bytes in data block") would add lines to
# the one-line error each program prints; the damage is reported as an InputError instead
warnings.filterwarnings("ignore", category=RuntimeWarning, module="mrcfile")

#: MRC modes (MRC2014 numbering) whose data deepcryo reads, always converted to float32 for computation.
#: Mode 101 (4-bit, two unsigned values per byte, the first in the low bits; SerialEM's counting frames)
#: is unpacked here because mrcfile leaves it unread.
MRC_MODES = OrderedDict([(0, "int8"), (1, "int16"), (2, "float32"), (6, "uint16"), (12, "float16"),
                         (101, "4-bit")])
_MRC_HEADER_BYTES = 1024
#: IMOD's "imodStamp" (header bytes 152-155, in ``extra2``); with it, flag 1 of "imodFlags" (bytes
#: 156-159) means signed bytes: IMOD's mode-0 files are unsigned unless flagged (IMOD's mrc_format.txt)
_IMOD_STAMP = 1146047817
#: relative tolerance between the x, y (and z) voxel sizes of one header: float32 rounding of the cell
#: lengths is ~1e-7; real anisotropic pixels differ by far more than 1e-3
_VOXEL_REL_TOL = 1e-3


def _mrc_error(path, exc):
    return InputError("%s: not a readable MRC file (%s)" % (path, (str(exc).splitlines() or [type(exc).__name__])[0]))


def _data_bytes(header):
    """Bytes of the data block announced by a header."""
    nx, ny, nz, mode = int(header.nx), int(header.ny), int(header.nz), int(header.mode)
    if mode == 101:
        return nz * ny * ((nx + 1) // 2)
    return nz * ny * nx * np.dtype(MRC_MODES[mode]).itemsize


def _data_problem(mrc, path, header_only=False):
    """The reason the data block of an open file (or of its header alone) cannot be used, or None.
    mrcfile (``permissive``) leaves ``data`` None for a truncated file or a mode it does not know (mode
    101 included); complex modes 3/4 hold Fourier transforms, not images."""
    mode = int(mrc.header.mode)
    if mode not in MRC_MODES:
        return "mode %d is not an image mode deepcryo reads (%s)" % (
            mode, ", ".join("%d %s" % kv for kv in MRC_MODES.items()))
    expected = _MRC_HEADER_BYTES + int(mrc.header.nsymbt) + _data_bytes(mrc.header)
    unread = mrc.data is None and mode != 101 and not header_only
    if isinstance(mrc, (mrcfile.gzipmrcfile.GzipMrcFile, mrcfile.bzip2mrcfile.Bzip2MrcFile)):
        if mode == 101:
            return "a compressed 4-bit file: decompress it first"
        return "truncated: its header announces %d bytes" % expected if unread else None
    size = os.path.getsize(path)
    if size < expected or unread:
        return "truncated: the file holds %d bytes, its header announces %d" % (size, expected)
    return None


def _imod_unsigned_bytes(header):
    """True for a mode-0 file written by IMOD as unsigned bytes (MRC2014 mode 0 is signed)."""
    if int(header.mode) != 0:
        return False
    order = header.mode.dtype.byteorder
    stamp, flags = np.frombuffer(header.extra2.tobytes()[40:48], dtype=np.dtype("i4").newbyteorder(order))
    return stamp == _IMOD_STAMP and not flags & 1


def _typed_data(mrc):
    """The data array of an open file, with IMOD's unsigned bytes viewed as uint8."""
    return mrc.data.view(np.uint8) if _imod_unsigned_bytes(mrc.header) else mrc.data


def _read_4bit(path, header):
    """float32 data of a mode-101 file (size checked by :func:`_data_problem`): two unsigned 4-bit values
    per byte, the left pixel in the low bits; each row starts on a byte boundary (an odd ``nx`` leaves
    the last high nibble of a row unused)."""
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    row_bytes = (nx + 1) // 2
    raw = np.fromfile(path, dtype=np.uint8, count=nz * ny * row_bytes,
                      offset=_MRC_HEADER_BYTES + int(header.nsymbt)).reshape(nz, ny, row_bytes)
    data = np.empty((nz, ny, 2 * row_bytes), dtype=np.float32)
    data[..., 0::2] = raw & 0x0F
    data[..., 1::2] = raw >> 4
    return data[..., :nx].reshape(mrcfile.utils.data_shape_from_header(header))


def _mrc_pixel_size_A(mrc, path):
    """Pixel size (Å/px) of an MRC header, ``cella / (mx, my, mz)``: the x size, 0.0 when the header
    records none.

    x and y must agree (square pixels). A z of 0 means "not recorded" and is accepted: EPU writes
    ``(0.6666, 0.6666, 0)`` on its micrographs, and some programs write stacks so. z is meaningless for
    a single image and for an image stack (``ispg`` 0 in a ``.mrcs``); for a volume (3D, and a space
    group ``ispg`` > 0 or, as RELION writes its maps with ``ispg`` 0, a ``.mrc`` name) a non-zero z must
    equal x. Raises InputError for negative, non-finite, non-square or non-cubic sizes.
    """
    h = mrc.header
    x, y, z = (float(length) / int(count) if int(count) > 0 else 0.0
               for length, count in ((h.cella.x, h.mx), (h.cella.y, h.my), (h.cella.z, h.mz)))
    shown = "x=%.6g, y=%.6g, z=%.6g Å" % (x, y, z)
    if not all(math.isfinite(s) and s >= 0 for s in (x, y, z)):
        raise InputError("%s: invalid voxel size in the MRC header (%s)" % (path, shown))
    if x == 0 and y == 0:
        return 0.0
    if abs(x - y) > _VOXEL_REL_TOL * max(x, y):
        raise InputError("%s: pixels are not square in the MRC header (%s); deepcryo needs x = y" % (path, shown))
    ispg = int(h.ispg)
    named_stack = os.path.splitext(path)[1].lower() == ".mrcs"
    if int(h.nz) > 1 and z != 0 and abs(z - x) > _VOXEL_REL_TOL * x and (ispg > 0 or not named_stack):
        raise InputError("%s: a volume needs cubic voxels, the MRC header gives %s (if this is an image stack, %s)"
                         % (path, shown, "set its space group ispg to 0" if ispg > 0 else "name it .mrcs"))
    return x


def _open_checked(mrc, path, header_only=False):
    problem = _data_problem(mrc, path, header_only)
    if problem:
        raise InputError("%s: not a readable MRC file (%s)" % (path, problem))


def read_mrc_header(path: str) -> Tuple[Tuple[int, ...], float]:
    """Return ``(shape, pixel_size_A)`` of an MRC file without reading its data.

    ``shape`` is (nz, ny, nx) for volumes and stacks and (ny, nx) for single images; ``pixel_size_A`` as
    :func:`read_mrc`.
    """
    check_exists(path, "MRC file")
    try:
        with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
            _open_checked(mrc, path, header_only=True)
            return mrcfile.utils.data_shape_from_header(mrc.header), _mrc_pixel_size_A(mrc, path)
    except InputError:
        raise
    except Exception as exc:  # mrcfile raises ValueError/OSError with many wordings
        raise _mrc_error(path, exc)


def read_mrc(path: str, check_finite: bool = True) -> Tuple[np.ndarray, float]:
    """Read a whole MRC file into float32. Returns ``(data, pixel_size_A)``.

    Any mode of :data:`MRC_MODES` is read (integers and float16 converted exactly to float32; IMOD's
    unsigned mode-0 bytes as unsigned); an extended header (FEI1/FEI2, SerialEM, ...) is skipped.
    ``pixel_size_A`` is the x/y size of the header (see :func:`_mrc_pixel_size_A` for z), 0.0 when the
    header records none: callers that need it say so.
    Raises InputError for a missing, truncated or non-MRC file, an unsupported mode, inconsistent voxel
    sizes, or (``check_finite``) NaN/Inf values.
    """
    check_exists(path, "MRC file")
    try:
        with mrcfile.open(path, mode="r", permissive=True) as mrc:
            _open_checked(mrc, path)
            pixel_size = _mrc_pixel_size_A(mrc, path)
            if int(mrc.header.mode) == 101:
                data = _read_4bit(path, mrc.header)
            else:
                data = np.array(_typed_data(mrc), dtype=np.float32)  # one copy, native byte order
    except InputError:
        raise
    except Exception as exc:
        raise _mrc_error(path, exc)
    if check_finite and not np.isfinite(data).all():
        raise InputError("%s: contains NaN or Inf values" % path)
    return data, pixel_size


def write_mrc(path: str, data, pixel_size_A: float, is_stack: bool = False) -> None:
    """Write float32 ``data`` (2D image, 3D volume, or 3D stack with ``is_stack``) atomically."""
    data = np.ascontiguousarray(np.asarray(data, dtype=np.float32))
    with atomic_output(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(data)
            if is_stack:
                mrc.header.ispg = 0
            elif data.ndim == 3:
                mrc.set_volume()
            mrc.voxel_size = float(pixel_size_A)
            mrc.update_header_stats()


class ImageStack:
    """Lazy, memory-mapped access to particle images named ``i@file`` (1-based ``i``).

    Images are read on demand in batches, so a stack of millions of particles never has to fit in memory.
    Files are opened once and kept open until :meth:`close`.
    """

    def __init__(self, refs: Sequence[Tuple[int, str]]):
        """``refs``: sequence of ``(index0, absolute_path)`` (0-based index into the file)."""
        self.refs = list(refs)
        self._maps = {}
        self.box = None
        for path in OrderedDict.fromkeys(p for _, p in self.refs):
            arr = self._open(path)
            box = arr.shape[-1]
            if arr.shape[-2] != box:
                raise InputError("%s: images are not square (%s)" % (path, arr.shape))
            if self.box is None:
                self.box = box
            elif box != self.box:
                raise InputError("%s: box size %d differs from %d of the other stacks (mixed box sizes)"
                                 % (path, box, self.box))
        for i, (idx, path) in enumerate(self.refs):
            n = self._count(path)
            if idx < 0 or idx >= n:
                raise InputError("%s: image %d@ requested but the stack holds %d images" % (path, idx + 1, n))

    def _open(self, path):
        if path not in self._maps:
            check_exists(path, "image stack")
            try:
                m = mrcfile.mmap(path, mode="r", permissive=True)
            except Exception as exc:
                raise InputError("%s: not a readable MRC stack (%s)" % (path, str(exc).splitlines()[0]))
            problem = _data_problem(m, path) or ("mode 101 (4-bit) holds movie frames, not particle images"
                                                 if int(m.header.mode) == 101 else None)
            if problem:
                m.close()
                raise InputError("%s: not a readable MRC stack (%s)" % (path, problem))
            self._maps[path] = m
        return _typed_data(self._maps[path])

    def _release(self, path, start, stop):
        """Drop images ``start:stop`` of ``path`` from this process's resident memory once copied out: the
        pages of a read-only mapping stay in the page cache, but the peak RSS stays that of one batch
        however many particles are streamed."""
        data = self._maps[path].data
        mapping = getattr(data, "_mmap", None)
        if mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        image_bytes = data[0].nbytes if data.ndim == 3 else data.nbytes
        mapped_from = data.offset - data.offset % mmap.ALLOCATIONGRANULARITY     # as numpy.memmap maps it
        first = data.offset - mapped_from + start * image_bytes
        begin = first - first % mmap.PAGESIZE
        mapping.madvise(mmap.MADV_DONTNEED, begin, data.offset - mapped_from + stop * image_bytes - begin)

    def _count(self, path):
        data = self._open(path)
        return 1 if data.ndim == 2 else data.shape[0]

    def __len__(self) -> int:
        return len(self.refs)

    def read(self, indices: Sequence[int], check_finite: bool = True) -> np.ndarray:
        """Return float32 images ``(len(indices), box, box)`` for positions ``indices`` of ``refs``."""
        out = np.empty((len(indices), self.box, self.box), dtype=np.float32)
        touched = {}
        for k, i in enumerate(indices):
            idx, path = self.refs[i]
            data = self._open(path)
            out[k] = data if data.ndim == 2 else data[idx]
            lo, hi = touched.get(path, (idx, idx))
            touched[path] = (min(lo, idx), max(hi, idx))
        for path, (lo, hi) in touched.items():
            self._release(path, lo, hi + 1)
        if check_finite and not np.isfinite(out).all():
            bad = [self.refs[indices[k]] for k in np.nonzero(~np.isfinite(out).reshape(len(out), -1).all(1))[0]]
            raise InputError("%s: image %d contains NaN or Inf values" % (bad[0][1], bad[0][0] + 1))
        if check_finite and len(out):
            flat = out.reshape(len(out), -1)
            const = np.nonzero(flat.max(axis=1) == flat.min(axis=1))[0]
            if len(const):
                idx, path = self.refs[indices[const[0]]]
                raise InputError("%s: image %d is constant (zero variance)" % (path, idx + 1))
        return out

    def batches(self, batch_size: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Yield ``(indices, images)`` over the whole stack in order, ``batch_size`` images at a time."""
        for start in range(0, len(self.refs), batch_size):
            idx = np.arange(start, min(start + batch_size, len(self.refs)))
            yield idx, self.read(idx)

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
