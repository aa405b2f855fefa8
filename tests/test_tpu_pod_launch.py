"""launch/tpu_pod.sh without a TPU or gcloud.

Its dry runs, one slice and two, print the gcloud commands it would run: they are checked
against gcloud's documented forms. Whole runs on a fake TPU follow: tests/helpers/fake_gcloud.py
plays gcloud, every worker of every slice a folder here, and tests/helpers/fake_tpu_main.sh
plays main.py, so that the script's own worker commands (run, poll, stop, status) run for real:
a worker that dies stops the others and names itself, every worker's log comes back here.
"""

import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from big_pretrain import tpu_slices
from big_pretrain.accelerators import ACCELERATORS, tpu_generations
from helpers.fake_gcloud import split_argv
from helpers.fictional_accelerators import V9X

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'launch' / 'tpu_pod.sh'
HELPERS = REPO / 'tests' / 'helpers'

pytestmark = pytest.mark.skipif(not Path('/proc').is_dir(), reason='needs Linux (/proc)')

# The flags of each command as gcloud's reference documents them
# (cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/create, .../tpu-vm/ssh,
# .../tpu-vm/scp), with the gcloud-wide --project and --quiet.
QR_CREATE_FLAGS = {
    'zone', 'runtime-version', 'accelerator-type', 'topology', 'type', 'node-id', 'node-count',
    'node-prefix', 'async', 'boot-disk', 'data-disk', 'description', 'guaranteed', 'internal-ips',
    'labels', 'metadata', 'metadata-from-file', 'network', 'range', 'reserved', 'scopes',
    'service-account', 'shielded-secure-boot', 'spot', 'subnetwork', 'tags',
    'valid-after-duration', 'valid-after-time', 'valid-until-duration', 'valid-until-time',
    'reservation-host-folder', 'reservation-host-organization', 'reservation-host-project',
    'project', 'quiet'}
SSH_FLAGS = {
    'dry-run', 'force-key-file-overwrite', 'internal-ip', 'plain', 'ssh-flag', 'ssh-key-file',
    'strict-host-key-checking', 'worker', 'zone', 'command', 'output-directory',
    'ssh-key-expiration', 'ssh-key-expire-after', 'project', 'quiet'}
SCP_FLAGS = {
    'compress', 'dry-run', 'force-key-file-overwrite', 'internal-ip', 'plain', 'recurse',
    'scp-flag', 'ssh-key-file', 'strict-host-key-checking', 'worker', 'zone',
    'ssh-key-expiration', 'ssh-key-expire-after', 'project', 'quiet'}


def _printed_gcloud(stderr):
  """The gcloud argvs a run printed (`+ gcloud ...` lines), without `gcloud`."""
  return [shlex.split(line[len('+ gcloud '):]) for line in stderr.splitlines()
          if line.startswith('+ gcloud ')]


def _commands(calls, verb):
  """{(node, worker, remote script command)} of the ssh calls that run `verb` on the workers."""
  found = set()
  for argv in calls:
    positionals, flags = split_argv(argv)
    if positionals[:4] == ['compute', 'tpus', 'tpu-vm', 'ssh']:
      words = shlex.split(flags['command'])
      if verb in words:
        found.add((positionals[4], flags['worker'], verb))
  return found


def _check_documented(calls):
  """Every create, ssh and scp uses only documented flags and the documented arguments."""
  for argv in calls:
    positionals, flags = split_argv(argv)
    if positionals[:4] == ['compute', 'tpus', 'queued-resources', 'create']:
      assert set(flags) <= QR_CREATE_FLAGS, argv
      assert len(positionals) == 5 and {'zone', 'runtime-version', 'accelerator-type'} <= set(flags)
      # Documented: (--node-id=NODE_ID | [--node-count=NODE_COUNT : --node-prefix=NODE_PREFIX]).
      assert ('node-id' in flags) != ('node-count' in flags), argv
      assert ('node-count' in flags) == ('node-prefix' in flags), argv
    elif positionals[:4] == ['compute', 'tpus', 'tpu-vm', 'ssh']:
      assert set(flags) <= SSH_FLAGS and len(positionals) == 5, argv
    elif positionals[:4] == ['compute', 'tpus', 'tpu-vm', 'scp']:
      assert set(flags) <= SCP_FLAGS and len(positionals) >= 6, argv
      assert sum(':' in p for p in positionals[4:]) == 1, argv  # one side on the TPU VM


def _no_gcloud(tmp_path):
  """A PATH whose gcloud fails loudly and says it was called: a dry run must not call it."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  gcloud = bin_dir / 'gcloud'
  gcloud.write_text(f'#!/bin/sh\ntouch {tmp_path}/gcloud_was_called\nexit 9\n')
  gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
  return f'{bin_dir}{os.pathsep}{os.environ["PATH"]}'


def _env(tmp_path, path, **settings):
  """Only what the script needs: none of this machine's XLA_FLAGS, ZONE, ..."""
  env = {'PATH': path, 'HOME': str(tmp_path), 'TMPDIR': str(tmp_path), 'LANG': 'C.UTF-8'}
  env.update({name: str(value) for name, value in settings.items()})
  return env


def _dry_run(tmp_path, *args, **settings):
  result = subprocess.run(
      [str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True, timeout=60,
      env=_env(tmp_path, _no_gcloud(tmp_path), DRY_RUN=1, WORKDIR='gs://b/r',
               LOCAL_PYTHON=tmp_path / 'no_python', **settings))
  assert result.returncode == 0, result.stderr
  assert not (tmp_path / 'gcloud_was_called').exists()
  return result


def test_dry_run_of_two_slices_addresses_every_worker_of_every_slice(tmp_path):
  result = _dry_run(tmp_path, 'all', '--', '--config.total_steps=5',
                    NUM_SLICES=2, ACCELERATOR_TYPE='v5p-16')
  calls = _printed_gcloud(result.stderr)
  _check_documented(calls)

  # One queued resource of two nodes, which Cloud TPU names PREFIX-0 and PREFIX-1.
  creates = [split_argv(argv) for argv in calls if argv[2:4] == ['queued-resources', 'create']]
  assert len(creates) == 1
  positionals, flags = creates[0]
  assert positionals[4] == 'big-pretrain-qr'
  assert flags['node-count'] == '2' and flags['node-prefix'] == 'big-pretrain'
  assert flags['accelerator-type'] == 'v5p-16' and flags['runtime-version'] == 'v2-alpha-tpuv5'
  nodes = {'big-pretrain-0', 'big-pretrain-1'}

  # Compiled here for both slices first, with the same overrides.
  compiles = [shlex.split(line[2:]) for line in result.stderr.splitlines()
              if line.startswith('+ ') and 'main.py' in line]
  assert len(compiles) == 1
  assert {'--compile_for=v5p-16', '--num_slices=2', '--config.total_steps=5'} <= set(compiles[0])
  lines = result.stderr.splitlines()
  assert lines.index(next(l for l in lines if 'main.py' in l)) < lines.index(
      next(l for l in lines if 'queued-resources create' in l))

  # The code and this script go to every worker of both nodes.
  copies = {(split_argv(argv)[0][5].split(':')[0], split_argv(argv)[0][5].split(':')[1],
             split_argv(argv)[1]['worker']) for argv in calls if argv[2:4] == ['tpu-vm', 'scp']}
  assert copies == {(node, name, 'all') for node in nodes
                    for name in ('.big_pretrain_src.tgz', '.big_pretrain_tpu_pod.sh')}

  # Install, check and run reach every worker of both nodes; `watch` polls each worker.
  for verb in ('worker-install', 'worker-check', 'worker-run'):
    assert _commands(calls, verb) == {(node, 'all', verb) for node in nodes}
  assert _commands(calls, 'worker-poll') == {
      (node, worker, 'worker-poll') for node in nodes for worker in ('0', '1')}
  run = next(shlex.split(split_argv(argv)[1]['command']) for argv in calls
             if 'worker-run' in split_argv(argv)[1].get('command', ''))
  assert run[run.index('worker-run'):] == [
      'worker-run', '--', '--config=configs/mae_then_wsp.py', '--workdir=gs://b/r',
      '--config.total_steps=5']
  assert 'LIBTPU_INIT_ARGS=' in run  # empty: no flags guessed


def test_dry_run_of_one_slice_keeps_node_id_and_passes_the_new_settings(tmp_path):
  result = _dry_run(tmp_path, 'all', ACCELERATOR_TYPE='v5p-16', INTERNAL_IP=1, SPOT=1,
                    DUMP_HLO=1, LIBTPU_INIT_ARGS='--xla_a=true --xla_b=1')
  calls = _printed_gcloud(result.stderr)
  _check_documented(calls)
  (create,) = [split_argv(argv)[1] for argv in calls if argv[2:4] == ['queued-resources', 'create']]
  assert create['node-id'] == 'big-pretrain' and 'spot' in create
  assert '--num_slices' not in result.stderr
  for argv in calls:
    if argv[2:4] in (['tpu-vm', 'ssh'], ['tpu-vm', 'scp']):
      assert '--internal-ip' in argv, argv
  assert _commands(calls, 'worker-run') == {('big-pretrain', 'all', 'worker-run')}
  assert _commands(calls, 'worker-poll') == {
      ('big-pretrain', worker, 'worker-poll') for worker in ('0', '1')}
  run = next(shlex.split(split_argv(argv)[1]['command']) for argv in calls
             if 'worker-run' in split_argv(argv)[1].get('command', ''))
  assert {'LIBTPU_INIT_ARGS=--xla_a=true --xla_b=1', 'DUMP_HLO=1'} <= set(run)
  # The HLO dump of slice 0 worker 0 comes back to the local log folder.
  (dump,) = [split_argv(argv) for argv in calls if '--recurse' in argv]
  assert dump[0][4:] == ['big-pretrain:big_pretrain_logs/hlo_dump', 'tpu_pod_logs/big-pretrain/']
  assert dump[1]['worker'] == '0'


# --- The script's rules per accelerator type, as big_pretrain/accelerators.py has them.
# The script keeps its own case statements (it runs where the package is not installed):
# here they are run, through bash, for every slice of every TPU generation of the table.


def _script_lines(first: str, last: str) -> str:
  """The script's lines from the one that reads `first` to the next that reads `last`."""
  lines = SCRIPT.read_text().splitlines()
  assert first in lines, f'launch/tpu_pod.sh has no line {first!r} any more: update this test'
  start = lines.index(first)
  return '\n'.join(lines[start:lines.index(last, start) + 1])


def _script_says(definitions: str, function: str, accelerator_types) -> dict[str, str]:
  """What `function ACCELERATOR_TYPE` prints, with the script's `definitions`, for each type."""
  program = (f'die() {{ echo "died: $*"; exit 1; }}\n{definitions}\n'
             f'for type in "$@"; do echo "$type $({function} "$type")"; done\n')
  result = subprocess.run(['bash', '-c', program, 'tpu_pod.sh', *accelerator_types],
                          capture_output=True, text=True, timeout=60, check=True)
  return dict(line.split(' ', 1) for line in result.stdout.splitlines())


def script_disagreements(generation) -> list[str]:
  """Where launch/tpu_pod.sh boots `generation`'s slices with another runtime version, or
  counts other hosts in one, than the table: one line each, saying what to add to it."""
  rules = generation.slices
  names = [name for prefix in rules.prefixes
           for name in tpu_slices.slice_names(generation, prefix)]
  runtime_block = _script_lines('if [[ -z "$RUNTIME_VERSION" ]]; then', 'fi')
  runtimes = _script_says(
      f'runtime_version_of() {{\n  ACCELERATOR_TYPE="$1" RUNTIME_VERSION=""\n{runtime_block}\n'
      '  echo "$RUNTIME_VERSION"\n}', 'runtime_version_of', names)
  hosts = _script_says(_script_lines('hosts_of_type() {', '}'), 'hosts_of_type', names)
  table = f"ACCELERATORS['{generation.name}']"
  naming = ('count TensorCores (2 per chip)' if rules.name_counts_cores else 'count chips')
  wrong = []
  for name in names:
    prefix = name.rpartition('-')[0]
    if runtimes[name] != rules.runtime_version:
      wrong.append(f'launch/tpu_pod.sh boots {prefix}-N with {runtimes[name]!r}, {table} with '
                   f'{rules.runtime_version!r}: its RUNTIME_VERSION case needs `{prefix}-*) '
                   f'RUNTIME_VERSION={rules.runtime_version} ;;`.')
    tpu_slice = tpu_slices.parse_slice(name)
    if hosts[name] != str(tpu_slice.hosts):
      wrong.append(f'hosts_of_type in launch/tpu_pod.sh counts {hosts[name]} hosts in {name}, '
                   f'{table} {tpu_slice.hosts} ({tpu_slice.chips} chips): its case needs {prefix} '
                   f'among the generations whose names {naming}, {rules.chips_per_host} per '
                   f'host, one host up to {rules.single_host_max_chips} chips.')
  return list(dict.fromkeys(wrong))


@pytest.mark.parametrize('name', [generation.name for generation in tpu_generations()])
def test_the_script_boots_each_generation_and_counts_its_hosts_as_the_table_does(name):
  assert script_disagreements(ACCELERATORS[name]) == []


def test_a_generation_the_script_lacks_is_named_with_what_to_add():
  with ACCELERATORS.registered(V9X):
    wrong = script_disagreements(V9X)
  assert wrong[0] == ("launch/tpu_pod.sh boots v9x-N with 'tpu-ubuntu2204-base', "
                      "ACCELERATORS['v9x'] with 'v2-alpha-tpuv9x': its RUNTIME_VERSION case "
                      'needs `v9x-*) RUNTIME_VERSION=v2-alpha-tpuv9x ;;`.')
  assert wrong[1] == ("hosts_of_type in launch/tpu_pod.sh counts 2 hosts in v9x-8, "
                      "ACCELERATORS['v9x'] 1 (8 chips): its case needs v9x among the "
                      'generations whose names count chips, 4 per host, one host up to 8 chips.')
  assert len(wrong) == 2  # larger slices: 4 chips per host, as the script's default


# --- Runs on a fake TPU.


def _process_state(pid):
  """'R', 'S', ... of a process; None when it is gone (a zombie counts as gone)."""
  try:
    state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
  except (FileNotFoundError, ProcessLookupError, IndexError):
    return None
  return None if state in ('Z', 'X') else state


def _kill_strays(root):
  """Kills what the run left behind: every process whose command line names `root`."""
  for proc in Path('/proc').iterdir():
    if not proc.name.isdigit() or int(proc.name) == os.getpid():
      continue
    try:
      if str(root).encode() in (proc / 'cmdline').read_bytes():
        os.kill(int(proc.name), signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
      pass


class FakeTpu:
  """A fake gcloud on PATH whose TPU VM workers are folders under `root`."""

  def __init__(self, root: Path, nodes, **settings):
    self.root = root
    self.state = root / 'gcloud'
    self.state.mkdir()
    bin_dir = root / 'bin'
    bin_dir.mkdir()
    gcloud = bin_dir / 'gcloud'
    gcloud.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} '
                      f'{shlex.quote(str(HELPERS / "fake_gcloud.py"))} "$@"\n')
    gcloud.chmod(0o755)
    checkout = root / 'checkout'  # the workers' code: only a main.py stand-in
    (checkout / '.venv' / 'bin').mkdir(parents=True)
    python = checkout / '.venv' / 'bin' / 'python'
    python.write_text((HELPERS / 'fake_tpu_main.sh').read_text())
    python.chmod(0o755)
    self.logs = root / 'logs'
    self.env = _env(
        root, f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', FAKE_GCLOUD_DIR=self.state,
        FAKE_TPU_NODES=' '.join(nodes), TPU_NAME='pod', ACCELERATOR_TYPE='v5p-16',
        WORKDIR='gs://b/r', REMOTE_DIR=checkout, POLL_SECONDS=1, STOP_TIMEOUT=30,
        LOCAL_LOG_DIR=self.logs, **settings)

  def home(self, node, worker):
    return self.state / 'homes' / node / f'w{worker}'

  def run(self, *args, timeout=60):
    started = time.monotonic()
    process = subprocess.Popen([str(SCRIPT), *args], cwd=self.root, env=self.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
      stdout, stderr = process.communicate(timeout=timeout)
    finally:
      if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
    return process.returncode, stdout, stderr, time.monotonic() - started

  def calls(self):
    return [json.loads(line) for line in (self.state / 'calls.jsonl').read_text().splitlines()]

  def training_pid(self, node, worker):
    return int((self.home(node, worker) / 'big_pretrain_logs' / 'train.pid').read_text())

  def exit_code(self, node, worker):
    return (self.home(node, worker) / 'big_pretrain_logs' / 'train.rc').read_text().strip()


@pytest.fixture
def fake_tpu(tmp_path):
  made = []

  def make(nodes, **settings):
    made.append(FakeTpu(tmp_path, nodes, **settings))
    return made[-1]

  try:
    yield make
  finally:
    _kill_strays(tmp_path)


def _workers(nodes):
  return [(node, worker) for node in nodes for worker in (0, 1)]


@pytest.mark.multiprocess
def test_a_dead_worker_stops_every_slice_and_names_itself(fake_tpu):
  nodes = ['pod-0', 'pod-1']
  tpu = fake_tpu(nodes, NUM_SLICES=2, FAKE_FAIL_WORKER='pod-1:1', FAKE_FAIL_AFTER=4,
                 LIBTPU_INIT_ARGS='--xla_tpu_example=true', DUMP_HLO=1)
  # A stale process holds slice 0 worker 0's TPU, and libtpu's lock file is left over.
  device = tpu.home('pod-0', 0) / 'dev' / 'accel0'
  tpu.home('pod-0', 0).mkdir(parents=True)
  device.parent.mkdir()
  device.write_text('')
  (tpu.home('pod-0', 0) / 'tmp').mkdir()
  lock = tpu.home('pod-0', 0) / 'tmp' / 'libtpu_lockfile'
  lock.write_text('')
  stale = subprocess.Popen([sys.executable, '-c', 'import sys, time\n'
                            'f = open(sys.argv[1])\ntime.sleep(300)', str(device)])
  time.sleep(0.5)  # it has the file open

  code, stdout, stderr, seconds = tpu.run('run', '--', '--config.total_steps=5')

  assert code == 1, stderr  # the dead worker's exit code
  assert seconds < 45
  assert 'FAILED: slice 1 worker 1 (node pod-1): main.py exited with code 1' in stderr
  assert 'fake main.py on pod-1:1: Stopped: something broke' in stderr  # the end of its log
  assert stale.wait(timeout=5) == -signal.SIGKILL and not lock.exists()
  for node, worker in _workers(nodes):
    assert _process_state(tpu.training_pid(node, worker)) is None
    log = (tpu.logs / f'slice{nodes.index(node)}-worker{worker}.log').read_text()
    assert (f'fake main.py on {node}:{worker}: main.py --config=configs/mae_then_wsp.py '
            '--workdir=gs://b/r --config.total_steps=5') in log
    assert f'fake main.py on {node}:{worker}: LIBTPU_INIT_ARGS=--xla_tpu_example=true' in log
    assert '--xla_dump_to=' in log
    dead = (node, worker) == ('pod-1', 1)
    # The others got the stop (SIGTERM), checkpointed and exited 0; their logs came back whole.
    assert (tpu.home(node, worker) / 'got_sigterm').exists() != dead
    assert tpu.exit_code(node, worker) == ('1' if dead else '0')
    assert log.rstrip().endswith(f'main.py exited with {1 if dead else 0}')
  assert list((tpu.logs / 'hlo_dump').iterdir())
  # Every worker was stopped through its own node; nothing addressed a node that is not there.
  assert _commands(tpu.calls(), 'worker-stop') == {(node, 'all', 'worker-stop') for node in nodes}
  assert 'fake main.py on pod-0:0' in stdout  # `watch` prints LOG_WORKER's (0) log


@pytest.mark.multiprocess
def test_a_run_that_finishes_everywhere_exits_0(fake_tpu):
  nodes = ['pod-0', 'pod-1']
  tpu = fake_tpu(nodes, NUM_SLICES=2, FAKE_RUN_SECONDS=3, LOG_WORKER='1:1')

  code, stdout, stderr, _ = tpu.run('run')

  assert code == 0, stderr
  assert 'main.py exited with code 0 on all 4 workers' in stderr
  for node, worker in _workers(nodes):
    assert tpu.exit_code(node, worker) == '0'
    assert not (tpu.home(node, worker) / 'got_sigterm').exists()
    log = (tpu.logs / f'slice{nodes.index(node)}-worker{worker}.log').read_text()
    assert f'fake main.py on {node}:{worker}: finished' in log
  assert 'fake main.py on pod-1:1: finished' in stdout and 'pod-0:0' not in stdout


@pytest.mark.multiprocess
def test_run_refuses_while_training_runs_and_stop_ends_it(fake_tpu):
  tpu = fake_tpu(['pod'], FOLLOW=0)  # one slice of two workers

  code, _, stderr, _ = tpu.run('run')
  assert code == 0, stderr
  assert 'started on every worker' in stderr
  pids = [tpu.training_pid('pod', worker) for worker in (0, 1)]

  code, _, stderr, _ = tpu.run('run')
  assert code != 0
  assert 'main.py already runs on slice 0 worker 0, slice 0 worker 1' in stderr
  assert _commands(tpu.calls(), 'worker-run') == {('pod', 'all', 'worker-run')}  # once
  assert [tpu.training_pid('pod', worker) for worker in (0, 1)] == pids

  code, stdout, stderr, _ = tpu.run('status')
  assert code == 0 and stdout.count(': running (pid') == 2, stdout + stderr

  code, _, stderr, _ = tpu.run('stop')
  assert code == 0, stderr
  for worker in (0, 1):
    assert (tpu.home('pod', worker) / 'got_sigterm').exists()
    assert tpu.exit_code('pod', worker) == '0'
    assert _process_state(pids[worker]) is None
