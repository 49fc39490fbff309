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
"""Constants shared by the deepcryo protocols, converters and the Plugin class (no Scipion imports)."""

# ---------------------------------------------------------------------------------- configuration
#: Python interpreter that runs the internal programs (``python -m deepcryo.<engine>``); it needs
#: torch, numpy, mrcfile, emtable (and faiss for swiftalign) and the ``deepcryo`` package itself.
DEEPCRYO_PYTHON = "DEEPCRYO_PYTHON"

#: Internal programs, run as ``python -m deepcryo.<engine>`` (see ``Plugin.getProgram``).
ENGINES = ("core.reconstruct", "core.simulate", "defocus", "swiftalign", "landscape")

# ----------------------------------------------------------------------------------------- symmetry
#: Point groups accepted by ``deepcryo.core.geometry.symmetry_matrices``: RELION's names, in any case (Cn,
#: Cnv, Cnh, Dn, Dnv, Dnh with 1 <= n <= 99; Sn with n even; Ci, Cs, T, Td, Th, O, Oh, I, I1-I4, Ih, I1h-I4h).
SYMMETRY_PATTERN = r"(?i)^\s*([CD][1-9][0-9]?[VH]?|S([2468]|[1-9][02468])|C[IS]|T[DH]?|OH?|I[1-4]?H?)\s*$"
#: The same names, as a user reads them (form help, error messages).
SYMMETRY_NAMES = ("C<n>, C<n>v, C<n>h, D<n>, D<n>v, D<n>h (1 <= n <= 99), S<n> (n even, 2 to 98), Ci, Cs, T, Td, "
                  "Th, O, Oh, I (= I2), I1, I2, I3, I4, Ih (= I2h), I1h, I2h, I3h, I4h")
#: Form help of every symmetry parameter.
SYMMETRY_HELP = ("Point group of the map, with RELION's names and operators (any case; relion_refine "
                 "--print_symmetry_ops --sym G lists them): cN (N-fold axis on z), dN (adds a 2-fold on x), t "
                 "(3-fold on z, a 2-fold at (0, 0.816, 0.577)), o (4-folds on x, y, z) and the icosahedral "
                 "settings: i = i2, RELION's default (2-folds on x, y, z, 5-fold at (±0.526, 0, 0.851) in the xz "
                 "plane); i1 (2-folds on x, y, z, 5-fold at (0, ±0.526, 0.851) in the yz plane); i3 (5-fold on z, "
                 "a 2-fold at (-0.526, 0, 0.851)); i4 (5-fold on z, a 2-fold at (0.526, 0, 0.851)). N from 1 to "
                 "99. Also the groups with mirrors or an inversion centre, which the map then has too: ci, cs, "
                 "cNv, cNh, sN (N even), dNv, dNh, td, th, oh, ih (= i2h), i1h-i4h. c1: no symmetry.")

# -------------------------------------------------------------------------------------- output names
#: Particle diameter assumed when none is given, as a fraction of the box side (box × pixel size): particles
#: are boxed with room around them, typically 1.2-1.5 × their diameter (SwiftRes's angular step and automatic
#: mask, the wizards' starting value).
DEFAULT_DIAMETER_BOX_FRACTION = 0.8

OUTPUT_VOLUME = "outputVolume"
OUTPUT_FSC = "outputFSC"
OUTPUT_PARTICLES = "outputParticles"
OUTPUT_CTF = "outputCTF"

# --------------------------------------------------------------------------- extra item attributes
#: Half-set label (1 or 2) of a particle, as RELION's ``rlnRandomSubset``; written to and read from STAR.
RANDOM_SUBSET_ATTR = "_rlnRandomSubset"
