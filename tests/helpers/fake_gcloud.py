"""A stand-in for `gcloud` that launch/tpu_pod.sh drives in tests/test_tpu_pod_launch.py.

It answers the few commands the script uses, as Cloud TPU would, with every TPU VM worker a
folder on this machine:

  compute tpus queued-resources describe|create|delete   ACTIVE (or $FAKE_QR_STATE); recorded
  compute tpus tpu-vm describe NODE                       one IP address per worker
  compute tpus tpu-vm ssh NODE --worker=W|all --command=C runs C with bash in each worker's home
  compute tpus tpu-vm scp [--recurse] SRC DEST --worker=W|all   copies into or out of the homes

Each call's argv is appended to $FAKE_GCLOUD_DIR/calls.jsonl. The nodes that exist are
$FAKE_TPU_NODES (space-separated; others answer NOT_FOUND, as for a wrong name); each has the
workers of one slice of $ACCELERATOR_TYPE (v5p-16: 8 chips, 2 hosts of 4). Worker W of NODE
lives in $FAKE_GCLOUD_DIR/homes/NODE/wW: the command runs there with HOME set to it, with
FAKE_TPU_NODE and FAKE_TPU_WORKER set, `hostname` answering NODE-wW, and the script's TPU
device folder and libtpu lock file pointed into the home (never this machine's own).
"""

import json
import os
import shutil
import subprocess
import sys
import threading


def _fail(message: str, code: int = 1):
  print(f'ERROR: (gcloud) {message}', file=sys.stderr)
  sys.exit(code)


def _workers_per_node() -> int:
  """Hosts in one slice: v4/v5p names count TensorCores (2 per chip), 4 chips per host."""
  accelerator = os.environ.get('ACCELERATOR_TYPE', 'v5p-64')
  family, count = accelerator.rsplit('-', 1)
  chips = int(count) // 2 if family in ('v4', 'v5p') else int(count)
  if family in ('v5litepod', 'v5e', 'v6e') and chips <= 8:
    return 1
  return max(1, chips // 4)


def _nodes() -> list[str]:
  return os.environ.get('FAKE_TPU_NODES', 'big-pretrain').split()


def _check_node(node: str):
  if node not in _nodes():
    _fail(f'NOT_FOUND: node {node!r} (there are: {" ".join(_nodes())})')


def _workers(flag: str | None) -> list[int]:
  if flag == 'all':
    return list(range(_workers_per_node()))
  worker = int(flag or 0)
  if not 0 <= worker < _workers_per_node():
    _fail(f'worker {worker} out of range (0 to {_workers_per_node() - 1})')
  return [worker]


def _home(node: str, worker: int) -> str:
  home = os.path.join(os.environ['FAKE_GCLOUD_DIR'], 'homes', node, f'w{worker}')
  hostname = os.path.join(home, '.fakebin', 'hostname')
  if not os.path.exists(hostname):  # a test may have made the home already
    for folder in ('.fakebin', 'dev', 'tmp'):
      os.makedirs(os.path.join(home, folder), exist_ok=True)
    with open(hostname, 'w', encoding='utf-8') as f:
      f.write(f'#!/bin/sh\necho {node}-w{worker}\n')
    os.chmod(hostname, 0o755)
  return home


def _remote_path(home: str, path: str) -> str:
  if path.startswith('~/'):
    path = path[2:]
  elif path == '~':
    path = ''
  return path if os.path.isabs(path) else os.path.join(home, path)


def _copy(source: str, dest: str, recurse: bool):
  if os.path.isdir(dest):
    dest = os.path.join(dest, os.path.basename(source.rstrip('/')))
  if os.path.isdir(source):
    if not recurse:
      _fail(f'{source} is a directory: give --recurse')
    shutil.copytree(source, dest, dirs_exist_ok=True)
  else:
    shutil.copy(source, dest)


def _ssh(node: str, workers: list[int], command: str) -> int:
  def run(worker: int, codes: dict):
    home = _home(node, worker)
    env = dict(os.environ, HOME=home, FAKE_TPU_NODE=node, FAKE_TPU_WORKER=str(worker),
               PATH=os.path.join(home, '.fakebin') + os.pathsep + os.environ['PATH'],
               BIG_PRETRAIN_TPU_DEV_DIR=os.path.join(home, 'dev'),
               BIG_PRETRAIN_LIBTPU_LOCKFILE=os.path.join(home, 'tmp', 'libtpu_lockfile'))
    codes[worker] = subprocess.run(['bash', '-c', command], cwd=home, env=env,
                                   stdin=subprocess.DEVNULL, check=False).returncode

  codes: dict[int, int] = {}
  threads = [threading.Thread(target=run, args=(worker, codes)) for worker in workers]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  return max(codes.values())


def _scp(positionals: list[str], workers_flag: str | None, recurse: bool) -> int:
  *sources, dest = positionals
  if ':' in dest:  # into the workers
    node, path = dest.split(':', 1)
    _check_node(node)
    for worker in _workers(workers_flag):
      target = _remote_path(_home(node, worker), path)
      for source in sources:
        _copy(source, target, recurse)
    return 0
  for source in sources:  # out of one worker
    node, path = source.split(':', 1)
    _check_node(node)
    (worker,) = _workers(workers_flag)
    remote = _remote_path(_home(node, worker), path)
    if not os.path.exists(remote):
      _fail(f'scp: {path}: No such file or directory')
    _copy(remote, dest, recurse)
  return 0


def split_argv(argv: list[str]) -> tuple[list[str], dict[str, str]]:
  """(positionals, {flag: value}) of a gcloud argv."""
  positionals, flags = [], {}
  for arg in argv:
    if arg.startswith('--'):
      name, _, value = arg[2:].partition('=')
      flags[name] = value
    else:
      positionals.append(arg)
  return positionals, flags


def main(argv: list[str]) -> int:
  with open(os.path.join(os.environ['FAKE_GCLOUD_DIR'], 'calls.jsonl'), 'a',
            encoding='utf-8') as f:
    f.write(json.dumps(argv) + '\n')
  positionals, flags = split_argv(argv)
  if positionals[:3] != ['compute', 'tpus', 'queued-resources'] and \
      positionals[:3] != ['compute', 'tpus', 'tpu-vm']:
    _fail(f'the fake does not know {argv}')
  group, verb, *rest = positionals[2:]
  if group == 'queued-resources':
    if verb == 'describe':
      print(os.environ.get('FAKE_QR_STATE', 'ACTIVE'))
    return 0  # create, delete: recorded above
  if verb == 'describe':
    _check_node(rest[0])
    for worker in range(_workers_per_node()):
      print(f'10.0.0.{worker + 2}')
    return 0
  if verb == 'ssh':
    _check_node(rest[0])
    return _ssh(rest[0], _workers(flags.get('worker')), flags['command'])
  if verb == 'scp':
    return _scp(rest, flags.get('worker'), 'recurse' in flags)
  _fail(f'the fake does not know {argv}')
  return 1


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
