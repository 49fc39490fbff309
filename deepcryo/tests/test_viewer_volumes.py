"""Volumes in the viewers (reconstruct, SwiftRefine): a map and its half maps open in ChimeraX through Scipion's
ChimeraX plugin when it is installed (here a stand-in ``chimera`` module put in ``sys.modules``), as central
sections when it is absent.

The viewers of DeepCryoProtReconstruct and DeepCryoProtSwiftRefine are given a map and half maps written here
(known voxel size and a non-default origin), without running the protocols.
"""
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import unittest
from unittest import mock

import numpy as np
from pwem.objects import Transform, Volume
from pyworkflow.tests import setupTestProject

from deepcryo.constants import OUTPUT_VOLUME
from deepcryo.core.mrc import write_mrc
from deepcryo.protocols import DeepCryoProtReconstruct, DeepCryoProtSwiftRefine
from deepcryo.tests.harness import ProtocolTest, fakeChimeraModule
from deepcryo.viewers import DeepCryoReconstructViewer, DeepCryoSwiftRefineViewer
from deepcryo.viewers.volumes import CHIMERAX, SLICES, shared_contour_level

BOX, PX, ORIGIN = 16, 2.5, (-12.5, -20.0, -7.5)


class TestMapViewer(ProtocolTest):
    """The reconstruct viewer."""
    protocolClass, viewerClass = DeepCryoProtReconstruct, DeepCryoReconstructViewer

    @classmethod
    def setUpClass(cls):
        setupTestProject(cls)

    def setUp(self):
        self.prot = self.newProtocol(self.protocolClass)
        self.proj.saveProtocol(self.prot)
        os.makedirs(self.prot._getExtraPath(), exist_ok=True)
        rng = np.random.default_rng(1)
        self.paths = []
        for i, name in enumerate(("map.mrc", "half1.mrc", "half2.mrc")):
            path = self.prot._getExtraPath(name)
            write_mrc(path, rng.normal(size=(BOX,) * 3).astype(np.float32) * (i + 1), PX)
            self.paths.append(path)
        volume = Volume(location=self.paths[0])
        volume.setSamplingRate(PX)
        volume.setHalfMaps(self.paths[1:])
        origin = Transform()
        origin.setShifts(*ORIGIN)
        volume.setOrigin(origin)
        setattr(self.prot, OUTPUT_VOLUME, volume)

    def _viewer(self):
        viewer = self.viewerClass(project=self.proj, protocol=self.prot)
        viewer.setProtocol(self.prot)
        return viewer

    def testSlicesWithoutChimerax(self):
        with mock.patch.dict(sys.modules, {"chimera": None}):          # import chimera fails
            viewer = self._viewer()
            self.assertEqual(viewer.displayVolumes.get(), SLICES)
            viewer.displayVolumes.set(CHIMERAX)                         # asked for, but absent: slices
            views = viewer._getVisualizeDict()["doShowMaps"]("doShowMaps")
        self.assertEqual(len(views), 1)
        axes = views[0].getFigure().axes
        self.assertEqual(len(axes), 3 * 3)
        self.assertEqual([a.get_title() for a in axes[:3]], ["map", "half map 1", "half map 2"])
        views[0].close()
        self.assertFalse(os.path.exists(self.prot._getExtraPath("chimerax_maps.cxc")))

    def testChimeraxScript(self):
        """The .cxc opens the map and half maps by absolute path with the volume's voxel size and origin, one
        contour level (the 1 % of all their voxels), tiled; the plugin's runner gets it in the background."""
        program = self.proj.getTmpPath("ChimeraX")
        open(program, "w").close()
        calls = []
        with mock.patch.dict(sys.modules, {"chimera": fakeChimeraModule(program, calls)}):
            viewer = self._viewer()
            self.assertEqual(viewer.displayVolumes.get(), CHIMERAX)    # the default when installed
            self.assertEqual(viewer._showMaps(), [])
        script = os.path.abspath(self.prot._getExtraPath("chimerax_maps.cxc"))
        self.assertEqual(calls, [(program, '"%s" &' % script, os.path.dirname(script))])
        lines = open(script).read().splitlines()
        values = np.sort(np.concatenate([np.fromfile(p, np.float32, offset=1024) for p in self.paths]))
        rank = 0.99 * (len(values) - 1)                  # 1 % of the voxels above, linear between ranks
        low = int(rank)
        level = float(values[low] + (rank - low) * (values[low + 1] - values[low]))
        self.assertAlmostEqual(shared_contour_level(self.paths), level, places=4)
        self.assertEqual(lines[:3], ['open "%s"' % os.path.abspath(p) for p in self.paths])
        for i in range(3):
            words = lines[3 + i].split()
            self.assertEqual(words[:2], ["volume", "#%d" % (i + 1)])
            self.assertEqual(float(words[words.index("voxelSize") + 1]), PX)
            self.assertEqual(tuple(float(x) for x in words[words.index("origin") + 1].split(",")), ORIGIN)
            self.assertEqual(words[words.index("step") + 1], "1")
            self.assertAlmostEqual(float(words[words.index("level") + 1]), level, places=4)
        self.assertEqual(lines[6:], ["tile #1-3 columns 3 spacingFactor 1.2", "view"])

    @unittest.skipUnless(importlib.util.find_spec("chimera"), "scipion-em-chimera is not installed")
    def testChimeraxThroughTheRealPlugin(self):
        """scipion-em-chimera itself (its Plugin.getProgram, getEnviron and runChimeraProgram) starts the program
        in CHIMERA_HOME/bin with the script: here a stand-in ChimeraX that records what it was given."""
        home = tempfile.mkdtemp(prefix="chimerax_home_")
        self.addCleanup(shutil.rmtree, home, ignore_errors=True)
        record = os.path.join(home, "received.txt")
        os.makedirs(os.path.join(home, "bin"), exist_ok=True)
        program = os.path.join(home, "bin", "ChimeraX")
        with open(program, "w") as f:
            f.write('#!/bin/sh\necho "$1" > "%s.part"; cat "$1" >> "%s.part"; mv "%s.part" "%s"\n'
                    % (record, record, record, record))
        os.chmod(program, 0o755)
        import chimera
        with mock.patch.dict(os.environ, {"CHIMERA_HOME": home}):
            chimera.Plugin._defineVariables()
            self.assertEqual(chimera.Plugin.getProgram(), program)
            viewer = self._viewer()
            self.assertEqual(viewer.displayVolumes.get(), CHIMERAX)    # the default when installed
            self.assertEqual(viewer._showMaps(), [])
        for _ in range(100):                                           # the program runs in the background
            if os.path.exists(record):
                break
            time.sleep(0.1)
        script = os.path.abspath(self.prot._getExtraPath("chimerax_maps.cxc"))
        lines = open(record).read().splitlines()
        self.assertEqual(lines[0], script)
        self.assertEqual(lines[1:4], ['open "%s"' % os.path.abspath(p) for p in self.paths])

    def testChimeraxAbsentBinary(self):
        """A plugin whose ChimeraX program is missing counts as absent: slices."""
        with mock.patch.dict(sys.modules, {"chimera": fakeChimeraModule("/nonexistent/ChimeraX", [])}):
            viewer = self._viewer()
            self.assertEqual(viewer.displayVolumes.get(), SLICES)
            views = viewer._showMaps()
        self.assertEqual(len(views), 1)
        views[0].close()


class TestSwiftRefineMapViewer(TestMapViewer):
    """The same from the SwiftRefine viewer (one class: its output volume)."""
    protocolClass, viewerClass = DeepCryoProtSwiftRefine, DeepCryoSwiftRefineViewer
