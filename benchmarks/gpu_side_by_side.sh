#!/usr/bin/env bash
# gpu_side_by_side.sh: big_pretrain's train steps beside the PyTorch MAE reference, in one run
# on one GPU, with the profile of each B/16 step and a check of the speed goals.
#
# Rows (global batch 256, bfloat16 compute, float32 weights): MAE, WSP, FLIP, AIM at B/16;
# MAE and FLIP at L/16 (benchmarks/step.py, each row's attention kernels named); the peer
# (facebookresearch/mae's models_mae.py) at B/16 and L/16, eager, and with torch.compile +
# fused AdamW. Nothing of the peer is in this repository (its licence is CC BY-NC): give its
# benchmark folder, one holding torch_mae_bench.py and peer_mae/.
#
# Usage, from the repository root:
#   benchmarks/gpu_side_by_side.sh prepare PEER_DIR   # here, with internet to PyPI: copies
#       the peer into .gpu_peer/ and downloads the cp312 wheels a bare GPU image lacks
#       (grain, array_record, portpicker, ml_collections) into .whl/; both are git-ignored
#   benchmarks/gpu_side_by_side.sh run                # on the GPU host (~6 min on an H200)
#   SIZE=tiny benchmarks/gpu_side_by_side.sh run      # a dry run at toy size, on any machine
#
# Environment: OUT (folder for the log, the JSON rows and MAE's HLO; default
# /tmp/gpu_side_by_side), PYTHON (python3), SIZE (full | tiny).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
SIZE="${SIZE:-full}"
OUT="${OUT:-/tmp/gpu_side_by_side}"

prepare() {
  local peer="${1:?usage: $0 prepare PEER_DIR (the folder with torch_mae_bench.py and peer_mae/)}"
  [[ -f "$peer/torch_mae_bench.py" && -d "$peer/peer_mae" ]] ||
    { echo "$0: $peer holds no torch_mae_bench.py and peer_mae/" >&2; exit 1; }
  for ignored in /.whl/ /.gpu_peer/; do
    grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >>.git/info/exclude
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

run() {
  mkdir -p "$OUT"
  if ! "$PYTHON" -c 'import grain, array_record, portpicker, ml_collections' 2>/dev/null &&
    compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  local step=(--batch_size=256 --dtype=bfloat16 --steps=10 --warmup=3)
  local torch_sizes=(--batch_size=256)
  if [[ "$SIZE" == tiny ]]; then
    step=(--batch_size=4 --image_size=32 --dtype=bfloat16 --steps=1 --warmup=1
          --set=aim.objective.head_depth=1 --set=aim.objective.head_width=64
          --set=objective.text_depth=1 --set=mae.objective.decoder_depth=1)
    torch_sizes=(--batch_size=2 --image_size=32 --steps=1 --warmup=1)
  fi
  local b16=B/16 l16=L/16
  [[ "$SIZE" == tiny ]] && b16=mu/8 l16=mu/8
  export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
  "$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.devices())'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true

  "$PYTHON" benchmarks/step.py --variant="$b16" --objectives=mae,wsp,flip,aim "${step[@]}" \
    --profile=/tmp/gpu_side_by_side_profile --json="$OUT/rows_b16.json"
  cp /tmp/gpu_side_by_side_profile/hlo_mae.txt "$OUT/hlo_mae_b16.txt"
  "$PYTHON" benchmarks/step.py --variant="$l16" --objectives=mae,flip "${step[@]}" \
    --json="$OUT/rows_l16.json"

  local torch_log="$OUT/torch.txt"
  : >"$torch_log"
  if [[ -f .gpu_peer/torch_mae_bench.py ]] && "$PYTHON" -c 'import torch, timm' 2>/dev/null; then
    local models=mae_vit_base_patch16,mae_vit_large_patch16
    "$PYTHON" .gpu_peer/torch_mae_bench.py --models="$models" "${torch_sizes[@]}" | tee -a "$torch_log"
    "$PYTHON" .gpu_peer/torch_mae_bench.py --models="$models" "${torch_sizes[@]}" --compile \
      --fused_adam | tee -a "$torch_log"
  else
    echo "No peer: .gpu_peer/torch_mae_bench.py, torch or timm is missing (see '$0 prepare')."
  fi
  "$PYTHON" benchmarks/gpu_goals.py "$OUT/rows_b16.json" "$OUT/rows_l16.json" "$torch_log"
}

case "${1:-}" in
  prepare) shift; prepare "$@" ;;
  run) run ;;
  *) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2 ;;
esac
