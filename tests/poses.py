"""Test helper: a particle STAR without its poses, the input of a refinement that must find them."""
from deepcryo.core.particles import read_particles, write_particles

#: Columns a refinement writes: Euler angles, origins and the class.
POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                "rlnClassNumber")


def strip_poses(star_path, out_path):
    """Write ``star_path`` without :data:`POSE_COLUMNS` to ``out_path``; returns ``out_path``."""
    star = read_particles(star_path)
    for column in POSE_COLUMNS:
        star.particles.pop(column, None)
    write_particles(out_path, star)
    return out_path
