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
"""deepcryo's Scipion tests: the plugin, conversions and protocols (headless Scipion), ``unittest.TestCase``
classes (pyworkflow's ``BaseTest`` for protocol runs) that need no pytest, as a plain ``scipion3 installp`` has
none. The engine tests (pytest, no Scipion needed) are in the repository's ``tests/`` folder.

Run with ``python -m scipion tests deepcryo.tests`` (``--grep deepcryo`` lists them, ``--run`` runs them) or
``pytest deepcryo/tests``; :mod:`.harness` (imported first) prepares the Scipion environment.
"""
import os

from . import harness  # noqa: F401 -- must run before pyworkflow is imported


def load_tests(loader, tests, pattern):
    """unittest hook: loading the package ``deepcryo.tests`` loads every ``test*.py`` module in it."""
    tests.addTests(loader.discover(start_dir=os.path.dirname(__file__), pattern=pattern or "test*.py"))
    return tests
