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
"""``deepcryo.core.reconstruct --mask-diameter``: the half-map FSC in a soft sphere of the particle, corrected by
phase randomisation, and the one particle mask that SwiftRes and the reconstruction share."""
import subprocess
import sys

import numpy as np
import torch

from deepcryo.core import fsc, simulate
from deepcryo.core.mrc import read_mrc
from deepcryo.core.star import read_star
from deepcryo.swiftalign.references import refinement_mask

PX = 2.0


def _reconstruct(star, out, *extra):
    return subprocess.run([sys.executable, "-m", "deepcryo.core.reconstruct", "--particles", star, "--output", out,
                           "--halves", "--threads", "1", *extra], capture_output=True, text=True)


def _curve(path):
    return np.asarray(read_star(path)["fsc"]["rlnFourierShellCorrelation"], dtype=float)


def test_masked_fsc_of_the_particle_sphere(tmp_path):
    phantom = simulate.phantom_volume(32, seed=3)  # blobs within ~40 % of the 64 Å box
    star = simulate.write_particle_set(str(tmp_path / "p"), phantom, 800, PX, snr=0.05, seed=7)
    plain, masked = str(tmp_path / "plain.mrc"), str(tmp_path / "masked.mrc")
    r = _reconstruct(star, plain)
    assert r.returncode == 0, r.stderr
    r = _reconstruct(star, masked, "--mask-diameter", "48")
    assert r.returncode == 0, r.stderr
    assert "in a 48 A sphere" in r.stdout + r.stderr
    half1, _ = read_mrc(str(tmp_path / "masked_half1.mrc"))
    half2, _ = read_mrc(str(tmp_path / "masked_half2.mrc"))
    mask = fsc.particle_mask(32, PX, 48.0)
    expected = fsc.masked_fsc(half1, half2, mask.numpy(), seed=0)
    assert expected.mask_used  # the correction applied (the unmasked FSC fell below 0.8)
    np.testing.assert_allclose(_curve(str(tmp_path / "masked_fsc.star")), expected.corrected, atol=1e-5)
    unmasked = _curve(str(tmp_path / "plain_fsc.star"))
    np.testing.assert_allclose(unmasked, expected.unmasked, atol=1e-5)  # same halves, same maps
    # the solvent's noise outside the particle no longer lowers the FSC: a finer resolution
    assert fsc.fsc_resolution_A(expected.corrected, PX) < fsc.fsc_resolution_A(unmasked, PX)


def test_negative_mask_diameter_refused(tmp_path):
    r = _reconstruct(str(tmp_path / "none.star"), str(tmp_path / "m.mrc"), "--mask-diameter", "-5")
    assert r.returncode == 2 and "--mask-diameter must be >= 0" in r.stderr and "Traceback" not in r.stderr


def test_particle_mask_ends_at_the_diameter():
    """A soft sphere whose edge ends at the particle's radius (SwiftRes's automatic mask is this one)."""
    mask = fsc.particle_mask(64, 1.5, 60.0).numpy()
    radius_px = 60.0 / 2 / 1.5
    line = mask[32, 32, 32:]
    assert line[0] == 1.0 and line[int(radius_px) - 4] == 1.0
    assert np.all(line[int(np.ceil(radius_px)):] == 0) and 0 < line[int(radius_px) - 1] < 1
    assert torch.equal(refinement_mask(64, 1.5, 60.0), fsc.particle_mask(64, 1.5, 60.0))
