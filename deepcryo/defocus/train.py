"""Training of the defocus CNN, from simulation or from a STAR of micrographs + defocus labels.

* Inputs are made by :func:`deepcryo.defocus.psd.compute_psd` (the same function prediction uses) and
  can be cached in an ``.npz`` (``--cache``) to train several times on the same data.
* The split into training and validation is by micrograph, BEFORE any augmentation (no leakage).
* Augmentations (training batches only) are the 8 symmetries of the square applied to the PSD with
  the angle label transformed accordingly: a 90° rotation maps θ → θ + 90°, a mirror of x (or y)
  maps θ → −θ (:func:`augment`). U and V are unchanged.
* Adam, L1 loss (units of 10⁴ Å) on the mean defocus z = (U + V)/2 and on the astigmatism vector
  ``(a cos 2θ, a sin 2θ)``, a = (U − V)/2 (smooth at zero astigmatism, where the angle is meaningless); for
  the polar model also on its per-azimuth defocus profile. Learning rate halved on plateaus, early stopping
  on the validation MAE (Å).
* A checkpoint is written atomically after every epoch; ``resume=True`` continues from it. The best
  model so far is written (atomically) to the output weight file.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from ..core.errors import InputError, load_error_reason
from ..core.files import atomic_output, remove_stale_parts
from ..core.micrographs import random_micrograph_parameters, simulate_micrograph
from . import model as model_mod
from .psd import CNN_SAMPLINGS_A, CNN_SIZE_PX, compute_psd

logger = logging.getLogger(__name__)

__all__ = ["simulate_training_arrays", "star_training_arrays", "augment", "train", "save_arrays", "load_arrays",
           "evaluate", "validation_figures"]

CHECKPOINT_FORMAT = "deepcryo.defocus.checkpoint/1"


def _pack(psds, acq, labels):
    return {"psd": np.stack(psds).astype(np.float16), "acq": np.asarray(acq, dtype=np.float32),
            "labels": np.asarray(labels, dtype=np.float32)}


def simulate_training_arrays(n: int, size_px: int = 512, seed: int = 0, **ranges: Any) -> Dict[str, np.ndarray]:
    """Simulate ``n`` micrographs (``size_px``²; ``ranges`` as in
    :func:`deepcryo.core.micrographs.random_micrograph_parameters`) and return their model inputs:
    ``{"psd": (n, 3, S, S) float16, "acq": (n, 2) voltage kV / Cs mm, "labels": (n, 3) U Å, V Å, angle deg}``."""
    rng = np.random.default_rng(seed)
    psds, acq, labels = [], [], []
    for i in range(n):
        params = random_micrograph_parameters(rng, **ranges)
        image, truth = simulate_micrograph(size_px=size_px, seed=int(rng.integers(2 ** 31)), **params)
        psds.append(compute_psd(image, truth["pixel_size_A"])[0].numpy())
        acq.append((truth["voltage_kV"], truth["cs_mm"]))
        labels.append((truth["defocus_u_A"], truth["defocus_v_A"], truth["defocus_angle_deg"]))
        if (i + 1) % 200 == 0:
            logger.info("simulated %d/%d micrographs", i + 1, n)
    return _pack(psds, acq, labels)


def star_training_arrays(star_path: str, voltage_kV: Optional[float] = None, cs_mm: Optional[float] = None,
                         pixel_size_A: Optional[float] = None) -> Dict[str, np.ndarray]:
    """Model inputs from a STAR of micrographs with labels (``rlnMicrographName``, ``rlnDefocusU/V/Angle``;
    pixel size, voltage and Cs from ``rlnMicrographPixelSize``/``rlnVoltage``/``rlnSphericalAberration``
    columns, a ``data_optics`` block, or the arguments). Same dict as :func:`simulate_training_arrays`."""
    from ..core.mrc import read_mrc  # here, not at the top: training from simulations needs no mrcfile/emtable
    from ..core.star import read_star
    blocks = read_star(star_path)
    name = "micrographs" if "micrographs" in blocks else next(b for b in blocks if b != "optics")
    cols = blocks[name]
    for c in ("rlnMicrographName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"):
        if c not in cols:
            raise InputError("%s: no %s column (needed for training labels)" % (star_path, c))
    optics = blocks.get("optics", {})

    def value(column, override, i, what):
        if override is not None:
            return float(override)
        for table, row in ((cols, i), (optics, 0)):
            if column in table and len(table[column]):
                return float(table[column][row])
        raise InputError("%s: no %s (give --%s)" % (star_path, column, what))

    folder = os.path.dirname(os.path.abspath(star_path))
    if len(cols["rlnMicrographName"]) == 0:
        raise InputError("%s: no micrographs (empty table)" % star_path)
    psds, acq, labels = [], [], []
    for i, mic in enumerate(cols["rlnMicrographName"]):
        path = mic if os.path.isabs(mic) else os.path.join(folder, mic)
        image, header_px = read_mrc(path)
        px = pixel_size_A or (float(cols["rlnMicrographPixelSize"][i]) if "rlnMicrographPixelSize" in cols
                              else (float(optics["rlnMicrographPixelSize"][0]) if "rlnMicrographPixelSize" in optics
                                    else header_px))
        try:
            psds.append(compute_psd(image, px)[0].numpy())
        except InputError as exc:
            raise InputError("%s: %s" % (path, exc))
        acq.append((value("rlnVoltage", voltage_kV, i, "voltage"), value("rlnSphericalAberration", cs_mm, i, "cs")))
        if not (acq[-1][0] > 0 and acq[-1][1] >= 0):
            raise InputError("%s: row %d: voltage must be > 0 kV and Cs >= 0 mm" % (star_path, i + 1))
        labels.append((cols["rlnDefocusU"][i], cols["rlnDefocusV"][i], cols["rlnDefocusAngle"][i]))
        if (i + 1) % 100 == 0:
            logger.info("read %d micrographs", i + 1)
    return _pack(psds, acq, labels)


def save_arrays(path: str, arrays: Dict[str, np.ndarray]) -> None:
    """Cache training arrays in an ``.npz`` (atomically)."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_arrays(path: str) -> Dict[str, np.ndarray]:
    """Training arrays from :func:`save_arrays` (``image_model`` and ``phase_shift_deg`` too when there)."""
    try:
        with np.load(path) as data:
            return {k: data[k] for k in ("psd", "acq", "labels", "image_model", "phase_shift_deg")
                    if k in data or k in ("psd", "acq", "labels")}
    except (OSError, KeyError, ValueError) as exc:
        raise InputError("%s: not a deepcryo defocus training cache (%s)" % (path, exc))


def augment(psd: torch.Tensor, angle_deg: torch.Tensor, ops: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Apply square symmetries to centred PSDs (B, C, S, S) and transform the angle labels (B,) degrees.

    ``ops`` (B,) integers 0..7: bit 0 = mirror x (θ → −θ), bits 1-2 = number of 90° rotations
    (each θ → θ + 90°). The centre ``S // 2`` stays fixed (flip/rotate then roll by one pixel).
    """
    out, angles = psd.clone(), torch.as_tensor(angle_deg, dtype=torch.float32, device=psd.device).clone()
    for op in range(8):
        sel = ops.to(psd.device) == op
        if not bool(sel.any()):
            continue
        x, a = out[sel], angles[sel]
        if op & 1:
            x = torch.roll(torch.flip(x, dims=(-1,)), 1, dims=-1)
            a = -a
        for _ in range(op >> 1):
            x = torch.roll(torch.rot90(x, 1, dims=(-2, -1)), 1, dims=-2)
            a = a + 90.0
        out[sel], angles[sel] = x, a
    return out, angles % 180.0


def _harmonic_components(out):
    """(z, a cos 2θ, a sin 2θ) (B,) each, units of 10⁴ Å, from model outputs (B, 4) of any model."""
    z, a = 0.5 * (out[:, 0] + out[:, 1]), 0.5 * (out[:, 0] - out[:, 1])
    n = torch.sqrt(out[:, 2] ** 2 + out[:, 3] ** 2 + 1e-8)
    return z, a * out[:, 3] / n, a * out[:, 2] / n


def _loss(out, labels, profile=None, phi=None):
    """L1 (units of 10⁴ Å) on the mean defocus z and the astigmatism vector (a cos 2θ, a sin 2θ), a = (U − V)/2.

    Smooth at zero astigmatism (no angle term that is meaningless there). For the polar model, the L1 on its
    defocus profile d(φ) against the true ``z + a cos 2(φ − θ)`` is added (dense supervision, one target per
    azimuth)."""
    u, v = labels[:, 0] / model_mod.DEFOCUS_SCALE_A, labels[:, 1] / model_mod.DEFOCUS_SCALE_A
    t = torch.deg2rad(labels[:, 2]) * 2
    z_t, a_t = 0.5 * (u + v), 0.5 * (u - v)
    ax_t, ay_t = a_t * torch.cos(t), a_t * torch.sin(t)
    z, ax, ay = _harmonic_components(out)
    loss = (z - z_t).abs() + (ax - ax_t).abs() + (ay - ay_t).abs()
    if profile is not None:
        target = z_t[:, None] + ax_t[:, None] * torch.cos(2 * phi) + ay_t[:, None] * torch.sin(2 * phi)
        loss = loss + (profile - target).abs().mean(dim=1)
    return loss.mean()


def _predict(model, arrays, batch_size):
    """(U, V, angle) tensors (B,) on the CPU of a model (on its device) for training arrays."""
    model.eval()
    device = next(model.parameters()).device
    psd = torch.as_tensor(arrays["psd"])
    acq = torch.as_tensor(arrays["acq"])
    outs = []
    with torch.no_grad():
        for i in range(0, len(psd), batch_size):
            a = acq[i:i + batch_size]
            feats = model_mod.acquisition_features(a[:, 0], a[:, 1], len(a)).to(device)
            outs.append(model(psd[i:i + batch_size].to(device).float(), feats).cpu())
    return model_mod.decode(torch.cat(outs))


def _angle_errors(ang, labels):
    d = (ang - labels[:, 2]).abs() % 180.0
    return torch.minimum(d, 180.0 - d)


def evaluate(model: torch.nn.Module, arrays: Dict[str, np.ndarray], batch_size: int = 64) -> Tuple[float, float]:
    """(MAE of U and V in Å, median angle error in degrees where U − V > 300 Å) of a model on arrays
    (computed on the model's device)."""
    labels = torch.as_tensor(arrays["labels"])
    u, v, ang = _predict(model, arrays, batch_size)
    mae = 0.5 * ((u - labels[:, 0]).abs() + (v - labels[:, 1]).abs()).mean()
    d = _angle_errors(ang, labels)
    astig = (labels[:, 0] - labels[:, 1]) > 300.0
    return float(mae), float(d[astig].median()) if bool(astig.any()) else float("nan")


def validation_figures(model: torch.nn.Module, arrays: Dict[str, np.ndarray], batch_size: int = 256) -> Dict[str, Any]:
    """Error figures of a model on labelled arrays: overall, per image model (when ``image_model`` is there) and
    with/without a phase plate (when ``phase_shift_deg`` is there).

    Per group: ``n``, ``mae_A`` (mean of |ΔU| and |ΔV|), ``median_A``, ``p90_A`` (of the per-micrograph mean
    |ΔU|, |ΔV|), ``astigmatism_bias_A`` (mean of estimated minus true U − V: positive = inflated astigmatism),
    ``mean_defocus_bias_A`` and ``median_angle_error_deg`` (where the true U − V > 300 Å)."""
    from .training_data import IMAGE_MODELS
    labels = torch.as_tensor(arrays["labels"]).double()
    u, v, ang = (x.double() for x in _predict(model, arrays, batch_size))
    err = 0.5 * ((u - labels[:, 0]).abs() + (v - labels[:, 1]).abs())
    dang = _angle_errors(ang, labels)
    groups = {"all": torch.ones(len(err), dtype=torch.bool)}
    if "image_model" in arrays:
        kinds = torch.as_tensor(arrays["image_model"]).long()
        groups.update({name: kinds == i for i, name in enumerate(IMAGE_MODELS) if bool((kinds == i).any())})
    if "phase_shift_deg" in arrays:
        plate = torch.as_tensor(arrays["phase_shift_deg"]) > 0
        groups.update({k: sel for k, sel in (("phase_plate", plate), ("no_phase_plate", ~plate)) if bool(sel.any())})
    out = {}
    for name, sel in groups.items():
        e = err[sel]
        astig = sel & ((labels[:, 0] - labels[:, 1]) > 300.0)
        out[name] = {
            "n": int(sel.sum()), "mae_A": round(float(e.mean()), 1), "median_A": round(float(e.median()), 1),
            "p90_A": round(float(torch.quantile(e, 0.9)), 1),
            "astigmatism_bias_A": round(float(((u - v) - (labels[:, 0] - labels[:, 1]))[sel].mean()), 1),
            "mean_defocus_bias_A": round(float((0.5 * (u + v - labels[:, 0] - labels[:, 1]))[sel].mean()), 1),
            "median_angle_error_deg": round(float(dang[astig].median()), 2) if bool(astig.any()) else None}
    return out


def _subset(arrays, idx):
    return {k: v[idx] for k, v in arrays.items()}


def train(arrays: Dict[str, np.ndarray], output: str, config: Optional[Dict[str, Any]] = None,
          init_weights: Optional[str] = None, epochs: int = 60, batch_size: int = 32, learning_rate: float = 1e-3,
          patience: int = 8, val_fraction: float = 0.15, seed: int = 0, checkpoint: Optional[str] = None,
          resume: bool = False, device: Union[str, torch.device] = "cpu",
          time_limit_s: Optional[float] = None) -> Dict[str, Any]:
    """Train (or fine-tune from ``init_weights``) a defocus model and write the best weights to ``output``.

    Args:
        arrays: dict from :func:`simulate_training_arrays` / :func:`star_training_arrays`.
        output: weight file (written atomically whenever the validation MAE improves).
        config: model config (default ``{"arch": "rings", "width": 16}``); taken from ``init_weights``
            when fine-tuning.
        epochs, batch_size, learning_rate (Adam's step size), patience (epochs without improvement before
            stopping), val_fraction, seed.
        checkpoint: checkpoint file (default ``output + ".ckpt"``); ``resume`` continues from it.
        device: torch device of the model and of the training set. Shuffling and augmentation draw from
            torch's CPU generator, so a run sees the same batches on any device.
        time_limit_s: no new epoch is started when it would end after this many seconds (wall clock,
            estimated from the last epoch); None = no limit.
    Returns:
        dict with ``best_val_mae_A``, ``val_angle_error_deg``, ``epochs``, ``n_train``, ``n_val``, ``seconds``
        (of the epochs), ``config``, ``validation`` (:func:`validation_figures` of the best weights on the
        validation split) and ``validation_of_init_weights`` (the same for ``init_weights``, None without).
    """
    n = len(arrays["psd"])
    if n < 4:
        raise InputError("need at least 4 micrographs to train (got %d)" % n)
    torch.manual_seed(seed)
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(val_fraction * n)))
    val, tr = _subset(arrays, order[:n_val]), _subset(arrays, order[n_val:])  # split BEFORE augmentation
    if init_weights:
        model, config = model_mod.load_model(init_weights)
        config = {k: v for k, v in config.items() if not k.startswith("val_")}  # the figures of its training
        model.train()
    else:
        config = dict(config or {"arch": "rings", "width": 16})
        model = model_mod.build_model(config)
    model.to(device)
    config.update(samplings_A=list(CNN_SAMPLINGS_A), size_px=CNN_SIZE_PX)
    initial_figures = validation_figures(model, val) if init_weights else None
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(1, patience // 3))
    checkpoint = checkpoint or output + ".ckpt"
    start, best, stale = 0, math.inf, 0
    if resume and os.path.exists(checkpoint):
        remove_stale_parts(checkpoint)  # temporary files of a run killed while writing
        remove_stale_parts(output)
        try:  # weights_only: tensors and plain data, never code
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError("%s: not a deepcryo defocus checkpoint (%s)"
                                % (checkpoint, load_error_reason(exc)))
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise InputError("%s: not a deepcryo defocus checkpoint" % checkpoint)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, best, stale = int(state["epoch"]), float(state["best"]), int(state["stale"])
        torch.set_rng_state(state["rng"])
        logger.info("resumed from %s at epoch %d (best val MAE %.0f Å)", checkpoint, start, best)
    # the training set lives on the model's device (float16 PSDs: 100 kB per micrograph)
    psd = torch.as_tensor(tr["psd"]).to(device)
    feats_all = model_mod.acquisition_features(torch.as_tensor(tr["acq"][:, 0]), torch.as_tensor(tr["acq"][:, 1]),
                                               len(psd)).to(device)
    labels = torch.as_tensor(tr["labels"]).to(device)
    angle_err = float("nan")
    epoch = start
    t_start = time.time()
    for epoch in range(start, epochs):
        t0 = time.time()
        model.train()
        perm = torch.randperm(len(psd))
        total = torch.zeros((), device=device)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            ops = torch.randint(0, 8, (len(idx),)).to(device)
            idx = idx.to(device)
            x, ang = augment(psd[idx].float(), labels[idx, 2], ops)
            lab = torch.stack([labels[idx, 0], labels[idx, 1], ang], dim=1)
            feats = feats_all[idx]
            if isinstance(model, model_mod.PolarDefocusNet):
                prof = model.profile(x, feats)
                out = model.from_harmonics(*model.harmonics_of(prof))
                loss = _loss(out, lab, prof, model.phi)
            else:
                loss = _loss(model(x, feats), lab)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
        val_mae, angle_err = evaluate(model, val)
        sched.step(val_mae)
        improved = val_mae < best
        if improved:
            best, stale = val_mae, 0
            model_mod.save_model(output, model, dict(config, val_mae_A=round(best, 1),
                                                     val_angle_error_deg=round(angle_err, 2)))
        else:
            stale += 1
        with atomic_output(checkpoint) as tmp:
            torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "epoch": epoch + 1, "best": best, "stale": stale,
                        "rng": torch.get_rng_state()}, tmp)
        logger.info("epoch %d: train loss %.4f, val MAE %.0f Å, val angle error %.1f°, lr %.2g, %.0f s%s",
                    epoch + 1, float(total) / len(psd), val_mae, angle_err, opt.param_groups[0]["lr"], time.time() - t0,
                    " *" if improved else "")
        if stale >= patience:
            logger.info("early stop: no improvement for %d epochs", patience)
            break
        if time_limit_s and time.time() - t_start + (time.time() - t0) > time_limit_s:
            logger.info("stop: another epoch would pass the time limit of %.0f s", time_limit_s)
            break
    best_model, _ = model_mod.load_model(output, device=device)
    return {"best_val_mae_A": best, "val_angle_error_deg": angle_err, "epochs": epoch + 1,
            "n_train": len(psd), "n_val": n_val, "seconds": round(time.time() - t_start, 1),
            "config": json.loads(json.dumps(config)), "validation": validation_figures(best_model, val),
            "validation_of_init_weights": initial_figures}
