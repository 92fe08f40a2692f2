"""Shared helpers of the benchmarks: run metadata, timing, copy bandwidth, CSV output, progress.

Every CSV row the benchmarks write carries the same metadata columns (``META_COLUMNS``): the
device, the GPU name, driver, CUDA, torch and triton versions, git commit and the run's timestamp,
and the timer that produced the number. Two timers exist and are never mixed in one row:

- ``TIMER_CUDA``: ``triton.testing.do_bench`` (CUDA events, warm-up excluded, L2 flushed before
  each call), median with 20th and 80th percentiles;
- ``TIMER_CPU``: ``time.perf_counter`` around each call on the CPU (CPU mode only; labelled so
  that a CPU number is never read as a GPU one), same three quantiles.

``triton`` is imported lazily: the interpreter switch ``TRITON_INTERPRET`` must be decided by the
caller before triton is first imported.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"

TIMER_CUDA = "cuda-events (triton.testing.do_bench)"
TIMER_CPU = "cpu perf_counter (CPU mode, not GPU speed)"
QUANTILES = (0.5, 0.2, 0.8)

META_COLUMNS = (
    "device",  # "cuda" or "cpu"
    "device_name",  # the GPU's name, or the CPU model in CPU mode: what plot titles show
    "gpu_name",  # torch.cuda.get_device_name(), "none" without a GPU
    "driver",  # NVIDIA driver version, "none" without a GPU
    "cuda",  # CUDA version torch was built with
    "torch",
    "triton",
    "cpu_threads",  # torch.get_num_threads() during the run
    "git_commit",
    "timestamp",  # start of the run, UTC, ISO 8601; identical for every row of one run
    "timer",
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (atol, rtol) of a Triton gating result (forward or backward) against float32-or-better math on
# the same rounded inputs: the correctness pass (bench.check) and the sweep's per-configuration
# check (bench.sweep) both use it. The kernels compute in float32 and round once, so the error is
# about half an ulp of the output dtype (fp16 4.9e-4, bf16 3.9e-3).
TOLERANCES = {"fp32": (1e-5, 1e-5), "fp16": (2e-3, 2e-3), "bf16": (1e-2, 1e-2)}

# The columns of every CSV the benchmarks write, by file name (the one place they are defined).
# ``write_csv`` checks a file named here before writing it. A name ending in "*" stands for one or
# more columns with that prefix (the sweep's ``cfg_<meta-parameter>`` columns, which depend on
# the kernels' search space).
_SHAPE = ("C", "H", "W", "h", "w")
_TIMING = ("ms", "ms_p20", "ms_p80")
_CASE = ("model", "gate", "regime", "task", "precision", "layout", "batch", "image_size")
CSV_SCHEMAS: dict[str, tuple[str, ...]] = {
    "gating.csv": (
        "provider", "mode", "stage", "batch", *_SHAPE, "dtype", "layout", "blocks_scnet50",
        "blocks_scnet101", *_TIMING, "first_call_s", "minimal_bytes", "gbps", "copy_gbps",
        "pct_of_copy", *META_COLUMNS,
    ),
    "bandwidth.csv": (
        "copy_bytes", "copy_gbps", "copy_gbps_p20", "copy_gbps_p80", "copy_ms", *META_COLUMNS,
    ),
    "gating_correctness.csv": (
        "case", "batch", *_SHAPE, "dtype", "layout", "tensor", "layout_kept", "max_abs_err",
        "err_over_tol", "eager_max_abs_err", "atol", "rtol", "passed", "interpreter",
        *META_COLUMNS,
    ),
    "sweep.csv": (
        "kernel", "config", "cfg_*", "num_warps", "num_stages", *_TIMING, "correct",
        "table_key", "stage", "batch", *_SHAPE, "dtype", "layout", "search", "gbps", "winner",
        *META_COLUMNS,
    ),
    "models.csv": (
        *_CASE, *_TIMING, "img_per_s", "peak_mem_mib", "first_call_s", "cudnn_benchmark",
        *META_COLUMNS, "baseline", "time_ratio_vs_resnet", "throughput_ratio_vs_resnet",
    ),
    "models_skipped.csv": _CASE,
    "breakdown.csv": (
        "pass", "category", "time_ms", "n_ops", "share_pct", "model", "gate", "precision",
        "layout", "batch", "image_size", "time_source", *META_COLUMNS,
    ),
    "aten_ops.csv": (
        "model", "original", "optimized", "optimized_triton_gate", "saved", *META_COLUMNS,
    ),
    "bytes_moved.csv": (
        "model", "original_gb", "optimized_gb", "saved", "optimized_vs_resnet", "batch", "dtype",
        "layout", "image_size", *META_COLUMNS,
    ),
    "model_summary.csv": ("model", "params_M", "GMACs", "input", *META_COLUMNS),
}  # fmt: skip

NO_GATE = "none"  # the gate column of models without SC-Conv (ResNets)


def trace_name(model_name: str, gate: str) -> str:
    """File name of the Chrome trace that the models stage writes for a profiled model and gate
    (``bench.models.op_breakdown``)."""
    suffix = "" if gate == NO_GATE else f"_{gate}"
    return f"trace_{model_name}{suffix}.json.gz"


# Every trace the models stage writes (SCNet-50 per gate, ResNet-50): the stage runner deletes
# them with the stage's other outputs before a new run.
TRACE_FILES = (
    trace_name("scnet50", "eager"), trace_name("scnet50", "triton"), trace_name("resnet50", NO_GATE)
)  # fmt: skip


def check_columns(name: str, columns: Iterable[str]) -> None:
    """Raise ``ValueError`` unless ``columns`` are exactly ``CSV_SCHEMAS[name]`` (in any order;
    a ``prefix*`` entry needs at least one column with that prefix)."""
    if name not in CSV_SCHEMAS:
        raise ValueError(f"no schema for {name!r}; known CSV files: {', '.join(CSV_SCHEMAS)}")
    columns = list(columns)
    schema = CSV_SCHEMAS[name]
    prefixes = tuple(c[:-1] for c in schema if c.endswith("*"))
    fixed = {c for c in schema if not c.endswith("*")}
    missing = sorted(fixed - set(columns))
    missing += [f"{p}*" for p in prefixes if not any(c.startswith(p) for c in columns)]
    extra = sorted(c for c in set(columns) - fixed if not c.startswith(prefixes))
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if missing or extra or duplicated:
        raise ValueError(
            f"{name} does not match its schema (bench.common.CSV_SCHEMAS): "
            f"missing column(s) {missing}, unexpected column(s) {extra}, duplicated {duplicated}"
        )


def csv_list(text: str) -> tuple[str, ...]:
    """A command-line list: ``"a,b,,c"`` -> ``("a", "b", "c")``."""
    return tuple(item for item in text.split(",") if item)


# argparse types: a bad value is a usage error naming the option ("python -m bench.models:
# error: argument --models: unknown value(s) foo; valid: ..."), not a traceback mid-run.
def csv_choices(valid: Iterable[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated list of at least one of ``valid``."""
    valid = tuple(valid)

    def parse(text: str) -> tuple[str, ...]:
        items = csv_list(text)
        bad = [item for item in items if item not in valid]
        if bad or not items:
            shown = f"unknown value(s) {', '.join(bad)}" if bad else "an empty list"
            raise argparse.ArgumentTypeError(f"{shown}; valid: {', '.join(valid)}")
        return items

    return parse


def positive_ints(text: str) -> tuple[int, ...]:
    """An argparse type: a comma-separated list of at least one whole number >= 1."""
    try:
        values = tuple(int(item) for item in csv_list(text))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 1, got {text!r}")
    return values


def positive_int(text: str) -> int:
    """An argparse type: one whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _finite_float(text: str, lowest: float, inclusive: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (value >= lowest if inclusive else value > lowest)):
        bound = f"{'>=' if inclusive else '>'} {lowest:g}"
        raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    return _finite_float(text, 0.0, inclusive=False)


def seconds_left(text: str) -> float:
    """An argparse type for budgets: a finite number of seconds >= 0 (``python -m bench``
    passes a stage 0 when its budget is spent; the stage then skips what it cannot fit)."""
    return _finite_float(text, 0.0, inclusive=True)


def output_folder(text: str) -> str:
    """An argparse type: a folder to write into, or a path where one can be made (no file)."""
    path = Path(text)
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                where = "" if existing == path else f" ({existing} is a file)"
                raise argparse.ArgumentTypeError(f"{text!r} cannot be a folder{where}")
            break
    return text


def require_device(device: str) -> str:
    """``device`` if this machine has it, else ``ValueError`` (``"cuda"`` without a GPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this machine has no CUDA device (PyTorch sees none)")
    return device


LAYOUT_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def memory_format_from_name(layout: str) -> torch.memory_format:
    """``"nchw"``/``"channels_last"`` -> torch memory format; anything else is a ``ValueError``."""
    if layout not in LAYOUT_FORMATS:
        raise ValueError(
            f"unknown layout {layout!r}; valid layouts are {', '.join(LAYOUT_FORMATS)}"
        )
    return LAYOUT_FORMATS[layout]


def dtype_from_name(name: str) -> torch.dtype:
    """``"fp32"``/``"fp16"``/``"bf16"`` -> torch dtype; anything else is a ``ValueError``."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid dtypes are {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> ``"fp32"``/``"fp16"``/``"bf16"``."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"no short name for dtype {dtype}")


def slugify(name: str) -> str:
    """A directory name for a device: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug:
        raise ValueError(f"cannot make a directory name from {name!r}")
    return slug


# --------------------------------------------------------------------------------------------
# Metadata


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _nvidia_driver() -> str:
    """The NVIDIA driver version from nvidia-smi; the CUDA driver API version if that fails."""
    try:
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        first = result.stdout.strip().splitlines()
        if first:
            return first[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        version = torch._C._cuda_getDriverVersion()  # e.g. 12040 for CUDA driver API 12.4
        return f"cuda-driver-api {version // 1000}.{version % 1000 // 10}"
    except (AttributeError, RuntimeError):
        return "unknown"


def git_commit(repo: Path = REPO_ROOT) -> str:
    """Commit hash of ``repo``, with ``+dirty`` when files outside ``bench/results`` differ from
    it or are new; "none" without commits. Outside a git repository (a tree copied to a GPU
    machine without its .git) ``$SCCONV_BENCH_COMMIT`` names the commit it was copied from, as
    "<hash> (copied tree)"; "unknown" without it."""
    commit = _git_commit(repo)
    copied_from = os.environ.get("SCCONV_BENCH_COMMIT", "").strip()
    if commit == "unknown" and copied_from:
        return f"{copied_from} (copied tree)"
    return commit


def _git_commit(repo: Path) -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=20,
        )
        if head.returncode != 0:
            # A repository without commits, or no repository at all (e.g. a copied tree).
            inside = subprocess.run(
                ["git", "rev-parse", "--git-dir"], cwd=repo, capture_output=True, timeout=20
            )
            return "none" if inside.returncode == 0 else "unknown"
        # Dirty: code that differs from the commit, tracked or new (results are not code).
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", ":(exclude)bench/results"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=20,
        )
        dirty = status.returncode != 0 or bool(status.stdout.strip())
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _triton_version() -> str:
    # importlib.metadata does not import triton, so the interpreter switch stays free.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:
        return "none"


@functools.cache
def _static_metadata(device: str) -> tuple[tuple[str, str], ...]:
    cuda = device == "cuda"
    gpu = torch.cuda.get_device_name() if cuda else "none"
    return (
        ("device", device),
        ("device_name", gpu if cuda else _cpu_model()),
        ("gpu_name", gpu),
        ("driver", _nvidia_driver() if cuda else "none"),
        ("cuda", torch.version.cuda or "none"),
        ("torch", torch.__version__),
        ("triton", _triton_version()),
        ("git_commit", git_commit()),
    )


def run_timestamp() -> str:
    """The run's timestamp: ``$SCCONV_BENCH_TIMESTAMP`` (set by ``python -m bench`` for all its
    stages) or now, UTC."""
    stamp = os.environ.get("SCCONV_BENCH_TIMESTAMP")
    if stamp:
        return stamp
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def metadata(device: str, timestamp: str | None = None) -> dict[str, object]:
    """The ``META_COLUMNS`` values for rows measured on ``device`` (``"cuda"`` or ``"cpu"``)."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("metadata for 'cuda' requested but no CUDA device is available")
    meta: dict[str, object] = dict(_static_metadata(device))
    meta["cpu_threads"] = torch.get_num_threads()
    meta["timestamp"] = timestamp or run_timestamp()
    meta["timer"] = TIMER_CUDA if device == "cuda" else TIMER_CPU
    return {column: meta[column] for column in META_COLUMNS}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_out_dir(device: str, results_dir: Path = RESULTS_DIR) -> Path:
    """``bench/results/cpu`` in CPU mode, ``bench/results/<gpu-name>`` on a GPU."""
    if device == "cpu":
        return results_dir / "cpu"
    return results_dir / slugify(torch.cuda.get_device_name())


# --------------------------------------------------------------------------------------------
# Timing


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20th/80th percentiles, and the timer used."""

    ms: float
    ms_p20: float
    ms_p80: float
    timer: str

    def as_row(self) -> dict[str, float]:
        return {"ms": self.ms, "ms_p20": self.ms_p20, "ms_p80": self.ms_p80}


def _quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    ordered = torch.tensor(sorted(samples), dtype=torch.float64)
    q = torch.quantile(ordered, torch.tensor(QUANTILES, dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def time_cuda(
    fn: Callable[[], object],
    *,
    warmup_ms: float = 25,
    rep_ms: float = 100,
    grad_to_none: Sequence[torch.Tensor] | None = None,
    min_reps: int = 1,
) -> Timing:
    """Time ``fn`` on the GPU with ``triton.testing.do_bench`` (CUDA events, L2 flushed).

    ``do_bench`` repeats ``fn`` for about ``rep_ms``; for calls slower than ``rep_ms / min_reps``
    (a training step) the span is stretched so that at least ``min_reps`` calls are timed.
    """
    import triton.testing

    if min_reps > 1:
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        rep_ms = max(rep_ms, 1.2 * min_reps * (time.perf_counter() - start) * 1e3)
    median, p20, p80 = triton.testing.do_bench(
        fn,
        warmup=warmup_ms,
        rep=rep_ms,
        grad_to_none=list(grad_to_none) if grad_to_none else None,
        quantiles=list(QUANTILES),
    )
    return Timing(float(median), float(p20), float(p80), TIMER_CUDA)


def time_cpu(
    fn: Callable[[], object],
    *,
    warmup_ms: float = 25,
    rep_ms: float = 100,
    min_reps: int = 3,
    max_reps: int = 1000,
) -> Timing:
    """Time ``fn`` on the CPU with ``time.perf_counter``: at least one warm-up call, then calls
    until ``rep_ms`` have passed (at least ``min_reps``, at most ``max_reps``)."""
    if min_reps < 1 or max_reps < min_reps:
        raise ValueError(f"need 1 <= min_reps <= max_reps, got {min_reps}, {max_reps}")
    start = time.perf_counter()
    fn()
    while (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_reps and (
        len(samples) < min_reps or (time.perf_counter() - start) * 1e3 < rep_ms
    ):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    median, p20, p80 = _quantiles(samples)
    return Timing(median, p20, p80, TIMER_CPU)


def time_fn(fn: Callable[[], object], device: str, **kwargs) -> Timing:
    """``time_cuda`` on ``"cuda"``, ``time_cpu`` on ``"cpu"``; options the other timer does not
    take (``grad_to_none``, ``max_reps``) are dropped."""
    if device == "cuda":
        kwargs.pop("max_reps", None)
        return time_cuda(fn, **kwargs)
    if device == "cpu":
        kwargs.pop("grad_to_none", None)
        return time_cpu(fn, **kwargs)
    raise ValueError(f"device must be 'cuda' or 'cpu', not {device!r}")


def copy_bandwidth(device: str, nbytes: int | None = None, **timing_kwargs) -> dict[str, float]:
    """Device-to-device copy bandwidth, GB/s (1e9 bytes/s), counting bytes read plus written.

    This is the roof the gating is compared with: a fused elementwise kernel cannot move bytes
    faster than ``dst.copy_(src)`` does. Defaults: 1 GiB on a GPU (far past the L2), 64 MiB on
    the CPU.
    """
    if nbytes is None:
        nbytes = (1 << 30) if device == "cuda" else (64 << 20)
    if nbytes < 4 or nbytes % 4:
        raise ValueError(f"nbytes must be a positive multiple of 4, got {nbytes}")
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, **timing_kwargs)
    moved = 2 * nbytes
    return {
        "copy_bytes": moved,
        "copy_gbps": moved / timing.ms / 1e6,
        # The slowest percentile gives the lowest bandwidth.
        "copy_gbps_p20": moved / timing.ms_p80 / 1e6,
        "copy_gbps_p80": moved / timing.ms_p20 / 1e6,
        "copy_ms": timing.ms,
    }


def peak_memory_mib(fn: Callable[[], object], device: str) -> float:
    """Peak CUDA memory allocated while running ``fn`` once, MiB; NaN on the CPU (not tracked)."""
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


# --------------------------------------------------------------------------------------------
# Output


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write: Callable) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it to ``path``:
    readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            write(handle)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_csv(rows: Iterable[dict] | object, path: str | os.PathLike) -> Path:
    """Write rows (dicts or a DataFrame) to ``path`` atomically: temp file, then ``os.replace``.

    A file named in ``CSV_SCHEMAS`` must have exactly its schema's columns (``ValueError``)."""
    import pandas as pd

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if Path(path).name in CSV_SCHEMAS:
        check_columns(Path(path).name, frame.columns)
    return _atomic_write(Path(path), lambda handle: frame.to_csv(handle, index=False))


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return _atomic_write(Path(path), lambda handle: handle.write(text))


# Every ResultWriter alive in this process: what a SIGTERM writes out before the process exits.
_LIVE_WRITERS: weakref.WeakSet = weakref.WeakSet()


def _flush_live_writers(reason: str) -> None:
    """Write every live ResultWriter's rows (the process is about to end for ``reason``)."""
    for writer in list(_LIVE_WRITERS):
        try:
            path = writer.flush()
        except Exception as error:  # the other writers must still get their turn
            log(f"{reason}: could not write {writer.path}: {error}")
            continue
        if path is not None:
            log(f"{reason}: {len(writer.rows)} rows kept in {path}")


def _flush_and_exit(signum, frame) -> None:
    """SIGTERM handler: write every live ResultWriter's rows, then die of the signal as if it
    had not been handled (so SIGTERM still ends a pytest run or a notebook kernel).

    ``python -m bench`` stops a stage that runs past its deadline with SIGTERM. Python runs this
    between two bytecodes of the main thread, so the rows are consistent; a write it interrupted
    leaves only its temporary file behind, never a half-written CSV.
    """
    try:
        _flush_live_writers(f"stopped by signal {signum}")
    finally:
        # Whatever happened above, the process ends: an exception escaping from here would be
        # raised at the interrupted line, where a measurement loop could catch it and go on.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    raise SystemExit(128 + signum)  # not reached: the default action ends the process


def _flush_on_sigterm() -> None:
    """Install ``_flush_and_exit`` for SIGTERM, unless this is not the main thread (where Python
    cannot install handlers) or someone else already handles SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _flush_and_exit)


class ResultWriter:
    """Collects rows and rewrites the CSV (atomically) at most every ``every_s`` seconds, and
    once more on SIGTERM (``_flush_and_exit``), so a run that is stopped keeps what it measured."""

    def __init__(
        self,
        path: str | os.PathLike,
        meta: dict[str, object],
        every_s: float = 5.0,
        transform: Callable | None = None,
    ):
        """``transform``: DataFrame -> DataFrame applied to all rows at every write (e.g. to add
        columns computed across rows)."""
        self.path = Path(path)
        self.meta = dict(meta)
        self.transform = transform
        self.rows: list[dict] = []
        self.every_s = every_s
        # The first add writes at once: time.monotonic() counts from boot, so a 0.0 start would
        # hold rows back for every_s on a machine up for less than that.
        self._last = -math.inf
        _LIVE_WRITERS.add(self)
        _flush_on_sigterm()

    def add(self, row: dict) -> None:
        self.rows.append({**row, **self.meta})
        if time.monotonic() - self._last >= self.every_s:
            self.flush()

    def flush(self) -> Path | None:
        self._last = time.monotonic()
        if not self.rows:
            return None
        if self.transform is None:
            return write_csv(self.rows, self.path)
        import pandas as pd

        return write_csv(self.transform(pd.DataFrame(self.rows)), self.path)

    def close(self) -> Path:
        """Write the rows a last time and stop answering SIGTERM: a finished run's writer must
        not later overwrite the CSV of a newer run in the same process (a notebook, a test).
        Returns the CSV's path (not written if there were no rows)."""
        _LIVE_WRITERS.discard(self)
        return self.flush() or self.path


# --------------------------------------------------------------------------------------------
# Long runs: progress lines and a time budget


class Budget:
    """A wall-clock allowance in seconds (``None``: unlimited)."""

    def __init__(self, seconds: float | None):
        if seconds is not None and seconds < 0:
            raise ValueError(f"budget must be >= 0 seconds, got {seconds}")
        self.seconds = seconds
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        if self.seconds is None:
            return float("inf")
        return self.seconds - self.elapsed()

    def allows(self, estimate_s: float = 0.0) -> bool:
        """Whether something expected to take ``estimate_s`` seconds still fits."""
        return self.remaining() > estimate_s


class Progress:
    """One line per step on stderr: ``[gating 12/126  9%  31s, ~4m10s left] label``."""

    def __init__(self, name: str, total: int, stream=None):
        self.name = name
        self.total = max(int(total), 0)
        self.done = 0
        self.start = time.monotonic()
        self.stream = stream if stream is not None else sys.stderr

    def step(self, label: str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.start
        pct = 100.0 * self.done / self.total if self.total else 100.0
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        print(
            f"[{self.name} {self.done}/{self.total} {pct:3.0f}% {_fmt_s(elapsed)}, "
            f"~{_fmt_s(left)} left] {label}",
            file=self.stream,
            flush=True,
        )


def record_failure(failures: list[str], label: str, error: Exception) -> None:
    """Log ``error`` with its traceback and add ``label`` to ``failures``, so that the caller can
    go on with its next measurement (and fail at the end, after writing its CSVs).

    A CUDA error is raised again instead: it leaves the CUDA context unusable for what follows.
    """
    accelerator_error = getattr(torch, "AcceleratorError", ())  # torch >= 2.8
    try:
        if isinstance(error, accelerator_error):
            raise error
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # A fault inside a Triton launch arrives as a plain RuntimeError; if it broke the
            # context, synchronizing raises too.
            torch.cuda.synchronize()
    except Exception:
        _flush_live_writers(f"{label}: CUDA error, stage ends")  # keep what was measured
        raise
    log(f"{label}: FAILED\n{traceback.format_exc().rstrip()}")
    first_line = (str(error).strip().splitlines() or [""])[0]
    failures.append(f"{label}: {type(error).__name__}: {first_line}")


def raise_failures(failures: list[str]) -> None:
    """``RuntimeError`` listing ``failures`` (``record_failure``), if there are any."""
    if failures:
        raise RuntimeError(
            f"{len(failures)} measurement(s) failed (tracebacks above; the others are "
            "written):\n  " + "\n  ".join(failures)
        )


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def log(message: str) -> None:
    """A progress/status line on stderr (stdout is kept for results and the final summary).

    A closed stderr (``tee`` in ``bench/gpu.sh`` killed first) loses the line rather than
    raising: a status line must never stop a run from writing its results or its stages."""
    try:
        print(message, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
