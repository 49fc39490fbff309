"""Plain matplotlib figures (Agg, headless) shared by viewers, protocols' summaries and the demo.

No Scipion imports: every function takes arrays and writes or returns a figure.
"""
import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_fsc_curves", "fsc_table"]


def plot_fsc_curves(curves, pixel_size_A, path=None, thresholds=(0.143, 0.5), title="Fourier shell correlation"):
    """Plot FSC curves ``{label: curve}`` against resolution (1/Å) with threshold lines; save to ``path``.

    Returns the matplotlib figure (closed after saving when ``path`` is given).
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, curve in curves.items():
        curve = np.asarray(curve)
        box = 2 * (len(curve) - 1)
        freq = np.arange(len(curve)) / (box * pixel_size_A)
        ax.plot(freq, curve, label=label)
    for t in thresholds:
        ax.axhline(t, color="0.5", lw=0.8, ls="--")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title)
    ax.legend(loc="lower left")
    top = ax.secondary_xaxis("top", functions=(lambda f: f, lambda f: f))
    ticks = ax.get_xticks()
    top.set_xticks(ticks[ticks > 0])
    top.set_xticklabels(["%.1f" % (1 / t) for t in ticks[ticks > 0]])
    top.set_xlabel("resolution (Å)")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def fsc_table(curves, pixel_size_A, step=4):
    """A text table of FSC curves ``{label: curve}``: one row every ``step`` shells, resolution in Å."""
    labels = list(curves)
    first = np.asarray(curves[labels[0]])
    box = 2 * (len(first) - 1)
    lines = ["%6s %10s " % ("shell", "res (Å)") + " ".join("%14s" % lab[:14] for lab in labels)]
    for k in list(range(step, len(first), step)) + ([len(first) - 1] if (len(first) - 1) % step else []):
        res = box * pixel_size_A / k
        lines.append("%6d %10.2f " % (k, res) + " ".join("%14.3f" % np.asarray(curves[lab])[k] for lab in labels))
    return "\n".join(lines)
