"""Where the Triton kernels run: compiled on a CUDA GPU, through Triton's interpreter elsewhere.

Triton decides between compiling and interpreting when a kernel is *decorated*: ``@triton.jit``
returns an interpreted function only if ``TRITON_INTERPRET=1`` is in the environment at that moment.
``kernels/__init__.py`` therefore calls :func:`configure_interpreter` before anything in this
package imports ``triton``, so on a machine without CUDA the kernels in ``kernels/gate.py`` are
always built for the interpreter, whatever the user imported first:

- ``import torch`` does not import triton (checked with torch 2.11 and 2.14);
- ``import torchvision`` and ``torch.compile`` (``torch._dynamo``) do import triton. Triton's own
  helpers built at that import (``tl.sigmoid``, ``tl.sum``, ``tl.cdiv``, ``tl.zeros`` are
  ``@triton.jit`` functions) are then compiled ones, which an interpreted kernel cannot call
  ("Cannot call @triton.jit'd outside of the scope of a kernel"). The kernels use only builtins
  (``tl.exp``, ``tl.full``, ``tl.reduce`` with their own combine function), so they still run
  in that order;
  ``tests/test_kernels.py`` checks every import order in a fresh interpreter.

When the interpreter cannot be used (no CUDA, and ``TRITON_INTERPRET`` set to a false value before
the kernels were built) :func:`require_runnable` raises a ``RuntimeError`` that says what to do.

:class:`LaunchPlans` caches, per kernel, what a launcher derives from its tensors' metadata.

This module imports only ``torch`` (never ``triton``), so it is safe to import first.
"""

import os

import torch

INTERPRET_ENV = "TRITON_INTERPRET"
_TRUE_WORDS = ("1", "true", "on", "yes")  # what Triton's env_bool accepts as true


def cuda_present() -> bool:
    """Whether PyTorch sees a CUDA device (asks the CUDA runtime, not Triton)."""
    return torch.cuda.is_available()


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` is set to a true value in this process's environment."""
    return os.environ.get(INTERPRET_ENV, "").strip().lower() in _TRUE_WORDS


def configure_interpreter() -> None:
    """Turn Triton's interpreter on when there is no CUDA device and the user chose nothing.

    Sets ``TRITON_INTERPRET=1`` in ``os.environ`` (this process and its children) only when CUDA
    is absent and the variable is unset; an explicit value, true or false, is left as it is.
    Must run before ``kernels.gate`` decorates its kernels.
    """
    if not cuda_present() and INTERPRET_ENV not in os.environ:
        os.environ[INTERPRET_ENV] = "1"


def require_runnable(interpreted: bool) -> None:
    """Raise ``RuntimeError`` if kernels built in this mode cannot run on this machine.

    ``interpreted`` says whether the gating kernels were decorated for the interpreter. Compiled
    kernels need a CUDA device; interpreted ones run anywhere.
    """
    if interpreted or cuda_present():
        return
    raise RuntimeError(
        "The SC-Conv Triton kernels were built for a GPU, but this machine has no CUDA device, "
        f"and Triton's interpreter is off ({INTERPRET_ENV}="
        f"{os.environ.get(INTERPRET_ENV, '<unset>')!r} when the kernels were built). "
        f"Set {INTERPRET_ENV}=1 in the environment before starting Python (or before triton is "
        "first imported), or import `kernels` (or `scconv`) before anything that imports triton "
        "with the interpreter disabled; or use gate='eager'."
    )


def require_launchable(interpreted: bool, device: torch.device, op: str, off_cuda: str) -> None:
    """Raise if kernels built in this mode cannot take tensors on ``device``.

    :func:`require_runnable`, and then: compiled kernels read CUDA memory only (Triton would
    fail on a CPU pointer). ``op`` names the caller and ``off_cuda`` says what to use instead.
    """
    require_runnable(interpreted)
    if not interpreted and device.type != "cuda":
        raise ValueError(
            f"{op}: the Triton kernels are compiled for CUDA here, got tensors on {device}; "
            f"move them to the GPU, or {off_cuda}"
        )


class LaunchPlans:
    """Launch plans of one kernel, by the launch's tensor metadata.

    A plan is everything a launcher derives from the shapes, strides and dtype of its tensors
    (scalar arguments, constexprs, grid, table key). Deriving it costs 15-20 us of Python per
    launch, which at batch 1 is longer than the kernel runs; looking it up costs about 2 us.
    ``key`` must hold every input of the plan: the tensors' shapes and strides, their dtype, the
    non-tensor arguments, and module constants the builder reads that tests may change (such as
    ``_INT32_LIMIT``). At ``max_plans`` distinct keys the cache starts over, so a program that
    sees ever new shapes keeps a bounded cache.
    """

    def __init__(self, max_plans: int = 4096):
        self.max_plans = max_plans
        self._plans: dict = {}

    def get(self, key, build, *args):
        """The plan stored under ``key``, else ``build(*args)``, stored."""
        plan = self._plans.get(key)
        if plan is None:
            plan = build(*args)
            if len(self._plans) >= self.max_plans:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        self._plans.clear()


def layout_key(*tensors: torch.Tensor) -> tuple:
    """The shapes and strides of ``tensors``: with their dtype, what a launch plan depends on."""
    return tuple((t.shape, t.stride()) for t in tensors)
