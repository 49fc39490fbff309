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
"""deepcryo's tests: engines (no Scipion needed), conversions and protocols (headless Scipion).

Run with ``pytest deepcryo/tests`` or ``python -m scipion tests deepcryo.tests``; :mod:`.harness`
(imported first) prepares the Scipion environment. Scipion's runner is unittest's: it runs the
``unittest.TestCase`` classes (protocol and conversion tests); the plain pytest functions of the
engine tests run under pytest only.
"""
import os

from . import harness  # noqa: F401 -- must run before pyworkflow is imported


def load_tests(loader, tests, pattern):
    """unittest hook: loading the package ``deepcryo.tests`` loads every ``test*.py`` module in it."""
    tests.addTests(loader.discover(start_dir=os.path.dirname(__file__), pattern=pattern or "test*.py"))
    return tests
