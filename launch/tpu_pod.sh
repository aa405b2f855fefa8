#!/usr/bin/env bash
# tpu_pod.sh: train big_pretrain on Cloud TPU: one slice (one host or many), or several
# identical slices joined by the data-centre network (Multislice: NUM_SLICES > 1).
#
# Usage: launch/tpu_pod.sh [--key=value ...] COMMAND [-- main.py overrides]
#
# Commands:
#   compile  compile every stage of CONFIG for NUM_SLICES x ACCELERATOR_TYPE on this machine:
#            does it fit? (main.py --compile_for [--num_slices]; needs `make install-tpu-compile`).
#            `create` runs it first
#   create   request the TPU as a queued resource, then wait until it is ACTIVE; NUM_SLICES > 1:
#            one queued resource of NUM_SLICES nodes, TPU_NAME-0, TPU_NAME-1, ...
#   wait     poll the queued resource until ACTIVE (gives up after WAIT_TIMEOUT s)
#   install  copy the code to every worker, make .venv, pip install with jax[tpu]
#   check    print jax.device_count() on every worker (all at once, as in training)
#   run      on every worker of every slice: kill stale processes that hold the TPU, remove
#            libtpu's lock file, start main.py (nohup); then `watch` (FOLLOW=0: return)
#   watch    poll every worker every POLL_SECONDS, copy its log to LOCAL_LOG_DIR, print
#            LOG_WORKER's; when one worker's main.py fails or vanishes, stop all of them (they
#            checkpoint), say which and how, exit non-zero; exit 0 when all exited 0
#   logs     follow the training log of LOG_WORKER on the worker itself
#   status   queued resource state, and on each worker: running, or exit code
#   stop     SIGTERM the training on every worker (main.py checkpoints and exits)
#   delete   delete the queued resource and its TPU VMs
#   all      create + install + check + run
#   resume   after a preemption: recreate the TPU if it is gone, install, run
#
# Settings: environment variables, or --key=value flags (--tpu-name=x sets TPU_NAME).
#   TPU_NAME          node id of the TPU VMs; with NUM_SLICES > 1 their prefix (big-pretrain)
#   QR_NAME           queued resource id                (TPU_NAME-qr)
#   ZONE              zone                              (us-east5-a)
#   PROJECT           project                           (gcloud's default)
#   ACCELERATOR_TYPE  one slice: v5p-64, v4-32, v5litepod-16, v6e-16, ...  (v5p-64)
#   NUM_SLICES        slices of ACCELERATOR_TYPE in one Multislice job (1)
#   RUNTIME_VERSION   TPU software version              (from the accelerator type)
#   SPOT              1: Spot TPU (cheaper, preemptible) (0)
#   RESERVED          1: use your reservation           (0)
#   CREATE_FLAGS      more flags for queued-resources create, e.g. --valid-until-duration=6h
#   WAIT_TIMEOUT      seconds to wait for ACTIVE        (3600)
#   POLL_SECONDS      seconds between polls (`wait`, `watch`) (30)
#   INTERNAL_IP       1: ssh/scp to the workers' internal IPs (this machine is in their VPC) (0)
#   REPO_URL          git URL to clone on the workers; empty: copy this working tree
#   REPO_REF          branch, tag or commit of REPO_URL (main)
#   REMOTE_DIR        code folder on each worker, relative to its home (big_pretrain)
#   JAX_EXTRA         pip extra for jax on the workers  (tpu)
#   PYTHON_VERSION    Python for the workers' .venv, >= 3.11 (3.11; fetched with uv if missing)
#   MOUNT_BUCKETS     buckets to mount with gcsfuse at /gcs/BUCKET on every worker
#   CONFIG            config file[:variant]             (configs/mae_then_wsp.py)
#   WORKDIR           where checkpoints go; shared by all workers, e.g. gs://bucket/run
#   LIBTPU_INIT_ARGS  libtpu (XLA TPU) flags for main.py on the workers (none; examples in
#                     launch/README.md); `compile` here gets them too
#   DUMP_HLO          1: XLA dumps its HLO on every worker into LOG_DIR/hlo_dump (appended to
#                     XLA_FLAGS); `watch` copies slice 0 worker 0's dump to LOCAL_LOG_DIR (0)
#   LOG_DIR           training log folder on each worker, relative to home (big_pretrain_logs)
#   LOCAL_LOG_DIR     where `watch` keeps every worker's log, sliceS-workerW.log
#                     (tpu_pod_logs/TPU_NAME, in the current folder)
#   LOG_WORKER        worker whose log `watch` prints and `logs` follows: W (of slice 0), S:W,
#                     or all (0)
#   FOLLOW            0: `run` returns once main.py started everywhere, without `watch` (1)
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
# Two v5p-64 slices: the same with NUM_SLICES=2 (nodes maws-0 and maws-1).
set -euo pipefail

SETTINGS=(TPU_NAME QR_NAME ZONE PROJECT ACCELERATOR_TYPE NUM_SLICES RUNTIME_VERSION SPOT RESERVED
  CREATE_FLAGS WAIT_TIMEOUT POLL_SECONDS INTERNAL_IP REPO_URL REPO_REF REMOTE_DIR JAX_EXTRA
  PYTHON_VERSION MOUNT_BUCKETS CONFIG WORKDIR LIBTPU_INIT_ARGS DUMP_HLO LOG_DIR LOCAL_LOG_DIR
  LOG_WORKER FOLLOW STOP_TIMEOUT DRY_RUN SKIP_COMPILE LOCAL_PYTHON)
# The settings the workers need: passed to this script when it runs there.
REMOTE_SETTINGS=(REPO_URL REPO_REF REMOTE_DIR JAX_EXTRA PYTHON_VERSION MOUNT_BUCKETS LOG_DIR
  STOP_TIMEOUT LIBTPU_INIT_ARGS DUMP_HLO)
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

quote_word() {  # one word as a shell (or Python's shlex) reads it back: bare, "..." or '...'
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    echo "$1"
  elif [[ "$1" != *[\"\$\`\\!]* ]]; then
    echo "\"$1\""
  else
    echo "'${1//\'/\'\\\'\'}'"
  fi
}

quote_args() {  # the arguments on one line that a shell splits back into them; --flag=VALUE quotes VALUE
  local arg words=()
  for arg; do
    if [[ "$arg" =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
      words+=("${BASH_REMATCH[1]}$(quote_word "${BASH_REMATCH[2]}")")
    else
      words+=("$(quote_word "$arg")")
    fi
  done
  echo "${words[*]}"
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
NUM_SLICES="${NUM_SLICES:-1}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
SPOT="${SPOT:-0}"
RESERVED="${RESERVED:-0}"
CREATE_FLAGS="${CREATE_FLAGS:-}"
WAIT_TIMEOUT="${WAIT_TIMEOUT:-3600}"
POLL_SECONDS="${POLL_SECONDS:-30}"
INTERNAL_IP="${INTERNAL_IP:-0}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-main}"
REMOTE_DIR="${REMOTE_DIR:-big_pretrain}"
JAX_EXTRA="${JAX_EXTRA-tpu}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
MOUNT_BUCKETS="${MOUNT_BUCKETS:-}"
CONFIG="${CONFIG:-configs/mae_then_wsp.py}"
WORKDIR="${WORKDIR:-}"
LIBTPU_INIT_ARGS="${LIBTPU_INIT_ARGS:-}"
DUMP_HLO="${DUMP_HLO:-0}"
LOG_DIR="${LOG_DIR:-big_pretrain_logs}"
LOCAL_LOG_DIR="${LOCAL_LOG_DIR:-tpu_pod_logs/$TPU_NAME}"
LOG_WORKER="${LOG_WORKER:-0}"
FOLLOW="${FOLLOW:-1}"
STOP_TIMEOUT="${STOP_TIMEOUT:-600}"
DRY_RUN="${DRY_RUN:-0}"
SKIP_COMPILE="${SKIP_COMPILE:-0}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCAL_PYTHON="${LOCAL_PYTHON:-$REPO_ROOT/.venv/bin/python}"

[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "NUM_SLICES=$NUM_SLICES: give a number of slices, 1 or more"

if [[ -z "$RUNTIME_VERSION" ]]; then
  # https://cloud.google.com/tpu/docs/runtimes (JAX and PyTorch images). As each generation's
  # runtime_version in big_pretrain/accelerators.py (tests/test_tpu_pod_launch.py checks).
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

alive() {  # alive PID: the process exists and is no zombie (an exited orphan nobody reaped yet)
  local stat
  stat="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
  stat="${stat// /}"
  [[ -n "$stat" && "$stat" != Z* ]]
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

worker_files() {  # sets pid_file, rc_file, log_file
  local dir
  dir="$(home_path "$LOG_DIR")"
  mkdir -p "$dir"
  pid_file="$dir/train.pid"
  rc_file="$dir/train.rc"
  log_file="$dir/train.log"
}

worker_hlo_dir() {  # where DUMP_HLO=1 makes XLA write this worker's HLO
  echo "$(home_path "$LOG_DIR")/hlo_dump"
}

worker_running() {  # exit 0 if the training started here is alive
  local pid
  [[ -f "$pid_file" ]] || return 1
  pid="$(cat "$pid_file")"
  [[ -n "$pid" ]] && alive "$pid"
}

SUDO=()
tpu_holders() {  # tpu_holders FILE...: the pids of the processes that have one of FILEs open
  if command -v lsof >/dev/null 2>&1; then
    "${SUDO[@]}" lsof -t "$@" 2>/dev/null | sort -u || true
    return 0
  fi
  local fd target file
  for fd in /proc/[0-9]*/fd/*; do
    target="$(readlink "$fd" 2>/dev/null)" || continue
    for file; do
      if [[ "$target" == "$file" ]]; then
        fd="${fd#/proc/}"
        echo "${fd%%/*}"
      fi
    done
  done | sort -u
}

worker_free_tpu() {
  # As MaxText does before each run (tools/orchestration/multihost_runner.py): a process that
  # still holds the TPU's devices (a crashed run's leftover, a forgotten notebook) makes the new
  # one fail to get them, and a stale libtpu lock file makes libtpu refuse. Only called when no
  # training started by this script runs here. (Tests point the two paths at fakes.)
  local dev_dir="${BIG_PRETRAIN_TPU_DEV_DIR:-/dev}"
  local lock_file="${BIG_PRETRAIN_LIBTPU_LOCKFILE:-/tmp/libtpu_lockfile}"
  local devices=() path pids pid waited=0
  for path in "$dev_dir"/accel* "$dev_dir"/vfio/*; do  # v2-v4: /dev/accelN; v5e, v5p, v6e: vfio
    if [[ -e "$path" ]]; then devices+=("$path"); fi
  done
  if sudo -n true 2>/dev/null; then SUDO=(sudo -n); fi  # TPU VMs: to see other users' processes
  if ((${#devices[@]})); then
    pids="$(tpu_holders "${devices[@]}")"
    for pid in $pids; do
      [[ "$pid" != "$$" ]] || continue
      log "$(hostname): killing process $pid, which holds the TPU: $(ps -o args= -p "$pid" 2>/dev/null | cut -c1-120)"
      "${SUDO[@]}" kill -9 "$pid" 2>/dev/null || true
    done
    for pid in $pids; do
      while alive "$pid" && ((waited < 30)); do
        sleep 1
        waited=$((waited + 1))
      done
      if alive "$pid"; then die "$(hostname): process $pid still holds the TPU after kill -9"; fi
    done
  fi
  if [[ -e "$lock_file" ]]; then
    "${SUDO[@]}" rm -f "$lock_file"
    log "$(hostname): removed libtpu's lock file $lock_file"
  fi
}

worker_check() {
  worker_files
  if worker_running; then
    die "$(hostname): training is running (pid $(cat "$pid_file")), the TPU is busy; stop it first"
  fi
  worker_free_tpu
  cd "$(home_path "$REMOTE_DIR")"
  # As main.py does: join the other workers first (auto-detected on TPU VMs).
  .venv/bin/python -c 'from big_pretrain import distributed; distributed.initialize(); import jax
print(f"process {jax.process_index()} of {jax.process_count()}:", jax.local_device_count(),
      "local of", jax.device_count(), "devices,", jax.devices()[0].device_kind)'
}

worker_train() {  # runs in its own session (setsid): main.py, then its exit code
  worker_files
  echo "$$" >"$pid_file"
  rm -f "$rc_file"
  trap 'true' TERM  # let main.py checkpoint on SIGTERM; this shell then records its code
  if [[ -n "$LIBTPU_INIT_ARGS" ]]; then export LIBTPU_INIT_ARGS; else unset LIBTPU_INIT_ARGS; fi
  if [[ "$DUMP_HLO" == 1 ]]; then
    XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_dump_to=$(worker_hlo_dir)"
    export XLA_FLAGS
  fi
  local rc=0
  {
    echo "=== $(date -u '+%Y-%m-%d %H:%M:%S UTC') $(hostname): python main.py $*"
    if [[ -n "${LIBTPU_INIT_ARGS:-}" ]]; then echo "=== LIBTPU_INIT_ARGS=$LIBTPU_INIT_ARGS"; fi
    if [[ -n "${XLA_FLAGS:-}" ]]; then echo "=== XLA_FLAGS=$XLA_FLAGS"; fi
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
  worker_free_tpu
  worker_mount
  cd "$(home_path "$REMOTE_DIR")"
  [[ -x .venv/bin/python ]] || die "$(hostname): no .venv in $PWD; run 'install' first"
  rm -f "$pid_file" "$rc_file"
  if [[ "$DUMP_HLO" == 1 ]]; then  # this run's HLO only
    rm -rf "$(worker_hlo_dir)"
    mkdir -p "$(worker_hlo_dir)"
    log "$(hostname): XLA dumps its HLO into $(worker_hlo_dir)"
  fi
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
  while alive "$pid" && ((waited < STOP_TIMEOUT)); do
    sleep 1
    waited=$((waited + 1))
  done
  if alive "$pid"; then
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

worker_poll() {  # for `watch`: a line "@@tpu_pod STATE CODE FROM", then the training log from byte FROM
  local from="${1:-0}" size=0 state code=-
  worker_files
  if worker_running; then
    state=running
  elif [[ -f "$rc_file" ]]; then
    state=exited
    code="$(cat "$rc_file")"
  elif [[ -f "$pid_file" ]]; then
    state=vanished  # killed before it could record an exit code, or the VM restarted
  else
    state=never
  fi
  if [[ -f "$log_file" ]]; then size=$(($(wc -c <"$log_file"))); fi
  if ((from > size)); then from=0; fi  # a new log (a new VM): send it whole
  echo "@@tpu_pod $state ${code:-?} $from"
  if ((size > from)); then tail -c +"$((from + 1))" "$log_file"; fi
}

case "$COMMAND" in
  worker-install) worker_install; exit ;;
  worker-check) worker_check; exit ;;
  worker-train) worker_train "${OVERRIDES[@]}"; exit ;;
  worker-run) worker_run "${OVERRIDES[@]}"; exit ;;
  worker-stop) worker_stop; exit ;;
  worker-status) worker_status; exit ;;
  worker-poll) worker_poll "${OVERRIDES[@]}"; exit ;;
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
SSH_FLAGS=(--quiet)  # for tpu-vm ssh and scp
if [[ "$INTERNAL_IP" == 1 ]]; then SSH_FLAGS+=(--internal-ip); fi
MAX_PARALLEL_SSH=32    # `watch` polls this many workers at a time
SSH_MISSES_ALLOWED=3   # polls in a row a worker may not answer before `watch` gives it up

# What to undo when this script ends, or is interrupted.
CLEANUP=()   # temporary files and folders
BG_PIDS=()   # gcloud sessions running in the background
on_exit() {
  rm -rf "${CLEANUP[@]}"
}
kill_tree() {  # a process and its descendants (a gcloud session and its ssh)
  local child
  for child in $(pgrep -P "$1" 2>/dev/null); do kill_tree "$child"; done
  kill -TERM "$1" 2>/dev/null || true
}
on_interrupt() {  # Ctrl-C: end our gcloud sessions; what they started on the workers goes on
  local pid
  for pid in "${BG_PIDS[@]}"; do kill_tree "$pid"; done
  log "interrupted; what already runs on the workers goes on ('status' shows it, 'stop' stops it)"
  exit 130
}
trap on_exit EXIT
trap on_interrupt INT TERM

gc() {  # gcloud, echoed; DRY_RUN=1 only echoes
  echo "+ gcloud $(quote_args "$@")" >&2
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

node_of_slice() {  # the node id of slice $1: the queued resource's --node-prefix names them PREFIX-0, PREFIX-1, ...
  if ((NUM_SLICES == 1)); then echo "$TPU_NAME"; else echo "$TPU_NAME-$1"; fi
}

nodes() {  # every node id, for messages
  local slice names=()
  for ((slice = 0; slice < NUM_SLICES; slice++)); do names+=("$(node_of_slice "$slice")"); done
  echo "${names[*]}"
}

hosts_of_type() {
  # Workers (hosts) in one slice of type $1, when the TPU API cannot be asked (DRY_RUN):
  # v4 and v5p names count TensorCores (2 per chip), v5e and v6e chips; 4 chips per host, but
  # v5e and v6e slices of up to 8 chips are one host. As big_pretrain/accelerators.py's slice
  # rules (tests/test_tpu_pod_launch.py checks).
  local family="${1%-*}" count="${1##*-}" chips
  [[ "$count" =~ ^[0-9]+$ ]] || die "ACCELERATOR_TYPE=$1: not a type such as v5p-64"
  case "$family" in
    v4 | v5p) chips=$((count / 2)) ;;
    v5litepod | v5e | v6e)
      chips="$count"
      if ((chips <= 8)); then chips=4; fi
      ;;
    *) chips="$count" ;;
  esac
  echo $((chips > 4 ? chips / 4 : 1))
}

WORKERS=""  # workers per slice
find_workers() {  # sets WORKERS as the TPU API lists slice 0's, as MaxText's multihost_runner.py does
  [[ -z "$WORKERS" ]] || return 0
  local listed=""
  if [[ "$DRY_RUN" != 1 ]]; then
    listed="$(gcloud compute tpus tpu-vm describe "$(node_of_slice 0)" "${GCLOUD_FLAGS[@]}" \
      --flatten='networkEndpoints[]' --format='csv[no-heading](networkEndpoints.ipAddress)' \
      2>/dev/null | grep -c . || true)"
  fi
  if [[ "$listed" =~ ^[1-9][0-9]*$ ]]; then
    WORKERS="$listed"
    return 0
  fi
  WORKERS="$(hosts_of_type "$ACCELERATOR_TYPE")"
  if [[ "$DRY_RUN" != 1 ]]; then
    log "warning: could not list the workers of $(node_of_slice 0); assuming $WORKERS per slice ($ACCELERATOR_TYPE)"
  fi
}

remote_command() {  # the command line that runs this script on a worker, with the settings it needs
  local name line=""
  for name in "${REMOTE_SETTINGS[@]}"; do
    line+="$name=$(printf '%q' "${!name}") "
  done
  line+="bash $REMOTE_SCRIPT$(printf ' %q' "$@")"
  echo "$line"
}

ssh_node() {  # ssh_node NODE WORKER REMOTE_COMMAND: on one worker of a node, or all (echoed)
  gc compute tpus tpu-vm ssh "$1" "${GCLOUD_FLAGS[@]}" --worker="$2" "${SSH_FLAGS[@]}" \
    --command="$3"
}

copy_to_workers() {  # copy_to_workers LOCAL_FILE REMOTE_NAME, to every slice, retried: fresh VMs take a while
  local slice node attempt
  for ((slice = 0; slice < NUM_SLICES; slice++)); do
    node="$(node_of_slice "$slice")"
    for attempt in 1 2 3 4 5; do
      if gc compute tpus tpu-vm scp "$1" "$node:$2" "${GCLOUD_FLAGS[@]}" --worker=all "${SSH_FLAGS[@]}"; then
        continue 2
      fi
      if ((attempt < 5)); then
        log "copy to the workers of $node failed (attempt $attempt of 5); retrying in 30s"
        sleep 30
      fi
    done
    die "could not copy $1 to the workers of $node"
  done
}

SCRIPT_PUSHED=0
push_script() {  # every worker runs this version of the script: copied there once, to an ACTIVE TPU
  [[ "$SCRIPT_PUSHED" == 0 ]] || return 0
  local state
  state="$(qr_state)"
  [[ "$state" == ACTIVE ]] || die "$QR_NAME is $state, not ACTIVE: 'create' it (or 'resume') first"
  copy_to_workers "${BASH_SOURCE[0]}" "$REMOTE_SCRIPT"
  SCRIPT_PUSHED=1
}

prefix_lines() {  # prefix_lines PREFIX: stdin's lines, each saying which slice it came from
  local line
  while IFS= read -r line || [[ -n "$line" ]]; do printf '%s%s\n' "$1" "$line"; done
}

on_workers() {  # on_workers all|W|S:W COMMAND [ARGS...]: this script on the TPU VMs
  local target="$1" remote worker slice slices=() pids=() pid failed=0
  shift
  case "$target" in
    all)
      worker=all
      for ((slice = 0; slice < NUM_SLICES; slice++)); do slices+=("$slice"); done
      ;;
    *:*) slices=("${target%%:*}") worker="${target#*:}" ;;
    *) slices=(0) worker="$target" ;;
  esac
  if [[ ! "${slices[0]}" =~ ^[0-9]+$ ]] || ((slices[0] >= NUM_SLICES)); then
    die "no slice '${slices[0]}' in $target (NUM_SLICES=$NUM_SLICES)"
  fi
  push_script
  remote="$(remote_command "$@")"
  if [[ "$DRY_RUN" == 1 || ${#slices[@]} == 1 ]]; then
    for slice in "${slices[@]}"; do ssh_node "$(node_of_slice "$slice")" "$worker" "$remote" || failed=1; done
    return "$failed"
  fi
  # Every slice at once: a Multislice job's processes (`check`, main.py) start together.
  for slice in "${slices[@]}"; do
    ssh_node "$(node_of_slice "$slice")" "$worker" "$remote" </dev/null 2>&1 |
      prefix_lines "[slice $slice] " &
    pids+=("$!")
    BG_PIDS+=("$!")
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  BG_PIDS=()
  return "$failed"
}

# --- `watch`: every worker's state and log, polled from here.
declare -A STATE=() CODE=() MISSES=()
KEYS=()       # SLICE:WORKER of every worker
POLL_DIR=""   # the polls' answers
FOLLOW_KEY="" # the worker whose log `watch` prints

local_log() {  # local_log SLICE WORKER: where `watch` keeps that worker's log
  echo "$LOCAL_LOG_DIR/slice$1-worker$2.log"
}

file_size() {
  if [[ -f "$1" ]]; then echo $(($(wc -c <"$1"))); else echo 0; fi
}

remote_path_shown() {  # a path on the workers as a user would type it there
  # shellcheck disable=SC2088  # a literal ~: this is a message
  if [[ "$1" == /* ]]; then echo "$1"; else echo "~/$1"; fi
}

watch_setup() {  # the workers, the local log folder, a folder for the polls' answers
  local slice worker
  find_workers
  KEYS=()
  for ((slice = 0; slice < NUM_SLICES; slice++)); do
    for ((worker = 0; worker < WORKERS; worker++)); do KEYS+=("$slice:$worker"); done
  done
  case "$LOG_WORKER" in
    all) FOLLOW_KEY="" ;;
    *:*) FOLLOW_KEY="$LOG_WORKER" ;;
    *) FOLLOW_KEY="0:$LOG_WORKER" ;;
  esac
  [[ "$DRY_RUN" == 1 ]] || mkdir -p "$LOCAL_LOG_DIR"
  if [[ -z "$POLL_DIR" ]]; then
    POLL_DIR="$(mktemp -d "${TMPDIR:-/tmp}/tpu_pod_poll.XXXXXX")"
    CLEANUP+=("$POLL_DIR")
  fi
}

ssh_quietly() {  # ssh_quietly NODE WORKER REMOTE_COMMAND OUT: not echoed (polls repeat); OUT.out, OUT.rc
  local rc=0
  gcloud compute tpus tpu-vm ssh "$1" "${GCLOUD_FLAGS[@]}" --worker="$2" "${SSH_FLAGS[@]}" \
    --command="$3" </dev/null >"$4.out" 2>"$4.err" || rc=$?
  echo "$rc" >"$4.rc"
}

poll_workers() {  # every worker's state (STATE, CODE) and new log bytes (into LOCAL_LOG_DIR), in parallel
  local key slice worker remote batch=()
  for key in "${KEYS[@]}"; do
    slice="${key%:*}" worker="${key#*:}"
    remote="$(remote_command worker-poll -- "$(file_size "$(local_log "$slice" "$worker")")")"
    if [[ "$DRY_RUN" == 1 ]]; then
      ssh_node "$(node_of_slice "$slice")" "$worker" "$remote"
      continue
    fi
    ssh_quietly "$(node_of_slice "$slice")" "$worker" "$remote" "$POLL_DIR/$slice-$worker" &
    batch+=("$!")
    BG_PIDS+=("$!")
    if ((${#batch[@]} >= MAX_PARALLEL_SSH)); then
      wait "${batch[@]}" || true
      batch=()
    fi
  done
  if ((${#batch[@]})); then wait "${batch[@]}" || true; fi
  BG_PIDS=()
  [[ "$DRY_RUN" != 1 ]] || return 0
  for key in "${KEYS[@]}"; do read_poll "${key%:*}" "${key#*:}"; done
}

read_poll() {  # read_poll SLICE WORKER: that worker's answer: its state line, then its new log bytes
  local key="$1:$2" answer="$POLL_DIR/$1-$2" log_file header offset state code from
  log_file="$(local_log "$1" "$2")"
  header="$(grep -a -m1 '^@@tpu_pod ' "$answer.out" 2>/dev/null || true)"
  if [[ "$(cat "$answer.rc" 2>/dev/null)" != 0 || -z "$header" ]]; then
    MISSES[$key]=$((${MISSES[$key]:-0} + 1))
    if ((MISSES[$key] >= SSH_MISSES_ALLOWED)); then STATE[$key]=unreachable; fi
    return 0
  fi
  MISSES[$key]=0
  read -r _ state code from <<<"$header"
  STATE[$key]="$state"
  CODE[$key]="$code"
  if [[ -f "$log_file" && "$from" != "$(file_size "$log_file")" ]]; then
    # The worker's log started again (a new TPU after `resume`): keep the old one aside.
    mv "$log_file" "${log_file%.log}.$(date +%Y%m%d-%H%M%S).log"
  fi
  offset="$(grep -a -b -m1 '^@@tpu_pod ' "$answer.out" | cut -d: -f1)"
  tail -c +"$((offset + ${#header} + 2))" "$answer.out" >>"$log_file"
  if [[ "$key" == "$FOLLOW_KEY" ]]; then tail -c +"$((offset + ${#header} + 2))" "$answer.out"; fi
}

describe_worker() {  # what became of worker SLICE:WORKER, in words
  local key="$1"
  case "${STATE[$key]:-unknown}" in
    exited)
      case "${CODE[$key]}" in
        75) echo "main.py saved a checkpoint on a preemption notice and exited with code 75" ;;
        *) echo "main.py exited with code ${CODE[$key]}" ;;
      esac
      ;;
    vanished) echo "main.py is gone without an exit code (killed, or the VM restarted)" ;;
    never) echo "no training was started there (or its log folder is gone)" ;;
    unreachable) echo "ssh failed $SSH_MISSES_ALLOWED polls in a row; $QR_NAME is $(qr_state)" ;;
    *) echo "${STATE[$key]:-unknown}" ;;
  esac
}

fail_fast() {  # fail_fast KEY...: these workers failed: say so, stop every worker (a checkpoint), collect the logs, exit
  local key first="$1" code=1
  if [[ "${STATE[$first]}" == exited && "${CODE[$first]}" =~ ^[1-9][0-9]*$ ]]; then code="${CODE[$first]}"; fi
  for key; do
    log "FAILED: slice ${key%:*} worker ${key#*:} (node $(node_of_slice "${key%:*}")): $(describe_worker "$key")"
  done
  echo "--- the end of slice ${first%:*} worker ${first#*:}'s log ($(local_log "${first%:*}" "${first#*:}")):" >&2
  tail -n 20 "$(local_log "${first%:*}" "${first#*:}")" >&2 2>/dev/null || true
  echo "---" >&2
  log "stopping main.py on every worker (SIGTERM: it saves a checkpoint; 'run' or 'resume' carries on from it)"
  (on_workers all worker-stop) || log "warning: could not stop every worker (above); 'status' shows them"
  poll_workers  # the logs' last lines
  copy_hlo_dump
  log "every worker's log: $LOCAL_LOG_DIR"
  exit "$code"
}

copy_hlo_dump() {  # DUMP_HLO=1: slice 0 worker 0's dump (all workers compile the same programs), into LOCAL_LOG_DIR
  [[ "$DUMP_HLO" == 1 ]] || return 0
  local remote="$LOG_DIR/hlo_dump"
  [[ "$DRY_RUN" == 1 ]] || rm -rf "$LOCAL_LOG_DIR/hlo_dump"
  if gc compute tpus tpu-vm scp --recurse "$(node_of_slice 0):$remote" "$LOCAL_LOG_DIR/" \
    "${GCLOUD_FLAGS[@]}" --worker=0 "${SSH_FLAGS[@]}"; then
    log "HLO dump of slice 0 worker 0: $LOCAL_LOG_DIR/hlo_dump (each worker's: $(remote_path_shown "$remote"))"
  else
    log "warning: could not copy the HLO dump; each worker has its own in $(remote_path_shown "$remote")"
  fi
}

cmd_watch() {
  local key running finished failed summary last=""
  watch_setup
  STATE=() CODE=() MISSES=()  # not what a poll before `run` saw
  push_script  # the workers answer polls with this script's version
  log "watching $((NUM_SLICES * WORKERS)) workers ($NUM_SLICES slice(s) of $WORKERS) every ${POLL_SECONDS}s; their logs go to $LOCAL_LOG_DIR; Ctrl-C stops watching, not the training"
  if [[ "$DRY_RUN" == 1 ]]; then
    poll_workers
    copy_hlo_dump
    return 0
  fi
  while true; do
    poll_workers
    running=0 finished=0 failed=()
    for key in "${KEYS[@]}"; do
      case "${STATE[$key]:-unknown}" in
        exited)
          if [[ "${CODE[$key]}" == 0 ]]; then finished=$((finished + 1)); else failed+=("$key"); fi
          ;;
        vanished | never | unreachable) failed+=("$key") ;;
        *) running=$((running + 1)) ;;  # running, or no answer yet
      esac
    done
    if ((${#failed[@]})); then fail_fast "${failed[@]}"; fi
    if ((finished == ${#KEYS[@]})); then
      log "main.py exited with code 0 on all ${#KEYS[@]} workers"
      copy_hlo_dump
      log "every worker's log: $LOCAL_LOG_DIR"
      return 0
    fi
    summary="$running running, $finished finished"
    if [[ "$summary" != "$last" ]]; then
      log "$summary"
      last="$summary"
    fi
    sleep "$POLL_SECONDS"
  done
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
  # The same config and overrides as `run`, compiled for the slice(s) here, before they are paid for.
  local report_dir="${TMPDIR:-/tmp}/big_pretrain_compile_for"
  local command=("$LOCAL_PYTHON" "$REPO_ROOT/main.py" --config="$CONFIG" --workdir="$report_dir"
    --compile_for="$ACCELERATOR_TYPE")
  if ((NUM_SLICES > 1)); then command+=(--num_slices="$NUM_SLICES"); fi
  command+=("${OVERRIDES[@]}")
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $(quote_args "${command[@]}")" >&2
    return 0
  fi
  [[ -x "$LOCAL_PYTHON" ]] || die "no $LOCAL_PYTHON to compile with: run 'make install-tpu-compile' in $REPO_ROOT, set LOCAL_PYTHON, or SKIP_COMPILE=1"
  if [[ -n "$LIBTPU_INIT_ARGS" ]]; then export LIBTPU_INIT_ARGS; fi  # compile as the workers will
  log "compiling $CONFIG for $NUM_SLICES x $ACCELERATOR_TYPE on this machine first (SKIP_COMPILE=1 skips it)"
  "${command[@]}" || die "$CONFIG does not compile or fit on $NUM_SLICES x $ACCELERATOR_TYPE (above); nothing was requested"
}

cmd_create() {
  local state
  if [[ "$SKIP_COMPILE" != 1 ]]; then cmd_compile; fi
  state="$(qr_state)"
  if [[ "$state" != NOT_FOUND && "$DRY_RUN" != 1 ]]; then
    log "queued resource $QR_NAME exists ($state)"
  else
    local flags=()
    if ((NUM_SLICES > 1)); then  # one node per slice: TPU_NAME-0, TPU_NAME-1, ...
      flags+=(--node-count="$NUM_SLICES" --node-prefix="$TPU_NAME")
    else
      flags+=(--node-id="$TPU_NAME")
    fi
    flags+=(--accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
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
        log "$QR_NAME is ACTIVE: $NUM_SLICES x $ACCELERATOR_TYPE, node(s) $(nodes) in $ZONE"
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
    local tarball="${TMPDIR:-/tmp}/big_pretrain_src.tgz"
    if [[ "$DRY_RUN" != 1 ]]; then
      tarball="$(mktemp "${TMPDIR:-/tmp}/big_pretrain_src.XXXXXX")"
      CLEANUP+=("$tarball")
      tar -C "$REPO_ROOT" --exclude=.git --exclude=.venv --exclude=workdirs \
        --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache \
        --exclude=tpu_pod_logs -czf "$tarball" .
      log "copying $REPO_ROOT ($(du -h "$tarball" | cut -f1)) to every worker"
    fi
    copy_to_workers "$tarball" "$REMOTE_TARBALL"
  else
    log "cloning $REPO_URL at $REPO_REF on every worker"
  fi
  on_workers all worker-install
}

refuse_if_running() {  # `run` would find the TPU busy, and stale-process clean-up must not hit our own training
  local key busy=""
  watch_setup
  push_script
  poll_workers
  for key in "${KEYS[@]}"; do
    if [[ "${STATE[$key]:-}" == running ]]; then busy+="${busy:+, }slice ${key%:*} worker ${key#*:}"; fi
  done
  if [[ -n "$busy" ]]; then
    die "main.py already runs on $busy: 'watch' follows it, 'stop' stops it"
  fi
}

cmd_run() {
  need_workdir
  find_workers
  if [[ "$DRY_RUN" != 1 ]]; then refuse_if_running; fi
  if ! on_workers all worker-run -- --config="$CONFIG" --workdir="$WORKDIR" "${OVERRIDES[@]}"; then
    log "main.py did not start on every worker (above); stopping it where it did"
    (on_workers all worker-stop) || true
    die "nothing runs now; see above (or 'status'), then 'run' again"
  fi
  if [[ "$FOLLOW" == 1 ]]; then
    cmd_watch
  else
    log "started on every worker; 'watch' follows them all, 'logs' one"
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
  watch) cmd_watch ;;
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
