"""Bad input to every protocol (issue #8): ``_validate`` refuses it before anything runs, one line per problem
naming the input. (The programs behind the protocols are fed the same inputs in ``test_bad_input.py``; a bad
micrograph in a stream is reported and skipped in ``test_protocol_stream_load.py``.)

The protocols are instantiated without a project (``_validate`` only reads their inputs), on sets written to
temporary sqlite files.
"""
import os

import pytest
import torch
from pwem.objects import SetOfCTF

from deepcryo.protocols import (DeepCryoProtDeepDefocus, DeepCryoProtDeepDefocusTrain, DeepCryoProtReconstruct,
                                DeepCryoProtSwiftAlign, DeepCryoProtVaeTrain)
from deepcryo.tests.bad_inputs import malicious_file
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


@pytest.mark.parametrize("protocol", PARTICLE_PROTOCOLS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("label,kw,words", PARTICLE_CASES, ids=[c[0] for c in PARTICLE_CASES])
def test_particle_protocols_refuse(tmp_path, protocol, label, kw, words):
    inputs = {"inputParticles": _particles(tmp_path, **kw)}
    if protocol is DeepCryoProtSwiftAlign:
        inputs["inputVolume"] = _volume(tmp_path, px=kw.get("px", 2.0) or 2.0)
    good = _errors(protocol, inputParticles=_particles(tmp_path, name="good"),
                   **{k: v for k, v in inputs.items() if k != "inputParticles"})
    assert good == []
    errors = [e for e in _errors(protocol, **inputs) if words in e]
    assert len(errors) == 1 and "Input particles (" in errors[0] and ".sqlite)" in errors[0], errors


def test_swiftalign_refuses_mismatched_pixel_sizes(tmp_path):
    errors = _errors(DeepCryoProtSwiftAlign, inputParticles=_particles(tmp_path), inputVolume=_volume(tmp_path, 3.0))
    assert any("Pixel size mismatch: particles 2.0000 Å/px, map 3.0000 Å/px" in e for e in errors), errors


MIC_CASES = [("0 kV", dict(voltage=0.0), "voltage must be > 0 kV"),
             ("negative Cs", dict(sphericalAberration=-1.0), "must be >= 0 mm"),
             ("no pixel size", dict(px=0.0), "no valid pixel size"),
             ("empty closed set", dict(n=0), "the set is empty")]


@pytest.mark.parametrize("label,kw,words", MIC_CASES, ids=[c[0] for c in MIC_CASES])
def test_defocus_protocol_refuses(tmp_path, label, kw, words):
    assert _errors(DeepCryoProtDeepDefocus, inputMicrographs=_micrographs(tmp_path)) == []
    errors = _errors(DeepCryoProtDeepDefocus, inputMicrographs=_micrographs(tmp_path, **kw))
    assert len([e for e in errors if words in e]) == 1, errors


def test_defocus_protocol_accepts_an_empty_open_stream(tmp_path):
    assert _errors(DeepCryoProtDeepDefocus, inputMicrographs=_micrographs(tmp_path, n=0, closed=False)) == []


@pytest.mark.parametrize("kind", ["missing", "garbage", "foreign", "crafted"])
def test_defocus_protocol_refuses_a_model_that_is_not_ours(tmp_path, kind):
    from pwem.objects import EMFile
    marker = str(tmp_path / "MARKER_code_ran")
    path = str(tmp_path / "model.pt")
    if kind == "garbage":
        with open(path, "wb") as f:
            f.write(os.urandom(1000))
    elif kind == "foreign":
        torch.save({"state_dict": {}}, path)
    elif kind == "crafted":
        malicious_file(path, marker)
    errors = _errors(DeepCryoProtDeepDefocus, inputMicrographs=_micrographs(tmp_path), trainedModel=EMFile(filename=path))
    assert len(errors) == 1 and errors[0].startswith("Trained model %s" % path), errors
    assert ("not found" if kind == "missing" else "not a deepcryo defocus model") in errors[0]
    assert not os.path.exists(marker)


def test_defocus_training_refuses_empty_labels(tmp_path):
    ctfs = SetOfCTF(filename=str(tmp_path / "ctfs.sqlite"))
    ctfs.setMicrographs(_micrographs(tmp_path))
    ctfs.write()
    errors = _errors(DeepCryoProtDeepDefocusTrain, inputCTF=ctfs)
    assert len(errors) == 1 and "the set of CTFs is empty" in errors[0], errors
