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
"""Scipion particle sets with known truth for the tests, built in-process from a RELION STAR file.

The Scipion alignment matrices are made with scipion-em-relion's ``convert31`` reader formula through
``pwem.convert.transformations``, independently of :mod:`deepcryo.convert`, so tests of our converter
compare against Scipion's own convention.
"""
import os

import numpy as np
import pwem.convert.transformations as tfs
import pyworkflow.object as pwobj
from pwem.objects import Acquisition, CTFModel, Particle, SetOfParticles, Transform

from deepcryo.constants import RANDOM_SUBSET_ATTR
from deepcryo.core.particles import read_particles


def relionPoseToScipionMatrix(rot, tilt, psi, originXpx, originYpx):
    """Scipion ALIGN_PROJ matrix of a RELION pose (degrees, pixels), by the relion plugin's formula."""
    m = tfs.euler_matrix(*np.deg2rad([-rot, -tilt, -psi]), axes="szyz")
    m[:3, 3] = [-originXpx, -originYpx, 0.0]
    return np.linalg.inv(m)


def particleSetFromStar(starFn, sqliteFn, withAlignment=True, withCtf=True, subsets=None):
    """Write a SetOfParticles sqlite with the images, CTF and poses of a particle STAR file.

    ``subsets``: optional half-set labels (1/2) stored as ``_rlnRandomSubset``. Returns the set (open).
    """
    star = read_particles(starFn)
    px = star.pixel_size_A
    voltage, cs, ac = (float(star.optics_value(c)[0]) for c in
                       ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"))
    parts = SetOfParticles(filename=sqliteFn)
    parts.setSamplingRate(px)
    acq = Acquisition(voltage=voltage, sphericalAberration=cs, amplitudeContrast=ac, magnification=50000)
    parts.setAcquisition(acq)
    parts.setHasCTF(withCtf)
    if withAlignment:
        parts.setAlignmentProj()
    angles, origins = star.angles_deg(), star.origins_A() / px
    ctf = star.ctf_params()
    for i, (index0, path) in enumerate(star.image_refs()):
        p = Particle(location=(index0 + 1, os.path.abspath(path)))
        p.setSamplingRate(px)
        p.setAcquisition(acq.clone())
        if withCtf:
            p.setCTF(CTFModel(defocusU=ctf["defocus_u_A"][i], defocusV=ctf["defocus_v_A"][i],
                              defocusAngle=ctf["defocus_angle_deg"][i]))
        if withAlignment:
            p.setTransform(Transform(relionPoseToScipionMatrix(*angles[i], *origins[i])))
        if subsets is not None:
            setattr(p, RANDOM_SUBSET_ATTR, pwobj.Integer(int(subsets[i])))
        parts.append(p)
    parts.write()
    return parts


def importParticleSet(testCls, partSet, samplingRate, voltage=300.0, sphericalAberration=2.7,
                      amplitudeContrast=0.1):
    """Close ``partSet`` (a SetOfParticles sqlite) and import it into ``testCls``' project with
    ProtImportParticles (Scipion import); returns the finished import protocol."""
    from pwem.protocols import ProtImportParticles
    partSet.close()
    prot = testCls.newProtocol(ProtImportParticles, importFrom=ProtImportParticles.IMPORT_FROM_SCIPION,
                               sqliteFile=partSet.getFileName(), samplingRate=samplingRate, voltage=voltage,
                               sphericalAberration=sphericalAberration, amplitudeContrast=amplitudeContrast)
    testCls.launchProtocol(prot)
    return prot
