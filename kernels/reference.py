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


def nearest_source_index(dst_size: int, src_size: int, device=None) -> torch.Tensor:
    """Source index (int64, shape ``(dst_size,)``) of each output index along one axis of
    ``F.interpolate(mode="nearest")`` on float32/16/bf16 tensors (CPU and CUDA alike):
    ``min(floor(i * s), src_size - 1)`` with ``s = float32(src_size) / dst_size`` in float32.

    PyTorch's float64 CPU path maps some sizes differently (e.g. 24 -> 74, row 37: 12, not 11),
    so gathering with this map gives the exact float64 gating that the kernels and the eager
    reference in low precision approximate.
    """
    if dst_size < 1 or src_size < 1:
        raise ValueError(f"sizes must be >= 1, got dst_size={dst_size}, src_size={src_size}")
    scale = torch.tensor(src_size, dtype=torch.float32) / dst_size  # float32, as PyTorch does
    index = torch.floor(torch.arange(dst_size, dtype=torch.float32) * scale).long()
    return index.clamp_(max=src_size - 1).to(device)
