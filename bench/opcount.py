"""ATen ops per forward pass, before and after ``scconv.optimize_for_inference``.

``count_aten_ops(model, x)`` runs one forward under ``torch.no_grad()`` inside a
``TorchDispatchMode`` and counts every op that reaches the dispatcher below autograd: ATen ops
after their composite decompositions (``F.conv2d`` is one ``aten.convolution``, ``F.linear`` an
``aten.t`` and an ``aten.addmm``), views included (``aten.view``, ``aten.split_with_sizes``), and
custom ops such as ``scconv.relu_cat`` or the Triton gate as one op each (the mode sees the custom
op, not what runs inside it). Plain allocations (``aten.empty`` and friends) are not counted:
they launch no kernel, and eval-mode BatchNorm allocates an empty placeholder for each call on
this PyTorch. With that rule ResNet-50 is 176 ops and SCNet-50 432, the figures in
docs/DESIGN.md.

Only top-level ops are counted, NOT nested ones: the mode is switched off while an op runs, so
what a kernel calls internally is invisible to it. In particular a convolution or pooling that
receives a strided input copies it (``aten::contiguous`` -> ``clone`` -> ``copy_``) without
showing up here. Use ``torch.profiler`` to see nested ops (``tests/test_inference.py`` counts
nested clones that way).

Counts do not depend on the data or the image size, so the command line runs on PyTorch's
``meta`` device by default (shapes only, no arithmetic); ``--device cpu`` runs real forwards and
gives the same counts (``tests/test_inference.py`` checks that). They depend on the batch size
for optimized SCNets only: at batch 1 (what the command line uses) each block ReLUs its merged
``conv1`` output in place and splits it into two views, 14 ops; at larger batches (or in
channels_last) each view gets its own ReLU, which writes it dense, 15 ops (SCNet-50: 249 at
batch 1, 265 at batch 2); see ``scconv/inference.py``.

    python -m bench.opcount                      # the table for every model
    python -m bench.opcount --breakdown scnet50  # ops by name, original vs optimized
"""

import argparse
import collections
import warnings

import pandas as pd
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import scconv
from scconv.inference import optimize_for_inference
from scconv.models import InputTooSmallError

_ALLOCATIONS = frozenset(
    (
        torch.ops.aten.empty,
        torch.ops.aten.empty_strided,
        torch.ops.aten.empty_like,
        torch.ops.aten.new_empty,
        torch.ops.aten.new_empty_strided,
    )
)
# Every model of scconv.list_models(): the four SCNets, then the two ResNets.
DEFAULT_MODELS = ("scnet50", "scnet101", "scnet50_v1d", "scnet101_v1d", "resnet50", "resnet101")


class OpCounter(TorchDispatchMode):
    """Counts dispatched ops by name (``"aten.convolution.default"``); see the module docstring.

    ``counts`` holds the counted ops, ``allocations`` the number of allocations left out.
    """

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.allocations = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in _ALLOCATIONS:
            self.allocations += 1
        else:
            self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def aten_op_counts(model: torch.nn.Module, x: torch.Tensor) -> collections.Counter[str]:
    """Ops of one ``model(x)`` under ``torch.no_grad()``, by name (allocations left out)."""
    with torch.no_grad(), OpCounter() as counter:
        model(x)
    return counter.counts


def count_aten_ops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Number of ATen (and custom) ops one ``model(x)`` dispatches under ``torch.no_grad()``.

    Views count, allocations do not (see the module docstring). The model runs as given: put it
    in eval mode first to count inference.
    """
    return sum(aten_op_counts(model, x).values())


def _models(name: str, device: str, gate: str | None):
    """(original eval model, optimized model) on ``device``."""
    with torch.device(device):
        model = scconv.create_model(name, gate=gate).eval()
    return model, optimize_for_inference(model)


def _has_gate(name: str) -> bool:
    return name.startswith("scnet")


def op_count_table(
    names=DEFAULT_MODELS, size: int = 224, batch: int = 1, device: str = "meta"
) -> pd.DataFrame:
    """One row per model: ops per forward of the eval model and of its optimized version.

    SCNets are counted with the eager gate (what runs on a CPU, and the official code's four ops
    per gating) and, in ``optimized_triton_gate``, with the fused Triton gate (one op per gating;
    ``None`` when ``kernels.sc_gate`` cannot run on ``device``). ResNets have no gate.
    """
    rows = []
    x = torch.randn(batch, 3, size, size, device=device)
    for name in names:
        gate = "eager" if _has_gate(name) else None
        original, optimized = _models(name, device, gate)
        row = {
            "model": name,
            "original": count_aten_ops(original, x),
            "optimized": count_aten_ops(optimized, x),
            "optimized_triton_gate": None,
        }
        if _has_gate(name):
            try:
                triton_model = scconv.set_gate(optimize_for_inference(original), "triton")
                row["optimized_triton_gate"] = count_aten_ops(triton_model, x)
            except (ImportError, AttributeError, RuntimeError, NotImplementedError) as error:
                warnings.warn(f"{name}: triton gate not counted ({error})", stacklevel=2)
        else:
            row["optimized_triton_gate"] = row["optimized"]
        row["saved"] = f"{1 - row['optimized'] / row['original']:.0%}"
        rows.append(row)
        del original, optimized
    return pd.DataFrame(rows).astype({"optimized_triton_gate": "Int64"})


def breakdown(name: str, size: int = 224, batch: int = 1, device: str = "meta") -> pd.DataFrame:
    """Ops by name for one model (eager gate for SCNets), original vs optimized."""
    original, optimized = _models(name, device, "eager" if _has_gate(name) else None)
    x = torch.randn(batch, 3, size, size, device=device)
    before, after = aten_op_counts(original, x), aten_op_counts(optimized, x)
    ops = sorted(set(before) | set(after))
    table = pd.DataFrame([{"op": op, "original": before[op], "optimized": after[op]} for op in ops])
    table = table.sort_values(["original", "optimized"], ascending=False, ignore_index=True)
    total = {"op": "total", "original": before.total(), "optimized": after.total()}
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.opcount",
        description="ATen ops per forward, before and after scconv.optimize_for_inference.",
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"models (default: {' '.join(DEFAULT_MODELS)})"
    )
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--batch", type=int, default=1, help="batch size")
    parser.add_argument(
        "--device",
        default="meta",
        help="meta (default: shapes only, instant), cpu or cuda; counts are the same",
    )
    parser.add_argument("--breakdown", metavar="NAME", help="ops by name for one model")
    args = parser.parse_args(argv)
    known = scconv.list_models()
    unknown = [n for n in [*args.names, args.breakdown] if n is not None and n not in known]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; available: {', '.join(known)}")
    if args.size < 1 or args.batch < 1:
        parser.error("--size and --batch must be positive")
    try:
        if args.breakdown:
            table = breakdown(args.breakdown, args.size, args.batch, args.device)
        else:
            names = args.names or DEFAULT_MODELS
            table = op_count_table(names, args.size, args.batch, args.device)
    except InputTooSmallError as error:  # names the smallest size that works
        parser.error(str(error))
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
