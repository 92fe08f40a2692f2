"""The whole benchmark suite: ``python -m bench --out DIR`` (what ``make bench`` runs).

With a CUDA GPU (full suite, see ``bench/gpu.sh``):
    tests (the pytest files that run the compiled kernels, capped at ``--tests-s``; log in
    ``pytest.log``) -> model summary (``python -m scconv summary``) -> check (Triton kernels vs
    the eager reference) -> sweep (autotune table) -> gating micro-benchmark -> models (+ per-op
    breakdown) -> plots -> summary.
Without one (CPU mode, labelled as such in every CSV row, plot title and the summary):
    model summary -> check through Triton's interpreter (correctness only, never timed) ->
    gating (eager and torch.compile, batch 1, fp32) -> models (parameters and GMACs, then eager
    and ``scconv.optimize_for_inference`` at 128 px, batch 2, torch.compile inference of SCNet-50
    and ResNet-50, the per-op breakdown and ATen op counts) -> plots -> summary. One torch
    thread per stage unless ``--threads`` says otherwise.
``--dry-run`` runs every stage on tiny inputs on the CPU (minutes -> seconds): a plumbing check
(its tests stage only collects the tests).

Each stage runs in its own Python process (a failure or a CUDA error in one does not stop the
others; the interpreter switch is per process) and shares the run's timestamp. The summary is
printed last; the exit status is 1 if any stage failed.

``--deadline-s`` is a hard limit on top of the budget (which only decides what the stages start
measuring): a stage still running at the deadline gets SIGTERM, on which it writes the rows it
measured (``bench.common.ResultWriter``) and ends, or is killed ``STOP_GRACE_S`` later; later
stages are not started; plots and the summary still follow, and the summary names the stopped
stage. A stopped stage is not a failure: the exit status stays 0 unless a stage failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    REPO_ROOT,
    TRACE_FILES,
    csv_choices,
    log,
    output_folder,
    positive_float,
    positive_int,
    seconds_left,
    write_text,
)


@dataclass
class Stage:
    name: str
    args: list[str]  # arguments after ``python -m``
    share: float = 0.0  # fraction of the budget left that this stage may use (0: no budget)
    capture: str | None = None  # file in the output directory that receives stdout
    # File in the output directory that receives stdout and stderr as they come, kept whatever
    # the stage's fate (a stopped test run still shows which tests passed).
    log_file: str | None = None
    cap_s: float | None = None  # the longest the stage may run (None: until the deadline)
    # How a stop starts: bench's own stages write the rows they hold on SIGTERM; pytest prints
    # its failures and result line on SIGINT (on SIGTERM it just dies).
    stop_signal: int = signal.SIGTERM

    def __post_init__(self):
        if self.log_file and self.capture:
            raise ValueError(f"stage {self.name}: log_file and capture both take stdout")


# The test files that run the compiled kernels on a GPU (with CUDA, test_kernels runs every
# kernel test on CUDA tensors; the three hold all the tests marked ``cuda``). A GPU lease is
# short (README), so the tests run inside the benchmark's one command, first: correct first.
GPU_TEST_FILES = ("tests/test_kernels.py", "tests/test_gate_models.py", "tests/test_inference.py")
DEFAULT_TESTS_S = 150.0


def tests_stage(
    cap_s: float, dry_run: bool, files=GPU_TEST_FILES, workers: int | None = None
) -> Stage:
    """pytest over ``files``, at most ``cap_s`` seconds (a dry run only collects).

    ``workers`` pytest-xdist processes (0 or 1: one pytest process). By default, with
    pytest-xdist installed (the GPU machine has it), min(8, CPU cores): the tests' time goes mostly
    to compiling Triton kernels on the CPU, one core per process.
    """
    # -v: each test's name and outcome as it ends, so a run stopped at its cap still says which
    # passed; --durations: what to trim if the cap is too short.
    args = ["pytest", "-v", "--color=no", "-p", "no:cacheprovider", "--tb=short", "-rfE",
            "--durations=15", *files]  # fmt: skip
    if dry_run:
        args.append("--collect-only")
    else:
        if workers is None and importlib.util.find_spec("xdist") is not None:
            workers = min(8, os.cpu_count() or 1)
        if workers and workers > 1:
            args += ["-n", str(workers)]
    return Stage("tests", args, log_file="pytest.log", cap_s=cap_s, stop_signal=signal.SIGINT)


# The files each stage writes in the output directory (besides ``capture``; PNGs are drawn from
# these CSVs by bench.plots.PLOTS).
OUTPUTS = {
    "check": ("gating_correctness.csv",),
    "tests": ("pytest.log",),
    "sweep": ("sweep.csv", "tuned_configs.json"),
    "gating": ("gating.csv", "bandwidth.csv"),
    "models": ("models.csv", "models_skipped.csv", "breakdown.csv", "aten_ops.csv",
               "bytes_moved.csv", "model_summary.csv", *TRACE_FILES),
}  # fmt: skip


def stage_names() -> tuple[str, ...]:
    """Every stage name of any mode (GPU, CPU, dry run): what ``--skip`` accepts."""
    modes = ((True, False), (False, False), (False, True))
    names = [stage.name for gpu, dry in modes for stage in plan(Path("."), gpu, dry)]
    return tuple(dict.fromkeys(names))


def plan(out: Path, gpu: bool, dry_run: bool, tests_s: float = DEFAULT_TESTS_S) -> list[Stage]:
    """The stages of one run, in order (``tests_s`` 0: no tests stage)."""
    o = ["--out", str(out)]
    tests = [tests_stage(tests_s, dry_run)] if tests_s > 0 and (gpu or dry_run) else []
    if dry_run:
        return tests + [
            Stage("check", ["bench.check", *o, "--quick"]),
            Stage(
                "sweep",
                [
                    "bench.sweep",
                    *o,
                    "--tiny",
                    "--batches",
                    "1",
                    "--layouts",
                    "nchw",
                    "--max-configs",
                    "2",
                ],
            ),  # fmt: skip
            Stage(
                "gating",
                [
                    "bench.gating",
                    *o,
                    "--tiny",
                    "--providers",
                    "eager",
                    "--rep-ms",
                    "2",
                    "--warmup-ms",
                    "1",
                ],
            ),  # fmt: skip
            Stage(
                "models",
                [
                    "bench.models",
                    *o,
                    "--summary",
                    "--models",
                    "scnet50,resnet50",
                    "--regimes",
                    "eager",
                    "--tasks",
                    "inference",
                    "--batches",
                    "1",
                    "--rep-ms",
                    "1",
                ],
            ),  # fmt: skip
        ]
    if gpu:
        return tests + [
            Stage("summary", ["scconv", "summary"], capture="model_summary.txt"),
            # Compiles and autotunes every shape it meets: bounded, so the sweep and the
            # measurements keep most of the budget (the cuda tests check the kernels too).
            Stage("check", ["bench.check", *o], share=0.15),
            Stage("sweep", ["bench.sweep", *o], share=0.2),
            Stage("gating", ["bench.gating", *o], share=0.4),
            Stage("models", ["bench.models", *o, "--summary"], share=1.0),
        ]
    return [
        Stage("summary", ["scconv", "summary"], capture="model_summary.txt"),
        Stage("check", ["bench.check", *o]),
        Stage("gating", ["bench.gating", *o], share=0.25),
        Stage("models", ["bench.models", *o, "--summary"], share=1.0),
    ]


# After SIGTERM, how long a stopped stage may take to write its CSVs before SIGKILL. Python runs
# the handler (bench.common._flush_and_exit) only when the main thread is back from the C call
# it is in (a kernel compile, a cuDNN search, a synchronize), which can take seconds.
STOP_GRACE_S = 15.0

DONE, FAILED, STOPPED = "done", "FAILED", "stopped at the deadline"
CAPPED = "stopped at its time cap"  # Stage.cap_s: later stages still run


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    """Send ``signum`` to the stage's process group (the stage and its workers), if any left."""
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(
    process: subprocess.Popen, name: str, reason: str, signum: int = signal.SIGTERM
) -> str | None:
    """Stop a running stage: ``signum``, then SIGKILL after ``STOP_GRACE_S``; returns its
    stdout."""
    _signal_group(process, signum)  # first: the log line below may go nowhere
    log(f"=== bench: stage {name}: {reason}, stopping it ({signal.Signals(signum).name})")
    try:
        stdout, _ = process.communicate(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        sent = signal.Signals(signum).name
        log(f"=== bench: stage {name} still running {STOP_GRACE_S:.0f}s after {sent}: SIGKILL")
        _signal_group(process, signal.SIGKILL)
        stdout, _ = process.communicate()
    finally:
        # Also after a second Ctrl-C during the grace period; and leftover workers (e.g.
        # torch.compile's) must not outlive the stage: they would keep gpu.sh's log pipe open.
        _signal_group(process, signal.SIGKILL)
    return stdout


@contextlib.contextmanager
def _exit_on_termination():
    """SIGTERM and SIGHUP (a timeout, a closed terminal) end the orchestrator with SystemExit
    instead of killing it outright, so that ``run_stage`` stops the running stage, which sits in
    a session of its own and did not get the signal. The previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _remove_earlier_outputs(stages: list[Stage], out: Path) -> None:
    """Delete the files the planned stages write, where an earlier run left them in ``out``: a
    stage that fails, is stopped or is not reached must not leave an older run's numbers to be
    plotted and summarised as this run's. Stages left out with ``--skip`` keep theirs, except
    the test log."""
    from bench.plots import PLOTS

    # A test log has no timestamp to tell an earlier run's from this one's: it never stays.
    (out / "pytest.log").unlink(missing_ok=True)
    for stage in stages:
        outputs = OUTPUTS.get(stage.name, ())
        names = [*outputs, *([stage.capture] if stage.capture else [])]
        names += [png for name in outputs for png, _ in PLOTS.get(name, ())]
        for name in names:
            (out / name).unlink(missing_ok=True)


def _default_sigint() -> None:
    """In the stage's process before it starts Python: SIGINT back to its default action. A shell
    starts background jobs (``bench/gpu.sh ... &``, ``nohup``) with SIGINT ignored, exec keeps an
    ignored signal ignored, and Python then installs no KeyboardInterrupt handler: pytest would
    not stop on the SIGINT that ends a test run past its cap, nor print its result line."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_stage(
    stage: Stage, out: Path, env: dict, budget_s: float | None, deadline: float | None = None
) -> tuple[str, float]:
    """Run one stage, stopping it at ``deadline`` (a ``time.monotonic()`` value; None: never).

    Returns (``DONE``, ``FAILED``, ``STOPPED`` or, past ``stage.cap_s``, ``CAPPED``; seconds).
    """
    command = [sys.executable, "-m", *stage.args]
    if budget_s is not None and stage.share:
        command += ["--budget-s", f"{budget_s:.0f}"]
    log(f"\n=== bench: stage {stage.name}: {' '.join(command[1:])}")
    start = time.monotonic()
    reason, stopped = "deadline reached", STOPPED
    if stage.cap_s is not None and (deadline is None or start + stage.cap_s < deadline):
        deadline, stopped = start + stage.cap_s, CAPPED
        reason = f"its {stage.cap_s:.0f}s cap reached"
    with contextlib.ExitStack() as files:
        if stage.log_file:
            stdout_to = files.enter_context(open(out / stage.log_file, "w"))  # noqa: SIM115
            stderr_to = subprocess.STDOUT
        else:
            stdout_to = subprocess.PIPE if stage.capture else sys.stderr
            stderr_to = None
        # A process group of its own, so that a stop reaches the stage's worker processes too.
        process = subprocess.Popen(
            command,
            env=env,
            cwd=REPO_ROOT,
            stdout=stdout_to,
            stderr=stderr_to,
            text=True,
            start_new_session=True,
            preexec_fn=_default_sigint,
        )
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            stdout, _ = process.communicate(timeout=timeout)
            status = DONE if process.returncode == 0 else FAILED
        except subprocess.TimeoutExpired:
            stdout = _stop(process, stage.name, reason, stage.stop_signal)
            status = stopped
        except BaseException:  # e.g. Ctrl-C: the stage is in its own session and did not get it
            _stop(process, stage.name, "interrupted", stage.stop_signal)
            raise
    if stage.log_file:
        last = (out / stage.log_file).read_text(errors="replace").strip().splitlines()
        log(f"=== bench: stage {stage.name}: {last[-1] if last else '(no output)'}"
            f" ({stage.log_file})")  # fmt: skip
    if stage.capture:
        sys.stderr.write(stdout or "")
        if status == DONE:
            write_text(stdout, out / stage.capture)
    seconds = time.monotonic() - start
    log(f"=== bench: stage {stage.name} {status} in {seconds:.0f}s")
    return status, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", required=True, type=output_folder, help="output directory for CSVs, PNGs, summary"
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny inputs on the CPU")
    parser.add_argument(
        "--budget-s",
        type=positive_float,
        default=None,
        help="wall-clock seconds for the measuring stages (default: 480 on the CPU, none on a "
        "GPU; bench/gpu.sh passes its own); stages skip what no longer fits",
    )
    parser.add_argument(
        "--deadline-s",
        type=positive_float,
        default=None,
        help="hard wall-clock limit in seconds from the start (default: none; bench/gpu.sh "
        "passes one): a stage still running then is stopped, keeping the rows it wrote, later "
        "stages are not run, and plots and the summary follow",
    )
    parser.add_argument(
        "--tests-s",
        type=seconds_left,
        default=DEFAULT_TESTS_S,
        help=f"the longest the tests stage (GPU and --dry-run only) may run (default "
        f"{DEFAULT_TESTS_S:.0f}; 0: no tests stage); a cap of its own, not a share of the "
        "budget, but its time comes out of the budget of the stages after it",
    )
    names = stage_names()
    parser.add_argument(
        "--skip",
        type=csv_choices(names),
        default=(),
        help=f"comma-separated stage names to leave out: {','.join(names)}",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU mode: torch threads per stage (default 1, or $OMP_NUM_THREADS if set)",
    )
    args = parser.parse_args(argv)
    start = time.monotonic()
    deadline = None if args.deadline_s is None else start + args.deadline_s

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["SCCONV_BENCH_TIMESTAMP"] = (
        _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    )
    # Stages import bench/, kernels/ and scconv/ from this checkout (also without pip install).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a dry run is a CPU run, GPU or not
        gpu = False
    else:
        import torch

        gpu = torch.cuda.is_available()
    if not gpu:
        # One thread unless asked otherwise: on a shared machine two OpenMP threads wait for
        # each other at every op (measured under load on 2 cores: the eager gating of layer1 at
        # batch 1 took 72 ms with 2 threads and 0.2 ms with 1; SCNet-50 inference 5.4 s vs 0.1 s).
        if args.threads is not None:
            env["OMP_NUM_THREADS"] = str(args.threads)
        else:
            env.setdefault("OMP_NUM_THREADS", "1")
    budget_s = args.budget_s
    if budget_s is None and not gpu and not args.dry_run:
        budget_s = 480.0
    skip = set(args.skip)
    stages = [s for s in plan(out, gpu, args.dry_run, args.tests_s) if s.name not in skip]

    mode = "dry run (CPU, tiny inputs)" if args.dry_run else ("GPU" if gpu else "CPU mode")
    log(
        f"bench: {mode}; writing to {out}"
        + (f"; budget {budget_s:.0f}s" if budget_s else "")
        + (f"; deadline {args.deadline_s:.0f}s" if deadline is not None else "")
    )
    failed, stopped, capped, not_run = [], [], [], []
    _remove_earlier_outputs(stages, out)
    with _exit_on_termination():
        for stage in stages:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                not_run.append(stage.name)
                log(f"=== bench: stage {stage.name} not run: the deadline has passed")
                continue
            stage_budget = None
            if budget_s is not None and stage.share:
                left = budget_s - (now - start)
                stage_budget = max(left * stage.share, 0.0)
                if deadline is not None:  # a budget past the deadline would only get it stopped
                    stage_budget = min(stage_budget, deadline - now)
            status, _ = run_stage(stage, out, env, stage_budget, deadline)
            if status == FAILED:
                failed.append(stage.name)
            elif status in (STOPPED, CAPPED):
                if status == CAPPED:
                    capped.append(f"{stage.name} ({stage.cap_s:.0f}s)")
                else:
                    stopped.append(stage.name)
                # A stage killed while writing leaves its temporary file (the file is whole).
                for folder in (out, REPO_ROOT / "kernels"):  # (the tuned table is in kernels/)
                    for temporary in folder.glob(".*.tmp"):
                        temporary.unlink(missing_ok=True)

    from bench.plots import plot_all
    from bench.summary import summarize

    try:
        written = plot_all(out)
        log(f"bench: plots: {', '.join(p.name for p in written) or 'none'}")
    except Exception as error:  # a broken plot must not hide the summary
        log(f"bench: plots FAILED: {type(error).__name__}: {error}")
        failed.append("plots")
    text = summarize(out)
    if stopped:
        text += (
            f"\nSTOPPED at the deadline ({args.deadline_s:.0f}s): {', '.join(stopped)} "
            "(the rows measured before the stop are kept)"
        )
    if capped:
        text += f"\nSTOPPED at its time cap: {', '.join(capped)}"
    if not_run:
        text += f"\nnot run (deadline passed): {', '.join(not_run)}"
    if failed:
        text += f"\nFAILED stages: {', '.join(failed)}"
    text += f"\ntotal wall time {time.monotonic() - start:.0f}s"
    write_text(text + "\n", out / "summary.txt")
    sys.stdout.flush()
    print(text, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
