"""Defocus CNNs: the seed's 3-branch baseline and deepcryo's small fast model; weight files.

Both take the PSD stack of :func:`deepcryo.defocus.psd.compute_psd` (B, 3, S, S) (samplings 1, 2, 3 Å/px)
and the acquisition ``(voltage_kV / 300, cs_mm / 2.7)`` (B, 2), and return (B, 4):
``(U / 10⁴ Å, V / 10⁴ Å, sin 2θ, cos 2θ)`` with θ the astigmatism angle (degrees from x to U).
:func:`decode` turns that into Å and degrees (U >= V, θ in [0, 180)).

Weight files are ``torch.save({"format": FORMAT, "config": {...}, "state_dict": ...})`` and are read with
``torch.load(weights_only=True)``; :func:`load_model` refuses anything else with one clear line.
"""
import os

import torch
from torch import nn

from ..core.io import InputError, atomic_output, load_error_reason

__all__ = ["SeedDefocusCNN", "DefocusNet", "build_model", "decode", "encode", "acquisition_features",
           "save_model", "load_model", "SHIPPED_WEIGHTS", "FORMAT", "DEFOCUS_SCALE_A"]

FORMAT = "deepcryo.defocus/1"
DEFOCUS_SCALE_A = 1e4
SHIPPED_WEIGHTS = os.path.join(os.path.dirname(__file__), "weights", "defocus_cnn.pt")


def acquisition_features(voltage_kV, cs_mm, batch):
    """(B, 2) tensor ``(voltage_kV / 300, cs_mm / 2.7)`` from floats or (B,) values."""
    v = torch.as_tensor(voltage_kV, dtype=torch.float32).reshape(-1).expand(batch)
    c = torch.as_tensor(cs_mm, dtype=torch.float32).reshape(-1).expand(batch)
    return torch.stack([v / 300.0, c / 2.7], dim=1)


def encode(defocus_u_A, defocus_v_A, defocus_angle_deg):
    """Targets (B, 4) ``(U/10⁴, V/10⁴, sin 2θ, cos 2θ)`` from Å and degrees."""
    u, v, a = (torch.as_tensor(x, dtype=torch.float32).reshape(-1) for x in
               (defocus_u_A, defocus_v_A, defocus_angle_deg))
    t = torch.deg2rad(a) * 2
    return torch.stack([u / DEFOCUS_SCALE_A, v / DEFOCUS_SCALE_A, torch.sin(t), torch.cos(t)], dim=1)


def decode(out):
    """(U_A, V_A, angle_deg) tensors (B,) from model outputs (B, 4); U >= V, angle in [0, 180)."""
    a = out[:, 0] * DEFOCUS_SCALE_A
    b = out[:, 1] * DEFOCUS_SCALE_A
    angle = torch.rad2deg(torch.atan2(out[:, 2], out[:, 3])) / 2.0
    u, v = torch.maximum(a, b), torch.minimum(a, b)
    angle = torch.where(b > a, angle + 90.0, angle) % 180.0
    return u, v, angle


class _Branch(nn.Sequential):
    """The seed's branch: 4 × (Conv 'valid' + ReLU + BatchNorm + MaxPool)."""

    def __init__(self, kernels, filters=(16, 8, 4, 2), pools=(3, 2, 2, 2)):
        layers, cin = [], 1
        for k, f, p in zip(kernels, filters, pools):
            layers += [nn.Conv2d(cin, f, k), nn.ReLU(), nn.BatchNorm2d(f), nn.MaxPool2d(p)]
            cin = f
        super().__init__(*layers, nn.Flatten())


class SeedDefocusCNN(nn.Module):
    """Baseline: the seed thesis' 3-branch CNN (kernels 12/6/3/3, 15/10/3/3, 20/15/7/3; filters 16/8/4/2;
    concat → dropout 0.3 → dense 32 → dense), here with 4 outputs and the acquisition concatenated.
    ``size_px`` is the PSD side (512 in the thesis, 119,096 parameters with 2 outputs)."""

    def __init__(self, size_px=512):
        super().__init__()
        self.branches = nn.ModuleList([_Branch((12, 6, 3, 3)), _Branch((15, 10, 3, 3)), _Branch((20, 15, 7, 3))])
        with torch.no_grad():
            n = sum(b(torch.zeros(1, 1, size_px, size_px)).shape[1] for b in self.branches)
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(n + 2, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, psd, acq):
        feats = [b(psd[:, i:i + 1]) for i, b in enumerate(self.branches)]
        return self.head(torch.cat(feats + [acq], dim=1))


class DefocusNet(nn.Module):
    """deepcryo's model: a small strided CNN over the 3 PSD channels together (rings at 1, 2, 3 Å/px are
    seen jointly), adaptive pooling to 4×4 (keeps where the rings are), acquisition concatenated, MLP."""

    def __init__(self, width=16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 5, stride=2, padding=2), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(16 * 4 * w + 2, 96), nn.ReLU(), nn.Linear(96, 4))

    def forward(self, psd, acq):
        return self.head(torch.cat([self.features(psd), acq], dim=1))


def build_model(config):
    """Model from a JSON-able config ``{"arch": "defocusnet"|"seed", ...}``."""
    arch = config.get("arch")
    if arch == "defocusnet":
        return DefocusNet(width=int(config.get("width", 16)))
    if arch == "seed":
        return SeedDefocusCNN(size_px=int(config["size_px"]))
    raise InputError("unknown defocus model architecture %r" % (arch,))


def save_model(path, model, config):
    """Write weights + config atomically (``config`` must be JSON-able: str, numbers, lists)."""
    payload = {"format": FORMAT, "config": dict(config),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def load_model(path=None, device="cpu"):
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


def count_parameters(model):
    """Number of trainable parameters."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


__all__.append("count_parameters")
