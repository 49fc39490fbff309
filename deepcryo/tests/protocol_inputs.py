"""Scipion input sets for the protocols' ``_validate`` tests (``test_protocol_bad_input.py``,
``tests/test_devices.py``): particles, micrographs and a volume written to temporary sqlite files."""
import os

import numpy as np
from pwem.objects import CTFModel, Acquisition, Micrograph, Particle, SetOfMicrographs, SetOfParticles, Volume

from deepcryo.core.mrc import write_mrc

GOOD_ACQ = dict(voltage=300.0, sphericalAberration=2.7, amplitudeContrast=0.1)


def _acq(**kw):
    return Acquisition(**dict(GOOD_ACQ, **kw))


def _particles(tmp_path, n=3, px=2.0, name="particles", **acq):
    s = SetOfParticles(filename=str(tmp_path / ("%s.sqlite" % name)))
    s.setSamplingRate(px)
    s.setAcquisition(_acq(**acq))
    s.setHasCTF(True)
    s.setAlignmentProj()
    stack = str(tmp_path / "stack.mrcs")
    if not os.path.exists(stack):
        write_mrc(stack, np.random.default_rng(0).normal(size=(3, 16, 16)), px, is_stack=True)
    for i in range(n):
        p = Particle(location=(i + 1, stack))
        p.setCTF(CTFModel(defocusU=10000, defocusV=10000, defocusAngle=0))
        s.append(p)
    s.write()
    return s


def _micrographs(tmp_path, n=2, px=1.0, closed=True, **acq):
    s = SetOfMicrographs(filename=str(tmp_path / ("mics_%d.sqlite" % len(os.listdir(str(tmp_path))))))
    s.setSamplingRate(px)
    s.setAcquisition(_acq(**acq))
    for i in range(n):
        s.append(Micrograph(location=str(tmp_path / ("m%d.mrc" % i))))
    s.setStreamState(s.STREAM_CLOSED if closed else s.STREAM_OPEN)
    s.write()
    return s


def _volume(tmp_path, px=2.0, box=16):
    path = str(tmp_path / ("map_%g.mrc" % px))
    write_mrc(path, np.zeros((box, box, box), np.float32), px)
    v = Volume(location=path)
    v.setSamplingRate(px)
    return v
