"""Correctness pass of the Triton gating kernels: ``python -m bench.check``.

Runs ``kernels.sc_gate`` forward and backward on small shapes (odd sizes, pooling ratios 3 and 4,
1x1 k2), in fp32, fp16 and bf16, NCHW and channels_last, and compares out, dx, dk2 and dk3 with
the eager reference computed in float64 from the same inputs. On a GPU the SCNet gating shapes
at batch 2 are added.

Without a GPU the kernels run through Triton's interpreter (``kernels`` switches it on when it is
imported first, as here). Nothing here is timed: the interpreter's speed says nothing about the
kernels' speed. Writes ``gating_correctness.csv``; exits with status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import kernels  # first: on a CPU-only machine this switches Triton's interpreter on
from bench.common import (
    DTYPES,
    TOLERANCES,
    Budget,
    ResultWriter,
    default_device,
    default_out_dir,
    log,
    memory_format_from_name,
    metadata,
    output_folder,
    seconds_left,
)
from bench.gating import GATING_SHAPES, LAYOUTS, GatingShape, make_inputs
from kernels.reference import nearest_source_index, sc_gate_reference

# Small shapes the interpreter runs in well under a second each, chosen for what they exercise.
CHECK_SHAPES = (
    GatingShape("odd 9x7 <- 2x1", 3, 9, 7, 2, 1, {}),  # odd sizes, non-square k2
    GatingShape("r=4 16x16 <- 4x4", 8, 16, 16, 4, 4, {}),  # SCNet's pooling ratio
    GatingShape("46x46 <- 14x14", 2, 46, 46, 14, 14, {}),  # float32 index rounding matters
    GatingShape("7x7 <- 1x1", 8, 7, 7, 1, 1, {}),  # layer4: one k2 pixel per plane
)


def _excess(actual: torch.Tensor, expected: torch.Tensor, dtype: str) -> tuple[float, float]:
    """(max |error|, max |error| / (atol + rtol |expected|)): the check passes when <= 1."""
    atol, rtol = TOLERANCES[dtype]
    error = (actual.double() - expected).abs()
    return float(error.max()), float((error / (atol + rtol * expected.abs())).max())


def exact_gate(x: torch.Tensor, k2: torch.Tensor, k3: torch.Tensor) -> torch.Tensor:
    """The gating in float64 with PyTorch's float32 nearest-upsample index map.

    ``F.interpolate`` on float64 tensors maps some rows differently (e.g. H = 74 from h = 24)
    from float32/16/bf16 tensors, so k2 is gathered with ``nearest_source_index``'s float32 map.
    """
    (h, w), (H, W) = k2.shape[-2:], x.shape[-2:]
    rows = nearest_source_index(H, h, device=k2.device)
    cols = nearest_source_index(W, w, device=k2.device)
    return k3 * torch.sigmoid(x + k2[:, :, rows][:, :, :, cols])


def check_case(
    shape: GatingShape, batch: int, dtype: str, layout: str, device: str, impl=None
) -> list[dict]:
    """Compare ``impl`` (default ``kernels.sc_gate``) with float64 math on one case; one row
    per tensor (out, dx, dk2, dk3)."""
    impl = impl or kernels.sc_gate
    x, k2, k3, g = make_inputs(shape, batch, DTYPES[dtype], layout, device, seed=1)
    # Truth: float64 math on the very same (rounded) inputs.
    exact_inputs = [t.detach().double().requires_grad_() for t in (x, k2, k3)]
    exact_out = exact_gate(*exact_inputs)
    exact = [exact_out.detach(), *torch.autograd.grad(exact_out, exact_inputs, g.double())]
    # The eager reference in the low dtype, for context: how far the four ATen ops are.
    eager_inputs = [t.detach().requires_grad_() for t in (x, k2, k3)]
    eager_out = sc_gate_reference(*eager_inputs)
    eager = [eager_out.detach(), *torch.autograd.grad(eager_out, eager_inputs, g)]

    triton_inputs = [t.detach().requires_grad_() for t in (x, k2, k3)]
    triton_out = impl(*triton_inputs)
    fused = [triton_out.detach(), *torch.autograd.grad(triton_out, triton_inputs, g)]

    rows = []
    for name, actual, reference, expected in zip(
        ("out", "dx", "dk2", "dk3"), fused, eager, exact, strict=True
    ):
        max_abs, excess = _excess(actual, expected, dtype)
        eager_abs, _ = _excess(reference, expected, dtype)
        rows.append(
            {
                "case": shape.stage,
                "batch": batch,
                **shape.sizes(),
                "dtype": dtype,
                "layout": layout,
                "tensor": name,
                "layout_kept": actual.is_contiguous(memory_format=memory_format_from_name(layout)),
                "max_abs_err": max_abs,
                "err_over_tol": excess,
                "eager_max_abs_err": eager_abs,
                "atol": TOLERANCES[dtype][0],
                "rtol": TOLERANCES[dtype][1],
                "passed": bool(excess <= 1.0 and torch.isfinite(actual).all()),
            }
        )
    return rows


def run(
    out_dir: str | Path, *, device: str | None = None, shapes=None, budget_s: float | None = None
) -> Path:
    """Run every case (``shapes``: default ``CHECK_SHAPES``, plus the SCNet shapes on a GPU);
    write ``gating_correctness.csv`` into ``out_dir``. Shapes not started within ``budget_s``
    seconds are skipped (on a GPU the first call of each new shape compiles and autotunes)."""
    device = device or default_device()
    cases = [(shape, 2) for shape in (shapes or CHECK_SHAPES)]
    if device == "cuda" and shapes is None:
        cases += [(shape, 2) for shape in GATING_SHAPES]
    meta = metadata(device)
    meta["timer"] = "none (correctness only)"
    interpreted = device != "cuda"
    # Written as it goes: a run stopped at its deadline keeps the checks already made.
    writer = ResultWriter(Path(out_dir) / "gating_correctness.csv", meta)
    budget = Budget(budget_s)
    for index, (shape, batch) in enumerate(cases):
        if not budget.allows():
            skipped = ", ".join(s.stage for s, _ in cases[index:])
            log(f"check: budget of {budget_s:.0f}s spent; not checked: {skipped}")
            break
        for dtype in TOLERANCES:
            for layout in LAYOUTS:
                for row in check_case(shape, batch, dtype, layout, device):
                    writer.add({**row, "interpreter": interpreted})
        log(f"check: {shape.stage} done ({'interpreter' if interpreted else device})")
    return writer.close()  # (no file if the budget allowed no shape at all)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.check", description=__doc__)
    parser.add_argument(
        "--out", type=output_folder, help="output directory (default bench/results/..)"
    )
    parser.add_argument("--quick", action="store_true", help="only the first shape (dry runs)")
    parser.add_argument("--budget-s", type=seconds_left, help="skip shapes past this")
    args = parser.parse_args(argv)
    device = default_device()
    out = Path(args.out) if args.out else default_out_dir(device)
    shapes = CHECK_SHAPES[:1] if args.quick else None
    path = run(out, device=device, shapes=shapes, budget_s=args.budget_s)
    if not path.exists():
        print("nothing checked: the budget allowed no shape")
        return
    import pandas as pd

    frame = pd.read_csv(path)
    failed = frame[~frame["passed"]]
    print(f"wrote {path}: {len(frame) - len(failed)}/{len(frame)} checks passed")
    if len(failed):
        print(failed[["case", "dtype", "layout", "tensor", "max_abs_err", "err_over_tol"]])
        sys.exit(1)


if __name__ == "__main__":
    main()
