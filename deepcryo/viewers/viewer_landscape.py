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
"""Viewer of DeepCryoProtVaeAnalyze: the conformational landscape, cluster volumes in order, latent traversal.

Everything is drawn from the files that ``python -m deepcryo.landscape analyze`` writes (``particles.star``
with ``dcPC1/2``, ``dcUMAP1/2``, ``dcCluster``; ``cluster_KK_{decoded,reconstructed}.mrc``;
``pcJ_stepSS.mrc``; ``summary.json``; ``bic.png``, ``fsc.png``) by plain functions that take the analysis
folder (:func:`load_analysis`) and fill a matplotlib figure; they need no display (a fresh
``matplotlib.figure.Figure`` when none is given, savable with ``fig.savefig``), and the viewer wraps the
same figures in Scipion ``Plotter`` views. Volumes are shown as projections along z and central xy sections,
in the analysis' intensity units; coordinates are in latent PCA (or UMAP) units. With Scipion's ChimeraX plugin
installed, the cluster volumes (tiled) and the traversal (a volume series) open in ChimeraX instead
(:mod:`deepcryo.viewers.volumes`).

Particles are selected on the landscape with a lasso (:class:`LandscapeLasso`): each stroke writes the particles
inside it to a selection file in the analysis' extra folder, and the button "Create subset" runs
:class:`DeepCryoProtVaeSelect` on that file, which outputs the subset of the training run's particles.
"""
import json
import os
import shutil
from glob import glob

import numpy as np

import pyworkflow.protocol.params as params
from pwem.viewers import EmProtocolViewer
from pyworkflow.gui.plotter import Plotter

from deepcryo.core.mrc import read_mrc
from deepcryo.core.particles import read_particles
from deepcryo.landscape.density import draw_density_panels
from deepcryo.landscape.selection import select_by_polygon, write_selection
from deepcryo.protocols import DeepCryoProtVaeAnalyze, DeepCryoProtVaeSelect
from deepcryo.viewers.volumes import (CHIMERAX, addVolumeDisplayParam, chimerax_plugin, run_chimera_script,
                                      volume_entries, write_chimera_script)

__all__ = ["load_analysis", "plot_landscape", "plot_cluster_volumes", "plot_traversal", "plot_png",
           "LandscapeLasso", "DeepCryoLandscapeViewer"]


def load_analysis(folder):
    """Dict with the analysis in ``folder``: ``pca`` (N, 2), ``umap`` (N, 2) or None, ``labels`` (N,) 1-based,
    ``ids`` (N,) the particles' Scipion ids (None for a STAR not written from Scipion),
    ``summary`` (summary.json), ``clusters`` [(decoded path, reconstructed path)] by cluster number and
    ``trajectories`` {PC number: [volume paths by step]} and ``order_trajectory`` [volume paths along ``dcOrder``,
    the landscape's order; empty for an analysis written before it]."""
    star = read_particles(os.path.join(folder, "particles.star"), require_images=False)
    p = star.particles
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    k = summary["clusters_used"]
    traj = {}
    for fn in sorted(glob(os.path.join(folder, "pc*_step*.mrc"))):
        pc = int(os.path.basename(fn)[2:].split("_")[0])
        traj.setdefault(pc, []).append(fn)
    return {
        "folder": folder,
        "pca": np.stack([np.asarray(p["dcPC1"], float), np.asarray(p["dcPC2"], float)], 1),
        "umap": (np.stack([np.asarray(p["dcUMAP1"], float), np.asarray(p["dcUMAP2"], float)], 1)
                 if "dcUMAP1" in p else None),
        "labels": np.asarray(p["dcCluster"], dtype=np.int64),
        "ids": np.asarray(p["rlnImageId"], dtype=np.int64) if "rlnImageId" in p else None,
        "summary": summary,
        "clusters": [tuple(os.path.join(folder, "cluster_%02d_%s.mrc" % (c, kind))
                           for kind in ("decoded", "reconstructed")) for c in range(1, k + 1)],
        "trajectories": traj,
        "order_trajectory": sorted(glob(os.path.join(folder, "order_step*.mrc"))),
    }


def _figure(fig, size):
    if fig is None:
        from matplotlib.figure import Figure
        fig = Figure(figsize=size, dpi=100)
    fig.clf()
    fig.set_size_inches(*size)
    return fig


def cluster_order(analysis):
    """Cluster numbers (1-based) ordered by the mean PC1 of their particles (left to right on the landscape)."""
    labels, pc1 = analysis["labels"], analysis["pca"][:, 0]
    k = len(analysis["clusters"])
    means = [pc1[labels == c].mean() if np.any(labels == c) else np.inf for c in range(1, k + 1)]
    return [int(c) + 1 for c in np.argsort(means)]


def plot_landscape(analysis, embedding="PCA", fig=None):
    """Landscape in three panels: particles coloured by cluster (cluster numbers at their centres),
    smoothed density, and −ln density (kT up to a constant) with the PC1 trajectory's path when PCA."""
    xy = analysis["umap"] if embedding == "UMAP" else analysis["pca"]
    if xy is None:
        raise ValueError("this analysis has no UMAP embedding (umap-learn was not installed or not asked for)")
    names = ("UMAP1", "UMAP2") if embedding == "UMAP" else ("PC1", "PC2")
    labels = analysis["labels"]
    fig = _figure(fig, (15, 4.6))
    ax = fig.subplots(1, 3)
    ax[0].scatter(xy[:, 0], xy[:, 1], c=labels, s=3, cmap="tab10", vmin=1, vmax=max(10, labels.max()))
    for c in np.unique(labels):
        centre = xy[labels == c].mean(0)
        ax[0].text(centre[0], centre[1], str(c), fontsize=12, weight="bold", ha="center", va="center",
                   bbox=dict(facecolor="white", alpha=0.7, lw=0))
    ax[0].set_title("%d particles, %d clusters" % (len(xy), len(np.unique(labels))))
    draw_density_panels(fig, ax[1], ax[2], xy)
    if embedding != "UMAP" and analysis["trajectories"].get(1):
        sd = np.asarray(analysis["summary"]["trajectory_sd"]) * xy[:, 0].std()
        ax[2].plot(sd, np.zeros_like(sd), "c.-", label="PC1 trajectory")
        ax[2].legend(fontsize=8, loc="upper right")
    for a in ax:
        a.set_xlabel(names[0])
        a.set_ylabel(names[1])
    fig.tight_layout()
    return fig


def _views(path):
    vol = read_mrc(path)[0]
    d = vol.shape[0]
    return vol.sum(0), vol[d // 2]


def plot_cluster_volumes(analysis, fig=None):
    """Cluster volumes in landscape order (by mean PC1): per cluster, the projection and central section
    of the decoded volume and of the volume reconstructed from its particles, with the particle count."""
    order = cluster_order(analysis)
    info = {c["cluster"]: c for c in analysis["summary"]["clusters"]}
    fig = _figure(fig, (2.2 * len(order) + 0.5, 9))
    ax = fig.subplots(4, len(order), squeeze=False)
    rows = ("decoded, projection", "decoded, central section", "reconstructed, projection",
            "reconstructed, central section")
    for j, c in enumerate(order):
        decoded, recon = analysis["clusters"][c - 1]
        images = list(_views(decoded)) + list(_views(recon))
        for i, img in enumerate(images):
            ax[i, j].imshow(img, cmap="gray", origin="lower")
            ax[i, j].set_xticks([])
            ax[i, j].set_yticks([])
            if j == 0:
                ax[i, j].set_ylabel(rows[i], fontsize=8)
        ax[0, j].set_title("cluster %d (%d)\nFSC0.5 %.0f Å" % (c, info[c]["particles"],
                                                             info[c]["decoded_vs_reconstructed_fsc05_A"]),
                           fontsize=9)
    fig.tight_layout()
    return fig


def plot_traversal(analysis, pc=1, fig=None):
    """Latent traversal along principal component ``pc`` (the decoded volumes from −2 to +2 SD) or, with ``pc =
    "order"``, along the landscape's order (``dcOrder``: volumes at equal-count bins along the curve the particles
    occupy, which a continuous motion follows where PC1 folds it), as projections (top) and central sections
    (bottom), and the difference of the last and first step."""
    paths = analysis["order_trajectory"] if pc == "order" else analysis["trajectories"].get(pc)
    if not paths:
        raise ValueError("the analysis has no trajectory along %s" % ("its order" if pc == "order" else "PC%d" % pc))
    sd = analysis["summary"]["trajectory_sd"]
    n = len(paths)
    fig = _figure(fig, (2.0 * (n + 1) + 0.5, 4.6))
    ax = fig.subplots(2, n + 1, squeeze=False)
    views = [_views(p) for p in paths]
    for j, (proj, sec) in enumerate(views):
        for i, img in enumerate((proj, sec)):
            ax[i, j].imshow(img, cmap="gray", origin="lower")
            ax[i, j].set_xticks([])
            ax[i, j].set_yticks([])
        ax[0, j].set_title("order bin %d/%d" % (j + 1, n) if pc == "order" else
                           "PC%d %+.1f SD" % (pc, sd[j] if j < len(sd) else np.nan), fontsize=9)
    for i in range(2):
        diff = views[-1][i] - views[0][i]
        lim = float(np.abs(diff).max()) or 1.0
        ax[i, n].imshow(diff, cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower")
        ax[i, n].set_xticks([])
        ax[i, n].set_yticks([])
    ax[0, n].set_title("last − first", fontsize=9)
    ax[0, 0].set_ylabel("projection", fontsize=8)
    ax[1, 0].set_ylabel("central section", fontsize=8)
    fig.tight_layout()
    return fig


def plot_png(path, title="", fig=None):
    """A PNG written by the analysis (``bic.png``, ``fsc.png``, ``landscape.png``) shown in a figure."""
    import matplotlib.image as mpimg
    img = mpimg.imread(path)
    fig = _figure(fig, (img.shape[1] / 100.0, img.shape[0] / 100.0))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(img)
    ax.axis("off")
    if title:
        ax.set_title(title)
    return fig


class LandscapeLasso:
    """Particle selection on the landscape with a lasso: each stroke around particles of the scatter selects
    those inside it (:func:`select_by_polygon`, even-odd rule), circles them in red and writes their ids to
    ``path`` (:func:`write_selection`, with the polygon drawn); the button "Create subset" calls
    ``on_create(path)``. The figure holds this object: matplotlib keeps only weak references to a widget's
    callbacks, and the viewer's plotter is dropped once shown."""

    def __init__(self, analysis, embedding="PCA", path="landscape_selection.txt", on_create=None, fig=None):
        from matplotlib.widgets import Button, LassoSelector
        xy = analysis["umap"] if embedding == "UMAP" else analysis["pca"]
        if xy is None:
            raise ValueError("this analysis has no UMAP embedding (umap-learn was not installed or not asked for)")
        if analysis["ids"] is None:
            raise ValueError("the analysis' particles.star has no rlnImageId: its particles are not a Scipion set")
        self.xy, self.ids, self.labels = xy, analysis["ids"], analysis["labels"]
        self.embedding, self.path, self.on_create = embedding, path, on_create
        self.selected = []
        self.fig = _figure(fig, (7.5, 7.2))
        self.fig.deepcryo_lasso = self
        self.ax = self.fig.add_axes([0.11, 0.15, 0.85, 0.77])
        self.ax.scatter(xy[:, 0], xy[:, 1], c=self.labels, s=4, cmap="tab10", vmin=1,
                        vmax=max(10, self.labels.max()), alpha=0.6)
        for c in np.unique(self.labels):
            centre = xy[self.labels == c].mean(0)
            self.ax.text(centre[0], centre[1], str(c), fontsize=12, weight="bold", ha="center", va="center",
                         bbox=dict(facecolor="white", alpha=0.7, lw=0), zorder=5)
        self.highlight = self.ax.scatter(np.empty(0), np.empty(0), s=14, facecolors="none", edgecolors="red",
                                         linewidths=0.8)
        self.outline, = self.ax.plot([], [], "k--", lw=1)
        names = ("UMAP1", "UMAP2") if embedding == "UMAP" else ("PC1", "PC2")
        self.fig.text(0.02, 0.04, "Each stroke replaces the selection;\nthe file keeps the last one.", fontsize=8)
        self.ax.set_xlabel(names[0])
        self.ax.set_ylabel(names[1])
        self.ax.set_title("Draw around particles to select them (%d particles)" % len(xy), fontsize=10)
        self.lasso = LassoSelector(self.ax, onselect=self.select)
        self.button = None
        if on_create is not None:
            self.button = Button(self.fig.add_axes([0.68, 0.02, 0.28, 0.06]), "Create subset")
            self.button.on_clicked(lambda _event: self.create())

    def select(self, vertices):
        """Select the particles inside the closed polygon ``vertices`` (the lasso's stroke); return their ids."""
        vertices = np.asarray(vertices, dtype=np.float64)
        if len(vertices) < 3:
            return self.selected
        self.selected = select_by_polygon(self.ids, self.xy, vertices)
        self.highlight.set_offsets(self.xy[np.isin(self.ids, self.selected)])
        closed = np.vstack([vertices, vertices[:1]])
        self.outline.set_data(closed[:, 0], closed[:, 1])
        write_selection(self.path, self.selected, self.embedding, vertices)
        self.ax.set_title("%d of %d particles selected (saved in %s)"
                          % (len(self.selected), len(self.xy), os.path.basename(self.path)), fontsize=10)
        self.fig.canvas.draw_idle()
        return self.selected

    def create(self):
        """``on_create(path)`` with the current selection (None when nothing is selected)."""
        if not self.selected:
            self.ax.set_title("Select particles first: draw around them", fontsize=10)
            self.fig.canvas.draw_idle()
            return None
        result = self.on_create(self.path)
        self.ax.set_title("%d particles: subset protocol launched (see the project window)" % len(self.selected),
                          fontsize=10)
        self.fig.canvas.draw_idle()
        return result


class DeepCryoLandscapeViewer(EmProtocolViewer):
    """Landscape of a landscape-VAE analysis coloured by cluster and by density (−ln density), the cluster
    volumes in landscape order (decoded and reconstructed), the latent traversal along a principal
    component, and the BIC and decoded-vs-reconstructed FSC plots; volumes in ChimeraX when its Scipion plugin
    is installed. Particles selected on the landscape with a lasso become a subset (DeepCryoProtVaeSelect)."""
    _label = "viewer landscape"
    _targets = [DeepCryoProtVaeAnalyze]

    EMBEDDINGS = ["PCA", "UMAP"]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        group = form.addGroup("Landscape")
        group.addParam("embedding", params.EnumParam, choices=self.EMBEDDINGS, default=0,
                       display=params.EnumParam.DISPLAY_HLIST, label="Embedding",
                       help="UMAP only when the analysis computed it.")
        group.addParam("doShowLandscape", params.LabelParam, label="Landscape (clusters, density, −ln density)")
        group.addParam("doSelectParticles", params.LabelParam,
                       label="Select particles on the landscape (lasso) → subset",
                       help="Draw around particles on the chosen embedding; the selection is saved in the "
                            "analysis' extra folder (landscape_selection.txt), and 'Create subset' runs "
                            "'landscape VAE select', whose output is those particles with their latent "
                            "coordinates.")
        group = form.addGroup("Volumes")
        addVolumeDisplayParam(group)
        group.addParam("doShowClusterVolumes", params.LabelParam, label="Cluster volumes in landscape order")
        group.addParam("pc", params.IntParam, default=1, validators=[params.GE(1)],
                       label="Principal component of the traversal")
        group.addParam("doShowTraversal", params.LabelParam, label="Latent traversal (volumes along the PC)")
        group.addParam("doShowOrderTraversal", params.LabelParam,
                       label="Traversal along the landscape's order",
                       help="Volumes at equal-count bins along dcOrder, each particle's place on the curve of the "
                            "landscape. A continuous motion can run along a curve whose two ends have the same "
                            "PC1 (the analysis' summary says when PC1 follows the order poorly); this traversal "
                            "follows the curve.")
        group = form.addGroup("Diagnostics")
        group.addParam("doShowBic", params.LabelParam, label="Gaussian-mixture BIC against K")
        group.addParam("doShowFsc", params.LabelParam, label="FSC decoded vs reconstructed")

    def _getVisualizeDict(self):
        return {"doShowLandscape": self._showLandscape, "doSelectParticles": self._selectParticles,
                "doShowClusterVolumes": self._showClusterVolumes,
                "doShowTraversal": self._showTraversal, "doShowOrderTraversal": self._showOrderTraversal,
                "doShowBic": self._showPng,
                "doShowFsc": self._showPng}

    def _analysis(self):
        return load_analysis(self.protocol._getExtraPath("analysis"))

    def _plotter(self, title):
        plotter = Plotter(windowTitle=title)
        plotter.figure.clf()
        return plotter

    def _showLandscape(self, paramName=None):
        embedding = self.EMBEDDINGS[self.embedding.get()]
        analysis = self._analysis()
        if embedding == "UMAP" and analysis["umap"] is None:
            return [self.errorMessage("This analysis has no UMAP embedding (umap-learn missing or not asked for).",
                                      title="No UMAP")]
        plotter = self._plotter("landscape (%s)" % embedding)
        plot_landscape(analysis, embedding, fig=plotter.getFigure())
        return [plotter]

    def _selectParticles(self, paramName=None):
        embedding = self.EMBEDDINGS[self.embedding.get()]
        plotter = self._plotter("select particles (%s)" % embedding)
        try:
            LandscapeLasso(self._analysis(), embedding, self.protocol._getExtraPath("landscape_selection.txt"),
                           on_create=self._createSubset, fig=plotter.getFigure())
        except ValueError as exc:
            plotter.close()
            return [self.errorMessage(str(exc), title="No selection possible")]
        return [plotter]

    def _createSubset(self, path):
        """Launch DeepCryoProtVaeSelect on a copy of the selection file ``path`` (numbered, so that each run
        keeps its own); return the protocol."""
        number = len(glob(self.protocol._getExtraPath("selection_*.txt"))) + 1
        kept = self.protocol._getExtraPath("selection_%03d.txt" % number)
        shutil.copy(path, kept)
        project = self.getProject()
        prot = project.newProtocol(DeepCryoProtVaeSelect, objLabel="landscape selection %d" % number,
                                   selectBy=DeepCryoProtVaeSelect.SELECT_FILE, selectionFile=kept)
        prot.analyzeRun.set(self.protocol)
        project.launchProtocol(prot)
        return prot

    def _chimerax(self):
        """The ChimeraX plugin when the user chose ChimeraX and it is installed, else None (slices)."""
        return chimerax_plugin() if self.displayVolumes.get() == CHIMERAX else None

    @staticmethod
    def _volumeEntry(path, sampling_A):
        """Voxel size and Scipion's origin of an analysis volume (as its outputs' volumes have them)."""
        from pwem.objects import Volume
        volume = Volume(location=path)
        volume.setSamplingRate(sampling_A)
        return volume_entries(volume)[0]

    def _openInChimerax(self, plugin, analysis, name, paths, layout, columns=None):
        px = analysis["summary"]["pixel_size_A"]
        script = write_chimera_script(self.protocol._getExtraPath(name), [self._volumeEntry(p, px) for p in paths],
                                      layout=layout, columns=columns)
        run_chimera_script(script, plugin)
        return []

    def _showClusterVolumes(self, paramName=None):
        analysis = self._analysis()
        plugin = self._chimerax()
        if plugin is not None:
            order = cluster_order(analysis)
            paths = ([analysis["clusters"][c - 1][0] for c in order]
                     + [analysis["clusters"][c - 1][1] for c in order])
            return self._openInChimerax(plugin, analysis, "chimerax_clusters.cxc", paths, "tile", columns=len(order))
        plotter = self._plotter("cluster volumes")
        plot_cluster_volumes(analysis, fig=plotter.getFigure())
        return [plotter]

    def _showTraversal(self, paramName=None):
        analysis = self._analysis()
        pc = self.pc.get()
        if pc not in analysis["trajectories"]:
            return [self.errorMessage("No trajectory along PC%d (the analysis has PC %s)."
                                      % (pc, sorted(analysis["trajectories"])), title="No trajectory")]
        return self._traversal(analysis, pc, analysis["trajectories"][pc], "pc%d" % pc, "PC%d" % pc)

    def _showOrderTraversal(self, paramName=None):
        analysis = self._analysis()
        if not analysis["order_trajectory"]:
            return [self.errorMessage("The analysis has no volumes along the landscape's order (it was written "
                                      "before they existed): run the analysis again.", title="No trajectory")]
        return self._traversal(analysis, "order", analysis["order_trajectory"], "order", "the landscape's order")

    def _traversal(self, analysis, pc, paths, name, title):
        """The volumes ``paths`` along ``pc`` (a PC number or "order", :func:`plot_traversal`) as a ChimeraX
        volume series (script ``chimerax_traversal_<name>.cxc``) when its plugin is there, else as slices."""
        plugin = self._chimerax()
        if plugin is not None:
            return self._openInChimerax(plugin, analysis, "chimerax_traversal_%s.cxc" % name, paths, "vseries")
        plotter = self._plotter("latent traversal along %s" % title)
        plot_traversal(analysis, pc, fig=plotter.getFigure())
        return [plotter]

    def _showPng(self, paramName=None):
        name = "bic.png" if paramName == "doShowBic" else "fsc.png"
        plotter = self._plotter(name)
        plot_png(self.protocol._getExtraPath("analysis", name), fig=plotter.getFigure())
        return [plotter]
