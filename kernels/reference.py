"""Eager PyTorch SC-Conv gating: the one reference for tests, benchmarks and the "eager" gate.

    out = k3 * sigmoid(x + upsample_nearest(k2, size=x.shape[-2:]))

These are the same four ATen ops the official SCNet code runs (interpolate, add, sigmoid, mul).
"""

import torch
import torch.nn.functional as F


def sc_gate_reference(x: torch.Tensor, k2: torch.Tensor, k3: torch.Tensor) -> torch.Tensor:
    """Eager SC-Conv gating. x, k3: (N, C, H, W); k2: (N, C, h, w) with h <= H, w <= W."""
    gate = torch.sigmoid(torch.add(x, F.interpolate(k2, size=x.shape[-2:], mode="nearest")))
    return torch.mul(k3, gate)
