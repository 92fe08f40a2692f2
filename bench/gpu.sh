#!/usr/bin/env bash
# The whole GPU benchmark suite in one command, for a machine with one CUDA GPU and no network.
#
#   bench/gpu.sh [OUTDIR]            default OUTDIR: bench/results/<gpu-name>, e.g. nvidia-h200
#   bench/gpu.sh [OUTDIR] --dry-run  the same pipeline on the CPU with tiny inputs (a plumbing
#                                    check; default OUTDIR: $TMPDIR/scconv-bench-dry-run)
#
# Needs python3 with torch, triton, torchvision, pandas and matplotlib already installed: nothing
# is installed, the repository is imported through PYTHONPATH=. (no pip install). Runs tests
# (the kernel, gated-model and inference test files on the GPU, at most SCCONV_BENCH_TESTS_S;
# pytest.log) -> check -> autotune sweep (writes kernels/tuned_configs.json) -> gating -> models
# -> plots, each stage skipping what no longer fits in the time budget, writes everything to
# OUTDIR (log.txt included) and prints the summary last.
#
# Environment: PYTHON (default python3), SCCONV_BENCH_BUDGET_S (default 470: seconds for the
# tests and the measuring stages, chosen to keep the whole run under 9 minutes on one H100 or
# H200 with ~70 s for start-up, plots and summary; raise it for a fuller grid),
# SCCONV_BENCH_TESTS_S (default 150; 0: no tests), SCCONV_BENCH_DEADLINE_S (default 540:
# hard limit in whole seconds from the start of this script; a stage still running then is
# stopped (SIGTERM; it has up to 15 s to write the rows it holds before SIGKILL), and the plots
# and the summary still follow), SCCONV_BENCH_COMMIT (the commit a tree without .git was copied
# from, recorded in every CSV row), SCCONV_BENCH_DRY_RUN=1 (= --dry-run).
set -euo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT=""
DRY_RUN="${SCCONV_BENCH_DRY_RUN:-0}"
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "bench/gpu.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
        *)
            if [[ -n "$OUT" ]]; then echo "bench/gpu.sh: one OUTDIR only" >&2; exit 2; fi
            OUT="$arg" ;;
    esac
done
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
DEADLINE_S="${SCCONV_BENCH_DEADLINE_S:-540}"
if ! [[ "$DEADLINE_S" =~ ^[0-9]+$ ]] || (( 10#$DEADLINE_S == 0 )); then
    echo "bench/gpu.sh: SCCONV_BENCH_DEADLINE_S must be a positive whole number of seconds," \
         "got '$DEADLINE_S'" >&2
    exit 2
fi
DEADLINE_S=$(( 10#$DEADLINE_S ))  # no octal reading of a leading zero
# What is left of the deadline now ($SECONDS: seconds since this script started), at least 1 s.
deadline_left() { local left=$(( DEADLINE_S - SECONDS )); echo $(( left > 0 ? left : 1 )); }

# Nothing is installed here: name what $PY lacks before anything starts.
missing_modules() {
    "$PY" -c 'import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' "$@"
}
NEEDED="torch triton torchvision pandas matplotlib"
if ! MISSING="$(missing_modules $NEEDED)"; then
    echo "bench/gpu.sh: cannot run '$PY' (set PYTHON to a Python with $NEEDED)" >&2
    exit 2
fi
if [[ -n "$MISSING" ]]; then
    echo "bench/gpu.sh: '$PY' has no $MISSING; set PYTHON to a Python with $NEEDED" \
         "(e.g. PYTHON=.venv/bin/python after 'make install')" >&2
    exit 2
fi
# Only the tests stage needs these: without them it fails and the benchmark still runs.
TEST_MISSING="$(missing_modules pytest hypothesis)"
if [[ -n "$TEST_MISSING" && "${SCCONV_BENCH_TESTS_S:-150}" != 0 ]]; then
    echo "bench/gpu.sh: warning: '$PY' has no $TEST_MISSING, so the tests stage will fail" \
         "(the other stages still run; SCCONV_BENCH_TESTS_S=0 leaves it out)" >&2
fi

if [[ "$DRY_RUN" == 1 ]]; then
    OUT="${OUT:-${TMPDIR:-/tmp}/scconv-bench-dry-run}"
    mkdir -p "$OUT"
    # pipefail: the pipeline fails when python does; the summary stays the last output.
    "$PY" -m bench --out "$OUT" --dry-run --tests-s "${SCCONV_BENCH_TESTS_S:-150}" \
        --deadline-s "$(deadline_left)" 2>&1 | tee "$OUT/log.txt"
    exit 0
fi

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh: no CUDA GPU visible to $PY; use 'make bench' for the CPU mode," \
         "or --dry-run for a plumbing check" >&2
    exit 2
fi
if [[ -z "$OUT" ]]; then
    OUT="$("$PY" -c 'from bench.common import default_out_dir; print(default_out_dir("cuda"))')"
fi
mkdir -p "$OUT"
echo "bench/gpu.sh: writing to $OUT (budget ${SCCONV_BENCH_BUDGET_S:-470}s," \
     "deadline ${DEADLINE_S}s)" >&2
"$PY" -m bench --out "$OUT" --budget-s "${SCCONV_BENCH_BUDGET_S:-470}" \
    --tests-s "${SCCONV_BENCH_TESTS_S:-150}" --deadline-s "$(deadline_left)" 2>&1 \
    | tee "$OUT/log.txt"
