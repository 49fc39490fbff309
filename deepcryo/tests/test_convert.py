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
"""Scipion <-> STAR conversion against ground truth: Scipion's projection-alignment convention (the
relion plugin's formula), lossless particle round trips, RELION 3.0 input, non-MRC stacks, CTF,
micrograph and FSC STAR files, and the errors for bad input."""
import os
import shutil
import tempfile
import unittest
from collections import OrderedDict

import numpy as np
import pwem
from pwem.emlib.image import ImageHandler
from pwem.objects import Acquisition, CTFModel, Micrograph, SetOfMicrographs, SetOfParticles, Volume

from deepcryo import convert
from deepcryo.constants import RANDOM_SUBSET_ATTR
from deepcryo.core import resolution
from deepcryo.core.errors import InputError
from deepcryo.core.mrc import read_mrc, read_mrc_header, write_mrc
from deepcryo.core.particles import ParticleStar, make_optics, read_particles, write_particles
from deepcryo.core.star import read_star, write_star
from deepcryo.tests.sets import particleSetFromStar, relionPoseToScipionMatrix

BOX, PX, N = 16, 1.5, 60


def _starColumns(path):
    """{block: [column, ...]} read from the header lines of a STAR file (no parser involved)."""
    blocks, current = OrderedDict(), None
    with open(path) as f:
        for line in f:
            s = line.strip()
            if s.startswith("data_"):
                current = blocks.setdefault(s[5:], [])
            elif s.startswith("_") and current is not None:
                current.append(s.split()[0][1:])
    return blocks


def _rotations(angles_deg):
    """RELION's matrices A (N, 3, 3) of poses, from Scipion's own formula (the top-left block of a Scipion
    ALIGN_PROJ matrix is Aᵀ): no deepcryo code and no torch, so this module also runs without torch
    (``test_scipion_side_without_torch``)."""
    return np.stack([relionPoseToScipionMatrix(*a, 0.0, 0.0)[:3, :3].T for a in np.reshape(angles_deg, (-1, 3))])


class TestConvert(unittest.TestCase):
    """Ground truth: a RELION 3.1 STAR written by hand with known poses, CTF and images."""

    @classmethod
    def setUpClass(cls):
        cls.folder = tempfile.mkdtemp(prefix="deepcryo-convert-")
        rng = np.random.default_rng(7)
        angles = np.column_stack([rng.uniform(-180, 180, N), rng.uniform(0, 180, N), rng.uniform(-180, 180, N)])
        angles[:4] = [[30, 0, 40], [-50, 180, 10], [0, 90, 0], [170, 1e-3, -170]]  # gimbal lock, axes
        cls.angles, cls.origins = angles, rng.uniform(-4, 4, (N, 2))  # origins in px
        cls.images = rng.normal(size=(N, BOX, BOX)).astype(np.float32)
        write_mrc(os.path.join(cls.folder, "stack.mrcs"), cls.images, PX, is_stack=True)
        du = rng.uniform(12000, 20000, N)
        cls.defocus = np.column_stack([du, du - rng.uniform(0, 800, N), rng.uniform(0, 180, N)])
        particles = OrderedDict([
            ("rlnImageName", np.array(["%06d@stack.mrcs" % (i + 1) for i in range(N)], dtype=object)),
            ("rlnOpticsGroup", np.ones(N, dtype=np.int64)),
            ("rlnDefocusU", cls.defocus[:, 0]), ("rlnDefocusV", cls.defocus[:, 1]),
            ("rlnDefocusAngle", cls.defocus[:, 2]),
            ("rlnAngleRot", angles[:, 0]), ("rlnAngleTilt", angles[:, 1]), ("rlnAnglePsi", angles[:, 2]),
            ("rlnOriginXAngst", cls.origins[:, 0] * PX), ("rlnOriginYAngst", cls.origins[:, 1] * PX)])
        cls.truthStar = os.path.join(cls.folder, "truth.star")
        write_particles(cls.truthStar, ParticleStar(make_optics(PX, BOX, 200.0, 2.0, 0.07), particles,
                                                          cls.folder))
        cls.subsets = rng.integers(1, 3, N)
        cls.parts = particleSetFromStar(cls.truthStar, os.path.join(cls.folder, "particles.sqlite"),
                                        subsets=cls.subsets)

    @classmethod
    def tearDownClass(cls):
        cls.parts.close()
        shutil.rmtree(cls.folder, ignore_errors=True)

    def _path(self, name):
        return os.path.join(self.folder, name)

    def _newSet(self, name):
        return SetOfParticles(filename=self._path(name))

    # ----------------------------------------------------------------------------------- conventions
    def testMatricesFollowRelionPluginFormula(self):
        ours = convert.projectionMatrices(self.angles, self.origins)
        theirs = np.stack([relionPoseToScipionMatrix(*a, *o) for a, o in zip(self.angles, self.origins)])
        np.testing.assert_allclose(ours, theirs, atol=1e-9)

    def testPosesFromMatricesInvertTheFormula(self):
        matrices = np.stack([relionPoseToScipionMatrix(*a, *o) for a, o in zip(self.angles, self.origins)])
        angles, origins = convert.posesFromMatrices(matrices)
        np.testing.assert_allclose(_rotations(angles), _rotations(self.angles), atol=1e-9)
        np.testing.assert_allclose(origins, self.origins, atol=1e-9)

    def testRowAlignmentRoundTrip(self):
        row = {"rlnAngleRot": 12.0, "rlnAngleTilt": 34.0, "rlnAnglePsi": -56.0,
               "rlnOriginXAngst": 3.0, "rlnOriginYAngst": -1.5}
        t = convert.rowToAlignment(row, PX)
        np.testing.assert_allclose(t.getMatrix(), relionPoseToScipionMatrix(12, 34, -56, 2.0, -1.0), atol=1e-12)
        back = convert.alignmentToRow(t, {}, PX)
        for key, value in row.items():
            self.assertAlmostEqual(back[key], value, places=9)

    # ------------------------------------------------------------------------------------ round trips
    def testParticleSetToStarAndBack(self):
        starFn = self._path("written.star")
        convert.writeSetOfParticles(self.parts, starFn)
        star = read_particles(starFn)

        # nothing the file holds is lost by read_particles
        written = _starColumns(starFn)
        self.assertEqual(set(written["particles"]), set(star.particles))
        self.assertEqual(set(written["optics"]), set(star.optics))
        self.assertTrue({"rlnImageName", "rlnImageId", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle",
                         "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                         "rlnRandomSubset"} <= set(star.particles))

        # values equal the truth
        np.testing.assert_allclose(_rotations(star.angles_deg()), _rotations(self.angles), atol=1e-4)
        np.testing.assert_allclose(star.origins_A(), self.origins * PX, atol=1e-4)
        p = star.ctf_params()
        np.testing.assert_allclose(np.column_stack([p["defocus_u_A"], p["defocus_v_A"], p["defocus_angle_deg"]]),
                                   self.defocus, atol=1e-3)
        self.assertEqual((star.pixel_size_A, star.box_size), (PX, BOX))
        np.testing.assert_allclose([p["voltage_kV"][0], p["cs_mm"][0], p["amplitude_contrast"][0]], [200, 2, 0.07])
        np.testing.assert_array_equal(star.particles["rlnRandomSubset"], self.subsets)
        np.testing.assert_array_equal(star.particles["rlnImageId"], np.arange(1, N + 1))
        with star.open_images() as stack:
            np.testing.assert_array_equal(stack.read(np.arange(N)), self.images)

        # and back into Scipion: the same matrices, shifts and half sets
        out = self._newSet("roundtrip.sqlite")
        convert.updateParticlesFromStar(self.parts, starFn, out)
        self.assertTrue(out.hasAlignmentProj())
        self.assertEqual(out.getSize(), N)
        for before, after in zip(self.parts.iterItems(orderBy="id"), out.iterItems(orderBy="id")):
            np.testing.assert_allclose(after.getTransform().getMatrix(), before.getTransform().getMatrix(),
                                       atol=1e-4)
            np.testing.assert_allclose(after.getTransform().getShifts(), before.getTransform().getShifts(),
                                       atol=1e-4)
            self.assertEqual(getattr(after, RANDOM_SUBSET_ATTR).get(), getattr(before, RANDOM_SUBSET_ATTR).get())
        out.close()

    def testRelion30Star(self):
        """RELION 3.0: one table, rlnOriginX/Y in pixels, pixel size from detector pixel / magnification."""
        starFn = self._path("relion30.star")
        with open(starFn, "w") as f:
            cols = ["rlnImageName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnAngleRot", "rlnAngleTilt",
                    "rlnAnglePsi", "rlnOriginX", "rlnOriginY", "rlnDetectorPixelSize", "rlnMagnification",
                    "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]
            f.write("\ndata_\n\nloop_\n" + "".join("_%s #%d\n" % (c, i + 1) for i, c in enumerate(cols)))
            for i in range(N):
                f.write("%06d@stack.mrcs %.6f %.6f %.6f %.6f %.6f %.6f %.6f %.6f 7.5 50000 200 2.0 0.07\n"
                        % ((i + 1,) + tuple(self.defocus[i]) + tuple(self.angles[i]) + tuple(self.origins[i])))
        inputSet = particleSetFromStar(self.truthStar, self._path("noalign.sqlite"), withAlignment=False)
        out = self._newSet("from30.sqlite")
        convert.updateParticlesFromStar(inputSet, starFn, out)
        self.assertTrue(out.hasAlignmentProj())
        for i, part in enumerate(out.iterItems(orderBy="id")):
            np.testing.assert_allclose(part.getTransform().getMatrix(),
                                       relionPoseToScipionMatrix(*self.angles[i], *self.origins[i]), atol=1e-4)
        self.assertEqual(i + 1, N)
        out.close()
        inputSet.close()

    def testRowsMatchedByImageIdWhenReorderedOrDropped(self):
        starFn = self._path("written2.star")
        convert.writeSetOfParticles(self.parts, starFn)
        star = read_particles(starFn)
        keep = np.arange(N)[::-1][np.arange(N) % 3 != 0]            # reversed, every third dropped
        star = star.subset(keep)
        star.particles["rlnMaxValueProbDistribution"] = star.particles["rlnImageId"] * 0.01
        shuffled = self._path("shuffled.star")
        write_particles(shuffled, star)
        out = self._newSet("subset.sqlite")
        convert.updateParticlesFromStar(self.parts, shuffled, out, extraColumns=["rlnMaxValueProbDistribution"])
        self.assertEqual(out.getSize(), len(keep))
        self.assertEqual(sorted(p.getObjId() for p in out), sorted(int(i) for i in star.particles["rlnImageId"]))
        for part in out.iterItems():
            original = self.parts[part.getObjId()]
            np.testing.assert_allclose(part.getTransform().getMatrix(), original.getTransform().getMatrix(),
                                       atol=1e-4)
            self.assertAlmostEqual(part._rlnMaxValueProbDistribution.get(), part.getObjId() * 0.01, places=6)
        out.close()

    def testNonMrcStackIsConvertedToMrcs(self):
        ImageHandler().convertStack(self._path("stack.mrcs"), self._path("stack.stk"))
        spiderStar = self._path("spider.star")
        star = read_particles(self.truthStar)
        star.particles["rlnImageName"] = np.array(["%06d@stack.stk" % (i + 1) for i in range(N)], dtype=object)
        write_star(spiderStar, OrderedDict([("optics", star.optics), ("particles", star.particles)]))
        parts = particleSetFromStar(spiderStar, self._path("spider.sqlite"))
        with self.assertRaisesRegex(InputError, "not an MRC file"):
            convert.writeSetOfParticles(parts, self._path("no_dir.star"))
        outFn = self._path("converted.star")
        convert.writeSetOfParticles(parts, outFn, outputDir=self._path("converted"))
        converted = read_particles(outFn)
        self.assertTrue(all(p.endswith(".mrcs") for _, p in converted.image_refs()))
        with converted.open_images() as stack:
            np.testing.assert_allclose(stack.read(np.arange(N)), self.images, atol=1e-6)
        self.assertAlmostEqual(read_mrc_header(converted.image_refs()[0][1])[1], PX, places=3)
        parts.close()

    # ------------------------------------------------------------------------------------ bad input
    def testBadParticleInputs(self):
        empty = self._newSet("empty.sqlite")
        empty.setSamplingRate(PX)
        empty.write()
        with self.assertRaisesRegex(InputError, "empty"):
            convert.writeSetOfParticles(empty, self._path("empty.star"))
        empty.close()

        self.parts.setAlignment(pwem.ALIGN_2D)
        try:
            with self.assertRaisesRegex(InputError, "alignment"):
                convert.writeSetOfParticles(self.parts, self._path("align2d.star"))
        finally:
            self.parts.setAlignmentProj()

        star = read_particles(self.truthStar)
        star.optics["rlnImagePixelSize"] = np.array([2 * PX])
        wrongPixel = self._path("wrong_pixel.star")
        write_particles(wrongPixel, star)
        with self.assertRaisesRegex(InputError, "pixel size"):
            convert.updateParticlesFromStar(self.parts, wrongPixel, self._newSet("wrong.sqlite"))

        parts = SetOfParticles(filename=self._path("missing.sqlite"))
        parts.copyInfo(self.parts)
        for part in self.parts.iterItems():
            clone = part.clone()
            clone.setFileName(self._path("missing.mrcs"))
            parts.append(clone)
        parts.write()
        with self.assertRaisesRegex(InputError, "missing.mrcs: file not found"):
            convert.writeSetOfParticles(parts, self._path("missing_out.star"))
        with open(self._path("stack.mrcs"), "rb") as f, open(self._path("missing.mrcs"), "wb") as g:
            g.write(f.read()[:4096])                                 # a truncated stack
        with self.assertRaisesRegex(InputError, "missing.mrcs: not a readable MRC file"):
            convert.writeSetOfParticles(parts, self._path("missing_out.star"))
        parts.close()

    # -------------------------------------------------------------------------- CTF, mics, FSC STAR
    def testCtfStarToCtfModel(self):
        starFn = self._path("ctf.star")
        micrographs = OrderedDict([
            ("rlnMicrographName", np.array(["mic1.mrc", "mic2.mrc"], dtype=object)),
            ("rlnDefocusU", np.array([15000.0, 21000.0])), ("rlnDefocusV", np.array([18000.0, 20000.0])),
            ("rlnDefocusAngle", np.array([30.0, 170.0])), ("rlnCtfMaxResolution", np.array([3.5, 4.25])),
            ("rlnCtfFigureOfMerit", np.array([0.25, 0.125])), ("rlnPhaseShift", np.array([0.0, 45.0])),
            ("rlnCtfImage", np.array(["mic1_psd.mrc", "mic2_psd.mrc"], dtype=object))])
        write_star(starFn, OrderedDict([("optics", make_optics(1.0, 4096)), ("micrographs", micrographs)]))
        rows = convert.readCtfStar(starFn)
        self.assertEqual([r["rlnMicrographName"] for r in rows], ["mic1.mrc", "mic2.mrc"])
        first = convert.ctfRowToModel(rows[0], CTFModel())
        # U < V is standardized: U and V swap and the angle turns by 90 degrees
        self.assertEqual((first.getDefocusU(), first.getDefocusV(), first.getDefocusAngle()), (18000, 15000, 120))
        self.assertEqual((first.getResolution(), first.getFitQuality()), (3.5, 0.25))
        self.assertEqual(first.getPsdFile(), "mic1_psd.mrc")
        self.assertFalse(first.hasPhaseShift())
        second = convert.ctfRowToModel(rows[1], CTFModel())
        self.assertEqual((second.getDefocusU(), second.getDefocusV(), second.getDefocusAngle()),
                         (21000, 20000, 170))
        self.assertEqual(second.getPhaseShift(), 45.0)

        del micrographs["rlnDefocusV"]
        write_star(starFn, OrderedDict([("micrographs", micrographs)]))
        with self.assertRaisesRegex(InputError, "rlnDefocusV"):
            convert.readCtfStar(starFn)

    def testWriteSetOfMicrographs(self):
        mics = SetOfMicrographs(filename=self._path("mics.sqlite"))
        mics.setSamplingRate(0.8)
        mics.setAcquisition(Acquisition(voltage=300, sphericalAberration=2.7, amplitudeContrast=0.1,
                                        magnification=50000))
        for i in range(3):
            fn = self._path("mic_%d.mrc" % i)
            write_mrc(fn, np.zeros((32, 32), np.float32), 0.8)
            mics.append(Micrograph(location=fn))
        mics.write()
        starFn = self._path("mics.star")
        convert.writeSetOfMicrographs(mics, starFn)
        blocks = read_star(starFn)
        self.assertEqual(list(blocks["micrographs"]["rlnMicrographName"]),
                         [self._path("mic_%d.mrc" % i) for i in range(3)])
        optics = blocks["optics"]
        self.assertEqual((optics["rlnMicrographPixelSize"][0], optics["rlnVoltage"][0],
                          optics["rlnSphericalAberration"][0], optics["rlnAmplitudeContrast"][0]), (0.8, 300, 2.7, 0.1))
        os.remove(self._path("mic_1.mrc"))
        with self.assertRaisesRegex(InputError, "mic_1.mrc: micrograph file not found"):
            convert.writeSetOfMicrographs(mics, starFn)
        mics.close()

    def testConvertVolume(self):
        data = np.random.default_rng(1).normal(size=(BOX, BOX, BOX)).astype(np.float32)
        mrcFn = self._path("volume.mrc")
        write_mrc(mrcFn, data, PX)
        volume = Volume(location=mrcFn + ":mrc")
        volume.setSamplingRate(PX)
        self.assertEqual(convert.convertVolume(volume, self._path("volumes")), mrcFn)
        spiderFn = self._path("volume.vol")
        ImageHandler().convert(mrcFn, spiderFn)
        volume.setLocation(spiderFn)
        converted = convert.convertVolume(volume, self._path("volumes"))
        self.assertEqual(converted, self._path(os.path.join("volumes", "volume.mrc")))
        back, px = read_mrc(converted)
        np.testing.assert_allclose(back, data, atol=1e-6)
        self.assertAlmostEqual(px, PX, places=3)
        volume.setLocation(self._path("absent.mrc"))
        with self.assertRaisesRegex(InputError, "absent.mrc: file not found"):
            convert.convertVolume(volume, self._path("volumes"))

    def testReadFscStar(self):
        curve = np.linspace(1.0, -0.1, BOX // 2 + 1)
        fn = self._path("fsc.star")
        resolution.write_fsc_star(fn, curve, BOX, PX)
        x, y = convert.readFscStar(fn).getData()
        np.testing.assert_allclose([float(v) for v in x], np.arange(BOX // 2 + 1) / (BOX * PX), atol=1e-6)
        np.testing.assert_allclose([float(v) for v in y], curve, atol=1e-6)


if __name__ == "__main__":
    unittest.main()
