#!/usr/bin/env bash
# The one script for a GPU machine (H100/H200; torch and triton preinstalled, no internet):
# the CUDA-marked tests, both benchmarks at the paper configuration, then the C++/CUDA
# extension's build and its own CUDA test; logs and JSON go to OUTDIR, a short table last.
#
#   benchmarks/gpu_suite.sh OUTDIR
#   benchmarks/gpu_suite.sh --rehearse OUTDIR
#
# --rehearse runs the same commands on the CPU at the tiny configuration, one step each and
# without the build (the CUDA tests skip): a check of the script itself before it spends
# device time; CI runs it (tests/test_benchmarks.py).
#
# Every command runs under `timeout`: its own limit, cut to what is left of a 330-second
# budget (GPU_SUITE_BUDGET seconds if set), so the whole suite ends within 6 minutes (no
# autotuning sweeps, few steps) and leaves room for a rerun in a 15-minute lease; the most
# important benchmarks run first, and the limits add up to more than the budget: a command
# the budget has no time left for is skipped, and listed as such at the end. A failed or
# timed-out command is reported and the rest still run; the exit status is 1 if any failed
# (a skipped one is not a failure).
set -u -o pipefail

USAGE="usage: $0 [--rehearse] OUTDIR"
REHEARSE=0
if [[ ${1:-} == --rehearse ]]; then
    REHEARSE=1
    shift
fi
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    echo "$USAGE"
    sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"
    exit 0
fi
# An option in OUTDIR's place is a mistake, not a folder to run the suite into.
if [[ $# -ne 1 || $1 == -* ]]; then
    echo "$USAGE" >&2
    exit 2
fi
if ! mkdir -p -- "$1" || ! OUT=$(cd -- "$1" && pwd); then
    echo "gpu_suite: cannot write to OUTDIR $1" >&2
    exit 2
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
# The checkout is what runs (see the build below).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$(command -v python3 || command -v python)}
# The CPU machine rehearsing has few cores: threads would mostly wait for each other.
[[ $REHEARSE -eq 1 ]] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# What everything below imports: a missing one would fail every command. (Without triton
# the fast ops fall back to the extension or torch: said, not fatal.)
if ! missing=$("$PY" -c 'import importlib.util as u, sys
print(" ".join(m for m in ("torch", "numpy", "PIL", "tqdm", "pytest") if not u.find_spec(m)))
if not u.find_spec("triton"):
    print("no triton: the fast ops run without their Triton kernels", file=sys.stderr)'); then
    echo "gpu_suite: $PY cannot run Python with torch's packages" >&2
    exit 2
fi
if [[ -n $missing ]]; then
    echo "gpu_suite: $PY lacks these modules: $missing (no internet: carry wheels)" >&2
    exit 2
fi
START=$SECONDS
BUDGET=${GPU_SUITE_BUDGET:-330}
if ! [[ $BUDGET =~ ^[0-9]+$ ]]; then
    echo "gpu_suite: GPU_SUITE_BUDGET must be a number of seconds, not '$BUDGET'" >&2
    exit 2
fi
FAILED=() SKIPPED=()

# run NAME LIMIT_S CMD...: CMD's output goes to OUT/NAME.log. Returns 0 if it ran and
# succeeded (so did exit status OK_RC, when set); otherwise NAME is added to FAILED, or to
# SKIPPED when the budget had no time left to run it, and 1 is returned.
run() {
    local name=$1 limit=$2 left=$((BUDGET - (SECONDS - START)))
    shift 2
    if [[ $left -lt 10 ]]; then
        echo "== $name: skipped, the ${BUDGET}-second budget is spent"
        SKIPPED+=("$name")
        return 1
    fi
    [[ $limit -gt $left ]] && limit=$left
    echo "== [$((SECONDS - START)) s] $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    [[ $rc -eq ${OK_RC:-0} ]] && rc=0
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        echo "   $name: timed out after ${limit} s (see $OUT/$name.log)"
    elif [[ $rc -ne 0 ]]; then
        echo "   $name: exit $rc (see $OUT/$name.log)"
    fi
    [[ $rc -eq 0 ]] || FAILED+=("$name")
    return $((rc != 0))
}

# Quick facts first: what machine this was.
timeout 10 nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "   nvidia-smi unavailable"
timeout 20 "$PY" -c 'import torch; print(torch.__version__, torch.version.cuda,
    torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")' \
    >"$OUT/torch.txt" 2>&1
cat "$OUT/torch.txt"

# What differs in a rehearsal: the device, the sizes, and no install.
if [[ $REHEARSE -eq 1 ]]; then
    DEVICE=cpu STEP_CONFIG=tiny ALPHA_CONFIG=tiny
    KERNEL_ARGS=(--configs tiny --repeats 1 --warmup 0 --copy-mib 8)
    STEP_ARGS=(--steps 1 --warmup 0) # after each bench's own: the last one counts
else
    DEVICE=cuda STEP_CONFIG=paper ALPHA_CONFIG=small
    # The paper's shapes only (the large ones double the rows); each sample averages 10
    # back-to-back calls (the default on CUDA).
    KERNEL_ARGS=(--configs paper --repeats 10) STEP_ARGS=()
fi

# CUDA-marked tests; exit 5 means none were collected, which is fine.
# A fresh machine has no Triton cache: the first tests compile every kernel variant in both
# dtypes (about 1.5 s each on this project's CPU machine; dozens of them with the CNN's
# depthwise and pools kernels), and the benchmarks reuse the cache. -v names each test as it
# ends, so a timeout still shows which ran.
OK_RC=5 run tests 150 "$PY" -m pytest -m cuda -v -rfEs --durations=0 -p no:cacheprovider
[[ -f $OUT/tests.log ]] && tail -n 1 "$OUT/tests.log"

# Search steps at the paper configuration. Backends that can't run are listed as skipped.
# Each writes its JSON after each timed round and again after each later stage (kernels.py
# after each row), so a timeout keeps what was measured. The peak-memory subprocesses (a fresh process and model per
# configuration) run once, last, if time is left.
BACKENDS=reference,fused,fast,graphs,amp=--fast,--amp,bf16
bench() { # bench NAME LIMIT_S ARGS...
    local name=$1 limit=$2
    shift 2
    run "$name" "$limit" "$PY" benchmarks/search_step.py --config "$STEP_CONFIG" --device "$DEVICE" \
        --backends "$BACKENDS" --json "$OUT/$name.json" --memory-timeout 30 "$@" \
        "${STEP_ARGS[@]}"
}
alpha() { # alpha SPACE CONFIG: the α-gradient error of each precision mode
    run "gpu-alpha-grad-error-$1" 30 "$PY" benchmarks/alpha_grad_error.py --space "$1" \
        --config "$2" --device "$DEVICE" --json "$OUT/gpu-alpha-grad-error-$1.json"
}
bench gpu-rnn-paper-o2 100 --space rnn --order 2 --steps 3 --warmup 3 --no-memory
# The CNN also batched: fewer launches (5,586 → 4,906 a small step) but more host time and
# activation copies, so --fast leaves its w± passes separate until the GPU's time says so.
bench gpu-cnn-paper-o2 90 --space cnn --order 2 --steps 3 --warmup 3 --no-memory \
    --backends "$BACKENDS,batched=--fast,--batched-fd"
run gpu-kernels 45 "$PY" benchmarks/kernels.py --device "$DEVICE" "${KERNEL_ARGS[@]}" \
    --json "$OUT/gpu-kernels.json"
alpha rnn "$ALPHA_CONFIG"
# The tiny CNN (the small one takes minutes in float64). TF32 (cuDNN's default) shows in
# its float32 exact-HVP rows only: its finite differences are dominated by ReLU and
# max-pool switches at r = 0.01 (error 0.95 in float64 on the CPU).
alpha cnn tiny
bench gpu-rnn-paper-o1 45 --space rnn --order 1 --steps 3 --warmup 3 --no-memory
# Mostly for their peak memory; their one timed step is a replay for graphs, whose first 2
# steps run eagerly and whose third captures (search_step.py refuses fewer on CUDA).
bench gpu-rnn-paper-o2-memory 60 --space rnn --order 2 --steps 1 --warmup 3 \
    --backends reference,fast,graphs
bench gpu-cnn-paper-o2-memory 60 --space cnn --order 2 --steps 1 --warmup 3 \
    --backends reference,fast,graphs

# Build last: on a GPU the fast ops run Triton, and the extension is their fallback where
# Triton is missing, so its compile (up to 150 s) would only delay every figure above.
# In place rather than `pip install -e`: nothing is written to the image's site-packages, and
# the checkout on PYTHONPATH (whose kernels/ fastdarts loads as fastdarts.kernels) ran above
# whether or not this succeeds. Compile jobs in parallel, for Hopper unless
# TORCH_CUDA_ARCH_LIST says otherwise; then the extension's CUDA kernel against the reference.
if [[ $REHEARSE -eq 1 ]]; then
    echo "   rehearsal: no build"
elif compgen -G "csrc/*.c*" >/dev/null; then
    export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    if run build 150 "$PY" setup.py build_ext --inplace; then
        # setup.py turns a failed compile into a pure-Python build and exit 0: a failure
        # here all the same (the extension's CUDA test would only skip).
        if grep -m1 "could not build" "$OUT/build.log"; then
            echo "   build: no extension (see $OUT/build.log)"
            FAILED+=(build)
        else
            run tests-extension 40 "$PY" -m pytest -m cuda -k cuda_extension -v -rfEs \
                -p no:cacheprovider
            [[ -f $OUT/tests-extension.log ]] && tail -n 1 "$OUT/tests-extension.log"
        fi
    fi
else
    echo "   csrc/ has no extension sources: nothing to build"
fi

echo "== [$((SECONDS - START)) s] done; logs and JSON in $OUT"
echo
"$PY" benchmarks/summary.py "$OUT" | tee "$OUT/summary.md"
if [[ ${#SKIPPED[@]} -gt 0 ]]; then
    echo "skipped, the ${BUDGET}-second budget spent: ${SKIPPED[*]}"
fi
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "failed: ${FAILED[*]}"
    exit 1
fi
