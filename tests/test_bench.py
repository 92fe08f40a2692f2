"""Tests of the benchmark harness (bench/): CSV schema, plots from small CSVs, the categorising of
profiler events, the correctness pass, the sweep's table handling, and bench/gpu.sh's dry run.

Speed is never asserted. Everything runs on the CPU (the Triton kernels through the interpreter,
on tiny shapes); the GPU-only paths are exercised by bench/gpu.sh on a GPU.
"""

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import scconv
from bench import check, common, gating, models, plots, summary, sweep
from kernels.reference import nearest_source_index, sc_gate_reference

REPO = Path(__file__).resolve().parent.parent
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


# --------------------------------------------------------------------------------------------
# common


@NO_CUDA
def test_metadata_has_every_column_and_labels_the_cpu_timer():
    meta = common.metadata("cpu")
    assert tuple(meta) == common.META_COLUMNS
    assert meta["device"] == "cpu" and meta["gpu_name"] == "none"
    assert meta["timer"] == common.TIMER_CPU and "CPU" in meta["timer"]
    assert meta["torch"] == torch.__version__
    with pytest.raises(RuntimeError, match="no CUDA device"):
        common.metadata("cuda")
    with pytest.raises(ValueError, match="device must be"):
        common.metadata("tpu")


def test_git_commit_of_this_checkout_and_of_a_copied_tree(tmp_path, monkeypatch):
    monkeypatch.setenv("SCCONV_BENCH_COMMIT", "0123abcd")
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert common.git_commit().removesuffix("+dirty") == head  # a real repository wins
    assert common.git_commit(tmp_path) == "0123abcd (copied tree)"  # no .git: the given commit
    monkeypatch.delenv("SCCONV_BENCH_COMMIT")
    assert common.git_commit(tmp_path) == "unknown"


def test_slugify_names_a_directory():
    assert common.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    with pytest.raises(ValueError, match="directory name"):
        common.slugify("  ")


def test_write_csv_is_atomic(tmp_path):
    path = tmp_path / "out.csv"
    common.write_csv([{"a": 1, "b": 2.5}], path)
    assert pd.read_csv(path).to_dict("records") == [{"a": 1, "b": 2.5}]

    class Unprintable:
        def __str__(self):
            raise RuntimeError("cannot format")

        __repr__ = __str__
        __format__ = None

    with pytest.raises(RuntimeError, match="cannot format"):
        common.write_csv([{"a": Unprintable()}], path)
    # The failed write left the old file whole and no temporary file behind.
    assert pd.read_csv(path).to_dict("records") == [{"a": 1, "b": 2.5}]
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_time_cpu_quantiles_are_ordered():
    calls = []
    timing = common.time_cpu(lambda: calls.append(sum(range(2000))), rep_ms=5, min_reps=5)
    assert timing.timer == common.TIMER_CPU
    assert 0 < timing.ms_p20 <= timing.ms <= timing.ms_p80
    assert len(calls) >= 6  # one warm-up call plus at least min_reps timed ones
    with pytest.raises(ValueError, match="min_reps"):
        common.time_cpu(lambda: None, min_reps=0)


def test_time_cuda_calls_do_bench_as_the_installed_triton_defines_it(monkeypatch):
    # The CUDA timer's call, checked against the installed triton.testing.do_bench's signature
    # (3.6 on the GPU machine: run this file with it first on PYTHONPATH), without a GPU.
    import inspect

    import triton.testing

    signature = inspect.signature(triton.testing.do_bench)
    calls = []

    def do_bench(*args, **kwargs):
        calls.append(signature.bind(*args, **kwargs).arguments)
        return [2.0, 1.5, 3.0]  # what do_bench returns for quantiles (0.5, 0.2, 0.8)

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    timing = common.time_fn(lambda: None, "cuda", warmup_ms=5, rep_ms=20, max_reps=3)
    assert (timing.ms, timing.ms_p20, timing.ms_p80) == (2.0, 1.5, 3.0)
    assert timing.timer == common.TIMER_CUDA
    assert calls[0]["quantiles"] == list(common.QUANTILES)
    assert (calls[0]["warmup"], calls[0]["rep"]) == (5, 20)
    # A call slower than rep_ms / min_reps stretches the span to hold min_reps calls.
    common.time_cuda(lambda: time.sleep(0.01), rep_ms=20, min_reps=10)
    assert calls[1]["rep"] >= 1.2 * 10 * 10


def test_time_fn_refuses_unknown_device():
    with pytest.raises(ValueError, match="device must be"):
        common.time_fn(lambda: None, "xla")


def test_budget_and_dtype_names():
    assert common.Budget(None).allows(1e9)
    assert not common.Budget(0).allows()
    with pytest.raises(ValueError, match="budget"):
        common.Budget(-1)
    assert common.dtype_name(common.dtype_from_name("bf16")) == "bf16"
    with pytest.raises(ValueError, match="unknown dtype"):
        common.dtype_from_name("fp8")


def test_time_cpu_reports_the_median_and_the_20th_and_80th_percentiles(monkeypatch):
    durations = iter([0.0] + [d / 1e3 for d in (5, 1, 9, 11, 2, 7, 3, 10, 4, 6, 8)])
    clock = [0.0]

    def fn():
        clock[0] += next(durations)

    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    t = common.time_cpu(fn, warmup_ms=0, rep_ms=0, min_reps=11, max_reps=11)
    # 1..11 ms: linear-interpolated quantiles 6 (median), 3 (p20), 9 (p80); the mean is 6 too,
    # so also check a skewed set below.
    assert (t.ms, t.ms_p20, t.ms_p80) == pytest.approx((6.0, 3.0, 9.0))
    durations = iter([0.0] + [d / 1e3 for d in (1, 1, 1, 1, 100)])
    t = common.time_cpu(fn, warmup_ms=0, rep_ms=0, min_reps=5, max_reps=5)
    assert t.ms == pytest.approx(1.0)  # the median, not the mean (20.8)


def test_copy_bandwidth_counts_read_plus_write_in_decimal_gb(monkeypatch):
    timing = common.Timing(ms=2.0, ms_p20=1.0, ms_p80=4.0, timer=common.TIMER_CPU)
    monkeypatch.setattr(common, "time_fn", lambda fn, device, **kw: (fn(), timing)[1])
    bw = common.copy_bandwidth("cpu", nbytes=4096)
    moved = 2 * 4096
    assert bw["copy_bytes"] == moved
    assert bw["copy_gbps"] == pytest.approx(moved / 2.0 / 1e6)
    assert bw["copy_gbps_p20"] == pytest.approx(moved / 4.0 / 1e6)  # slowest time, lowest GB/s
    assert bw["copy_gbps_p80"] == pytest.approx(moved / 1.0 / 1e6)
    assert bw["copy_ms"] == 2.0


def test_metadata_takes_the_runs_timestamp(monkeypatch):
    monkeypatch.setenv("SCCONV_BENCH_TIMESTAMP", "2030-01-02T03:04:05+00:00")
    assert common.run_timestamp() == "2030-01-02T03:04:05+00:00"
    assert common.metadata("cpu")["timestamp"] == "2030-01-02T03:04:05+00:00"
    assert common.metadata("cpu", timestamp="T0")["timestamp"] == "T0"


def test_git_commit_is_dirty_for_code_changes_only(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                       check=True, capture_output=True)  # fmt: skip

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-q", "-m", "c")
    clean = common.git_commit(tmp_path)
    assert clean and "+dirty" not in clean
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "gating.csv").write_text("a\n1\n")
    assert common.git_commit(tmp_path) == clean  # results are not code
    (tmp_path / "a.py").write_text("x = 2\n")
    assert common.git_commit(tmp_path) == clean + "+dirty"


# --------------------------------------------------------------------------------------------
# CSV schemas (bench.common.CSV_SCHEMAS): every CSV the benchmarks write, from small runs


def test_check_columns_names_what_is_wrong(tmp_path):
    good = [*common.CSV_SCHEMAS["bandwidth.csv"]]
    common.check_columns("bandwidth.csv", reversed(good))  # order is free
    with pytest.raises(ValueError, match=r"missing column\(s\) \['copy_ms'\]"):
        common.check_columns("bandwidth.csv", [c for c in good if c != "copy_ms"])
    with pytest.raises(ValueError, match=r"unexpected column\(s\) \['colour'\]"):
        common.check_columns("bandwidth.csv", [*good, "colour"])
    with pytest.raises(ValueError, match=r"duplicated \['copy_ms'\]"):
        common.check_columns("bandwidth.csv", [*good, "copy_ms"])
    with pytest.raises(ValueError, match="no schema"):
        common.check_columns("colours.csv", good)
    sweep_columns = [c for c in common.CSV_SCHEMAS["sweep.csv"] if not c.endswith("*")]
    with pytest.raises(ValueError, match=r"missing column\(s\) \['cfg_\*'\]"):
        common.check_columns("sweep.csv", sweep_columns)
    common.check_columns("sweep.csv", [*sweep_columns, "cfg_BLOCK_C"])
    # write_csv refuses a known file with the wrong columns, and writes nothing.
    with pytest.raises(ValueError, match="does not match its schema"):
        common.write_csv([{"copy_ms": 1.0}], tmp_path / "bandwidth.csv")
    assert list(tmp_path.iterdir()) == []


def test_committed_results_match_their_schemas():
    directories = sorted(d for d in common.RESULTS_DIR.iterdir() if d.is_dir())
    assert common.RESULTS_DIR / "cpu" in directories
    for directory in directories:
        for csv in sorted(directory.glob("*.csv")):
            common.check_columns(csv.name, pd.read_csv(csv, nrows=1).columns)
    committed = {p.name for p in (common.RESULTS_DIR / "cpu").glob("*.csv")}
    # The CPU run writes every CSV but the sweep's (interpreter) and the skipped-case list.
    assert committed == set(common.CSV_SCHEMAS) - {"sweep.csv", "models_skipped.csv"}


@pytest.fixture
def one_thread():
    """One torch thread: two OpenMP threads on a shared 2-core machine wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_model(name, gate, device, layout):
    """A one-block-per-stage stand-in for ``models.build_model`` (same classes, far fewer ops)."""
    import torchvision

    if name.startswith("scnet"):
        model = scconv.SCNet(layers=(1, 1, 1, 1), num_classes=10, gate=None if gate == "none"
                             else gate)  # fmt: skip
    else:
        model = torchvision.models.resnet.ResNet(
            torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], num_classes=10
        )
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return model.to(device=device, memory_format=memory_format)


@NO_CUDA
def test_models_csvs_match_their_schemas(tmp_path, monkeypatch, one_thread):
    # The real run on tiny stand-ins: models.csv, breakdown.csv, aten_ops.csv (counted on the
    # meta device for the named model), then model_summary.csv and models_skipped.csv.
    monkeypatch.setattr(models, "build_model", _tiny_model)
    path = models.run(tmp_path, device="cpu", models=("scnet50", "resnet50"),
                      regimes=("eager",), tasks=("inference",), batches=(2,), image_size=112,
                      rep_ms=1)  # fmt: skip
    assert path == tmp_path / "models.csv"
    models.write_model_summary(tmp_path, ("resnet50",), image_size=112)
    case = models.Case("resnet50", "none", "eager", "train", "fp32", "nchw", 2, 112)
    common.write_csv([vars(case)], tmp_path / "models_skipped.csv")  # as models.run writes it
    written = sorted(p.name for p in tmp_path.glob("*.csv"))
    assert written == ["aten_ops.csv", "breakdown.csv", "bytes_moved.csv", "model_summary.csv",
                       "models.csv", "models_skipped.csv"]  # fmt: skip
    # The profiled step of each breakdown variant as a Chrome trace, no temporary file left.
    assert sorted(p.name for p in tmp_path.glob("*.gz")) == [
        common.trace_name("resnet50", models.NO_GATE), common.trace_name("scnet50", "eager")
    ]  # fmt: skip
    assert not list(tmp_path.glob(".*"))
    for name in written:
        common.check_columns(name, pd.read_csv(tmp_path / name).columns)
    frame = pd.read_csv(path)
    assert frame.set_index("model")["time_ratio_vs_resnet"]["resnet50"] == 1.0


@NO_CUDA
def test_correctness_csv_matches_its_schema(tmp_path):
    tiny = gating.GatingShape("tiny 5x3 <- 2x1", 2, 5, 3, 2, 1, {})
    path = check.run(tmp_path, device="cpu", shapes=(tiny,))
    frame = pd.read_csv(path)
    common.check_columns("gating_correctness.csv", frame.columns)
    assert len(frame) == 4 * len(common.TOLERANCES) * len(gating.LAYOUTS)
    assert frame["passed"].all() and frame["interpreter"].all()


# --------------------------------------------------------------------------------------------
# gating


def test_minimal_bytes_counts_the_fused_traffic():
    shape = gating.GatingShape("s", 2, 8, 8, 2, 2, {})
    n, n2 = 2 * 2 * 8 * 8, 2 * 2 * 2 * 2
    assert gating.minimal_bytes(shape, 2, 2, "forward") == 2 * (3 * n + n2)
    assert gating.minimal_bytes(shape, 2, 4, "backward") == 4 * (5 * n + 2 * n2)
    assert gating.minimal_bytes(shape, 2, 4, "forward+backward") == 4 * (8 * n + 3 * n2)
    with pytest.raises(ValueError, match="unknown mode"):
        gating.minimal_bytes(shape, 2, 4, "sideways")


def _gating_sites(model, size):
    """(C, H, W, h, w) -> count, of every SC-Conv gating in one forward on the meta device."""
    sites = {}

    def record(module, args, output):
        x = args[0]
        key = (x.shape[1], x.shape[2], x.shape[3], output.shape[2], output.shape[3])
        sites[key] = sites.get(key, 0) + 1

    for module in model.modules():
        if isinstance(module, scconv.SCConv):
            module.k2.register_forward_hook(record)
    model(torch.empty(1, 3, size, size, device="meta"))
    return sites


@pytest.mark.parametrize("name", ["scnet50", "scnet101"])
def test_gating_shapes_are_the_models_own(name):
    with torch.device("meta"):
        model = scconv.create_model(name).eval()
    sites = _gating_sites(model, 224)
    table = {}
    for shape in gating.GATING_SHAPES:
        key = (shape.C, shape.H, shape.W, shape.h, shape.w)
        table[key] = table.get(key, 0) + shape.blocks[name]
    assert table == sites


def test_gating_csv_schema(tmp_path):
    path = gating.run(
        tmp_path,
        device="cpu",
        providers=("eager",),
        shapes=gating.TINY_SHAPES,
        warmup_ms=0,
        rep_ms=1,
    )
    frame = pd.read_csv(path)
    common.check_columns("gating.csv", frame.columns)
    common.check_columns("bandwidth.csv", pd.read_csv(tmp_path / "bandwidth.csv").columns)
    assert sorted(frame["mode"]) == sorted(gating.MODES)
    assert (frame["timer"] == common.TIMER_CPU).all()
    assert (frame["ms_p20"] <= frame["ms"]).all() and (frame["ms"] <= frame["ms_p80"]).all()
    # GB/s and % of copy follow from the byte count, the time and the measured copy bandwidth.
    gbps = frame["minimal_bytes"] / frame["ms"] / 1e6
    assert gbps.round(6).tolist() == frame["gbps"].round(6).tolist()
    assert (frame["pct_of_copy"] - 100 * frame["gbps"] / frame["copy_gbps"]).abs().max() < 1e-9


def test_gating_refuses_to_time_the_interpreter(tmp_path):
    with pytest.raises(ValueError, match="interpreter"):
        gating.run(tmp_path, device="cpu", providers=("triton",), shapes=gating.TINY_SHAPES)
    with pytest.raises(ValueError, match="unknown provider"):
        gating.run(tmp_path, device="cpu", providers=("numpy",), shapes=gating.TINY_SHAPES)


@pytest.mark.slow
def test_gating_torch_compile_provider_runs(tmp_path):
    # layer1 at batch 1: large enough for Inductor to donate buffers to the backward, which the
    # repeated backward of the "backward" mode must survive.
    path = gating.run(
        tmp_path,
        device="cpu",
        providers=("torch_compile",),
        shapes=gating.GATING_SHAPES[:1],
        warmup_ms=0,
        rep_ms=1,
    )
    frame = pd.read_csv(path)
    assert len(frame) == 3 and (frame["provider"] == "torch_compile").all()


def test_gating_goes_on_after_a_failing_measurement_then_fails(tmp_path, monkeypatch):
    real_mode_fn = gating.mode_fn

    def backward_breaks(fn, mode, *tensors):
        if mode == "backward":
            raise RuntimeError("compiled backward broke")
        return real_mode_fn(fn, mode, *tensors)

    monkeypatch.setattr(gating, "mode_fn", backward_breaks)
    with pytest.raises(RuntimeError, match=r"(?s)1 measurement.*backward broke"):
        gating.run(tmp_path, device="cpu", providers=("eager",), shapes=gating.TINY_SHAPES,
                   warmup_ms=0, rep_ms=1)  # fmt: skip
    frame = pd.read_csv(tmp_path / "gating.csv")
    assert sorted(frame["mode"]) == ["forward", "forward+backward"]


def test_gating_modes_compute_the_reference_gradients():
    x, k2, k3, g = gating.make_inputs(gating.TINY_SHAPES[0], 2, torch.float64, "nchw", "cpu")
    run, _ = gating.mode_fn(sc_gate_reference, "backward", x, k2, k3, g)
    grads = run()
    inputs = [t.detach().requires_grad_() for t in (x, k2, k3)]
    expected = torch.autograd.grad(sc_gate_reference(*inputs), inputs, g)
    for actual, wanted in zip(grads, expected, strict=True):
        torch.testing.assert_close(actual, wanted)
    x_cl, *_ = gating.make_inputs(gating.TINY_SHAPES[0], 2, torch.float32, "channels_last", "cpu")
    assert x_cl.is_contiguous(memory_format=torch.channels_last) and not x_cl.is_contiguous()


def test_gating_rows_count_the_dtypes_bytes_and_the_runs_copy(tmp_path):
    layer3 = gating.GATING_SHAPES[4]
    assert layer3.blocks == {"scnet50": 5, "scnet101": 22}
    path = gating.run(
        tmp_path, device="cpu", providers=("eager",), modes=("forward",), batches=(1,),
        dtypes=("bf16",), shapes=(layer3,), warmup_ms=0, rep_ms=1,
    )  # fmt: skip
    row = pd.read_csv(path).iloc[0]
    bandwidth = pd.read_csv(tmp_path / "bandwidth.csv").iloc[0]
    assert row["minimal_bytes"] == gating.minimal_bytes(layer3, 1, 2, "forward")  # bf16: 2 bytes
    assert row["copy_gbps"] == pytest.approx(bandwidth["copy_gbps"])  # the median copy
    assert (row["blocks_scnet50"], row["blocks_scnet101"]) == (5, 22)


# --------------------------------------------------------------------------------------------
# check (Triton interpreter, correctness only)


def test_exact_gate_uses_the_float32_index_map():
    # H = 74 from h = 24: F.interpolate's float64 map differs from its float32 one (measured).
    shape = gating.GatingShape("s", 2, 74, 74, 24, 24, {})
    x, k2, k3, _ = gating.make_inputs(shape, 1, torch.float32, "nchw", "cpu")
    exact = check.exact_gate(x.double(), k2.double(), k3.double())
    torch.testing.assert_close(exact.float(), sc_gate_reference(x, k2, k3))
    plain_double = sc_gate_reference(x.double(), k2.double(), k3.double())
    assert (plain_double - exact).abs().max() > 0.1  # the float64 map really differs here


@pytest.mark.parametrize("src, dst", [(24, 74), (14, 46), (16, 82), (45, 129), (2, 7), (1, 7),
                                      (7, 7), (56, 224)])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nearest_source_index_is_pytorchs_low_precision_map(src, dst, dtype):
    # Images of source row and column numbers (< 256: exact in bf16), upsampled by PyTorch.
    rows = torch.arange(src, dtype=dtype).view(1, 1, src, 1).expand(1, 1, src, src)
    up_rows = F.interpolate(rows.contiguous(), size=(dst, dst), mode="nearest")[0, 0].long()
    up_cols = F.interpolate(rows.transpose(2, 3).contiguous(), size=(dst, dst))[0, 0].long()
    index = nearest_source_index(dst, src)
    assert index.dtype == torch.int64 and index.shape == (dst,)
    assert torch.equal(up_rows, index.view(-1, 1).expand(dst, dst))
    assert torch.equal(up_cols, index.view(1, -1).expand(dst, dst))
    with pytest.raises(ValueError, match="sizes must be"):
        nearest_source_index(0, src)


@NO_CUDA  # the Triton kernels through the interpreter, on CPU tensors
def test_check_passes_the_triton_gate_on_small_shapes():
    rows = []
    for dtype, layout in (("fp32", "nchw"), ("bf16", "channels_last")):
        rows += check.check_case(check.CHECK_SHAPES[0], 2, dtype, layout, "cpu")
    assert len(rows) == 8
    failed = [r for r in rows if not r["passed"]]
    assert not failed, failed


def test_check_skips_shapes_past_its_budget(tmp_path, capsys):
    path = check.run(tmp_path, device="cpu", shapes=check.CHECK_SHAPES[:2], budget_s=0)
    assert path.name == "gating_correctness.csv" and not path.exists()
    check.main(["--out", str(tmp_path), "--quick", "--budget-s", "0"])
    assert "nothing checked" in capsys.readouterr().out


def test_check_catches_a_wrong_gate():
    shape = gating.GatingShape("s", 2, 46, 46, 14, 14, {})

    def integer_index_gate(x, k2, k3):
        # (i * h) // H instead of PyTorch's float32 map: wrong at row 23 (design notes).
        rows = torch.arange(x.shape[2]) * k2.shape[2] // x.shape[2]
        cols = torch.arange(x.shape[3]) * k2.shape[3] // x.shape[3]
        return k3 * torch.sigmoid(x + k2[:, :, rows][:, :, :, cols])

    def slightly_off_gate(x, k2, k3):
        return sc_gate_reference(x, k2, k3) * 1.001

    for impl in (integer_index_gate, slightly_off_gate):
        rows = check.check_case(shape, 1, "fp32", "nchw", "cpu", impl=impl)
        assert not all(r["passed"] for r in rows), impl.__name__
    assert all(r["passed"] for r in check.check_case(shape, 1, "fp32", "nchw", "cpu",
                                                       impl=sc_gate_reference))  # fmt: skip


def test_check_adds_the_scnet_shapes_on_a_gpu(tmp_path, monkeypatch):
    from bench import check

    checked = []
    monkeypatch.setattr(check, "metadata", lambda device: {"timer": ""})
    monkeypatch.setattr(check, "check_case",
                        lambda shape, *a: checked.append(shape.stage) or [])  # fmt: skip
    check.run(tmp_path, device="cuda")
    stages = list(dict.fromkeys(checked))
    assert stages == [s.stage for s in (*check.CHECK_SHAPES, *gating.GATING_SHAPES)]


# --------------------------------------------------------------------------------------------
# sweep (interpreter: plumbing only)


@NO_CUDA  # the Triton kernels through the interpreter, on CPU tensors
def test_sweep_writes_one_winner_per_kernel_and_never_the_kernels_table(tmp_path):
    from kernels import configs

    before = configs.TUNED_TABLE_PATH.read_bytes() if configs.TUNED_TABLE_PATH.exists() else None
    path = sweep.run(
        tmp_path,
        device="cpu",
        shapes=gating.TINY_SHAPES,
        batches=(1,),
        dtypes=("fp32",),
        layouts=("nchw",),
        all_configs=True,
        max_configs=2,
    )
    frame = pd.read_csv(path)
    common.check_columns("sweep.csv", frame.columns)
    assert (frame["search"] == sweep.SEARCH_ALL).all()
    # One cfg_ column per meta-parameter of the kernels swept.
    meta_parameters = {p for k in configs.KERNELS for p in configs.META_PARAMETERS[k]}
    assert {c for c in frame.columns if c.startswith("cfg_")} == {
        f"cfg_{p}" for p in meta_parameters
    }
    assert len(frame) == 4 and frame["correct"].all()
    assert frame.groupby("kernel")["winner"].sum().to_dict() == {"backward": 1, "forward": 1}
    assert (frame["timer"] == sweep.TIMER_INTERPRETER).all()
    table = configs.load_table(tmp_path / "tuned_configs.json")
    (key,) = frame["table_key"].unique()
    for kernel in ("forward", "backward"):
        winner = frame[(frame.kernel == kernel) & frame.winner]["config"].item()
        entry = table["interpreter"][kernel][key]
        assert sweep.config_name(configs.entry_to_config(kernel, entry)) == winner
    after = configs.TUNED_TABLE_PATH.read_bytes() if configs.TUNED_TABLE_PATH.exists() else None
    assert before == after
    with pytest.raises(ValueError, match="must not go into"):
        sweep.run(tmp_path, device="cpu", shapes=gating.TINY_SHAPES,
                  table_path=configs.TUNED_TABLE_PATH)  # fmt: skip
    assert plots.plot_sweep(path, tmp_path / "heat.png").stat().st_size > 0


@NO_CUDA  # the Triton kernels through the interpreter, on CPU tensors
def test_sweep_records_a_configuration_the_gpu_cannot_run_and_goes_on(tmp_path, monkeypatch):
    from triton.runtime.errors import OutOfResources

    import kernels.gate

    first = sweep.config_name(kernels.configs.search_space("forward")[0])
    real_forward = kernels.gate.gate_forward

    def forward_out_of_shared_memory(x, k2, k3, config=None):
        if sweep.config_name(config) == first:
            raise OutOfResources(232448, 227 * 1024, "shared memory")
        return real_forward(x, k2, k3, config=config)

    monkeypatch.setattr(kernels.gate, "gate_forward", forward_out_of_shared_memory)
    path = sweep.run(tmp_path, device="cpu", kernels_to_tune=("forward",),
                     shapes=gating.TINY_SHAPES, batches=(1,), dtypes=("fp32",),
                     layouts=("nchw",), all_configs=True, max_configs=2)  # fmt: skip
    frame = pd.read_csv(path).set_index("config")
    assert not frame.loc[first, "correct"] and pd.isna(frame.loc[first, "ms"])
    assert not frame.loc[first, "winner"]
    (winner,) = frame.index[frame["winner"]]
    assert winner != first and frame.loc[winner, "correct"]


@NO_CUDA  # the Triton kernels through the interpreter, on CPU tensors
def test_sweep_times_the_layout_family_by_default(tmp_path, monkeypatch):
    """By default each case times what the run-time autotuner would (the launch's pruned
    configurations), not the whole search space; the ``search`` column says so."""
    from kernels import codegen, configs

    # Layer1's channels: C = 32 fits several channel tiles (a smaller C would keep only the
    # smallest fallback tile). Timed without launching (the interpreter would take minutes).
    shape = gating.GatingShape("probe", 32, 16, 16, 4, 4, {"scnet50": 1, "scnet101": 1})
    timed = {}

    def record(kernel, search, inputs, dtype, timing):
        timed[kernel] = [sweep.config_name(c) for c in search]
        channel = {sweep.config_name(c) for c in configs._channel_configs(kernel)}
        assert 1 < len(timed[kernel]) < len(configs.search_space(kernel)), kernel
        assert set(timed[kernel]) <= channel, kernel  # channels_last: the channel family only
        pruned = codegen.pruned_configs(kernel, *inputs[:3])
        assert timed[kernel] == [sweep.config_name(c) for c in pruned], kernel
        return [{"kernel": kernel, "config": timed[kernel][0], "cfg_BLOCK_C": 1,
                 "num_warps": 4, "num_stages": 3, "ms": 1.0, "ms_p20": 1.0, "ms_p80": 1.0,
                 "correct": True, "_config": search[0]}]  # fmt: skip

    monkeypatch.setattr(sweep, "time_configs", record)
    path = sweep.run(tmp_path, device="cpu", shapes=(shape,), batches=(1,), dtypes=("fp32",),
                     layouts=("channels_last",))  # fmt: skip
    assert set(timed) == {"forward", "backward"}
    frame = pd.read_csv(path)
    assert (frame["search"] == sweep.SEARCH_FAMILY).all()
    assert (frame["layout"] == "channels_last").all()


def test_sweep_tunes_the_model_benchmark_headline_first():
    """A budget that runs out should leave the least used cases untuned: bf16 channels_last at
    every batch first, fp16 (which the model benchmark never runs) last."""
    assert sweep.SWEEP_LAYOUTS[0] == "channels_last"
    assert sorted(sweep.SWEEP_LAYOUTS) == sorted(gating.LAYOUTS)
    assert sweep.SWEEP_DTYPES == ("bf16", "fp32", "fp16")
    cases = list(sweep.cases(gating.GATING_SHAPES[:1], sweep.SWEEP_BATCHES, sweep.SWEEP_DTYPES,
                             sweep.SWEEP_LAYOUTS))  # fmt: skip
    order = [(dtype, batch, layout) for _, batch, dtype, layout, _ in cases]
    assert order[:4] == [("bf16", 256, "channels_last"), ("bf16", 256, "nchw"),
                         ("bf16", 32, "channels_last"), ("bf16", 32, "nchw")]  # fmt: skip
    assert [dtype for dtype, _, _ in order[-4:]] == ["fp16"] * 4


def test_sweep_cases_are_deduplicated_by_table_key():
    shapes = (gating.GATING_SHAPES[0], gating.GATING_SHAPES[0])
    cases = list(sweep.cases(shapes, (4,), ("bf16",), ("nchw", "channels_last")))
    assert len(cases) == 2
    assert {c[-1].split("|")[-1] for c in cases} == {"contiguous", "channels_last"}


@NO_CUDA
def test_sweep_winner_is_the_fastest_correct_median(tmp_path, monkeypatch):
    import kernels.gate
    from kernels import configs

    names = {k: [sweep.config_name(c) for c in configs.search_space(k)[:3]]
             for k in ("forward", "backward")}  # fmt: skip
    # (ms, p20): config 0 has the lowest p20 but the slowest median; config 1 is the fastest
    # but its forward result is wrong; config 2 wins.
    times = [(3.0, 0.5), (1.0, 0.9), (2.0, 1.9)]

    def fake_time(launch, device, **kw):
        name = sweep.config_name(launch.__defaults__[0])
        kernel = "forward" if name in names["forward"] else "backward"
        ms, p20 = times[names[kernel].index(name)]
        return common.Timing(ms, p20, ms, common.TIMER_CPU)

    real_forward = kernels.gate.gate_forward

    def forward(x, k2, k3, config=None):
        out = real_forward(x, k2, k3, config=config)
        return out * 1.01 if sweep.config_name(config) == names["forward"][1] else out

    monkeypatch.setattr(sweep, "time_fn", fake_time)
    monkeypatch.setattr(kernels.gate, "gate_forward", forward)
    path = sweep.run(
        tmp_path, device="cpu", shapes=gating.TINY_SHAPES, batches=(1,), dtypes=("fp32",),
        layouts=("nchw",), all_configs=True, max_configs=3,
    )  # fmt: skip
    frame = pd.read_csv(path)
    winners = frame[frame.winner].set_index("kernel")["config"].to_dict()
    assert winners == {"forward": names["forward"][2], "backward": names["backward"][1]}
    table = configs.load_table(tmp_path / "tuned_configs.json")["interpreter"]
    for kernel, winner in winners.items():
        (entry,) = table[kernel].values()
        assert sweep.config_name(configs.entry_to_config(kernel, entry)) == winner
    shape = gating.TINY_SHAPES[0]
    for _, r in frame.iterrows():
        assert r["gbps"] == pytest.approx(
            gating.minimal_bytes(shape, 1, 4, r["kernel"]) / r["ms"] / 1e6
        )


# --------------------------------------------------------------------------------------------
# models


def test_plan_cases_puts_the_headline_first_and_follows_the_regime_dict(monkeypatch):
    cases = models.plan_cases(
        ("scnet50", "resnet50"), ("eager", "triton"), ("eager", "torch_compile"),
        ("inference", "train"), ("amp_bf16", "fp32"), ("channels_last",), (256, 32), 224,
        compile_models=("resnet50",),
    )  # fmt: skip
    # SCNets once per gate, ResNets with no gate; compiling only the listed models.
    assert {(c.model, c.gate) for c in cases} == {
        ("scnet50", "eager"), ("scnet50", "triton"), ("resnet50", "none")
    }  # fmt: skip
    assert all(c.model == "resnet50" for c in cases if c.regime == "torch_compile")
    # The headline precision first; there, eager at every batch before compiled.
    headline = [c for c in cases if c.precision == "amp_bf16"]
    assert cases[: len(headline)] == headline
    assert [c.regime for c in headline] == sorted((c.regime for c in headline),
                                                  key=["eager", "torch_compile"].index)  # fmt: skip
    compiled_tasks = {
        c.task
        for c in models.plan_cases(("resnet50",), ("eager",), ("eager", "torch_compile"),
                                   models.TASKS, ("fp32",), ("nchw",), (2,), 128,
                                   compile_tasks=("inference",))
        if c.regime == "torch_compile"
    }  # fmt: skip
    assert compiled_tasks == {"inference"}
    # A new regime is one dict entry away (e.g. issue 6's "optimized").
    extra = models.Regime("optimized", models._as_is, ("inference",), "test", compiles=False)
    monkeypatch.setitem(models.REGIMES, "optimized", extra)
    cases = models.plan_cases(("resnet50",), ("eager",), ("optimized",), models.TASKS,
                              ("fp32",), ("nchw",), (2,), 128)  # fmt: skip
    assert [(c.regime, c.task) for c in cases] == [("optimized", "inference")]


def test_plan_cases_on_a_gpu_puts_the_quoted_ratios_first():
    # The GPU grid (316 cases) never fits the budget of bench/gpu.sh: what runs first must be
    # what issues 4 and 6 quote, SCNet-50 / ResNet-50 at bf16, channels_last, batch 256, 32, 1.
    settings = models._defaults("cuda")
    cases = models.plan_cases(**settings)
    assert not [c for c in cases if c.task == "train" and c.batch == 1]
    assert [c for c in cases if c.task == "inference" and c.batch == 1]

    def headline_setting(c):
        return c.precision == "amp_bf16" and c.layout == "channels_last"

    main = [c for c in cases if c.model in ("scnet50", "resnet50") and headline_setting(c)]
    eager_main = [c for c in main if not models.REGIMES[c.regime].compiles]
    # 3 variants (SCNet-50 per gate, ResNet-50) x (eager: inference at 3 batches, train at 2;
    # optimized: inference at 3).
    assert len(eager_main) == 24
    assert cases[:24] == eager_main
    # Inference at every batch (eager and optimized: 3 x 2 x 3 = 18 cases) before training.
    assert [c.task for c in cases[:18]] == ["inference"] * 18
    assert {(c.regime, c.batch) for c in cases[:18]} == {
        (r, b) for r in ("eager", "optimized") for b in (256, 32, 1)
    }  # fmt: skip
    compiled_first_batch = [c for c in main if c not in eager_main and c.batch == 256]
    assert cases[24:30] == compiled_first_batch
    assert all(headline_setting(c) for c in cases[: sum(map(headline_setting, cases))])
    # Each SCNet-50 [eager] case is followed by its ResNet-50 pair.
    for i, c in enumerate(cases[:30]):
        if (c.model, c.gate) == ("scnet50", "eager"):
            pair = cases[i + 1]
            assert (pair.model, pair.regime, pair.task, pair.batch) == (
                "resnet50", c.regime, c.task, c.batch
            )  # fmt: skip


@NO_CUDA
def test_models_go_on_after_a_failing_case_then_fail(tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(models, "build_model", _tiny_model)
    real_measure = models.measure

    def scnet_breaks(case, *args):
        if case.model == "scnet50":
            raise RuntimeError("Inductor could not compile it")
        return real_measure(case, *args)

    monkeypatch.setattr(models, "measure", scnet_breaks)
    monkeypatch.setattr(models, "_write_op_counts", lambda *args: None)
    monkeypatch.setattr(models, "_write_bytes_moved", lambda *args: None)
    with pytest.raises(RuntimeError, match=r"(?s)1 measurement\(s\) failed.*scnet50.*Inductor"):
        models.run(tmp_path, device="cpu", models=("scnet50", "resnet50"), regimes=("eager",),
                   tasks=("inference",), batches=(2,), image_size=64, rep_ms=1,
                   breakdown=False)  # fmt: skip
    assert pd.read_csv(tmp_path / "models.csv")["model"].tolist() == ["resnet50"]


@NO_CUDA
def test_models_run_every_setting_of_the_gpu_grid(tmp_path, monkeypatch, one_thread):
    # bf16 autocast, channels_last, batch 1, the optimized regime, training: settings only the
    # GPU grid uses, run here on tiny stand-ins (the eager gate; compiling regimes aside).
    monkeypatch.setattr(models, "build_model", _tiny_model)
    grid = dict(models=("scnet50", "resnet50"), gates=("eager",), regimes=("eager", "optimized"),
                tasks=models.TASKS, precisions=("amp_bf16", "fp32"),
                layouts=("channels_last", "nchw"), batches=(2, 1), image_size=112)  # fmt: skip
    path = models.run(tmp_path, device="cpu", rep_ms=1, breakdown=False, **grid)
    frame = pd.read_csv(path)
    assert len(frame) == len(models.plan_cases(**grid)) == 40  # none failed, none skipped
    assert frame["time_ratio_vs_resnet"].notna().all()
    assert not (tmp_path / "models_skipped.csv").exists()


def test_ratio_columns_divide_by_the_matching_resnet():
    rows = []
    for model, gate, ms in (("resnet50", "none", 10.0), ("scnet50", "eager", 13.0),
                            ("scnet50", "triton", 12.0), ("scnet101", "eager", 20.0)):  # fmt: skip
        rows.append(dict(model=model, gate=gate, regime="eager", task="train", precision="fp32",
                         layout="nchw", batch=2, image_size=128, ms=ms))  # fmt: skip
    rows.append({**rows[0], "batch": 4, "ms": 30.0})  # another batch: not a baseline for batch 2
    frame = models.add_ratio_columns(pd.DataFrame(rows))
    keys = zip(frame.model, frame.gate, frame.batch, strict=True)
    ratio = dict(zip(keys, frame.time_ratio_vs_resnet, strict=True))
    assert ratio[("resnet50", "none", 2)] == 1.0
    assert ratio[("scnet50", "eager", 2)] == pytest.approx(1.3)
    assert ratio[("scnet50", "triton", 2)] == pytest.approx(1.2)
    assert pd.isna(ratio[("scnet101", "eager", 2)])  # no ResNet-101 row measured
    assert frame.loc[1, "throughput_ratio_vs_resnet"] == pytest.approx(10 / 13)


def test_models_refuse_bad_grids(tmp_path):
    with pytest.raises(ValueError, match="unknown models"):
        models.run(tmp_path, device="cpu", models=("vgg16",))
    with pytest.raises(ValueError, match="interpreter"):
        models.run(tmp_path, device="cpu", gates=("triton",))
    with pytest.raises(TypeError, match="unknown grid argument"):
        models.run(tmp_path, device="cpu", colour="red")
    with pytest.raises(ValueError, match="training needs a batch of at least 2"):
        models.run(tmp_path, device="cpu", tasks=("train",), batches=(1,))
    with pytest.raises(ValueError, match="the grid holds no case"):
        models.run(tmp_path, device="cpu", models=())
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "module, argv, message",
    [
        ("models", ["--models", "vgg16"], "argument --models: unknown value(s) vgg16; valid:"),
        ("models", ["--batches", "2,0"], "argument --batches: expected whole numbers >= 1"),
        ("models", ["--gates", "triton"], "gate 'triton' on the CPU would time the Triton"),
        ("models", ["--tasks", "train", "--batches", "1"], "the grid holds no case"),
        ("models", ["--budget-s", "-5"], "argument --budget-s: expected a number >= 0"),
        ("models", ["--device", "cuda"], "--device cuda: this machine has no CUDA device"),
        ("gating", ["--dtypes", "fp64"], "argument --dtypes: unknown value(s) fp64"),
        ("gating", ["--providers", "triton"], "provider 'triton' on the CPU"),
        ("gating", ["--rep-ms", "0"], "argument --rep-ms: expected a number > 0"),
        ("sweep", ["--kernels", "fwd"], "argument --kernels: unknown value(s) fwd"),
        ("sweep", ["--max-configs", "0"], "argument --max-configs: expected a whole number >= 1"),
        ("check", ["--out", "{file}"], "argument --out: '{file}' cannot be a folder"),
        ("check", ["--out", "{file}/sub"], "cannot be a folder ({file} is a file)"),
        ("opcount", ["--device", "cuda"], "--device cuda: this machine has no CUDA device"),
        ("opcount", ["--breakdown", "resnet18"], "unknown model(s) resnet18"),
        ("opcount", ["--batch", "0"], "--size and --batch must be positive"),
        ("opcount", ["--channels-last"], "--dtype and --channels-last go with --bytes"),
        ("__main__", ["--out", "{dir}", "--skip", "model"], "argument --skip: unknown value(s)"),
        ("__main__", ["--out", "{dir}", "--threads", "0"], "argument --threads: expected a"),
        ("__main__", ["--out", "{file}"], "argument --out: '{file}' cannot be a folder"),
    ],
)
def test_bench_clis_refuse_bad_values(tmp_path, capsys, monkeypatch, module, argv, message):
    """A bad value is a usage error naming the option (exit 2), before anything runs, not a
    traceback from inside the run."""
    import importlib

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    file = tmp_path / "a-file"
    file.write_text("")
    paths = {"file": str(file), "dir": str(tmp_path / "out")}
    argv = [a.format(**paths) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"bench.{module}").main(argv)
    assert exit_info.value.code == 2
    assert message.format(**paths) in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing written


@pytest.mark.parametrize("gpu, dry_run", [(True, False), (False, False), (False, True)])
def test_every_stage_takes_the_arguments_bench_gives_it(tmp_path, monkeypatch, gpu, dry_run):
    """Each bench stage python -m bench plans (GPU, CPU, dry run) parses its arguments, with a
    spent budget of 0 seconds (what a stage gets once the budget is gone): a refusal there would
    fail the one GPU run a session gets."""
    import importlib

    from bench import __main__ as orchestrator

    class Parsed(Exception):
        pass

    def parsed(*args, **kwargs):
        raise Parsed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "write_model_summary", parsed)
    planned = orchestrator.plan(tmp_path, gpu, dry_run)
    stages = [s for s in planned if s.args[0].startswith("bench.")]
    assert {s.name for s in stages} >= {"check", "gating", "models"}
    for stage in stages:
        module = importlib.import_module(stage.args[0])
        monkeypatch.setattr(module, "run", parsed)
        budget = ["--budget-s", "0"] if stage.share else []
        with pytest.raises(Parsed):
            module.main([*stage.args[1:], *budget])
    for text in ("-1", "nan", "inf", "soon"):
        with pytest.raises(Exception, match="expected a number >= 0"):
            common.seconds_left(text)


def test_cuda_graph_regime_is_opt_in_and_gpu_only(tmp_path):
    """optimized_cuda_graph replays CUDA graphs: outside the default grid (a GPU run's minutes
    go to the issues' ratios), refused on the CPU, and its wrapper refuses CPU inputs."""
    assert "optimized_cuda_graph" in models.REGIMES
    assert "optimized_cuda_graph" not in models._defaults("cuda")["regimes"]
    assert "optimized_cuda_graph" not in models._defaults("cpu")["regimes"]
    with pytest.raises(ValueError, match="optimized_cuda_graph run on a GPU only"):
        models.run(tmp_path, device="cpu", regimes=("optimized_cuda_graph",))
    graphed = models.CUDAGraphForward(torch.nn.Identity())
    with pytest.raises(ValueError, match="replays on a GPU: got an input on cpu"):
        graphed(torch.ones(2))
    assert not list(tmp_path.iterdir())


def test_breakdown_attributes_gating_cat_and_backward_by_sequence_number(tmp_path, one_thread):
    import torchvision

    torch.manual_seed(0)
    tiny_scnet = scconv.SCNet(layers=(1, 1, 1, 1), num_classes=10)
    tiny_resnet = torchvision.models.resnet.ResNet(
        torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], num_classes=10
    )
    case = models.Case("tiny", "eager", "eager", "train", "fp32", "nchw", 2, 128)
    trace = tmp_path / "trace_tiny.json.gz"
    breakdown = models.op_breakdown(tiny_scnet, case, "cpu", 1, trace=trace)
    rows = {(r["pass"], r["category"]): r for r in breakdown}
    # 4 SC-Convs: 4 gating ops each (interpolate, add, sigmoid, mul), one cat per block.
    assert rows[("forward", "gating")]["n_ops"] == 16
    assert rows[("forward", "cat")]["n_ops"] == 4
    # 4 blocks x 7 convolutions (conv1_a, conv1_b, k1, k2, k3, k4, conv3), stem, 4 downsamples
    assert rows[("forward", "convolution")]["n_ops"] == 4 * 7 + 1 + 4
    # Backward nodes of the gating ops found through their forward sequence numbers.
    assert rows[("backward", "gating")]["n_ops"] == 16
    assert rows[("backward", "cat")]["n_ops"] == 4
    for pass_ in ("forward", "backward"):
        shares = sum(r["share_pct"] for (p, _), r in rows.items() if p == pass_)
        assert shares == pytest.approx(100.0)
        assert rows[(pass_, "convolution")]["time_ms"] > 0
    # The trace holds the profiled step, with the forward, backward and SC-Conv ranges.
    with gzip.open(trace, "rt") as f:
        names = [e.get("name") for e in json.load(f)["traceEvents"]]
    assert names.count(models.FORWARD_RANGE) == names.count(models.BACKWARD_RANGE) == 1
    assert names.count(models.SCCONV_RANGE) == 4
    assert "aten::convolution" in names
    assert [p.name for p in tmp_path.iterdir()] == [trace.name]  # no partial file left
    resnet_rows = models.op_breakdown(tiny_resnet, case, "cpu", 1)
    # ResNet's residual add is not gating: nothing is, and nothing is cat.
    for r in resnet_rows:
        if r["category"] in ("gating", "cat"):
            assert r["n_ops"] == 0 and r["time_ms"] == 0, r


def _event(name, children=(), seq=-1, device_us=0.0, cpu_us=0.0, device_type=None,
           annotation=False):  # fmt: skip
    from types import SimpleNamespace

    event = SimpleNamespace(
        name=name, cpu_children=list(children), cpu_parent=None, sequence_nr=seq,
        self_device_time_total=device_us, self_cpu_time_total=cpu_us,
        device_type=device_type or torch.autograd.DeviceType.CPU,
        time_range=SimpleNamespace(elapsed_us=lambda: device_us),
        is_user_annotation=annotation,
    )  # fmt: skip
    for child in event.cpu_children:
        child.cpu_parent = event
    return event


@pytest.mark.parametrize("annotated", [False, True])
def test_categorize_events_on_gpu_profiles_counts_kernel_time_once(annotated):
    # A GPU-shaped profile: CPU ops with their kernels' self time, kernel events as roots.
    conv = _event("aten::conv2d", [_event("aten::cudnn_convolution", device_us=5.0)], seq=1)
    sigmoid = _event("aten::sigmoid", seq=2, device_us=3.0)
    residual = _event("aten::add_", seq=3, device_us=1.0)
    scconv_range = _event(models.SCCONV_RANGE, [sigmoid])
    forward = _event(models.FORWARD_RANGE, [conv, scconv_range, residual])
    sigmoid_backward = _event(
        "autograd::engine::evaluate_function: SigmoidBackward0",
        [_event("SigmoidBackward0", [_event("aten::sigmoid_backward", device_us=2.0)])],
        seq=2,
    )
    add_backward = _event("autograd::engine::evaluate_function: AddBackward0", seq=3)
    cuda = torch.autograd.DeviceType.CUDA
    kernels = [
        _event(f"kernel{i}", device_us=us, device_type=cuda)
        for i, us in enumerate((5.0, 3.0, 1.0, 2.0, 4.0))  # 4 us launched outside any op
    ]
    if annotated:
        # With CUDA activities each record_function range also appears on the GPU timeline
        # (gpu_user_annotation), spanning its kernels, and may be tied to its CPU range as if
        # it were a kernel of its own: none of that is more GPU work.
        kernels += [
            _event(models.FORWARD_RANGE, device_us=9.0, device_type=cuda, annotation=True),
            _event(models.SCCONV_RANGE, device_us=3.0, device_type=cuda, annotation=True),
            _event(models.BACKWARD_RANGE, device_us=2.0, device_type=cuda, annotation=True),
        ]
        forward.self_device_time_total = 9.0
        scconv_range.self_device_time_total = 3.0
    events = [forward, *forward.cpu_children, conv, *conv.cpu_children, sigmoid,
              sigmoid_backward, add_backward, *kernels]  # fmt: skip
    rows = {(r["pass"], r["category"]): r for r in models.categorize_events(events, True)}
    assert rows[("forward", "convolution")]["time_ms"] == pytest.approx(0.005)
    assert rows[("forward", "gating")]["time_ms"] == pytest.approx(0.003)
    assert rows[("forward", "other")]["time_ms"] == pytest.approx(0.001)
    assert rows[("backward", "gating")]["time_ms"] == pytest.approx(0.002)
    assert rows[("backward", "other")]["n_ops"] == 1  # the residual add's backward
    assert rows[("both", "unattributed")]["time_ms"] == pytest.approx(0.004)


def test_ratio_pairs_only_the_same_task_precision_and_layout():
    rows, expected = [], {}
    ms = 10.0
    for task in ("inference", "train"):
        for precision in ("amp_bf16", "fp32"):
            for layout in ("channels_last", "nchw"):
                base = dict(regime="eager", task=task, precision=precision, layout=layout,
                            batch=2, image_size=128)  # fmt: skip
                rows.append(dict(base, model="resnet50", gate="none", ms=ms))
                rows.append(dict(base, model="scnet50", gate="eager", ms=2 * ms + 1))
                expected[(task, precision, layout)] = (2 * ms + 1) / ms
                ms += 10.0
    frame = models.add_ratio_columns(pd.DataFrame(rows))
    scnet = frame[frame.model == "scnet50"]
    for _, r in scnet.iterrows():
        assert r["time_ratio_vs_resnet"] == pytest.approx(
            expected[(r["task"], r["precision"], r["layout"])]
        )


@NO_CUDA
def test_measure_reports_images_per_second(monkeypatch, one_thread):
    timing = common.Timing(ms=4.0, ms_p20=3.0, ms_p80=5.0, timer=common.TIMER_CPU)
    monkeypatch.setattr(models, "time_fn", lambda *a, **k: timing)
    case = models.Case("resnet50", "none", "eager", "inference", "fp32", "nchw", 2, 32)
    row = models.measure(case, _tiny_model("resnet50", "none", "cpu", "nchw"), "cpu", {})
    assert row["img_per_s"] == pytest.approx(2 / 4.0 * 1e3)


@NO_CUDA
def test_op_breakdown_is_per_iteration(monkeypatch, one_thread):
    fixed = [{"pass": p, "category": c, "time_ms": 10.0, "n_ops": 4}
             for p in ("forward", "backward") for c in models.CATEGORIES]  # fmt: skip
    monkeypatch.setattr(models, "categorize_events", lambda events, use_device_time: fixed)
    case = models.Case("resnet50", "none", "eager", "train", "fp32", "nchw", 2, 32)
    rows = models.op_breakdown(_tiny_model("resnet50", "none", "cpu", "nchw"), case, "cpu", 2)
    assert {(r["time_ms"], r["n_ops"]) for r in rows} == {(5.0, 2)}


def test_breakdown_profiles_a_trainable_batch_and_bytes_count_the_headline(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(models, "build_model", lambda *a: None)
    monkeypatch.setattr(models, "op_breakdown", lambda m, case, *a, **k: seen.append(case) or [])
    settings = dict(models._defaults("cuda"), gates=("eager",), batches=(1, 32))
    progress = common.Progress("t", 1)
    models._run_breakdown(tmp_path, {}, settings, "cpu", progress, [])
    assert {c.batch for c in seen} == {models.MIN_TRAIN_BATCH}
    import bench.opcount

    asked = {}

    def bytes_table(names, **kwargs):
        asked.update(kwargs)
        raise RuntimeError("recorded")

    monkeypatch.setattr(bench.opcount, "bytes_table", bytes_table)
    settings = dict(models._defaults("cuda"))  # batches (256, 32, 1), amp_bf16, channels_last
    with pytest.raises(RuntimeError, match="recorded"):
        models._write_bytes_moved(tmp_path, {}, settings)
    assert (asked["batch"], asked["dtype"], asked["layout"]) == (256, "bf16", "channels_last")


@NO_CUDA
def test_models_budget_keeps_a_margin_and_the_slowest_cost(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_write_op_counts", lambda *a: None)
    monkeypatch.setattr(models, "_write_bytes_moved", lambda *a: None)
    monkeypatch.setattr(models, "build_model", lambda *a: None)

    def fake_measure(case, model, device, timing):
        time.sleep(0.3 if case.model == "scnet50" else 0.05)
        return dict(vars(case), ms=1.0, ms_p20=1.0, ms_p80=1.0, img_per_s=1.0,
                    peak_mem_mib=float("nan"), first_call_s=0.0, cudnn_benchmark=False)  # fmt: skip

    monkeypatch.setattr(models, "measure", fake_measure)
    spent_seen = []
    real_estimate = models._estimate
    monkeypatch.setattr(models, "_estimate",
                        lambda case, device, spent: spent_seen.append(spent) or real_estimate(
                            case, device, spent))  # fmt: skip
    grid = dict(models=("scnet50", "resnet50"), regimes=("eager",), tasks=("inference",),
                batches=(2,), image_size=64)  # fmt: skip
    models.run(tmp_path, device="cpu", breakdown=False, **grid)
    spent = spent_seen[-1]
    assert spent[(False, "inference")] == max(spent[(False, "inference", "scnet50")],
                                              spent[(False, "inference", "resnet50")])  # fmt: skip
    # 6 s guessed per case: a budget of 7 s holds it, but not its 25 % margin.
    monkeypatch.setattr(models, "measure", lambda *a: pytest.fail("should be skipped"))
    models.run(tmp_path / "b", device="cpu", breakdown=False, budget_s=7, **grid)
    assert len(pd.read_csv(tmp_path / "b" / "models_skipped.csv")) == 2


# --------------------------------------------------------------------------------------------
# plots and summary from small synthetic CSVs


def _synthetic_results(directory: Path) -> None:
    meta = common.metadata("cpu", timestamp="2026-01-01T00:00:00+00:00")
    gating_rows = []
    for shape in gating.GATING_SHAPES:
        for provider, ms in (("eager", 0.3), ("torch_compile", 0.2), ("triton", 0.1)):
            for mode in gating.MODES:
                nbytes = gating.minimal_bytes(shape, 32, 2, mode)
                gating_rows.append(dict(
                    provider=provider, mode=mode, stage=shape.stage, batch=32, C=shape.C,
                    H=shape.H, W=shape.W, h=shape.h, w=shape.w, dtype="bf16", layout="nchw",
                    blocks_scnet50=shape.blocks["scnet50"],
                    blocks_scnet101=shape.blocks["scnet101"], ms=ms, ms_p20=ms, ms_p80=ms,
                    first_call_s=0.1, minimal_bytes=nbytes, gbps=nbytes / ms / 1e6,
                    copy_gbps=100.0, pct_of_copy=nbytes / ms / 1e6, **meta,
                ))  # fmt: skip
    common.write_csv(gating_rows, directory / "gating.csv")
    model_rows = []
    for model, gate, ms in (("resnet50", "none", 10.0), ("scnet50", "eager", 12.0)):
        for regime in ("eager", "torch_compile"):
            for task in models.TASKS:
                model_rows.append(dict(
                    model=model, gate=gate, regime=regime, task=task, precision="fp32",
                    layout="nchw", batch=2, image_size=128, ms=ms, ms_p20=ms, ms_p80=ms,
                    img_per_s=200 / ms, peak_mem_mib=float("nan"), first_call_s=1.0,
                    cudnn_benchmark=False, **meta,
                ))  # fmt: skip
    common.write_csv(models.add_ratio_columns(pd.DataFrame(model_rows)), directory / "models.csv")
    breakdown_rows = [
        dict(model=model, gate=gate, precision="fp32", layout="nchw", batch=2, image_size=128,
             time_source="CPU self time", **{"pass": pass_}, category=category, time_ms=1.0,
             n_ops=1, share_pct=20.0, **meta)
        for model, gate in (("scnet50", "eager"), ("resnet50", "none"))
        for pass_ in ("forward", "backward")
        for category in models.CATEGORIES
    ]  # fmt: skip
    common.write_csv(breakdown_rows, directory / "breakdown.csv")


def test_plots_are_drawn_from_small_csvs(tmp_path):
    _synthetic_results(tmp_path)
    written = plots.plot_all(tmp_path)
    assert sorted(p.name for p in written) == [
        "breakdown.png", "gating_latency.png", "gating_roof.png", "models_ratio.png",
        "models_throughput.png",
    ]  # fmt: skip
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # No temporary files left, and the device is in every title.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    frame = pd.read_csv(tmp_path / "gating.csv")
    figure = plots.plot_gating_latency(frame)  # no path: the figure itself (notebooks)
    assert "CPU mode" in figure._suptitle.get_text()


def test_plots_reject_a_csv_without_the_needed_columns(tmp_path):
    with pytest.raises(ValueError, match="missing column"):
        plots.plot_gating_latency(pd.DataFrame({"provider": ["eager"]}), tmp_path / "x.png")


def test_summary_reports_the_whole_network_gating_and_ratios(tmp_path):
    _synthetic_results(tmp_path)
    text = summary.summarize(tmp_path)
    assert "CPU MODE" in text
    # SCNet-50's 16 gates at 0.1 ms each for triton, 0.3 for eager.
    assert "sum over its 16 gates" in text
    assert "triton 1.600 ms" in text and "eager 4.800 ms" in text
    assert "3.00x vs eager" in text
    assert "scnet50 [eager]" in text and "1.20" in text
    assert "no results found" in summary.summarize(tmp_path / "empty")
    assert "noisy" not in text  # p20 = p80 = median


def test_summary_marks_noisy_model_measurements(tmp_path):
    _synthetic_results(tmp_path)
    frame = pd.read_csv(tmp_path / "models.csv")
    noisy = (frame["model"] == "scnet50") & (frame["task"] == "train")
    noisy &= frame["regime"] == "eager"
    frame.loc[noisy, "ms_p80"] = frame.loc[noisy, "ms"] * 1.3  # p20-p80 spans 30 % of the median
    frame.to_csv(tmp_path / "models.csv", index=False)
    text = summary.summarize(tmp_path)
    marked = [line for line in text.splitlines() if line.endswith("<-- noisy")]
    assert len(marked) == 1 and "scnet50" in marked[0] and "train" in marked[0], text
    assert "30%  <-- noisy" in marked[0] and "1 above 20%" in text


def test_summary_and_plots_cli_on_missing_or_empty_folders(tmp_path, capsys):
    for main in (summary.main, plots.main):
        with pytest.raises(SystemExit) as exit_info:
            main([str(tmp_path / "missing")])
        assert exit_info.value.code == 2 and "missing is not a directory" in capsys.readouterr().err
    plots.main([str(tmp_path)])  # an empty folder: says so instead of printing nothing
    assert "no plots" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("log", "expected"),
    [
        ("....\n120 passed, 3 skipped in 95.21s (0:01:35)\n", "120 passed, 3 skipped in 95.21s"),
        ("== 2 failed, 5 passed in 3.00s ==\n", ": 2 failed, 5 passed in 3.00s  <-- FAILURES"),
        ("t.py::a\n\n7 tests collected in 0.52s\n", "7 tests collected in 0.52s"),
        ("FAILED t.py::a - 1 passed in 3s\n[ 40%]\n", "no result line"),
        ("", "no result line"),
    ],
)
def test_summary_reports_the_tests_stage(tmp_path, log, expected):
    assert summary.test_result(tmp_path) is None  # no tests stage ran: no line
    (tmp_path / "pytest.log").write_text(log)
    line = summary.test_result(tmp_path)
    assert line.startswith("tests (pytest.log): ") and expected in line
    assert ("<--" in line) == ("failed" in log or not log or "[ 40%]" in log)
    assert line in summary.summarize(tmp_path)  # also with no CSV at all


def test_summary_spread_is_p80_minus_p20(tmp_path):
    _synthetic_results(tmp_path)
    frame = pd.read_csv(tmp_path / "models.csv")
    frame["ms_p20"] = frame["ms"] * 0.85
    frame["ms_p80"] = frame["ms"] * 1.1  # (p80 - p20) / ms = 25 %: noisy; (p80 - ms) / ms = 10 %
    frame.to_csv(tmp_path / "models.csv", index=False)
    assert summary.summarize(tmp_path).count("<-- noisy") == len(frame)


def test_summary_flags_a_test_run_with_errors(tmp_path):
    (tmp_path / "pytest.log").write_text("3 passed, 1 error in 2.00s\n")
    assert summary.test_result(tmp_path).endswith("<-- FAILURES")


def test_readme_models_table_lists_scnets_only(tmp_path):
    _synthetic_results(tmp_path)
    text = summary.readme_tables(tmp_path)
    assert "| scnet50 [eager] | eager | inference |" in text
    assert "| resnet50 | eager |" not in text


def test_models_subset_is_the_first_rows_precision(tmp_path):
    rows = [dict(model="resnet50", gate="none", regime="eager", task="inference", precision=p,
                 layout="nchw", batch=2, ms=1.0, img_per_s=1.0, image_size=224)
            for p in ("amp_bf16", "fp32")]  # fmt: skip
    _, label = plots.models_subset(pd.DataFrame(rows))
    assert label.startswith("amp_bf16,")


def test_sweep_heat_map_is_relative_to_each_cases_best(tmp_path):
    common_ = dict(kernel="forward", table_key="k", stage="s", batch=1, dtype="fp32", layout="nchw")
    rows = [dict(common_, config=c, ms=ms, correct=True) for c, ms in (("a", 2.0), ("b", 4.0))]
    figure = plots.plot_sweep(pd.DataFrame(rows))
    values = sorted(figure.axes[0].images[0].get_array().ravel().tolist())
    assert values == [1.0, 2.0]


def test_gpu_plan_runs_the_cuda_test_files_first(tmp_path):
    from bench import __main__ as orchestrator

    stages = orchestrator.plan(tmp_path, gpu=True, dry_run=False, tests_s=99)
    first = stages[0]
    assert (first.name, first.log_file, first.cap_s) == ("tests", "pytest.log", 99)
    assert first.args[0] == "pytest" and "--collect-only" not in first.args
    files = [a for a in first.args if a.startswith("tests/")]
    assert files == list(orchestrator.GPU_TEST_FILES)
    for name in files:  # they exist and hold every test marked cuda
        assert (REPO / name).is_file()
    marked = {f.name for f in (REPO / "tests").glob("test_*.py")
              if re.search(r"^@pytest\.mark\.cuda$", f.read_text(), re.MULTILINE)}  # fmt: skip
    assert marked <= {Path(name).name for name in files}
    assert [s.name for s in orchestrator.plan(tmp_path, True, False, 0)][0] == "summary"
    assert "tests" not in [s.name for s in orchestrator.plan(tmp_path, False, False, 99)]
    dry = orchestrator.plan(tmp_path, gpu=False, dry_run=True)[0]
    assert dry.name == "tests" and "--collect-only" in dry.args
    with pytest.raises(SystemExit) as refused:
        orchestrator.main(["--out", str(tmp_path), "--tests-s", "-1"])
    assert refused.value.code == 2
    with pytest.raises(ValueError, match="log_file and capture"):
        orchestrator.Stage("x", [], capture="a.txt", log_file="a.log")


_SLOW_TESTS = """
import time

def test_quick():
    pass

def test_slow():
    time.sleep(120)
"""


@pytest.mark.parametrize("workers", [1, 2], ids=["one_process", "xdist"])
def test_a_test_run_past_its_cap_still_reports_what_passed(workers, tmp_path, capfd):
    # The tests stage as planned on a GPU, over a file whose second test outlasts the cap:
    # pytest is stopped with SIGINT, so it still lists the outcomes and prints its result line.
    from bench import __main__ as orchestrator

    if workers > 1:
        pytest.importorskip("xdist", reason="pytest-xdist (the GPU machine has it) not installed")
    (tmp_path / "test_slow_file.py").write_text(_SLOW_TESTS)
    files = [str(tmp_path / "test_slow_file.py")]
    stage = orchestrator.tests_stage(10, False, files=files, workers=workers)
    assert ("-n" in stage.args) == (workers > 1)
    status, seconds = orchestrator.run_stage(stage, tmp_path, dict(os.environ), None, None)
    assert status == orchestrator.CAPPED and seconds < 10 + orchestrator.STOP_GRACE_S
    log = (tmp_path / "pytest.log").read_text()
    # pytest -v prints "FILE::test PASSED"; with pytest-xdist, "[gw0] [ 50%] PASSED FILE::test".
    passed = re.search(r"test_quick PASSED|PASSED \S*test_slow_file\.py::test_quick", log)
    assert passed and "KeyboardInterrupt" in log, log
    line = summary.test_result(tmp_path)
    assert "1 passed" in line and line.endswith("then STOPPED  <-- INCOMPLETE"), line
    assert "stopping it (SIGINT)" in capfd.readouterr().err


def test_a_stage_started_with_sigint_ignored_gets_it_back(tmp_path, monkeypatch):
    """A shell starts background jobs with SIGINT ignored (``bench/gpu.sh OUT &``), and exec keeps
    it ignored: without run_stage's reset, the tests stage's pytest would not stop on the SIGINT
    that ends it at its cap, and would print no result line."""
    from bench import __main__ as orchestrator

    probe = "import signal\nprint('handler:', signal.getsignal(signal.SIGINT).__name__)\n"
    name = stage_module(tmp_path, monkeypatch, "sigint_probe", probe)
    stage = orchestrator.Stage("probe", [name], log_file="probe.log")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job
    try:
        status, _ = orchestrator.run_stage(stage, tmp_path, dict(os.environ), None, None)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert status == orchestrator.DONE
    assert (tmp_path / "probe.log").read_text().strip() == "handler: default_int_handler"


def test_a_stage_past_its_cap_is_stopped_and_the_run_goes_on(
    tmp_path, slow_stage, monkeypatch, capfd
):
    from bench import __main__ as orchestrator

    out = tmp_path / "out"
    stages = [
        orchestrator.Stage("slow", [slow_stage, "--out", str(out)], log_file="slow.log", cap_s=12),
        orchestrator.Stage("after", ["bench.summary", str(out)]),
    ]
    monkeypatch.setattr(orchestrator, "plan", lambda *args: stages)
    # 12 s: ample time for the stage to import torch and add its rows before the stop.
    status = orchestrator.main(["--out", str(out), "--deadline-s", "300"])
    captured = capfd.readouterr()
    assert status == 0, captured.err[-3000:]  # stopped at its cap is not a failure
    assert "STOPPED at its time cap: slow (12s)" in captured.out
    assert "not run" not in captured.out and "FAILED" not in captured.out
    assert "stage slow: its 12s cap reached, stopping it" in captured.err
    assert "stage after done" in captured.err  # the next stage ran
    # The stage's stdout and stderr went to its log as they came, and the log stays after the
    # stop; its last line is repeated in the run's log.
    lines = (out / "slow.log").read_text().strip().splitlines()
    assert "rows added" in lines and lines[-1].startswith("stopped by signal 15: 3 rows kept")
    assert f"=== bench: stage slow: {lines[-1]} (slow.log)" in captured.err
    assert pd.read_csv(out / "slow.csv")["i"].tolist() == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# stopping a stage: SIGTERM keeps the rows, python -m bench's deadline

# A stage that writes rows through a ResultWriter that would not flush them for an hour, then
# hangs (or, with --stubborn, also ignores SIGTERM).
_SLOW_STAGE = """
import signal, sys, time
from pathlib import Path
from bench.common import ResultWriter

out = Path(sys.argv[sys.argv.index("--out") + 1])
writer = ResultWriter(out / "slow.csv", {"note": "test"}, every_s=3600)
for i in range(3):
    writer.add({"i": i})  # the first add writes the file, the others wait for the next flush
if "--stubborn" in sys.argv:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("rows added", flush=True)
time.sleep(120)
"""


def stage_module(tmp_path, monkeypatch, name: str, source: str) -> str:
    """``name``, a module of ``source`` importable by stage processes (via $PYTHONPATH)."""
    modules = tmp_path / "modules"
    modules.mkdir(exist_ok=True)
    (modules / f"{name}.py").write_text(source)
    inherited = os.environ.get("PYTHONPATH")  # e.g. `make test-compat`'s older torch
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), str(modules),
                                                                   inherited])))  # fmt: skip
    return name


@pytest.fixture
def slow_stage(tmp_path, monkeypatch):
    """The module name of ``_SLOW_STAGE``, importable by stage processes."""
    return stage_module(tmp_path, monkeypatch, "slow_stage", _SLOW_STAGE)


def test_sigterm_writes_the_rows_a_stage_holds(tmp_path, slow_stage):
    process = subprocess.Popen([sys.executable, "-m", slow_stage, "--out", str(tmp_path)],
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "rows added"
        assert len(pd.read_csv(tmp_path / "slow.csv")) == 1  # only the first add was written
        process.terminate()
        assert process.wait(timeout=60) == -signal.SIGTERM  # it still dies of the signal
    finally:
        process.kill()
    assert pd.read_csv(tmp_path / "slow.csv")["i"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["modules", "slow.csv"]  # no temp file


def test_deadline_stops_a_stage_and_still_prints_the_summary_last(
    tmp_path, slow_stage, monkeypatch, capfd
):
    from bench import __main__ as orchestrator

    out = tmp_path / "out"
    stages = [orchestrator.Stage("slow", [slow_stage, "--out", str(out)]),
              orchestrator.Stage("after", [slow_stage, "--out", str(out)])]  # fmt: skip
    monkeypatch.setattr(orchestrator, "plan", lambda *args: stages)
    # 12 s: ample time for the stage to import torch and add its rows before the stop.
    status = orchestrator.main(["--out", str(out), "--deadline-s", "12"])
    captured = capfd.readouterr()
    assert status == 0, captured.err[-3000:]  # stopped at the deadline is not a failure
    lines = captured.out.strip().splitlines()
    assert any("scconv benchmark summary" in line for line in lines)
    assert lines[-1].startswith("total wall time")  # the summary is printed last
    assert "STOPPED at the deadline (12s): slow (the rows" in captured.out
    assert "not run (deadline passed): after" in captured.out
    assert "FAILED" not in captured.out
    assert "stage slow stopped at the deadline" in captured.err
    # The rows the stage held when it was stopped were written, whole.
    assert pd.read_csv(out / "slow.csv")["i"].tolist() == [0, 1, 2]
    assert not list(out.glob(".*.tmp"))
    assert (out / "summary.txt").read_text().strip().splitlines()[-1] == lines[-1]


_ORCHESTRATOR_WITH_SLOW_STAGE = """
import sys
from bench import __main__ as orchestrator

out = sys.argv[1]
orchestrator.plan = lambda *args: [orchestrator.Stage("slow", ["slow_stage", "--out", out])]
sys.exit(orchestrator.main(["--out", out]))
"""


def test_sigterm_to_the_run_stops_the_running_stage(tmp_path, slow_stage):
    # A timeout (or the device tool) signals python -m bench, not the stage, which runs in a
    # session of its own: the orchestrator must pass the stop on before it exits.
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "-c", _ORCHESTRATOR_WITH_SLOW_STAGE, str(out)],
                           cwd=REPO, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        for line in run.stderr:
            if line.strip() == "rows added":  # the stage's own output, through the run's
                break
        run.terminate()
        assert run.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        run.kill()
    # The stage got SIGTERM from the orchestrator: it wrote the rows it held.
    assert pd.read_csv(out / "slow.csv")["i"].tolist() == [0, 1, 2]


def test_a_failed_stage_leaves_no_earlier_results(tmp_path, monkeypatch, capfd):
    from bench import __main__ as orchestrator

    out = tmp_path / "out"
    out.mkdir()
    earlier = [out / "gating_correctness.csv", out / "gating.csv", out / "gating_latency.png"]
    for path in earlier:
        path.write_text("from an earlier run\n")
    kept = out / "models.csv"  # --skip models: an earlier run's models stay
    kept.write_text("from an earlier run\n")
    stages = [orchestrator.Stage("check", ["no_such_stage_module"]),
              orchestrator.Stage("gating", ["no_such_stage_module"]),
              orchestrator.Stage("models", ["no_such_stage_module"])]  # fmt: skip
    monkeypatch.setattr(orchestrator, "plan", lambda *args: stages)
    assert orchestrator.main(["--out", str(out), "--skip", "models"]) == 1
    assert "FAILED stages: check, gating" in capfd.readouterr().out
    assert not any(path.exists() for path in earlier) and kept.exists()


def test_a_stage_that_ignores_sigterm_is_killed(tmp_path, slow_stage, monkeypatch, capfd):
    from bench import __main__ as orchestrator

    monkeypatch.setattr(orchestrator, "STOP_GRACE_S", 1.0)
    stage = orchestrator.Stage("stubborn", [slow_stage, "--out", str(tmp_path), "--stubborn"])
    start = time.monotonic()
    status, _ = orchestrator.run_stage(stage, tmp_path, dict(os.environ), None, start + 8)
    assert status == orchestrator.STOPPED
    assert "still running 1s after SIGTERM: SIGKILL" in capfd.readouterr().err
    # Killed, so only the rows the writer had flushed itself are there.
    assert pd.read_csv(tmp_path / "slow.csv")["i"].tolist() == [0]


def _fake_orchestrator(monkeypatch, stages, costs, gpu=False):
    from bench import __main__ as orchestrator

    clock = [1000.0]
    calls = []

    def run_stage(stage, out, env, budget_s, deadline=None):
        calls.append((stage.name, budget_s, None if deadline is None else deadline - 1000.0))
        clock[0] += costs[stage.name]
        return orchestrator.DONE, costs[stage.name]

    monkeypatch.setattr(orchestrator, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(orchestrator, "plan", lambda *a: stages)
    monkeypatch.setattr(orchestrator, "run_stage", run_stage)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    return orchestrator, calls


def test_stage_budgets_are_shares_of_what_is_left_and_end_at_the_deadline(tmp_path, monkeypatch,
                                                                          capsys):  # fmt: skip
    from bench.__main__ import Stage

    stages = [Stage("a", ["x"], share=0.5), Stage("b", ["x"], share=1.0), Stage("c", ["x"])]
    orchestrator, calls = _fake_orchestrator(monkeypatch, stages, {"a": 40, "b": 10, "c": 1})
    orchestrator.main(["--out", str(tmp_path), "--budget-s", "100"])
    assert calls == [("a", 50.0, None), ("b", 60.0, None), ("c", None, None)]
    calls.clear()
    orchestrator.main(["--out", str(tmp_path), "--budget-s", "100", "--deadline-s", "70"])
    assert [c[1] for c in calls] == [50.0, 30.0, None]  # b: min(60 left, 30 to the deadline)
    calls.clear()
    orchestrator.main(["--out", str(tmp_path)])  # CPU mode: 480 s by default
    assert calls[0][1] == 240.0
    calls.clear()
    capsys.readouterr()
    orchestrator.main(["--out", str(tmp_path), "--deadline-s", "30"])  # a runs past it
    assert [c[0] for c in calls] == ["a"]
    assert "not run (deadline passed): b, c" in capsys.readouterr().out


def test_the_last_measuring_stage_takes_all_the_budget_left(tmp_path):
    from bench import __main__ as orchestrator

    for gpu in (True, False):
        measuring = [s for s in orchestrator.plan(tmp_path, gpu, False) if s.share]
        assert measuring[-1].name == "models" and measuring[-1].share == 1.0


def test_a_cap_past_the_deadline_does_not_extend_it(tmp_path, monkeypatch):
    from bench import __main__ as orchestrator

    name = stage_module(tmp_path, monkeypatch, "sleeper", "import time\ntime.sleep(30)\n")
    stage = orchestrator.Stage("s", [name], cap_s=100)
    deadline = time.monotonic() + 2
    status, seconds = orchestrator.run_stage(stage, tmp_path, dict(os.environ), None, deadline)
    assert status == orchestrator.STOPPED and seconds < 20


# --------------------------------------------------------------------------------------------
# bench/gpu.sh


def _gpu_sh(*args, timeout=600, python=sys.executable):
    env = {**os.environ, "PYTHON": python}
    env.pop("TRITON_INTERPRET", None)  # each stage decides for itself, as on a user's shell
    return subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@NO_CUDA
def test_gpu_sh_without_a_gpu_says_what_to_do(tmp_path):
    result = _gpu_sh(str(tmp_path / "out"))
    assert result.returncode == 2
    assert "no CUDA GPU" in result.stderr and "--dry-run" in result.stderr


def test_gpu_sh_names_what_its_python_lacks(tmp_path):
    bare = tmp_path / "bare-python"  # this Python without site-packages: no torch, no pandas
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')
    bare.chmod(0o755)
    for args in ([str(tmp_path / "out")], [str(tmp_path / "out"), "--dry-run"]):
        result = _gpu_sh(*args, python=str(bare))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "has no torch triton torchvision pandas matplotlib; set PYTHON" in result.stderr
    result = _gpu_sh(str(tmp_path / "out"), python=str(tmp_path / "no-such-python"))
    assert result.returncode == 2 and "cannot run" in result.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_sh_rejects_unknown_options():
    result = _gpu_sh("--fast")
    assert result.returncode == 2 and "unknown option" in result.stderr


@pytest.mark.slow
@NO_CUDA  # a CPU run; Triton 3.6's interpreter fails with the GPU machine's NumPy
def test_gpu_sh_dry_run_runs_the_whole_pipeline(tmp_path):
    out = tmp_path / "dry"
    result = _gpu_sh(str(out), "--dry-run")
    assert result.returncode == 0, result.stdout[-3000:]
    last = result.stdout.strip().splitlines()
    assert any("scconv benchmark summary" in line for line in last[-60:])
    assert last[-1].startswith("total wall time")  # the summary is printed last
    for name in ("gating.csv", "gating_correctness.csv", "models.csv", "breakdown.csv",
                 "sweep.csv", "model_summary.csv", "summary.txt", "log.txt",
                 "gating_latency.png", "models_ratio.png", "breakdown.png",
                 "sweep_heatmap.png", "trace_scnet50_eager.json.gz",
                 "trace_resnet50.json.gz"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    files_line = next(line for line in reversed(last) if line.startswith("files: "))
    assert "trace_resnet50.json.gz" in files_line
    for csv in out.glob("*.csv"):
        frame = pd.read_csv(csv)
        common.check_columns(csv.name, frame.columns)
        if "timestamp" in frame:  # one run, one timestamp across every stage
            assert frame["timestamp"].nunique() == 1
    correctness = pd.read_csv(out / "gating_correctness.csv")
    assert correctness["passed"].all() and correctness["interpreter"].all()
    # The tests stage only collects in a dry run; its count is in the summary.
    assert "tests collected in" in (out / "pytest.log").read_text()
    assert any(line.startswith("tests (pytest.log): ") and "collected" in line for line in last)
