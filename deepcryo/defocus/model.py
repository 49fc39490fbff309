"""Defocus CNNs: the seed's 3-branch baseline, a plain strided CNN, and deepcryo's polar model; weight files.

* :class:`SeedDefocusCNN` — the seed thesis' architecture (baseline);
* :class:`DefocusNet` — a small strided CNN on the Cartesian PSDs (the first shipped version);
* :class:`PolarDefocusNet` (``arch: polar``): PSDs resampled onto (azimuth × s²), where Thon rings are
  straight stripes, a per-azimuth defocus profile, and its projection on 1, cos 2φ, sin 2φ;
* :class:`RingMatchNet` — the shipped model (``arch: rings``): the polar frame, a fixed bank of Thon-ring
  templates per azimuth, a CNN that localises the defocus along each azimuth (soft-argmax).

All take the PSD stack of :func:`deepcryo.defocus.psd.compute_psd` (B, 3, S, S) (samplings 1, 2, 3 Å/px)
and the acquisition ``(voltage_kV / 300, cs_mm / 2.7)`` (B, 2), and return (B, 4):
``(U / 10⁴ Å, V / 10⁴ Å, sin 2θ, cos 2θ)`` with θ the astigmatism angle (degrees from x to U).
:func:`decode` turns that into Å and degrees (U >= V, θ in [0, 180)).

Weight files are ``torch.save({"format": FORMAT, "config": {...}, "state_dict": ...})`` and are read with
``torch.load(weights_only=True)``; :func:`load_model` refuses anything else with one clear line.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn
import torch.nn.functional as F

from ..core.ctf import wavelength_A
from ..core.errors import InputError, load_error_reason
from ..core.files import atomic_output

__all__ = ["SeedDefocusCNN", "DefocusNet", "PolarDefocusNet", "RingMatchNet", "build_model", "decode", "encode", "acquisition_features",
           "save_model", "load_model", "SHIPPED_WEIGHTS", "FORMAT", "DEFOCUS_SCALE_A"]

FORMAT = "deepcryo.defocus/1"
DEFOCUS_SCALE_A = 1e4
SHIPPED_WEIGHTS = os.path.join(os.path.dirname(__file__), "weights", "defocus_cnn.pt")


def acquisition_features(voltage_kV: Union[float, torch.Tensor], cs_mm: Union[float, torch.Tensor],
                         batch: int) -> torch.Tensor:
    """(B, 2) tensor ``(voltage_kV / 300, cs_mm / 2.7)`` from floats or (B,) values."""
    v = torch.as_tensor(voltage_kV, dtype=torch.float32).reshape(-1).expand(batch)
    c = torch.as_tensor(cs_mm, dtype=torch.float32).reshape(-1).expand(batch)
    return torch.stack([v / 300.0, c / 2.7], dim=1)


def encode(defocus_u_A: torch.Tensor, defocus_v_A: torch.Tensor, defocus_angle_deg: torch.Tensor) -> torch.Tensor:
    """Targets (B, 4) ``(U/10⁴, V/10⁴, sin 2θ, cos 2θ)`` from Å and degrees."""
    u, v, a = (torch.as_tensor(x, dtype=torch.float32).reshape(-1) for x in
               (defocus_u_A, defocus_v_A, defocus_angle_deg))
    t = torch.deg2rad(a) * 2
    return torch.stack([u / DEFOCUS_SCALE_A, v / DEFOCUS_SCALE_A, torch.sin(t), torch.cos(t)], dim=1)


def decode(out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_A, V_A, angle_deg) tensors (B,) from model outputs (B, 4); U >= V, angle in [0, 180)."""
    a = out[:, 0] * DEFOCUS_SCALE_A
    b = out[:, 1] * DEFOCUS_SCALE_A
    angle = torch.rad2deg(torch.atan2(out[:, 2], out[:, 3])) / 2.0
    u, v = torch.maximum(a, b), torch.minimum(a, b)
    angle = torch.where(b > a, angle + 90.0, angle) % 180.0
    return u, v, angle


class _Branch(nn.Sequential):
    """The seed's branch: 4 × (Conv 'valid' + ReLU + BatchNorm + MaxPool)."""

    def __init__(self, kernels: Sequence[int], filters: Sequence[int] = (16, 8, 4, 2),
                 pools: Sequence[int] = (3, 2, 2, 2)) -> None:
        layers, cin = [], 1
        for k, f, p in zip(kernels, filters, pools):
            layers += [nn.Conv2d(cin, f, k), nn.ReLU(), nn.BatchNorm2d(f), nn.MaxPool2d(p)]
            cin = f
        super().__init__(*layers, nn.Flatten())


class SeedDefocusCNN(nn.Module):
    """Baseline: the seed thesis' 3-branch CNN (kernels 12/6/3/3, 15/10/3/3, 20/15/7/3; filters 16/8/4/2;
    concat → dropout 0.3 → dense 32 → dense), here with 4 outputs and the acquisition concatenated.
    ``size_px`` is the PSD side (512 in the thesis, 119,096 parameters with 2 outputs)."""

    def __init__(self, size_px: int = 512) -> None:
        super().__init__()
        self.branches = nn.ModuleList([_Branch((12, 6, 3, 3)), _Branch((15, 10, 3, 3)), _Branch((20, 15, 7, 3))])
        with torch.no_grad():
            n = sum(b(torch.zeros(1, 1, size_px, size_px)).shape[1] for b in self.branches)
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(n + 2, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, psd: torch.Tensor, acq: torch.Tensor) -> torch.Tensor:
        feats = [b(psd[:, i:i + 1]) for i, b in enumerate(self.branches)]
        return self.head(torch.cat(feats + [acq], dim=1))


class DefocusNet(nn.Module):
    """A small strided CNN over the 3 PSD channels together (rings at 1, 2, 3 Å/px are
    seen jointly), adaptive pooling to 4×4 (keeps where the rings are), acquisition concatenated, MLP."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 5, stride=2, padding=2), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(16 * 4 * w + 2, 96), nn.ReLU(), nn.Linear(96, 4))

    def forward(self, psd: torch.Tensor, acq: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.features(psd), acq], dim=1))


def _polar_radii_sq_px(size_px, n_radial):
    """Squared radii (px²) of the polar grid, uniform in s² from 2 px to 1 px inside the edge: the (n_radial,)
    tensor and its step (px²)."""
    step = ((size_px / 2 - 1) ** 2 - 4.0) / n_radial
    return 4.0 + (torch.arange(n_radial, dtype=torch.float32) + 0.5) * step, step


class PolarDefocusNet(nn.Module):
    """A fixed polar resampling of the PSD, then a small CNN that reads each azimuth.

    1. The three centred PSD channels (B, 3, S, S) are resampled (bilinear, no parameters) onto a polar grid of
       ``n_angles`` azimuths φ in [0°, 180°) (the PSD is centrosymmetric) × ``n_radial`` radii uniform in the
       squared frequency s² (from 2 px to the channel's Nyquist). Without Cs, Thon rings are periodic in s²
       with period ``1/(λ Δf(φ))``, so in this frame they are straight stripes whose spacing encodes the
       defocus along φ: a small, local problem for convolutions.
    2. Convolutions (circular along the azimuth, strided along s²), then a per-azimuth MLP (shared by all
       azimuths, fed with the acquisition) give a defocus profile ``d(φ)`` (units of 10⁴ Å).
    3. The astigmatic CTF has ``Δf(φ) = z + a cos 2(φ − θ)``: the profile is projected (least squares) onto
       ``1, cos 2φ, sin 2φ`` → ``z, a cos 2θ, a sin 2θ``, so the angle is equivariant by construction and
       U = z + a, V = z − a.
    Output (B, 4) as every model here: ``(U/10⁴ Å, V/10⁴ Å, sin 2θ, cos 2θ)``; :meth:`profile` gives d(φ).
    """

    def __init__(self, width: int = 24, n_angles: int = 32, n_radial: int = 128, size_px: int = 128) -> None:
        super().__init__()
        w = width
        self.n_angles, self.n_radial, self.size_px = int(n_angles), int(n_radial), int(size_px)
        phi = (torch.arange(self.n_angles, dtype=torch.float32) + 0.5) * math.pi / self.n_angles
        r = _polar_radii_sq_px(size_px, self.n_radial)[0].sqrt()
        x = size_px // 2 + r[None, :] * torch.cos(phi)[:, None]  # pixel positions (x = last axis)
        y = size_px // 2 + r[None, :] * torch.sin(phi)[:, None]
        grid = torch.stack([(x + 0.5) / size_px * 2 - 1, (y + 0.5) / size_px * 2 - 1], dim=-1)
        self.register_buffer("grid", grid[None], persistent=False)  # (1, A, R, 2)
        self.register_buffer("harmonics", torch.stack([torch.ones_like(phi), 2 * torch.cos(2 * phi),
                                                       2 * torch.sin(2 * phi)]) / self.n_angles, persistent=False)
        self.register_buffer("phi", phi, persistent=False)

        def block(cin, cout, k, stride):
            return [nn.Conv2d(cin, cout, (3, k), stride=(1, stride), padding=(1, k // 2), padding_mode="circular"),
                    nn.BatchNorm2d(cout), nn.ReLU()]
        # circular padding is right along the azimuth (period 180°); along s² it only touches 3 edge columns
        self.features = nn.Sequential(*block(3, w, 7, 1), *block(w, w, 5, 2), *block(w, 2 * w, 5, 2),
                                      *block(2 * w, 2 * w, 3, 2), *block(2 * w, 2 * w, 3, 2))
        n_r = (self.n_radial + 15) // 16
        self.head = nn.Sequential(nn.Linear(2 * w * n_r + 2, 64), nn.ReLU(), nn.Linear(64, 1))

    def polar(self, psd: torch.Tensor) -> torch.Tensor:
        """(B, 3, n_angles, n_radial) polar resampling of centred PSDs (B, 3, S, S)."""
        return F.grid_sample(psd, self.grid.expand(psd.shape[0], -1, -1, -1), mode="bilinear",
                             padding_mode="zeros", align_corners=False)

    def profile(self, psd: torch.Tensor, acq: torch.Tensor) -> torch.Tensor:
        """Defocus profile d(φ) (B, n_angles), units of 10⁴ Å, at azimuths :attr:`phi` (radians)."""
        f = self.features(self.polar(psd))  # (B, C, A, R')
        b, c, a, r = f.shape
        f = f.permute(0, 2, 1, 3).reshape(b, a, c * r)
        f = torch.cat([f, acq[:, None, :].expand(b, a, acq.shape[1])], dim=2)
        return self.head(f)[..., 0]

    @staticmethod
    def from_harmonics(z: torch.Tensor, ax: torch.Tensor, ay: torch.Tensor) -> torch.Tensor:
        """Outputs (B, 4) from mean defocus and astigmatism components (units of 10⁴ Å)."""
        a = torch.sqrt(ax * ax + ay * ay + 1e-8)
        return torch.stack([z + a, z - a, ay / a, ax / a], dim=1)

    def harmonics_of(self, profile: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z, a cos 2θ, a sin 2θ) (B,) each, least-squares fit of ``z + a cos 2(φ − θ)`` to a profile."""
        h = profile @ self.harmonics.t()
        return h[:, 0], h[:, 1], h[:, 2]

    def forward(self, psd: torch.Tensor, acq: torch.Tensor) -> torch.Tensor:
        return self.from_harmonics(*self.harmonics_of(self.profile(psd, acq)))


class RingMatchNet(PolarDefocusNet):
    """deepcryo's shipped model (``arch: rings``): polar PSDs, a fixed bank of Thon-ring templates, a CNN that
    localises the defocus along each azimuth.

    Why: a CNN asked to regress a ring *frequency* over a 17× range (0.3–5 µm) from raw pixels trains slowly
    and stays coarse (figures in ``benchmarks/RESULTS.md``). The physics of the
    rings is known exactly, so it is put in front of the network, with no learned parameters:

    1. as :class:`PolarDefocusNet`, each PSD channel (1, 2, 3 Å/px) is resampled onto ``n_angles`` azimuths ×
       ``n_radial`` radii uniform in s² (rings are straight stripes), and each azimuth row is standardised;
    2. each row is correlated with ``n_defocus`` templates ``sin² γ(s)`` for defoci log-spaced over
       ``defocus_range_A`` (γ of :mod:`deepcryo.core.ctf` with the micrograph's voltage and Cs, amplitude
       contrast 0.1), each template zero-mean and unit-norm over the radii where its ring period is at least
       2.5 samples (aliased rings left out) → a (channel × azimuth × defocus) map of ring agreement;
    3. a small CNN (circular along the azimuth, full resolution along the defocus axis) turns the three
       channels' maps into one logit per (azimuth, defocus); the soft-argmax over the defocus axis (in log
       defocus) is the profile ``d(φ)``, projected on 1, cos 2φ, sin 2φ as in :class:`PolarDefocusNet`.

    The voltage and Cs enter through the templates (``acq`` = (voltage/300, Cs/2.7) as for every model).
    """

    def __init__(self, width: int = 16, n_angles: int = 32, n_radial: int = 128, size_px: int = 128,
                 samplings_A: Sequence[float] = (1.0, 2.0, 3.0), n_defocus: int = 160,
                 defocus_range_A: Tuple[float, float] = (1000.0, 70000.0)) -> None:
        super().__init__(width=width, n_angles=n_angles, n_radial=n_radial, size_px=size_px)
        del self.features, self.head  # replaced below (built by the parent first: same seeded initialisation)
        r2, step = _polar_radii_sq_px(size_px, self.n_radial)
        samp = torch.as_tensor(samplings_A, dtype=torch.float32)
        self.register_buffer("s2", r2[None, :] / (size_px * samp[:, None]) ** 2, persistent=False)  # (C, R) 1/Å²
        self.register_buffer("ds2", step / (size_px * samp) ** 2, persistent=False)  # s² step (C,)
        log_df = torch.linspace(math.log(defocus_range_A[0]), math.log(defocus_range_A[1]), int(n_defocus))
        self.register_buffer("log_defocus", log_df, persistent=False)
        w = width
        layers, cin = [], len(samplings_A)
        for k in (7, 5, 5, 5):
            layers += [nn.Conv2d(cin, w, (3, k), padding=(1, k // 2), padding_mode="circular"),
                       nn.BatchNorm2d(w), nn.ReLU()]
            cin = w
        layers.append(nn.Conv2d(w, 1, 1))
        self.features = nn.Sequential(*layers)

    def templates(self, acq: torch.Tensor) -> torch.Tensor:
        """(B, C, K, R) zero-mean, unit-norm ring templates for acquisitions ``acq`` (B, 2)."""
        lam = wavelength_A(acq[:, 0] * 300.0)[:, None, None, None]  # (B, 1, 1, 1)
        cs_A = (acq[:, 1] * 2.7 * 1e7)[:, None, None, None]
        df = self.log_defocus.exp()[None, None, :, None]  # (1, 1, K, 1)
        s2 = self.s2[None, :, None, :]  # (1, C, 1, R)
        w0 = math.atan(0.1 / math.sqrt(1 - 0.01))
        gamma = math.pi * lam * df * s2 - 0.5 * math.pi * cs_A * lam ** 3 * s2 * s2 + w0
        slope = (math.pi * lam * df - math.pi * cs_A * lam ** 3 * s2).abs()  # dγ/ds²
        period_samples = math.pi / slope.clamp(min=1e-12) / self.ds2[None, :, None, None]
        mask = (period_samples >= 2.5).float()
        t = torch.sin(gamma) ** 2 * mask
        n = mask.sum(-1, keepdim=True).clamp(min=1.0)
        t = (t - t.sum(-1, keepdim=True) / n) * mask
        return t / t.norm(dim=-1, keepdim=True).clamp(min=1e-6)

    def ring_scores(self, psd: torch.Tensor, acq: torch.Tensor) -> torch.Tensor:
        """(B, C, A, K) correlation of each standardised polar row with each defocus template."""
        rows = self.polar(psd)
        rows = rows - rows.mean(-1, keepdim=True)
        rows = rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        return torch.einsum("bcar,bckr->bcak", rows, self.templates(acq))

    def profile(self, psd: torch.Tensor, acq: torch.Tensor) -> torch.Tensor:
        """Defocus profile d(φ) (B, n_angles), units of 10⁴ Å: soft-argmax of the logits over log defocus."""
        logits = self.features(self.ring_scores(psd, acq) * 4.0)[:, 0]  # (B, A, K)
        log_df = (torch.softmax(logits, dim=-1) * self.log_defocus).sum(-1)
        return log_df.exp() / DEFOCUS_SCALE_A


def build_model(config: Dict[str, Any]) -> nn.Module:
    """Model from a JSON-able config ``{"arch": "rings"|"polar"|"defocusnet"|"seed", ...}``."""
    arch = config.get("arch")
    if arch == "defocusnet":
        return DefocusNet(width=int(config.get("width", 16)))
    if arch == "polar":
        return PolarDefocusNet(width=int(config.get("width", 24)), n_angles=int(config.get("n_angles", 32)),
                               n_radial=int(config.get("n_radial", 128)))
    if arch == "rings":
        return RingMatchNet(width=int(config.get("width", 16)), n_angles=int(config.get("n_angles", 32)),
                            n_radial=int(config.get("n_radial", 128)), n_defocus=int(config.get("n_defocus", 160)))
    if arch == "seed":
        return SeedDefocusCNN(size_px=int(config["size_px"]))
    raise InputError("unknown defocus model architecture %r" % (arch,))


def save_model(path: str, model: nn.Module, config: Dict[str, Any]) -> None:
    """Write weights + config atomically (``config`` must be JSON-able: str, numbers, lists)."""
    payload = {"format": FORMAT, "config": dict(config),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def load_model(path: Optional[str] = None, device: Union[str, torch.device] = "cpu") -> Tuple[nn.Module,
               Dict[str, Any]]:
    """(model in eval mode, config) from a weight file (default: the shipped weights)."""
    path = path or SHIPPED_WEIGHTS
    if not os.path.exists(path):
        raise InputError("%s: model file not found" % path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError("%s: not a deepcryo defocus model (%s)" % (path, load_error_reason(exc)))
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError("%s: not a deepcryo defocus model (no %r format tag)" % (path, FORMAT))
    config = payload["config"]
    model = build_model(config)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise InputError("%s: weights do not match the %s architecture (%s)"
                         % (path, config.get("arch"), str(exc).splitlines()[0][:120]))
    return model.to(device).eval(), config


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


__all__.append("count_parameters")
