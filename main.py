"""big_pretrain entry point.

  python main.py --config=configs/mae.py:demo --workdir=/tmp/mae_demo
  python main.py --config=configs/mae.py --workdir=gs://bucket/run --config.data.path=...

Any config key can be overridden on the command line (--config.total_steps=20).
"""

import logging as std_logging
import os
import runpy
import sys

# clu's writers import TensorFlow; keep its C++ start-up banner off the console.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')  # TF only writes summaries here

from absl import app, flags, logging
from ml_collections import config_flags

from big_pretrain import distributed, pipeline
from big_pretrain.checkpoint import CheckpointMismatchError
from big_pretrain.train.faults import NonFiniteLossError
from big_pretrain.config_schema import ConfigError, unknown_key_in, validate_config

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file; its get_config(arg) reads the part after ":".',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and results go.')
flags.mark_flags_as_required(['config', 'workdir'])
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


class _QuietLibraryInfo(std_logging.Filter):

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(
        lib in record.pathname for lib in _CHATTY_LIBRARIES)


def parse_flags(argv):
  """absl flag parsing, with a plain message for an override of an unknown key."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError):
    # ml_collections raised while applying a --config.KEY=VALUE override:
    # load the config file alone to name the override whose key it lacks.
    config = _load_config_file(argv)
    for override in (arg for arg in argv[1:] if arg.startswith('--config.')):
      error = unknown_key_in(config, override[len('--config.'):].split('=')[0])
      if error:
        sys.exit(f'Bad command-line override {override}: {error}')
    raise


def _load_config_file(argv):
  """get_config(arg) of the --config=path[:arg] in argv."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      spec = arg[len('--config='):]
    elif arg == '--config' and i + 1 < len(argv):
      spec = argv[i + 1]
    else:
      continue
    path, _, variant = spec.partition(':')
    return runpy.run_path(path)['get_config'](variant or None)
  raise app.UsageError('--config=path/to/config.py[:variant] is required.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraryInfo())
  config = _CONFIG.value
  try:
    validate_config(config)  # before any device is touched
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  try:
    distributed.initialize(_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
                           num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  try:
    pipeline.run(config, _WORKDIR.value)
  except (NonFiniteLossError, CheckpointMismatchError, ConfigError) as e:
    # Expected ways for a run to stop: the message says what happened and what to do.
    logging.error('%s', e)
    sys.exit(f'Stopped: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
