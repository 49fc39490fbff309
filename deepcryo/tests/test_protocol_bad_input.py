"""Bad input to every protocol (issue #8): ``_validate`` refuses it before anything runs, one line per problem
naming the input. (The programs behind the protocols are fed the same inputs in ``tests/test_bad_input.py``; a bad
micrograph in a stream is reported and skipped in ``test_protocol_stream_load.py``.)

The protocols are instantiated without a project (``_validate`` only reads their inputs), on sets written to
temporary sqlite files (a new folder per case).
"""
import os
import pathlib
import shutil
import tempfile
import unittest

import torch
from pwem.objects import EMFile, SetOfCTF

from deepcryo.protocols import (DeepCryoProtDeepDefocus, DeepCryoProtDeepDefocusTrain, DeepCryoProtReconstruct,
                                DeepCryoProtSwiftAlign, DeepCryoProtSwiftRefine, DeepCryoProtVaeTrain)
from deepcryo.tests.malicious import malicious_file
from deepcryo.tests.protocol_inputs import _micrographs, _particles, _volume


def _errors(prot_class, **inputs):
    prot = prot_class()
    for name, value in inputs.items():
        getattr(prot, name).set(value)
    return prot._validate()


PARTICLE_PROTOCOLS = [DeepCryoProtReconstruct, DeepCryoProtSwiftAlign, DeepCryoProtVaeTrain]
PARTICLE_CASES = [  # (label, set kwargs, words of the one error)
    ("empty set", dict(n=0), "the set is empty"),
    ("0 kV", dict(voltage=0.0), "voltage must be > 0 kV"),
    ("negative Cs", dict(sphericalAberration=-2.7), "must be >= 0 mm"),
    ("amplitude contrast 1.5", dict(amplitudeContrast=1.5), "amplitude contrast"),
    ("no pixel size", dict(px=0.0), "no valid pixel size"),
]
MIC_CASES = [("0 kV", dict(voltage=0.0), "voltage must be > 0 kV"),
             ("negative Cs", dict(sphericalAberration=-1.0), "must be >= 0 mm"),
             ("no pixel size", dict(px=0.0), "no valid pixel size"),
             ("empty closed set", dict(n=0), "the set is empty")]


class TestProtocolBadInput(unittest.TestCase):

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="deepcryo-bad-input-")
        self.addCleanup(shutil.rmtree, self.root, True)

    def _folder(self):
        """A new, empty folder for the input sets of one case."""
        return pathlib.Path(tempfile.mkdtemp(dir=self.root))

    def testParticleProtocolsRefuse(self):
        for protocol in PARTICLE_PROTOCOLS:
            for label, kw, words in PARTICLE_CASES:
                with self.subTest(protocol=protocol.__name__, case=label):
                    folder = self._folder()
                    inputs = {"inputParticles": _particles(folder, **kw)}
                    if protocol is DeepCryoProtSwiftAlign:
                        inputs["inputVolume"] = _volume(folder, px=kw.get("px", 2.0) or 2.0)
                    good = _errors(protocol, inputParticles=_particles(folder, name="good"),
                                   **{k: v for k, v in inputs.items() if k != "inputParticles"})
                    self.assertEqual(good, [])
                    errors = [e for e in _errors(protocol, **inputs) if words in e]
                    self.assertTrue(len(errors) == 1 and "Input particles (" in errors[0] and ".sqlite)" in errors[0],
                                    errors)

    def testSwiftAlignRefusesMismatchedPixelSizes(self):
        folder = self._folder()
        errors = _errors(DeepCryoProtSwiftAlign, inputParticles=_particles(folder), inputVolume=_volume(folder, 3.0))
        self.assertTrue(any("Pixel size mismatch: particles 2.0000 Å/px, map 3.0000 Å/px" in e for e in errors),
                        errors)

    def testSwiftRefineTakesAMapOfTheSameBoxAtAnotherPixelSize(self):
        """16 px at 2 Å/px particles: an 8 px map at 4 Å/px (the same 32 Å) is accepted, to be resampled by the
        program; an 8 px map at 2 Å/px (16 Å) is refused."""
        folder = self._folder()
        particles = _particles(folder)
        ok = _errors(DeepCryoProtSwiftRefine, inputParticles=particles,
                     inputVolumes=[_volume(folder, 4.0, box=8)], initialResolution=30.0)
        self.assertEqual([e for e in ok if "Initial map" in e], [])
        bad = _errors(DeepCryoProtSwiftRefine, inputParticles=particles,
                      inputVolumes=[_volume(folder, 2.0, box=8)], initialResolution=30.0)
        self.assertTrue(any("box 8 px differs from the particles' 16 px" in e for e in bad), bad)

    def testDefocusProtocolRefuses(self):
        for label, kw, words in MIC_CASES:
            with self.subTest(case=label):
                folder = self._folder()
                self.assertEqual(_errors(DeepCryoProtDeepDefocus, inputMicrographs=_micrographs(folder)), [])
                errors = _errors(DeepCryoProtDeepDefocus, inputMicrographs=_micrographs(folder, **kw))
                self.assertEqual(len([e for e in errors if words in e]), 1, errors)

    def testDefocusProtocolAcceptsAnEmptyOpenStream(self):
        mics = _micrographs(self._folder(), n=0, closed=False)
        self.assertEqual(_errors(DeepCryoProtDeepDefocus, inputMicrographs=mics), [])

    def testDefocusProtocolRefusesAModelThatIsNotOurs(self):
        for kind in ["missing", "garbage", "foreign", "crafted"]:
            with self.subTest(kind=kind):
                folder = self._folder()
                marker = str(folder / "MARKER_code_ran")
                path = str(folder / "model.pt")
                if kind == "garbage":
                    with open(path, "wb") as f:
                        f.write(os.urandom(1000))
                elif kind == "foreign":
                    torch.save({"state_dict": {}}, path)
                elif kind == "crafted":
                    malicious_file(path, marker)
                errors = _errors(DeepCryoProtDeepDefocus, inputMicrographs=_micrographs(folder),
                                 trainedModel=EMFile(filename=path))
                self.assertTrue(len(errors) == 1 and errors[0].startswith("Trained model %s" % path), errors)
                self.assertIn("not found" if kind == "missing" else "not a deepcryo defocus model", errors[0])
                self.assertFalse(os.path.exists(marker))

    def testDefocusTrainingRefusesEmptyLabels(self):
        folder = self._folder()
        ctfs = SetOfCTF(filename=str(folder / "ctfs.sqlite"))
        ctfs.setMicrographs(_micrographs(folder))
        ctfs.write()
        errors = _errors(DeepCryoProtDeepDefocusTrain, inputCTF=ctfs)
        self.assertTrue(len(errors) == 1 and "the set of CTFs is empty" in errors[0], errors)
