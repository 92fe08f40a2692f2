"""Autotuner sweep: ``python -m bench.sweep``.

Times the configurations of the gating kernels on the SCNet gating shapes, dtypes and layouts,
checks each result against the eager reference, and writes the fastest correct configuration per
(GPU name, kernel, ``table_key``) into the table ``kernels`` reads (``kernels/tuned_configs.json``):
shapes in the table launch their winner directly, shapes missing from it are autotuned at run
time.

Which configurations: by default those the run-time autotuner would time for the case, the
search space narrowed to the family that suits the layout (``kernels.configs.prune_for_layout``,
through ``kernels.codegen.pruned_configs``), about a third of ``kernels.configs.search_space``
over SCNet's cases, so a GPU run's budget reaches about three times as many shapes;
``--all-configs`` times the whole search space on every case (the heat map then also shows how
the other families fare). The ``search`` column says which.

Outputs: ``sweep.csv`` (one row per configuration and case) and a copy of the table in the output
directory; ``python -m bench.plots`` draws the heat map (time per configuration and shape).

On a CPU the kernels run through Triton's interpreter: ``--tiny`` then checks the plumbing on a
tiny shape, the timer column says it is not a speed, and the table goes only to the output
directory (never to ``kernels/``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.common import (
    DTYPES,
    TOLERANCES,
    Budget,
    Progress,
    ResultWriter,
    csv_choices,
    default_device,
    default_out_dir,
    dtype_from_name,
    log,
    memory_format_from_name,
    metadata,
    output_folder,
    positive_int,
    positive_ints,
    seconds_left,
    time_fn,
)
from bench.gating import (
    GATING_SHAPES,
    TINY_SHAPES,
    GatingShape,
    make_inputs,
    minimal_bytes,
)
from kernels.reference import sc_gate_reference

TIMER_INTERPRETER = "triton interpreter (plumbing check, not a speed)"
SEARCH_FAMILY = "layout family"  # the configurations prune_for_layout keeps for the case
SEARCH_ALL = "whole search space"
# The headline layout (channels_last: the inference target's) first, so that a budget that runs
# out leaves the NCHW cases untuned, not those.
SWEEP_LAYOUTS = ("channels_last", "nchw")
# bf16 and fp32 are the model benchmark's precisions (bf16 autocast is its headline); fp16 only
# the gating micro-benchmark's.
SWEEP_DTYPES = ("bf16", "fp32", "fp16")
SWEEP_BATCHES = (256, 32)
KERNEL_MODES = {"forward": "forward", "backward": "backward"}


def config_name(config) -> str:
    """``"BLOCK_C=4,BLOCK_HW=1024,w4,s3"``: meta-parameters, warps, stages."""
    kwargs = ",".join(f"{k}={v}" for k, v in sorted(config.kwargs.items()))
    return f"{kwargs},w{config.num_warps},s{config.num_stages}"


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: str) -> bool:
    """A configuration's result against the eager reference computed in float32 (the tolerance
    ``bench.check`` uses too)."""
    atol, rtol = TOLERANCES[dtype]
    return bool(torch.allclose(actual.float(), expected.float(), atol=atol, rtol=rtol))


def _reference(x, k2, k3, g):
    """Forward output and (dx, dk2, dk3) of the eager reference, computed in float32."""
    inputs = [t.detach().float().requires_grad_() for t in (x, k2, k3)]
    out = sc_gate_reference(*inputs)
    grads = torch.autograd.grad(out, inputs, g.float())
    return out.detach(), grads


def cases(shapes, batches, dtypes, layouts):
    """(shape, batch, dtype, layout, table_key) in priority order, one per distinct key: dtype
    first, then batch, layout, shape (every batch of the first dtype before the next dtype)."""
    from kernels.configs import table_key

    seen = set()
    for dtype in dtypes:
        for batch in batches:
            for layout in layouts:
                memory_format = memory_format_from_name(layout)
                for shape in shapes:
                    # The key depends on sizes, dtype, layout only: meta tensors allocate nothing.
                    probe_x, probe_k2 = (
                        torch.empty(
                            (batch, shape.C, height, width),
                            dtype=dtype_from_name(dtype),
                            device="meta",
                            memory_format=memory_format,
                        )
                        for height, width in ((shape.H, shape.W), (shape.h, shape.w))
                    )
                    key = table_key(probe_x, probe_k2)
                    if key not in seen:
                        seen.add(key)
                        yield shape, batch, dtype, layout, key


def _unlaunchable_errors() -> tuple[type[Exception], ...]:
    """What Triton raises for a configuration this GPU cannot compile or run (too many registers
    or too much shared memory, a ptxas failure): Triton's autotuner skips these too."""
    from triton.compiler.errors import CompileTimeAssertionFailure
    from triton.runtime.errors import OutOfResources, PTXASError

    return OutOfResources, PTXASError, CompileTimeAssertionFailure


def time_configs(kernel: str, search, inputs, dtype: str, timing: dict) -> list[dict]:
    """Check and time each configuration of ``search`` on ``inputs`` = (x, k2, k3, g).

    Returns one row per configuration (``"_config"`` holds the ``triton.Config``). A
    configuration that cannot be compiled or launched on this GPU gets NaN times and
    ``correct=False`` (it never wins) instead of ending the sweep.
    """
    from kernels.gate import gate_backward, gate_forward

    x, k2, k3, g = inputs
    expected_out, expected_grads = _reference(x, k2, k3, g)
    rows = []
    for config in search:
        if kernel == "forward":

            def launch(config=config):
                return gate_forward(x, k2, k3, config=config)

        else:

            def launch(config=config):
                return gate_backward(g, x, k2, k3, config=config)

        try:
            result = launch()
            if kernel == "forward":
                correct = _close(result, expected_out, dtype)
            else:
                pairs = zip(result, expected_grads, strict=True)
                correct = all(_close(a, e, dtype) for a, e in pairs)
            measured = time_fn(launch, x.device.type, **timing).as_row()
        except _unlaunchable_errors() as error:
            log(f"sweep: {kernel} {config_name(config)} cannot run here: "
                f"{type(error).__name__}: {error}")  # fmt: skip
            correct = False
            measured = {"ms": float("nan"), "ms_p20": float("nan"), "ms_p80": float("nan")}
        rows.append(
            {
                "kernel": kernel,
                "config": config_name(config),
                **{f"cfg_{k}": v for k, v in config.kwargs.items()},
                "num_warps": config.num_warps,
                "num_stages": config.num_stages,
                **measured,
                "correct": correct,
                "_config": config,
            }
        )
    return rows


def run(
    out_dir: str | Path,
    *,
    device: str | None = None,
    kernels_to_tune=("forward", "backward"),
    shapes: tuple[GatingShape, ...] = GATING_SHAPES,
    batches=SWEEP_BATCHES,
    dtypes=SWEEP_DTYPES,
    layouts=SWEEP_LAYOUTS,
    table_path: str | Path | None = None,
    all_configs: bool = False,
    max_configs: int | None = None,
    budget_s: float | None = None,
    warmup_ms: float = 5,
    rep_ms: float = 25,
) -> Path:
    """Time the configurations of every case (the layout's family, or with ``all_configs`` the
    whole search space; the first ``max_configs`` of them); write ``sweep.csv`` and the winners'
    table."""
    from kernels import codegen, configs
    from kernels.gate import INTERPRETED

    device = device or default_device()
    out_dir = Path(out_dir)
    for kernel in kernels_to_tune:
        if kernel not in configs.KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; kernels are {configs.KERNELS}")
    if device == "cuda":
        if INTERPRETED:
            raise RuntimeError("CUDA is present but the kernels were built for the interpreter")
        gpu_name = torch.cuda.get_device_name()
        table_path = Path(table_path) if table_path else configs.TUNED_TABLE_PATH
    else:
        if not INTERPRETED:
            raise RuntimeError("no CUDA device and the Triton interpreter is off")
        gpu_name = "interpreter"
        table_path = Path(table_path) if table_path else out_dir / "tuned_configs.json"
        if table_path.resolve() == configs.TUNED_TABLE_PATH.resolve():
            raise ValueError("interpreter timings must not go into kernels' tuned table")

    meta = metadata(device)
    if device == "cpu":
        meta["timer"] = TIMER_INTERPRETER
    timing = {"warmup_ms": warmup_ms, "rep_ms": rep_ms}
    if device == "cpu":
        timing = {"warmup_ms": 0, "rep_ms": 0, "min_reps": 1}
    budget = Budget(budget_s)
    plan = list(cases(shapes, batches, dtypes, layouts))
    writer = ResultWriter(out_dir / "sweep.csv", meta)
    table = configs.load_table(table_path)
    progress = Progress("sweep", len(plan) * len(kernels_to_tune))
    skipped = 0
    for shape, batch, dtype, layout, key in plan:
        if not budget.allows():
            skipped += len(kernels_to_tune)
            for _ in kernels_to_tune:
                progress.step(f"{key}: skipped (budget of {budget_s:.0f}s spent)")
            continue
        inputs = make_inputs(shape, batch, dtype_from_name(dtype), layout, device)
        for kernel in kernels_to_tune:
            if all_configs:
                search = configs.search_space(kernel)
            else:
                search = codegen.pruned_configs(kernel, *inputs[:3])
            rows = time_configs(kernel, search[:max_configs], inputs, dtype, timing)
            case = {"table_key": key, "stage": shape.stage, "batch": batch, **shape.sizes(),
                    "dtype": dtype, "layout": layout,
                    "search": SEARCH_ALL if all_configs else SEARCH_FAMILY}  # fmt: skip
            nbytes = minimal_bytes(shape, batch, inputs[0].element_size(), KERNEL_MODES[kernel])
            valid = [r for r in rows if r["correct"]]
            best = min(valid, key=lambda r: r["ms"]) if valid else None
            best_config = best["_config"] if best else None
            for row in rows:
                row.pop("_config")
                row.update(case, gbps=nbytes / row["ms"] / 1e6, winner=row is best)
                writer.add(row)
            if best is None:
                log(f"sweep: no configuration of {kernel} is correct for {key}; table unchanged")
                progress.step(f"{kernel} {key}: NO CORRECT CONFIG")
                continue
            table.setdefault(gpu_name, {}).setdefault(kernel, {})[key] = configs.config_to_entry(
                best_config
            )
            configs.save_table(table, table_path)
            # And the copy in the output directory at once: a sweep stopped at the deadline keeps
            # its winners there too (the folder that comes back from a GPU machine).
            configs.save_table(table, out_dir / "tuned_configs.json")
            progress.step(f"{kernel} {key}: {best['config']} {best['ms']:.4f} ms")
        del inputs
    path = writer.close()
    if table_path.parent.resolve() != out_dir.resolve():
        configs.save_table(table, out_dir / "tuned_configs.json")
    if skipped:
        log(f"sweep: {skipped} cases skipped: budget of {budget_s:.0f}s spent")
    log(f"sweep: winners written to {table_path}")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__)
    parser.add_argument(
        "--out", type=output_folder, help="output directory (default bench/results/..)"
    )
    parser.add_argument("--table", default=None, help="winners table (default: kernels' own)")
    parser.add_argument(
        "--kernels",
        type=csv_choices(KERNEL_MODES),
        default=tuple(KERNEL_MODES),
        help=",".join(KERNEL_MODES),
    )
    parser.add_argument("--batches", type=positive_ints, help="comma-separated")
    parser.add_argument("--dtypes", type=csv_choices(DTYPES), help=",".join(DTYPES))
    parser.add_argument("--layouts", type=csv_choices(SWEEP_LAYOUTS), help=",".join(SWEEP_LAYOUTS))
    parser.add_argument(
        "--all-configs",
        action="store_true",
        help="time the whole search space on every case (default: the layout's family only, "
        "what the run-time autotuner would time)",
    )
    parser.add_argument("--max-configs", type=positive_int, help="first N configs only")
    parser.add_argument("--tiny", action="store_true", help="one tiny shape (CPU dry runs)")
    parser.add_argument("--budget-s", type=seconds_left, help="stop after this long")
    args = parser.parse_args(argv)

    device = default_device()
    tiny = args.tiny or device == "cpu"
    out = Path(args.out) if args.out else default_out_dir(device)
    path = run(
        out,
        device=device,
        kernels_to_tune=args.kernels,
        shapes=TINY_SHAPES if tiny else GATING_SHAPES,
        batches=args.batches or ((1,) if tiny else SWEEP_BATCHES),
        dtypes=args.dtypes or (("fp32",) if tiny else SWEEP_DTYPES),
        layouts=args.layouts or SWEEP_LAYOUTS,
        table_path=args.table,
        all_configs=args.all_configs,
        max_configs=args.max_configs,
        budget_s=args.budget_s,
    )
    if not path.exists():  # every case skipped: the budget was spent before the first one
        print(f"no configuration timed; {path} not written")
        return
    from bench.plots import plot_sweep

    plot_sweep(path, out / "sweep_heatmap.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
