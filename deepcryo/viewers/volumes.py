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
"""Showing volumes: in ChimeraX through Scipion's ChimeraX plugin when it is installed, as slices otherwise.

ChimeraX is run the way scipion-em-chimera's own viewers run it: a ``.cxc`` command script in the protocol's
extra folder, handed to ``chimera.Plugin.runChimeraProgram(Plugin.getProgram(), script)`` in the background.
The plugin (PyPI ``scipion-em-chimera``, module ``chimera``) is optional: :func:`chimerax_plugin` returns None
when it cannot be imported or its ChimeraX binary is not installed, and the viewers then draw slices.

The script sets, for every volume, the voxel size (Å) and origin (Å, the position of voxel (0, 0, 0), as
Scipion's ``Volume.getOrigin(force=True)`` gives it and scipion-em-chimera writes it), step 1 (full
resolution; ChimeraX shows large maps at step 2 by default) and one contour level shared by all the volumes
shown together, so that cluster maps or the frames of a trajectory are compared at the same threshold.
"""
import logging
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from deepcryo.core.mrc import read_mrc

logger = logging.getLogger(__name__)

__all__ = ["ChimeraVolume", "shared_contour_level", "write_chimera_script", "chimerax_plugin", "run_chimera_script",
           "volume_entries", "plot_volume_slices", "show_map_and_half_maps", "addVolumeDisplayParam"]

#: Layouts of :func:`write_chimera_script`: side by side, or a volume series (trajectory) played as a movie.
LAYOUTS = ("tile", "vseries")


@dataclass(frozen=True)
class ChimeraVolume:
    """One volume to open: its MRC file, voxel size (Å) and origin (Å, position of voxel (0, 0, 0))."""
    path: str
    sampling_A: float
    origin_A: Tuple[float, float, float]


def shared_contour_level(paths: Sequence[str], enclosed_fraction: float = 0.01) -> float:
    """The density level above which lie ``enclosed_fraction`` of the voxels of all the volumes together
    (ChimeraX's own initial level is the 1 % rule applied to each map alone; one level for all of them
    keeps differences between the maps visible instead of normalising them away)."""
    values = np.concatenate([read_mrc(p)[0].ravel() for p in paths])
    return float(np.quantile(values, 1.0 - enclosed_fraction))


def write_chimera_script(path: str, volumes: Sequence[ChimeraVolume], layout: str = "tile",
                       level: Optional[float] = None, columns: Optional[int] = None) -> str:
    """Write a ChimeraX command script (``.cxc``) that opens ``volumes`` and returns ``path``.

    ``layout``: ``"tile"`` (side by side, ``columns`` per row) or ``"vseries"`` (one model whose frames are
    the volumes, played back and forth: a latent trajectory). ``level``: contour level for all volumes (default
    :func:`shared_contour_level`). File names are absolute and quoted (project folders may hold spaces).
    """
    if layout not in LAYOUTS:
        raise ValueError("layout must be one of %s, not %r" % (LAYOUTS, layout))
    if not volumes:
        raise ValueError("no volume to show")
    if level is None:
        level = shared_contour_level([v.path for v in volumes])
    quoted = ['"%s"' % os.path.abspath(v.path) for v in volumes]
    lines = []
    if layout == "vseries":
        lines.append("open %s vseries true" % " ".join(quoted))
        models = ["#1.%d" % (i + 1) for i in range(len(volumes))]
    else:
        lines += ["open %s" % q for q in quoted]
        models = ["#%d" % (i + 1) for i in range(len(volumes))]
    for model, vol in zip(models, volumes):
        lines.append("volume %s voxelSize %g origin %g,%g,%g step 1 level %g style surface"
                     % ((model, vol.sampling_A) + tuple(vol.origin_A) + (level,)))
    if layout == "tile" and len(volumes) > 1:
        lines.append("tile #1-%d columns %d spacingFactor 1.2" % (len(volumes), columns or len(volumes)))
    lines.append("view")
    if layout == "vseries":
        lines.append("vseries play #1 loop true direction oscillate")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def chimerax_plugin():
    """Scipion's ChimeraX plugin class (``chimera.Plugin``) when the plugin is importable and its ChimeraX
    program exists, else None (then volumes are shown as slices)."""
    try:
        from chimera import Plugin
    except Exception as exc:  # absent, or a broken install: never let it break the viewer
        logger.debug("no ChimeraX plugin: %s", exc)
        return None
    try:
        program = Plugin.getProgram()
    except Exception as exc:
        logger.debug("ChimeraX plugin without a program: %s", exc)
        return None
    return Plugin if program and os.path.exists(program) else None


def run_chimera_script(script: str, plugin=None) -> None:
    """Open the ``.cxc`` ``script`` in ChimeraX through the plugin, in the background (as its viewers do)."""
    plugin = plugin or chimerax_plugin()
    if plugin is None:
        raise RuntimeError("ChimeraX (Scipion plugin scipion-em-chimera) is not installed")
    plugin.runChimeraProgram(plugin.getProgram(), '"%s" &' % os.path.abspath(script),
                             cwd=os.path.dirname(os.path.abspath(script)))


def volume_entries(volume, withHalfMaps=False):
    """:class:`ChimeraVolume` entries of a Scipion ``Volume`` (and of its half maps, which share its voxel
    size and origin)."""
    origin = tuple(float(x) for x in volume.getOrigin(force=True).getShifts())
    paths = [volume.getFileName()]
    if withHalfMaps and volume.hasHalfMaps():
        paths += [str(p) for p in volume.getHalfMaps(asList=True)]
    return [ChimeraVolume(p, volume.getSamplingRate(), origin) for p in paths]


def plot_volume_slices(labelled_paths, fig=None):
    """Central sections (xy, xz, yz) of each volume: one column per ``(label, path)``, one row per plane, all
    with one grey scale per volume. Returns the figure (a new Agg ``Figure`` when none is given)."""
    if fig is None:
        from matplotlib.figure import Figure
        fig = Figure(dpi=100)
    fig.clf()
    n = len(labelled_paths)
    fig.set_size_inches(2.4 * n + 0.6, 7.2)
    ax = fig.subplots(3, n, squeeze=False)
    planes = ("xy (z = centre)", "xz (y = centre)", "yz (x = centre)")
    for j, (label, path) in enumerate(labelled_paths):
        vol = read_mrc(path)[0]
        d, h, w = vol.shape
        sections = (vol[d // 2], vol[:, h // 2, :], vol[:, :, w // 2])
        lo, hi = float(vol.min()), float(vol.max())
        for i, img in enumerate(sections):
            ax[i, j].imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi)
            ax[i, j].set_xticks([])
            ax[i, j].set_yticks([])
            if j == 0:
                ax[i, j].set_ylabel(planes[i], fontsize=8)
        ax[0, j].set_title(label, fontsize=9)
    fig.tight_layout()
    return fig


#: Choices of the viewers' "Show volumes with" parameter (:func:`addVolumeDisplayParam`).
SLICES, CHIMERAX = 0, 1


def addVolumeDisplayParam(form):
    """The viewers' "Show volumes with" choice: ChimeraX by default when its plugin is installed, else slices."""
    from pyworkflow.protocol import params
    form.addParam("displayVolumes", params.EnumParam, choices=["slices", "ChimeraX"],
                  default=CHIMERAX if chimerax_plugin() else SLICES,
                  display=params.EnumParam.DISPLAY_HLIST, label="Show volumes with",
                  help="ChimeraX needs Scipion's ChimeraX plugin (scipion-em-chimera) and its ChimeraX; without "
                       "them the volumes are shown as central sections. In ChimeraX several volumes are tiled "
                       "side by side (a trajectory is a volume series played back and forth), all at one "
                       "contour level.")


def show_map_and_half_maps(volume, script_path, display, title="map and half maps"):
    """Views of a Scipion ``Volume`` with its half maps: ChimeraX (tiled, script at ``script_path``) when
    ``display`` is :data:`CHIMERAX` and the plugin is installed, returning no view; else a Plotter of their
    central sections."""
    entries = volume_entries(volume, withHalfMaps=True)
    plugin = chimerax_plugin() if display == CHIMERAX else None
    if plugin is not None:
        run_chimera_script(write_chimera_script(script_path, entries, "tile"), plugin)
        return []
    from pyworkflow.gui.plotter import Plotter
    plotter = Plotter(windowTitle=title)
    plot_volume_slices([("half map %d" % i if i else "map", e.path) for i, e in enumerate(entries)],
                       fig=plotter.getFigure())
    return [plotter]
