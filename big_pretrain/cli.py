"""big_pretrain entry point.

  python main.py --config=configs/mae.py:demo --workdir=/tmp/mae_demo
  python main.py --config=configs/mae.py --workdir=gs://bucket/run --config.data.path=...

Any config key can be overridden on the command line (--config.total_steps=20).
"""

import logging as std_logging
import os
import runpy
import sys
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from big_pretrain import distributed
from big_pretrain.storage import files as storage
from big_pretrain.storage import run_lock
from big_pretrain.config.validation import ConfigError, check_fits_devices, unknown_key_in, validate_config
from big_pretrain.errors import (EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USAGE, UserFacingError,
                                 WorkdirError)
VERBOSE_ENV = 'BIG_PRETRAIN_VERBOSE'

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file; its get_config(arg) reads the part after ":".',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and results go.')
_VERBOSE = flags.DEFINE_bool(
    'verbose', False, f'On an error, print the traceback too (or set {VERBOSE_ENV}=1).')
# Several hosts: every host runs the same command. TPU pods, SLURM and Open MPI
# are detected; elsewhere give the three values below on every host.
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', distributed.MODES,
    'auto: join other processes when a cluster is detected or the flags below are given.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, reachable from every process.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, "This process's index, 0-based.")


# Libraries whose INFO lines (per-save Orbax chatter, backend probing) would
# bury the training log; their warnings and errors still show.
_CHATTY_LIBRARIES = ('/orbax/', '/grain/', '/jax/_src/', '/etils/')


# This project's code, whose logged tracebacks are kept (a venv may live in the repository).
_OWN_CODE = (os.path.join(os.path.dirname(os.path.abspath(__file__)), 'big_pretrain', ''),
             os.path.abspath(__file__))


class _QuietLibraryInfo(std_logging.Filter):
  """Drops the chatty libraries' INFO lines, and the tracebacks any library's logged errors
  carry (--verbose keeps them): on a full disk Orbax's save threads and asyncio log five
  around main.py's one-line message."""

  def filter(self, record):
    if not _is_verbose():
      if record.name == 'asyncio' and 'exception was never retrieved' in record.getMessage():
        # A failed save leaves one abandoned write task per array (about 120 for a ViT),
        # each with the same error that the save's own message already names.
        return False
      if record.exc_info and not record.pathname.startswith(_OWN_CODE):
        record.exc_info = record.exc_text = None  # the error's own line stays
    return record.levelno >= std_logging.WARNING or not any(
        lib in record.pathname for lib in _CHATTY_LIBRARIES)


def _unraisable_hook(unraisable):
  """Python's hook for errors raised where nothing can catch them, less one echo.

  When an Orbax save fails (a full disk), its event loop closes while tensorstore's
  C++ writer threads still have writes in flight; each reports back to the closed loop
  and prints a 'RuntimeError: Event loop is closed' traceback: about 36 around the
  save error's one-line message. --verbose prints them.
  """
  if (isinstance(unraisable.exc_value, RuntimeError)
      and str(unraisable.exc_value) == 'Event loop is closed' and not _is_verbose()):
    return
  sys.__unraisablehook__(unraisable)


_HELP_FLAGS = ('-h', '-?', '--help', '--helpshort', '--helpfull', '--helpxml')


def parse_flags(argv):
  """absl's flag parsing, with every mistake answered in one line instead of a traceback."""
  if any(arg.split('=')[0] in _HELP_FLAGS for arg in argv[1:]):
    return flags.FLAGS(argv)  # prints the help and exits
  spec = _config_spec(argv)
  if spec is None:
    _exit_usage('--config=path/to/config.py[:variant] is required, e.g. '
                '--config=configs/mae.py:demo.', argv)
  config_path = spec.partition(':')[0]
  if not os.path.isfile(config_path):
    # ml_collections would defer this to the first use of the config, as a traceback.
    _exit_usage(f'--config={spec}: no such file {config_path!r}.', argv)
  try:
    remaining = flags.FLAGS(argv)
  except Exception as error:  # noqa: BLE001  (flag parsing also runs the config file)
    _exit_usage(_describe_flag_error(error, argv), argv)
  if len(remaining) > 1:
    _exit_usage(f'Unexpected arguments {remaining[1:]}: flags are --name=value.', argv)
  if not _WORKDIR.value:
    _exit_usage('--workdir=DIR is required: where checkpoints, logs and results go (an '
                'existing one resumes its run).', argv)
  return remaining


def _describe_flag_error(error: Exception, argv) -> str:
  """One line for an error of flag parsing: which flag, and what was wrong with it."""
  if isinstance(error, (AttributeError, KeyError)):
    # ml_collections raised while applying a --config.KEY=VALUE override:
    # load the config file alone to name the override whose key it lacks.
    config = _load_config_file(argv)
    for override in (arg for arg in argv[1:] if arg.startswith('--config.')):
      unknown = unknown_key_in(config, override[len('--config.'):].split('=')[0])
      if unknown:
        return f'Bad command-line override {override}: {unknown}'
  message = str(error)
  if message.startswith('flag --config='):
    # The config file raised: its own exception is the end of the chain.
    cause = error
    while cause.__cause__ or cause.__context__:
      cause = cause.__cause__ or cause.__context__
    return (f'--config={_config_spec(argv)}: the config file raised '
            f'{type(cause).__name__}: {_first_line(str(cause))}')
  if message.startswith('flag --config.'):
    return f'Bad command-line override {_first_line(message)[len("flag "):]}'
  return _first_line(message)


def _first_line(text: str) -> str:
  return next((line.strip() for line in text.splitlines() if line.strip()), text)


def _is_verbose(argv=None) -> bool:
  """--verbose, readable before the flags are parsed (an error may come first)."""
  if os.environ.get(VERBOSE_ENV, '') not in ('', '0'):
    return True
  if flags.FLAGS.is_parsed():
    return _VERBOSE.value
  return any(arg in ('--verbose', '--verbose=true', '--verbose=True', '--verbose=1')
             for arg in (argv or sys.argv))


def _exit_usage(message: str, argv=None):
  """Exits with EXIT_USAGE and one line on stderr (and the traceback, if --verbose)."""
  _exit(message, EXIT_USAGE, argv)


def _exit(message: str, code: int, argv=None):
  if _is_verbose(argv) and sys.exc_info()[0] is not None:
    traceback.print_exc()
  print(f'main.py: {message}', file=sys.stderr)
  sys.exit(code)


def _config_spec(argv) -> str | None:
  """The path[:arg] of --config in argv, or None."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg[len('--config='):]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config_file(argv):
  """get_config(arg) of the --config=path[:arg] in argv."""
  path, _, variant = _config_spec(argv).partition(':')
  return runpy.run_path(path)['get_config'](variant or None)


def main(argv):
  del argv  # parse_flags refused any beyond the flags
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraryInfo())
  sys.unraisablehook = _unraisable_hook
  config = _CONFIG.value
  try:
    validate_config(config)  # before any device is touched
    storage.check_usable(_WORKDIR.value)
  except (ConfigError, WorkdirError) as e:
    _exit_usage(str(e))
  try:
    distributed.initialize(_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
                           num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    # Before the first compile: found by the input pipeline only after it otherwise.
    check_fits_devices(config, jax.device_count(), jax.process_count())
  except ValueError as e:  # ConfigError included
    _exit_usage(str(e))
  # Imported once the command is known to run: the training loop's imports (Orbax, Grain,
  # the models) take seconds that a refused command does not wait for.
  from big_pretrain.stages import chain  # pylint: disable=import-outside-toplevel
  try:
    # One run per workdir (a chain's stages share its lock): process 0 holds it.
    with run_lock.run_lock(_WORKDIR.value, take=jax.process_index() == 0,
                              agree=distributed.process_0_message):
      chain.run(config, _WORKDIR.value)
  except KeyboardInterrupt:
    _exit('Interrupted (Ctrl-C): stopped without saving; the same command resumes '
          'from the last checkpoint.', EXIT_INTERRUPTED)
  except UserFacingError as e:
    if e.exit_code == EXIT_USAGE:
      _exit_usage(str(e))
    if e.exit_code == EXIT_PREEMPTED:
      logging.warning('%s', e)
      _exit(f'Preempted: {e}', EXIT_PREEMPTED)
    logging.error('%s', e)
    _exit(f'Stopped: {e}', e.exit_code)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
