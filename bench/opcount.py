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
gives the same counts (``tests/test_inference.py`` checks that), at every batch size and in
either layout.

``--bytes`` counts instead the bytes each forward moves (``ByteCounter``): every top-level op
reads its tensor arguments once (weights included) and writes once each tensor it mutates (an
in-place op's ``self``, ``add_relu_``'s ``x``; read too, except an ``out=`` argument and
``copy_``'s destination) and each new tensor it returns; views move nothing. It is a traffic
model, not a measurement: a kernel may read an input more than once (a convolution's tiles) or
find it in L2, and nested copies are not seen. For a memory-bound network at a large batch the
ratio of two models' bytes is the ratio their run times approach; SCNet-50 optimized / ResNet-50
optimized at bf16, channels_last, batch 256 is 27.4 / 24.8 GB = 1.10.

    python -m bench.opcount                      # the table for every model
    python -m bench.opcount --breakdown scnet50  # ops by name, original vs optimized
    python -m bench.opcount --bytes --batch 256 --dtype bf16 --channels-last
    python -m bench.opcount --bytes --breakdown scnet50 --batch 256 --dtype bf16 --channels-last
"""

import argparse
import collections
import warnings

import pandas as pd
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import scconv
from bench.common import DTYPES, dtype_from_name, memory_format_from_name, require_device
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


class ByteCounter(TorchDispatchMode):
    """Bytes read and written by dispatched ops, by op name; see the module docstring.

    ``read`` and ``written`` hold the counts by op name (``"aten.convolution.default"``).
    """

    def __init__(self):
        super().__init__()
        self.read: collections.Counter[str] = collections.Counter()
        self.written: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        returns = schema.returns
        is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in returns)
        if func.overloadpacket in _ALLOCATIONS or is_view:
            return out
        name = str(func)
        for index, argument in enumerate(schema.arguments):
            value = args[index] if index < len(args) else kwargs.get(argument.name)
            nbytes = sum(_nbytes(t) for t in tree_flatten(value)[0])
            mutated = argument.alias_info is not None and argument.alias_info.is_write
            if mutated:  # add_relu_(x!, ...) returns nothing: its write is its argument's
                self.written[name] += nbytes
            if not (mutated and (argument.is_out or func.overloadpacket is torch.ops.aten.copy_)):
                self.read[name] += nbytes
        # New tensors only: what an in-place op returns is its mutated argument, counted above.
        returned = out if len(returns) > 1 else [out]
        for result, value in zip(returns, returned, strict=False):
            if result.alias_info is None:
                self.written[name] += sum(_nbytes(t) for t in tree_flatten(value)[0])
        return out

    @property
    def total(self) -> int:
        return sum(self.read.values()) + sum(self.written.values())


def _nbytes(value) -> int:
    if not isinstance(value, torch.Tensor):
        return 0
    return value.numel() * value.element_size()


def bytes_moved(model: torch.nn.Module, x: torch.Tensor) -> ByteCounter:
    """The bytes one ``model(x)`` under ``torch.no_grad()`` reads and writes, by op."""
    with torch.no_grad(), ByteCounter() as counter:
        model(x)
    return counter


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


def _traffic_models(name: str, size: int, batch: int, dtype: str, layout: str):
    """(original, optimized, input) on the meta device in ``dtype`` and ``layout``: SCNets with
    the official eager gating in the original and the fused Triton gate in the optimized model
    (what a GPU runs)."""
    convert = {"dtype": dtype_from_name(dtype), "memory_format": memory_format_from_name(layout)}
    original, optimized = _models(name, "meta", "eager" if _has_gate(name) else None)
    if _has_gate(name):
        scconv.set_gate(optimized, "triton")
    x = torch.empty(batch, 3, size, size, device="meta")
    return original.to(**convert), optimized.to(**convert), x.to(**convert)


def bytes_table(
    names=DEFAULT_MODELS, size: int = 224, batch: int = 1, dtype: str = "fp32", layout="nchw"
) -> pd.DataFrame:
    """One row per model: GB (1e9 bytes) one forward moves, original and optimized, and the
    optimized model's bytes over those of the optimized ResNet of the same depth (counted on the
    meta device; see the module docstring)."""
    from bench.models import BASELINES

    moved = {}

    def gigabytes(name):
        if name not in moved:
            original, optimized, x = _traffic_models(name, size, batch, dtype, layout)
            moved[name] = tuple(bytes_moved(m, x).total / 1e9 for m in (original, optimized))
        return moved[name]

    rows = []
    for name in names:
        original, optimized = gigabytes(name)
        rows.append(
            {
                "model": name,
                "original_gb": round(original, 3),
                "optimized_gb": round(optimized, 3),
                "saved": f"{1 - optimized / original:.0%}",
                "optimized_vs_resnet": round(optimized / gigabytes(BASELINES[name])[1], 3),
                "batch": batch,
                "dtype": dtype,
                "layout": layout,
                "image_size": size,
            }
        )
    return pd.DataFrame(rows)


def bytes_breakdown(
    name: str, size: int = 224, batch: int = 1, dtype: str = "fp32", layout="nchw"
) -> pd.DataFrame:
    """GB moved by op name for one model, original vs optimized."""
    original, optimized, x = _traffic_models(name, size, batch, dtype, layout)
    before, after = bytes_moved(original, x), bytes_moved(optimized, x)

    def by_op(counter):
        return counter.read + counter.written

    before_ops, after_ops = by_op(before), by_op(after)
    rows = [
        {"op": op, "original_gb": before_ops[op] / 1e9, "optimized_gb": after_ops[op] / 1e9}
        for op in sorted(set(before_ops) | set(after_ops))
    ]
    table = pd.DataFrame(rows).sort_values("original_gb", ascending=False, ignore_index=True)
    total = {"op": "total", "original_gb": before.total / 1e9, "optimized_gb": after.total / 1e9}
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True).round(3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.opcount",
        description="ATen ops (or, with --bytes, bytes moved) per forward, before and after "
        "scconv.optimize_for_inference.",
    )
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"models (default: {' '.join(DEFAULT_MODELS)})"
    )
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--batch", type=int, default=1, help="batch size")
    parser.add_argument(
        "--device",
        choices=("meta", "cpu", "cuda"),
        default="meta",
        help="meta (default: shapes only, instant), cpu or cuda; counts are the same",
    )
    parser.add_argument("--breakdown", metavar="NAME", help="ops by name for one model")
    parser.add_argument(
        "--bytes",
        action="store_true",
        help="GB each forward reads and writes (a traffic model, on the meta device) instead of "
        "op counts",
    )
    parser.add_argument("--dtype", choices=DTYPES, help="with --bytes: fp32 (default), bf16, fp16")
    parser.add_argument(
        "--channels-last", action="store_true", help="with --bytes: channels_last models and input"
    )
    args = parser.parse_args(argv)
    known = scconv.list_models()
    unknown = [n for n in [*args.names, args.breakdown] if n is not None and n not in known]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; available: {', '.join(known)}")
    if args.size < 1 or args.batch < 1:
        parser.error("--size and --batch must be positive")
    if not args.bytes and (args.dtype or args.channels_last):
        parser.error("--dtype and --channels-last go with --bytes")
    try:
        require_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    if args.bytes and args.device != "meta":
        parser.error("--bytes counts on the meta device only (bytes depend on shapes alone)")
    traffic = {
        "size": args.size,
        "batch": args.batch,
        "dtype": args.dtype or "fp32",
        "layout": "channels_last" if args.channels_last else "nchw",
    }
    try:
        if args.bytes and args.breakdown:
            table = bytes_breakdown(args.breakdown, **traffic)
        elif args.bytes:
            table = bytes_table(args.names or DEFAULT_MODELS, **traffic)
        elif args.breakdown:
            table = breakdown(args.breakdown, args.size, args.batch, args.device)
        else:
            names = args.names or DEFAULT_MODELS
            table = op_count_table(names, args.size, args.batch, args.device)
    except InputTooSmallError as error:  # names the smallest size that works
        parser.error(str(error))
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
