"""Particle tables: the RELION 3.1 particle STAR file as a :class:`ParticleStar`.

Conventions
-----------
* The particle interchange format is RELION 3.1 STAR: a ``data_optics`` block (``rlnOpticsGroup``,
  ``rlnImagePixelSize`` Å/px, ``rlnImageSize`` px, ``rlnVoltage`` kV, ``rlnSphericalAberration`` mm,
  ``rlnAmplitudeContrast``) and a ``data_particles`` block (``rlnImageName`` as ``i@stack.mrcs`` with a
  1-based index, ``rlnDefocusU/V`` Å, ``rlnDefocusAngle`` deg, ``rlnAngleRot/Tilt/Psi`` deg,
  ``rlnOriginXAngst/YAngst`` Å).
* RELION 3.0 files (one ``data_`` block, ``rlnOriginX/Y`` in pixels, acquisition values per particle) are
  read and converted to the 3.1 layout in memory; deepcryo always writes 3.1.
* Image paths in a STAR file are relative to the STAR file's folder (or absolute). They are resolved for
  reading only: no program writes through a path taken from a STAR file.

All errors about the user's input raise :class:`~deepcryo.core.errors.InputError` naming the file.
"""
import os
from collections import OrderedDict
from typing import Dict, List, Mapping, Tuple

import numpy as np

from .errors import InputError
from .mrc import ImageStack, read_mrc_header
from .star import read_star, write_star

__all__ = ["OPTICS_DEFAULTS", "ParticleStar", "read_particles", "write_particles", "make_optics"]

#: Acquisition columns every optics group needs, with the values a RELION 3.0 file that lacks them gets
#: (RELION's own defaults); a RELION 3.1 ``data_optics`` block must hold them.
OPTICS_DEFAULTS = OrderedDict([("rlnVoltage", 300.0), ("rlnSphericalAberration", 2.7),
                               ("rlnAmplitudeContrast", 0.1)])


class ParticleStar:
    """A RELION 3.1 particle table: ``optics`` and ``particles`` as ``{column: np.ndarray}``.

    ``directory`` is the folder image paths are relative to. Accessors return per-particle arrays with
    units in their names; optics values are broadcast to particles through ``rlnOpticsGroup``.
    """

    def __init__(self, optics: Mapping[str, np.ndarray], particles: Mapping[str, np.ndarray],
                 directory: str = "."):
        self.optics = OrderedDict(optics)
        self.particles = OrderedDict(particles)
        self.directory = os.path.abspath(directory)
        self.path = None  # the STAR file it was read from (for messages)

    def __len__(self) -> int:
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

    def optics_value(self, column: str) -> np.ndarray:
        """Per-particle value of an optics column (or of a particle column that overrides it)."""
        if column in self.particles:
            return np.asarray(self.particles[column], dtype=np.float64)
        if column not in self.optics:
            raise InputError("%s: no %s column (needed)" % (self.path or "STAR", column))
        return np.asarray(self.optics[column], dtype=np.float64)[self._optics_index()]

    @property
    def pixel_size_A(self) -> float:
        """Pixel size (Å/px) of the particle images; one value (mixed pixel sizes are refused)."""
        px = np.unique(self.optics_value("rlnImagePixelSize"))
        if len(px) != 1:
            raise InputError("particles have mixed pixel sizes %s Å/px; process each optics group apart"
                             % ", ".join("%.4g" % p for p in px))
        return float(px[0])

    @property
    def box_size(self) -> int:
        """Box size (px), from the optics table."""
        sizes = np.unique(self.optics_value("rlnImageSize"))
        if len(sizes) != 1:
            raise InputError("particles have mixed box sizes %s px" % ", ".join("%d" % s for s in sizes))
        return int(sizes[0])

    def require(self, *columns: str) -> None:
        """Raise InputError naming the missing particle columns."""
        missing = [c for c in columns if c not in self.particles and c not in self.optics]
        if missing:
            raise InputError("%s: no %s column%s (needed)" % (self.path or "STAR", ", ".join(missing),
                                                              "s" if len(missing) > 1 else ""))

    def ctf_params(self) -> Dict[str, np.ndarray]:
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

    def has_ctf(self) -> bool:
        """True when every particle has defocus U, V and angle."""
        return all(c in self.particles for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"))

    def has_poses(self) -> bool:
        """True when every particle has Euler angles rot, tilt and psi."""
        return all(c in self.particles for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))

    def angles_deg(self) -> np.ndarray:
        """(N, 3) Euler angles rot, tilt, psi in degrees (RELION ZYZ convention)."""
        self.require("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
        return np.stack([np.asarray(self.particles[c], dtype=np.float64)
                         for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")], axis=1)

    def origins_A(self) -> np.ndarray:
        """(N, 2) origins x, y in Å (zeros where absent): the shift that brings the particle to the box centre."""
        n = len(self)
        return np.stack([np.asarray(self.particles.get(c, np.zeros(n)), dtype=np.float64)
                         for c in ("rlnOriginXAngst", "rlnOriginYAngst")], axis=1)

    def set_poses(self, angles_deg, origins_A=None) -> None:
        """Store (N, 3) angles in degrees and (N, 2) origins in Å."""
        angles_deg = np.asarray(angles_deg, dtype=np.float64)
        for i, c in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
            self.particles[c] = angles_deg[:, i]
        if origins_A is not None:
            origins_A = np.asarray(origins_A, dtype=np.float64)
            self.particles["rlnOriginXAngst"] = origins_A[:, 0]
            self.particles["rlnOriginYAngst"] = origins_A[:, 1]

    def image_refs(self) -> List[Tuple[int, str]]:
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

    def open_images(self) -> ImageStack:
        """An :class:`ImageStack` over this table's images (validates files, indices and box sizes)."""
        stack = ImageStack(self.image_refs())
        if "rlnImageSize" in self.optics and stack.box != self.box_size:
            raise InputError("image box %d px differs from rlnImageSize %d of the STAR file"
                             % (stack.box, self.box_size))
        return stack

    def subset(self, index) -> "ParticleStar":
        """A new table with the particles at ``index`` (indices or boolean mask)."""
        index = np.asarray(index)
        parts = OrderedDict((k, np.asarray(v)[index]) for k, v in self.particles.items())
        return ParticleStar(self.optics, parts, self.directory)

    def copy(self) -> "ParticleStar":
        """A deep copy of both tables (the arrays too)."""
        return ParticleStar(OrderedDict((k, np.array(v)) for k, v in self.optics.items()),
                            OrderedDict((k, np.array(v)) for k, v in self.particles.items()), self.directory)


def _convert_relion30(cols: Mapping[str, np.ndarray],
                      path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
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


def read_particles(path: str, require_images: bool = True) -> ParticleStar:
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
        for c in ("rlnOpticsGroup", "rlnImagePixelSize", *OPTICS_DEFAULTS):
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


def write_particles(path: str, star: ParticleStar) -> None:
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


def make_optics(pixel_size_A: float, box_size: int, voltage_kV: float = 300.0, cs_mm: float = 2.7,
                amplitude_contrast: float = 0.1) -> Dict[str, np.ndarray]:
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
