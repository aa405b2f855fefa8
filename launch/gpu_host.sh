#!/usr/bin/env bash
# gpu_host.sh: train big_pretrain on one GPU machine, all its GPUs in one process.
#
# Usage: launch/gpu_host.sh --workdir=DIR [options] [-- main.py overrides]
#
# Makes the venv if it is missing, installs the pinned requirements with CUDA jax
# (again only when requirements.txt or setup.py change), checks that jax sees
# GPUs, then runs
#   python main.py --config=CONFIG --workdir=DIR [overrides]
# with its output appended to DIR/logs/train.log (tee). Run the same command again
# to resume from the last checkpoint in DIR.
#
# Options (or the environment variables in capitals):
#   --workdir=DIR        WORKDIR      checkpoints, TensorBoard events, logs (required)
#   --config=FILE[:ARG]  CONFIG       (configs/mae_then_wsp.py)
#   --retries=N          RETRIES      rerun main.py up to N times when it fails (exit 1),
#                                     resuming from the last checkpoint (0); never after
#                                     exit 2 (a bad flag, config or workdir), nor when the
#                                     first run fails within a minute. Exit 75 (it saved
#                                     on a SIGTERM from outside, e.g. a preemption) always
#                                     reruns and uses no retry.
#   --retry-delay=S      RETRY_DELAY  seconds between attempts (60)
#   --venv=DIR           VENV         (.venv in the repository)
#   --python=PYTHON      PYTHON       interpreter for a new venv, >= 3.11 (first found)
#   --jax-extra=EXTRA    JAX_EXTRA    pip extra of jax: cuda12, cuda13, cuda12-local, or auto:
#                                     the CUDA the driver runs (launch/cuda_jax_extra.sh) (auto)
#   --skip-install       SKIP_INSTALL=1: use the venv as it is
#   --allow-cpu          ALLOW_CPU=1: run even when jax finds no GPU
#   --log-dir=DIR        LOG_DIR      (WORKDIR/logs; ~/big_pretrain_logs for a gs:// WORKDIR)
#
# Examples:
#   launch/gpu_host.sh --workdir=/data/runs/maws -- \
#     --config.stages.mae.data.path=/data/imagenet/train \
#     --config.stages.mae.data.test_path=/data/imagenet/val \
#     --config.stages.wsp.data.path=/data/ig/train \
#     --config.stages.wsp.data.test_path=/data/imagenet/val \
#     --config.stages.wsp.data.labels.vocabulary=/data/ig/vocab.txt
#   launch/gpu_host.sh --config=configs/mae_then_wsp.py:demo --workdir=/tmp/demo --retries=3
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

die() {
  echo "gpu_host.sh: $*" >&2
  exit 1
}

log() {
  echo "[gpu_host.sh $(date +%H:%M:%S)] $*" >&2
}

OVERRIDES=()
while (($#)); do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --retries=*) RETRIES="${1#*=}" ;;
    --retry-delay=*) RETRY_DELAY="${1#*=}" ;;
    --venv=*) VENV="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --jax-extra=*) JAX_EXTRA="${1#*=}" ;;
    --log-dir=*) LOG_DIR="${1#*=}" ;;
    --skip-install) SKIP_INSTALL=1 ;;
    --allow-cpu) ALLOW_CPU=1 ;;
    --)
      shift
      OVERRIDES=("$@")
      break
      ;;
    *) die "unknown argument '$1' (main.py flags go after --; see --help)" ;;
  esac
  shift
done

WORKDIR="${WORKDIR:-}"
CONFIG="${CONFIG:-configs/mae_then_wsp.py}"
RETRIES="${RETRIES:-0}"
RETRY_DELAY="${RETRY_DELAY:-60}"
VENV="${VENV:-$REPO_ROOT/.venv}"
PYTHON="${PYTHON:-}"
JAX_EXTRA="${JAX_EXTRA:-auto}"
SKIP_INSTALL="${SKIP_INSTALL:-0}"
ALLOW_CPU="${ALLOW_CPU:-0}"

[[ -n "$WORKDIR" ]] || die "--workdir=DIR is required (see --help)"
[[ "$RETRIES" =~ ^[0-9]+$ ]] || die "--retries must be a whole number, got '$RETRIES'"
if [[ -z "${LOG_DIR:-}" ]]; then
  if [[ "$WORKDIR" == *://* ]]; then LOG_DIR="$HOME/big_pretrain_logs"; else LOG_DIR="$WORKDIR/logs"; fi
fi
cd "$REPO_ROOT"

# --- Venv and install.
find_python() {
  local py
  for py in ${PYTHON:+"$PYTHON"} python3.13 python3.12 python3.11 python3; do
    if command -v "$py" >/dev/null 2>&1 &&
      "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$py"
      return 0
    fi
  done
  return 1
}

if [[ ! -x "$VENV/bin/python" ]]; then
  py="$(find_python)" || die "no Python >= 3.11 found (the pinned jax, numpy and flax need it); install one (e.g. 'uv python install 3.11', or apt's python3.11-venv) and pass --python=/path/to/python3.11"
  log "creating $VENV with $py"
  "$py" -m venv "$VENV" || die "could not create $VENV (on Debian/Ubuntu: apt install python3.11-venv)"
fi

if [[ "$JAX_EXTRA" == auto && "$SKIP_INSTALL" != 1 ]]; then
  JAX_EXTRA="$(launch/cuda_jax_extra.sh)" || die "could not tell the host's CUDA version; pass --jax-extra=cuda12 or cuda13"
fi
stamp="$VENV/.installed-gpu"
want="$(cat requirements.txt setup.py | sha256sum | cut -d' ' -f1) $JAX_EXTRA"
if [[ "$SKIP_INSTALL" != 1 && "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]]; then
  jax_version="$(sed -n 's/^jax==//p' requirements.txt)"
  log "installing requirements.txt with jax[$JAX_EXTRA]==$jax_version into $VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r requirements.txt "jax[$JAX_EXTRA]==$jax_version"
  "$VENV/bin/python" -m pip install --quiet --no-deps -e .
  echo "$want" >"$stamp"
fi

# --- Does jax see the GPUs?
log "jax devices:"
"$VENV/bin/python" -c '
import sys, jax
devices = jax.devices()
print(f"  {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}): {devices}")
sys.exit(0 if jax.default_backend() == "gpu" else 3)
' || {
  rc=$?
  if [[ "$rc" == 3 && "$ALLOW_CPU" == 1 ]]; then
    log "no GPU, running on CPU (--allow-cpu)"
  elif [[ "$rc" == 3 ]]; then
    die "jax found no GPU (check nvidia-smi, the driver and --jax-extra); --allow-cpu runs anyway"
  else
    die "could not import jax from $VENV"
  fi
}

# --- Train; rerun on failure (each run resumes from the last checkpoint).
mkdir -p "$LOG_DIR"
log_file="$LOG_DIR/train.log"
train_args=(main.py --config="$CONFIG" --workdir="$WORKDIR" "${OVERRIDES[@]}")
child=""
stopping=0
forward_signal() {  # a SIGTERM/SIGINT to this script: main.py checkpoints and exits, no retry
  stopping=1
  if [[ -n "$child" ]]; then kill -TERM "$child" 2>/dev/null || true; fi
}
trap forward_signal TERM INT

attempt=0
while true; do
  attempt=$((attempt + 1))
  echo "=== $(date -u '+%Y-%m-%d %H:%M:%S UTC') $(hostname): attempt $attempt: python ${train_args[*]}" |
    tee -a "$log_file"
  started=$SECONDS
  "$VENV/bin/python" "${train_args[@]}" > >(tee -a "$log_file") 2>&1 &
  child=$!
  while true; do
    if wait "$child"; then rc=0; else rc=$?; fi
    # wait returns early when a trapped signal arrives: wait again for main.py itself.
    kill -0 "$child" 2>/dev/null || break
  done
  child=""
  echo "=== $(date -u '+%Y-%m-%d %H:%M:%S UTC') $(hostname): main.py exited with $rc" | tee -a "$log_file"
  if [[ "$rc" == 0 ]]; then exit 0; fi
  if [[ "$stopping" == 1 ]]; then exit "$rc"; fi
  if [[ "$rc" == 75 ]]; then  # EX_TEMPFAIL: saved on a preemption notice; resume now
    log "main.py saved a checkpoint on a preemption notice (exit 75); rerunning to resume"
    attempt=$((attempt - 1))
    continue
  fi
  if [[ "$rc" == 2 ]]; then
    log "main.py refused the command, config or workdir (exit 2; the log says why). Not retrying."
    exit "$rc"
  fi
  if ((attempt == 1 && SECONDS - started < 60)); then
    log "main.py failed within a minute of the first start (exit $rc): a bad flag or config? Not retrying. Log: $log_file"
    exit "$rc"
  fi
  if ((attempt > RETRIES)); then
    log "main.py failed (exit $rc); no retries left (--retries=$RETRIES). Log: $log_file"
    exit "$rc"
  fi
  log "main.py failed (exit $rc); retry $attempt of $RETRIES in ${RETRY_DELAY}s (it resumes from the last checkpoint)"
  sleep "$RETRY_DELAY" &
  wait $! || true
  if [[ "$stopping" == 1 ]]; then exit "$rc"; fi
done
