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
"""pytest hooks: the Scipion environment (see :mod:`deepcryo.tests.harness`) in the report header; the shared
fixtures ``relion_rendered`` (particle sets rendered by relion_project, :mod:`deepcryo.tests.relion_data`) and
``ws`` (good and bad program inputs, :mod:`deepcryo.tests.bad_inputs`)."""
import os

from deepcryo.tests import harness
from deepcryo.tests.bad_inputs import ws  # noqa: F401  (fixture: good inputs and every bad file)
from deepcryo.tests.relion_data import relion_rendered  # noqa: F401  (fixture: particles rendered by RELION)


def pytest_report_header(config):
    if harness.PRIVATE_ROOT:
        return "scipion: private home %s (DEEPCRYO_KEEP_TEST_HOME=1 keeps it)" % harness.PRIVATE_ROOT
    return "scipion: existing configuration in %s" % os.environ.get("SCIPION_HOME")
