"""main.py as a user meets it: each mistake answered in one line before any compile."""

import asyncio
import gc
import json
import logging
import os
import socket
import subprocess
import sys
import threading

import pytest
from absl import flags

import main as main_lib
from big_pretrain import cli
from big_pretrain.errors import WorkdirError
from big_pretrain.stages import chain
from big_pretrain.storage import files as storage
from big_pretrain.storage import run_lock
from helpers.paths import REPO_ROOT, TINY_CONFIG_FILE
from helpers.jax_workers import free_port

EXIT_USAGE = 2


def _start_main(args, **env_overrides):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('BIG_PRETRAIN_VERBOSE', None)
  env.update(env_overrides)
  return subprocess.Popen([sys.executable, 'main.py', *args], cwd=REPO_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _bad_input_cases(tmp_path):
  """(name, main.py arguments, what the one line must name); each fails before compiling."""
  workdir = f'--workdir={tmp_path / "run"}'
  demo = '--config=configs/mae.py:demo'
  raising_config = tmp_path / 'raising.py'
  raising_config.write_text('def get_config(arg=None):\n  raise ValueError("no such recipe")\n')
  a_file = tmp_path / 'a_file'
  a_file.write_text('not a folder')
  unknown_key_config = tmp_path / 'typo.py'
  unknown_key_config.write_text(
      'from configs.mae import get_config as base\n'
      'def get_config(arg=None):\n'
      '  config = base("demo")\n'
      '  config.optim.unlock()\n'
      '  config.optim.learning_rate = 0.1\n'
      '  return config\n')
  empty_folder = tmp_path / 'empty'
  (empty_folder / 'class_a').mkdir(parents=True)
  image_folder = ['--config.data.source=image_folder', f'--config.data.test_path={empty_folder}']
  return [
      ('bad override value', [demo, workdir, '--config.total_steps=abc'],
       "--config.total_steps=abc: invalid literal for int() with base 10: 'abc'"),
      ('missing config file', ['--config=configs/nope.py', workdir], "'configs/nope.py'"),
      ('config file raises', [f'--config={raising_config}', workdir],
       'ValueError: no such recipe'),
      ('unknown config arg', ['--config=configs/mae.py:dmeo', workdir], "unknown variant 'dmeo'"),
      ('no workdir', [demo], '--workdir=DIR is required'),
      ('workdir is a file', [demo, f'--workdir={a_file}'], 'is a file, not a folder'),
      ('image size vs patch', [demo, workdir, '--config.data.image_size=30'],
       'config.data.image_size=30 is not a multiple of the patch size 8'),
      ('mask ratio 1.0', [demo, workdir, '--config.objective.mask_ratio=1.0'],
       'config.objective.mask_ratio=1.0: must lie in [0, 1)'),
      ('mask ratio 1.5', [demo, workdir, '--config.objective.mask_ratio=1.5'],
       'config.objective.mask_ratio=1.5: must lie in [0, 1)'),
      ('no visible patch', [demo, workdir, '--config.objective.mask_ratio=0.99'],
       'keeps 0 of the 16 patches visible'),
      ('data path missing', [demo, workdir, *image_folder,
                             f'--config.data.path={tmp_path / "nowhere"}'],
       f"config.data.path: Image folder '{tmp_path / 'nowhere'}' does not exist"),
      ('no images in folder', [demo, workdir, *image_folder, f'--config.data.path={empty_folder}'],
       f"config.data.path: No images found in class subfolders of '{empty_folder}'"),
      ('no array_record shards', [demo, workdir, '--config.data.source=array_record',
                                  f'--config.data.path={empty_folder}',
                                  f'--config.data.test_path={empty_folder}'],
       'No ArrayRecord shards'),
      ('batch vs devices', [demo, workdir, '--config.batch_size=12'],
       'config.batch_size=12 must be a multiple of the 8 devices'),
      ('mistyped override', [demo, workdir, '--config.totl_steps=3'],
       "Bad command-line override --config.totl_steps=3: Unknown config key "
       "config.totl_steps. Did you mean 'total_steps'"),
      ('unknown key in a config file', [f'--config={unknown_key_config}', workdir],
       'config.optim.learning_rate'),
  ]


def _run_main_in_process(args, monkeypatch):
  """main.py's flag parsing and main() in this process, as app.run calls them (fast: no
  Python start-up per case); returns its exit code."""
  argv = ['main.py', *args]
  monkeypatch.setattr(sys, 'argv', argv)  # where ml_collections reads the overrides from
  flags.FLAGS.unparse_flags()
  for name in [name for name in flags.FLAGS if name.startswith('config.')]:
    delattr(flags.FLAGS, name)  # the overrides of the previous parse
  with pytest.raises(SystemExit) as exit_info:
    cli.parse_flags(argv)
    main_lib.main(['main.py'])
  return exit_info.value.code


def test_each_bad_input_is_one_line_and_exit_2_before_any_compile(tmp_path, capsys, monkeypatch):
  monkeypatch.delenv('BIG_PRETRAIN_VERBOSE', raising=False)
  monkeypatch.setattr(chain, 'run_validated', _fail_if_training_starts)
  failures = []
  for name, args, expected in _bad_input_cases(tmp_path):
    code = _run_main_in_process(args, monkeypatch)
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    if code != EXIT_USAGE or len(lines) != 1 or expected not in lines[0]:
      failures.append(f'{name}: exit {code}, stderr ({len(lines)} lines):\n{stderr[-1500:]}')
  assert not failures, '\n\n'.join(failures)
  assert not (tmp_path / 'run').exists()  # refused before anything was written


def _fail_if_training_starts(*args):
  raise AssertionError('validation let the run start')


@pytest.mark.integration
def test_main_py_answers_in_one_line_with_no_traceback_and_verbose_shows_it(tmp_path):
  # The whole program, as a user runs it: absl's app.run, exit code, stderr.
  cases = _bad_input_cases(tmp_path)
  override, raising_config = cases[0], cases[2]
  plain = _start_main(override[1])
  verbose = _start_main([*raising_config[1], '--verbose'])
  _, stderr = plain.communicate(timeout=240)
  assert plain.returncode == EXIT_USAGE, stderr
  assert stderr.strip().splitlines() == [f'main.py: Bad command-line override {override[2]}']
  _, stderr = verbose.communicate(timeout=240)
  assert verbose.returncode == EXIT_USAGE
  assert 'Traceback' in stderr and stderr.strip().endswith(raising_config[2])


def test_verbose_by_environment_variable(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv('BIG_PRETRAIN_VERBOSE', '1')
  _, args, expected = _bad_input_cases(tmp_path)[2]
  assert _run_main_in_process(args, monkeypatch) == EXIT_USAGE
  stderr = capsys.readouterr().err
  assert 'Traceback' in stderr and expected in stderr.strip().splitlines()[-1]


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders')
def test_read_only_workdir_is_refused(tmp_path):
  read_only = tmp_path / 'read_only'
  read_only.mkdir()
  read_only.chmod(0o555)
  with pytest.raises(WorkdirError, match='is not writable'):
    storage.check_usable(str(read_only / 'run'))


def test_read_only_mount_is_refused_even_for_root(tmp_path, monkeypatch):
  # A write that fails (a read-only mount, a full disk) is what the check tries for real.
  def refuse(path, *args, **kwargs):
    raise OSError(30, 'Read-only file system', path)
  monkeypatch.setattr('builtins.open', refuse)
  with pytest.raises(WorkdirError, match=r'read_only.* is not writable'):
    storage.check_usable(str(tmp_path / 'read_only'))
  storage.check_usable('gs://bucket/run')  # a bucket is left to its first write


def _write_lock(workdir, host, pid):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / run_lock.LOCK_FILE).write_text(
      json.dumps({'host': host, 'pid': pid, 'started': '2024-01-01 00:00:00 UTC'}))


def test_a_second_run_into_a_workdir_in_use_is_refused_naming_the_first(
    tmp_path, capsys, monkeypatch):
  workdir = tmp_path / 'run'
  with run_lock.run_lock(str(workdir)):
    with pytest.raises(WorkdirError, match=rf'in use by another run: pid {os.getpid()} on '
                                           'this host'):
      with run_lock.run_lock(str(workdir)):
        pass
  assert not (workdir / run_lock.LOCK_FILE).exists()  # released

  # main.py, with the lock held by another live process of this host.
  holder = subprocess.Popen(['sleep', '60'])
  try:
    _write_lock(workdir, socket.gethostname(), holder.pid)
    monkeypatch.setattr(chain, 'run_validated', _fail_if_training_starts)
    assert _run_main_in_process(['--config=configs/mae.py:demo', f'--workdir={workdir}'],
                                monkeypatch) == EXIT_USAGE
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f'in use by another run: pid {holder.pid} on this host' in line
  finally:
    holder.kill()
    holder.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_another_hosts_is_not(
    tmp_path, caplog):
  dead = subprocess.Popen(['true'])
  dead.wait()
  _write_lock(tmp_path, socket.gethostname(), dead.pid)
  with caplog.at_level(logging.WARNING):
    with run_lock.run_lock(str(tmp_path)):
      assert json.loads((tmp_path / run_lock.LOCK_FILE).read_text())['pid'] == os.getpid()
  assert f'(pid {dead.pid}, started' in caplog.text and 'no longer running' in caplog.text

  _write_lock(tmp_path, 'other-host', 12345)
  with pytest.raises(WorkdirError, match=r'pid 12345 on host other-host.*delete .*run\.lock'):
    with run_lock.run_lock(str(tmp_path)):
      pass
  with run_lock.run_lock(str(tmp_path), take=False):  # processes other than 0
    pass


def test_an_empty_lock_file_is_refused_as_naming_no_run_and_one_being_written_is_read(
    tmp_path):
  (tmp_path / run_lock.LOCK_FILE).write_text('')
  with pytest.raises(WorkdirError, match=r'lock file that names no run .*run\.lock is empty'):
    with run_lock.run_lock(str(tmp_path)):
      pass
  assert (tmp_path / run_lock.LOCK_FILE).read_text() == ''  # left for the user to judge

  # A run that created the lock a moment ago and is writing it: read once written.
  holder = subprocess.Popen(['sleep', '60'])
  try:
    writer = threading.Timer(0.3, _write_lock, (tmp_path, socket.gethostname(), holder.pid))
    writer.start()
    with pytest.raises(WorkdirError, match=rf'in use by another run: pid {holder.pid} on this'):
      with run_lock.run_lock(str(tmp_path)):
        pass
    writer.join()
  finally:
    holder.kill()
    holder.wait()


@pytest.mark.multiprocess
def test_a_workdir_in_use_stops_every_process_of_a_two_process_run(tmp_path):
  # Only process 0 takes the lock; the others must stop with it, not go on to wait for it
  # in their first collective.
  workdir = tmp_path / 'run'
  holder = subprocess.Popen(['sleep', '120'])
  port = free_port()
  processes = []
  try:
    _write_lock(workdir, socket.gethostname(), holder.pid)
    processes = [
        _start_main([f'--config={TINY_CONFIG_FILE}', f'--workdir={workdir}',
                     f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                     f'--process_id={i}'],
                    JAX_NUM_CPU_DEVICES='1', XLA_FLAGS='--xla_backend_optimization_level=0')
        for i in range(2)]
    outputs = [process.communicate(timeout=90)[1] for process in processes]
  finally:
    for process in [holder, *processes]:
      process.kill()
      process.wait()
  assert [process.returncode for process in processes] == [EXIT_USAGE, EXIT_USAGE], outputs
  lines = [output.strip().splitlines()[-1] for output in outputs]
  assert lines[0].startswith(f'main.py: --workdir={workdir} is in use by another run: '
                             f'pid {holder.pid}')
  assert lines[1].startswith('main.py: Process 0 of this run stopped: --workdir=')
  assert all('Traceback' not in output for output in outputs)


def _error_record(pathname):
  try:
    raise ValueError('RESOURCE_EXHAUSTED: No space left on device')
  except ValueError:
    return logging.LogRecord('absl', logging.ERROR, pathname, 387,
                             'Save thread raised an exception: %s', ('RESOURCE_EXHAUSTED',),
                             sys.exc_info())


def test_a_library_errors_traceback_is_dropped_and_verbose_keeps_it(monkeypatch):
  # Orbax's save threads and asyncio log a traceback per failed write (a full disk:
  # five) around main.py's one-line message that the save failed.
  monkeypatch.delenv('BIG_PRETRAIN_VERBOSE', raising=False)
  quiet = cli._QuietLibraryInfo()  # pylint: disable=protected-access
  library = f'{REPO_ROOT}/.venv/site-packages/orbax/future.py'  # a venv inside the repository
  record = _error_record(library)
  assert quiet.filter(record)
  assert 'Traceback' not in logging.Formatter().format(record)
  assert 'raised an exception: RESOURCE_EXHAUSTED' in record.getMessage()
  own = _error_record(f'{REPO_ROOT}/big_pretrain/train/loop.py')
  assert quiet.filter(own) and 'Traceback' in logging.Formatter().format(own)

  monkeypatch.setenv('BIG_PRETRAIN_VERBOSE', '1')
  record = _error_record(library)
  assert quiet.filter(record)
  assert 'Traceback' in logging.Formatter().format(record)


class _WriteLandingOnAClosedLoop:
  """Where tensorstore's writer threads are after a failed Orbax save: a write finishes
  and reports to an event loop that is closed. From __del__, Python can only hand the
  error to sys.unraisablehook, as tensorstore's C++ threads do."""

  def __init__(self):
    self.loop = asyncio.new_event_loop()
    self.loop.close()

  def __del__(self):
    self.loop.call_soon_threadsafe(lambda: None)


def test_a_failed_saves_closed_loop_echoes_are_dropped_and_verbose_keeps_them(
    monkeypatch, capsys):
  monkeypatch.delenv('BIG_PRETRAIN_VERBOSE', raising=False)
  hook = cli._unraisable_hook  # pylint: disable=protected-access
  monkeypatch.setattr(sys, 'unraisablehook', hook)
  _WriteLandingOnAClosedLoop()
  assert capsys.readouterr().err == ''

  class Other:
    def __del__(self):
      raise RuntimeError('a real bug')

  Other()
  assert 'RuntimeError: a real bug' in capsys.readouterr().err  # other errors still show

  monkeypatch.setenv('BIG_PRETRAIN_VERBOSE', '1')
  _WriteLandingOnAClosedLoop()
  assert 'RuntimeError: Event loop is closed' in capsys.readouterr().err


def test_a_sigterm_raised_inside_a_finaliser_prints_no_traceback(monkeypatch, capsys):
  # JAX's garbage-collection callback is one place a SIGTERM's handler may run: Python
  # drops the Preempted it raises there, and the next PreemptionNotice raises it again.
  from big_pretrain.errors import Preempted  # pylint: disable=import-outside-toplevel
  monkeypatch.delenv('BIG_PRETRAIN_VERBOSE', raising=False)
  hook = cli._unraisable_hook  # pylint: disable=protected-access
  monkeypatch.setattr(sys, 'unraisablehook', hook)

  class HandlerRunsHere:
    def __del__(self):
      raise Preempted('SIGTERM before a stage\'s next step')

  HandlerRunsHere()
  assert capsys.readouterr().err == ''
  monkeypatch.setenv('BIG_PRETRAIN_VERBOSE', '1')
  HandlerRunsHere()
  assert 'Preempted: SIGTERM' in capsys.readouterr().err


def test_abandoned_save_tasks_are_not_logged_one_by_one(monkeypatch):
  # After a failed save, asyncio logs each of Orbax's abandoned write tasks (one per
  # array) with the error that main.py's one line already names.
  monkeypatch.delenv('BIG_PRETRAIN_VERBOSE', raising=False)
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  handler.addFilter(cli._QuietLibraryInfo())  # pylint: disable=protected-access
  asyncio_logger = logging.getLogger('asyncio')
  asyncio_logger.addHandler(handler)
  try:
    def abandon_a_failed_task():
      async def failed_write():
        raise ValueError('RESOURCE_EXHAUSTED: No space left on device')
      loop = asyncio.new_event_loop()
      task = loop.create_task(failed_write())
      loop.run_until_complete(asyncio.sleep(0))
      loop.close()
      del task
      gc.collect()  # the task's finaliser logs 'Task exception was never retrieved'

    abandon_a_failed_task()
    assert records == []
    monkeypatch.setenv('BIG_PRETRAIN_VERBOSE', '1')
    abandon_a_failed_task()
    assert any('Task exception was never retrieved' in r.getMessage() for r in records)
  finally:
    asyncio_logger.removeHandler(handler)


def test_a_damaged_config_json_is_refused_in_one_line_naming_it(tmp_path):
  from big_pretrain.errors import DamagedFileError  # pylint: disable=import-outside-toplevel
  from big_pretrain.storage import resume_identity  # pylint: disable=import-outside-toplevel
  from helpers.tiny_config import tiny_mae_config  # pylint: disable=import-outside-toplevel
  recorded = tmp_path / resume_identity.CONFIG_FILE
  recorded.write_text(tiny_mae_config().to_json_best_effort()[:100])  # cut short
  with pytest.raises(DamagedFileError, match=r'config\.json cannot be read \(JSONDecodeError.*'
                                             r'Restore it, or move it away'):
    resume_identity.check_resume(tiny_mae_config(), str(tmp_path), checkpoint_steps=[4])
  assert len(recorded.read_text()) == 100  # nothing modified


@pytest.mark.integration
def test_a_backend_that_cannot_start_is_one_line_and_exit_3(tmp_path):
  """JAX_PLATFORMS=tpu on a machine without a TPU (libtpu present or not): the platform, the
  cause and the install command in one line, before anything starts."""
  process = _start_main(['--config=configs/mae.py:demo', f'--workdir={tmp_path / "run"}'],
                        JAX_PLATFORMS='tpu')
  _, stderr = process.communicate(timeout=240)
  assert process.returncode == 3, stderr
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      'main.py: JAX could not start its backend (JAX_PLATFORMS=tpu): '), stderr
  assert "pip install 'jax[tpu]==" in lines[0]
  assert not (tmp_path / 'run').exists()
