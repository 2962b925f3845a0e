#!/usr/bin/env bash
# The GPU check in one script: install, build, lean GPU tests, then the benchmarks at the sizes that matter.
#
#   bash benchmarks/gpu_check.sh                 # on a bare GPU machine, run from anywhere in the checkout
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --cpu-dry-run
#                                                # here: the stages that run on a CPU, at toy sizes, in a temp folder
#
# The GPU machine has torch, triton, pybind11, cmake and nvcc but not pydantic, DeepSpeed or hjson: their wheels
# travel along in .whl/ (git-ignored; fill it with the wheels script named in benchmarks/README.md, "GPU check").
# Stages, in priority order, each under its own `timeout` and within one overall budget (GPU_CHECK_BUDGET_S,
# default 450 s, so the whole run stays under 8 minutes on one H200); a stage that fails or times out does not stop
# the next one, and a stage that would start with under 15 s of budget left is skipped and says so:
#   env            nvidia-smi, versions
#   install        the wheels in .whl/ into /tmp/site (no index, no dependencies: the image has the rest)
#   build          mixfast._C with the CUDA kernels for this GPU's architecture (sm_XY from torch)
#   tests-cuda     gpu-marked tests of the ops and the DALI GPU pipeline, minus the Triton cases and the
#                  ahead-of-time compile tests (CUDA kernels are prebuilt, so these are quick)
#   tests-triton   a handful of Triton parity cases (each compiles kernels, ~3 s a case): the fused mask+mix and
#                  mix+unmix ops in bf16 (NCHW and channels_last), soft-InfoNCE in the trainer's MoCo mode (bf16
#                  tolerance case, and fp32 at one shape with one and two positives)
#   bench-train    bench_train.py rows (a)-(e) and (g) at the config's sizes (B=256, 224², ResNet-50)
#   bench-mix      bench_mix.py: B=256, 3x224², bf16, channels_last, with switch, grid 8
#   bench-infonce  bench_infonce.py: M=768, K=65,536, D=128, fp32 (the trainer's dtype: the encoders return fp32
#                  embeddings and the queue is fp32, also under bf16 autocast)
#   bench-compile  bench_train.py rows (d), (f) and (g): torch.compile of ResNet-50 takes minutes, so it runs last,
#                  in its own invocation, and its ratios come from that run
#   tests-adios    the step-sync tests of the adversarial-masking and autoencoder methods (ADIOS, sequential, MoCo
#                  ADIOS-s, MAE, MixedAE) on the GPU
#   bench-adios    bench_train.py rows (a)-(c) and (g) for SimCLR + ADIOS and SimCLR + sequential masking at the
#                  ImageNet-100-S sizes (B=128, 96², ResNet-18), and bench_occlude.py on the GPU
#   tests-mixedae  the TopK attention and group-mixing op tests (on the GPU: CUDA, FlexAttention, Triton) and test_mae
#   bench-mae      bench_train.py rows (a), (b), (d) and (g) for MAE and MixedAE ViT-B/16 (B=256, 224²): (a) runs the
#                  reference TopK attention, (d) the fused one
#   bench-topk     bench_topk_attention.py (MixedAE's homologous attention): reference vs the fused paths
# GPU_CHECK_STAGES=name,name,... runs only those stages (env and install always run); default: all.
# Everything lands in benchmarks/results/gpu-check-<UTC time>/ (one log per stage, the JSON/CSV results, summary.txt)
# and, if $OUT is set, is copied there after every stage, with a tarball of the folder at the end.
# MIXFAST_COMMIT=<hash> records the commit in the results where the checkout has no .git.
set -uo pipefail

MODE=gpu
case "${1:-}" in
  "") ;;
  --cpu-dry-run) MODE=cpu ;;
  *) echo "gpu_check.sh: unknown argument '$1' (the only option is --cpu-dry-run)" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
START=$(date +%s)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
if [[ $MODE == gpu ]]; then
  RUN_DIR=benchmarks/results/gpu-check-$STAMP
  TAG=gpu-check
else
  RUN_DIR=$(mktemp -d /tmp/gpu-check-dry-run.XXXXXX)  # nothing written into the checkout
  TAG=cpu-dry-run
fi
mkdir -p "$RUN_DIR"
SUMMARY=$RUN_DIR/summary.txt
: > "$SUMMARY"

publish() {  # everything measured so far, to $OUT, as soon as it exists
  if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT" && cp -r "$RUN_DIR"/. "$OUT"/ 2>/dev/null
  fi
  return 0
}

collect() {  # bench_mix / bench_infonce write benchmarks/results/<name>-<tag>.{json,csv}: move them into the run
  local f
  for f in benchmarks/results/"$1"-"$TAG".json benchmarks/results/"$1"-"$TAG".csv; do
    [[ -e $f ]] && mv "$f" "$RUN_DIR"/
  done
  return 0
}

selected() {  # is stage NAME in GPU_CHECK_STAGES (empty = all)? env and install always run
  [[ -z "${GPU_CHECK_STAGES:-}" || $1 == env || $1 == install || ",$GPU_CHECK_STAGES," == *",$1,"* ]]
}

stage() {  # stage NAME CAP_SECONDS 'COMMAND' -- runs under bash -c, output in RUN_DIR/NAME.log
  local name=$1 cap=$2 cmd=$3
  selected "$name" || return 0
  local left=$(( START + BUDGET_S - $(date +%s) ))
  if (( left < 15 )); then
    echo "$name: skipped (budget of ${BUDGET_S} s spent)" | tee -a "$SUMMARY"
    return 0
  fi
  local limit=$(( cap < left ? cap : left ))
  local t0=$(date +%s)
  echo "=== $name (timeout ${limit} s) === $cmd"
  timeout --kill-after=10 "$limit" bash -c "$cmd" > "$RUN_DIR/$name.log" 2>&1
  local rc=$?
  local how="rc=$rc"
  (( rc == 124 || rc == 137 )) && how="timed out after ${limit} s"
  tail -n 12 "$RUN_DIR/$name.log"
  echo "$name: $how ($(( $(date +%s) - t0 )) s)" | tee -a "$SUMMARY"
  publish
  return 0
}

# --- env -----------------------------------------------------------------------------------------------------
stage env 30 "(nvidia-smi || true); $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available() and torch.cuda.get_device_name(0))'; $PY -c 'import triton; print(\"triton\", triton.__version__)'"

# --- install -------------------------------------------------------------------------------------------------
if [[ $MODE == gpu ]]; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    stage install 60 "$PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && ls /tmp/site"
  else
    echo "install: no .whl/*.whl (send .whl along: carry [\".whl\"]); DeepSpeed/pydantic stages will fail" | tee -a "$SUMMARY"
  fi
  export PYTHONPATH=$ROOT:/tmp/site${PYTHONPATH:+:$PYTHONPATH} DS_BUILD_OPS=0
else
  echo "install: skipped (--cpu-dry-run uses $PY's packages)" | tee -a "$SUMMARY"
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi

# --- build ---------------------------------------------------------------------------------------------------
if [[ $MODE == gpu ]]; then
  ARCH=$($PY -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 90)
  stage build 150 "MIXFAST_CUDA=1 MIXFAST_CUDA_ARCHS=$ARCH $PY setup.py build_ext --inplace && $PY -c 'from mixfast.ops import _native; print(_native.build_info())'"
else
  # a CPU build would replace the mixfast/_C*.so in use; report what is there instead
  stage build 60 "$PY -c 'from mixfast.ops import _native; print(_native.build_info())'"
fi

# --- tests ---------------------------------------------------------------------------------------------------
PYTEST="$PY -m pytest -q -p no:cacheprovider -rfE"
TRITON_CASES="(make_masks_and_mix_fused and bfloat16) or (mix_and_unmix_equals_separate_ops and bfloat16)"
TRITON_CASES+=" or (low_precision_error_within_twice_plain_torch and moco and bf16)"
TRITON_CASES+=" or (fp32_matches_reference and moco and 16x16x64x64)"
if ! $PY -c 'import pytest' 2> /dev/null; then
  echo "tests-cuda, tests-triton: skipped, pytest is not installed (put its wheels in .whl/: pytest, pluggy, iniconfig)" | tee -a "$SUMMARY"
elif [[ $MODE == gpu ]]; then
  stage tests-cuda 120 "$PYTEST -m gpu tests/ops tests/data tests/test_sync_free.py -k 'not triton and not compile'"
  stage tests-triton 90 "$PYTEST tests/ops -k 'triton and ($TRITON_CASES)'"
else
  # on a CPU the gpu-marked tests skip (this checks they collect); Triton runs only in its interpreter there
  stage tests-cuda 120 "$PYTEST -m gpu tests/ops tests/data tests/test_sync_free.py -k 'not triton and not compile'"
  echo "tests-triton: skipped (needs a GPU)" | tee -a "$SUMMARY"
fi

# --- benchmarks ----------------------------------------------------------------------------------------------
if [[ $MODE == gpu ]]; then
  TRAIN_SIZES="--steps 10 --warmup 3"
  MIX_ARGS="--batch 256 --size 224 --grid 8 --dtype bfloat16 --layout channels_last --switch yes --rows paper,ref,triton,cuda --max-row-seconds 4"
  # bf16: the dtype of the bf16 trainer's MoCo loss (its queue and queries are cast to it)
  INFONCE_ARGS="--m 768 --k 65536 --d 128 --dtype bf16 --rows paper,eager,triton,cuda --max-time 10"
else
  TRAIN_SIZES="--device cpu --threads 1 --arch resnet18 --width 4 --batch 16 --image-size 32 --steps 2 --warmup 1 --set method.queue_size=256"
  MIX_ARGS="--device cpu --batch 8 --size 32 --grid 8 --dtype float32 --layout nchw --switch yes --rows paper,ref,cpu --reps 3"
  INFONCE_ARGS="--device cpu --m 48 --k 1024 --d 128 --dtype fp32 --rows paper,eager,chunked --reps 2 --no-memory"
fi
stage bench-train 180 "$PY benchmarks/bench_train.py --rows papers,bf16,channels_last,fused,dali,supervised $TRAIN_SIZES --results-file $RUN_DIR/train-$TAG.json"
# No TRITON_ALLOW_NON_CONSTEXPR_GLOBALS: the Triton mix kernels read only constexpr globals now, and a
# regression must show here (tests/ops/test_triton_aot.py compiles them ahead of time on the CPU too).
stage bench-mix 90 "$PY benchmarks/bench_mix.py $MIX_ARGS --no-readme --tag $TAG"
collect mix
stage bench-infonce 90 "$PY benchmarks/bench_infonce.py $INFONCE_ARGS --no-readme --tag $TAG"
collect infonce
if [[ $MODE == gpu ]]; then
  ADIOS_SIZES="--batch 128 --image-size 96 --steps 10 --warmup 3"
  OCCLUDE_ARGS="--device cuda --reps 50"
  TOPK_ARGS="--device cuda"
else
  ADIOS_SIZES="--device cpu --threads 1 --arch resnet18 --width 4 --batch 8 --image-size 32 --steps 2 --warmup 1 --set masker.width=8"
  OCCLUDE_ARGS="--device cpu --reps 2"
  TOPK_ARGS="--device cpu --shapes demo --batch 2 --reps 2 --no-memory"
fi
if [[ $MODE == gpu ]]; then
  stage tests-adios 150 "$PYTEST tests/test_sync_free.py -k 'adios or sequential or mae or mixedae'"
fi
stage bench-adios 200 "for c in in100s_simclr_adios in100s_simclr_sequential; do $PY benchmarks/bench_train.py --config configs/\$c.json --rows papers,bf16,channels_last,supervised $ADIOS_SIZES --results-file $RUN_DIR/train-\$c-$TAG.json || exit 1; done; $PY benchmarks/bench_occlude.py $OCCLUDE_ARGS --results-file $RUN_DIR/occlude-$TAG.json"
if [[ $MODE == gpu ]]; then  # on a CPU these files run in the ordinary suite
  stage tests-mixedae 150 "$PYTEST -x tests/ops/test_topk_attention.py tests/ops/test_group_mix.py tests/test_mae.py"
fi
if [[ $MODE == gpu ]]; then
  MAE_SIZES="--batch 256 --image-size 224 --steps 10 --warmup 3"
else
  MAE_SIZES="--device cpu --threads 1 --arch vit_tiny --batch 8 --image-size 32 --steps 2 --warmup 1"
fi
stage bench-mae 240 "for c in in1k_mae in1k_mixedae; do $PY benchmarks/bench_train.py --config configs/\$c.json --rows papers,bf16,fused,supervised $MAE_SIZES --results-file $RUN_DIR/train-\$c-$TAG.json || exit 1; done"
if [[ -e benchmarks/bench_topk_attention.py ]]; then
  stage bench-topk 120 "$PY benchmarks/bench_topk_attention.py $TOPK_ARGS --results-file $RUN_DIR/topk-attention-$TAG.json"
fi
publish
if [[ $MODE == gpu ]]; then
  stage bench-compile 300 "$PY benchmarks/bench_train.py --rows fused,compile,supervised $TRAIN_SIZES --results-file $RUN_DIR/train-compile-$TAG.json"
else
  echo "bench-compile: skipped (inductor compiles a ResNet for minutes on a CPU; tests/test_train_compile.py covers train.compile there)" | tee -a "$SUMMARY"
fi

# --- wrap up -------------------------------------------------------------------------------------------------
tar czf "$RUN_DIR.tar.gz" -C "$(dirname "$RUN_DIR")" "$(basename "$RUN_DIR")" 2>/dev/null
if [[ -n "${OUT:-}" ]]; then
  publish
  cp "$RUN_DIR.tar.gz" "$OUT"/ 2>/dev/null
fi
echo
echo "=== summary ($(( $(date +%s) - START )) s; results in $RUN_DIR) ==="
cat "$SUMMARY"
for f in "$RUN_DIR"/train-*.json; do
  [[ -e $f ]] && $PY -c 'import json, sys; print(json.load(open(sys.argv[1]))["markdown"])' "$f"
done
exit 0
