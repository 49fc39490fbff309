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
"""A crafted model file: the classic pickle attack, a ``torch.save`` that runs code when it is unpickled. Every
program (``tests/test_security.py``, ``tests/bad_inputs.py``) and protocol (``test_protocol_bad_input.py``) that
reads a model must refuse it without running it."""
import torch


class Malicious:
    """A pickle payload that would create a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_file(path, marker, wrap=None):
    """``torch.save`` of a dict holding a code-running object (the classic model-file attack)."""
    payload = {"format": wrap, "model": Malicious(marker)} if wrap else Malicious(marker)
    torch.save(payload, path)
    return path
