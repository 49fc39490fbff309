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
in the analysis' intensity units; coordinates are in latent PCA (or UMAP) units.
"""
import json
import os
from glob import glob

import numpy as np

import pyworkflow.protocol.params as params
from pwem.viewers import EmProtocolViewer
from pyworkflow.gui.plotter import Plotter

from deepcryo.core.mrc import read_mrc
from deepcryo.core.particles import read_particles
from deepcryo.landscape.density import draw_density_panels
from deepcryo.protocols import DeepCryoProtVaeAnalyze

__all__ = ["load_analysis", "plot_landscape", "plot_cluster_volumes", "plot_traversal", "plot_png",
           "DeepCryoLandscapeViewer"]


def load_analysis(folder):
    """Dict with the analysis in ``folder``: ``pca`` (N, 2), ``umap`` (N, 2) or None, ``labels`` (N,) 1-based,
    ``summary`` (summary.json), ``clusters`` [(decoded path, reconstructed path)] by cluster number and
    ``trajectories`` {PC number: [volume paths by step]}."""
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
        "summary": summary,
        "clusters": [tuple(os.path.join(folder, "cluster_%02d_%s.mrc" % (c, kind))
                           for kind in ("decoded", "reconstructed")) for c in range(1, k + 1)],
        "trajectories": traj,
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
    """Latent traversal along principal component ``pc``: the decoded volumes from −2 to +2 SD, as
    projections (top) and central sections (bottom), and the difference of the last and first step."""
    paths = analysis["trajectories"].get(pc)
    if not paths:
        raise ValueError("the analysis has no trajectory along PC%d" % pc)
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
        ax[0, j].set_title("PC%d %+.1f SD" % (pc, sd[j] if j < len(sd) else np.nan), fontsize=9)
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


class DeepCryoLandscapeViewer(EmProtocolViewer):
    """Landscape of a landscape-VAE analysis coloured by cluster and by density (−ln density), the cluster
    volumes in landscape order (decoded and reconstructed), the latent traversal along a principal
    component, and the BIC and decoded-vs-reconstructed FSC plots."""
    _label = "viewer landscape"
    _targets = [DeepCryoProtVaeAnalyze]

    EMBEDDINGS = ["PCA", "UMAP"]

    def _defineParams(self, form):
        form.addSection(label="Visualization")
        form.addParam("embedding", params.EnumParam, choices=self.EMBEDDINGS, default=0,
                      display=params.EnumParam.DISPLAY_HLIST, label="Embedding",
                      help="UMAP only when the analysis computed it.")
        form.addParam("doShowLandscape", params.LabelParam, label="Landscape (clusters, density, −ln density)")
        form.addParam("doShowClusterVolumes", params.LabelParam, label="Cluster volumes in landscape order")
        form.addParam("pc", params.IntParam, default=1, validators=[params.GE(1)],
                      label="Principal component of the traversal")
        form.addParam("doShowTraversal", params.LabelParam, label="Latent traversal (volumes along the PC)")
        form.addParam("doShowBic", params.LabelParam, label="Gaussian-mixture BIC against K")
        form.addParam("doShowFsc", params.LabelParam, label="FSC decoded vs reconstructed")

    def _getVisualizeDict(self):
        return {"doShowLandscape": self._showLandscape, "doShowClusterVolumes": self._showClusterVolumes,
                "doShowTraversal": self._showTraversal, "doShowBic": self._showPng,
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

    def _showClusterVolumes(self, paramName=None):
        plotter = self._plotter("cluster volumes")
        plot_cluster_volumes(self._analysis(), fig=plotter.getFigure())
        return [plotter]

    def _showTraversal(self, paramName=None):
        analysis = self._analysis()
        pc = self.pc.get()
        if pc not in analysis["trajectories"]:
            return [self.errorMessage("No trajectory along PC%d (the analysis has PC %s)."
                                      % (pc, sorted(analysis["trajectories"])), title="No trajectory")]
        plotter = self._plotter("latent traversal along PC%d" % pc)
        plot_traversal(analysis, pc, fig=plotter.getFigure())
        return [plotter]

    def _showPng(self, paramName=None):
        name = "bic.png" if paramName == "doShowBic" else "fsc.png"
        plotter = self._plotter(name)
        plot_png(self.protocol._getExtraPath("analysis", name), fig=plotter.getFigure())
        return [plotter]
