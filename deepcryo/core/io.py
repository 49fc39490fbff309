"""MRC/MRCS and STAR input/output: the interchange layer of every deepcryo program.

Conventions
-----------
* The particle interchange format is RELION 3.1 STAR: a ``data_optics`` block (``rlnOpticsGroup``,
  ``rlnImagePixelSize`` Å/px, ``rlnImageSize`` px, ``rlnVoltage`` kV, ``rlnSphericalAberration`` mm,
  ``rlnAmplitudeContrast``) and a ``data_particles`` block (``rlnImageName`` as ``i@stack.mrcs`` with a
  1-based index, ``rlnDefocusU/V`` Å, ``rlnDefocusAngle`` deg, ``rlnAngleRot/Tilt/Psi`` deg,
  ``rlnOriginXAngst/YAngst`` Å).
* RELION 3.0 files (one ``data_`` block, ``rlnOriginX/Y`` in pixels, acquisition values per particle) are
  read and converted to the 3.1 layout in memory.
* Image paths in a STAR file are relative to the STAR file's folder (or absolute). They are resolved for
  reading only: no program writes through a path taken from a STAR file.
* MRC files are read as float32 whatever their mode (0 int8, 1 int16, 2 float32, 6 uint16, 12 float16,
  101 4-bit), with or without an extended header (FEI1/FEI2, SerialEM). The pixel size is the header's
  x/y size; z = 0 (EPU micrographs, some stacks) means "not recorded"; a volume's voxels must be cubic.
* Every file is written atomically (temporary name in the same folder, then ``os.replace``), so a killed
  program never leaves a partial file under the final name.

All errors about the user's input raise :class:`InputError` with one line naming the file and the problem.
"""
import contextlib
import math
import os
import re
import tempfile
import warnings
from collections import OrderedDict

import mrcfile
import numpy as np
from emtable import Table

__all__ = ["InputError", "atomic_output", "read_mrc", "write_mrc", "read_mrc_header", "MRC_MODES", "ImageStack",
           "read_star", "write_star", "ParticleStar", "read_particles", "write_particles",
           "OPTICS_DEFAULTS"]


# mrcfile's own warnings about damaged files (e.g. "Expected N bytes in data block") would add lines to
# the one-line error each program prints; the damage is reported as an InputError instead
warnings.filterwarnings("ignore", category=RuntimeWarning, module="mrcfile")


class InputError(Exception):
    """A problem with the user's input; the message is one line that names the file and the problem."""


# ----------------------------------------------------------------------------------------------- files
@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error delete it."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=".%s." % base, suffix=".part" + ext, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it 0600; give it the mode open() would have
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _umask():
    """The process umask (read without changing it where /proc allows; else set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_error_reason(exc):
    """A short reason why ``torch.load(path, weights_only=True)`` refused a file (for one-line messages)."""
    text = str(exc)
    if "Unsupported global" in text:
        return "it holds Python objects, not plain weights: refused, loading it could run code"
    if "Weights only load failed" in text or "PytorchStreamReader" in text or "invalid load key" in text \
            or "zip archive" in text or "magic number" in text:
        return "not a torch weight file, or a truncated one"
    return (text.strip().splitlines() or [type(exc).__name__])[0][:100]


def _remove_matching(folder, pattern):
    removed = []
    for name in (os.listdir(folder) if os.path.isdir(folder) else []):
        if pattern.match(name):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


def remove_stale_parts(path):
    """Delete the temporary files that :func:`atomic_output` of ``path`` left behind when its process was
    killed (SIGKILL, power loss) before it could clean up; returns their names. Call it when resuming."""
    path = os.path.abspath(path)
    base, ext = os.path.splitext(os.path.basename(path))
    return _remove_matching(os.path.dirname(path), re.compile(r"^\.%s\.[A-Za-z0-9_]+\.part%s$"
                                                              % (re.escape(base), re.escape(ext))))


def remove_stale_parts_in(folder):
    """:func:`remove_stale_parts` for every file of ``folder`` (``.<name>.<random>.part[.<ext>]``, the names
    :func:`atomic_output` gives its temporaries); returns their names."""
    return _remove_matching(os.path.abspath(folder), re.compile(r"^\..+\.[A-Za-z0-9_]+\.part(\.[^.]+)?$"))


def _check_exists(path, what="file"):
    if not os.path.exists(path):
        raise InputError("%s: %s not found" % (path, what))


# ------------------------------------------------------------------------------------------------- MRC
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


def read_mrc_header(path):
    """Return ``(shape, pixel_size_A)`` of an MRC file without reading its data.

    ``shape`` is (nz, ny, nx) for volumes and stacks and (ny, nx) for single images; ``pixel_size_A`` as
    :func:`read_mrc`.
    """
    _check_exists(path, "MRC file")
    try:
        with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
            _open_checked(mrc, path, header_only=True)
            return mrcfile.utils.data_shape_from_header(mrc.header), _mrc_pixel_size_A(mrc, path)
    except InputError:
        raise
    except Exception as exc:  # mrcfile raises ValueError/OSError with many wordings
        raise _mrc_error(path, exc)


def read_mrc(path, check_finite=True):
    """Read a whole MRC file into float32. Returns ``(data, pixel_size_A)``.

    Any mode of :data:`MRC_MODES` is read (integers and float16 converted exactly to float32; IMOD's
    unsigned mode-0 bytes as unsigned); an extended header (FEI1/FEI2, SerialEM, ...) is skipped.
    ``pixel_size_A`` is the x/y size of the header (see :func:`_mrc_pixel_size_A` for z), 0.0 when the
    header records none: callers that need it say so.
    Raises InputError for a missing, truncated or non-MRC file, an unsupported mode, inconsistent voxel
    sizes, or (``check_finite``) NaN/Inf values.
    """
    _check_exists(path, "MRC file")
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


def write_mrc(path, data, pixel_size_A, is_stack=False):
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

    def __init__(self, refs):
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
            _check_exists(path, "image stack")
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

    def _count(self, path):
        data = self._open(path)
        return 1 if data.ndim == 2 else data.shape[0]

    def __len__(self):
        return len(self.refs)

    def read(self, indices, check_finite=True):
        """Return float32 images ``(len(indices), box, box)`` for positions ``indices`` of ``refs``."""
        out = np.empty((len(indices), self.box, self.box), dtype=np.float32)
        for k, i in enumerate(indices):
            idx, path = self.refs[i]
            data = self._open(path)
            out[k] = data if data.ndim == 2 else data[idx]
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

    def batches(self, batch_size):
        """Yield ``(indices, images)`` over the whole stack in order, ``batch_size`` images at a time."""
        for start in range(0, len(self.refs), batch_size):
            idx = np.arange(start, min(start + batch_size, len(self.refs)))
            yield idx, self.read(idx)

    def close(self):
        for m in self._maps.values():
            m.close()
        self._maps.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------------ STAR
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


def read_star(path):
    """Read every block of a STAR file: ``{block_name: OrderedDict(column -> np.ndarray)}``.

    Numeric columns become float64 arrays, the others object arrays of str.
    """
    _check_exists(path, "STAR file")
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


def _format_column(values):
    values = np.asarray(values)
    if values.dtype.kind in "iu":
        return ["%d" % v for v in values]
    if values.dtype.kind == "f":
        if np.all(np.isfinite(values)) and np.all(values == np.round(values)) and np.abs(values).max(initial=0) < 1e15:
            return ["%d" % v for v in values]
        return ["%.6f" % v for v in values]
    return [str(v) for v in values]


def write_star(path, blocks):
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


# ------------------------------------------------------------------------------------- particle tables
OPTICS_DEFAULTS = OrderedDict([("rlnVoltage", 300.0), ("rlnSphericalAberration", 2.7),
                               ("rlnAmplitudeContrast", 0.1)])

_PER_OPTICS = ["rlnImagePixelSize", "rlnImageSize", "rlnVoltage", "rlnSphericalAberration",
               "rlnAmplitudeContrast", "rlnImageDimensionality"]


class ParticleStar:
    """A RELION 3.1 particle table: ``optics`` and ``particles`` as ``{column: np.ndarray}``.

    ``directory`` is the folder image paths are relative to. Accessors return per-particle arrays with
    units in their names; optics values are broadcast to particles through ``rlnOpticsGroup``.
    """

    def __init__(self, optics, particles, directory="."):
        self.optics = OrderedDict(optics)
        self.particles = OrderedDict(particles)
        self.directory = os.path.abspath(directory)
        self.path = None  # the STAR file it was read from (for messages)

    def __len__(self):
        if "rlnImageName" in self.particles:
            return len(self.particles["rlnImageName"])
        return len(next(iter(self.particles.values()))) if self.particles else 0

    # -------------------------------------------------------------------- optics broadcast to particles
    def _optics_index(self):
        groups = np.asarray(self.particles.get("rlnOpticsGroup", np.ones(len(self))), dtype=np.int64)
        table = np.asarray(self.optics["rlnOpticsGroup"], dtype=np.int64)
        lookup = {g: i for i, g in enumerate(table)}
        try:
            return np.array([lookup[g] for g in groups], dtype=np.int64)
        except KeyError as exc:
            raise InputError("particle optics group %s is not in the data_optics table" % exc)

    def optics_value(self, column):
        """Per-particle value of an optics column (or of a particle column that overrides it)."""
        if column in self.particles:
            return np.asarray(self.particles[column], dtype=np.float64)
        if column not in self.optics:
            raise InputError("%s: no %s column (needed)" % (self.path or "STAR", column))
        return np.asarray(self.optics[column], dtype=np.float64)[self._optics_index()]

    @property
    def pixel_size_A(self):
        """Pixel size (Å/px) of the particle images; one value (mixed pixel sizes are refused)."""
        px = np.unique(self.optics_value("rlnImagePixelSize"))
        if len(px) != 1:
            raise InputError("particles have mixed pixel sizes %s Å/px; process each optics group apart"
                             % ", ".join("%.4g" % p for p in px))
        return float(px[0])

    @property
    def box_size(self):
        """Box size (px), from the optics table."""
        sizes = np.unique(self.optics_value("rlnImageSize"))
        if len(sizes) != 1:
            raise InputError("particles have mixed box sizes %s px" % ", ".join("%d" % s for s in sizes))
        return int(sizes[0])

    def require(self, *columns):
        """Raise InputError naming the missing particle columns."""
        missing = [c for c in columns if c not in self.particles and c not in self.optics]
        if missing:
            raise InputError("%s: no %s column%s (needed)" % (self.path or "STAR", ", ".join(missing),
                                                              "s" if len(missing) > 1 else ""))

    def ctf_params(self):
        """Per-particle CTF parameters as a dict of float arrays, ready for :func:`deepcryo.core.ctf.ctf_2d`."""
        self.require("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
        n = len(self)
        p = self.particles
        return {
            "defocus_u_A": np.asarray(p["rlnDefocusU"], dtype=np.float64),
            "defocus_v_A": np.asarray(p["rlnDefocusV"], dtype=np.float64),
            "defocus_angle_deg": np.asarray(p["rlnDefocusAngle"], dtype=np.float64),
            "voltage_kV": self.optics_value("rlnVoltage"),
            "cs_mm": self.optics_value("rlnSphericalAberration"),
            "amplitude_contrast": self.optics_value("rlnAmplitudeContrast"),
            "phase_shift_deg": np.asarray(p.get("rlnPhaseShift", np.zeros(n)), dtype=np.float64),
            "bfactor_A2": np.asarray(p.get("rlnCtfBfactor", np.zeros(n)), dtype=np.float64),
        }

    def has_ctf(self):
        return all(c in self.particles for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"))

    def has_poses(self):
        return all(c in self.particles for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))

    def angles_deg(self):
        """(N, 3) Euler angles rot, tilt, psi in degrees (RELION ZYZ convention)."""
        self.require("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
        return np.stack([np.asarray(self.particles[c], dtype=np.float64)
                         for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")], axis=1)

    def origins_A(self):
        """(N, 2) origins x, y in Å (zeros where absent): the shift that brings the particle to the box centre."""
        n = len(self)
        return np.stack([np.asarray(self.particles.get(c, np.zeros(n)), dtype=np.float64)
                         for c in ("rlnOriginXAngst", "rlnOriginYAngst")], axis=1)

    def set_poses(self, angles_deg, origins_A=None):
        """Store (N, 3) angles in degrees and (N, 2) origins in Å."""
        angles_deg = np.asarray(angles_deg, dtype=np.float64)
        for i, c in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
            self.particles[c] = angles_deg[:, i]
        if origins_A is not None:
            origins_A = np.asarray(origins_A, dtype=np.float64)
            self.particles["rlnOriginXAngst"] = origins_A[:, 0]
            self.particles["rlnOriginYAngst"] = origins_A[:, 1]

    def image_refs(self):
        """List of ``(index0, absolute_path)`` for every particle (``i@path`` is 1-based in the STAR)."""
        self.require("rlnImageName")
        refs = []
        for name in self.particles["rlnImageName"]:
            name = str(name)
            if "@" in name:
                idx, path = name.split("@", 1)
                try:
                    idx0 = int(idx) - 1
                except ValueError:
                    raise InputError("bad rlnImageName %r (expected N@stack.mrcs)" % name)
            else:
                idx0, path = 0, name
            if not os.path.isabs(path):
                path = os.path.join(self.directory, path)
            refs.append((idx0, os.path.normpath(path)))
        return refs

    def open_images(self):
        """An :class:`ImageStack` over this table's images (validates files, indices and box sizes)."""
        stack = ImageStack(self.image_refs())
        if "rlnImageSize" in self.optics and stack.box != self.box_size:
            raise InputError("image box %d px differs from rlnImageSize %d of the STAR file"
                             % (stack.box, self.box_size))
        return stack

    def subset(self, index):
        """A new table with the particles at ``index`` (indices or boolean mask)."""
        index = np.asarray(index)
        parts = OrderedDict((k, np.asarray(v)[index]) for k, v in self.particles.items())
        return ParticleStar(self.optics, parts, self.directory)

    def copy(self):
        return ParticleStar(OrderedDict((k, np.array(v)) for k, v in self.optics.items()),
                            OrderedDict((k, np.array(v)) for k, v in self.particles.items()), self.directory)

    def relative_to(self, directory):
        """A copy whose image names are rewritten relative to ``directory`` (for writing elsewhere)."""
        out = self.copy()
        directory = os.path.abspath(directory)
        names = []
        for idx0, path in self.image_refs():
            names.append("%06d@%s" % (idx0 + 1, os.path.relpath(path, directory)))
        out.particles["rlnImageName"] = np.asarray(names, dtype=object)
        out.directory = directory
        return out


def _convert_relion30(cols, path):
    """Build (optics, particles) in the 3.1 layout from a RELION 3.0 single-block table."""
    n = len(next(iter(cols.values())))
    if "rlnDetectorPixelSize" in cols and "rlnMagnification" in cols:
        px = np.asarray(cols["rlnDetectorPixelSize"]) * 1e4 / np.asarray(cols["rlnMagnification"])
    elif "rlnImagePixelSize" in cols:
        px = np.asarray(cols["rlnImagePixelSize"], dtype=np.float64)
    else:
        raise InputError("%s: RELION 3.0 STAR without pixel size (rlnDetectorPixelSize and rlnMagnification)"
                         % path)
    keys = [np.round(px, 6)]
    for c in OPTICS_DEFAULTS:
        keys.append(np.asarray(cols[c], dtype=np.float64) if c in cols else np.full(n, OPTICS_DEFAULTS[c]))
    key_rows = list(zip(*keys))
    groups = OrderedDict()
    for k in key_rows:
        groups.setdefault(k, len(groups) + 1)
    group_of = np.array([groups[k] for k in key_rows], dtype=np.int64)
    optics = OrderedDict()
    optics["rlnOpticsGroupName"] = np.array(["opticsGroup%d" % g for g in groups.values()], dtype=object)
    optics["rlnOpticsGroup"] = np.array(list(groups.values()), dtype=np.int64)
    optics["rlnImagePixelSize"] = np.array([k[0] for k in groups])
    for i, c in enumerate(OPTICS_DEFAULTS):
        optics[c] = np.array([k[i + 1] for k in groups])
    drop = {"rlnDetectorPixelSize", "rlnMagnification", "rlnImagePixelSize", "rlnOriginX", "rlnOriginY",
            *OPTICS_DEFAULTS}
    particles = OrderedDict((k, v) for k, v in cols.items() if k not in drop)
    for axis in "XY":
        if "rlnOrigin" + axis in cols:
            particles["rlnOrigin%sAngst" % axis] = np.asarray(cols["rlnOrigin" + axis], dtype=np.float64) * px
    particles["rlnOpticsGroup"] = group_of
    return optics, particles


def read_particles(path, require_images=True):
    """Read a particle STAR file (RELION 3.1, or 3.0 converted) into a :class:`ParticleStar`.

    With ``require_images`` the ``rlnImageName`` column must exist and the optics table gets
    ``rlnImageSize`` from the image headers when it lacks it.
    """
    blocks = read_star(path)
    directory = os.path.dirname(os.path.abspath(path))
    if "particles" in blocks:
        particles = blocks["particles"]
        if "optics" not in blocks:
            raise InputError("%s: RELION 3.1 data_particles block without a data_optics block" % path)
        optics = blocks["optics"]
        for c in ("rlnOpticsGroup", "rlnImagePixelSize"):
            if c not in optics:
                raise InputError("%s: data_optics has no %s column (needed)" % (path, c))
        for c, default in OPTICS_DEFAULTS.items():
            if c not in optics:
                raise InputError("%s: data_optics has no %s column (needed)" % (path, c))
    else:
        cols = next(iter(blocks.values()))
        if not cols:
            raise InputError("%s: empty STAR table" % path)
        optics, particles = _convert_relion30(cols, path)
    star = ParticleStar(optics, particles, directory)
    star.path = path
    if len(star) == 0:
        raise InputError("%s: the particle table is empty" % path)
    if require_images:
        if "rlnImageName" not in particles:
            raise InputError("%s: no rlnImageName column (needed)" % path)
        if "rlnImageSize" not in star.optics:
            boxes = []
            for g in np.asarray(star.optics["rlnOpticsGroup"], dtype=np.int64):
                sel = np.nonzero(np.asarray(star.particles.get("rlnOpticsGroup", np.ones(len(star))),
                                            dtype=np.int64) == g)[0]
                if len(sel) == 0:
                    boxes.append(0)
                    continue
                idx0, fn = star.image_refs()[sel[0]]
                boxes.append(read_mrc_header(fn)[0][-1])
            star.optics["rlnImageSize"] = np.asarray(boxes, dtype=np.int64)
    voltage = star.optics_value("rlnVoltage")
    if np.any(voltage <= 0):
        raise InputError("%s: voltage must be > 0 kV (found %g)" % (path, voltage.min()))
    if np.any(star.optics_value("rlnSphericalAberration") < 0):
        raise InputError("%s: spherical aberration must be >= 0 mm" % path)
    if np.any(star.optics_value("rlnImagePixelSize") <= 0):
        raise InputError("%s: pixel size must be > 0 Å/px" % path)
    return star


def write_particles(path, star):
    """Write a :class:`ParticleStar` as RELION 3.1 STAR (atomic); image names are made relative to the
    output folder when they lie below it, absolute otherwise."""
    out_dir = os.path.dirname(os.path.abspath(path))
    names = []
    if "rlnImageName" in star.particles:
        for idx0, p in star.image_refs():
            rel = os.path.relpath(p, out_dir)
            names.append("%06d@%s" % (idx0 + 1, p if rel.startswith("..") else rel))
    particles = OrderedDict(star.particles)
    if names:
        particles["rlnImageName"] = np.asarray(names, dtype=object)
    optics = OrderedDict(star.optics)
    optics.setdefault("rlnImageDimensionality", np.full(len(optics["rlnOpticsGroup"]), 2, dtype=np.int64))
    if "rlnOpticsGroup" not in particles:
        particles["rlnOpticsGroup"] = np.ones(len(star), dtype=np.int64)
    write_star(path, OrderedDict([("optics", optics), ("particles", particles)]))


def make_optics(pixel_size_A, box_size, voltage_kV=300.0, cs_mm=2.7, amplitude_contrast=0.1):
    """A one-group ``data_optics`` table."""
    return OrderedDict([
        ("rlnOpticsGroupName", np.array(["opticsGroup1"], dtype=object)),
        ("rlnOpticsGroup", np.array([1])),
        ("rlnImagePixelSize", np.array([float(pixel_size_A)])),
        ("rlnImageSize", np.array([int(box_size)])),
        ("rlnImageDimensionality", np.array([2])),
        ("rlnVoltage", np.array([float(voltage_kV)])),
        ("rlnSphericalAberration", np.array([float(cs_mm)])),
        ("rlnAmplitudeContrast", np.array([float(amplitude_contrast)])),
    ])


__all__.append("make_optics")
