#!/usr/bin/env bash
# GPU check: environment report, install, CUDA extension build, GPU tests, then `fusedrl bench`.
#
#   benchmarks/gpu_check.sh [--part NAME] [--budget SECONDS] [--no-tests | --tests FILE[::TEST] ...] [--profile] [--list]
#
# Run from the repository root on the GPU machine (no internet). NAME is a case module of
# fusedrl/bench/cases (e.g. diffusion_step: its tests are tests/test_NAME*.py and tests/test_bench.py),
# `tests` (the build and the kernels' tests, no benchmark) or `all` (the kernels' tests, every op; the
# default). Logs and results go to $OUT (default ./gpu_out), in five files (the device runner returns
# only a few): summary.txt, env.txt (versions, install, CUDA extension build, `fusedrl info`),
# tests.log, bench.log, bench.csv (charts: `fusedrl bench --from-csv bench.csv --plot DIR` back here).
# Every step runs under `timeout`, sized so that the whole script ends within the budget (default
# 420 s). A failing step does not stop the later ones; the exit status is non-zero when any failed.
#
# The benchmark runs in two passes so that a tight budget still yields the fused kernels' numbers:
# first eager, fusedrl's backends and the peers, then eager + torch.compile (~10-20 s of compiling per
# case), each with its own eager baseline for `speedup_vs_eager`. With `--part all`, the first pass
# runs op by op (BENCH_PLAN: each op's dtypes, reps and providers sized to fit one device call),
# so that one slow op cannot starve the others. Peers the image lacks (Liger-Kernel, Cut
# Cross-Entropy, TRL, diffusers) come as wheels in .whl/: run benchmarks/fetch_wheels.sh here first
# and carry .whl. Tests run in parallel (pytest-xdist) when it is installed. --list prints the parts
# and their time caps for the budget given. --no-tests skips the test step (a second part in the same device
# call, after `--part tests` has run them); --tests (repeatable) runs only the tests named instead of the part's
# (e.g. the ones that failed in the last run: `--part tests --tests tests/test_cuda_build.py`). --profile runs each
# provider of the first pass once more under torch.profiler: where its GPU time goes, by kind of kernel, in
# $OUT/profile/ (profile.csv and a report per call; `fusedrl bench --profile`).
set -uo pipefail

# The first pass of `--part all`, op by op: "case module|cap %|reserve %|options". bf16 at the sizes
# of issue 3/4 (fp32 token log-probs at N = 8192, V = 131072 take ~0.5 s a call); sdpa_* are torch's
# attention backends, one at a time.
BENCH_PLAN=(
    "token_logprobs|18|35|--dtypes bf16 --reps 10 --providers eager,triton,triton_chunked,trl,liger,cce"
    "attention|18|22|--dtypes bf16 --reps 20"
    "checkpointing|8|16|--reps 5"
    "rewards|12|8|--reps 3"
    "grpo_loss|4|6|--reps 50"
    "diffusion_step|5|3|--reps 50"
    "logprobs|4|4|--reps 50"
    "backbone|4|1|--dtypes bf16 --reps 50"
)

# Parts with their own bench cap and options ("part|cap %|reserve %|tests|fusedrl bench options", the options
# naming the ops; tests: 1 = the part's tests and the CUDA extension's first, 0 = none, they run in
# `--part tests`); any other NAME is a case module run with "45|12|1|" (default reps) and the compile pass.
# The train_step parts (whole training steps at real size, each model built once) have no torch.compile
# provider; on an H200 (2026-11-27) a step took 0.94 s (SD3.5-M group), 7.2 s (DRaFT-50, plain loop),
# 0.32 s (Qwen-1.5B) and 4.0 s (Llama-8B), and a measurement takes a warm-up, an issue-time call and the
# reps. token_logprobs compares its two Triton strategies with the peers at issue 3's sizes (fusedrl's
# torch path, ~1-3 s a call there, is left out).
PART_PLAN=(
    "token_logprobs|60|0|1|--ops token_logprobs --dtypes bf16 --providers eager,triton,triton_chunked,trl,liger,cce --reps 10"
    "train_step|85|0|0|--ops train_step --reps 3"
    "diffusion_memory|85|0|0|--ops diffusion_grpo_step,reward_backprop_step --reps 3"
    "llm_vs_trl|85|0|0|--ops llm_grpo_step --reps 3 --providers eager,trl,fusedrl,fusedrl_offload,fusedrl_backbone,fusedrl_backbone_offload"
)

PART=all
BUDGET=420
LIST=0
RUN_TESTS=1
ONLY_TESTS=()
PROFILE=0
# the value of option $1, or an error naming it (a missing value, or the next option taken for one)
value_of() {
    if [ $# -lt 2 ] || [ "${2#--}" != "$2" ]; then
        echo "gpu_check.sh: $1 needs a value (benchmarks/gpu_check.sh --help)" >&2
        exit 2
    fi
}
while [ $# -gt 0 ]; do
    case "$1" in
        --part) value_of "$@"; PART="$2"; shift 2 ;;
        --budget) value_of "$@"; BUDGET="$2"; shift 2 ;;
        --list) LIST=1; shift ;;
        --no-tests) RUN_TESTS=0; shift ;;
        --tests) value_of "$@"; ONLY_TESTS+=("$2"); shift 2 ;;
        --profile) PROFILE=1; shift ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$BUDGET" in
    ''|*[!0-9]*) echo "gpu_check.sh: --budget must be a whole number of seconds, got '$BUDGET'" >&2; exit 2 ;;
esac
# a part name is checked before anything runs (a typo would otherwise cost the install and the build)
KNOWN_PARTS="all tests engine"
for entry in "${PART_PLAN[@]}"; do KNOWN_PARTS="$KNOWN_PARTS ${entry%%|*}"; done
CASES_DIR="$(dirname "$0")/../fusedrl/bench/cases"
if [[ " $KNOWN_PARTS " != *" $PART "* ]] && { [[ "$PART" == _* ]] || [ ! -f "$CASES_DIR/$PART.py" ]; }; then
    cases=$(cd "$CASES_DIR" && ls ./*.py | sed 's|^\./||; s|\.py$||' | grep -v '^_' | tr '\n' ' ')
    echo "gpu_check.sh: unknown part '$PART'; parts: $KNOWN_PARTS, or a case module: $cases(--list)" >&2
    exit 2
fi

if [ "$LIST" = 1 ]; then
    echo "parts (benchmarks/gpu_check.sh --part NAME --budget SECONDS; budget $BUDGET s here):"
    echo "  tests   the CUDA extension build and the kernels' GPU tests, the whole budget (~230 s on an H200: give it 300)"
    echo "  all     build, the kernels' tests (<= 25%), then each op's first bench pass under its cap:"
    for entry in "${BENCH_PLAN[@]}"; do
        IFS='|' read -r op cap _ options <<<"$entry"
        printf '            %-15s <= %3d s  (%s)\n' "$op" $(( cap * BUDGET / 100 )) "$options"
    done
    echo "          then torch.compile with what is left"
    echo "  engine  the three trainers' embedded defaults on the GPU (60 / 40 / 150 steps), run folders in \$OUT/runs"
    echo "  NAME    one case module of fusedrl/bench/cases (e.g. rewards): its tests, then its cases"
    echo "  token_logprobs    its tests, then both Triton strategies (fused, chunked) vs eager, TRL, Liger, CCE at"
    echo "                    issue 3's sizes in bf16, 10 reps, bench <= 60% of the budget, no compile pass"
    echo "  train_step        whole training steps at real size, fusedrl vs the plain loop and TRL, time and whole peak"
    echo "                    memory, 3 reps, no tests, bench <= 85% of the budget (~5 min on an H200); its halves:"
    echo "  diffusion_memory  SD3.5-M-sized GRPO step (group 8, 512 px) and SD1.5-sized DRaFT-50 (issue 6 item 9), ~3 min"
    echo "  llm_vs_trl        GRPO step on Qwen2.5-1.5B-sized (8 x 1024) and Llama-8B-sized (8 x 4096) models (issue 7): the"
    echo "                    plain loop, TRL and fusedrl (fused head; + offloaded layer inputs; + fused backbone), ~3.5 min"
    exit 0
fi

cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-$PWD/gpu_out}"
PROFILE_ARGS=()
[ "$PROFILE" = 1 ] && PROFILE_ARGS=(--profile "$OUT/profile")
mkdir -p "$OUT"
PY="${PYTHON:-python}"
START=$SECONDS
# `timeout --kill-after` may overrun a step's limit by this much; keep it out of the budget.
SLACK=15
FAILED=()

left() { echo $(( BUDGET - SLACK - (SECONDS - START) )); }

# step NAME LOG CAP RESERVE CMD...: run CMD with a time limit of CAP percent of the budget, or less
# so that RESERVE percent remain for the later steps; output appended to $OUT/LOG; returns CMD's status.
step() {
    local name=$1 log="$OUT/$2" cap=$(( $3 * BUDGET / 100 )) reserve=$(( $4 * BUDGET / 100 ))
    shift 4
    local limit=$(( $(left) - reserve ))
    [ "$limit" -gt "$cap" ] && limit=$cap
    if [ "$limit" -lt 5 ]; then
        echo "== $name: skipped, the budget is spent" | tee -a "$OUT/summary.txt"
        return 124
    fi
    echo "== $name (limit ${limit} s)" | tee -a "$log"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    tail -n 15 "$log" | sed 's/^/   /'
    echo "== $name: rc=$rc in $(( SECONDS - t0 )) s" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 124 ] && echo "   (timed out)" | tee -a "$OUT/summary.txt"
    return "$rc"
}

env_report() {
    echo "== date"; date -u
    echo "== kernel"; uname -r
    echo "== nvidia-smi"; timeout 20 nvidia-smi || echo "nvidia-smi failed"
    echo "== python and packages"
    timeout 60 "$PY" - <<'PY' || echo "python version report failed"
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "CUDA runtime", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "sm", torch.cuda.get_device_capability())
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton unavailable:", exc)
PY
    echo "== nvcc"; timeout 20 nvcc --version || echo "nvcc not on PATH"
    echo "== pip"; timeout 60 "$PY" -m pip list 2>/dev/null | grep -i -E "^(torch|triton|setuptools|wheel|ninja|pytest|numpy|diffusers|matplotlib)" || true
}

# Without an install, `fusedrl.kernels` / `fusedrl.engine` (top-level kernels/ and engine/ that
# setup.py maps into the package) do not import from the source tree: link them into fusedrl/ for the
# length of this script. (A shim folder on PYTHONPATH would not do: the working directory comes first
# on sys.path and its fusedrl/ would shadow the shim.)
SHIM_LINKS=()
shim() {
    local name
    for name in kernels engine; do
        if [ ! -e "fusedrl/$name" ]; then
            ln -s "../$name" "fusedrl/$name" && SHIM_LINKS+=("fusedrl/$name")
        fi
    done
    "$PY" -c "import fusedrl.kernels; print('fusedrl imports from the source tree:', fusedrl.kernels.__file__)"
}
remove_shim() {
    local link
    for link in "${SHIM_LINKS[@]}"; do [ -L "$link" ] && rm -f "$link"; done
}
trap remove_shim EXIT

if [ "$PART" = engine ]; then
    OPS_ARGS=()
    TESTS=()  # the engine's tests run on CPUs in CI; this part runs the trainers themselves on the GPU
elif [ "$PART" = all ] || [ "$PART" = tests ]; then
    OPS_ARGS=()
    # the kernels' tests (the engine's and the integrations' run on CPUs in CI)
    TESTS=(tests/test_diffusion_step*.py tests/test_logprobs.py tests/test_token_logprobs.py tests/test_grpo_loss.py
           tests/test_fused_linear_grpo.py tests/test_advantages.py tests/test_attention.py
           tests/test_attention_xformers.py tests/test_checkpointing.py tests/test_checkpointing_stash.py tests/test_input_offload.py
           tests/test_cuda_build.py tests/test_tiles.py tests/test_peers.py tests/test_backbone*.py)  # (test_triton_compile: CPU, in CI)
else
    # a case module by default; a part of PART_PLAN names its ops in its options and has its own settings
    OPS_ARGS=(--ops "$PART") PART_TESTS=1 cap=45 reserve=12 options="" compile_pass=1
    for entry in "${PART_PLAN[@]}"; do
        IFS='|' read -r op c r t o <<<"$entry"
        if [ "$op" = "$PART" ]; then
            OPS_ARGS=() PART_TESTS=$t cap=$c reserve=$r options=$o compile_pass=0
        fi
    done
    # checkpointing's providers are its policies: it has no eager or torch.compile provider to compare
    [ "$PART" = checkpointing ] && compile_pass=0
    shopt -s nullglob
    # the part's own tests, the CUDA extension's (its kernels vs Triton's on the GPU), the runner's
    TESTS=(tests/test_"$PART"*.py tests/test_cuda_build.py tests/test_bench.py)
    shopt -u nullglob
    [ "$PART_TESTS" = 0 ] && TESTS=()
fi

: >"$OUT/summary.txt"
echo "gpu_check: part=$PART budget=${BUDGET}s out=$OUT" | tee -a "$OUT/summary.txt"
env_report >"$OUT/env.txt" 2>&1
echo "== env: $OUT/env.txt"

# Wheels carried in .whl/ (benchmarks/fetch_wheels.sh: peers and drop-in libraries the image lacks).
if compgen -G ".whl/*.whl" >/dev/null; then
    step wheels env.txt 10 80 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# No network: build with the setuptools already installed and fetch nothing.
step install env.txt 25 60 "$PY" -m pip install -e . --no-deps --no-build-isolation --no-index
if ! "$PY" -c "import fusedrl.kernels" 2>/dev/null; then
    if shim >>"$OUT/env.txt" 2>&1; then
        echo "   pip install -e failed; fusedrl imports through links in fusedrl/" | tee -a "$OUT/summary.txt"
    else
        FAILED+=("install: fusedrl does not import")
    fi
fi

export MAX_JOBS="${MAX_JOBS:-16}"  # ninja compiles the .cu files side by side
# A build cut by its time limit in an earlier call on this machine leaves torch's lock file (a FileBaton, torch
# < 2.14) in the build folder, and every later build would wait on it for ever: no other build runs now, so any
# such lock is stale, whatever its age (cuda_ext.clear_stale_lock, which build() runs with a 30-minute age).
"$PY" -c "from fusedrl.kernels import cuda_ext
for folder in cuda_ext.cache_dir().glob('*'):
    cuda_ext.clear_stale_lock(folder, max_age_s=0)" >>"$OUT/env.txt" 2>&1
# the build (55-60 s on an H200's 16 cores) keeps 60% of the budget for the tests and benchmarks after it; 40% in
# `--part tests`, where the tests alone follow (a 240 s budget leaves the build ~85 s)
BUILD_RESERVE=60
[ "$PART" = tests ] && BUILD_RESERVE=40
step build_ext env.txt 35 "$BUILD_RESERVE" "$PY" -c "from fusedrl.kernels import cuda_ext; print(cuda_ext.build())" \
    || FAILED+=("build_ext")
step info env.txt 10 40 "$PY" -m fusedrl info || FAILED+=("info")

# Tests: in parallel where pytest-xdist is installed (Triton's compiles are CPU-bound); a test that
# hangs fails alone (pytest-timeout) instead of taking the step's whole limit. -v names each result as
# it comes, so a step cut by its time limit still says which tests failed. On an H200 the kernels'
# tests took ~140 s with 12 workers.
[ "${#ONLY_TESTS[@]}" -gt 0 ] && TESTS=("${ONLY_TESTS[@]}")
TEST_CAP=25 TEST_RESERVE=55  # % of the budget: the tests' cap, and what they leave to the benchmarks
[ "$PART" = tests ] && TEST_CAP=100 TEST_RESERVE=0
TEST_ARGS=(-v --maxfail=50 -rfE -p no:cacheprovider)
"$PY" -c "import xdist" 2>/dev/null && TEST_ARGS+=(-n "${TEST_WORKERS:-12}")
"$PY" -c "import pytest_timeout" 2>/dev/null && TEST_ARGS+=(--timeout 240)
if [ "$RUN_TESTS" = 1 ] && [ "${#TESTS[@]}" -gt 0 ]; then
    step tests tests.log "$TEST_CAP" "$TEST_RESERVE" env TRITON_INTERPRET=0 "$PY" -m pytest "${TESTS[@]}" \
        "${TEST_ARGS[@]}" || FAILED+=("tests")
fi

# --part engine: the three trainers' embedded defaults on the GPU (the fused kernels under real training),
# short runs; run folders (config, metrics.csv, train.log with the reward summary and the peak GPU memory,
# metrics.png, sample grids) under $OUT/runs.
if [ "$PART" = engine ]; then
    RUN_ARGS=(--no-run.progress --no-run.tensorboard)
    step engine_diffusion_grpo engine.log 35 45 "$PY" -m fusedrl train diffusion-grpo --out "$OUT/runs/diffusion-grpo" \
        --run.steps 60 --run.checkpoint_every 0 "${RUN_ARGS[@]}" || FAILED+=("engine_diffusion_grpo")
    step engine_reward_backprop engine.log 30 20 "$PY" -m fusedrl train reward-backprop \
        --out "$OUT/runs/reward-backprop" --run.steps 40 --run.checkpoint_every 0 "${RUN_ARGS[@]}" \
        || FAILED+=("engine_reward_backprop")
    step engine_llm_grpo engine.log 30 0 "$PY" -m fusedrl train llm-grpo --out "$OUT/runs/llm-grpo" --run.steps 150 \
        --run.checkpoint_every 0 "${RUN_ARGS[@]}" || FAILED+=("engine_llm_grpo")
    grep -h -E "reward_mean: first|peak GPU memory|stopped|Error" "$OUT"/runs/*/train.log 2>/dev/null \
        | tee -a "$OUT/summary.txt"
    echo "gpu_check: $(( SECONDS - START )) s" | tee -a "$OUT/summary.txt"
    [ "${#FAILED[@]}" -gt 0 ] && { printf 'FAILED: %s\n' "${FAILED[@]}" | tee -a "$OUT/summary.txt"; exit 1; }
    echo "all steps passed" | tee -a "$OUT/summary.txt"
    exit 0
fi


if [ "$PART" = tests ]; then
    echo "gpu_check: $(( SECONDS - START )) s" | tee -a "$OUT/summary.txt"
    [ "${#FAILED[@]}" -gt 0 ] && { printf 'FAILED: %s\n' "${FAILED[@]}" | tee -a "$OUT/summary.txt"; exit 1; }
    echo "all steps passed" | tee -a "$OUT/summary.txt"
    exit 0
fi

# First pass: every provider but torch.compile (fusedrl's backends and the installed peers).
if [ "$PART" = all ]; then
    for entry in "${BENCH_PLAN[@]}"; do
        IFS='|' read -r op cap reserve options <<<"$entry"
        # shellcheck disable=SC2086  # options are words
        step "bench_$op" bench.log "$cap" "$reserve" "$PY" -m fusedrl bench --ops "$op" --no-compile $options \
            "${PROFILE_ARGS[@]}" --csv "$OUT/bench.csv" || FAILED+=("bench_$op")
    done
else
    # shellcheck disable=SC2086  # options are words
    step bench_fused bench.log "$cap" "$reserve" "$PY" -m fusedrl bench "${OPS_ARGS[@]}" --no-compile $options \
        "${PROFILE_ARGS[@]}" --csv "$OUT/bench.csv" || FAILED+=("bench_fused")
fi
# The compile pass gets whatever time is left; running out of it is no failure (its rows so far are kept).
# Parts of PART_PLAN have no torch.compile provider (whole training steps).
if [ "$PART" = all ] || [ "${compile_pass:-1}" = 1 ]; then
    step bench_compile bench.log 100 0 "$PY" -m fusedrl bench "${OPS_ARGS[@]}" --providers eager,compile \
        --dtypes bf16 --reps 20 --csv "$OUT/bench.csv"
    rc=$?
    [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && FAILED+=("bench_compile")
fi

echo "gpu_check: $(( SECONDS - START )) s" | tee -a "$OUT/summary.txt"
if [ "${#FAILED[@]}" -gt 0 ]; then
    printf 'FAILED: %s\n' "${FAILED[@]}" | tee -a "$OUT/summary.txt"
    exit 1
fi
echo "all steps passed" | tee -a "$OUT/summary.txt"
