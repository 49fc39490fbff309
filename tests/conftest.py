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
"""pytest setup of deepcryo's engine tests (this folder; run with ``pytest tests deepcryo/tests``, as
``scripts/test.sh`` does). The Scipion-facing tests (protocols, conversions, the plugin) are in ``deepcryo/tests``
and run without pytest too, under ``scipion tests deepcryo.tests``.

Here: the Scipion environment of :mod:`deepcryo.tests.harness`, prepared before any test imports pyworkflow, in
the report header; the shared fixtures ``relion_rendered`` (particle sets rendered by relion_project,
``relion_data.py``) and ``ws`` (good and bad program inputs, ``bad_inputs.py``). The helper modules of this folder
are imported by name (``from relion_data import ...``): pytest puts this folder, which is no package, on
``sys.path``."""
import os

from deepcryo.tests import harness

from bad_inputs import ws  # noqa: F401  (fixture: good inputs and every bad file)
from relion_data import relion_rendered  # noqa: F401  (fixture: particles rendered by RELION)


def pytest_report_header(config):
    if harness.PRIVATE_ROOT:
        return "scipion: private home %s (DEEPCRYO_KEEP_TEST_HOME=1 keeps it)" % harness.PRIVATE_ROOT
    return "scipion: existing configuration in %s" % os.environ.get("SCIPION_HOME")
