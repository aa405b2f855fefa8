#!/usr/bin/env bash
# tpu_pod.sh: train big_pretrain on a Cloud TPU slice (one or many hosts).
#
# Usage: launch/tpu_pod.sh [--key=value ...] COMMAND [-- main.py overrides]
#
# Commands:
#   compile  compile every stage of CONFIG for ACCELERATOR_TYPE on this machine: does it fit?
#            (main.py --compile_for; needs `make install-tpu-compile`). `create` runs it first
#   create   request the TPU as a queued resource, then wait until it is ACTIVE
#   wait     poll the queued resource until ACTIVE (gives up after WAIT_TIMEOUT s)
#   install  copy the code to every worker, make .venv, pip install with jax[tpu]
#   check    print jax.device_count() on every worker (all at once, as in training)
#   run      start main.py on every worker (nohup), then follow worker 0's log
#   logs     follow the training log of LOG_WORKER (default 0; or "all")
#   status   queued resource state, and on each worker: running, or exit code
#   stop     SIGTERM the training on every worker (main.py checkpoints and exits)
#   delete   delete the queued resource and its TPU VMs
#   all      create + install + check + run
#   resume   after a preemption: recreate the TPU if it is gone, install, run
#
# Settings: environment variables, or --key=value flags (--tpu-name=x sets TPU_NAME).
#   TPU_NAME          node id of the TPU VMs            (big-pretrain)
#   QR_NAME           queued resource id                (TPU_NAME-qr)
#   ZONE              zone                              (us-east5-a)
#   PROJECT           project                           (gcloud's default)
#   ACCELERATOR_TYPE  v5p-64, v4-32, v5litepod-16, v6e-16, ...  (v5p-64)
#   RUNTIME_VERSION   TPU software version              (from the accelerator type)
#   SPOT              1: Spot TPU (cheaper, preemptible) (0)
#   RESERVED          1: use your reservation           (0)
#   CREATE_FLAGS      more flags for queued-resources create, e.g. --valid-until-duration=6h
#   WAIT_TIMEOUT      seconds to wait for ACTIVE        (3600)
#   POLL_SECONDS      seconds between polls             (30)
#   REPO_URL          git URL to clone on the workers; empty: copy this working tree
#   REPO_REF          branch, tag or commit of REPO_URL (main)
#   REMOTE_DIR        code folder on each worker, relative to its home (big_pretrain)
#   JAX_EXTRA         pip extra for jax on the workers  (tpu)
#   PYTHON_VERSION    Python for the workers' .venv, >= 3.11 (3.11; fetched with uv if missing)
#   MOUNT_BUCKETS     buckets to mount with gcsfuse at /gcs/BUCKET on every worker
#   CONFIG            config file[:variant]             (configs/mae_then_wsp.py)
#   WORKDIR           where checkpoints go; shared by all workers, e.g. gs://bucket/run
#   LOG_DIR           training log folder on each worker, relative to home (big_pretrain_logs)
#   LOG_WORKER        worker whose log `run` and `logs` follow (0)
#   FOLLOW            0: `run` returns without following the log (1)
#   STOP_TIMEOUT      seconds `stop` waits for the checkpoint and exit (600)
#   DRY_RUN           1: print the gcloud commands instead of running them (0)
#   SKIP_COMPILE      1: `create` requests the slice without compiling CONFIG for it first (0)
#   LOCAL_PYTHON      the Python that compiles here (this checkout's .venv/bin/python)
#
# Everything after `--` is passed to main.py (e.g. --config.stages.mae.data.path=...).
# Running `run` again with the same WORKDIR resumes from the last checkpoint.
#
# Example (ImageNet folders in a bucket, mounted with gcsfuse):
#   export TPU_NAME=maws ZONE=us-east5-a ACCELERATOR_TYPE=v5p-64 SPOT=1
#   export MOUNT_BUCKETS=my-data WORKDIR=gs://my-ckpt/maws-l16
#   launch/tpu_pod.sh all -- \
#     --config.stages.mae.data.path=/gcs/my-data/imagenet/train \
#     --config.stages.mae.data.test_path=/gcs/my-data/imagenet/val \
#     --config.stages.wsp.data.path=/gcs/my-data/ig/train \
#     --config.stages.wsp.data.test_path=/gcs/my-data/imagenet/val \
#     --config.stages.wsp.data.labels.vocabulary=/gcs/my-data/ig/vocab.txt
#   launch/tpu_pod.sh delete
set -euo pipefail

SETTINGS=(TPU_NAME QR_NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION SPOT RESERVED
  CREATE_FLAGS WAIT_TIMEOUT POLL_SECONDS REPO_URL REPO_REF REMOTE_DIR JAX_EXTRA
  PYTHON_VERSION MOUNT_BUCKETS CONFIG WORKDIR LOG_DIR LOG_WORKER FOLLOW STOP_TIMEOUT DRY_RUN
  SKIP_COMPILE LOCAL_PYTHON)
# The settings the workers need: passed to this script when it runs there.
REMOTE_SETTINGS=(REPO_URL REPO_REF REMOTE_DIR JAX_EXTRA PYTHON_VERSION MOUNT_BUCKETS LOG_DIR
  STOP_TIMEOUT)
REMOTE_SCRIPT=.big_pretrain_tpu_pod.sh  # this script's copy in each worker's home
REMOTE_TARBALL=.big_pretrain_src.tgz

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 1
}

log() {
  echo "[tpu_pod.sh $(date +%H:%M:%S)] $*" >&2
}

# --- Arguments: --key=value settings, one command, then main.py overrides after `--`.
COMMAND=""
OVERRIDES=()
while (($#)); do
  case "$1" in
    -h | --help | help)
      usage
      exit 0
      ;;
    --)
      shift
      OVERRIDES=("$@")
      break
      ;;
    --*=*)
      key="${1%%=*}"
      key="${key#--}"
      key="${key//-/_}"
      key="${key^^}"
      [[ " ${SETTINGS[*]} " == *" $key "* ]] || die "unknown setting $1 (see --help)"
      printf -v "$key" '%s' "${1#*=}"
      ;;
    -*) die "unknown flag $1 (settings are --key=value; main.py flags go after --)" ;;
    *)
      [[ -z "$COMMAND" ]] || die "one command at a time (got '$COMMAND' and '$1')"
      COMMAND="$1"
      ;;
  esac
  shift
done

TPU_NAME="${TPU_NAME:-big-pretrain}"
QR_NAME="${QR_NAME:-${TPU_NAME}-qr}"
ZONE="${ZONE:-us-east5-a}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-64}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
SPOT="${SPOT:-0}"
RESERVED="${RESERVED:-0}"
CREATE_FLAGS="${CREATE_FLAGS:-}"
WAIT_TIMEOUT="${WAIT_TIMEOUT:-3600}"
POLL_SECONDS="${POLL_SECONDS:-30}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-main}"
REMOTE_DIR="${REMOTE_DIR:-big_pretrain}"
JAX_EXTRA="${JAX_EXTRA-tpu}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
MOUNT_BUCKETS="${MOUNT_BUCKETS:-}"
CONFIG="${CONFIG:-configs/mae_then_wsp.py}"
WORKDIR="${WORKDIR:-}"
LOG_DIR="${LOG_DIR:-big_pretrain_logs}"
LOG_WORKER="${LOG_WORKER:-0}"
FOLLOW="${FOLLOW:-1}"
STOP_TIMEOUT="${STOP_TIMEOUT:-600}"
DRY_RUN="${DRY_RUN:-0}"
SKIP_COMPILE="${SKIP_COMPILE:-0}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCAL_PYTHON="${LOCAL_PYTHON:-$REPO_ROOT/.venv/bin/python}"

if [[ -z "$RUNTIME_VERSION" ]]; then
  # https://cloud.google.com/tpu/docs/runtimes (JAX and PyTorch images).
  case "$ACCELERATOR_TYPE" in
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
  esac
fi

# ============================================================================
# On the workers: `bash ~/.big_pretrain_tpu_pod.sh worker-COMMAND ...`.
# ============================================================================

home_path() {  # a path relative to the worker's home, or absolute
  if [[ "$1" == /* ]]; then echo "$1"; else echo "$HOME/$1"; fi
}

worker_python() {  # a python >= 3.11 on this worker
  local py
  for py in "python$PYTHON_VERSION" python3.13 python3.12 python3.11 python3; do
    if command -v "$py" >/dev/null 2>&1 &&
      "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$py"
      return 0
    fi
  done
  return 1
}

worker_make_venv() {  # TPU images ship Python 3.10: then uv fetches PYTHON_VERSION
  local py uv
  if py="$(worker_python)" && "$py" -m venv .venv 2>/dev/null; then
    return 0
  fi
  rm -rf .venv
  uv="$(command -v uv || true)"
  if [[ -z "$uv" ]]; then
    log "no python >= 3.11 with venv here; installing uv to fetch Python $PYTHON_VERSION"
    python3 -m pip install --quiet --user uv 2>/dev/null ||
      curl -LsSf https://astral.sh/uv/install.sh | sh
    uv="$HOME/.local/bin/uv"
  fi
  "$uv" venv --seed --python "$PYTHON_VERSION" .venv
}

worker_mount() {
  local bucket mount_point
  [[ -n "$MOUNT_BUCKETS" ]] || return 0
  if ! command -v gcsfuse >/dev/null 2>&1; then
    log "installing gcsfuse"
    echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" |
      sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
    curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
      sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
    # Fresh TPU VMs may still be running unattended-upgrades: wait for apt's lock.
    sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
    sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq fuse gcsfuse
  fi
  for bucket in $MOUNT_BUCKETS; do
    bucket="${bucket#gs://}"
    mount_point="/gcs/$bucket"
    if mountpoint -q "$mount_point"; then continue; fi
    sudo mkdir -p "$mount_point"
    sudo chown "$(id -u):$(id -g)" "$mount_point"
    gcsfuse --implicit-dirs "$bucket" "$mount_point"
    log "$(hostname): gs://$bucket mounted at $mount_point"
  done
}

worker_install() {
  local dir
  dir="$(home_path "$REMOTE_DIR")"
  if [[ -n "$REPO_URL" ]]; then
    [[ -d "$dir/.git" ]] || git clone --quiet "$REPO_URL" "$dir"
    git -C "$dir" fetch --quiet origin "$REPO_REF"
    git -C "$dir" checkout --quiet --force FETCH_HEAD
  else
    # The tarball of the caller's working tree: replace everything but the venv.
    mkdir -p "$dir"
    find "$dir" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
    tar -xzf "$HOME/$REMOTE_TARBALL" -C "$dir"
  fi
  cd "$dir"
  [[ -x .venv/bin/python ]] || worker_make_venv
  local jax_version requirements=(-r requirements.txt)
  jax_version="$(sed -n 's/^jax==//p' requirements.txt)"
  if [[ -n "$JAX_EXTRA" ]]; then requirements+=("jax[$JAX_EXTRA]==$jax_version"); fi
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet "${requirements[@]}"
  .venv/bin/python -m pip install --quiet --no-deps -e .
  worker_mount
  log "$(hostname): installed in $dir ($(.venv/bin/python --version), jax $jax_version)"
}

worker_check() {
  cd "$(home_path "$REMOTE_DIR")"
  # As main.py does: join the other workers first (auto-detected on TPU VMs).
  .venv/bin/python -c 'from big_pretrain import distributed; distributed.initialize(); import jax
print(f"process {jax.process_index()} of {jax.process_count()}:", jax.local_device_count(),
      "local of", jax.device_count(), "devices,", jax.devices()[0].device_kind)'
}

worker_files() {  # sets pid_file, rc_file, log_file
  local dir
  dir="$(home_path "$LOG_DIR")"
  mkdir -p "$dir"
  pid_file="$dir/train.pid"
  rc_file="$dir/train.rc"
  log_file="$dir/train.log"
}

worker_running() {  # exit 0 if the training started here is alive
  local pid
  [[ -f "$pid_file" ]] || return 1
  pid="$(cat "$pid_file")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
}

worker_train() {  # runs in its own session (setsid): main.py, then its exit code
  worker_files
  echo "$$" >"$pid_file"
  rm -f "$rc_file"
  trap 'true' TERM  # let main.py checkpoint on SIGTERM; this shell then records its code
  local rc=0
  {
    echo "=== $(date -u '+%Y-%m-%d %H:%M:%S UTC') $(hostname): python main.py $*"
    .venv/bin/python main.py "$@" </dev/null 2>&1 || rc=$?
    echo "=== $(date -u '+%Y-%m-%d %H:%M:%S UTC') $(hostname): main.py exited with $rc"
  } >>"$log_file"
  echo "$rc" >"$rc_file"
}

worker_run() {
  worker_files
  if worker_running; then
    die "$(hostname): training is already running (pid $(cat "$pid_file")); stop it first"
  fi
  worker_mount
  cd "$(home_path "$REMOTE_DIR")"
  [[ -x .venv/bin/python ]] || die "$(hostname): no .venv in $PWD; run 'install' first"
  rm -f "$pid_file"
  nohup setsid bash "$HOME/$REMOTE_SCRIPT" worker-train -- "$@" </dev/null >/dev/null 2>&1 &
  sleep 2
  if worker_running; then
    log "$(hostname): started (pid $(cat "$pid_file")), log $log_file"
  else
    tail -n 20 "$log_file" >&2 || true
    die "$(hostname): training did not start"
  fi
}

worker_stop() {
  worker_files
  if ! worker_running; then
    log "$(hostname): not running"
    return 0
  fi
  local pid waited=0
  pid="$(cat "$pid_file")"
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  while kill -0 "$pid" 2>/dev/null && ((waited < STOP_TIMEOUT)); do
    sleep 5
    waited=$((waited + 5))
  done
  if kill -0 "$pid" 2>/dev/null; then
    die "$(hostname): still running after ${STOP_TIMEOUT}s (pid $pid)"
  fi
  log "$(hostname): stopped after ${waited}s, exit code $(cat "$rc_file" 2>/dev/null || echo '?')"
}

worker_status() {
  worker_files
  if worker_running; then
    echo "$(hostname): running (pid $(cat "$pid_file")): $(tail -n 1 "$log_file" 2>/dev/null | cut -c1-160)"
  elif [[ -f "$rc_file" ]]; then
    # main.py's exit codes: 0 finished, 75 saved on a preemption notice (`resume` reruns
    # it), 2 a bad flag, config or workdir, 1 stopped saying why (the log ends with it).
    echo "$(hostname): exited with code $(cat "$rc_file"); the log ends:"
    grep -v '^===' "$log_file" | tail -n 3 | cut -c1-200
  else
    echo "$(hostname): never started"
  fi
}

case "$COMMAND" in
  worker-install) worker_install; exit ;;
  worker-check) worker_check; exit ;;
  worker-train) worker_train "${OVERRIDES[@]}"; exit ;;
  worker-run) worker_run "${OVERRIDES[@]}"; exit ;;
  worker-stop) worker_stop; exit ;;
  worker-status) worker_status; exit ;;
  worker-logs)
    worker_files
    exec tail -n 100 -F "$log_file"
    ;;
esac

# ============================================================================
# On your machine: gcloud.
# ============================================================================

GCLOUD_FLAGS=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then GCLOUD_FLAGS+=(--project="$PROJECT"); fi

gc() {  # gcloud, echoed; DRY_RUN=1 only echoes
  echo "+ gcloud $*" >&2
  if [[ "$DRY_RUN" == 1 ]]; then return 0; fi
  gcloud "$@"
}

qr_state() {  # the queued resource's state, or NOT_FOUND
  if [[ "$DRY_RUN" == 1 ]]; then
    echo ACTIVE
    return
  fi
  gcloud compute tpus queued-resources describe "$QR_NAME" "${GCLOUD_FLAGS[@]}" \
    --format='value(state.state)' 2>/dev/null || echo NOT_FOUND
}

SCRIPT_PUSHED=0
on_workers() {  # on_workers WORKER COMMAND [ARGS...]: this script, on the TPU VMs
  local worker="$1" remote_command="" name
  shift
  if [[ "$SCRIPT_PUSHED" == 0 ]]; then
    local state
    state="$(qr_state)"
    [[ "$state" == ACTIVE ]] || die "$QR_NAME is $state, not ACTIVE: 'create' it (or 'resume') first"
    copy_to_workers "${BASH_SOURCE[0]}" "$REMOTE_SCRIPT"  # every worker runs this version
    SCRIPT_PUSHED=1
  fi
  for name in "${REMOTE_SETTINGS[@]}"; do
    remote_command+="$name=$(printf '%q' "${!name}") "
  done
  remote_command+="bash $REMOTE_SCRIPT $(printf '%q ' "$@")"
  gc compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker="$worker" --quiet \
    --command="$remote_command"
}

copy_to_workers() {  # copy_to_workers LOCAL_FILE REMOTE_NAME, retried: fresh VMs take a while
  local attempt
  for attempt in 1 2 3 4 5; do
    if gc compute tpus tpu-vm scp "$1" "$TPU_NAME:$2" "${GCLOUD_FLAGS[@]}" --worker=all --quiet; then
      return 0
    fi
    if ((attempt < 5)); then
      log "copy to the workers failed (attempt $attempt of 5); retrying in 30s"
      sleep 30
    fi
  done
  die "could not copy $1 to the workers of $TPU_NAME"
}

WORKDIR_CHECKED=0
need_workdir() {
  [[ -n "$WORKDIR" ]] || die "set WORKDIR (e.g. gs://bucket/run): every worker writes checkpoints there"
  if [[ "$WORKDIR_CHECKED" == 0 && "$WORKDIR" != gs://* ]]; then
    log "warning: WORKDIR=$WORKDIR is not a gs:// path; every worker must see the same WORKDIR"
  fi
  WORKDIR_CHECKED=1
}

cmd_compile() {
  # The same config and overrides as `run`, compiled for the slice here, before it is paid for.
  local report_dir="${TMPDIR:-/tmp}/big_pretrain_compile_for"
  local command=("$LOCAL_PYTHON" "$REPO_ROOT/main.py" --config="$CONFIG" --workdir="$report_dir"
    --compile_for="$ACCELERATOR_TYPE" "${OVERRIDES[@]}")
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "${command[*]}"
    return 0
  fi
  [[ -x "$LOCAL_PYTHON" ]] || die "no $LOCAL_PYTHON to compile with: run 'make install-tpu-compile' in $REPO_ROOT, set LOCAL_PYTHON, or SKIP_COMPILE=1"
  log "compiling $CONFIG for $ACCELERATOR_TYPE on this machine first (SKIP_COMPILE=1 skips it)"
  "${command[@]}" || die "$CONFIG does not compile or fit on $ACCELERATOR_TYPE (above); nothing was requested"
}

cmd_create() {
  local state
  if [[ "$SKIP_COMPILE" != 1 ]]; then cmd_compile; fi
  state="$(qr_state)"
  if [[ "$state" != NOT_FOUND && "$DRY_RUN" != 1 ]]; then
    log "queued resource $QR_NAME exists ($state)"
  else
    local flags=(--node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE"
      --runtime-version="$RUNTIME_VERSION")
    if [[ "$SPOT" == 1 ]]; then flags+=(--spot); fi
    if [[ "$RESERVED" == 1 ]]; then flags+=(--reserved); fi
    local extra=()
    read -r -a extra <<<"$CREATE_FLAGS"
    gc compute tpus queued-resources create "$QR_NAME" "${GCLOUD_FLAGS[@]}" "${flags[@]}" "${extra[@]}"
  fi
  cmd_wait
}

cmd_wait() {
  local state start=$SECONDS
  while true; do
    state="$(qr_state)"
    case "$state" in
      ACTIVE)
        log "$QR_NAME is ACTIVE: $ACCELERATOR_TYPE node $TPU_NAME in $ZONE"
        return 0
        ;;
      FAILED | SUSPENDED | SUSPENDING | DELETING | NOT_FOUND)
        die "$QR_NAME is $state (details: gcloud compute tpus queued-resources describe $QR_NAME --zone=$ZONE); 'delete' then 'create' to request it again"
        ;;
    esac
    if ((SECONDS - start >= WAIT_TIMEOUT)); then
      die "$QR_NAME still $state after ${WAIT_TIMEOUT}s; run 'wait' again, or 'delete'"
    fi
    log "$QR_NAME is $state; waiting (${WAIT_TIMEOUT}s at most, $((SECONDS - start))s so far)"
    sleep "$POLL_SECONDS"
  done
}

cmd_install() {
  if [[ -z "$REPO_URL" ]]; then
    local repo_root tarball
    repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    tarball="$(mktemp "${TMPDIR:-/tmp}/big_pretrain_src.XXXXXX")"
    # shellcheck disable=SC2064  # expand now: the local variable is gone at exit
    trap "rm -f '$tarball'" EXIT
    tar -C "$repo_root" --exclude=.git --exclude=.venv --exclude=workdirs \
      --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache -czf "$tarball" .
    log "copying $repo_root ($(du -h "$tarball" | cut -f1)) to every worker"
    copy_to_workers "$tarball" "$REMOTE_TARBALL"
  else
    log "cloning $REPO_URL at $REPO_REF on every worker"
  fi
  on_workers all worker-install
}

cmd_run() {
  need_workdir
  on_workers all worker-run -- --config="$CONFIG" --workdir="$WORKDIR" "${OVERRIDES[@]}"
  if [[ "$FOLLOW" == 1 ]]; then
    log "following worker $LOG_WORKER's log; Ctrl-C stops following, not the training"
    on_workers "$LOG_WORKER" worker-logs || true
  fi
}

cmd_delete() {
  gc compute tpus queued-resources delete "$QR_NAME" "${GCLOUD_FLAGS[@]}" --force --quiet
}

case "$COMMAND" in
  compile) cmd_compile ;;
  create) cmd_create ;;
  wait) cmd_wait ;;
  install) cmd_install ;;
  check) on_workers all worker-check ;;
  run) cmd_run ;;
  logs) on_workers "$LOG_WORKER" worker-logs ;;
  status)
    log "$QR_NAME: $(qr_state)"
    on_workers all worker-status
    ;;
  stop) on_workers all worker-stop ;;
  delete) cmd_delete ;;
  all)
    need_workdir
    cmd_create
    cmd_install
    on_workers all worker-check
    cmd_run
    ;;
  resume)
    need_workdir
    state="$(qr_state)"
    if [[ "$state" != ACTIVE ]]; then
      log "$QR_NAME is $state: requesting a new TPU"
      if [[ "$state" != NOT_FOUND ]]; then cmd_delete; fi
      cmd_create
    fi
    cmd_install
    cmd_run
    ;;
  "") usage >&2; exit 2 ;;
  *) die "unknown command '$COMMAND' (see --help)" ;;
esac
