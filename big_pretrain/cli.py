"""main.py's command line: its flags, a one-line answer to every mistake in them, the log
filters that keep a run's output readable, and the exits with their codes.

Every mistake in the flags ends with one `main.py: ...` line on stderr and exit code 2
(errors.EXIT_USAGE), before anything is compiled; --verbose (or BIG_PRETRAIN_VERBOSE=1) adds
the traceback.
"""

import dataclasses
import logging as std_logging
import os
import runpy
import sys

from absl import flags, logging
import jax
import ml_collections
from ml_collections import config_flags

from big_pretrain import distributed
from big_pretrain import tpu_slices
from big_pretrain.commands import VERBOSE_ENV, print_error, verbose_asked
from big_pretrain.config.validation import unknown_key_in
from big_pretrain.errors import EXIT_USAGE, Preempted

PROGRAM = 'main.py'  # every one-line message starts with it

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
# Compile instead of run: is the config ready for a Cloud TPU slice, and does it fit?
_COMPILE_FOR = flags.DEFINE_string(
    'compile_for', None,
    f'Compile every stage for this Cloud TPU slice ({tpu_slices.slice_name_forms()}) '
    'on this machine, print whether each fits the chips, and exit: nothing is trained or '
    'read, and nothing of a run in --workdir changes. Needs `make install-tpu-compile`.')
_NUM_SLICES = flags.DEFINE_integer(
    'num_slices', 1, 'With --compile_for: that many slices, joined by the data-centre network.')


@dataclasses.dataclass(frozen=True)
class Command:
  """What the parsed flags ask for."""
  config: ml_collections.ConfigDict
  workdir: str
  processes: dict  # distributed.initialize's keyword arguments
  compile_for: tpu_slices.TpuSlice | None = None  # compile for this slice instead of running


def parsed_command() -> Command:
  """The command, once parse_flags has accepted the flags."""
  return Command(_CONFIG.value, _WORKDIR.value, dict(
      mode=_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value),
      compile_for=(tpu_slices.parse_slice(_COMPILE_FOR.value, _NUM_SLICES.value)
                   if _COMPILE_FOR.value else None))


# --- Flags: every mistake answered in one line.

_HELP_FLAGS = ('-h', '-?', '--help', '--helpshort', '--helpfull', '--helpxml')


def parse_flags(argv):
  """absl's flag parsing, with every mistake answered in one line instead of a traceback."""
  if any(arg.split('=')[0] in _HELP_FLAGS for arg in argv[1:]):
    return flags.FLAGS(argv)  # prints the help and exits
  spec = _config_spec(argv)
  if spec is None:
    exit_usage('--config=path/to/config.py[:variant] is required, e.g. '
               '--config=configs/mae.py:demo.', argv)
  config_path = spec.partition(':')[0]
  if not os.path.isfile(config_path):
    # ml_collections would defer this to the first use of the config, as a traceback.
    exit_usage(f'--config={spec}: no such file {config_path!r}.', argv)
  try:
    remaining = flags.FLAGS(argv)
  except Exception as error:  # noqa: BLE001  (flag parsing also runs the config file)
    exit_usage(_describe_flag_error(error, argv), argv)
  if len(remaining) > 1:
    exit_usage(f'Unexpected arguments {remaining[1:]}: flags are --name=value.', argv)
  if not _WORKDIR.value:
    exit_usage('--workdir=DIR is required: where checkpoints, logs and results go (an '
               'existing one resumes its run).', argv)
  if _COMPILE_FOR.value or _NUM_SLICES.value != 1:
    try:
      tpu_slices.parse_slice(_COMPILE_FOR.value or '', _NUM_SLICES.value)
    except ValueError as error:
      name = f'--compile_for={_COMPILE_FOR.value}' if _COMPILE_FOR.value else '--num_slices'
      exit_usage(f'{name}: {error}' if _COMPILE_FOR.value else
                 '--num_slices is for --compile_for=SLICE: give the slice too.', argv)
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


# --- Exits: one line on stderr, and the traceback with --verbose.


def _is_verbose(argv=None) -> bool:
  """--verbose, readable before the flags are parsed (an error may come first)."""
  if flags.FLAGS.is_parsed():
    return _VERBOSE.value or verbose_asked(())
  return verbose_asked(argv or sys.argv)


def backend_failure(error: BaseException) -> str:
  """One line for a JAX backend that does not start: the platform, the cause, the fix."""
  platforms = os.environ.get('JAX_PLATFORMS') or jax.config.jax_platforms or ''
  cause = str(error).strip().splitlines()[0] if str(error).strip() else (
      'this JAX install has no such backend')
  cause = cause.split(' (set JAX_PLATFORMS')[0].rstrip('.')
  named = f'JAX_PLATFORMS={platforms}' if platforms else 'the default platform'
  if 'tpu' in platforms:
    fix = ("on a TPU VM, reinstall the TPU runtime: pip install 'jax[tpu]=="
           f"{jax.__version__}'; on another machine, unset JAX_PLATFORMS")
  elif 'cuda' in platforms or 'gpu' in platforms:
    fix = ("on a GPU host, install the CUDA build of jax that the driver runs: make "
           'install-gpu (nvidia-smi shows the driver); on another machine, unset JAX_PLATFORMS')
  else:
    fix = 'name platforms this install has (cpu; cuda after make install-gpu; tpu on a TPU VM)'
  return f'JAX could not start its backend ({named}): {cause}. Fix: {fix}. Nothing was started.'


def exit_usage(message: str, argv=None):
  """Exits with EXIT_USAGE and one line on stderr (and the traceback, if --verbose)."""
  exit_with(message, EXIT_USAGE, argv)


def exit_with(message: str, code: int, argv=None, *, skip_teardown: bool = False):
  """Exits with `code` and one line on stderr (and the traceback, if --verbose).

  `skip_teardown`: exit without the interpreter's teardown, for a stop that interrupted
  XLA while it compiles: its compiler threads run on and crash (SIGSEGV) into a teardown.
  """
  print_error(PROGRAM, message, _is_verbose(argv))
  if skip_teardown:
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


# --- Logs: the run's own lines, not the libraries' chatter.

# Libraries whose INFO lines (per-save Orbax chatter, backend probing) would
# bury the training log; their warnings and errors still show.
_CHATTY_LIBRARIES = ('/orbax/', '/grain/', '/jax/_src/', '/etils/')

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# This project's code, whose logged tracebacks are kept (a venv may live in the repository).
_OWN_CODE = (os.path.join(_PACKAGE, ''), os.path.join(os.path.dirname(_PACKAGE), PROGRAM))


def set_up_logging():
  """INFO lines for the run, less the chatty libraries' and the echoes of a failed save."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraryInfo())
  sys.unraisablehook = _unraisable_hook


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
  """Python's hook for errors raised where nothing can catch them, less two echoes
  (--verbose prints them).

  When an Orbax save fails (a full disk), its event loop closes while tensorstore's
  C++ writer threads still have writes in flight; each reports back to the closed loop
  and prints a 'RuntimeError: Event loop is closed' traceback: about 36 around the
  save error's one-line message. And a SIGTERM's Preempted raised inside a finaliser
  (e.g. JAX's garbage-collection callback) is dropped by Python; the handler remembers
  the signal (train/faults.py), so the run still stops with its one line.
  """
  if not _is_verbose() and (
      isinstance(unraisable.exc_value, Preempted)
      or (isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == 'Event loop is closed')):
    return
  sys.__unraisablehook__(unraisable)
