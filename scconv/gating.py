"""The one place that decides which implementation of the SC-Conv gating runs.

    gate(x, k2, k3) = k3 * sigmoid(x + upsample_nearest(k2, size=x.shape[-2:]))

Implementations, chosen by name:
- ``"eager"``: the official math, four ATen ops (``kernels.reference.sc_gate_reference``);
- ``"triton"``: the fused Triton kernels (``kernels.sc_gate``), forward and backward;
- ``"auto"``: ``"triton"`` for CUDA tensors, ``"eager"`` otherwise.

The environment variable ``SCCONV_GATE`` sets only the default used when no name is given.
"""

import os

import torch

from kernels.reference import sc_gate_reference

GATES = ("eager", "triton", "auto")
DEFAULT_GATE = "auto"


def check_gate(name: str) -> str:
    """Return ``name`` if it names a gating implementation, else raise ``ValueError``."""
    if name not in GATES:
        raise ValueError(f"unknown gate {name!r}; valid gates are {', '.join(GATES)}")
    return name


def default_gate() -> str:
    """The gate used when none is given: ``$SCCONV_GATE`` if set, else ``"auto"``."""
    name = os.environ.get("SCCONV_GATE", DEFAULT_GATE)
    if name not in GATES:
        raise ValueError(f"SCCONV_GATE={name!r} is not a gate; valid gates are {', '.join(GATES)}")
    return name


def resolve_gate(name: str, x: torch.Tensor) -> str:
    """The concrete implementation (``"eager"`` or ``"triton"``) that ``name`` selects for ``x``."""
    check_gate(name)
    if name == "auto":
        return "triton" if x.is_cuda else "eager"
    return name


def sc_gate(x: torch.Tensor, k2: torch.Tensor, k3: torch.Tensor, gate: str | None = None):
    """Run the SC-Conv gating with the implementation named ``gate`` (``None``: the default)."""
    if resolve_gate(gate if gate is not None else default_gate(), x) == "triton":
        # Imported on first use: `import scconv` stays free of triton.
        from kernels import sc_gate as triton_sc_gate

        return triton_sc_gate(x, k2, k3)
    return sc_gate_reference(x, k2, k3)
