"""Model benchmark: ``python -m bench.models``.

SCNet-50, SCNet-101 and SCNet-50 v1d against torchvision's ResNet-50 and ResNet-101:

- tasks: ``inference`` (eval, ``torch.inference_mode``) and ``train`` (one step: forward,
  cross-entropy, backward, SGD step);
- per gate (``eager``, ``triton``; ResNets have none), regime (``REGIMES``: eager,
  ``torch.compile``), precision (``fp32``, ``amp_bf16`` = autocast to bfloat16), layout (NCHW,
  channels_last) and batch size;
- columns: median time with 20th/80th percentiles, images per second, peak CUDA memory of one
  step (weights, gradients and optimizer state included), the first call's time (compilation,
  autotuning) and ``time_ratio_vs_resnet``: the SCNet's time over the depth-matched ResNet's in
  the same regime, task, precision, layout, batch and input size (the run-time increase).

It also writes ``breakdown.csv``: where one forward and backward spends its time, from
``torch.profiler``, in the categories convolution, BatchNorm, gating, cat and other (see
``op_breakdown``), for SCNet-50 and ResNet-50, and the profile of each as a Chrome trace
(``trace_<model>[_<gate>].json.gz``: open it in https://ui.perfetto.dev or chrome://tracing).

Cases run most informative first (SCNet-50 against ResNet-50 at the headline precision and
layout, every batch, then compiled; see ``plan_cases``) and are skipped, not cut, when the
``--budget-s`` left cannot hold their estimated cost.
In CPU mode (labelled in every row) the defaults are small: 128x128 inputs, batch 2, fp32, NCHW,
eager gate only.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import scconv
from bench.common import (
    NO_GATE,
    Budget,
    Progress,
    ResultWriter,
    csv_choices,
    default_device,
    default_out_dir,
    dtype_name,
    log,
    memory_format_from_name,
    metadata,
    output_folder,
    peak_memory_mib,
    positive_float,
    positive_int,
    positive_ints,
    raise_failures,
    record_failure,
    require_device,
    seconds_left,
    time_fn,
    trace_name,
    write_csv,
)

MODELS = ("scnet50", "scnet101", "scnet50_v1d", "resnet50", "resnet101")
# The ResNet each model is compared with (same depth).
BASELINES = {
    "scnet50": "resnet50",
    "scnet50_v1d": "resnet50",
    "scnet101": "resnet101",
    "scnet101_v1d": "resnet101",
    "resnet50": "resnet50",
    "resnet101": "resnet101",
}
TASKS = ("inference", "train")
# BatchNorm in training mode needs more than one value per channel, and an SCNet's k2 branch
# pools layer4's 7x7 map (224 px input) to 1x1: a training step of one image raises there.
# ResNets are left out at batch 1 too, so that no SCNet/ResNet ratio is missing its pair.
MIN_TRAIN_BATCH = 2
PRECISIONS = {"fp32": None, "amp_bf16": torch.bfloat16}
LAYOUTS = ("nchw", "channels_last")
GATES = ("eager", "triton")
CATEGORIES = ("convolution", "BatchNorm", "gating", "cat", "other")


@dataclass(frozen=True)
class Regime:
    """How a model is run. ``prepare(model, task)`` returns the callable to time; it receives a
    private copy of the model, so it may transform it in place."""

    name: str
    prepare: Callable[[nn.Module, str], Callable]
    tasks: tuple[str, ...]
    description: str
    compiles: bool  # whether the first call compiles (costly: scheduled after the eager cases)
    needs_cuda: bool = False  # runs on a GPU only
    default: bool = True  # in the default grid (False: only when asked for with --regimes)


def _as_is(model: nn.Module, task: str) -> Callable:
    return model


class CUDAGraphForward:
    """Replays one inference forward of ``model`` as a CUDA graph: the GPU's time without the
    host's (Python, dispatch and kernel launches, which at batch 1 take longer than the kernels).

    The first call runs the model ``warmup`` times on a side stream (cuDNN's algorithm search
    and Triton's compilation and autotuning synchronise, which a capture forbids), then captures
    one forward on a private copy of the input. Every call copies its input into that copy and
    replays the graph; the result is the graph's output buffer, overwritten by the next call.
    Later calls must match the first in shape, strides, dtype, device and in inference mode,
    grad mode and autocast (the captured kernels are those of the first call): a mismatch is a
    ``ValueError``, never a silently wrong result.
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], warmup: int = 3):
        self.model = model
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.captured_for: tuple | None = None
        # Peak CUDA memory allocated while capturing, MiB: a replay allocates nothing (the
        # captured activations live in the graph's private pool), so this is the forward's peak.
        self.capture_peak_mib = float("nan")

    @staticmethod
    def _call_state(x: torch.Tensor) -> tuple:
        return (
            tuple(x.shape),
            x.stride(),
            x.dtype,
            x.device,
            torch.is_inference_mode_enabled(),
            torch.is_grad_enabled(),
            torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda"),
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
            where = x.device if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"CUDAGraphForward replays on a GPU: got an input on {where}")
        state = self._call_state(x)
        if self.graph is None:
            self._capture(x, state)
        elif state != self.captured_for:
            raise ValueError(
                "CUDAGraphForward was captured for (shape, strides, dtype, device, inference "
                f"mode, grad mode, autocast dtype) = {self.captured_for}, called with {state}"
            )
        self.static_input.copy_(x)
        self.graph.replay()
        return self.static_output

    def _capture(self, x: torch.Tensor, state: tuple) -> None:
        self.static_input = x.clone()  # preserve_format: x's strides
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.model(self.static_input)
        torch.cuda.current_stream(x.device).wait_stream(side)
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)  # the warm-up's peak included cuDNN's search
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_output = self.model(self.static_input)
        self.capture_peak_mib = torch.cuda.max_memory_allocated(x.device) / 2**20
        self.graph, self.captured_for = graph, state


def _optimized_cuda_graph(model: nn.Module, task: str) -> Callable:
    return CUDAGraphForward(scconv.optimize_for_inference(model, inplace=True))


def _compiled(model: nn.Module, task: str) -> Callable:
    return torch.compile(model)


def _optimized(model: nn.Module, task: str) -> Callable:
    # The private copy is converted in place: BatchNorm folded, fused ops (inference only).
    return scconv.optimize_for_inference(model, inplace=True)


# To add a regime, add an entry: cases, CSV columns, ratios and plots follow from this dict.
REGIMES: dict[str, Regime] = {
    "eager": Regime("eager", _as_is, TASKS, "PyTorch eager", compiles=False),
    "optimized": Regime(
        "optimized",
        _optimized,
        ("inference",),
        "scconv.optimize_for_inference (BatchNorm folded, fused ops), eager",
        compiles=False,
    ),
    "torch_compile": Regime(
        "torch_compile", _compiled, TASKS, "torch.compile (Inductor, default mode)", compiles=True
    ),
    # Not in the default grid: a GPU run's minutes go to the issues' ratios first.
    "optimized_cuda_graph": Regime(
        "optimized_cuda_graph",
        _optimized_cuda_graph,
        ("inference",),
        "scconv.optimize_for_inference replayed as a CUDA graph (no host launch cost)",
        compiles=False,
        needs_cuda=True,
        default=False,
    ),
}
DEFAULT_REGIMES = tuple(name for name, regime in REGIMES.items() if regime.default)


@dataclass(frozen=True)
class Case:
    model: str
    gate: str
    regime: str
    task: str
    precision: str
    layout: str
    batch: int
    image_size: int

    @property
    def label(self) -> str:
        gate = "" if self.gate == NO_GATE else f"[{self.gate}]"
        return (
            f"{self.model}{gate} {self.regime} {self.task} {self.precision} {self.layout} "
            f"N={self.batch} {self.image_size}px"
        )


def plan_cases(
    models,
    gates,
    regimes,
    tasks,
    precisions,
    layouts,
    batches,
    image_size: int,
    compile_models=None,
    compile_tasks=None,
) -> list[Case]:
    """Every case, most informative first: a run cut short by its budget keeps the ratios the
    issues quote (SCNet-50 / ResNet-50 per regime and batch, at the headline precision and
    layout, i.e. the first of each) before the rest of the grid.

    Tiers, at the headline precision and layout: (0) the main pair (``models[0]`` and its
    ResNet) in the non-compiling regimes at every batch; (1) the main pair compiled at the first
    batch; (2) everything else there, non-compiling first. Then (3) the other precisions and
    layouts, fewer axes off the headline first. Within a tier: tasks (inference at every batch
    before any training step, which costs two to three times as much: issue 6's optimized ratios
    at batch 256, 32 and 1 are inference ratios), batches, regimes in the order given, then SCNet
    before ResNet per gate, so that pairs stay whole. Skipping a case
    costs no budget, so cheap cases after an expensive one that did not fit still run.
    ``compile_models`` and ``compile_tasks`` restrict compiling regimes to those models and
    tasks (None: all). Training starts at batch ``MIN_TRAIN_BATCH``: there is no training step
    of one image (below).
    """
    cases = []
    for model, regime, task, precision, layout, batch in itertools.product(
        models, regimes, tasks, precisions, layouts, batches
    ):
        if task not in REGIMES[regime].tasks:
            continue
        if task == "train" and batch < MIN_TRAIN_BATCH:
            continue
        if REGIMES[regime].compiles and (
            (compile_models is not None and model not in compile_models)
            or (compile_tasks is not None and task not in compile_tasks)
        ):
            continue
        for gate in gates if model.startswith("scnet") else (NO_GATE,):
            cases.append(Case(model, gate, regime, task, precision, layout, batch, image_size))

    main_pair = {models[0], BASELINES[models[0]]} if models else set()
    gate_rank = {gate: i for i, gate in enumerate(gates)}

    def priority(case: Case):
        compiles = REGIMES[case.regime].compiles
        off_headline = (case.precision != precisions[0]) + (case.layout != layouts[0])
        if off_headline:
            tier = 3
        elif case.model in main_pair:
            tier = 0 if not compiles else 1 if case.batch == batches[0] else 2
        else:
            tier = 2
        return (
            tier,
            off_headline,
            compiles,
            list(tasks).index(case.task),
            list(batches).index(case.batch),
            list(regimes).index(case.regime),
            gate_rank.get(case.gate, 0),  # a ResNet (gate "none") beside its SCNet's first gate
            list(models).index(case.model),
        )

    return sorted(cases, key=priority)  # sorted() is stable: ties keep the product order


def build_model(name: str, gate: str, device: str, layout: str) -> nn.Module:
    """A randomly initialised model on ``device`` in ``layout``."""
    import scconv

    model = scconv.create_model(name, gate=None if gate == NO_GATE else gate)
    return model.to(device=device, memory_format=memory_format_from_name(layout))


def make_batch(case: Case, device: str, num_classes: int = 1000, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(case.batch, 3, case.image_size, case.image_size, generator=generator)
    labels = torch.randint(0, num_classes, (case.batch,), generator=generator)
    memory_format = memory_format_from_name(case.layout)
    return images.to(device=device, memory_format=memory_format), labels.to(device)


def make_step(case: Case, model: nn.Module, device: str) -> Callable[[], object]:
    """The closure timed for ``case``: one inference forward or one training step."""
    regime = REGIMES[case.regime]
    classifier = getattr(model, "fc", None)
    images, labels = make_batch(case, device, getattr(classifier, "out_features", 1000))
    amp_dtype = PRECISIONS[case.precision]

    def autocast():
        return torch.autocast(device_type=device, dtype=amp_dtype, enabled=amp_dtype is not None)

    if case.task == "inference":
        model.eval()
        net = regime.prepare(model, case.task)

        def step():
            with torch.inference_mode(), autocast():
                return net(images)

        step.graph_forward = net if isinstance(net, CUDAGraphForward) else None
        return step
    if case.task == "train":
        model.train()
        net = regime.prepare(model, case.task)
        # A small learning rate keeps hundreds of steps on random data finite.
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = F.cross_entropy(net(images), labels)
            loss.backward()
            optimizer.step()
            return loss

        return step
    raise ValueError(f"unknown task {case.task!r}; valid tasks are {', '.join(TASKS)}")


def add_ratio_columns(frame):
    """Add ``baseline``, ``time_ratio_vs_resnet`` and ``throughput_ratio_vs_resnet``.

    Each row is divided by the row of its depth-matched ResNet with the same regime, task,
    precision, layout, batch and input size (NaN where that row was not measured).
    """
    import pandas as pd

    frame = frame.copy()
    frame["baseline"] = frame["model"].map(BASELINES)
    keys = ["regime", "task", "precision", "layout", "batch", "image_size"]
    base = frame[frame["model"] == frame["baseline"]][["model", *keys, "ms"]]
    base = base.rename(columns={"model": "baseline", "ms": "baseline_ms"})
    base = base.drop_duplicates(subset=["baseline", *keys], keep="last")
    merged = frame.merge(base, on=["baseline", *keys], how="left")
    merged["time_ratio_vs_resnet"] = merged["ms"] / merged["baseline_ms"]
    merged["throughput_ratio_vs_resnet"] = merged["baseline_ms"] / merged["ms"]
    return pd.DataFrame(merged.drop(columns=["baseline_ms"]))


# --------------------------------------------------------------------------------------------
# Per-op breakdown

FORWARD_RANGE = "bench.forward"
BACKWARD_RANGE = "bench.backward"
SCCONV_RANGE = "bench.SCConv"
_BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
# The eager gating's four ops (kernels.reference.sc_gate_reference), counted as gating only
# inside an SC-Conv: elsewhere (e.g. a residual add) they are "other".
_GATING_OPS = {"aten::upsample_nearest2d", "aten::add", "aten::sigmoid", "aten::mul"}


def categorize_op(name: str, in_scconv: bool) -> str | None:
    """The category an op's name decides (``None``: none, inherit the enclosing one)."""
    lowered = name.lower()
    if "sc_gate" in lowered:  # the Triton gate's custom op
        return "gating"
    if "relu_cat" in lowered:  # the optimized model's fused ReLU + concatenation
        return "cat"
    if "conv" in lowered:  # aten::conv2d, aten::convolution, cudnn/mkldnn convolutions
        return "convolution"
    if "batch_norm" in lowered:
        return "BatchNorm"
    if name in ("aten::cat", "aten::_cat"):
        return "cat"
    if in_scconv and name in _GATING_OPS:
        return "gating"
    return None


def _node_category(node: str) -> str | None:
    """Category of an autograd node with no categorised forward op of its sequence number."""
    lowered = node.lower()
    if "sc_gate" in lowered or "scgate" in lowered:
        return "gating"
    if "convolution" in lowered:
        return "convolution"
    if "batchnorm" in lowered:
        return "BatchNorm"
    if lowered.startswith("catbackward"):
        return "cat"
    return None


def _is_device_event(event) -> bool:
    return getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA


_RANGES = (FORWARD_RANGE, BACKWARD_RANGE, SCCONV_RANGE)


def _is_kernel(event) -> bool:
    """A device event that is GPU work: not a ``gpu_user_annotation``, the copy of a
    ``record_function`` range that the profiler puts on the GPU timeline (spanning the kernels
    launched inside it, so counting it would count them twice)."""
    annotation = getattr(event, "is_user_annotation", False) or event.name in _RANGES
    return _is_device_event(event) and not annotation


def categorize_events(events, use_device_time: bool) -> list[dict]:
    """Sum self time per (pass, category) over a profile's events.

    ``events``: ``prof.events()`` of a profile in which the forward ran inside
    ``record_function(FORWARD_RANGE)``, the backward inside ``BACKWARD_RANGE``, and each SC-Conv
    inside ``SCCONV_RANGE`` (``_ScconvRanges``). Rules:

    - forward: the outermost op whose name decides a category (``categorize_op``) decides it for
      everything it calls: all under ``aten::conv2d`` is convolution, and so on;
    - backward: an autograd node takes the category of the forward op with its sequence number
      (the backward of the gating's mul is gating, that of a residual add is other), else one
      from its own name (``_node_category``), and passes it to everything it calls;
    - anything undecided is "other". Time is self time, so nothing is counted twice: CUDA kernel
      time on a GPU (``use_device_time``), CPU time otherwise.

    Returns rows ``{"pass", "category", "time_ms", "n_ops"}`` with ``n_ops`` the number of
    top-level ops (forward) or autograd nodes (backward). On a GPU, kernel time the profiler
    could not tie to any op inside the two ranges is returned as pass "both", category
    "unattributed" (absent when there is none).
    """
    events = list(events)
    roots = [e for e in events if e.cpu_parent is None and not _is_device_event(e)]
    totals: dict[tuple[str, str], float] = {}
    counts: dict[tuple[str, str], int] = {}
    sequence_category: dict[int, str] = {}

    def self_time(event) -> float:
        if use_device_time:
            if event.name in _RANGES:
                # A range launches nothing itself; its self device time can only be the span of
                # its own gpu_user_annotation (see _is_kernel).
                return 0.0
            # self_device_time_total since torch 2.4 (self_cuda_time_total before).
            value = getattr(event, "self_device_time_total", None)
            if value is None:
                value = getattr(event, "self_cuda_time_total", 0.0)
            return float(value or 0.0)
        return float(event.self_cpu_time_total)

    def visit(event, pass_, category, in_scconv, is_top):
        name = event.name
        children_top = False
        count = False
        if name in (FORWARD_RANGE, BACKWARD_RANGE):
            pass_ = "forward" if name == FORWARD_RANGE else "backward"
            children_top = True
        elif name == SCCONV_RANGE:
            in_scconv = True
            children_top = is_top
        elif name.startswith(_BACKWARD_PREFIX):
            pass_ = "backward"
            category = (
                sequence_category.get(event.sequence_nr)
                or _node_category(name[len(_BACKWARD_PREFIX) :])
                or "other"
            )
            count = True
        elif pass_ is not None:
            if category is None:
                category = categorize_op(name, in_scconv)
            if pass_ == "forward" and category is not None and event.sequence_nr >= 0:
                sequence_category.setdefault(event.sequence_nr, category)
            count = pass_ == "forward" and is_top
        if pass_ is not None:
            key = (pass_, category or "other")
            totals[key] = totals.get(key, 0.0) + self_time(event)
            counts[key] = counts.get(key, 0) + count
        for child in event.cpu_children:
            visit(child, pass_, category, in_scconv, children_top)

    # Forward trees first: the backward nodes look up their forward ops' sequence numbers.
    roots.sort(key=lambda e: e.name != FORWARD_RANGE)
    for root in roots:
        visit(root, None, None, False, False)
    rows = [
        {
            "pass": pass_,
            "category": category,
            "time_ms": totals.get((pass_, category), 0.0) / 1e3,  # profiler microseconds
            "n_ops": counts.get((pass_, category), 0),
        }
        for pass_ in ("forward", "backward")
        for category in CATEGORIES
    ]
    if use_device_time:
        kernel_us = sum(e.time_range.elapsed_us() for e in events if _is_kernel(e))
        missing_us = kernel_us - sum(totals.values())
        if missing_us > 0.01 * max(kernel_us, 1e-9):
            rows.append(
                {"pass": "both", "category": "unattributed", "time_ms": missing_us / 1e3,
                 "n_ops": 0}
            )  # fmt: skip
    return rows


class _ScconvRanges:
    """Wrap every SC-Conv's forward in ``record_function(SCCONV_RANGE)`` while active."""

    def __init__(self, model: nn.Module):
        import scconv

        self.modules = [m for m in model.modules() if isinstance(m, scconv.SCConv)]
        self.handles = []
        self.open = []

    def __enter__(self):
        from torch.autograd.profiler import record_function

        def enter(module, args):
            scope = record_function(SCCONV_RANGE)
            scope.__enter__()
            self.open.append(scope)

        def leave(module, args, output):
            self.open.pop().__exit__(None, None, None)

        for module in self.modules:
            self.handles.append(module.register_forward_pre_hook(enter))
            self.handles.append(module.register_forward_hook(leave))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def op_breakdown(
    model: nn.Module,
    case: Case,
    device: str,
    iterations: int = 2,
    trace: Path | None = None,
) -> list[dict]:
    """Per-category time of one training forward and backward of ``model`` (eager), averaged
    over ``iterations`` profiled iterations after one unprofiled warm-up.

    ``trace``: also write the profile as a Chrome trace there (gzip-compressed when the name ends
    in ``.gz``; written under a temporary name and renamed, so a stopped run leaves none half
    written). The forward, the backward and every SC-Conv are named ranges in it."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    classifier = getattr(model, "fc", None)
    images, labels = make_batch(case, device, getattr(classifier, "out_features", 1000))
    amp_dtype = PRECISIONS[case.precision]
    model.train()

    def forward_backward():
        with record_function(FORWARD_RANGE):
            with torch.autocast(device_type=device, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = F.cross_entropy(model(images), labels)
        with record_function(BACKWARD_RANGE):
            loss.backward()
        model.zero_grad(set_to_none=True)

    forward_backward()  # warm-up: cuDNN selection, lazy initialisation, autotuning
    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        torch.cuda.synchronize()
        activities.append(ProfilerActivity.CUDA)
    with warnings.catch_warnings():
        # torch 2.11 warns on entering any profile() that events of earlier cycles are dropped;
        # this one has a single cycle (no schedule), so nothing is.
        warnings.filterwarnings("ignore", message=".*Profiler clears events", category=UserWarning)
        with _ScconvRanges(model), profile(activities=activities) as prof:
            for _ in range(iterations):
                forward_backward()
            if device == "cuda":
                torch.cuda.synchronize()
    if trace is not None:
        trace = Path(trace)
        partial = trace.with_name(f".partial-{trace.name}")  # keeps the suffix export reads
        try:
            prof.export_chrome_trace(str(partial))
            os.replace(partial, trace)
        finally:
            partial.unlink(missing_ok=True)
    rows = categorize_events(prof.events(), use_device_time=device == "cuda")
    for r in rows:
        r["time_ms"] /= iterations
        r["n_ops"] //= iterations
    for pass_ in ("forward", "backward"):
        total = sum(r["time_ms"] for r in rows if r["pass"] == pass_)
        for r in rows:
            if r["pass"] == pass_:
                r["share_pct"] = 100.0 * r["time_ms"] / total if total else 0.0
    time_source = "CUDA kernel time" if device == "cuda" else "CPU self time"
    for r in rows:
        r.update(
            model=case.model,
            gate=case.gate,
            precision=case.precision,
            layout=case.layout,
            batch=case.batch,
            image_size=case.image_size,
            time_source=time_source,
        )
    return rows


# --------------------------------------------------------------------------------------------
# The run


def measure(case: Case, base_model: nn.Module, device: str, timing: dict) -> dict:
    """Time ``case`` on a private copy of ``base_model``; one CSV row (without metadata)."""
    step = make_step(case, copy.deepcopy(base_model), device)
    first = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    first_call_s = time.perf_counter() - first
    peak = peak_memory_mib(step, device)
    if getattr(step, "graph_forward", None) is not None:
        peak = step.graph_forward.capture_peak_mib  # a replay allocates nothing
    measured = time_fn(step, device, **timing)
    return {
        "model": case.model,
        "gate": case.gate,
        "regime": case.regime,
        "task": case.task,
        "precision": case.precision,
        "layout": case.layout,
        "batch": case.batch,
        "image_size": case.image_size,
        **measured.as_row(),
        "img_per_s": case.batch / measured.ms * 1e3,
        "peak_mem_mib": peak,
        "first_call_s": first_call_s,
        "cudnn_benchmark": device == "cuda" and bool(torch.backends.cudnn.benchmark),
    }


def _defaults(device: str) -> dict:
    if device == "cuda":
        return dict(
            models=MODELS,
            gates=GATES,
            regimes=DEFAULT_REGIMES,
            tasks=TASKS,
            precisions=("amp_bf16", "fp32"),
            layouts=("channels_last", "nchw"),
            batches=(256, 32, 1),  # issue 6 asks for the ratios at 1, 32 and 256
            image_size=224,
            compile_models=("resnet50", "scnet50"),
            compile_tasks=TASKS,
        )
    return dict(
        models=MODELS,
        gates=("eager",),  # the Triton interpreter is never timed
        regimes=tuple(r for r in DEFAULT_REGIMES if not REGIMES[r].needs_cuda),
        tasks=TASKS,
        precisions=("fp32",),
        layouts=("nchw",),
        batches=(2,),
        image_size=128,
        compile_models=("resnet50", "scnet50"),
        # Compiling SCNet-50's training step took 163 s on 2 CPU cores (inference: 99 s): the
        # CPU run compiles inference only, to stay within make bench's 10 minutes.
        compile_tasks=("inference",),
    )


# First guesses of a case's cost in seconds (first call + timing), replaced by measurements.
_GUESS_S = {
    ("cuda", False): 6.0,
    ("cuda", True): 90.0,
    ("cpu", False): 6.0,
    ("cpu", True): 60.0,
}


def _estimate(case: Case, device: str, spent: dict) -> float:
    """Seconds ``case`` is expected to take: what the same model and task cost before, else the
    most any model cost for the task, else (compiling) 2.5x a compiled inference, else a guess."""
    compiles = REGIMES[case.regime].compiles
    for key in ((compiles, case.task, case.model), (compiles, case.task)):
        if key in spent:
            return spent[key]
    if compiles and case.task == "train" and (True, "inference") in spent:
        # Measured on 2 CPU cores: SCNet-50 163 s vs 99 s, ResNet-50 43 s vs 31 s.
        return 2.5 * spent[(True, "inference")]
    return _GUESS_S[(device, compiles)]


def resolve_settings(device: str, grid: dict) -> dict:
    """The run's settings: ``device``'s defaults overridden by the non-None values of ``grid``.
    A value outside its choices is a ``ValueError`` naming it (an unknown key a ``TypeError``),
    raised before anything runs."""
    settings = _defaults(device)
    unknown = set(grid) - set(settings)
    if unknown:
        raise TypeError(f"unknown grid argument(s): {', '.join(sorted(unknown))}")
    settings.update({k: v for k, v in grid.items() if v is not None})
    for name, valid in (
        ("models", BASELINES),
        ("gates", GATES),
        ("regimes", REGIMES),
        ("tasks", TASKS),
        ("precisions", PRECISIONS),
        ("layouts", LAYOUTS),
    ):
        bad = [v for v in settings[name] if v not in valid]
        if bad:
            raise ValueError(f"unknown {name} {bad}; valid: {', '.join(valid)}")
    if device != "cuda" and "triton" in settings["gates"]:
        raise ValueError("gate 'triton' on the CPU would time the Triton interpreter; use eager")
    gpu_only = [r for r in settings["regimes"] if REGIMES[r].needs_cuda]
    if device != "cuda" and gpu_only:
        raise ValueError(f"regime(s) {', '.join(gpu_only)} run on a GPU only (CUDA graphs)")
    if not _plan(settings):
        raise ValueError(
            f"the grid holds no case: training needs a batch of at least {MIN_TRAIN_BATCH}, "
            "each regime runs only its tasks ("
            + ", ".join(f"{r}: {'/'.join(REGIMES[r].tasks)}" for r in settings["regimes"])
            + "), and compiling regimes run only the compile models and tasks"
        )
    return settings


def _plan(settings: dict) -> list[Case]:
    return plan_cases(
        settings["models"],
        settings["gates"],
        settings["regimes"],
        settings["tasks"],
        settings["precisions"],
        settings["layouts"],
        settings["batches"],
        settings["image_size"],
        settings["compile_models"],
        settings["compile_tasks"],
    )


def run(
    out_dir: str | Path,
    *,
    device: str | None = None,
    budget_s: float | None = None,
    breakdown: bool = True,
    rep_ms: float | None = None,
    **grid,
) -> Path:
    """Run the model grid (defaults per device, overridden by ``grid``); write ``models.csv``,
    ``breakdown.csv``. Returns the path of ``models.csv``."""
    device = device or default_device()
    settings = resolve_settings(device, grid)
    out_dir = Path(out_dir)
    budget = Budget(budget_s)
    meta = metadata(device)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    # At least 10 timed steps on a GPU (a step can take longer than rep_ms), 3 to 20 on the CPU.
    timing = (
        {"warmup_ms": 50, "rep_ms": rep_ms or 300, "min_reps": 10}
        if device == "cuda"
        else {"warmup_ms": 0, "rep_ms": rep_ms or 1000, "min_reps": 3, "max_reps": 20}
    )

    cases = _plan(settings)
    writer = ResultWriter(out_dir / "models.csv", meta, transform=add_ratio_columns)
    progress = Progress("models", len(cases) + (1 if breakdown else 0))
    spent: dict = {}
    skipped = []
    failures: list[str] = []  # one broken case (a compile error, say) must not cost the others
    base_models: dict = {}
    breakdown_done = not breakdown
    for case in cases:
        if not breakdown_done and REGIMES[case.regime].compiles:
            # Before the first compiling case: the breakdown is cheap and central.
            _run_breakdown(out_dir, meta, settings, device, progress, failures)
            breakdown_done = True
        estimate = _estimate(case, device, spent)
        # A margin: a compile that takes longer than the last one must still fit.
        if not budget.allows(1.25 * estimate):
            skipped.append(case)
            progress.step(f"{case.label}: skipped (needs ~{estimate:.0f}s, budget left "
                          f"{max(budget.remaining(), 0):.0f}s)")  # fmt: skip
            continue
        started = time.monotonic()
        key = (case.model, case.gate, case.layout)
        try:
            if key not in base_models:
                base_models.clear()  # one model on the device at a time
                if device == "cuda":
                    torch.cuda.empty_cache()
                base_models[key] = build_model(case.model, case.gate, device, case.layout)
            row = measure(case, base_models[key], device, timing)
        except torch.cuda.OutOfMemoryError as error:
            log(f"models: {case.label}: out of memory ({str(error).splitlines()[0]})")
            skipped.append(case)
            progress.step(f"{case.label}: out of memory, skipped")
            continue
        except Exception as error:
            record_failure(failures, f"models: {case.label}", error)
            progress.step(f"{case.label}: FAILED ({type(error).__name__})")
            continue
        finally:
            if REGIMES[case.regime].compiles:
                torch._dynamo.reset()
            if device == "cuda":
                torch.cuda.empty_cache()
        writer.add(row)
        cost = time.monotonic() - started
        compiles = REGIMES[case.regime].compiles
        spent[(compiles, case.task, case.model)] = cost
        spent[(compiles, case.task)] = max(cost, spent.get((compiles, case.task), 0.0))
        progress.step(
            f"{case.label}: {row['ms']:.1f} ms ({row['img_per_s']:.1f} img/s, "
            f"first call {row['first_call_s']:.1f}s)"
        )
    base_models.clear()
    if not breakdown_done:
        _run_breakdown(out_dir, meta, settings, device, progress, failures)
    try:
        _write_op_counts(out_dir, meta, settings)
    except Exception as error:
        record_failure(failures, "models: ATen op counts", error)
    try:
        _write_bytes_moved(out_dir, meta, settings)
    except Exception as error:
        record_failure(failures, "models: bytes moved", error)
    path = writer.close()
    if skipped:
        log(f"models: {len(skipped)} of {len(cases)} cases skipped (budget or memory)")
        write_csv([vars(c) for c in skipped], out_dir / "models_skipped.csv")
    else:
        (out_dir / "models_skipped.csv").unlink(missing_ok=True)
    raise_failures(failures)
    return path


def _write_op_counts(out_dir: Path, meta: dict, settings: dict) -> Path:
    """ATen ops per forward of each model, original and optimized (``bench.opcount``), counted
    on the meta device (counts depend on neither data nor device) as ``aten_ops.csv``."""
    from bench.opcount import op_count_table

    frame = op_count_table(settings["models"], size=settings["image_size"])
    for column, value in {**meta, "timer": "none (ops counted on the meta device)"}.items():
        frame[column] = value
    return write_csv(frame, out_dir / "aten_ops.csv")


def _write_bytes_moved(out_dir: Path, meta: dict, settings: dict) -> Path:
    """GB one forward of each model moves, original and optimized (``bench.opcount``'s traffic
    model, on the meta device) at the headline precision, layout and batch, as
    ``bytes_moved.csv``: what the measured inference time ratios can be held against. The models
    are converted to the precision's dtype: autocast's per-call casts of fp32 weights (about 1 %
    of the traffic at batch 256) are not in it."""
    from bench.opcount import bytes_table

    precision = settings["precisions"][0]
    dtype = dtype_name(PRECISIONS[precision] or torch.float32)
    frame = bytes_table(
        settings["models"],
        size=settings["image_size"],
        batch=settings["batches"][0],
        dtype=dtype,
        layout=settings["layouts"][0],
    )
    timer = "none (bytes counted on the meta device)"
    for column, value in {**meta, "timer": timer}.items():
        frame[column] = value
    return write_csv(frame, out_dir / "bytes_moved.csv")


def _run_breakdown(
    out_dir: Path, meta: dict, settings: dict, device: str, progress, failures: list[str]
) -> Path | None:
    """Profile SCNet-50 (each gate) and ResNet-50 at the headline precision, layout, batch.

    A variant that fails is recorded in ``failures`` and left out; the others are written."""
    rows = []
    variants = [("scnet50", gate) for gate in settings["gates"]] + [("resnet50", NO_GATE)]
    for model_name, gate in variants:
        case = Case(
            model_name,
            gate,
            "eager",
            "train",
            settings["precisions"][0],
            settings["layouts"][0],
            max(settings["batches"][0], MIN_TRAIN_BATCH),
            settings["image_size"],
        )
        try:
            model = build_model(model_name, gate, device, case.layout)
            trace = out_dir / trace_name(model_name, gate)
            rows.extend(op_breakdown(model, case, device, trace=trace))
        except Exception as error:
            record_failure(failures, f"models: per-op breakdown of {model_name} [{gate}]", error)
        finally:
            model = None  # the next variant's model takes its place on the device
            if device == "cuda":
                torch.cuda.empty_cache()
    path = write_csv([{**r, **meta} for r in rows], out_dir / "breakdown.csv") if rows else None
    progress.step("per-op breakdown (torch.profiler) of SCNet-50 and ResNet-50, with traces")
    return path


def write_model_summary(out_dir: str | Path, names=None, image_size: int = 224) -> Path:
    """Parameters and GMACs (``scconv.summary``, counted on the meta device) of ``names``
    (default: every model) as ``model_summary.csv``."""
    from scconv.summary import summary

    frame = summary(list(names) if names else None, image_size)
    meta = metadata(default_device())
    meta["timer"] = "none (counted on the meta device)"
    for column, value in meta.items():
        frame[column] = value
    return write_csv(frame, Path(out_dir) / "model_summary.csv")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__)
    parser.add_argument(
        "--out", type=output_folder, help="output directory (default bench/results/..)"
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    models = tuple(BASELINES)
    parser.add_argument("--models", type=csv_choices(models), help=",".join(models))
    parser.add_argument("--gates", type=csv_choices(GATES), help=",".join(GATES))
    parser.add_argument("--regimes", type=csv_choices(REGIMES), help=",".join(REGIMES))
    parser.add_argument("--tasks", type=csv_choices(TASKS), help=",".join(TASKS))
    parser.add_argument("--precisions", type=csv_choices(PRECISIONS), help=",".join(PRECISIONS))
    parser.add_argument("--layouts", type=csv_choices(LAYOUTS), help=",".join(LAYOUTS))
    parser.add_argument("--batches", type=positive_ints, help="comma-separated")
    parser.add_argument("--image-size", type=positive_int)
    parser.add_argument(
        "--compile-models",
        type=csv_choices((*models, "all")),
        help="models run in compiling regimes ('all': every)",
    )
    parser.add_argument(
        "--compile-tasks", type=csv_choices(TASKS), help="tasks run in compiling regimes"
    )
    parser.add_argument("--no-breakdown", action="store_true")
    parser.add_argument("--summary", action="store_true", help="also write model_summary.csv")
    parser.add_argument("--budget-s", type=seconds_left, help="skip cases past this")
    parser.add_argument("--rep-ms", type=positive_float, help="timed span per case")
    args = parser.parse_args(argv)

    compile_models = args.compile_models
    if compile_models is not None and "all" in compile_models:
        compile_models = MODELS
    grid = dict(
        models=args.models,
        gates=args.gates,
        regimes=args.regimes,
        tasks=args.tasks,
        precisions=args.precisions,
        layouts=args.layouts,
        batches=args.batches,
        image_size=args.image_size,
        compile_models=compile_models,
        compile_tasks=args.compile_tasks,
    )
    try:
        device = require_device(args.device or default_device())
        resolve_settings(device, grid)  # the checks run() makes first, as usage errors here
    except ValueError as error:
        parser.error(str(error))
    out = Path(args.out) if args.out else default_out_dir(device)
    if args.summary:
        write_model_summary(out, args.models)
    path = run(
        out,
        device=device,
        budget_s=args.budget_s,
        breakdown=not args.no_breakdown,
        rep_ms=args.rep_ms,
        **grid,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
