"""Triton kernels for the SC-Conv gating ``k3 * sigmoid(x + upsample_nearest(k2))``.

Public API:

- :func:`sc_gate` (x, k2, k3) -> out: the fused Triton forward and backward, autograd-capable and
  traceable by ``torch.compile(fullgraph=True)`` (custom ops ``scconv::sc_gate`` and
  ``scconv::sc_gate_backward``);
- :func:`sc_gate_reference`: the eager PyTorch reference (four ATen ops).

Importing this package never imports triton: it only turns Triton's interpreter on when there is no
CUDA device (``kernels/runtime.py``); triton is imported on the first :func:`sc_gate` call.
"""

from kernels import runtime as _runtime

_runtime.configure_interpreter()

import torch  # noqa: E402

from kernels.reference import sc_gate_reference  # noqa: E402

__all__ = ["sc_gate", "sc_gate_reference"]


def sc_gate(x, k2, k3):
    """Fused SC-Conv gating ``k3 * sigmoid(x + upsample_nearest(k2, size=x.shape[-2:]))``.

    Args:
        x: (N, C, H, W) float16, bfloat16, float32 or float64, CUDA (or CPU through Triton's
            interpreter); any strides: NCHW, channels_last, channel-slice views; never copied.
        k2: (N, C, h, w) with 1 <= h <= H and 1 <= w <= W; same dtype and device.
        k3: (N, C, H, W); same dtype and device.

    Returns:
        (N, C, H, W) tensor in x's dtype and memory format; gradients flow to x, k2 and k3.
    """
    for name, t in (("x", x), ("k2", k2), ("k3", k3)):
        if not isinstance(t, torch.Tensor):  # before the op's schema check, which prints t
            raise TypeError(f"sc_gate: {name} must be a torch.Tensor, got {type(t).__name__}")
    from kernels.op import sc_gate_op  # triton is imported here, on first use

    return sc_gate_op(x, k2, k3)
