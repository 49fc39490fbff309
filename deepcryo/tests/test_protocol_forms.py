"""What a user sets on a form reaches the program: every setting of SwiftRes (``RefineParams``) that changes the
result is on the SwiftRefine form, the SwiftAlign form's search settings reach ``swiftalign train``, and every
option of ``landscape frames`` is on the body-frame form.

The protocol's step is run with ``runJob`` recorded instead of run; the recorded command line is parsed with the
program's own parser.
"""
import argparse
import inspect
import os
import pathlib
import shlex
import shutil
import tempfile
import unittest
from unittest import mock

from pyworkflow.object import Pointer

import deepcryo.protocols.protocol_swiftalign as swiftalign_module
import deepcryo.protocols.protocol_swiftrefine as swiftrefine_module
from deepcryo.landscape.commands import frames as frames_command
from deepcryo.protocols import (DeepCryoProtSwiftAlign, DeepCryoProtSwiftRefine, DeepCryoProtVaeAnalyze,
                                DeepCryoProtVaeBodyFrame)
from deepcryo.swiftalign.commands import refine as refine_command
from deepcryo.swiftalign.commands import train as train_command
from deepcryo.swiftalign.refine import RefineParams
from deepcryo.tests.protocol_inputs import _particles, _volume

#: RefineParams fields that do not change the result (resources), and the form's own place for them.
NOT_ON_FORM = {"device": "useGpu/gpuList", "batch_size": "memory only"}
#: Options of ``landscape frames`` that the body-frame protocol sets itself, and from what.
FRAMES_SET_BY_PROTOCOL = {"particles": "the analysis' particles.star", "output": "its extra folder",
                          "group_column": "the form's grouping",
                          "maps": "none: each group's map is reconstructed at the form's map box"}


def _recorded_args(prot, step, command):
    jobs = []
    with mock.patch.object(prot, "runJob", lambda program, args, **kw: jobs.append(args)):
        step()
    parser = argparse.ArgumentParser()
    command.add_args(parser)
    words = shlex.split(jobs[-1])
    return parser.parse_args(words[1:])  # words[0] is the subcommand


class TestProtocolForms(unittest.TestCase):

    def setUp(self):
        """A temporary working folder (the protocol's steps write there); the reference map's conversion skipped."""
        self.folder = pathlib.Path(tempfile.mkdtemp(prefix="deepcryo-forms-"))
        self.addCleanup(shutil.rmtree, str(self.folder), True)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(str(self.folder))
        for module in (swiftalign_module, swiftrefine_module):
            patcher = mock.patch.object(module, "convertVolume", lambda vol, folder: "ref.mrc")
            patcher.start()
            self.addCleanup(patcher.stop)

    def testEveryRefineSettingIsOnTheSwiftRefineForm(self):
        prot = DeepCryoProtSwiftRefine()
        prot.inputParticles.set(_particles(self.folder))
        prot.inputVolumes.append(Pointer(_volume(self.folder)))
        values = dict(symmetryGroup="d7", initialResolution=25.0, particleDiameter=120.0, maxIterations=7,
                      globalIterations=2, localSteps=3, maxShift=4.0, doConsensus=True,
                      numberOfMatches=5, nprobe=64, doWhiten=True, joinResolution=35.0, randomSeed=11,
                      memoryLimit=2.5)
        for name, value in values.items():
            getattr(prot, name).set(value)
        args = _recorded_args(prot, prot.refineStep, refine_command)
        given = dict(symmetry="D7", initial_resolution_A=25.0, particle_diameter_A=120.0, max_iterations=7,
                     global_iterations=2, local_steps=3, max_shift_px=4.0, repetitions=2, k=5,
                     nprobe=64, whiten=True, join_resolution_A=35.0, seed=11, memory_limit_GB=2.5)
        fields = set(inspect.signature(RefineParams).parameters)
        self.assertEqual(fields, set(given) | set(NOT_ON_FORM), fields ^ (set(given) | set(NOT_ON_FORM)))
        got = dict(symmetry=args.symmetry, initial_resolution_A=args.initial_resolution,
                   particle_diameter_A=args.particle_diameter, max_iterations=args.max_iterations,
                   global_iterations=args.global_iterations, local_steps=args.local_steps,
                   max_shift_px=args.max_shift, repetitions=args.repetitions, k=args.k, nprobe=args.nprobe,
                   whiten=args.whiten, join_resolution_A=args.join_resolution, seed=args.seed,
                   memory_limit_GB=args.memory_limit)
        self.assertEqual(got, given)
        self.assertTrue(args.resume)                         # Scipion's continue mode resumes the iterations

    def testSwiftAlignFormReachesTrain(self):
        prot = DeepCryoProtSwiftAlign()
        prot.inputParticles.set(_particles(self.folder))
        prot.inputVolume.set(_volume(self.folder))
        for name, value in dict(samplingMode=0, angularStep=7.5, maxResolution=12.0, maxShift=3.0,
                                doWhiten=True, memoryLimit=1.5, symmetryGroup="c3").items():
            getattr(prot, name).set(value)
        args = _recorded_args(prot, prot.trainStep, train_command)
        self.assertEqual((args.angular_step, args.max_resolution, args.max_shift, args.whiten,
                          args.memory_limit, args.symmetry), (7.5, 12.0, 3.0, True, 1.5, "C3"))

    def testBodyFrameFormReachesFrames(self):
        """Each option of ``landscape frames`` is a field of the body-frame form or set by the protocol
        (:data:`FRAMES_SET_BY_PROTOCOL`), and the form's values reach it, for both groupings."""
        analysis = DeepCryoProtVaeAnalyze()
        analysis.setWorkingDir(str(self.folder / "analysis"))
        parser = argparse.ArgumentParser()
        frames_command.add_args(parser)
        options = {a.dest for a in parser._actions if a.dest != "help"}
        onForm = {"bins", "box", "resolution", "reference", "max_angle", "refine_resolution", "interpolate"}
        self.assertEqual(options, onForm | set(FRAMES_SET_BY_PROTOCOL), options ^ (onForm | set(FRAMES_SET_BY_PROTOCOL)))
        for groupBy, column, bins in ((DeepCryoProtVaeBodyFrame.GROUP_PC1, "dcPC1", 5),
                                      (DeepCryoProtVaeBodyFrame.GROUP_CLUSTERS, "dcCluster", 0)):
            with self.subTest(groupBy=groupBy):
                prot = DeepCryoProtVaeBodyFrame()
                prot.setWorkingDir(str(self.folder / "frames"))
                prot.analyzeRun.set(analysis)
                for name, value in dict(groupBy=groupBy, bins=5, mapBox=48, resolution=12.5, referenceGroup=2,
                                        maxAngle=15.0, refineResolution=6.5, interpolate=True).items():
                    getattr(prot, name).set(value)
                args = _recorded_args(prot, prot.framesStep, frames_command)
                self.assertEqual((args.particles, args.output, args.group_column, args.bins, args.maps),
                                 (str(self.folder / "analysis" / "extra" / "analysis" / "particles.star"),
                                  str(self.folder / "frames" / "extra" / "particles.star"), column, bins, None))
                self.assertEqual((args.box, args.resolution, args.reference, args.max_angle, args.refine_resolution,
                                  args.interpolate), (48, 12.5, 2, 15.0, 6.5, groupBy == DeepCryoProtVaeBodyFrame.GROUP_PC1))
        prot.referenceGroup.set(0)      # the mean of the groups' frames: the program's default, no --reference
        self.assertIsNone(_recorded_args(prot, prot.framesStep, frames_command).reference)
