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
"""deepcryo's protocols (one import line per protocol: Scipion discovers them here)."""
from .protocol_reconstruct import DeepCryoProtReconstruct
from .protocol_defocus import DeepCryoProtDeepDefocus, DeepCryoProtDeepDefocusTrain
from .protocol_vae import (DeepCryoProtVaeTrain, DeepCryoProtVaeAnalyze, DeepCryoProtVaeSelect,
                           DeepCryoProtVaeVolumes)
from .protocol_bodyframe import DeepCryoProtVaeBodyFrame
from .protocol_swiftalign import DeepCryoProtSwiftAlign
from .protocol_swiftrefine import DeepCryoProtSwiftRefine
