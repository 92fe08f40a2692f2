"""Gating micro-benchmark: ``python -m bench.gating``.

Times ``out = k3 * sigmoid(x + upsample_nearest(k2))`` on every gating shape of SCNet-50 and
SCNet-101 (224x224 input, see the table in the design notes), with three providers:

- ``eager``: ``kernels.reference.sc_gate_reference``, the official four ATen ops;
- ``torch_compile``: Inductor on that same function (static shapes, compiled once per shape);
- ``triton``: the fused kernels, ``kernels.sc_gate`` (autograd op).

Modes: ``forward`` (inputs without grad), ``backward`` (``torch.autograd.grad`` of a saved graph),
``forward+backward``. Achieved GB/s count only the minimal bytes (``minimal_bytes``), and are
compared with a device-to-device copy measured in the same run (``pct_of_copy``).

On a GPU the whole grid runs (batch 1, 32, 256; fp32, fp16, bf16; NCHW and channels_last),
most informative cases first, within ``--budget-s``. On the CPU (labelled CPU mode) only
``eager`` and ``torch_compile`` run, on small batches: the Triton interpreter is never timed
(its correctness pass is ``python -m bench.check``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._functorch.config

from bench.common import (
    DTYPES,
    Budget,
    Progress,
    ResultWriter,
    copy_bandwidth,
    csv_choices,
    default_device,
    default_out_dir,
    dtype_from_name,
    log,
    memory_format_from_name,
    metadata,
    output_folder,
    positive_float,
    positive_ints,
    raise_failures,
    record_failure,
    require_device,
    seconds_left,
    time_fn,
    write_csv,
)
from kernels.reference import sc_gate_reference

PROVIDERS = ("eager", "torch_compile", "triton")
MODES = ("forward", "backward", "forward+backward")
LAYOUTS = ("nchw", "channels_last")


@dataclass(frozen=True)
class GatingShape:
    """One SC-Conv gating site: x, k3 are (N, C, H, W), k2 is (N, C, h, w).

    ``blocks`` says how many SCBottlenecks of each model gate at this shape (per image).
    """

    stage: str
    C: int
    H: int
    W: int
    h: int
    w: int
    blocks: dict[str, int]

    def numel(self, batch: int) -> int:
        return batch * self.C * self.H * self.W

    def k2_numel(self, batch: int) -> int:
        return batch * self.C * self.h * self.w

    def sizes(self) -> dict[str, int]:
        """The C, H, W, h, w columns every gating CSV row carries."""
        return {"C": self.C, "H": self.H, "W": self.W, "h": self.h, "w": self.w}


# SCNet-50 at 224x224 (design notes). SCNet-101 differs only in layer3: 22 blocks after the first.
GATING_SHAPES = (
    GatingShape("layer1", 32, 56, 56, 14, 14, {"scnet50": 3, "scnet101": 3}),
    GatingShape("layer2.0", 64, 56, 56, 14, 14, {"scnet50": 1, "scnet101": 1}),
    GatingShape("layer2", 64, 28, 28, 7, 7, {"scnet50": 3, "scnet101": 3}),
    GatingShape("layer3.0", 128, 28, 28, 7, 7, {"scnet50": 1, "scnet101": 1}),
    GatingShape("layer3", 128, 14, 14, 3, 3, {"scnet50": 5, "scnet101": 22}),
    GatingShape("layer4.0", 256, 14, 14, 3, 3, {"scnet50": 1, "scnet101": 1}),
    GatingShape("layer4", 256, 7, 7, 1, 1, {"scnet50": 2, "scnet101": 2}),
)
# For the CPU dry run: a shape the Triton interpreter and the CPU get through instantly.
TINY_SHAPES = (GatingShape("tiny", 4, 8, 8, 2, 2, {"scnet50": 1, "scnet101": 1}),)

GPU_BATCHES = (256, 32, 1)
CPU_BATCHES = (1,)


def minimal_bytes(shape: GatingShape, batch: int, element_size: int, mode: str) -> int:
    """Bytes a perfect fused kernel must move.

    forward: read x, k3, k2; write out                    -> 3 N + n2 elements
    backward: read g, x, k3, k2; write dx, dk3, dk2       -> 5 N + 2 n2 elements
    forward+backward: both passes (the backward cannot start before g exists)
    """
    n, n2 = shape.numel(batch), shape.k2_numel(batch)
    elements = {
        "forward": 3 * n + n2,
        "backward": 5 * n + 2 * n2,
        "forward+backward": 8 * n + 3 * n2,
    }
    if mode not in elements:
        raise ValueError(f"unknown mode {mode!r}; valid modes are {', '.join(MODES)}")
    return elements[mode] * element_size


def make_inputs(
    shape: GatingShape,
    batch: int,
    dtype: torch.dtype,
    layout: str,
    device: str,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random x, k2, k3 and an upstream gradient g, in ``layout`` (``nchw``/``channels_last``)."""
    memory_format = memory_format_from_name(layout)  # ValueError naming an unknown layout
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*size):
        t = torch.randn(*size, generator=generator).to(device=device, dtype=dtype)
        return t.contiguous(memory_format=memory_format)

    x = rand(batch, shape.C, shape.H, shape.W)
    k2 = rand(batch, shape.C, shape.h, shape.w)
    k3 = rand(batch, shape.C, shape.H, shape.W)
    g = rand(batch, shape.C, shape.H, shape.W)
    return x, k2, k3, g


def provider_fn(provider: str) -> Callable:
    """The gating function of ``provider`` (a fresh ``torch.compile`` for ``torch_compile``)."""
    if provider == "eager":
        return sc_gate_reference
    if provider == "torch_compile":
        # A fresh Dynamo state per shape keeps every compile static and away from the
        # recompile limit; the compile time is reported as first_call_s.
        torch._dynamo.reset()
        # Buffer donation lets a compiled backward reuse its saved tensors, which forbids the
        # repeated backward (retain_graph=True) that the "backward" mode times.
        if hasattr(torch._functorch.config, "donated_buffer"):
            torch._functorch.config.donated_buffer = False
        return torch.compile(sc_gate_reference, dynamic=False)
    if provider == "triton":
        import kernels

        return kernels.sc_gate
    raise ValueError(f"unknown provider {provider!r}; valid providers are {', '.join(PROVIDERS)}")


def mode_fn(fn: Callable, mode: str, x, k2, k3, g) -> tuple[Callable[[], object], float]:
    """A closure running ``mode`` of ``fn``, and the seconds its first run took (compile,
    autotuning and allocation included: excluded from the timing, reported apart)."""
    if mode == "forward":
        inputs = (x, k2, k3)

        def run():
            with torch.no_grad():
                return fn(*inputs)

    elif mode == "backward":
        inputs = tuple(t.detach().requires_grad_() for t in (x, k2, k3))
        out = fn(*inputs)

        def run():
            return torch.autograd.grad(out, inputs, g, retain_graph=True)

    elif mode == "forward+backward":
        inputs = tuple(t.detach().requires_grad_() for t in (x, k2, k3))

        def run():
            return torch.autograd.grad(fn(*inputs), inputs, g)

    else:
        raise ValueError(f"unknown mode {mode!r}; valid modes are {', '.join(MODES)}")
    start = time.perf_counter()
    run()
    if x.is_cuda:
        torch.cuda.synchronize()
    return run, time.perf_counter() - start


def plan(shapes, batches, dtypes, layouts) -> list[tuple[int, str, str, GatingShape]]:
    """Groups (batch, dtype, layout, shape) in the order given, most informative first: every
    shape at the first batch, dtype and layout (the headline), then the other layouts, dtypes
    and batches, so that a run cut short by its budget still has the headline."""
    return [
        (batch, dtype, layout, shape)
        for batch in batches
        for dtype in dtypes
        for layout in layouts
        for shape in shapes
    ]


def check_providers(providers, device: str) -> None:
    """``ValueError`` for a provider this device cannot time."""
    if "triton" in providers and device != "cuda":
        raise ValueError(
            "provider 'triton' on the CPU would time the Triton interpreter, which is not a "
            "kernel speed; run `python -m bench.check` for the interpreter correctness pass"
        )


def run(
    out_dir: str | Path,
    *,
    device: str | None = None,
    providers=None,
    modes=MODES,
    batches=None,
    dtypes=None,
    layouts=None,
    shapes=GATING_SHAPES,
    budget_s: float | None = None,
    warmup_ms: float = 10,
    rep_ms: float = 50,
) -> Path:
    """Run the grid and write ``gating.csv`` and ``bandwidth.csv`` into ``out_dir``."""
    device = device or default_device()
    on_gpu = device == "cuda"
    providers = tuple(providers or (PROVIDERS if on_gpu else ("eager", "torch_compile")))
    batches = tuple(batches or (GPU_BATCHES if on_gpu else CPU_BATCHES))
    dtypes = tuple(dtypes or (("bf16", "fp16", "fp32") if on_gpu else ("fp32",)))
    layouts = tuple(layouts or (LAYOUTS if on_gpu else ("nchw",)))
    for name, values, valid in (
        ("provider", providers, PROVIDERS),
        ("mode", modes, MODES),
        ("layout", layouts, LAYOUTS),
    ):
        bad = [v for v in values if v not in valid]
        if bad:
            raise ValueError(f"unknown {name}(s) {bad}; valid: {', '.join(valid)}")
    for name in dtypes:
        dtype_from_name(name)
    check_providers(providers, device)

    out_dir = Path(out_dir)
    budget = Budget(budget_s)
    meta = metadata(device)
    timing = {"warmup_ms": warmup_ms, "rep_ms": rep_ms}

    log(f"gating: measuring {device} copy bandwidth")
    bandwidth = copy_bandwidth(device, **timing)
    write_csv([{**bandwidth, **meta}], out_dir / "bandwidth.csv")
    log(f"gating: copy bandwidth {bandwidth['copy_gbps']:.1f} GB/s")

    groups = plan(shapes, batches, dtypes, layouts)
    writer = ResultWriter(out_dir / "gating.csv", meta)
    progress = Progress("gating", len(groups))
    skipped = 0
    failures: list[str] = []  # one provider failing (a compile error, say) must not stop the rest
    for batch, dtype, layout, shape in groups:
        label = f"{shape.stage} N={batch} {dtype} {layout}"
        if not budget.allows():
            skipped += 1
            progress.step(f"{label}: skipped (budget of {budget_s:.0f}s spent)")
            continue
        x, k2, k3, g = make_inputs(shape, batch, dtype_from_name(dtype), layout, device)
        for provider in providers:
            fn = provider_fn(provider)
            for mode in modes:
                try:
                    run_mode, first_call_s = mode_fn(fn, mode, x, k2, k3, g)
                    measured = time_fn(run_mode, device, **timing)
                except Exception as error:
                    record_failure(failures, f"gating: {provider} {mode} {label}", error)
                    continue
                nbytes = minimal_bytes(shape, batch, x.element_size(), mode)
                gbps = nbytes / measured.ms / 1e6
                writer.add(
                    {
                        "provider": provider,
                        "mode": mode,
                        "stage": shape.stage,
                        "batch": batch,
                        **shape.sizes(),
                        "dtype": dtype,
                        "layout": layout,
                        "blocks_scnet50": shape.blocks["scnet50"],
                        "blocks_scnet101": shape.blocks["scnet101"],
                        **measured.as_row(),
                        "first_call_s": first_call_s,
                        "minimal_bytes": nbytes,
                        "gbps": gbps,
                        "copy_gbps": bandwidth["copy_gbps"],
                        "pct_of_copy": 100.0 * gbps / bandwidth["copy_gbps"],
                    }
                )
        del x, k2, k3, g
        progress.step(label)
    path = writer.close()
    if skipped:
        log(f"gating: {skipped} of {len(groups)} groups skipped: budget of {budget_s:.0f}s spent")
    raise_failures(failures)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gating", description=__doc__)
    parser.add_argument(
        "--out", type=output_folder, help="output directory (default bench/results/..)"
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--providers", type=csv_choices(PROVIDERS), help=",".join(PROVIDERS))
    parser.add_argument("--modes", type=csv_choices(MODES), default=MODES, help=",".join(MODES))
    parser.add_argument("--batches", type=positive_ints, help="comma-separated")
    parser.add_argument("--dtypes", type=csv_choices(DTYPES), help=",".join(DTYPES))
    parser.add_argument("--layouts", type=csv_choices(LAYOUTS), help=",".join(LAYOUTS))
    parser.add_argument("--tiny", action="store_true", help="one tiny shape (dry runs)")
    parser.add_argument("--budget-s", type=seconds_left, help="stop after this long")
    parser.add_argument("--warmup-ms", type=seconds_left, default=10)
    parser.add_argument("--rep-ms", type=positive_float, default=50)
    args = parser.parse_args(argv)

    try:
        device = require_device(args.device or default_device())
        check_providers(args.providers or (), device)
    except ValueError as error:
        parser.error(str(error))
    out = Path(args.out) if args.out else default_out_dir(device)
    path = run(
        out,
        device=device,
        providers=args.providers,
        modes=args.modes,
        batches=args.batches,
        dtypes=args.dtypes,
        layouts=args.layouts,
        shapes=TINY_SHAPES if args.tiny else GATING_SHAPES,
        budget_s=args.budget_s,
        warmup_ms=args.warmup_ms,
        rep_ms=args.rep_ms,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
