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

# -------------------------------------------------------------------------------------- output names
OUTPUT_VOLUME = "outputVolume"
OUTPUT_FSC = "outputFSC"
OUTPUT_PARTICLES = "outputParticles"
OUTPUT_CTF = "outputCTF"

# --------------------------------------------------------------------------- extra item attributes
#: Half-set label (1 or 2) of a particle, as RELION's ``rlnRandomSubset``; written to and read from STAR.
RANDOM_SUBSET_ATTR = "_rlnRandomSubset"
