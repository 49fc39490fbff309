"""FSC curves as numbers: the frequency of each shell, the resolution RELION reports at a threshold, the FSC
STAR file. numpy only: the Scipion side of the plugin reads and reports FSC curves in a Python that may have
no torch (the engines can live in their own environment, ``DEEPCRYO_PYTHON``); :mod:`deepcryo.core.fsc`
(which computes the curves, with torch) re-exports these functions.

Conventions (RELION 3.1's, read from its ``src/fftw.cpp`` getFSC and ``src/postprocessing.cpp``): shell k of
an N-voxel box (k = 0 … N/2) is the frequency ``k / (N · pixel_size_A)`` 1/Å; the resolution at a threshold
is that of the **last shell before the curve first drops below it**, not interpolated
(postprocessing.cpp: ``global_resol = XSIZE * angpix / i`` for the last i with FSC ≥ 0.143).
"""
import math

import numpy as np

from .star import write_star

__all__ = ["shell_frequencies", "resolution_shell", "fsc_resolution_A", "write_fsc_star"]


def shell_frequencies(box: int, pixel_size_A: float) -> np.ndarray:
    """Spatial frequency (1/Å) of each FSC shell."""
    return np.arange(box // 2 + 1) / (box * pixel_size_A)


def resolution_shell(curve: np.ndarray, threshold: float = 0.143) -> int:
    """The last shell k ≥ 1 before ``curve`` first drops below ``threshold`` (shell 0, the mean, is not looked
    at); 0 if shell 1 is already below, the last shell (Nyquist) if the curve never drops below."""
    below = np.nonzero(np.asarray(curve)[1:] < threshold)[0]
    return int(below[0]) if len(below) else len(curve) - 1


def fsc_resolution_A(curve: np.ndarray, pixel_size_A: float, threshold: float = 0.143) -> float:
    """Resolution (Å) that RELION reports for an FSC curve (N//2 + 1,) of an N-voxel box (N even): ``N ·
    pixel_size_A / k`` for the last shell k before the curve first drops below ``threshold``, no
    interpolation (:func:`resolution_shell`); Nyquist if it never drops, ``inf`` if shell 1 is below."""
    k = resolution_shell(curve, threshold)
    box = 2 * (len(curve) - 1)
    return float(box * pixel_size_A / k) if k > 0 else math.inf


def write_fsc_star(path: str, curve: np.ndarray, box: int, pixel_size_A: float) -> None:
    """Write an FSC curve as STAR (``rlnSpectralIndex``, ``rlnResolution`` 1/Å, ``rlnAngstromResolution``,
    ``rlnFourierShellCorrelation``)."""
    freqs = shell_frequencies(box, pixel_size_A)
    with np.errstate(divide="ignore"):
        ang = np.where(freqs > 0, 1.0 / np.maximum(freqs, 1e-30), 999.0)
    write_star(path, {"fsc": {"rlnSpectralIndex": np.arange(len(curve)), "rlnResolution": freqs,
                                 "rlnAngstromResolution": ang, "rlnFourierShellCorrelation": np.asarray(curve)}})
