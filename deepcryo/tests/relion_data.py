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
"""Particle sets with known truth rendered by RELION's ``relion_project``, not by deepcryo's projector and CTF.

:mod:`deepcryo.core.simulate` renders test particles with deepcryo's own projector and CTF, so a convention
error shared by the simulator and the engine under test would cancel out. Here only the truth (map, poses,
origins, defocus) comes from deepcryo; RELION 3.1 renders the images from it:

1. per state (conformation), the truth STAR (RELION 3.1: optics table, ``rlnAngleRot/Tilt/Psi``,
   ``rlnOriginX/YAngst``, ``rlnDefocusU/V/Angle``) is written without images, and
   ``relion_project --i truth.mrc --ang truth.star --ctf`` renders the noiseless CTF-modulated projections
   (``proj.mrcs``; ``proj_stateNN.mrcs`` for several states), RELION's own pixels, used unchanged;
2. ``clean.star`` lists them with the truth (``rlnClassNumber`` = state) in the particles' order;
3. with an SNR, white Gaussian noise of variance σ² = mean variance of the noiseless images over the box / SNR
   (the definition of :func:`deepcryo.core.simulate.simulate_particles`) is added, seeded, into
   ``particles.mrcs`` / ``particles.star``. The noise is added here rather than with ``relion_project
   --add_noise --white_noise σ`` because RELION seeds its generator with one fixed seed: the renderings of two
   states would share their noise, image for image. White noise carries no convention.

The truth distributions are those of :func:`deepcryo.core.simulate.simulate_particles` (uniform rotations,
uniform origins, uniform mean defocus and astigmatism), so figures on a RELION-rendered set can be set
beside the in-house tests' figures on the same specification.

No pytest here, so the Scipion protocol tests (``deepcryo/tests``, run by ``scipion tests`` without pytest) render
their data with :func:`render` too. The engine tests use the session fixture ``relion_rendered`` of
``tests/relion_data.py`` (registered in ``tests/conftest.py``): a factory ``relion_rendered(RenderSpec(...)) ->
RelionSet`` that renders each spec once per test session and skips the test with :data:`SKIP_REASON` where
``relion_project`` is not installed.
"""
import dataclasses
import json
import os
import shutil
import subprocess
from typing import List, Optional, Tuple

import numpy as np

from deepcryo.core.mrc import read_mrc, write_mrc
from deepcryo.core.particles import ParticleStar, make_optics, read_particles, write_particles
from deepcryo.core.simulate import phantom_states, phantom_volume, random_poses

RELION_PROJECT = shutil.which("relion_project")
SKIP_REASON = ("RELION's relion_project is not installed (scripts/test.sh installs RELION 3.1, Debian package "
               "relion, when run as root)")


@dataclasses.dataclass(frozen=True)
class RenderSpec:
    """What to render. ``snr`` None: noiseless. ``states`` > 1: :func:`phantom_states` (the phantom's domain turned
    about its hinge by 0 … ``hinge_deg`` in ``states`` equal steps; many states sample a continuous motion) with
    the particles split evenly at random between them. Units: px, Å, kV, mm, degrees."""
    n: int
    box: int = 64
    pixel_size_A: float = 2.0
    snr: Optional[float] = 0.1
    seed: int = 0
    volume_seed: int = 0
    states: int = 1
    max_shift_px: float = 3.0
    defocus_range_A: Tuple[float, float] = (15000.0, 25000.0)
    astigmatism_A: float = 500.0
    voltage_kV: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    hinge_deg: float = 35.0


@dataclasses.dataclass
class RelionSet:
    """A rendered set: ``star`` is the noisy STAR (the noiseless one when ``spec.snr`` is None), ``clean_star``
    the noiseless one; both carry the true poses, origins, CTF and state. ``volumes``/``volume_paths``: the true
    map of each state. ``snr``: measured from the images (None when noiseless)."""
    spec: RenderSpec
    folder: str
    volumes: List[np.ndarray]
    volume_paths: List[str]
    truth: ParticleStar
    clean_star: str
    star: str
    noise_sigma: float
    snr: Optional[float]

    @property
    def volume(self) -> np.ndarray:
        return self.volumes[0]


def truth_particles(spec: RenderSpec) -> ParticleStar:
    """The true poses (deg), origins (Å), CTF and state (``rlnClassNumber``, 1-based) of ``spec``, seeded, as a
    STAR without images."""
    rng = np.random.default_rng(spec.seed)
    n = spec.n
    angles = random_poses(n, rng)
    origins_A = rng.uniform(-spec.max_shift_px, spec.max_shift_px, size=(n, 2)) * spec.pixel_size_A
    mean_A = rng.uniform(*spec.defocus_range_A, size=n)
    astig_A = rng.uniform(0, spec.astigmatism_A, size=n)
    particles = {
        "rlnOpticsGroup": np.ones(n, dtype=np.int64),
        "rlnDefocusU": mean_A + astig_A / 2, "rlnDefocusV": mean_A - astig_A / 2,
        "rlnDefocusAngle": rng.uniform(0, 180, size=n),
        "rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1], "rlnAnglePsi": angles[:, 2],
        "rlnOriginXAngst": origins_A[:, 0], "rlnOriginYAngst": origins_A[:, 1],
        "rlnClassNumber": rng.permutation(np.arange(n) % spec.states) + 1,
    }
    optics = make_optics(spec.pixel_size_A, spec.box, spec.voltage_kV, spec.cs_mm, spec.amplitude_contrast)
    return ParticleStar(optics, particles, ".")


def relion_project(folder: str, map_name: str, star_name: str, out_root: str, pixel_size_A: float,
                   options=("--ctf",)) -> str:
    """Run ``relion_project --i map --ang star --angpix px --o out_root [options]`` in ``folder``; returns the
    path of the output STAR (its stack is ``out_root.mrcs``). RuntimeError with RELION's output on failure."""
    cmd = [RELION_PROJECT, "--i", map_name, "--ang", star_name, "--angpix", repr(float(pixel_size_A)),
           "--o", out_root] + list(options)
    done = subprocess.run(cmd, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    star = os.path.join(folder, out_root + ".star")
    if done.returncode != 0 or not os.path.exists(star):
        raise RuntimeError("relion_project failed (%s): %s" % (" ".join(cmd), done.stdout[-2000:]))
    return star


def _with_images(truth, names, directory):
    star = truth.copy()
    star.particles["rlnImageName"] = np.asarray(names, dtype=object)
    star.directory = directory
    return star


def render(folder: str, spec: RenderSpec) -> RelionSet:
    """Render ``spec`` into ``folder`` with relion_project (see the module docstring); reuses a finished
    rendering of the same spec found there."""
    if RELION_PROJECT is None:
        raise RuntimeError(SKIP_REASON)
    os.makedirs(folder, exist_ok=True)
    record = os.path.join(folder, "spec.json")
    truth = truth_particles(spec)
    single = spec.states == 1
    names = ["truth.mrc"] if single else ["truth_state%02d.mrc" % (k + 1) for k in range(spec.states)]
    wanted = json.loads(json.dumps(dataclasses.asdict(spec)))
    done = None
    if os.path.exists(record):
        with open(record) as f:
            done = json.load(f)
    if done is None or done["spec"] != wanted:
        vols = [phantom_volume(spec.box, seed=spec.volume_seed)] if single else \
            phantom_states(spec.box, spec.states, seed=spec.volume_seed, angle_deg=spec.hinge_deg)
        state = np.asarray(truth.particles["rlnClassNumber"]) - 1
        images = np.empty((spec.n, spec.box, spec.box), np.float32)
        image_names = np.empty(spec.n, dtype=object)
        for k, (vol, name) in enumerate(zip(vols, names)):
            idx = np.nonzero(state == k)[0]
            root = "proj" if single else "proj_state%02d" % (k + 1)
            write_mrc(os.path.join(folder, name), vol, spec.pixel_size_A)
            write_particles(os.path.join(folder, root + "_truth.star"), truth.subset(idx))
            out = read_particles(relion_project(folder, name, root + "_truth.star", root, spec.pixel_size_A))
            # RELION read back our truth: the same poses, origins and defoci
            assert np.allclose(out.angles_deg(), truth.angles_deg()[idx], atol=1e-3)
            assert np.allclose(out.origins_A(), truth.origins_A()[idx], atol=1e-4)
            images[idx], _ = read_mrc(os.path.join(folder, root + ".mrcs"))
            image_names[idx] = ["%06d@%s.mrcs" % (i + 1, root) for i in range(len(idx))]
        write_particles(os.path.join(folder, "clean.star"), _with_images(truth, image_names, folder))
        sigma, snr, star = 0.0, None, "clean.star"
        if spec.snr is not None:
            signal_var = float(images.var(axis=(1, 2)).mean())
            sigma = float(np.sqrt(signal_var / spec.snr))
            noise = np.random.default_rng([spec.seed, 1]).normal(size=images.shape).astype(np.float32) * sigma
            snr = signal_var / float(noise.var(axis=(1, 2)).mean())
            write_mrc(os.path.join(folder, "particles.mrcs"), images + noise, spec.pixel_size_A, is_stack=True)
            star = "particles.star"
            write_particles(os.path.join(folder, star), _with_images(
                truth, ["%06d@particles.mrcs" % (i + 1) for i in range(spec.n)], folder))
        done = {"spec": wanted, "noise_sigma": sigma, "snr": snr, "star": star}
        with open(record, "w") as f:
            json.dump(done, f)
    vols = [read_mrc(os.path.join(folder, name))[0] for name in names]
    return RelionSet(spec, folder, vols, [os.path.join(folder, name) for name in names], truth,
                     os.path.join(folder, "clean.star"), os.path.join(folder, done["star"]), done["noise_sigma"],
                     done["snr"])

