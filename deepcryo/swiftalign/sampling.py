"""Angular and shift sampling steps of SwiftAlign and SwiftRes, derived from a target resolution.

Two angular rules exist because they answer different questions: :func:`angular_step_for_diameter` is the
step at which a particle of diameter D shows a detail of size r (refinement, which knows the particle), and
:func:`angular_step_for_box` the step that moves the band edge of an N-pixel box by one Fourier pixel
(index training, which knows only the box).
"""

import math

__all__ = ["angular_step_for_diameter", "angular_step_for_box", "shift_step_for_resolution"]


def angular_step_for_diameter(resolution_A: float, diameter_A: float) -> float:
    """Angular step (degrees) for resolution ``resolution_A`` and particle diameter ``diameter_A``: asin(r / D)."""
    return math.degrees(math.asin(min(1.0, resolution_A / diameter_A)))


def angular_step_for_box(box: int, pixel_size_A: float, resolution_A: float) -> float:
    """Angular step (degrees) that moves the band edge by one Fourier pixel: ``asin(res / (N · px))``
    (Lauzirika's ΔΦ, eq. 4.20)."""
    return math.degrees(math.asin(min(1.0, resolution_A / (box * pixel_size_A))))


def shift_step_for_resolution(resolution_A: float, pixel_size_A: float) -> float:
    """Shift step (px): r / (4 · px), at least 0.5 px (Xmipp's rule)."""
    return max(0.5, resolution_A / (4.0 * pixel_size_A))
