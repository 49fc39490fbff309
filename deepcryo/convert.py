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
"""Conversion between Scipion objects and deepcryo's files (RELION 3.1 STAR, MRC); pure functions.

Conventions
-----------
* Particle STAR files are RELION 3.1 (``data_optics`` + ``data_particles``), written and read through
  :mod:`deepcryo.core.particles`. Image names are ``i@/absolute/stack.mrcs`` (1-based ``i``) or relative to the
  STAR folder; stacks that mrcfile cannot read (SPIDER ``.stk``, ``.spi``, ...) are converted to
  ``.mrcs`` under an output folder. ``rlnImageId`` holds the Scipion item id, so a program's output
  STAR can be matched back to the input set even when it drops or reorders particles.
* CTF: defocus U/V in Å (positive underfocus), astigmatism angle in degrees: the same numbers in
  Scipion's ``CTFModel`` and in RELION, no conversion.
* Projection alignment (``ALIGN_PROJ``): RELION stores Euler angles (rot, tilt, psi), in degrees, whose
  matrix ``A`` (:func:`deepcryo.core.euler.euler_to_matrix`, numpy: this module runs without torch) maps
  volume to projection coordinates, and the origin ``o`` (``rlnOriginX/YAngst``), the shift that brings the particle to the box centre.
  Scipion stores the 4×4 matrix ``M = inv([[A, -o/px], [0, 1]]) = [[Aᵀ, Aᵀ·o/px], [0, 1]]`` (shifts in
  pixels), exactly as scipion-em-relion's ``convert31`` reader, whose formula is
  ``inv(euler_matrix(-rot, -tilt, -psi, 'szyz'))`` with translation ``-shifts``.
"""
import os
from collections import OrderedDict

import mrcfile
import numpy as np

import pwem
import pyworkflow.object as pwobj
from pwem.emlib.image import ImageHandler
from pwem.objects import FSC, Transform

from deepcryo.constants import RANDOM_SUBSET_ATTR
from deepcryo.core import euler
from deepcryo.core.errors import InputError
from deepcryo.core.resolution import fsc_resolution_A
from deepcryo.core.mrc import read_mrc, read_mrc_header, write_mrc
from deepcryo.core.particles import ParticleStar, read_particles, write_particles
from deepcryo.core.star import read_star, write_star

__all__ = ["projectionMatrices", "posesFromMatrices", "rowToAlignment", "alignmentToRow",
           "writeSetOfParticles", "updateParticlesFromStar", "writeSetOfMicrographs", "readCtfStar",
           "ctfRowToModel", "convertVolume", "readFscStar"]

MRC_EXTENSIONS = (".mrc", ".mrcs", ".map", ".st", ".ali")


# ------------------------------------------------------------------------------------------- alignment
def projectionMatrices(angles_deg, origins_px):
    """Scipion ``ALIGN_PROJ`` matrices (N, 4, 4) from RELION poses.

    Args:
        angles_deg: (N, 3) rot, tilt, psi in degrees (RELION ZYZ convention).
        origins_px: (N, 2) origins x, y in pixels (RELION ``rlnOriginX/YAngst`` / pixel size).
    """
    a = euler.euler_to_matrix(np.asarray(angles_deg, dtype=np.float64).reshape(-1, 3))
    o = np.zeros((len(a), 3))
    o[:, :2] = np.asarray(origins_px, dtype=np.float64).reshape(-1, 2)
    m = np.zeros((len(a), 4, 4))
    m[:, :3, :3] = a.transpose(0, 2, 1)
    m[:, :3, 3] = np.einsum("nji,nj->ni", a, o)
    m[:, 3, 3] = 1.0
    return m


def posesFromMatrices(matrices):
    """Inverse of :func:`projectionMatrices`: (N, 4, 4) → angles (N, 3) deg and origins (N, 2) px.

    Tilt is returned in [0, 180] (RELION's choice); other equivalent Euler triplets give the same
    matrix. The z component of the origin is dropped (particles are 2D images).
    """
    inv = np.linalg.inv(np.asarray(matrices, dtype=np.float64).reshape(-1, 4, 4))
    angles = euler.matrix_to_euler(inv[:, :3, :3])
    return angles, -inv[:, :2, 3]


def rowToAlignment(row, pixelSize):
    """Scipion ``Transform`` (ALIGN_PROJ) from a STAR row (mapping with ``rlnAngleRot/Tilt/Psi`` in
    degrees and optional ``rlnOriginXAngst/YAngst`` in Å); ``pixelSize`` in Å/px."""
    angles = [float(row[c]) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")]
    origins = [float(row.get(c, 0.0)) / pixelSize for c in ("rlnOriginXAngst", "rlnOriginYAngst")]
    return Transform(projectionMatrices([angles], [origins])[0])


def alignmentToRow(transform, row, pixelSize):
    """Write a Scipion ``Transform`` (ALIGN_PROJ) into ``row`` (a dict): ``rlnAngleRot/Tilt/Psi``
    (degrees) and ``rlnOriginXAngst/YAngst`` (Å, with ``pixelSize`` in Å/px). Returns ``row``."""
    angles, origins = posesFromMatrices(transform.getMatrix()[None])
    row["rlnAngleRot"], row["rlnAngleTilt"], row["rlnAnglePsi"] = (float(v) for v in angles[0])
    row["rlnOriginXAngst"], row["rlnOriginYAngst"] = (float(v) * pixelSize for v in origins[0])
    return row


# ---------------------------------------------------------------------------------------------- images
def _stripFormat(fileName):
    """``stack.mrc:mrcs`` → ``stack.mrc`` (Scipion's format suffix)."""
    return ImageHandler.removeFileType(fileName)


def _checkedMrc(fileName):
    """Absolute path of ``fileName`` (format suffix removed) when it is an MRC file, None when it is
    another format. Raises InputError for a missing file or an unreadable (truncated) MRC file."""
    path = os.path.abspath(_stripFormat(fileName))
    if not os.path.exists(path):
        raise InputError("%s: file not found" % path)
    if os.path.splitext(path)[1].lower() not in MRC_EXTENSIONS:
        return None
    read_mrc_header(path)
    return path


def _mrcStacks(fileNames, outputDir, pixelSize):
    """Map each image file to an MRC path (absolute): itself when it is MRC, else a ``.mrcs``
    converted into ``outputDir`` with Scipion's ImageHandler (same image order)."""
    paths = {}
    for fn in fileNames:
        paths[fn] = _checkedMrc(fn)
        if paths[fn] is not None:
            continue
        if outputDir is None:
            raise InputError("%s: not an MRC file; give an output folder to convert it" % fn)
        os.makedirs(outputDir, exist_ok=True)
        base = os.path.splitext(os.path.basename(_stripFormat(fn)))[0]
        out = os.path.abspath(os.path.join(outputDir, "%s_%03d.mrcs" % (base, len(paths))))
        ImageHandler().convertStack(os.path.abspath(_stripFormat(fn)), out)
        _setMrcPixelSize(out, pixelSize)
        paths[fn] = out
    return paths


def _setMrcPixelSize(path, pixelSize):
    with mrcfile.open(path, mode="r+", permissive=True) as mrc:
        mrc.voxel_size = pixelSize


# ------------------------------------------------------------------------------------------- particles
def _acquisitionKey(img, fallback):
    """(voltage kV, Cs mm, amplitude contrast) of an image, or of its set when the image has none."""
    for acq in (img.getAcquisition(), fallback):
        if acq is not None and acq.getVoltage() is not None:
            return (float(acq.getVoltage()), float(acq.getSphericalAberration()),
                    float(acq.getAmplitudeContrast()))
    raise InputError("image %s has no acquisition (voltage, Cs, amplitude contrast)" % img.getObjId())


def _opticsTable(keys, pixelSizeColumn, pixelSize, extra=None):
    """A ``data_optics`` table, one group per acquisition key (voltage, Cs, amplitude contrast)."""
    n = len(keys)
    optics = OrderedDict()
    optics["rlnOpticsGroupName"] = np.array(["opticsGroup%d" % (g + 1) for g in range(n)], dtype=object)
    optics["rlnOpticsGroup"] = np.arange(1, n + 1)
    optics[pixelSizeColumn] = np.full(n, float(pixelSize))
    for column, values in (extra or {}).items():
        optics[column] = values
    optics["rlnVoltage"] = np.array([k[0] for k in keys])
    optics["rlnSphericalAberration"] = np.array([k[1] for k in keys])
    optics["rlnAmplitudeContrast"] = np.array([k[2] for k in keys])
    return optics


def writeSetOfParticles(partSet, starFn, outputDir=None, alignType=None):
    """Write the enabled particles of ``partSet`` as a RELION 3.1 STAR file ``starFn``.

    Columns: ``rlnImageName``, ``rlnImageId`` (Scipion id), ``rlnOpticsGroup``; the CTF
    (``rlnDefocusU/V/Angle``, ``rlnPhaseShift`` when set) when the set has CTF; the poses
    (``rlnAngleRot/Tilt/Psi``, ``rlnOriginX/YAngst``) with ``ALIGN_PROJ``; ``rlnRandomSubset`` when the
    particles carry ``_rlnRandomSubset``. One optics group per distinct acquisition.

    Args:
        partSet: SetOfParticles (all particles share its sampling rate).
        starFn: output STAR path.
        outputDir: folder for ``.mrcs`` copies of stacks mrcfile cannot read (required only then).
        alignType: ``pwem.ALIGN_PROJ`` or ``pwem.ALIGN_NONE`` (default: the set's alignment; other
            alignment types must be dropped explicitly with ``ALIGN_NONE``).
    """
    alignType = partSet.getAlignment() if alignType is None else alignType
    if alignType not in (pwem.ALIGN_PROJ, pwem.ALIGN_NONE):
        raise InputError("particles with %s alignment cannot be written as poses; only projection "
                            "alignment (3D angles) is supported" % alignType)
    pixelSize = partSet.getSamplingRate()
    if not pixelSize or pixelSize <= 0:
        raise InputError("the particle set has no sampling rate")
    withCtf = partSet.hasCTF()
    setAcq = partSet.getAcquisition()

    locations, ids, keys, ctfs, matrices, subsets = [], [], [], [], [], []
    for part in partSet.iterItems(orderBy="id"):
        if not part.isEnabled():
            continue
        ids.append(part.getObjId())
        locations.append(part.getLocation())
        keys.append(_acquisitionKey(part, setAcq))
        if withCtf:
            ctf = part.getCTF()
            ctfs.append((ctf.getDefocusU(), ctf.getDefocusV(), ctf.getDefocusAngle(),
                         ctf.getPhaseShift() or 0.0))
        if alignType == pwem.ALIGN_PROJ:
            if part.getTransform() is None:
                raise InputError("particle %d has no alignment (projection alignment expected)"
                                    % part.getObjId())
            matrices.append(np.array(part.getTransform().getMatrix()))  # items are a reused template
        if part.hasAttribute(RANDOM_SUBSET_ATTR):
            subsets.append(int(getattr(part, RANDOM_SUBSET_ATTR).get()))
    if not ids:
        raise InputError("the particle set is empty")
    if subsets and len(subsets) != len(ids):
        raise InputError("only some particles have a random subset (%s)" % RANDOM_SUBSET_ATTR)

    stacks = _mrcStacks(OrderedDict.fromkeys(fn for _, fn in locations), outputDir, pixelSize)
    box = read_mrc_header(stacks[locations[0][1]])[0][-1]
    groupOf = OrderedDict()
    for k in keys:
        groupOf.setdefault(k, len(groupOf) + 1)

    particles = OrderedDict()
    particles["rlnImageName"] = np.array(["%06d@%s" % (max(index, 1), stacks[fn]) for index, fn in locations],
                                         dtype=object)
    particles["rlnImageId"] = np.asarray(ids, dtype=np.int64)
    particles["rlnOpticsGroup"] = np.array([groupOf[k] for k in keys], dtype=np.int64)
    if withCtf:
        ctfs = np.asarray(ctfs, dtype=np.float64)
        particles["rlnDefocusU"], particles["rlnDefocusV"], particles["rlnDefocusAngle"] = ctfs[:, :3].T
        if np.any(ctfs[:, 3] != 0):
            particles["rlnPhaseShift"] = ctfs[:, 3]
    if alignType == pwem.ALIGN_PROJ:
        angles, origins = posesFromMatrices(np.stack(matrices))
        particles["rlnAngleRot"], particles["rlnAngleTilt"], particles["rlnAnglePsi"] = angles.T
        particles["rlnOriginXAngst"], particles["rlnOriginYAngst"] = (origins * pixelSize).T
    if subsets:
        particles["rlnRandomSubset"] = np.asarray(subsets, dtype=np.int64)

    optics = _opticsTable(list(groupOf), "rlnImagePixelSize", pixelSize,
                          {"rlnImageSize": np.full(len(groupOf), box, dtype=np.int64),
                           "rlnImageDimensionality": np.full(len(groupOf), 2, dtype=np.int64)})
    write_particles(starFn, ParticleStar(optics, particles, os.path.dirname(os.path.abspath(starFn))))


def updateParticlesFromStar(inputSet, starFn, outputSet, extraColumns=()):
    """Fill ``outputSet`` with the particles of ``inputSet`` updated from a particle STAR file.

    STAR rows are matched to particles by ``rlnImageId`` (Scipion id) when present, otherwise by
    order (then the STAR must have one row per enabled particle). Particles without a row are
    dropped. Updated: the projection alignment (when the STAR has angles; the set becomes
    ``ALIGN_PROJ``), the half set ``_rlnRandomSubset`` (``rlnRandomSubset``), and each column of
    ``extraColumns`` as a Float attribute ``_<column>``.
    """
    star = read_particles(starFn, require_images=False)
    pixelSize = inputSet.getSamplingRate()
    if star.has_poses() and abs(star.pixel_size_A - pixelSize) > 1e-3 * pixelSize:
        raise InputError("%s: pixel size %.4f Å differs from the particles' %.4f Å"
                            % (starFn, star.pixel_size_A, pixelSize))
    for column in extraColumns:
        star.require(column)
    if "rlnImageId" in star.particles:
        ids = np.asarray(star.particles["rlnImageId"], dtype=np.int64)
    else:
        ids = np.array([p.getObjId() for p in inputSet.iterItems(orderBy="id") if p.isEnabled()])
        if len(ids) != len(star):
            raise InputError("%s: %d rows for %d particles and no rlnImageId column to match them"
                                % (starFn, len(star), len(ids)))
    rowOf = {int(i): r for r, i in enumerate(ids)}
    matrices = projectionMatrices(star.angles_deg(), star.origins_A() / pixelSize) if star.has_poses() else None
    subsets = star.particles.get("rlnRandomSubset")
    extras = {c: np.asarray(star.particles[c], dtype=np.float64) for c in extraColumns}

    def updateItem(item, _row=None):
        r = rowOf.get(item.getObjId())
        if r is None:
            item._appendItem = False
            return
        if matrices is not None:
            item.setTransform(Transform(matrices[r]))
        if subsets is not None:
            setattr(item, RANDOM_SUBSET_ATTR, pwobj.Integer(int(subsets[r])))
        for column, values in extras.items():
            setattr(item, "_" + column, pwobj.Float(float(values[r])))

    outputSet.copyInfo(inputSet)
    if matrices is not None:
        outputSet.setAlignmentProj()
    outputSet.copyItems(inputSet, updateItemCallback=updateItem)


def splitParticlesStar(starFn, outFn, chunk, chunks):
    """Write part ``chunk`` (0-based) of ``chunks`` consecutive, near-equal parts of the particles of
    ``starFn`` (``numpy.array_split`` order) to ``outFn``."""
    star = read_particles(starFn)
    write_particles(outFn, star.subset(np.array_split(np.arange(len(star)), chunks)[chunk]))


def mergeParticlesStars(starFns, outFn):
    """Concatenate the particles of ``starFns`` (same columns; optics of the first) in order into ``outFn``."""
    parts = [read_particles(fn, require_images=False) for fn in starFns]
    merged = parts[0].copy()
    for column in merged.particles:
        merged.particles[column] = np.concatenate([np.asarray(p.particles[column]) for p in parts])
    write_particles(outFn, merged)


# ----------------------------------------------------------------------------------------- micrographs
def writeSetOfMicrographs(micSet, starFn):
    """Write the enabled micrographs as a RELION 3.1 micrograph STAR (``data_optics`` with
    ``rlnMicrographPixelSize`` Å/px, voltage, Cs, amplitude contrast; ``data_micrographs`` with
    absolute ``rlnMicrographName`` and ``rlnOpticsGroup``)."""
    pixelSize = micSet.getSamplingRate()
    if not pixelSize or pixelSize <= 0:
        raise InputError("the micrograph set has no sampling rate")
    setAcq = micSet.getAcquisition()
    names, keys = [], []
    for mic in micSet.iterItems(orderBy="id"):
        if mic.isEnabled():
            path = os.path.abspath(_stripFormat(mic.getFileName()))
            if not os.path.exists(path):
                raise InputError("%s: micrograph file not found" % path)
            names.append(path)
            keys.append(_acquisitionKey(mic, setAcq))
    if not names:
        raise InputError("the micrograph set is empty")
    groupOf = OrderedDict()
    for k in keys:
        groupOf.setdefault(k, len(groupOf) + 1)
    optics = _opticsTable(list(groupOf), "rlnMicrographPixelSize", pixelSize)
    micrographs = OrderedDict([("rlnMicrographName", np.array(names, dtype=object)),
                               ("rlnOpticsGroup", np.array([groupOf[k] for k in keys], dtype=np.int64))])
    write_star(starFn, OrderedDict([("optics", optics), ("micrographs", micrographs)]))


def writeMicrographListStar(starFn, mics, acquisition, samplingRate):
    """Write ``mics`` (a list of Micrographs) as a RELION micrograph STAR with one table and the acquisition
    on every row: absolute ``rlnMicrographName``, ``rlnMicrographPixelSize`` (Å/px), ``rlnVoltage`` (kV),
    ``rlnSphericalAberration`` (mm), ``rlnAmplitudeContrast``; the input of ``deepcryo.defocus predict``."""
    cols = OrderedDict([
        ("rlnMicrographName", np.array([os.path.abspath(m.getFileName()) for m in mics], dtype=object)),
        ("rlnMicrographPixelSize", np.full(len(mics), samplingRate)),
        ("rlnVoltage", np.full(len(mics), acquisition.getVoltage())),
        ("rlnSphericalAberration", np.full(len(mics), acquisition.getSphericalAberration())),
        ("rlnAmplitudeContrast", np.full(len(mics), acquisition.getAmplitudeContrast()))])
    write_star(starFn, OrderedDict([("micrographs", cols)]))


def writeCtfLabelsStar(ctfSet, starFn):
    """Write the enabled CTFs of ``ctfSet`` that have a micrograph as a RELION micrograph STAR of defocus
    labels (``rlnDefocusU/V`` Å, ``rlnDefocusAngle`` deg, pixel size, voltage, Cs of the micrographs), in id
    order; the input of ``deepcryo.defocus train --star``."""
    mics = ctfSet.getMicrographs()
    acq = mics.getAcquisition()
    names, u, v, a = [], [], [], []
    for ctf in ctfSet.iterItems(orderBy="id"):
        mic = ctf.getMicrograph()
        if mic is None or not ctf.isEnabled():
            continue
        names.append(os.path.abspath(mic.getFileName()))
        u.append(ctf.getDefocusU())
        v.append(ctf.getDefocusV())
        a.append(ctf.getDefocusAngle())
    n = len(names)
    cols = OrderedDict([("rlnMicrographName", np.array(names, dtype=object)),
                        ("rlnDefocusU", np.array(u)), ("rlnDefocusV", np.array(v)),
                        ("rlnDefocusAngle", np.array(a)),
                        ("rlnMicrographPixelSize", np.full(n, mics.getSamplingRate())),
                        ("rlnVoltage", np.full(n, acq.getVoltage())),
                        ("rlnSphericalAberration", np.full(n, acq.getSphericalAberration()))])
    write_star(starFn, OrderedDict([("micrographs", cols)]))


# ------------------------------------------------------------------------------------------------- CTF
CTF_REQUIRED = ("rlnMicrographName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")
#: CTFModel attributes of deepcryo's CTF estimation: the mean defocus's standard error (Å, ``dcDefocusSigma``),
#: the 1D rotational-average file (CTFFIND's ``_avrot.txt`` layout, ``dcCtfAvrot``) and the fitted CTF² on the
#: PSD's grid (MRC, ``dcCtfModelImage``)
CTF_SIGMA_ATTR = "_deepcryo_defocusSigma"
CTF_AVROT_ATTR = "_deepcryo_ctfAvrot"
CTF_MODEL_IMAGE_ATTR = "_deepcryo_ctfModelImage"
#: optional CTFFIND5-style measurements (``predict --fit-tilt/--fit-thickness``): STAR column -> Float attribute
#: of the CTFModel: the specimen's tilt angle and axis (degrees, CTFFIND5's convention,
#: :mod:`deepcryo.defocus.tilt`), its thickness (Å) and the smallest thickness the fit band could show (Å; a
#: thickness of 0 means no node was seen: thinner than that, or rings too weak beyond the first node)
CTF_TILT_ANGLE_ATTR = "_deepcryo_tiltAngle"
CTF_TILT_AXIS_ATTR = "_deepcryo_tiltAxis"
CTF_THICKNESS_ATTR = "_deepcryo_iceThickness"
CTF_THICKNESS_MIN_ATTR = "_deepcryo_iceThicknessMin"
CTF_EXTRA_ATTRS = OrderedDict([("dcCtfTiltAngle", CTF_TILT_ANGLE_ATTR), ("dcCtfTiltAxis", CTF_TILT_AXIS_ATTR),
                               ("rlnCtfIceThickness", CTF_THICKNESS_ATTR),
                               ("dcCtfIceThicknessMin", CTF_THICKNESS_MIN_ATTR)])


def readCtfStar(starFn):
    """Rows of a RELION CTF STAR (``data_micrographs``, or the first non-optics block) as a list of
    dicts: floats for numeric columns, str otherwise. Needs ``rlnMicrographName`` and
    ``rlnDefocusU/V/Angle``; may have ``rlnCtfMaxResolution``, ``rlnCtfFigureOfMerit``,
    ``rlnCtfImage``, ``rlnPhaseShift``, ``dcDefocusSigma``, ``dcCtfAvrot``, ``dcCtfModelImage`` and the columns
    of :data:`CTF_EXTRA_ATTRS`."""
    blocks = read_star(starFn)
    name = "micrographs" if "micrographs" in blocks else next((b for b in blocks if b != "optics"), None)
    if name is None:
        raise InputError("%s: no micrograph table" % starFn)
    cols = blocks[name]
    missing = [c for c in CTF_REQUIRED if c not in cols]
    if missing:
        raise InputError("%s: no %s column (needed)" % (starFn, ", ".join(missing)))
    n = len(cols["rlnMicrographName"])
    return [{c: (str(v[i]) if v.dtype == object else float(v[i])) for c, v in cols.items()} for i in range(n)]


def ctfRowToModel(row, ctfModel):
    """Fill a Scipion ``CTFModel`` from one :func:`readCtfStar` row and return it: defocus (Å,
    standardized to U >= V, 0 <= angle < 180), resolution (``rlnCtfMaxResolution``, Å), fit quality
    (``rlnCtfFigureOfMerit``), phase shift (degrees, when nonzero), PSD file (``rlnCtfImage``), and deepcryo's
    defocus standard error (``dcDefocusSigma``, Å), rotational-average file (``dcCtfAvrot``) and fitted-CTF²
    image (``dcCtfModelImage``) as the attributes :data:`CTF_SIGMA_ATTR`, :data:`CTF_AVROT_ATTR` and
    :data:`CTF_MODEL_IMAGE_ATTR`, and the tilt / thickness columns present as the attributes of
    :data:`CTF_EXTRA_ATTRS`."""
    ctfModel.setStandardDefocus(row["rlnDefocusU"], row["rlnDefocusV"], row["rlnDefocusAngle"])
    if "rlnCtfMaxResolution" in row:
        ctfModel.setResolution(row["rlnCtfMaxResolution"])
    if "rlnCtfFigureOfMerit" in row:
        ctfModel.setFitQuality(row["rlnCtfFigureOfMerit"])
    if row.get("rlnPhaseShift"):
        ctfModel.setPhaseShift(row["rlnPhaseShift"])
    if row.get("rlnCtfImage"):
        ctfModel.setPsdFile(row["rlnCtfImage"])
    if "dcDefocusSigma" in row:
        setattr(ctfModel, CTF_SIGMA_ATTR, pwobj.Float(row["dcDefocusSigma"]))
    if row.get("dcCtfAvrot"):
        setattr(ctfModel, CTF_AVROT_ATTR, pwobj.String(row["dcCtfAvrot"]))
    if row.get("dcCtfModelImage"):
        setattr(ctfModel, CTF_MODEL_IMAGE_ATTR, pwobj.String(row["dcCtfModelImage"]))
    for column, attr in CTF_EXTRA_ATTRS.items():
        if column in row:
            setattr(ctfModel, attr, pwobj.Float(row[column]))
    return ctfModel


# --------------------------------------------------------------------------------------------- volumes
def convertVolume(volume, outputDir):
    """Absolute path of an MRC file with the map of ``volume`` (a Scipion Volume): its own file when
    it is MRC, otherwise an ``.mrc`` converted into ``outputDir`` (pixel size in the header)."""
    path = _checkedMrc(volume.getFileName())
    if path is not None:
        return path
    os.makedirs(outputDir, exist_ok=True)
    base = os.path.splitext(os.path.basename(_stripFormat(volume.getFileName())))[0]
    out = os.path.abspath(os.path.join(outputDir, base + ".mrc"))
    ImageHandler().convert(volume, out)
    _setMrcPixelSize(out, volume.getSamplingRate())
    return out


def writeCtfRowStar(row, starFn):
    """Write one :func:`readCtfStar` row as a one-micrograph CTF STAR (``data_micrographs``)."""
    cols = OrderedDict((k, np.array([v], dtype=object if isinstance(v, str) else float)) for k, v in row.items())
    write_star(starFn, OrderedDict([("micrographs", cols)]))


def copyVolumeMrc(volume, path):
    """Write the map of ``volume`` (a Scipion Volume in an MRC file) to ``path`` with its pixel size (Å/px)
    in the header."""
    vol, _ = read_mrc(_stripFormat(volume.getFileName()))
    write_mrc(path, vol, volume.getSamplingRate())


def readFscStar(starFn, label="FSC"):
    """A Scipion ``FSC`` from a STAR table with ``rlnResolution`` (1/Å) and
    ``rlnFourierShellCorrelation``."""
    blocks = read_star(starFn)
    cols = next(iter(blocks.values()))
    for c in ("rlnResolution", "rlnFourierShellCorrelation"):
        if c not in cols:
            raise InputError("%s: no %s column (needed)" % (starFn, c))
    fsc = FSC(objLabel=label)
    fsc.setData([float(v) for v in cols["rlnResolution"]], [float(v) for v in cols["rlnFourierShellCorrelation"]])
    return fsc


def fscResolution(fscObj, pixelSize, threshold=0.143):
    """Resolution (Å) of a Scipion ``FSC`` (one value per shell 0 … N/2) as RELION reports it: the last shell
    above ``threshold`` (pwem's ``FSC.calculateResolution`` interpolates between shells)."""
    _, values = fscObj.getData()
    return fsc_resolution_A([float(v) for v in values], pixelSize, threshold)
