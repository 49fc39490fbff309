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
"""Prepares the headless Scipion environment of the tests (see :mod:`deepcryo.scipion_env`).

Import this module before pyworkflow: pyworkflow reads its configuration from the environment once,
when it is first imported. ``deepcryo/tests/__init__.py`` imports it first.
"""
from deepcryo import scipion_env

PRIVATE_ROOT = scipion_env.setup()
