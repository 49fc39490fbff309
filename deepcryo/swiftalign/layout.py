"""The output folder of a SwiftRes refinement: its file names, saving an iteration and the final outputs,
resuming, and reading the history back. The refinement, the Scipion protocol and its viewer all go through
:class:`RefineLayout`, so the names are defined once.

Files (one class; with K classes the maps and FSC are ``it###_class###_half1.mrc`` and so on, 1-based):

* per iteration: ``it###_half1.mrc``, ``it###_half2.mrc``, ``it###_ref_half1.mrc``, ``it###_ref_half2.mrc``,
  ``it###_fsc.star``, ``it###_particles.star`` and, last, ``it###_model.json`` (the iteration's record: its
  history entry, the whole history, the settings, the number of classes and the state of the random
  generator). An iteration counts as done only when its model file exists;
* at the end: ``map.mrc``, ``half1.mrc``, ``half2.mrc``, ``fsc.star``, ``particles.star`` and, last,
  ``model.json`` (the last iteration's record with the final resolution): its presence says the final outputs
  are complete;
* ``work/``: temporaries of the alignment (removed at the end).

Every file is written atomically (:func:`deepcryo.core.files.atomic_output`).
"""
import glob
import json
import os
import re
import shutil
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from deepcryo.core.files import atomic_output
from deepcryo.core.mrc import read_mrc, write_mrc
from deepcryo.core.particles import ParticleStar, read_particles, write_particles
from deepcryo.core.resolution import write_fsc_star

__all__ = ["RefineLayout"]

MODEL = "model.json"
_ITERATION_MODEL = re.compile(r"it(\d{3})_model\.json$")


def _write_json(path: str, data: Dict[str, Any]) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)


def _read_json(path: str) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _copy(src: str, dst: str) -> None:
    with atomic_output(dst) as tmp:
        shutil.copyfile(src, tmp)


class RefineLayout:
    """The refinement folder ``output_dir`` of a run with ``n_classes`` classes (reading the history or the
    final resolution does not need the number of classes)."""

    def __init__(self, output_dir: str, n_classes: int = 1):
        self.output_dir = output_dir
        self.n_classes = n_classes

    # ---------------------------------------------------------------------------------------- names
    def path(self, what: str, iteration: Optional[int] = None) -> str:
        """File ``what`` shared by the classes, of ``iteration`` (None: the final one)."""
        prefix = "" if iteration is None else "it%03d_" % iteration
        return os.path.join(self.output_dir, prefix + what)

    def class_path(self, what: str, cls: int, iteration: Optional[int] = None) -> str:
        """File ``what`` of class ``cls`` (0-based; no class part with one class), of ``iteration`` (None: final)."""
        return self.path(what if self.n_classes == 1 else "class%03d_%s" % (cls + 1, what), iteration)

    @property
    def work_dir(self) -> str:
        return os.path.join(self.output_dir, "work")

    @property
    def final_model_path(self) -> str:
        return self.path(MODEL)

    def iteration_model_path(self, iteration: int) -> str:
        return self.path(MODEL, iteration)

    def iteration_particles_path(self, iteration: int) -> str:
        return self.path("particles.star", iteration)

    # ---------------------------------------------------------------------------------------- reading
    def completed_iterations(self) -> List[int]:
        """The iterations with an ``it###_model.json``, in order."""
        return sorted(int(m.group(1)) for p in glob.glob(os.path.join(self.output_dir, "it[0-9][0-9][0-9]_model.json"))
                      for m in [_ITERATION_MODEL.match(os.path.basename(p))] if m)

    def last_completed_iteration(self) -> int:
        """The highest iteration with an ``it###_model.json`` (0 when none)."""
        done = self.completed_iterations()
        return done[-1] if done else 0

    def read_iteration(self, iteration: int) -> Tuple[Dict[str, Any], ParticleStar, List[List[np.ndarray]]]:
        """What resuming after ``iteration`` needs: its record (``it###_model.json``), its particles and the
        references refs[k][h-1] it made for the next iteration."""
        record = _read_json(self.iteration_model_path(iteration))
        particles = read_particles(self.iteration_particles_path(iteration))
        refs = [[read_mrc(self.class_path("ref_half%d.mrc" % h, k, iteration))[0] for h in (1, 2)]
                for k in range(self.n_classes)]
        return record, particles, refs

    def finished_record(self, last_iteration: int) -> Optional[Dict[str, Any]]:
        """The final ``model.json`` when it exists and belongs to ``last_iteration`` (so the final outputs beside
        it are complete), else None."""
        try:
            record = _read_json(self.final_model_path)
        except (FileNotFoundError, ValueError):
            return None
        complete = record.get("iteration") == last_iteration and "history" in record \
            and "final_resolution_A" in record
        return record if complete else None

    def history(self) -> List[Dict[str, Any]]:
        """The per-iteration entries (list of dicts; empty before the first iteration): from ``model.json`` at
        the end, else (running, or a ``model.json`` that an earlier version's ``--continue`` wrote without them)
        from the last iteration's ``it###_model.json``."""
        if os.path.exists(self.final_model_path):
            record = _read_json(self.final_model_path)
            if "history" in record:
                return record["history"]
        done = sorted(f for f in os.listdir(self.output_dir) if _ITERATION_MODEL.match(f)) \
            if os.path.isdir(self.output_dir) else []
        if not done:
            return []
        return _read_json(os.path.join(self.output_dir, done[-1]))["history"]

    def final_resolution(self) -> Optional[float]:
        """``final_resolution_A`` of ``model.json`` (Å), or None before the end."""
        if not os.path.exists(self.final_model_path):
            return None
        return _read_json(self.final_model_path).get("final_resolution_A")

    def iteration_fsc_paths(self, class_number: Optional[int] = None) -> List[Tuple[int, str]]:
        """(iteration, path) of every ``it###_fsc.star`` (``class_number``, 1-based: ``it###_class###_fsc.star``),
        in order."""
        pattern = "it[0-9][0-9][0-9]_%sfsc.star" % ("" if class_number is None else "class%03d_" % class_number)
        return [(int(re.match(r"it(\d{3})", os.path.basename(path)).group(1)), path)
                for path in sorted(glob.glob(os.path.join(self.output_dir, pattern)))]

    # ---------------------------------------------------------------------------------------- writing
    def write_iteration(self, iteration: int, half_maps: Sequence[Sequence[np.ndarray]],
                        refs: Sequence[Sequence[np.ndarray]], curves: Sequence[np.ndarray], particles: ParticleStar,
                        record: Dict[str, Any], random_state: Dict[str, Any], pixel_size_A: float) -> None:
        """Save ``iteration``: per class k its half maps ``half_maps[k]``, next references ``refs[k]`` and FSC
        ``curves[k]``, then the ``particles``, then (last: it marks the iteration as done) the ``record`` with
        the generator's ``random_state``."""
        box = particles.box_size
        for k in range(self.n_classes):
            write_mrc(self.class_path("half1.mrc", k, iteration), half_maps[k][0], pixel_size_A)
            write_mrc(self.class_path("half2.mrc", k, iteration), half_maps[k][1], pixel_size_A)
            write_mrc(self.class_path("ref_half1.mrc", k, iteration), refs[k][0], pixel_size_A)
            write_mrc(self.class_path("ref_half2.mrc", k, iteration), refs[k][1], pixel_size_A)
            write_fsc_star(self.class_path("fsc.star", k, iteration), curves[k], box, pixel_size_A)
        write_particles(self.iteration_particles_path(iteration), particles)
        _write_json(self.iteration_model_path(iteration), dict(record, random_state=random_state))

    def copy_iteration_class_files(self, iteration: int, cls: int) -> None:
        """The final half maps and FSC of class ``cls`` copied from ``iteration`` (a class without a final
        reconstruction)."""
        for name in ("half1.mrc", "half2.mrc", "fsc.star"):
            _copy(self.class_path(name, cls, iteration), self.class_path(name, cls))

    def write_final_class(self, cls: int, half1: np.ndarray, half2: np.ndarray, curve: np.ndarray,
                          pixel_size_A: float) -> None:
        """The final half maps and their FSC of class ``cls``."""
        write_mrc(self.class_path("half1.mrc", cls), half1, pixel_size_A)
        write_mrc(self.class_path("half2.mrc", cls), half2, pixel_size_A)
        write_fsc_star(self.class_path("fsc.star", cls), curve, half1.shape[-1], pixel_size_A)

    def write_final_map(self, cls: int, volume: np.ndarray, pixel_size_A: float) -> None:
        write_mrc(self.class_path("map.mrc", cls), volume, pixel_size_A)

    def write_final_record(self, last_iteration: int, record: Dict[str, Any]) -> None:
        """``particles.star`` (the last iteration's), then ``model.json`` (last: it marks the final outputs as
        complete)."""
        _copy(self.iteration_particles_path(last_iteration), self.path("particles.star"))
        _write_json(self.final_model_path, record)

    def remove_final_record(self) -> None:
        """Remove ``model.json``: the final outputs beside it, if any, are those of an earlier iteration."""
        if os.path.exists(self.final_model_path):
            os.remove(self.final_model_path)
