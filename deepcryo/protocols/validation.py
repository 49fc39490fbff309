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
"""Checks shared by the protocols' ``_validate``: one line per problem, naming the input and the problem.

The programs check the same things again (the protocols only catch them before anything runs).
"""
import os
import re
import shlex
import subprocess

from deepcryo.constants import SYMMETRY_NAMES, SYMMETRY_PATTERN


def _label(imgSet, what):
    return "%s (%s)" % (what, imgSet.getFileName())


def acquisitionErrors(imgSet, what="Input set"):
    """Errors for an empty closed set, a missing pixel size or absurd acquisition values (voltage <= 0 kV,
    negative Cs, amplitude contrast outside [0, 1))."""
    errors = []
    label = _label(imgSet, what)
    size = imgSet.getSize()
    if size == 0 and (not hasattr(imgSet, "isStreamClosed") or imgSet.isStreamClosed()):
        errors.append("%s: the set is empty." % label)
    sr = imgSet.getSamplingRate()
    if not sr or sr <= 0:
        errors.append("%s: no valid pixel size (%s Å/px)." % (label, sr))
    acq = imgSet.getAcquisition()
    if acq is None:
        return errors + ["%s: no acquisition (voltage, Cs, amplitude contrast)." % label]
    voltage, cs, ac = acq.getVoltage(), acq.getSphericalAberration(), acq.getAmplitudeContrast()
    if voltage is None or not voltage > 0:
        errors.append("%s: voltage must be > 0 kV (got %s)." % (label, voltage))
    if cs is None or cs < 0:
        errors.append("%s: spherical aberration (Cs) must be >= 0 mm (got %s)." % (label, cs))
    if ac is None or not 0 <= ac < 1:
        errors.append("%s: amplitude contrast must be in [0, 1) (got %s)." % (label, ac))
    return errors


def defocusModelErrors(path):
    """Errors for a user-supplied defocus model file: missing, or not a deepcryo defocus model. The file is
    checked by the programs' Python (``python -m deepcryo.defocus check-model``, run with ``DEEPCRYO_PYTHON``:
    Scipion's own Python may have no torch), which reads it with ``torch.load(weights_only=True)``, never
    executing code; its one ``error:`` line becomes the message."""
    if not path or not os.path.exists(path):
        return ["Trained model %s: file not found." % path]
    from deepcryo import Plugin
    command = Plugin.getProgram("defocus", "check-model", "--model", shlex.quote(path))
    done = subprocess.run(command, shell=True, env=Plugin.getEnviron(), capture_output=True, text=True)
    if done.returncode == 0:
        return []
    lines = done.stderr.strip().splitlines() or ["exit status %d" % done.returncode]
    error = next((line for line in lines if line.startswith("error: ")), None)
    if error is not None:
        return ["Trained model %s" % error[len("error: "):]]
    return ["Trained model %s: could not be checked with %s (%s)." % (path, Plugin.getPython(), lines[-1])]


def symmetryErrors(name):
    """Errors for a point-group name that RELION (and ``core.geometry.symmetry_matrices``) does not accept."""
    if re.match(SYMMETRY_PATTERN, name or ""):
        return []
    return ["Unknown symmetry group '%s': use one of RELION's names (any case): %s; e.g. c1, d7, i."
            % (name, SYMMETRY_NAMES)]


def particleErrors(particles, noCtfMessage):
    """:func:`acquisitionErrors` of the input particles, and ``noCtfMessage`` when they have no CTF."""
    errors = acquisitionErrors(particles, "Input particles")
    if not particles.hasCTF():
        errors.append(noCtfMessage)
    return errors
