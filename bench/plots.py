"""Plots from the benchmark CSVs: ``python -m bench.plots DIR``.

A separate step: it reads only the CSV files in ``DIR`` (``gating.csv``, ``models.csv``,
``breakdown.csv``, ``sweep.csv``) and writes PNGs beside them. Every title names the device the
numbers come from, and CPU-mode plots say so. The notebooks call the same functions with
``path=None``, which returns the figure instead of writing it.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot, no global backend switch), so the
module works the same in scripts, headless runs and notebooks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

PROVIDER_ORDER = ("eager", "torch_compile", "triton")
CATEGORY_ORDER = ("convolution", "BatchNorm", "gating", "cat", "other", "unattributed")
CATEGORY_COLORS = {
    "convolution": "#4C72B0",
    "BatchNorm": "#DD8452",
    "gating": "#C44E52",
    "cat": "#8172B3",
    "other": "#937860",
    "unattributed": "#BBBBBB",
}


def device_label(frame: pd.DataFrame) -> str:
    """What a title says about where ``frame``'s numbers were measured."""
    if frame.empty or "device" not in frame:
        return "unknown device"
    row = frame.iloc[0]
    if row["device"] == "cuda":
        return f"{row['gpu_name']}"
    threads = row.get("cpu_threads")
    threads = f", {int(threads)} thread{'s' if threads != 1 else ''}" if pd.notna(threads) else ""
    return f"CPU mode: {row['device_name']}{threads} (not GPU speed)"


def headline(frame: pd.DataFrame, column: str, preferred=()) -> object:
    """The value of ``column`` to plot: the first of ``preferred`` present, else the first row's
    (benchmarks write the headline case first)."""
    present = list(dict.fromkeys(frame[column]))
    for value in preferred:
        if value in present:
            return value
    return present[0]


def _figure(nrows: int, ncols: int, figsize) -> tuple[Figure, object]:
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig: Figure, path) -> Path | Figure:
    """Write ``fig`` to ``path`` (atomically) and return the path; return ``fig`` if no path."""
    fig.tight_layout()
    if path is None:
        return fig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path


def _check_columns(frame: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in frame]
    if missing:
        raise ValueError(f"{what} is missing column(s) {', '.join(missing)}")


def gating_subset(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The gating rows the plots show (largest batch, bf16 if measured, NCHW) and their label."""
    _check_columns(frame, ("provider", "mode", "stage", "batch", "dtype", "layout", "ms"), "gating")
    dtype = headline(frame, "dtype", ("bf16", "fp16", "fp32"))
    layout = headline(frame[frame.dtype == dtype], "layout", ("nchw",))
    rows = frame[(frame.dtype == dtype) & (frame.layout == layout)]
    batch = int(rows["batch"].max())  # the largest batch measured at that dtype and layout
    return rows[rows.batch == batch], f"{dtype}, {layout}, batch {batch}"


def _grouped_bars(ax, table: pd.DataFrame, ylabel: str) -> None:
    """Bars of ``table`` (index: x groups, columns: series), legend outside the axes."""
    table.plot.bar(ax=ax, rot=30, width=0.8)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("")
    ax.grid(axis="y", alpha=0.3)
    _legend_outside(ax, table.columns.name)


def _legend_outside(ax, title) -> None:
    ax.legend(title=title, fontsize=8, title_fontsize=8, loc="upper left",
              bbox_to_anchor=(1.0, 1.0), frameon=False)  # fmt: skip


def _stage_order(frame: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(frame["stage"]))


def plot_gating_latency(frame: pd.DataFrame, path=None):
    """Median latency per gating shape, one bar per provider, one panel per mode."""
    subset, label = gating_subset(frame)
    modes = list(dict.fromkeys(subset["mode"]))
    fig, axes = _figure(1, len(modes), (5.5 * len(modes), 4.2))
    for ax, mode in zip(axes[0], modes, strict=True):
        part = subset[subset["mode"] == mode]
        table = part.pivot_table(index="stage", columns="provider", values="ms", aggfunc="median")
        table = table.reindex(index=_stage_order(part))
        table = table[[p for p in PROVIDER_ORDER if p in table.columns]]
        _grouped_bars(ax, table, "ms (median)")
        ax.set_yscale("log")
        ax.set_title(mode)
    fig.suptitle(f"SC-Conv gating latency ({label}) - {device_label(frame)}")
    return _save(fig, path)


def plot_gating_roof(frame: pd.DataFrame, path=None):
    """Achieved bandwidth (minimal bytes) as % of the copy bandwidth measured in the same run."""
    subset, label = gating_subset(frame)
    _check_columns(subset, ("pct_of_copy",), "gating")
    modes = list(dict.fromkeys(subset["mode"]))
    fig, axes = _figure(1, len(modes), (5.5 * len(modes), 4.2))
    for ax, mode in zip(axes[0], modes, strict=True):
        part = subset[subset["mode"] == mode]
        table = part.pivot_table(
            index="stage", columns="provider", values="pct_of_copy", aggfunc="median"
        )
        table = table.reindex(index=_stage_order(part))
        table = table[[p for p in PROVIDER_ORDER if p in table.columns]]
        _grouped_bars(ax, table, "% of copy bandwidth")
        ax.axhline(100, color="black", linewidth=1, linestyle="--")
        ax.set_title(mode)
    copy = frame["copy_gbps"].iloc[0] if "copy_gbps" in frame else float("nan")
    fig.suptitle(
        f"Gating bandwidth vs a {copy:.0f} GB/s device copy ({label}) - {device_label(frame)}"
    )
    return _save(fig, path)


def models_subset(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The model rows the plots show (the headline precision and layout) and their label."""
    _check_columns(
        frame,
        ("model", "gate", "regime", "task", "precision", "layout", "batch", "ms", "img_per_s"),
        "models",
    )
    precision = headline(frame, "precision")
    layout = headline(frame, "layout")
    subset = frame[(frame.precision == precision) & (frame.layout == layout)]
    size = int(subset["image_size"].iloc[0]) if "image_size" in subset else None
    return subset, f"{precision}, {layout}" + (f", {size}px" if size else "")


def variant_label(row) -> str:
    """``"scnet50 [triton]"``: the model and its gate (a ResNet, gate "none": the model alone)."""
    return row["model"] if row["gate"] in ("none", None) else f"{row['model']} [{row['gate']}]"


def plot_models_ratio(frame: pd.DataFrame, path=None):
    """SCNet time / depth-matched ResNet time, per regime and batch; one panel per task."""
    subset, label = models_subset(frame)
    _check_columns(subset, ("time_ratio_vs_resnet",), "models")
    scnets = subset[subset["model"].str.startswith("scnet")].copy()
    tasks = list(dict.fromkeys(scnets["task"])) or list(dict.fromkeys(subset["task"]))
    fig, axes = _figure(1, len(tasks), (6 * len(tasks), 4.2))
    for ax, task in zip(axes[0], tasks, strict=True):
        part = scnets[scnets["task"] == task].copy()
        part["variant"] = part.apply(variant_label, axis=1)
        part["group"] = part["regime"] + "\nN=" + part["batch"].astype(str)
        table = part.pivot_table(
            index="group", columns="variant", values="time_ratio_vs_resnet", aggfunc="median"
        )
        if table.empty:
            ax.text(0.5, 0.5, "no SCNet/ResNet pair measured", ha="center", transform=ax.transAxes)
        else:
            _grouped_bars(ax, table, "time ratio SCNet / ResNet (1 = same speed)")
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
        ax.set_title(task)
    fig.suptitle(f"SCNet run-time increase over ResNet ({label}) - {device_label(frame)}")
    return _save(fig, path)


def plot_models_throughput(frame: pd.DataFrame, path=None):
    """Images per second per model, regime and batch; one panel per task."""
    subset, label = models_subset(frame)
    subset = subset.copy()
    subset["variant"] = subset.apply(variant_label, axis=1)
    subset["group"] = subset["regime"] + "\nN=" + subset["batch"].astype(str)
    tasks = list(dict.fromkeys(subset["task"]))
    fig, axes = _figure(1, len(tasks), (6 * len(tasks), 4.2))
    for ax, task in zip(axes[0], tasks, strict=True):
        part = subset[subset["task"] == task]
        table = part.pivot_table(
            index="group", columns="variant", values="img_per_s", aggfunc="median"
        )
        _grouped_bars(ax, table, "images / s")
        ax.set_title(task)
    fig.suptitle(f"Model throughput ({label}) - {device_label(frame)}")
    return _save(fig, path)


def plot_breakdown(frame: pd.DataFrame, path=None):
    """Stacked time per op category for one forward and one backward of each profiled model."""
    _check_columns(frame, ("model", "gate", "pass", "category", "time_ms"), "breakdown")
    # Pass "both": GPU kernel time the profiler could not tie to an op of either pass.
    passes = {"forward": "forward", "backward": "backward", "both": "fwd+bwd, not tied to an op"}
    part = frame[frame["pass"].isin(list(passes))].copy()
    part["variant"] = part.apply(variant_label, axis=1)
    part["bar"] = part["variant"] + " " + part["pass"].map(passes)
    table = part.pivot_table(index="bar", columns="category", values="time_ms", aggfunc="sum")
    order = list(dict.fromkeys(part["bar"]))
    table = table.reindex(index=order[::-1])
    table = table[[c for c in CATEGORY_ORDER if c in table.columns]]
    fig, axes = _figure(1, 1, (9, 0.5 * len(table) + 2))
    ax = axes[0][0]
    table.plot.barh(
        stacked=True, ax=ax, color=[CATEGORY_COLORS[c] for c in table.columns], width=0.75
    )
    _legend_outside(ax, "category")
    ax.set_xlabel("ms per iteration")
    ax.set_ylabel("")
    ax.grid(axis="x", alpha=0.3)
    source = frame["time_source"].iloc[0] if "time_source" in frame else "time"
    first = frame.iloc[0]
    fig.suptitle(
        f"Where one training forward/backward spends its {source}\n"
        f"({first['precision']}, {first['layout']}, batch {first['batch']}, "
        f"{first['image_size']}px) - {device_label(frame)}"
    )
    return _save(fig, path)


def plot_sweep(frame_or_path, path=None):
    """Heat map of time per configuration (rows) and case (columns), relative to each case's
    fastest correct configuration; one panel per kernel."""
    frame = frame_or_path
    if not isinstance(frame, pd.DataFrame):
        frame = pd.read_csv(frame)
    _check_columns(frame, ("kernel", "config", "table_key", "ms"), "sweep")
    kernels = list(dict.fromkeys(frame["kernel"]))
    panels = []
    for kernel in kernels:
        part = frame[frame["kernel"] == kernel].copy()
        part["case"] = (
            part["stage"].astype(str) + " N" + part["batch"].astype(str) + " "
            + part["dtype"] + " " + part["layout"].str.replace("channels_last", "CL")
        )  # fmt: skip
        if "correct" in part:
            part.loc[~part["correct"].astype(bool), "ms"] = float("nan")
        table = part.pivot_table(index="config", columns="case", values="ms", aggfunc="min")
        table = table.reindex(columns=list(dict.fromkeys(part["case"])))
        panels.append((kernel, table / table.min(axis=0)))
    height = max(len(t) for _, t in panels) * 0.32 + 2.5
    width = max(max(len(t.columns) for _, t in panels) * 0.45 + 5, 10)
    fig, axes = _figure(len(panels), 1, (width, height * len(panels)))
    for ax, (kernel, table) in zip(axes[:, 0], panels, strict=True):
        image = ax.imshow(table.to_numpy(), aspect="auto", cmap="viridis_r", vmin=1.0, vmax=3.0)
        ax.set_xticks(range(len(table.columns)), table.columns, rotation=60, ha="right",
                      fontsize=7)  # fmt: skip
        ax.set_yticks(range(len(table.index)), table.index, fontsize=7)
        for col in range(len(table.columns)):
            column = table.iloc[:, col]
            if column.notna().any():
                ax.text(col, list(table.index).index(column.idxmin()), "*", ha="center",
                        va="center", color="white", fontsize=10)  # fmt: skip
        ax.set_title(
            f"{kernel} kernel: time / best time per case (* = winner, blank = not timed or failed)"
        )
        fig.colorbar(image, ax=ax, label="time / best (capped at 3)")
    timer = str(frame["timer"].iloc[0]) if "timer" in frame else ""
    note = ""
    if "interpreter" in timer:
        note = "\n(Triton interpreter timings: a plumbing check, NOT a speed)"
    fig.suptitle(f"Autotune sweep - {device_label(frame)}{note}")
    return _save(fig, path)


PLOTS = {
    "gating.csv": (
        ("gating_latency.png", plot_gating_latency),
        ("gating_roof.png", plot_gating_roof),
    ),
    "models.csv": (
        ("models_ratio.png", plot_models_ratio),
        ("models_throughput.png", plot_models_throughput),
    ),
    "breakdown.csv": (("breakdown.png", plot_breakdown),),
    "sweep.csv": (("sweep_heatmap.png", plot_sweep),),
}


def plot_all(out_dir) -> list[Path]:
    """Every plot whose CSV exists in ``out_dir``; returns the PNG paths written."""
    out_dir = Path(out_dir)
    written = []
    for csv_name, plots in PLOTS.items():
        csv = out_dir / csv_name
        if not csv.exists():
            continue
        frame = pd.read_csv(csv)
        if frame.empty:
            continue
        for png, plot in plots:
            written.append(plot(frame, out_dir / png))
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__)
    parser.add_argument("out_dir", help="directory holding the benchmark CSVs")
    args = parser.parse_args(argv)
    if not Path(args.out_dir).is_dir():
        parser.error(f"{args.out_dir} is not a directory")
    written = plot_all(args.out_dir)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"no plots: {args.out_dir} holds none of the benchmark CSVs they are drawn from")


if __name__ == "__main__":
    main()
