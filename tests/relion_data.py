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
"""pytest side of the particle sets rendered by RELION's ``relion_project`` (the rendering itself, which needs
no pytest, is :mod:`deepcryo.tests.relion_data`, shared with the Scipion protocol tests): the mark
``requires_relion`` and the session fixture ``relion_rendered`` (registered in ``conftest.py``), a factory
``relion_rendered(RenderSpec(...)) -> RelionSet`` that renders each spec once per test session. Both skip the
test with :data:`SKIP_REASON` where ``relion_project`` is not installed.
"""
import dataclasses
import functools
import hashlib
import json
import os

import pytest

from deepcryo.tests.relion_data import (RELION_PROJECT, SKIP_REASON, RelionSet, RenderSpec,  # noqa: F401
                                        relion_project, render, truth_particles)

requires_relion = pytest.mark.skipif(RELION_PROJECT is None, reason=SKIP_REASON)


@pytest.fixture(scope="session")
def relion_rendered(tmp_path_factory):
    """Factory fixture: ``relion_rendered(spec) -> RelionSet``, each spec rendered once per session."""
    if RELION_PROJECT is None:
        pytest.skip(SKIP_REASON)
    root = str(tmp_path_factory.mktemp("relion_rendered"))

    @functools.lru_cache(maxsize=None)
    def get(spec: RenderSpec) -> RelionSet:
        key = hashlib.sha1(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
        return render(os.path.join(root, "n%d_box%d_%s" % (spec.n, spec.box, key)), spec)

    return get
