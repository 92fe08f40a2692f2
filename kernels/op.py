"""The gating as PyTorch custom ops, so autograd and ``torch.compile`` see one opaque op each way.

- ``torch.ops.scconv.sc_gate(x, k2, k3) -> out`` runs :func:`kernels.gate.gate_forward`;
- ``torch.ops.scconv.sc_gate_backward(grad_out, x, k2, k3) -> (grad_x, grad_k2, grad_k3)`` runs
  :func:`kernels.gate.gate_backward`.

Both have fake implementations (shapes, dtypes and memory formats only, with the same input checks),
and the forward's autograd formula calls the backward op, so ``torch.compile(fullgraph=True)``
traces both directions without graph breaks. Autograd saves only x, k2 and k3.

``torch.library.custom_op`` is used rather than ``triton_op``/``wrap_triton``: the latter hands
fake tensors to Triton's interpreter on CPU-only machines, which then fails reading data pointers.
Double backward is not supported: differentiating the backward op raises a RuntimeError that
says so.
"""

import torch

from kernels import gate


@torch.library.custom_op("scconv::sc_gate", mutates_args=())
def sc_gate_op(x: torch.Tensor, k2: torch.Tensor, k3: torch.Tensor) -> torch.Tensor:
    return gate.gate_forward(x, k2, k3)


@sc_gate_op.register_fake
def _sc_gate_fake(x, k2, k3):
    gate.check_inputs(x, k2, k3)
    return gate.empty_like_layout(x)


@torch.library.custom_op("scconv::sc_gate_backward", mutates_args=())
def sc_gate_backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, k2: torch.Tensor, k3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return gate.gate_backward(grad_out, x, k2, k3)


@sc_gate_backward_op.register_fake
def _sc_gate_backward_fake(grad_out, x, k2, k3):
    gate.check_inputs(x, k2, k3)
    return gate.empty_like_layout(x), gate.empty_like_layout(k2), gate.empty_like_layout(k3)


def _setup_context(ctx, inputs, output):
    x, k2, k3 = inputs
    ctx.save_for_backward(x, k2, k3)


def _backward(ctx, grad_out):
    x, k2, k3 = ctx.saved_tensors
    return sc_gate_backward_op(grad_out, x, k2, k3)


sc_gate_op.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "sc_gate: double backward (gradients of gradients, create_graph=True) is not supported "
        "by the fused kernels; use the eager gating (gate='eager') for it"
    )


# Without a formula autograd says "no autograd formula was registered", which tells a user
# neither that double backward is unsupported nor what to use instead.
sc_gate_backward_op.register_autograd(_no_double_backward)


def sc_gate(x: torch.Tensor, k2: torch.Tensor, k3: torch.Tensor) -> torch.Tensor:
    """Fused SC-Conv gating ``k3 * sigmoid(x + upsample_nearest(k2, size=x.shape[-2:]))``.

    Differentiable with respect to all three inputs; see :func:`kernels.gate.gate_forward` for the
    accepted shapes, dtypes and layouts.
    """
    return sc_gate_op(x, k2, k3)
