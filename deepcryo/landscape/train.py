"""Training of the landscape VAE on a particle set with consensus poses and CTF.

Output folder layout:

- ``checkpoint.pt``: model, optimiser, epoch and configuration, rewritten atomically after every epoch
  (``--continue`` resumes from it) and once more at the end with the decoder's variation weight, fitted to the
  particles' latents (:func:`fit_variation_weight`); load with ``torch.load(path, weights_only=True)``.
- ``consensus.mrc``: the consensus map at the working box (initial mean volume of the decoder; pose-free: the
  starting volume, reference or sphere).
- ``variation_weight.mrc``: that weight at the working box, in [0, 1]: where the decoded volumes vary beyond the
  noise of the decoder (1) and where they do not (0), a map of where the particles' heterogeneity lies.
- ``particles_latent.star``: the input particles with their latent means ``dcLatent01`` … and the encoder's
  standard deviations ``dcZSigma01`` … (σ of the Gaussian q(z|X), per coordinate, in latent units: the
  uncertainty of each particle's position in the landscape; the prior is N(0, I), so σ ≪ 1 where the image
  pins the particle down and σ → 1 where it does not) (written at the end);
  in pose-free mode their angles and origins (``rlnAngle*``, ``rlnOrigin*Angst``) are replaced by the
  predicted ones (hand chosen by the model, frame of the learned volume), so ``analyze`` reconstructs the
  clusters at those.

Pose-free mode (``pose_free=True``, ``--pose-free``): the particles' poses are not read; V₀ starts from
``reference`` (an MRC map, Fourier-resampled to the working box) or from a soft sphere, its amplitude
matched to the images' low-resolution power (shells up to D/8); the noise spectrum is the images' own
radial power (signal included: an overestimate at high SNR, close at SNR ≤ 0.1). See
:mod:`deepcryo.landscape.model` for the pose head and its mirror-hand guard.

Several processes train one model with torch DistributedDataParallel (NCCL on GPUs, gloo on CPUs), each on
its share of every epoch's shuffled order (the last ``n mod processes`` particles of the order wait for the
next epoch, so that all shares are equal); rank 0 writes the outputs, the same files as a single process.
The processes come from the program itself, one per device of ``--device cuda:0,cuda:1``, or from a
launcher across nodes: ``srun`` (one rank per SLURM task) or ``torchrun``, each process then on its own
GPU (``--device cuda``) or CPU (``--device cpu``); see :mod:`deepcryo.landscape.distributed`. The batch size
is per process, so the global batch grows with the number of processes.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..core import fourier
from ..core.cli import configure_logging, logging_configured
from ..core.errors import InputError, load_error_reason
from ..core.files import atomic_output, remove_stale_parts
from ..core.geometry import matrix_to_euler, quaternion_to_matrix, symmetry_matrices
from ..core.mrc import read_mrc, read_mrc_header, write_mrc
from ..core.particles import write_particles
from ..core.projector import Projector
from ..core.reconstruct import Reconstructor
from .dataset import ParticleBatches, load_particles
from .distributed import DistributedLaunch, local_launch, rank_device, read_launch
from .model import LandscapeVAE, radial_noise_variance, soft_sphere
from .shrinkage import solvent_mask, variation_variance, variation_weight

logger = logging.getLogger(__name__)

__all__ = ["train", "load_model", "fit_variation_weight", "encode_posterior", "Posterior", "latent_columns", "sigma_columns",
           "latent_pixel_size_A", "report_active_coordinates", "CHECKPOINT", "VARIATION_MAP"]

CHECKPOINT = "checkpoint.pt"
LATENT_STAR = "particles_latent.star"
VARIATION_MAP = "variation_weight.mrc"


def latent_columns(latent_dim: int) -> List[str]:
    """STAR column names of the latent coordinates."""
    return ["dcLatent%02d" % (i + 1) for i in range(latent_dim)]


def sigma_columns(latent_dim: int) -> List[str]:
    """STAR column names of the latent coordinates' uncertainty σ (not ``dcLatent…``: readers that collect
    every ``dcLatent`` column must not take them for coordinates)."""
    return ["dcZSigma%02d" % (i + 1) for i in range(latent_dim)]


def latent_pixel_size_A(train_dir: str) -> float:
    """Pixel size (Å/px) of the working box of a training folder (from its ``consensus.mrc``, written at it)."""
    path = os.path.join(train_dir, "consensus.mrc")
    if not os.path.exists(path):
        raise InputError("%s: not found (train first)" % path)
    return read_mrc_header(path)[1]


#: Variance over the particles of a latent coordinate's mean above which the coordinate is active (Burda et al. 2016).
ACTIVE_VARIANCE = 0.01


def report_active_coordinates(z: np.ndarray) -> int:
    """Log how many latent coordinates are active (the variance of the latent means (N, L) over the particles above
    :data:`ACTIVE_VARIANCE`, the "active units" of Burda, Grosse and Salakhutdinov 2016: the prior's variance is 1),
    and warn when none is: the encoder then returns the prior for every particle (posterior collapse), so the
    landscape is flat and every decoded volume is one map. On RELION-rendered motion at SNR 0.01 (20 000
    particles, box 32) that is where training with latent 8 ended before the KL warm-up (:func:`kl_weight`), while
    latent 1 kept the motion (``benchmarks/RESULTS.md``): the warning suggests both. Returns the count."""
    var = np.asarray(z, dtype=np.float64).var(0)
    active = int((var > ACTIVE_VARIANCE).sum())
    logger.info("active latent coordinates (variance of the means over the particles > %g): %d of %d (variances %s)",
                ACTIVE_VARIANCE, active, len(var), np.round(var, 4).tolist())
    if active == 0:
        logger.warning("no active latent coordinate (posterior collapse: every particle's latent is the prior): the "
                       "VAE found no heterogeneity it can place particle by particle; its landscape and clusters are "
                       "noise. At low signal-to-noise ratios train again with a longer --beta-warmup-epochs%s.",
                       " or with --latent-dim 1 (it did not collapse where 8 did without the warm-up)" if len(var) > 1
                       else "")
    return active


def consensus_map(data: ParticleBatches, batch_size: int, device: Union[str, torch.device],
                  symmetry: str = "C1") -> torch.Tensor:
    """Consensus reconstruction (D, D, D) at the working box from the dataset's (scaled) images, with the
    point group ``symmetry``: the reconstruction program's path (real FFTs of the inserted half slice, the CTF
    and the origin's phase at its pixels only, :meth:`ParticleBatches.images`)."""
    rec = Reconstructor(data.box, symmetry=symmetry, device=device)
    for start in range(0, len(data), batch_size):
        images, rot, origins_px, ctf_params = data.images(np.arange(start, min(start + batch_size, len(data))),
                                                          device)
        rec.insert_images(images, rot, origins_px, rec.slice_ctf(data.pixel_size_A, **ctf_params))
    return torch.from_numpy(rec.reconstruct())


def noise_estimate(data: ParticleBatches, volume: torch.Tensor, n_sample: int, batch_size: int) -> torch.Tensor:
    """(D, D) noise variance from the residuals of up to ``n_sample`` particles against ``volume``."""
    proj = Projector(volume)
    idx = np.linspace(0, len(data) - 1, min(n_sample, len(data))).astype(np.int64)
    residuals = []
    for start in range(0, len(idx), batch_size):
        spectra, rot, ctf = data.get(idx[start:start + batch_size])
        residuals.append(spectra - proj.project_ft(rot) * ctf)
    return radial_noise_variance(torch.cat(residuals), data.box)


def read_checkpoint(path: str, device: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """The checkpoint dict of ``path`` (``torch.load(weights_only=True)``: tensors and plain data only, never
    code); InputError for a file that is not a deepcryo landscape checkpoint."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise InputError("%s: not a deepcryo landscape checkpoint (%s)"
                         % (path, load_error_reason(exc)))
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "epoch", "config"} <= set(ckpt):
        raise InputError("%s: not a deepcryo landscape checkpoint (no model/optimizer/epoch/config)" % path)
    return ckpt


def load_model(output_dir: str, device: Union[str, torch.device] = "cpu") -> Tuple[LandscapeVAE, Dict[str, Any]]:
    """(model, checkpoint dict) from ``output_dir/checkpoint.pt`` (weights only, no pickled code)."""
    path = os.path.join(output_dir, CHECKPOINT)
    if not os.path.exists(path):
        raise InputError("%s: no checkpoint (train first)" % path)
    ckpt = read_checkpoint(path, device)
    cfg = ckpt["config"]
    state = ckpt["model"]
    model = LandscapeVAE(cfg["box"], cfg["latent_dim"], cfg["n_basis"], cfg["hidden"],
                         state["volumes"][0], state["noise_var"], pose_free=cfg.get("pose_free", False),
                         pose_heads=cfg.get("pose_heads", 8), max_shift_px=cfg.get("max_shift_px"),
                         symmetry=cfg.get("symmetry", "C1"))
    model.load_state_dict(_with_variation_weight(state, model))
    return model.to(device), ckpt


def _with_variation_weight(state: Dict[str, torch.Tensor], model: LandscapeVAE) -> Dict[str, torch.Tensor]:
    """``state`` with the model's own :attr:`LandscapeVAE.variation_weight` where a checkpoint written before the
    weight existed lacks it (ones: its volumes decode as they did)."""
    return state if "variation_weight" in state else dict(state, variation_weight=model.variation_weight)


def fit_variation_weight(model: LandscapeVAE, z: np.ndarray) -> float:
    """Set ``model.variation_weight`` (:mod:`deepcryo.landscape.shrinkage`) from the particles' latent means ``z``
    (N, L); returns the fraction of the decoder's sphere where the weight exceeds 0.5."""
    with torch.no_grad():
        c = model.coefficients(torch.as_tensor(z, dtype=torch.float32, device=model.volumes.device))
        # the decoded volumes are masked: Var(mask ⊙ Σ cₘBₘ) = mask² Var(Σ cₘBₘ), without a masked copy of the basis
        variance = (variation_variance(model.volumes[1:], c) * model.mask3d ** 2).cpu().numpy()
        mask = model.mask3d.cpu().numpy()
        solvent = solvent_mask((model.volumes[0] * model.mask3d).cpu().numpy(), mask > 0.99)
        weight = variation_weight(variance, solvent)
        model.variation_weight.copy_(torch.from_numpy(weight))
    kept = float((weight[mask > 0.99] > 0.5).mean())
    if solvent.any():
        logger.info("variation weight: noise floor from %d solvent voxels; above 0.5 in %.1f %% of the decoder's "
                    "sphere", int(solvent.sum()), 100 * kept)
    else:
        logger.warning("variation weight: the mean volume fills the decoder's sphere, no solvent to measure the "
                       "noise in; the decoded variation is kept everywhere (weight 1)")
    return kept


class Posterior(NamedTuple):
    """The encoder's output for every particle, in STAR order (:func:`encode_posterior`)."""
    z: np.ndarray            #: (N, L) latent means
    sigma: np.ndarray        #: (N, L) standard deviations of q(z|X), latent units
    rotations: np.ndarray    #: (N, 3, 3) pose matrices A used (predicted ones when pose-free)
    shifts: np.ndarray       #: (N, 2) origins used, px of the working box (zeros with given poses)


def encode_posterior(model: LandscapeVAE, data: ParticleBatches, batch_size: int,
                     device: Union[str, torch.device] = "cpu") -> Posterior:
    """Latent means, their uncertainty σ and the poses used, for every particle (see :class:`Posterior`)."""
    model.eval()
    n, dim = len(data), model.latent_dim
    out = Posterior(np.empty((n, dim), np.float32), np.empty((n, dim), np.float32),
                    np.zeros((n, 3, 3), np.float32), np.zeros((n, 2), np.float32))
    with torch.no_grad():       # the volumes do not change during the pass; the workspace holds no second table
        table = model.basis_ft(model.workspace)
    for idx, spectra, rot, ctf in data.batches(min(batch_size, model.chunk_particles()), device=device):
        mu, sigma, r, t = model.posterior(spectra, rot, ctf, table)
        out.z[idx], out.sigma[idx], out.rotations[idx] = mu.cpu().numpy(), sigma.cpu().numpy(), r.cpu().numpy()
        if t is not None:
            out.shifts[idx] = t.cpu().numpy()
    return out


def pose_free_start(data: ParticleBatches, reference: Optional[torch.Tensor] = None, n_sample: int = 1000,
                    batch_size: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """Initial V₀ (D, D, D) and noise variance (D, D) for pose-free training (no poses are used).

    V₀: ``reference`` (MRC path; Fourier-resampled to the working box) or a soft sphere, scaled so that the
    power of its CTF-modulated projections matches the images' power at low resolution (radius ≤ D/8).
    """
    d = data.box
    if reference:
        vol, _ = read_mrc(reference)
        if vol.ndim != 3 or len(set(vol.shape)) != 1:
            raise InputError("%s: the reference must be a cubic map" % reference)
        ft = fourier.fft3c(torch.as_tensor(vol, dtype=torch.float64))
        n = vol.shape[-1]
        ft = fourier.crop_to(ft, d, 3) if n >= d else fourier.pad_to(ft, d, 3)
        vol = (fourier.ifft3c(ft).real * (d / n) ** 3).to(torch.float32)
    else:
        vol = soft_sphere(d)
    idx = np.linspace(0, len(data) - 1, min(n_sample, len(data))).astype(np.int64)
    low = fourier.radius_grid_2d(d) <= d / 8
    proj = Projector(vol)
    power_x = power_p = 0.0
    spectra_all = []
    rng = np.random.default_rng(0)
    for start in range(0, len(idx), batch_size):
        spectra, _, ctf = data.get(idx[start:start + batch_size])
        spectra_all.append(spectra)
        q = torch.as_tensor(rng.normal(size=(len(spectra), 4)), dtype=torch.float32)
        p = proj.project_ft(quaternion_to_matrix(q)) * ctf
        power_x += float((spectra.abs() ** 2)[:, low].sum())
        power_p += float((p.abs() ** 2)[:, low].sum())
    vol = vol * float(np.sqrt(power_x / max(power_p, 1e-30)))
    return vol, radial_noise_variance(torch.cat(spectra_all), d)


def _save_checkpoint(output_dir, model, optimizer, epoch, cfg, history):
    module = model.module if hasattr(model, "module") else model
    ckpt = {"model": module.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "config": dict(cfg, **module.config()), "history": history,
            "rng": torch.get_rng_state()}  # resumed runs draw the same noise as uninterrupted ones
    with atomic_output(os.path.join(output_dir, CHECKPOINT)) as tmp:
        torch.save(ckpt, tmp)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Most batches sharing one update of the decoder's volumes on grounds of data size alone (:func:`default_volume_steps`).
SHARED_UPDATE_STEPS = 4
#: Fewest updates of the volumes per epoch that :data:`SHARED_UPDATE_STEPS` may leave.
MIN_VOLUME_UPDATES_PER_EPOCH = 64


#: Epochs over which the KL term's weight rises from 0 to β at the start of a training (``--beta-warmup-epochs``'s
#: default).
BETA_WARMUP_EPOCHS = 0.25
#: Fewest steps of that ramp: on small sets a quarter epoch is a few steps, and the latent collapsed (:func:`kl_weight`).
MIN_WARMUP_STEPS = 16


def kl_weight(beta: float, step: int, steps_per_epoch: int, epochs: int, warmup_epochs: float) -> float:
    """Weight of the KL term at step ``step`` (0-based, counted from the start of the training) of ``epochs``
    epochs of ``steps_per_epoch`` steps: rising linearly from 0 to ``beta`` over the first ``warmup_epochs`` epochs
    but over no fewer than :data:`MIN_WARMUP_STEPS` steps, then ``beta`` (KL annealing, Bowman et al. 2016). The
    ramp ends by the last epoch, which has the full term whatever the warm-up (a 1-epoch training has no ramp);
    ``warmup_epochs`` 0: no ramp.

    Why a warm-up: at low SNR the KL term can win before the decoder's basis has learnt anything. The basis
    volumes start as small random maps, so the encoder's inputs (the residual's correlations with the basis
    slices) carry the conformation only once the basis has grown towards the directions in which the particles
    vary, and it grows only through latents that depend on the image. At SNR 0.01 the full KL term from the first
    step cut that dependence within the first epoch (every particle's latent the prior, the decoded map one map:
    posterior collapse). Why a short ramp (:data:`BETA_WARMUP_EPOCHS`, a quarter epoch) and not the first epoch
    without the term (this program's schedule until 2026-12-07, which also kept the latent): a whole epoch free of
    it let a 1-D motion spread over several coordinates (2–5 of 8 active) that the full term, switched on
    afterwards, did not gather again, and in some trainings the conformations then traced a horseshoe over two or
    three principal components, so that the first no longer ordered them. Rising from the first step, the term
    prunes while the basis grows (1–2 active). On RELION-rendered motion (``benchmarks/RESULTS.md``, "A KL ramp"):
    a ramp over a tenth of an epoch collapsed at SNR 0.01, one over a whole epoch still curved 1 of 5 trainings at
    SNR 0.1, a quarter kept the latent at SNR 0.01 and left all five straight (three of them horseshoes with the
    epoch without the term). On small sets the steps count: on that SNR-0.01 set (63 steps per epoch) 6 steps of
    ramp collapsed the latent, 10 left it weak and 16 kept it; on 600 particles (10 steps per epoch) 2.5 steps
    collapsed it and 5 or more kept it, hence :data:`MIN_WARMUP_STEPS`.
    """
    if warmup_epochs <= 0:
        return float(beta)
    ramp = min(max(warmup_epochs * steps_per_epoch, MIN_WARMUP_STEPS), (epochs - 1) * steps_per_epoch)
    return float(beta) if step >= ramp else float(beta) * step / ramp


#: Last fraction of the epochs over which the learning rate falls linearly, to :data:`FINAL_LEARNING_RATE_FACTOR` of
#: its value at the last epoch.
LEARNING_RATE_DECAY_FRACTION = 0.25
FINAL_LEARNING_RATE_FACTOR = 0.1


def learning_rate_factor(epoch: int, epochs: int) -> float:
    """Factor on the learning rate in epoch ``epoch`` (0-based) of ``epochs``: 1, then over the last
    :data:`LEARNING_RATE_DECAY_FRACTION` of the epochs falling linearly to :data:`FINAL_LEARNING_RATE_FACTOR`.

    Why: Adam's steps on the decoder's volumes at a constant rate leave noise in them, which at low SNR made
    the decoded maps worse than the consensus reconstruction they started from over the static part of the
    particle; smaller last steps average it out (on the RELION-rendered SNR-0.01 motion, whole-particle FSC-AUC
    from below the consensus's to equal, ``benchmarks/RESULTS.md``, "KL warm-up"). Trainings of 3 epochs or fewer
    keep the constant rate.
    """
    start = epochs * (1.0 - LEARNING_RATE_DECAY_FRACTION)
    if epoch < start:
        return 1.0
    return max(FINAL_LEARNING_RATE_FACTOR,
               1.0 - (1.0 - FINAL_LEARNING_RATE_FACTOR) * (epoch + 1 - start) / (epochs - start))


def default_volume_steps(box: int, batches_per_epoch: int = 0) -> int:
    """Steps per update of the decoder's volumes at working box D: ``max(1, round((D/64)²), s)``, where s is up to
    :data:`SHARED_UPDATE_STEPS` while the epoch keeps :data:`MIN_VOLUME_UPDATES_PER_EPOCH` updates.

    A step costs work per particle that grows with the pixel count (its slices: gathers, scatters, encoder) and
    work that does not depend on the batch and grows as D³ log D (the volumes' transform to the decoder's
    table, its adjoint and Adam over 17·D³ values). Summing the volumes' gradient over (D/64)² batches before
    each update spreads the second over as many more particles, so that the cost per particle grows no faster
    than the pixel count. Even at small boxes that work is about half of a step of 64 particles
    (``benchmarks/RESULTS.md``), so where the data are large enough that the volumes still get
    ``MIN_VOLUME_UPDATES_PER_EPOCH`` updates per epoch, up to ``SHARED_UPDATE_STEPS`` batches share one: on the
    20 000-particle CryoBench-style sets that made training markedly cheaper with FSC-AUCs no lower, while 4 000
    particles with 16 updates per epoch lost a little (RESULTS), so small sets keep an update per step. The
    networks still step every batch.
    """
    by_size = min(SHARED_UPDATE_STEPS, batches_per_epoch // MIN_VOLUME_UPDATES_PER_EPOCH)
    return max(1, int(round((box / 64.0) ** 2)), by_size)


def train_epoch(net: torch.nn.Module, model: LandscapeVAE, optimizer: torch.optim.Optimizer, batches,
                beta: Union[float, Callable[[int], float]], volume_steps: int,
                chunk: Optional[int] = None) -> np.ndarray:
    """One pass over ``batches`` (``(indices, spectra, rotations, ctf)``); returns the sums over its particles of
    the loss, NLL and KL (3,). ``beta``: the KL term's weight, or a function of the batch's index in the pass
    giving it (the warm-up's ramp, :func:`kl_weight`).

    Every batch steps the encoder and coefficient networks. The decoder's table (:meth:`LandscapeVAE.basis_ft`)
    is computed once per ``volume_steps`` batches; their slices' backward passes add ``∂loss/∂table`` into one
    accumulator, carried to the volumes by the transform's adjoint after the last of them (and at the end of
    the pass), so the volumes take one Adam step on the mean gradient of those batches: with
    ``volume_steps = 1``, exactly the plain step. Under DDP (``net`` wraps ``model``, the volumes left out of
    its reducer) the volumes' gradient is all-reduced here, at the same steps on every rank (equal shares).

    A batch runs ``chunk`` particles at a time (default :meth:`LandscapeVAE.chunk_particles`), each chunk's
    share of the batch-mean loss back-propagated on its own: the gradient is the batch's (sums of the same
    terms); only the encoder's noise draws differ. DDP all-reduces once per batch, at its last chunk.
    """
    world = torch.distributed.get_world_size() if net is not model else 1
    chunk = chunk or model.chunk_particles()
    sums, table, window = np.zeros(3), None, 0
    for step, (_, spectra, rot, ctf) in enumerate(batches):
        weight = beta(step) if callable(beta) else beta
        if table is None:
            table = model.basis_ft(model.workspace)
            table_grad = model.workspace.get("table_grad", (table.shape[0], 2 * table.shape[1]), table.dtype,
                                             table.device).zero_()
        optimizer.zero_grad()
        n = len(spectra)
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            m = len(spectra[part])
            with contextlib.nullcontext() if start + chunk >= n or world == 1 else net.no_sync():
                terms = net(spectra[part], None if rot is None else rot[part], ctf[part], beta=weight,
                            table=table, table_grad=table_grad)
                (terms["loss"] * (m / n)).backward()
            sums += m * np.array([terms[k].item() for k in ("loss", "nll", "kl")])
        window += 1
        if window == volume_steps:
            _volume_gradient(model, table, table_grad, window, world)
            table, window = None, 0
        optimizer.step()
    if window:
        optimizer.zero_grad()
        _volume_gradient(model, table, table_grad, window, world)
        optimizer.step()
    return sums


def _volume_gradient(model, table, table_grad, steps, world):
    """Set the volumes' gradient to the mean over ``steps`` batches (and ``world`` ranks) of the accumulated
    ``∂loss/∂table``, through the transform's adjoint (the backward pass of ``table``'s graph)."""
    table.backward(table_grad.view(table.shape))
    model.volumes.grad /= steps
    if world > 1:
        torch.distributed.all_reduce(model.volumes.grad)
        model.volumes.grad /= world


def _run(cfg, init, device, launch: DistributedLaunch):
    """Train on ``device``: alone, or as rank ``launch.rank`` of ``launch.world_size`` DDP processes."""
    world, rank = launch.world_size, launch.rank
    device = torch.device(device)
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, init_method=launch.init_method, rank=rank, world_size=world)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        logger.info("rank %d of %d (%s launch, local rank %d, rendezvous %s:%d, %s on %s)", rank, world,
                    launch.source, launch.local_rank, launch.master_addr, launch.master_port, backend, device)
    torch.manual_seed(cfg["seed"])
    pose_free = cfg.get("pose_free", False)
    star = load_particles(cfg["particles"], poses=not pose_free)
    data = ParticleBatches(star, cfg["box"], scale=cfg["scale"], poses=not pose_free)
    model = LandscapeVAE(data.box, cfg["latent_dim"], cfg["n_basis"], cfg["hidden"],
                         init["mean_volume"], init["noise_var"], pose_free=pose_free,
                         pose_heads=cfg.get("pose_heads", 8), symmetry=cfg.get("symmetry", "C1")).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["learning_rate"])
    start_epoch, history = 0, []
    if init.get("checkpoint") is not None:
        model.load_state_dict(_with_variation_weight(init["checkpoint"]["model"], model))
        optimizer.load_state_dict(init["checkpoint"]["optimizer"])
        start_epoch, history = init["checkpoint"]["epoch"], list(init["checkpoint"]["history"])
        if "rng" in init["checkpoint"] and device.type == "cpu":
            torch.set_rng_state(init["checkpoint"]["rng"])
    if world > 1:
        # the volumes' gradient is summed over volume_steps batches and all-reduced by train_epoch, not by DDP
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["volumes"])
        net = torch.nn.parallel.DistributedDataParallel(model)
        torch.distributed.broadcast(model.volumes.data, 0)
    else:
        net = model
    n = len(data)
    per_rank = (n - n % world) // world
    volume_steps = cfg.get("volume_steps") or default_volume_steps(data.box, per_rank // cfg["batch_size"])
    if start_epoch < cfg["epochs"]:
        logger.info("decoder volumes updated every %d step%s", volume_steps, "s" if volume_steps > 1 else "")
    for epoch in range(start_epoch, cfg["epochs"]):
        t0 = time.time()
        order = np.random.default_rng(cfg["seed"] + epoch).permutation(n)[: n - n % world][rank::world]
        net.train()
        steps = -(-len(order) // cfg["batch_size"])

        def beta(step, epoch=epoch, steps=steps):
            return kl_weight(cfg["beta"], epoch * steps + step, steps, cfg["epochs"], cfg["beta_warmup_epochs"])
        learning_rate = cfg["learning_rate"] * learning_rate_factor(epoch, cfg["epochs"])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        sums = train_epoch(net, model, optimizer, data.batches(cfg["batch_size"], order, device), beta,
                           volume_steps) / len(order)
        history.append([float(v) for v in sums])
        if rank == 0:
            _save_checkpoint(cfg["output_dir"], net, optimizer, epoch + 1, cfg, history)
            logger.info("epoch %d/%d  loss %.2f  nll %.2f  kl %.3f  %.1f s%s",
                        epoch + 1, cfg["epochs"], sums[0], sums[1], sums[2], time.time() - t0,
                        "  (KL warm-up: weight %.3g to %.3g)" % (beta(0), beta(steps - 1))
                        if beta(0) < cfg["beta"] else "")
    if rank == 0:
        post = encode_posterior(model, data, cfg["batch_size"], device)
        out = star.copy()
        if pose_free:
            out.set_poses(matrix_to_euler(torch.from_numpy(post.rotations)).numpy(), post.shifts * data.pixel_size_A)
        for i, (c, s) in enumerate(zip(latent_columns(model.latent_dim), sigma_columns(model.latent_dim))):
            out.particles[c] = post.z[:, i].astype(np.float64)
            out.particles[s] = post.sigma[:, i].astype(np.float64)
        fit_variation_weight(model, post.z)
        write_mrc(os.path.join(cfg["output_dir"], VARIATION_MAP), model.variation_weight.cpu().numpy(),
                  data.pixel_size_A)
        _save_checkpoint(cfg["output_dir"], net, optimizer, cfg["epochs"], cfg, history)
        write_particles(os.path.join(cfg["output_dir"], LATENT_STAR), out)
        report_active_coordinates(post.z)
    data.close()
    if world > 1:
        # Equal sums on every rank show that the ranks trained one model (DDP averaged their gradients).
        checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
        logger.info("rank %d of %d done: parameter checksum %.12e", rank, world, checksum)
        # the ranks leave together: rank 0 encodes and writes the particles after the last epoch, and a rank
        # that tore its gloo group down meanwhile was seen to abort now and then at exit ("terminate called
        # without an active exception", SIGABRT) in the test suite. The DDP wrapper goes first: its reducer
        # keeps the last gradient all-reduce's gloo work (holding tensors) alive, and freeing that during the
        # interpreter's finalisation, after the group is gone, is the other known cause of that abort.
        del net
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _ddp_entry(rank, devices, cfg, init, port, log_to_console, threads):
    """One process spawned by :func:`train` for ``devices[rank]`` (the parent's logging and torch threads)."""
    if log_to_console:  # a spawned process starts with logging unconfigured: log as the parent program does
        configure_logging()
    torch.set_num_threads(threads)
    _run(cfg, init, devices[rank], local_launch(rank, len(devices), port))


def train(particles: str, output_dir: str, latent_dim: int = 8, epochs: int = 20, box: Optional[int] = None,
          batch_size: int = 64, beta: float = 1.0, n_basis: int = 16, hidden: int = 128, learning_rate: float = 3e-3,
          devices: Sequence[str] = ("cpu",), resume: bool = False, seed: int = 0, pose_free: bool = False,
          reference: Optional[str] = None, pose_heads: int = 8, symmetry: str = "C1",
          volume_steps: Optional[int] = None, beta_warmup_epochs: Optional[float] = None) -> str:
    """Train (or with ``resume`` continue) a landscape VAE; returns the output folder.

    Args:
        particles: RELION 3.1 particle STAR with poses (``rlnAngle*``, ``rlnOrigin*Angst``) and CTF.
        output_dir: folder for checkpoint, consensus map and latent STAR.
        latent_dim: latent dimension; epochs: total epochs (a resumed run stops at the same total).
        box: working box (px, even); the particle box when None. batch_size: particles per step (per device).
        beta: weight of the KL term, rising from 0 over the first ``beta_warmup_epochs`` epochs (at least
            :data:`MIN_WARMUP_STEPS` steps; :func:`kl_weight`; None: :data:`BETA_WARMUP_EPOCHS`).
        n_basis, hidden: decoder basis volumes and MLP width. learning_rate: Adam's step size, scaled per epoch
            by :func:`learning_rate_factor`.
        devices: torch device names (checked by :func:`deepcryo.core.cli.parse_devices`); several →
            DistributedDataParallel, one spawned process each. The consensus map is reconstructed on the
            first. Started by srun or torchrun (:func:`deepcryo.landscape.distributed.read_launch` finds
            more than one process), this process is one rank and ``devices`` is ``cpu`` or one CUDA device,
            which stands for the rank's GPU (:func:`deepcryo.landscape.distributed.rank_device`); every rank
            prepares the same start (consensus map, noise; DDP then gives all ranks rank 0's parameters and
            buffers), rank 0 writes the files.
        pose_free: ignore the particles' poses and learn them with the pose head (``pose_heads`` candidates
            per particle); ``reference``: optional MRC map to start V₀ from (otherwise a soft sphere).
        symmetry: point group of every decoded volume and of the consensus map (RELION's names; see
            :mod:`deepcryo.landscape.model`, "Symmetry"); not with ``pose_free``.
        volume_steps: batches per update of the decoder's volumes (their gradient summed over them, see
            :func:`train_epoch`); None: :func:`default_volume_steps` of the working box and the batches per epoch.
    """
    if latent_dim < 1 or epochs < 1 or batch_size < 1 or n_basis < 1 or beta < 0:
        raise InputError("need --latent-dim, --epochs, --batch-size and --basis >= 1 and --beta >= 0")
    beta_warmup_epochs = BETA_WARMUP_EPOCHS if beta_warmup_epochs is None else float(beta_warmup_epochs)
    if beta_warmup_epochs < 0:
        raise InputError("--beta-warmup-epochs %s: need >= 0" % beta_warmup_epochs)
    if volume_steps is not None and volume_steps < 1:
        raise InputError("--volume-steps %s: need >= 1" % volume_steps)
    try:
        symmetry = "C1" if len(symmetry_matrices(symmetry)) == 1 else str(symmetry).strip().upper()
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    if pose_free and symmetry != "C1":
        raise InputError("--symmetry %s: the pose-free mode learns its own frame, give C1" % symmetry)
    launch = read_launch(os.environ)
    if launch.world_size > 1:
        devices = [rank_device(launch, list(devices), torch.cuda.device_count() if devices[0] != "cpu" else 0)]
    writer = launch.rank == 0
    ckpt_path = os.path.join(output_dir, CHECKPOINT)
    cfg = {"particles": os.path.abspath(particles), "output_dir": os.path.abspath(output_dir),
           "latent_dim": int(latent_dim), "epochs": int(epochs), "batch_size": int(batch_size),
           "beta": float(beta), "n_basis": int(n_basis), "hidden": int(hidden),
           "learning_rate": float(learning_rate), "seed": int(seed), "pose_free": bool(pose_free),
           "pose_heads": int(pose_heads), "symmetry": symmetry,
           "volume_steps": None if volume_steps is None else int(volume_steps),
           "beta_warmup_epochs": beta_warmup_epochs}
    if resume:
        if not os.path.exists(ckpt_path):
            raise InputError("%s: no checkpoint to continue from" % ckpt_path)
        for name in (CHECKPOINT, LATENT_STAR, "consensus.mrc", VARIATION_MAP) if writer else ():
            remove_stale_parts(os.path.join(output_dir, name))  # temporary files of a run killed while writing
        ckpt = read_checkpoint(ckpt_path)
        old = ckpt["config"]
        for k, default in (("latent_dim", None), ("n_basis", None), ("hidden", None), ("pose_free", False),
                           ("symmetry", "C1")):
            if old.get(k, default) != cfg[k]:
                raise InputError("--continue: %s %s differs from the checkpoint's %s" % (k, cfg[k], old.get(k, default)))
        cfg.update(box=old["box"], scale=old["scale"], particles=os.path.abspath(particles))
        init = {"mean_volume": ckpt["model"]["volumes"][0], "noise_var": ckpt["model"]["noise_var"],
                "checkpoint": ckpt}
        if ckpt["epoch"] >= cfg["epochs"] and writer:
            logger.info("checkpoint already at epoch %d of %d; nothing to train", ckpt["epoch"], cfg["epochs"])
    else:
        star = load_particles(particles, poses=not pose_free)
        data = ParticleBatches(star, box, poses=not pose_free)
        if reference and not os.path.exists(reference):
            raise InputError("%s: not found" % reference)
        if writer:
            os.makedirs(output_dir, exist_ok=True)
        cfg.update(box=data.box, scale=data.scale)
        t0 = time.time()
        if pose_free:
            volume, noise_var = pose_free_start(data, reference)
        else:
            volume = consensus_map(data, 256, devices[0], symmetry)
            noise_var = noise_estimate(data, volume, 2000, 256)
        init = {"mean_volume": volume, "noise_var": noise_var}
        data.close()
        if writer:
            write_mrc(os.path.join(output_dir, "consensus.mrc"), volume.numpy() * data.scale, data.pixel_size_A)
            logger.info("%d particles, box %d px at %.3f Å/px; %s and noise spectrum in %.1f s",
                        len(star), cfg["box"], data.pixel_size_A,
                        "pose-free start volume" if pose_free else "consensus map", time.time() - t0)
    devices = list(devices)
    if launch.world_size == 1 and len(devices) > 1:
        torch.multiprocessing.spawn(_ddp_entry, nprocs=len(devices), args=(
            devices, cfg, init, _free_port(), logging_configured(), torch.get_num_threads()))
    else:
        _run(cfg, init, devices[0], launch)
    return output_dir
