"""The first GPU run's results go through everything that reads them: plots, the summary, the
README tables (``python -m bench.summary DIR --markdown``) and both notebooks.

No GPU run has been made yet, and everything downstream of ``bench/gpu.sh`` was written against
CPU-mode CSVs (one provider pair, one dtype, layout and batch). Here a results folder shaped like
a GPU run's is made up from the CUDA grids of ``bench.gating``, ``bench.models`` and
``bench.sweep``, cut short as a budget cuts them (gating: every provider, dtype and layout at
batch 256, part of batch 32; the first cases of the model grid; sweep configurations that
failed), with times chosen so that the expected numbers are known (Triton gating at 90 % of the
copy bandwidth, 3x faster than eager, 1.5x than ``torch.compile``).
"""

import math
from pathlib import Path

import pandas as pd
import pytest

from bench import common, gating, models, notebooks, plots, summary, sweep

GPU = "NVIDIA H100 80GB HBM3"
COPY_GBPS = 3000.0
# Achieved GB/s (minimal bytes) of each gating provider: 90 %, 60 % and 30 % of the copy.
PROVIDER_GBPS = {"triton": 2700.0, "torch_compile": 1800.0, "eager": 900.0}
# Model time per image (ms) at large batch, and how SCNet-50 compares with ResNet-50.
RESNET_MS_PER_IMAGE = {"inference": 0.2, "train": 0.6}
SCNET_FACTOR = {("eager", "eager"): 1.25, ("eager", "triton"): 1.1, ("optimized", "eager"): 1.05,
                ("optimized", "triton"): 0.95, ("torch_compile", "eager"): 0.9,
                ("torch_compile", "triton"): 0.92}  # fmt: skip
MEASURED_MODEL_CASES = 40  # the rest of the grid is "skipped by the budget"


def _meta() -> dict:
    values = dict(device="cuda", device_name=GPU, gpu_name=GPU, driver="580.95.05", cuda="13.0",
                  torch="2.11.0+cu130", triton="3.6.0", cpu_threads=16, git_commit="0123456789ab",
                  timestamp="2026-12-01T10:00:00+00:00", timer=common.TIMER_CUDA)  # fmt: skip
    assert set(values) == set(common.META_COLUMNS)
    return values


def _timing(ms: float) -> dict:
    return {"ms": ms, "ms_p20": 0.98 * ms, "ms_p80": 1.03 * ms}


def _gating_rows(meta: dict) -> list[dict]:
    rows = []
    groups = gating.plan(gating.GATING_SHAPES, gating.GPU_BATCHES, ("bf16", "fp16", "fp32"),
                         gating.LAYOUTS)  # fmt: skip
    for batch, dtype, layout, shape in groups[: len(groups) // 2]:  # the budget ran out halfway
        size = common.DTYPES[dtype].itemsize
        for provider, gbps in PROVIDER_GBPS.items():
            for mode in gating.MODES:
                if (provider, mode, shape.stage) == ("torch_compile", "backward", "layer4"):
                    continue  # a failed measurement: torch.compile's network total is incomplete
                nbytes = gating.minimal_bytes(shape, batch, size, mode)
                ms = nbytes / gbps / 1e6
                rows.append(dict(
                    provider=provider, mode=mode, stage=shape.stage, batch=batch, **shape.sizes(),
                    dtype=dtype, layout=layout, blocks_scnet50=shape.blocks["scnet50"],
                    blocks_scnet101=shape.blocks["scnet101"], **_timing(ms), first_call_s=0.5,
                    minimal_bytes=nbytes, gbps=gbps, copy_gbps=COPY_GBPS,
                    pct_of_copy=100 * gbps / COPY_GBPS, **meta,
                ))  # fmt: skip
    return rows


def _model_ms(case: models.Case) -> float:
    per_image = RESNET_MS_PER_IMAGE[case.task] * (1.3 if "101" in case.model else 1.0)
    if case.model.startswith("scnet"):
        # More small ops than ResNet: a larger fixed cost, so the ratio differs per batch.
        return (3.0 + per_image * case.batch) * SCNET_FACTOR[(case.regime, case.gate)]
    ms = 2.0 + per_image * case.batch  # launch-bound at batch 1, per image at large batches
    return 0.9 * ms if case.regime == "optimized" else ms


def _models_frames(meta: dict) -> tuple[pd.DataFrame, list[dict]]:
    cases = models.plan_cases(**models._defaults("cuda"))
    measured, skipped = cases[:MEASURED_MODEL_CASES], cases[MEASURED_MODEL_CASES:]
    rows = []
    for case in measured:
        ms = _model_ms(case)
        rows.append(dict(
            **vars(case), **_timing(ms), img_per_s=case.batch / ms * 1e3, peak_mem_mib=9000.0,
            first_call_s=40.0 if models.REGIMES[case.regime].compiles else 2.0,
            cudnn_benchmark=True, **meta,
        ))  # fmt: skip
    return models.add_ratio_columns(pd.DataFrame(rows)), [vars(c) for c in skipped]


def _breakdown_rows(meta: dict) -> list[dict]:
    rows = []
    for model, gate in (("scnet50", "eager"), ("scnet50", "triton"), ("resnet50", "none")):
        for pass_ in ("forward", "backward"):
            for i, category in enumerate(models.CATEGORIES):
                time_ms = 0.0 if model == "resnet50" and category in ("gating", "cat") else 5.0 + i
                rows.append(dict(
                    **{"pass": pass_}, category=category, time_ms=time_ms, n_ops=10 * (i + 1),
                    share_pct=20.0, model=model, gate=gate, precision="amp_bf16",
                    layout="channels_last", batch=256, image_size=224,
                    time_source="CUDA kernel time", **meta,
                ))  # fmt: skip
    return rows


def _sweep_rows(meta: dict) -> list[dict]:
    from kernels import configs

    rows = []
    plan = list(sweep.cases(gating.GATING_SHAPES, (256, 32), ("bf16", "fp32"), gating.LAYOUTS))
    for shape, batch, dtype, layout, key in plan[:10]:
        for kernel in configs.KERNELS:
            space = configs.search_space(kernel)
            nbytes = gating.minimal_bytes(shape, batch, common.DTYPES[dtype].itemsize, kernel)
            times = [0.1 * (1 + abs(i - len(space) // 2)) for i in range(len(space))]
            times[0] = math.nan  # a configuration this GPU cannot launch
            best = min(t for t in times if not math.isnan(t))
            for config, ms in zip(space, times, strict=True):
                rows.append(dict(
                    kernel=kernel, config=sweep.config_name(config),
                    **{f"cfg_{k}": v for k, v in config.kwargs.items()},
                    num_warps=config.num_warps, num_stages=config.num_stages, **_timing(ms),
                    correct=not math.isnan(ms), table_key=key, stage=shape.stage, batch=batch,
                    **shape.sizes(), dtype=dtype, layout=layout, search="layout family",
                    gbps=nbytes / ms / 1e6,
                    winner=ms == best, **meta,
                ))  # fmt: skip
    return rows


def _other_rows(meta: dict) -> dict[str, list[dict]]:
    bandwidth = [dict(copy_bytes=2**30, copy_gbps=COPY_GBPS, copy_gbps_p20=2990.0,
                      copy_gbps_p80=3010.0, copy_ms=0.36, **meta)]  # fmt: skip
    correctness = [
        dict(case=f"{shape.stage} fwd", batch=32, **shape.sizes(), dtype=dtype, layout="nchw",
             tensor="out", layout_kept=True, max_abs_err=1e-3, err_over_tol=0.1,
             eager_max_abs_err=2e-3, atol=1e-2, rtol=1e-2, passed=True, interpreter=False, **meta)
        for shape in gating.GATING_SHAPES
        for dtype in ("bf16", "fp32")
    ]  # fmt: skip
    ops = [dict(model=m, original=o, optimized=p, optimized_triton_gate=t, saved=s, **meta)
           for m, o, p, t, s in (("scnet50", 432, 217, 169, "50%"),
                                 ("resnet50", 176, 105, 105, "40%"))]  # fmt: skip
    sizes = (("scnet50", 25.56, 3.93), ("resnet50", 25.56, 4.09))
    summary_rows = [dict(model=m, params_M=p, GMACs=g, input="224x224", **meta)
                    for m, p, g in sizes]  # fmt: skip
    moved = [dict(model=m, original_gb=o, optimized_gb=p, saved=s, optimized_vs_resnet=r,
                  batch=256, dtype="bf16", layout="channels_last", image_size=224, **meta)
             for m, o, p, s, r in (("scnet50", 53.172, 27.399, "48%", 1.103),
                                   ("resnet50", 41.878, 24.845, "41%", 1.0))]  # fmt: skip
    return {"bandwidth.csv": bandwidth, "gating_correctness.csv": correctness,
            "aten_ops.csv": ops, "bytes_moved.csv": moved,
            "model_summary.csv": summary_rows}  # fmt: skip


@pytest.fixture(scope="module")
def gpu_results(tmp_path_factory) -> Path:
    """A results folder holding a made-up GPU run (``<root>/<gpu-name>/``) beside CPU results."""
    root = tmp_path_factory.mktemp("results")
    out = common.default_out_dir("cpu", root).parent / common.slugify(GPU)
    meta = _meta()
    common.write_csv(_gating_rows(meta), out / "gating.csv")
    frame, skipped = _models_frames(meta)
    common.write_csv(frame, out / "models.csv")
    common.write_csv(skipped, out / "models_skipped.csv")
    common.write_csv(_breakdown_rows(meta), out / "breakdown.csv")
    common.write_csv(_sweep_rows(meta), out / "sweep.csv")
    for name, rows in _other_rows(meta).items():
        common.write_csv(rows, out / name)
    # CPU results beside it: the notebooks must prefer the GPU's.
    cpu = root / "cpu"
    cpu.mkdir()
    for name in ("gating.csv", "models.csv"):
        (cpu / name).write_bytes((common.RESULTS_DIR / "cpu" / name).read_bytes())
    return out


def test_plots_of_a_gpu_run_name_the_gpu(gpu_results):
    written = plots.plot_all(gpu_results)
    assert sorted(p.name for p in written) == [
        "breakdown.png", "gating_latency.png", "gating_roof.png", "models_ratio.png",
        "models_throughput.png", "sweep_heatmap.png",
    ]  # fmt: skip
    gating_frame = pd.read_csv(gpu_results / "gating.csv")
    title = plots.plot_gating_roof(gating_frame)._suptitle.get_text()
    assert GPU in title and "CPU" not in title and "bf16, nchw, batch 256" in title
    sweep_title = plots.plot_sweep(gpu_results / "sweep.csv")._suptitle.get_text()
    assert GPU in sweep_title and "interpreter" not in sweep_title
    _, label = plots.models_subset(pd.read_csv(gpu_results / "models.csv"))
    assert label == "amp_bf16, channels_last, 224px"


def test_summary_of_a_gpu_run(gpu_results):
    text = summary.summarize(gpu_results)
    assert f"device: {GPU}" in text and "CPU MODE" not in text
    assert "triton speed-up: 3.00x vs eager" in text
    assert "(90% of copy)" in text
    grid = len(models.plan_cases(**models._defaults("cuda")))
    assert f"skipped: {grid - MEASURED_MODEL_CASES} model cases" in text
    assert "autotune sweep:" in text and "interpreter" not in text
    assert "GB moved per forward (bf16, channels_last, batch 256, 224 px;" in text


def test_readme_tables_of_a_gpu_run(gpu_results):
    text = summary.readme_tables(gpu_results)
    lines = text.splitlines()
    assert lines[0].startswith(f"Measured on {GPU}; torch 2.11.0+cu130, triton 3.6.0")
    assert "sum over its 16 gates), bf16, batch 256" in text
    # Both layouts, every mode; torch.compile's backward lacks layer4, so its total is "-".
    forward = next(line for line in lines if line.startswith("| forward | nchw |"))
    assert forward.endswith("| 2700 | 90 % | 3.00x | 1.50x |")
    backward = next(line for line in lines if line.startswith("| backward | channels_last |"))
    assert backward.endswith("| 2700 | 90 % | 3.00x | - |")
    # Issue 6's ratios: optimized SCNet-50 / optimized ResNet-50 at batch 256, 32 and 1.
    header = next(line for line in lines if line.startswith("| model | regime | task |"))
    assert header == "| model | regime | task | batch 256 | batch 32 | batch 1 |"
    row = next(line for line in lines if line.startswith("| scnet50 [triton] | optimized |"))
    ratios = [cell.split()[0] for cell in row.strip("|").split("|")[3:]]
    expected = [
        _model_ms(models.Case("scnet50", "triton", "optimized", "inference", "amp_bf16",
                              "channels_last", b, 224))
        / _model_ms(models.Case("resnet50", "none", "optimized", "inference", "amp_bf16",
                                "channels_last", b, 224))
        for b in (256, 32, 1)
    ]  # fmt: skip
    assert ratios == [f"{r:.2f}" for r in expected] and len(set(ratios)) == 3
    # Training has no batch 1; compiled cases past the budget are "-".
    train = next(line for line in lines if line.startswith("| scnet50 [eager] | eager | train |"))
    assert train.endswith("| - |")
    assert "| scnet50 | 432 | 217 | 169 | 50% |" in text
    assert "GB moved per forward (bf16, channels_last, batch 256, 224 px;" in text
    assert "| scnet50 | 53.172 | 27.399 | 48% | 1.103 |" in text
    assert "CPU mode" not in text


def test_readme_tables_from_the_command_line(gpu_results, capsys):
    summary.main([str(gpu_results), "--markdown"])
    assert capsys.readouterr().out.startswith(f"Measured on {GPU}")


def _copy_with(gpu_results: Path, directory: Path, name: str, frame: pd.DataFrame) -> Path:
    """A copy of the made-up run in ``directory`` whose ``name`` CSV is ``frame``."""
    directory.mkdir()
    for path in gpu_results.glob("*.csv"):
        (directory / path.name).write_bytes(path.read_bytes())
    common.write_csv(frame, directory / name)
    return directory


def test_a_layout_cut_short_is_not_summed_as_the_whole_network(gpu_results, tmp_path):
    # The budget ran out inside channels_last at batch 256 (layer3 and layer4 never measured),
    # and one provider lacks a shape in nchw: those show as "-" or not at all, never as a
    # smaller sum under "16 gates".
    frame = pd.read_csv(gpu_results / "gating.csv")
    cut = (frame.layout == "channels_last") & frame.stage.isin(["layer3.0", "layer3", "layer4.0",
                                                                "layer4"])  # fmt: skip
    cut |= (frame.layout == "nchw") & (frame.provider == "eager") & (frame.stage == "layer4")
    folder = _copy_with(gpu_results, tmp_path / "run", "gating.csv", frame[~cut])
    text = summary.readme_tables(folder)
    assert "sum over its 16 gates), bf16, batch 256" in text
    assert "| channels_last |" not in text
    assert "(channels_last: no provider has every gating shape measured at bf16, batch 256)" in text
    forward = next(line for line in text.splitlines() if line.startswith("| forward | nchw |"))
    assert forward.startswith("| forward | nchw | - |") and forward.endswith("| - | 1.50x |")
    assert "sum over its 16 gates" in summary.summarize(folder)
    # Nothing complete anywhere: the summary says so instead of failing.
    none = _copy_with(gpu_results, tmp_path / "none", "gating.csv",
                      frame[frame.stage != "layer1"])  # fmt: skip
    assert "(not every gating shape was measured)" in summary.summarize(none)
    assert "| forward |" not in summary.readme_tables(none)


def test_the_plotted_batch_is_one_measured_at_the_plotted_dtype(gpu_results, tmp_path):
    frame = pd.read_csv(gpu_results / "gating.csv")
    frame = frame[~((frame.dtype == "bf16") & (frame.batch == 256))]  # bf16 only at batch 32
    subset, label = plots.gating_subset(frame)
    assert label == "bf16, nchw, batch 32" and len(subset) and set(subset.batch) == {32}
    folder = _copy_with(gpu_results, tmp_path / "run", "gating.csv", frame)
    assert "bf16, batch 32; ms (median)" in summary.readme_tables(folder)


def test_unattributed_gpu_time_counts_in_the_breakdown_totals(gpu_results, tmp_path, monkeypatch):
    frame = pd.read_csv(gpu_results / "breakdown.csv")
    extra = frame.iloc[[0]].assign(**{"pass": "both", "category": "unattributed", "time_ms": 50.0})
    folder = _copy_with(gpu_results, tmp_path / "run", "breakdown.csv",
                        pd.concat([frame, extra]))  # fmt: skip
    row = next(line for line in summary.readme_tables(folder).splitlines()
               if line.startswith("| scnet50 [eager] | 10.00"))  # fmt: skip
    # 2 passes x (5 + 6 + 7 + 8 + 9) ms, plus the 50 unattributed.
    assert row.endswith("| 50.00 | 120.00 |")
    figure = plots.plot_breakdown(pd.read_csv(folder / "breakdown.csv"))
    labels = [label.get_text() for label in figure.axes[0].get_yticklabels()]
    assert "scnet50 [eager] fwd+bwd, not tied to an op" in labels
    # The notebook's totals are the summary's: unattributed time included.
    monkeypatch.setenv("SCCONV_BENCH_RESULTS", str(folder.parent))
    executed = notebooks.execute(notebooks.NOTEBOOK_DIR / "speed_vs_resnet.ipynb")
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert "scnet50 [eager]: 120.00 ms vs ResNet-50" in "".join(o.get("text", "") for o in outputs)


@pytest.mark.parametrize("name", ["speed_vs_resnet.ipynb", "autotune_sweep.ipynb"])
def test_notebooks_show_a_gpu_run(gpu_results, name, monkeypatch):
    monkeypatch.setenv("SCCONV_BENCH_RESULTS", str(gpu_results.parent))  # the kernel inherits it
    executed = notebooks.execute(notebooks.NOTEBOOK_DIR / name)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs
    )
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert GPU in text and "CPU mode" not in text and "MISSING" not in text
    if name == "speed_vs_resnet.ipynb":
        assert f"results:  bench/results/{gpu_results.name}/" in text
        assert "triton is 3.00x faster than eager" in text
        assert len(images) >= 5
    else:
        assert "No GPU sweep" not in text and len(images) == 1
