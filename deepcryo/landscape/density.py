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
"""Density and free-energy-like maps of a 2D latent embedding, and their drawing.

Kept apart from the analysis (torch, the trained model) so that a viewer can draw them with numpy, scipy and
matplotlib only.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["free_energy", "draw_density_panels"]


def free_energy(xy: np.ndarray, bins: int = 60,
                smooth_bins: float = 1.5) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Smoothed 2D density of points ``xy`` (N, 2) and ``−ln density`` (NaN where empty), with bin edges."""
    from scipy.ndimage import gaussian_filter
    hist, ex, ey = np.histogram2d(xy[:, 0], xy[:, 1], bins=bins, density=True)
    dens = gaussian_filter(hist, smooth_bins)
    with np.errstate(divide="ignore"):
        energy = np.where(dens > dens.max() * 1e-3, -np.log(dens), np.nan)
    return dens, energy - np.nanmin(energy), ex, ey


def draw_density_panels(fig, ax_density, ax_energy, xy: np.ndarray) -> None:
    """Draw the smoothed density and the −ln density (kT, relative) of 2D coordinates ``xy`` (N, 2) on two
    matplotlib axes of ``fig`` (used by the analysis' ``landscape.png`` and by the Scipion viewer)."""
    dens, energy, ex, ey = free_energy(xy)
    ext = [ex[0], ex[-1], ey[0], ey[-1]]
    im = ax_density.imshow(dens.T, origin="lower", extent=ext, aspect="auto", cmap="viridis")
    fig.colorbar(im, ax=ax_density)
    ax_density.set_title("density")
    im = ax_energy.imshow(energy.T, origin="lower", extent=ext, aspect="auto", cmap="magma_r")
    fig.colorbar(im, ax=ax_energy)
    ax_energy.set_title("−ln density (kT, relative)")
