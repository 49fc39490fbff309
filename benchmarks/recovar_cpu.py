"""Run a RECOVAR 1.0.5 command on the CPU with its JAX projector's upsampling fixed (benchmark-only).

RECOVAR reconstructs into a Fourier grid ``u`` times the image's (``upsampling_factor=2`` for its mean and its
state volumes). Its CUDA kernels scale each image's pixel frequencies by ``u`` before placing them on that grid
(``recovar.core.slicing._cuda_max_r``'s docstring says so); the JAX path that runs without a GPU
(``recovar.core.relion_interp.project`` / ``backproject``) does not, so every image lands in the central 1/u of the
grid and the map comes out magnified u times and cropped. Measured (benchmarks/RESULTS.md, "RECOVAR beside
deepcryo and cryoDRGN"): on 1 000 noiseless, centred, CTF-free ``relion_project`` projections of one map,
``pipeline --only-mean`` gives a mean whose correlation with the map is at best 0.25 over every axis order and
hand (0.38 allowing any shift), but 0.88 with the map's central half-box magnified twice; through this wrapper
1.00; cryoDRGN's ``backproject_voxel`` on the same files 0.99.

This wrapper runs the command named by its first argument (``pipeline``, ``compute_state``) after replacing those
two functions by the same functions given the rotations times ``u``: the points ``[kx, ky, 0] · u R`` are the
CUDA kernels' ``u [kx, ky, 0] · R``; radius clipping stays in image pixels, as there. Nothing else changes.
Use it with RECOVAR's own interpreter::

    /path/to/recovar-venv/bin/python benchmarks/recovar_cpu.py pipeline particles.star -o out --mask sphere ...
"""
import runpy
import sys

from recovar.core import relion_interp

_project, _backproject = relion_interp.project, relion_interp.backproject


def _upsampling(image_shape, volume_shape):
    return volume_shape[0] // image_shape[0]


def project(vol, rotations, image_shape, volume_shape, *args, **kwargs):
    return _project(vol, rotations * _upsampling(image_shape, volume_shape), image_shape, volume_shape,
                    *args, **kwargs)


def backproject(imgs, rotations, image_shape, volume_shape, *args, **kwargs):
    return _backproject(imgs, rotations * _upsampling(image_shape, volume_shape), image_shape, volume_shape,
                        *args, **kwargs)


relion_interp.project, relion_interp.backproject = project, backproject

if __name__ == "__main__":
    command = sys.argv.pop(1)
    sys.argv[0] = command
    runpy.run_module("recovar.commands." + command, run_name="__main__")
