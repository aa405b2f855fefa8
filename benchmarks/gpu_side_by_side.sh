#!/usr/bin/env bash
# gpu_side_by_side.sh: big_pretrain's train steps beside the PyTorch MAE reference, in one call
# on one GPU that fits 10 minutes, with a profile and a check of the speed goals.
#
# Measured (global batch 256, bfloat16 compute, float32 weights; every program compiled once):
#   1. MAE, WSP, FLIP B/16 (benchmarks/step_speed.py; MAE's profiled with command buffers kept on
#      while tracing), and MAE B/16 with scanned layers;
#   2. MAE L/16;
#   3. the peer (facebookresearch/mae's models_mae.py) at B/16, eager and torch.compile +
#      fused AdamW;
#   4. the real training loop (benchmarks/loop_speed.py) on 2048 generated 500x375 JPEGs converted
#      to ArrayRecord, MAE B/16, against its bare step (the same program, from the cache);
#   then, while the time budget lasts (BUDGET_S, default 540 s; each is skipped and said so
#   when it would not fit):
#   5. MAE B/16 scanned with WHILE loops in XLA's command buffers (+WHILE);
#   6. the patch embedding alone and WSP B/16, by matmul (the default) and by convolution;
#      AIM B/16.
# benchmarks/gpu_goals.py prints one table and each goal: MAE B/16 <= 45 ms/step and >= 1.25x
# the compiled peer; MAE L/16 >= 45% MFU; WSP and FLIP B/16 >= 40% MFU; no attention left to
# XLA; idle GPU < 5% of MAE B/16's traced step; the loop >= 90% of its bare step's images/s.
# Nothing of the peer is in this repository (its licence is CC BY-NC): give its benchmark
# folder, one holding torch_mae_bench.py and peer_mae/.
#
# Usage, from the repository root:
#   benchmarks/gpu_side_by_side.sh prepare PEER_DIR   # here, with internet to PyPI: copies
#       the peer into .gpu_peer/ and downloads the cp312 wheels a bare GPU image lacks
#       (grain, array_record, portpicker, ml_collections) into .whl/; both are git-ignored
#   benchmarks/gpu_side_by_side.sh run                # on the GPU host, one call
#   SIZE=tiny benchmarks/gpu_side_by_side.sh run      # the same at toy size, on any machine
#
# The training loop imports clu's writers, which import TensorFlow, as the ArrayRecord reader
# does for tf.train.Example: on a host without TensorFlow the loop row fails, says so and the
# rest goes on.
#
# Environment: OUT (folder for the log, the JSON rows and MAE's HLO; default
# /tmp/gpu_side_by_side), PYTHON (python3), SIZE (full | tiny), BUDGET_S (540).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
SIZE="${SIZE:-full}"
OUT="${OUT:-/tmp/gpu_side_by_side}"
BUDGET_S="${BUDGET_S:-540}"

prepare() {
  local peer="${1:?usage: $0 prepare PEER_DIR (the folder with torch_mae_bench.py and peer_mae/)}"
  [[ -f "$peer/torch_mae_bench.py" && -d "$peer/peer_mae" ]] ||
    { echo "$0: $peer holds no torch_mae_bench.py and peer_mae/" >&2; exit 1; }
  local exclude
  exclude="$(git rev-parse --git-common-dir)/info/exclude"  # also in a git worktree
  mkdir -p "$(dirname "$exclude")"
  for ignored in /.whl/ /.gpu_peer/; do
    grep -qxF "$ignored" "$exclude" 2>/dev/null || echo "$ignored" >>"$exclude"
  done
  rm -rf .gpu_peer && mkdir -p .gpu_peer && cp -r "$peer/torch_mae_bench.py" "$peer/peer_mae" .gpu_peer/
  mkdir -p .whl
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "grain==$(sed -n 's/^grain==//p' requirements.txt)" \
    "array-record==$(sed -n 's/^array-record==//p' requirements.txt)" \
    "ml_collections==$(sed -n 's/^ml_collections==//p' requirements.txt)" portpicker==1.6.0
  ls -la .whl .gpu_peer
  echo "Carry .whl and .gpu_peer to the GPU host and run: $0 run"
}

# Runs "$@" if at least $1 seconds of BUDGET_S are left (estimated cost), within what is left.
within_budget() {
  local needs="$1"; shift
  local left=$((BUDGET_S - SECONDS))
  if ((left < needs)); then
    echo "SKIPPED (${left} s of the ${BUDGET_S} s budget left, needs ~${needs} s): $*"
    return 0
  fi
  timeout --kill-after=10 "$left" "$@" || echo "FAILED (exit $?): $*"
}

run() {
  mkdir -p "$OUT"
  rm -f "$OUT"/rows_*.json "$OUT"/loop.json
  if ! "$PYTHON" -c 'import grain, array_record, portpicker, ml_collections' 2>/dev/null &&
    compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  local b16=B/16 l16=L/16 batch=256 image=224 jpegs=2048 loop_steps=80
  local step=(--dtype=bfloat16 --steps=10 --warmup=3)
  local torch_sizes=(--batch_size=256)
  if [[ "$SIZE" == tiny ]]; then
    b16=mu/8 l16=mu/8 batch=4 image=32 jpegs=64 loop_steps=12
    step=(--dtype=bfloat16 --steps=1 --warmup=1 --set=aim.objective.head_depth=1
          --set=aim.objective.head_width=64 --set=objective.text_depth=1
          --set=mae.objective.decoder_depth=1)
    torch_sizes=(--batch_size=2 --image_size=32 --steps=1 --warmup=1)
  fi
  step+=(--batch_size=$batch --image_size=$image)
  export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
  # Every program is compiled once: a process that builds one again (loop_speed.py's bare step and
  # loop, the scan table's unrolled row) loads it from this cache.
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/gpu_side_by_side_jax_cache}"
  # Command buffers (CUDA graphs) stay on while profiling, as they are untraced. In every
  # process, so that they all compile the same programs (XLA_FLAGS are in the cache key).
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_enable_command_buffers_during_profiling=true"
  "$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.devices())'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true

  echo "== 1. MAE, WSP, FLIP $b16; MAE scanned ($SECONDS s)"
  within_budget 60 "$PYTHON" benchmarks/step_speed.py --variant="$b16" --objectives=mae,wsp,flip \
    "${step[@]}" --profile=/tmp/gpu_side_by_side_profile --profile_objectives=mae \
    --json="$OUT/rows_b16.json" --compile_scan=mae
  cp /tmp/gpu_side_by_side_profile/hlo_mae.txt "$OUT/hlo_mae_b16.txt" 2>/dev/null || true

  echo "== 2. MAE $l16 ($SECONDS s)"
  within_budget 60 "$PYTHON" benchmarks/step_speed.py --variant="$l16" --objectives=mae \
    "${step[@]}" --json="$OUT/rows_l16.json"

  echo "== 3. The PyTorch reference, B/16 ($SECONDS s)"
  local torch_log="$OUT/torch.txt"
  : >"$torch_log"
  if [[ -f .gpu_peer/torch_mae_bench.py ]] && "$PYTHON" -c 'import torch, timm' 2>/dev/null; then
    within_budget 30 "$PYTHON" .gpu_peer/torch_mae_bench.py --models=mae_vit_base_patch16 \
      "${torch_sizes[@]}" | tee -a "$torch_log"
    within_budget 60 "$PYTHON" .gpu_peer/torch_mae_bench.py --models=mae_vit_base_patch16 \
      "${torch_sizes[@]}" --compile --fused_adam | tee -a "$torch_log"
  else
    echo "No peer: .gpu_peer/torch_mae_bench.py, torch or timm is missing (see '$0 prepare')."
  fi

  echo "== 4. The training loop on $jpegs JPEGs, MAE $b16, against its bare step ($SECONDS s)"
  within_budget 60 "$PYTHON" benchmarks/loop_speed.py --jpegs="$jpegs" --variant="$b16" \
    --batch_size="$batch" --image_size="$image" --dtype=bfloat16 --steps="$loop_steps" \
    --log_every=$((loop_steps / 8)) --prefetch=2 --repeats=1 --json="$OUT/loop.json" \
    $([[ "$SIZE" == tiny ]] && echo --set=objective.decoder_depth=1)

  echo "== 5. MAE $b16 scanned, WHILE loops in the command buffers ($SECONDS s)"
  (export XLA_FLAGS="$XLA_FLAGS --xla_gpu_enable_command_buffer=+WHILE"
   within_budget 45 "$PYTHON" benchmarks/step_speed.py --variant="$b16" --objectives=mae \
     --scan=true "${step[@]}" --json="$OUT/rows_b16_scan_while.json")

  echo "== 6. WSP $b16, patch embedding by convolution; AIM $b16 ($SECONDS s)"
  within_budget 50 "$PYTHON" benchmarks/step_speed.py --variant="$b16" --objectives= "${step[@]}" \
    --patch_embed=wsp --json="$OUT/rows_b16_patch_embed.json"
  within_budget 90 "$PYTHON" benchmarks/step_speed.py --variant="$b16" --objectives=aim \
    "${step[@]}" --json="$OUT/rows_b16_aim.json"

  echo "== Goals ($SECONDS s)"
  "$PYTHON" benchmarks/gpu_goals.py --loop="$OUT/loop.json" "$OUT"/rows_*.json "$torch_log"
  echo "Whole run: $SECONDS s"
}

case "${1:-}" in
  prepare) shift; prepare "$@" ;;
  run) run ;;
  *) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2 ;;
esac
