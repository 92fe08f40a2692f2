"""The short text summary printed last by ``python -m bench``: ``python -m bench.summary DIR``.

Reads only the CSVs in ``DIR`` and the test log ``pytest.log``; every number it prints is one of
theirs (or a sum/ratio of them, said so in the line).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pandas as pd

from bench.plots import device_label, gating_subset, models_subset, variant_label


def _read(out_dir: Path, name: str) -> pd.DataFrame | None:
    path = out_dir / name
    if not path.exists():
        return None
    frame = pd.read_csv(path)
    return None if frame.empty else frame


# pytest's last line: "==== 3 failed, 120 passed, 2 skipped in 95.21s (0:01:35) ====" (with -q,
# without the "=" borders).
_PYTEST_COUNT = (r"[0-9]+ (?:passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?|"
                 r"rerun|tests? collected)")  # fmt: skip
_PYTEST_RESULT = re.compile(rf"^=* ?(?P<result>(?:no tests ran|{_PYTEST_COUNT}"
                            rf"(?:, {_PYTEST_COUNT})*) in [0-9.]+s\b.*?) ?=*$")  # fmt: skip


# A model measurement whose p20-p80 range is wider than this fraction of its median is marked
# noisy: on a shared CPU machine one such run gave SCNet-50 1.76x ResNet-50 where quiet runs gave
# 1.05x.
NOISY_SPREAD = 0.2
# bytes_moved.csv's columns that the summary and the README table show.
BYTES_COLUMNS = ("model", "original_gb", "optimized_gb", "saved", "optimized_vs_resnet")


def test_result(out_dir) -> str | None:
    """One line on the tests stage's ``pytest.log`` in ``out_dir`` (None when there is none)."""
    path = Path(out_dir) / "pytest.log"
    if not path.exists():
        return None
    text = path.read_text(errors="replace")
    for line in reversed(text.splitlines()):
        match = _PYTEST_RESULT.match(line.strip())
        if match:
            result = match["result"]
            if "KeyboardInterrupt" in text:  # the tests stage stops pytest with SIGINT
                return f"tests (pytest.log): {result}, then STOPPED  <-- INCOMPLETE"
            alarm = ""
            if re.search(r"\b(failed|errors?)\b", result):
                alarm = "  <-- FAILURES"
            elif not re.search(r"\b(passed|collected)\b", result):
                alarm = "  <-- NO TEST PASSED"
            return f"tests (pytest.log): {result}{alarm}"
    return "tests (pytest.log): no result line (stopped before the end?)  <-- INCOMPLETE"


def network_stages(frame: pd.DataFrame, model: str = "scnet50") -> dict[str, int]:
    """The gating shapes of one pass through ``model`` and its gates at each: every SCNet gating
    shape when the rows are of those (so that a run cut short by its budget is not summed as the
    whole network), else the shapes in the rows (the dry run's tiny shape)."""
    from bench.gating import GATING_SHAPES

    known = {shape.stage: shape.blocks[model] for shape in GATING_SHAPES}
    present = frame.drop_duplicates("stage")
    if set(present["stage"]) <= set(known):
        return known
    return dict(zip(present["stage"], present[f"blocks_{model}"].astype(int), strict=True))


NETWORK_COLUMNS = ["provider", "mode", "ms", "gbps", "pct_of_copy"]


def network_gating(frame: pd.DataFrame, model: str = "scnet50") -> pd.DataFrame:
    """Whole-network gating per provider and mode at the plots' dtype, layout and batch
    (``gating_subset``): the sum over ``network_stages`` of median time x number of blocks of
    ``model`` at that shape; achieved GB/s and % of copy from the summed minimal bytes. Only
    providers/modes with every shape measured are kept (the frame may then have no rows)."""
    column = f"blocks_{model}"
    subset, _ = gating_subset(frame)
    stages = set(network_stages(frame, model))
    rows = []
    for (provider, mode), part in subset.groupby(["provider", "mode"], sort=False):
        if not stages <= set(part["stage"]):
            continue
        part = part[part["stage"].isin(stages)]
        ms = float((part["ms"] * part[column]).sum())
        nbytes = float((part["minimal_bytes"] * part[column]).sum())
        gbps = nbytes / ms / 1e6
        pct = 100 * gbps / float(part["copy_gbps"].iloc[0])
        rows.append(dict(zip(NETWORK_COLUMNS, (provider, mode, ms, gbps, pct), strict=True)))
    return pd.DataFrame(rows, columns=NETWORK_COLUMNS)


def breakdown_by_category(breakdown: pd.DataFrame) -> pd.DataFrame:
    """ms per category (columns) and variant (rows) of one training forward+backward, with the
    GPU time the profiler could not tie to an op (pass "both") as "unattributed", and a total."""
    part = breakdown[breakdown["pass"].isin(["forward", "backward", "both"])].copy()
    part["variant"] = part.apply(variant_label, axis=1)
    table = part.pivot_table(
        index="variant", columns="category", values="time_ms", aggfunc="sum", sort=False
    )
    table["total"] = table.sum(axis=1)
    return table


def summarize(out_dir) -> str:
    """The summary text for the CSVs in ``out_dir``."""
    out_dir = Path(out_dir)
    lines = ["", "=" * 78, f"scconv benchmark summary ({out_dir})", "=" * 78]
    frames = {
        name: _read(out_dir, f"{name}.csv")
        for name in (
            "bandwidth",
            "gating",
            "gating_correctness",
            "models",
            "breakdown",
            "sweep",
            "models_skipped",
            "model_summary",
            "aten_ops",
            "bytes_moved",
        )
    }
    tests = test_result(out_dir)
    any_frame = next((f for f in frames.values() if f is not None and "device" in f), None)
    if any_frame is None:
        lines.extend([tests] if tests else [])
        lines.append("no results found")
        return "\n".join(lines)
    first = any_frame.iloc[0]
    lines.append(f"device: {device_label(any_frame)}")
    lines.append(
        f"driver {first['driver']}, CUDA {first['cuda']}, torch {first['torch']}, "
        f"triton {first['triton']}, commit {first['git_commit']}, run {first['timestamp']}"
    )
    if first["device"] != "cuda":
        lines.append(
            "CPU MODE: times are CPU times on this machine; they say nothing about GPU speed."
        )

    if tests:
        lines.append(tests)

    bandwidth = frames["bandwidth"]
    if bandwidth is not None:
        lines.append(f"device copy bandwidth: {bandwidth['copy_gbps'].iloc[0]:.1f} GB/s")

    summary = frames["model_summary"]
    if summary is not None:
        lines.append("")
        lines.append("models (python -m scconv summary):")
        for _, row in summary.iterrows():
            lines.append(
                f"  {row['model']:<14} {row['params_M']:7.2f} M params  "
                f"{row['GMACs']:5.2f} GMACs at {row['input']}"
            )

    gating = frames["gating"]
    if gating is not None:
        _, label = gating_subset(gating)
        gates = sum(network_stages(gating).values())
        lines.append("")
        grid = ", ".join(
            f"{column} {'/'.join(str(v) for v in dict.fromkeys(gating[column]))}"
            for column in ("provider", "batch", "dtype", "layout")
        )
        lines.append(f"gating: {len(gating)} measurements ({grid}); gating.csv")
        gates_text = f"{gates} gate" + ("s" if gates != 1 else "")
        lines.append(f"SCNet-50 gating, whole network (sum over its {gates_text}; {label}):")
        network = network_gating(gating)
        if network.empty:
            lines.append("  (not every gating shape was measured)")
        for mode, part in network.groupby("mode", sort=False):
            by = part.set_index("provider")
            cells = [
                f"{p} {by.loc[p, 'ms']:.3f} ms ({by.loc[p, 'pct_of_copy']:.0f}% of copy)"
                for p in by.index
            ]
            lines.append(f"  {mode:<17} " + ", ".join(cells))
            if "triton" in by.index:
                ratios = [
                    f"{by.loc[p, 'ms'] / by.loc['triton', 'ms']:.2f}x vs {p}"
                    for p in by.index
                    if p != "triton"
                ]
                lines.append(f"  {'':<17} triton speed-up: " + ", ".join(ratios))

    correctness = frames["gating_correctness"]
    if correctness is not None:
        passed = int(correctness["passed"].astype(bool).sum())
        where = "Triton interpreter" if correctness["interpreter"].astype(bool).any() else "GPU"
        lines.append("")
        lines.append(
            f"Triton gating correctness ({where}, not timed): {passed}/{len(correctness)} "
            f"checks passed" + ("" if passed == len(correctness) else "  <-- FAILURES")
        )

    models = frames["models"]
    if models is not None:
        subset, label = models_subset(models)
        lines.append("")
        lines.append(f"models ({label}); ratio = SCNet time / ResNet time, same settings:")
        lines.append(
            f"  {'model':<22} {'regime':<14} {'task':<10} {'batch':>5} {'img/s':>9} {'ratio':>6}"
            f" {'spread':>7}"
        )
        noisy = 0
        for _, row in subset.iterrows():
            name = variant_label(row)
            ratio = row.get("time_ratio_vs_resnet")
            ratio = f"{ratio:6.2f}" if pd.notna(ratio) else "     -"
            spread = (row["ms_p80"] - row["ms_p20"]) / row["ms"] if "ms_p80" in row else None
            mark = ""
            if spread is not None and pd.notna(spread):
                mark = f" {spread:6.0%}" + ("  <-- noisy" if spread > NOISY_SPREAD else "")
                noisy += spread > NOISY_SPREAD
            lines.append(
                f"  {name:<22} {row['regime']:<14} {row['task']:<10} {int(row['batch']):>5} "
                f"{row['img_per_s']:9.1f} {ratio}{mark}"
            )
        lines.append(
            "  spread = (p80 - p20) / median time"
            + (
                f"; {noisy} above {NOISY_SPREAD:.0%}: the machine was busy, so their ratios "
                "may be off by more than that (run again on a quiet machine)"
                if noisy
                else ""
            )
        )
        others = len(models) - len(subset)
        if others:
            lines.append(f"  (+{others} rows at other precisions/layouts in models.csv)")

    breakdown = frames["breakdown"]
    if breakdown is not None:
        source = breakdown["time_source"].iloc[0]
        lines.append("")
        lines.append(f"per-op breakdown of one training forward+backward ({source}, ms):")
        table = breakdown_by_category(breakdown)
        lines.extend("  " + line for line in table.round(2).to_string().splitlines())

    aten_ops = frames["aten_ops"]
    if aten_ops is not None:
        lines.append("")
        lines.append("ATen ops per forward (eval; optimized = scconv.optimize_for_inference):")
        columns = ["model", "original", "optimized", "optimized_triton_gate", "saved"]
        table = aten_ops[[c for c in columns if c in aten_ops]].to_string(index=False)
        lines.extend("  " + line for line in table.splitlines())

    moved = frames["bytes_moved"]
    if moved is not None:
        lines.append("")
        lines.append(f"GB moved per forward ({_traffic_case(moved)}; a traffic model, not timed):")
        table = moved[list(BYTES_COLUMNS)].to_string(index=False)
        lines.extend("  " + line for line in table.splitlines())

    sweep = frames["sweep"]
    if sweep is not None:
        winners = sweep[sweep["winner"].astype(bool)]
        lines.append("")
        lines.append(
            f"autotune sweep: {sweep['table_key'].nunique()} shapes x kernels, "
            f"{len(sweep)} timings, {len(winners)} winners"
            + (
                " (interpreter: plumbing only)"
                if "interpreter" in str(sweep["timer"].iloc[0])
                else ""
            )  # fmt: skip
        )

    skipped = frames["models_skipped"]
    if skipped is not None:
        lines.append("")
        lines.append(f"skipped: {len(skipped)} model cases (budget or memory): models_skipped.csv")

    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    csvs = sorted(p.name for p in out_dir.glob("*.csv"))
    traces = sorted(p.name for p in out_dir.glob("trace_*.json.gz"))
    lines.append("")
    lines.append(f"files: {', '.join(csvs + pngs + traces)}")
    if traces:
        lines.append(
            "traces (torch.profiler, the profiled training steps): open in https://ui.perfetto.dev"
        )
    lines.append("=" * 78)
    return "\n".join(lines)


_PROVIDER_LABELS = {"eager": "eager", "torch_compile": "torch.compile", "triton": "triton"}


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def readme_tables(out_dir) -> str:
    """The measured tables of ``out_dir`` in Markdown, for the README (``--markdown``).

    Gating: SCNet-50's whole-network gating per mode and layout (headline dtype, largest batch),
    each provider's time, Triton's GB/s and % of the copy bandwidth, Triton's speed-up over
    eager and ``torch.compile``. Models: SCNet / ResNet time ratio (and SCNet img/s) per
    regime, task and batch at the headline precision and layout. ATen ops per forward. Cells a
    run did not measure are ``-``.
    """
    out_dir = Path(out_dir)
    frames = {
        name: _read(out_dir, f"{name}.csv")
        for name in ("gating", "models", "aten_ops", "breakdown", "bytes_moved")
    }
    any_frame = next((f for f in frames.values() if f is not None and "device" in f), None)
    if any_frame is None:
        return f"no results found in {out_dir}"
    first = any_frame.iloc[0]
    device = f"on {first['gpu_name']}" if first["device"] == "cuda" else (
        f"in CPU mode on {first['device_name']} (CPU times, which say nothing about GPU speed)"
    )  # fmt: skip
    lines = [
        f"Measured {device}; torch {first['torch']}, triton {first['triton']}, CUDA "
        f"{first['cuda']}, driver {first['driver']}; commit {first['git_commit']}, "
        f"{str(first['timestamp'])[:10]}; CSVs in `{out_dir.name}/`."
    ]

    gating = frames["gating"]
    if gating is not None:
        # The plots' dtype and batch, every layout measured there.
        headline_rows, _ = gating_subset(gating)
        dtype, batch = headline_rows["dtype"].iloc[0], int(headline_rows["batch"].iloc[0])
        gates = sum(network_stages(gating).values())
        base = gating[(gating["dtype"] == dtype) & (gating["batch"] == batch)]
        copy = float(gating["copy_gbps"].iloc[0])
        rows, incomplete = [], []
        for layout in dict.fromkeys(base["layout"]):
            network = network_gating(base[base["layout"] == layout])
            if network.empty:
                incomplete.append(layout)
            for mode in dict.fromkeys(base["mode"]):
                by = network[network["mode"] == mode].set_index("provider")
                if by.empty:
                    continue
                ms = by["ms"].to_dict()
                cells = [mode, layout]
                cells += [f"{ms[p]:.3f}" if p in ms else "-" for p in _PROVIDER_LABELS]
                if "triton" in ms:
                    cells += [f"{by.loc['triton', 'gbps']:.0f}",
                              f"{by.loc['triton', 'pct_of_copy']:.0f} %"]  # fmt: skip
                    cells += [f"{ms[p] / ms['triton']:.2f}x" if p in ms else "-"
                              for p in ("eager", "torch_compile")]  # fmt: skip
                else:
                    cells += ["-"] * 4
                rows.append(cells)
        lines += ["", f"SCNet-50 gating, whole network (sum over its {gates} gates), {dtype}, "
                  f"batch {batch}; ms (median); device copy {copy:.0f} GB/s; a provider without "
                  "every shape measured is `-`:", ""]  # fmt: skip
        header = ["mode", "layout", *(f"{label} ms" for label in _PROVIDER_LABELS.values()),
                  "triton GB/s", "triton % of copy", "triton vs eager",
                  "triton vs torch.compile"]  # fmt: skip
        lines += _markdown_table(header, rows) if rows else []
        if incomplete:
            lines += ["", f"({', '.join(incomplete)}: no provider has every gating shape "
                      f"measured at {dtype}, batch {batch})"]  # fmt: skip

    models = frames["models"]
    if models is not None:
        subset, label = models_subset(models)
        batches = sorted(dict.fromkeys(subset["batch"]), reverse=True)
        rows = []
        keys = ["model", "gate", "regime", "task"]
        for key, part in subset.groupby(keys, sort=False):
            row = dict(zip(keys, key, strict=True))
            if row["gate"] == "none":
                continue
            by_batch = part.set_index("batch")
            cells = [variant_label(row), row["regime"], row["task"]]
            for b in batches:
                if b in by_batch.index and pd.notna(by_batch.loc[b, "time_ratio_vs_resnet"]):
                    cells.append(f"{by_batch.loc[b, 'time_ratio_vs_resnet']:.2f} "
                                 f"({by_batch.loc[b, 'img_per_s']:,.0f} img/s)")  # fmt: skip
                else:
                    cells.append("-")
            rows.append(cells)
        lines += ["", f"SCNet time / ResNet time, same regime, task and batch ({label}; < 1: "
                  "SCNet is faster), with the SCNet's images per second:", ""]  # fmt: skip
        header = ["model", "regime", "task", *(f"batch {b}" for b in batches)]
        lines += _markdown_table(header, rows) if rows else ["(no SCNet/ResNet pair measured)"]

    breakdown = frames["breakdown"]
    if breakdown is not None:
        table = breakdown_by_category(breakdown)
        first_row = breakdown.iloc[0]
        lines += ["", f"One training forward+backward by op category, ms "
                  f"({first_row['time_source']}; {first_row['precision']}, {first_row['layout']}, "
                  f"batch {first_row['batch']}):", ""]  # fmt: skip
        lines += _markdown_table(
            ["model", *table.columns],
            [[variant, *(f"{v:.2f}" for v in values)] for variant, values in table.iterrows()],
        )

    aten_ops = frames["aten_ops"]
    if aten_ops is not None:
        columns = ["model", "original", "optimized", "optimized_triton_gate", "saved"]
        columns = [c for c in columns if c in aten_ops]
        lines += ["", "ATen ops per forward (eval; optimized = `scconv.optimize_for_inference`):",
                  ""]  # fmt: skip
        lines += _markdown_table(
            columns, [[str(row[c]) for c in columns] for _, row in aten_ops.iterrows()]
        )

    moved = frames["bytes_moved"]
    if moved is not None:
        lines += ["", f"GB moved per forward ({_traffic_case(moved)}; `python -m bench.opcount "
                  "--bytes`, a traffic model, not timed):", ""]  # fmt: skip
        rows = [[str(row[c]) for c in BYTES_COLUMNS] for _, row in moved.iterrows()]
        lines += _markdown_table(list(BYTES_COLUMNS), rows)
    return "\n".join(lines)


def _traffic_case(moved) -> str:
    """``"bf16, channels_last, batch 256, 224 px"``: the case ``bytes_moved.csv`` counts."""
    row = moved.iloc[0]
    return f"{row['dtype']}, {row['layout']}, batch {row['batch']}, {row['image_size']} px"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.summary", description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument(
        "--markdown", action="store_true", help="print the README's tables (Markdown) instead"
    )
    args = parser.parse_args(argv)
    if not Path(args.out_dir).is_dir():
        parser.error(f"{args.out_dir} is not a directory")
    print(readme_tables(args.out_dir) if args.markdown else summarize(args.out_dir))


if __name__ == "__main__":
    main()
