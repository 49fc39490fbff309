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
"""Scipion's own Python without torch and faiss (the programs run with ``DEEPCRYO_PYTHON``, their own
environment): in a Python where importing torch or faiss fails, the plugin, every protocol, viewer and the
wizards import; the conversions (``test_convert``: particles with poses and CTF, FSC STAR files) pass; the form
validation still refuses a file that is not a defocus model and the band wizard still shows the PSD, both
through the programs' Python; the defocus viewer draws its summary from the program's files."""
import glob
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import unittest

import numpy as np

import deepcryo
from deepcryo.core.mrc import write_mrc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(deepcryo.__file__)))

#: What runs first in the child Python: torch and faiss cannot be imported (``None`` in ``sys.modules``
#: makes ``import torch`` raise ImportError). Only that Python: the programs it starts import torch normally.
BLOCK = 'import sys\nsys.modules["torch"] = None\nsys.modules["faiss"] = None\n'


def runWithoutTorch(code, *args):
    """Run ``code`` (after :data:`BLOCK`) in a child Python that imports this checkout; returns its stdout.
    Fails the test with the child's stderr when it exits with an error."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    done = subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)] + list(args), env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise AssertionError("the child Python without torch failed:\n%s" % done.stderr[-4000:])
    return done.stdout


class TestScipionSideWithoutTorch(unittest.TestCase):

    def setUp(self):
        self.folder = tempfile.mkdtemp(prefix="deepcryo-notorch-")

    def testPluginProtocolsViewersAndWizardsImport(self):
        out = runWithoutTorch("""
            import importlib, json, pkgutil, sys
            import deepcryo
            deepcryo.Plugin
            names = ["deepcryo.convert", "deepcryo.wizards"]
            for package in ("deepcryo.protocols", "deepcryo.viewers"):
                path = importlib.import_module(package).__path__
                names += [package + "." + m.name for m in pkgutil.iter_modules(path)]
            for name in names:
                importlib.import_module(name)
            import deepcryo.protocols as p
            protocols = sorted(n for n in dir(p) if n.startswith("DeepCryoProt"))
            print(json.dumps({"modules": names, "protocols": protocols,
                              "blocked": [sys.modules.get(m) is None for m in ("torch", "faiss")]}))
            """)
        result = json.loads(out.strip().splitlines()[-1])
        self.assertIn("deepcryo.viewers.viewer_defocus", result["modules"])
        self.assertIn("deepcryo.protocols.protocol_swiftrefine", result["modules"])
        self.assertGreaterEqual(len(result["protocols"]), 8)
        self.assertEqual(result["blocked"], [True, True])  # nothing replaced the blocked modules

    def testConversionsPassWithoutTorch(self):
        """``test_convert`` (particles with poses and CTF to STAR and back, against Scipion's own formula; CTF,
        micrograph and FSC STAR files), run whole in the Python without torch."""
        runWithoutTorch("""
            import sys, unittest
            suite = unittest.defaultTestLoader.loadTestsFromName("deepcryo.tests.test_convert")
            result = unittest.TextTestRunner(stream=sys.stderr, verbosity=1).run(suite)
            sys.exit(0 if result.wasSuccessful() and result.testsRun >= 10 else 1)
            """)

    def testDefocusModelCheckedByThePrograms(self):
        """The form refuses a file that is not a defocus model in one message (the programs' Python reads it)."""
        path = os.path.join(self.folder, "model.pt")
        with open(path, "wb") as f:
            f.write(os.urandom(1000))
        out = runWithoutTorch("""
            import json, sys
            from deepcryo.protocols.validation import defocusModelErrors
            print(json.dumps(defocusModelErrors(sys.argv[1])))
            """, path)
        errors = json.loads(out.strip().splitlines()[-1])
        self.assertEqual(len(errors), 1, errors)
        self.assertTrue(errors[0].startswith("Trained model %s: not a deepcryo defocus model" % path), errors)

    def testBandWizardPreviewThroughThePrograms(self):
        """The band wizard's PSD preview is the programs' PSD: a micrograph with a known in-plane period shows
        its peak at the right place, ±1 px (a cosine of period 8 px: 1/8 cycles/px, 32 px from the centre of a 256²
        preview)."""
        y, x = np.mgrid[:512, :512]
        rng = np.random.default_rng(3)
        mic = np.cos(2 * np.pi * x / 8.0) + 0.1 * rng.normal(size=x.shape)
        path = os.path.join(self.folder, "mic.mrc")
        write_mrc(path, mic.astype(np.float32), 1.0)
        out = runWithoutTorch("""
            import json, sys
            import numpy as np
            from deepcryo.wizards import preview_images
            mic, psd = preview_images(sys.argv[1], 1.0, 256)
            print(json.dumps({"mic": list(mic.shape), "psd": list(psd.shape),
                              "peak": [int(v) for v in np.unravel_index(np.argmax(psd), psd.shape)]}))
            """, path)
        result = json.loads(out.strip().splitlines()[-1])
        self.assertEqual(result["mic"], [256, 256])
        self.assertEqual(result["psd"], [256, 256])
        self.assertLessEqual(abs(result["peak"][0] - 128), 1)  # the periodic tiles' window spreads it by a pixel
        self.assertLessEqual(abs(abs(result["peak"][1] - 128) - 32), 1)

    def testDefocusViewerDrawsTheProgramsCtfImage(self):
        """The summary's left half is the program's fitted CTF² (``_ctf.mrc``) scaled to the PSD's range, its
        right half the PSD."""
        size = 64
        psd = np.random.default_rng(5).uniform(0.0, 1.0, (size, size)).astype(np.float32)
        ctf2 = np.tile(np.linspace(0.0, 1.0, size, dtype=np.float32), (size, 1))
        write_mrc(os.path.join(self.folder, "m_psd.mrc"), psd, 2.0)
        write_mrc(os.path.join(self.folder, "m_ctf.mrc"), ctf2, 2.0)
        runWithoutTorch("""
            import sys, os
            import numpy as np
            from deepcryo.core.mrc import read_mrc
            from deepcryo.viewers.viewer_defocus import plot_defocus_summary, psd_with_ctf
            folder = sys.argv[1]
            psd, ctf2 = (read_mrc(os.path.join(folder, "m_%s.mrc" % k))[0] for k in ("psd", "ctf"))
            np.save(os.path.join(folder, "img.npy"), psd_with_ctf(psd, ctf2))
            record = dict(micrograph="m.mrc", defocus_u_A=1.2e4, defocus_v_A=1.1e4, defocus_angle_deg=10.0,
                          resolution_A=6.0, flagged=False, psd=os.path.join(folder, "m_psd.mrc"),
                          ctf_image=os.path.join(folder, "m_ctf.mrc"))
            plot_defocus_summary([record], os.path.join(folder, "summary.png"))
            """, self.folder)
        img = np.load(os.path.join(self.folder, "img.npy"))
        lo, hi = np.percentile(psd, [2, 98])
        np.testing.assert_allclose(img[:, :size // 2], np.clip(lo + (hi - lo) * ctf2[:, :size // 2], lo, hi), atol=1e-5)
        np.testing.assert_allclose(img[:, size // 2:], np.clip(psd[:, size // 2:], lo, hi), atol=1e-6)
        self.assertGreater(os.path.getsize(os.path.join(self.folder, "summary.png")), 10000)

    def tearDown(self):
        for path in glob.glob(os.path.join(self.folder, "*")):
            os.remove(path)
        os.rmdir(self.folder)


if __name__ == "__main__":
    unittest.main()
