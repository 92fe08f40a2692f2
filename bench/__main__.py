"""The whole benchmark suite: ``python -m bench --out DIR`` (what ``make bench`` runs).

With a CUDA GPU (full suite, see ``bench/gpu.sh``):
    model summary (``python -m scconv summary``) -> check (Triton kernels vs the eager
    reference) -> sweep (autotune table) -> gating micro-benchmark -> models (+ per-op
    breakdown) -> plots -> summary.
Without one (CPU mode, labelled as such in every CSV row, plot title and the summary):
    model summary -> check through Triton's interpreter (correctness only, never timed) ->
    gating (eager and torch.compile, batch 1, fp32) -> models (parameters and GMACs, then eager
    at 128 px, batch 2, and torch.compile inference of SCNet-50 and ResNet-50) -> plots ->
    summary. One torch thread per stage unless ``--threads`` says otherwise.
``--dry-run`` runs every stage on tiny inputs on the CPU (minutes -> seconds): a plumbing check.

Each stage runs in its own Python process (a failure or a CUDA error in one does not stop the
others; the interpreter switch is per process) and shares the run's timestamp. The summary is
printed last; the exit status is 1 if any stage failed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import REPO_ROOT, log, write_text


@dataclass
class Stage:
    name: str
    args: list[str]  # arguments after ``python -m``
    share: float = 0.0  # fraction of the budget left that this stage may use (0: no budget)
    capture: str | None = None  # file in the output directory that receives stdout


def plan(out: Path, gpu: bool, dry_run: bool) -> list[Stage]:
    """The stages of one run, in order."""
    o = ["--out", str(out)]
    if dry_run:
        return [
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
        return [
            Stage("summary", ["scconv", "summary"], capture="model_summary.txt"),
            Stage("check", ["bench.check", *o]),
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


def run_stage(stage: Stage, out: Path, env: dict, budget_s: float | None) -> tuple[bool, float]:
    """Run one stage; returns (succeeded, seconds)."""
    command = [sys.executable, "-m", *stage.args]
    if budget_s is not None and stage.share:
        command += ["--budget-s", f"{budget_s:.0f}"]
    log(f"\n=== bench: stage {stage.name}: {' '.join(command[1:])}")
    start = time.monotonic()
    if stage.capture:
        result = subprocess.run(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
        sys.stderr.write(result.stdout)
        if result.returncode == 0:
            write_text(result.stdout, out / stage.capture)
    else:
        result = subprocess.run(command, env=env, cwd=REPO_ROOT, stdout=sys.stderr)
    seconds = time.monotonic() - start
    ok = result.returncode == 0
    log(f"=== bench: stage {stage.name} {'done' if ok else 'FAILED'} in {seconds:.0f}s")
    return ok, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output directory for CSVs, PNGs, summary")
    parser.add_argument("--dry-run", action="store_true", help="tiny inputs on the CPU")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall-clock seconds for the measuring stages (default: 480 on the CPU, none on a "
        "GPU; bench/gpu.sh passes its own); stages skip what no longer fits",
    )
    parser.add_argument("--skip", default="", help="comma-separated stage names to leave out")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU mode: torch threads per stage (default 1, or $OMP_NUM_THREADS if set)",
    )
    args = parser.parse_args(argv)

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
    skip = {name for name in args.skip.split(",") if name}
    stages = [s for s in plan(out, gpu, args.dry_run) if s.name not in skip]

    mode = "dry run (CPU, tiny inputs)" if args.dry_run else ("GPU" if gpu else "CPU mode")
    log(f"bench: {mode}; writing to {out}" + (f"; budget {budget_s:.0f}s" if budget_s else ""))
    start = time.monotonic()
    failed = []
    for stage in stages:
        stage_budget = None
        if budget_s is not None and stage.share:
            left = budget_s - (time.monotonic() - start)
            stage_budget = max(left * stage.share, 0.0)
        ok, _ = run_stage(stage, out, env, stage_budget)
        if not ok:
            failed.append(stage.name)

    from bench.plots import plot_all
    from bench.summary import summarize

    try:
        written = plot_all(out)
        log(f"bench: plots: {', '.join(p.name for p in written) or 'none'}")
    except Exception as error:  # a broken plot must not hide the summary
        log(f"bench: plots FAILED: {type(error).__name__}: {error}")
        failed.append("plots")
    text = summarize(out)
    text += f"\ntotal wall time {time.monotonic() - start:.0f}s"
    if failed:
        text += f"\nFAILED stages: {', '.join(failed)}"
    write_text(text + "\n", out / "summary.txt")
    sys.stdout.flush()
    print(text, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
