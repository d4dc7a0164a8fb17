#!/usr/bin/env bash
# The one script for a GPU machine (H100/H200; torch and triton preinstalled, no internet):
# install (building the extension when csrc/ has one), the CUDA-marked tests, then both
# benchmarks at the paper configuration; logs and JSON go to OUTDIR, a short table last.
#
#   benchmarks/gpu_suite.sh OUTDIR
#
# Every command runs under `timeout`: its own limit, cut to what is left of a 290-second
# budget, so the whole suite ends within 5 minutes (no autotuning sweeps, few steps) and
# leaves room for a rerun in a 15-minute lease; the most important benchmarks run first. A
# failed or timed-out command is reported and the rest still run; the exit status is 1 if
# any failed.
set -u -o pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
# The checkout is importable even if the editable install below fails.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
START=$SECONDS
BUDGET=290
FAILED=()

# run NAME LIMIT_S CMD...: CMD's output goes to OUT/NAME.log; its exit status is returned.
run() {
    local name=$1 limit=$2 left=$((BUDGET - (SECONDS - START)))
    shift 2
    if [[ $left -lt 10 ]]; then
        echo "== $name: skipped, the ${BUDGET}-second budget is spent"
        return 124
    fi
    [[ $limit -gt $left ]] && limit=$left
    echo "== [$((SECONDS - START)) s] $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        echo "   $name: timed out after ${limit} s (see $OUT/$name.log)"
    elif [[ $rc -ne 0 ]]; then
        echo "   $name: exit $rc (see $OUT/$name.log)"
    fi
    return $rc
}

# Quick facts first: what machine this was.
timeout 10 nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "   nvidia-smi unavailable"
timeout 20 "$PY" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())' \
    >"$OUT/torch.txt" 2>&1
cat "$OUT/torch.txt"

# Install: pip builds the extension setup.py declares from csrc/ (compile jobs in parallel);
# without sources there is nothing to build and it takes seconds.
if compgen -G "csrc/*.c*" >/dev/null; then
    install_limit=150
    export MAX_JOBS=${MAX_JOBS:-16}
else
    install_limit=40
    echo "   csrc/ has no extension sources: nothing to build"
fi
run install "$install_limit" "$PY" -m pip install --no-deps --no-build-isolation -e . ||
    echo "   install failed: running from the checkout through PYTHONPATH"

# CUDA-marked tests; exit 5 means none were collected, which is fine.
run tests 30 "$PY" -m pytest -m cuda -q -p no:cacheprovider
rc=$?
[[ $rc -ne 0 && $rc -ne 5 ]] && FAILED+=(tests)

# Search steps at the paper configuration. Backends that can't run are listed as skipped.
BACKENDS=reference,fused,fast,graphs,amp=--fast,--amp,bf16
bench() { # bench NAME LIMIT_S ARGS...
    local name=$1 limit=$2
    shift 2
    run "$name" "$limit" "$PY" benchmarks/search_step.py --config paper --device cuda \
        --backends "$BACKENDS" --json "$OUT/$name.json" --memory-timeout 30 "$@" ||
        FAILED+=("$name")
}
bench gpu-rnn-paper-o2 100 --space rnn --order 2 --steps 3 --warmup 3
bench gpu-cnn-paper-o2 70 --space cnn --order 2 --steps 3 --warmup 3
run gpu-kernels 30 "$PY" benchmarks/kernels.py --device cuda --json "$OUT/gpu-kernels.json" ||
    FAILED+=(gpu-kernels)
bench gpu-rnn-paper-o1 45 --space rnn --order 1 --steps 3 --warmup 1
run gpu-alpha-grad-error 30 "$PY" benchmarks/alpha_grad_error.py --space rnn --config small \
    --device cuda --json "$OUT/gpu-alpha-grad-error-rnn.json" || FAILED+=(gpu-alpha-grad-error)

echo "== [$((SECONDS - START)) s] done; logs and JSON in $OUT"
echo
"$PY" benchmarks/summary.py "$OUT" | tee "$OUT/summary.md"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "failed: ${FAILED[*]}"
    exit 1
fi
