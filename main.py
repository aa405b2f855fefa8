"""big_pretrain entry point.

  python main.py --config=configs/mae.py:demo --workdir=/tmp/mae_demo
  python main.py --config=configs/mae.py --workdir=gs://bucket/run --config.data.path=...
  python main.py --config=configs/maws.py --workdir=/tmp/check --compile_for=v5p-256

Any config key can be overridden on the command line (--config.total_steps=20).
"""
# The flags and their one-line errors are big_pretrain/cli.py's; each error's exit code is
# big_pretrain/errors.py's (docs/getting_started.md, "Exit codes").

import functools
import signal

import jax
from absl import app, flags, logging

from big_pretrain import cli, distributed, tpu_slices
from big_pretrain import sharding as sharding_lib
from big_pretrain.config.validation import check_fits_devices
from big_pretrain.errors import (EXIT_INTERRUPTED, EXIT_NO_BACKEND, EXIT_PREEMPTED, EXIT_USAGE,
                                 ConfigError, Preempted, UserFacingError, WorkdirError)
from big_pretrain.stages.chain_validation import validate_config
from big_pretrain.storage import files as storage
from big_pretrain.storage import run_lock
from big_pretrain.train import faults
from big_pretrain.train import goodput

flags.adopt_module_key_flags(cli)  # `main.py --help` lists them


def main(argv, *, accounted_since: float | None = None):
  """`accounted_since`: time.time() from which the first stage's goodput counts (run as a
  script: the process's start, so its Python and imports count as start-up)."""
  del argv  # cli.parse_flags refused any beyond the flags
  tpu_slices.quiet_libtpu_without_tpu()  # before JAX starts a backend
  cli.set_up_logging()
  # A SIGTERM before the training loop takes it over (while starting up or compiling, and
  # between stages) stops with the preemption exit code: there is nothing new to save.
  outside_training = faults.SigtermOutsideTraining()
  previous_handler = signal.signal(signal.SIGTERM, outside_training)
  try:
    _run(cli.parsed_command(), accounted_since)
  except KeyboardInterrupt:  # maybe while XLA compiles; the stage has closed its files
    cli.exit_with('Interrupted (Ctrl-C): stopped without saving; the same command resumes '
                  'from the last checkpoint.', EXIT_INTERRUPTED, skip_teardown=True)
  except (UserFacingError, Preempted) as e:
    _stop(e, interrupted_a_compile=outside_training.received)
  finally:  # main() run in-process (tests) leaves the process's handler as it was
    signal.signal(signal.SIGTERM, previous_handler)


def _run(command, accounted_since: float | None) -> None:
  if command.compile_for is not None:
    _compile_for(command)
    return
  # Validate the config and the workdir, before any device is touched.
  try:
    validate_config(command.config)
    storage.check_usable(command.workdir)
  except (ConfigError, WorkdirError) as e:
    cli.exit_usage(str(e))

  # Start the processes (this host's, or every host's), then check the batch against their
  # devices: before the first compile, where the input pipeline would find it only after.
  try:
    distributed.initialize(**command.processes)
  except ValueError as e:
    cli.exit_usage(str(e))
  try:
    device_count = jax.device_count()  # the backend starts here
  except (RuntimeError, AssertionError) as e:  # AssertionError: JAX's, for an absent plugin
    cli.exit_with(cli.backend_failure(e), EXIT_NO_BACKEND)
  try:
    check_fits_devices(command.config, device_count, jax.process_count(),
                       sharding_lib.count_slices(jax.devices()))
  except ValueError as e:  # ConfigError included
    cli.exit_usage(str(e))

  # Imported once the command is known to run: the training loop's imports (Orbax, Grain,
  # the models) take seconds that a refused command does not wait for.
  from big_pretrain.stages import chain  # pylint: disable=import-outside-toplevel

  # Take the workdir's lock (one run per workdir; process 0 holds it for the whole chain)
  # and run the chain; every way it can stop ends with its exit code (main).
  with run_lock.run_lock(command.workdir, take=jax.process_index() == 0,
                         agree=distributed.process_0_message):
    chain.run_validated(command.config, command.workdir,  # validated above
                        accounted_since=accounted_since)


def _compile_for(command) -> None:
  """Compile every stage for the slice on this machine, report, and say whether it fits: the
  config's keys and values validated as for a run, no data read, no lock, no checkpoint."""
  jax.config.update('jax_platforms', 'cpu')  # the host runs nothing; it only compiles
  from big_pretrain import compile_for  # pylint: disable=import-outside-toplevel
  try:
    compile_for.check(command.config, command.compile_for, command.workdir)
  except (ConfigError, RuntimeError) as e:  # RuntimeError: no TPU compiler here
    cli.exit_usage(str(e))


def _stop(error: UserFacingError | Preempted, interrupted_a_compile: bool):
  """Exits with the error's code and one line: logged too, unless the command was unusable.

  `interrupted_a_compile`: a SIGTERM came outside the training loop, maybe while XLA was
  compiling; the stage has closed its files and the lock is released, so exit at once.
  """
  if error.exit_code == EXIT_USAGE:
    cli.exit_usage(str(error))
  if error.exit_code == EXIT_PREEMPTED:
    logging.warning('%s', error)
    cli.exit_with(f'Preempted: {error}', EXIT_PREEMPTED, skip_teardown=interrupted_a_compile)
  logging.error('%s', error)
  cli.exit_with(f'Stopped: {error}', error.exit_code)


if __name__ == '__main__':
  app.run(functools.partial(main, accounted_since=goodput.process_started_at()),
          flags_parser=cli.parse_flags)
