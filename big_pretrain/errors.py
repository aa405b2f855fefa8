"""Errors meant for people, in one place: each message names the culprit and the fix, and each
class carries the exit code main.py ends with (docs/getting_started.md, "Exit codes")."""

# Exit codes, for people and for supervisors that rerun.
EXIT_STOPPED = 1      # the run stopped on purpose, saying why (NaN loss, a checkpoint that
                      # does not fit, a failed save): rerunning as it is will not help
EXIT_USAGE = 2        # the command, config or workdir cannot run: nothing was started
EXIT_NO_BACKEND = 3   # the accelerator's runtime does not start (libtpu missing, a CUDA build
                      # that does not match the driver): fix the install, nothing was started
EXIT_PREEMPTED = 75   # EX_TEMPFAIL: saved a checkpoint on SIGTERM/SIGINT; rerun to resume
EXIT_INTERRUPTED = 130  # a second Ctrl-C: stopped at once, unsaved (the shell's 128 + SIGINT)


class UserFacingError(Exception):
  """An expected way for a run to stop: the message says what happened and what to do.
  main.py prints it as one line and exits with `exit_code`."""
  exit_code = EXIT_STOPPED


class ConfigError(UserFacingError, ValueError):
  """A config that cannot run; the message names the key and the fix. (Found before the run
  starts it is a usage error, exit 2; a stage's config found bad later stops the run, 1.)"""


class UsageError(UserFacingError, ValueError):
  """A command's input that cannot be used (a path that is not there, a file where a folder
  belongs, a value out of range), found before it wrote anything."""
  exit_code = EXIT_USAGE


class WorkdirError(UserFacingError, ValueError):
  """A --workdir (or a command's output folder) that cannot hold what is asked: a file,
  read-only, or in use by another run."""
  exit_code = EXIT_USAGE


class CheckpointSaveError(UserFacingError, RuntimeError):
  """A checkpoint could not be written (e.g. a full disk); the earlier ones are intact."""


class CheckpointMismatchError(UserFacingError, ValueError):
  """A checkpoint whose tree or shapes do not fit the model being restored."""


class CheckpointUnreadableError(UserFacingError, OSError):
  """A checkpoint with files missing or damaged: its metadata or arrays do not read back."""


class FinalEvaluationError(UserFacingError, RuntimeError):
  """An evaluator failed at a stage's final step, after the final checkpoint was saved."""


class NonFiniteLossError(UserFacingError, RuntimeError):
  """The loss or gradient norm became NaN or Inf, and no skip budget is left."""


class UnreadableDataError(UserFacingError, RuntimeError):
  """A source gave no readable image in config.data.max_consecutive_unreadable tries."""


class DamagedFileError(UserFacingError, ValueError):
  """A file the run reads (from a workdir or a data path) is cut short or not what it should
  be; the message names it and what to do. Nothing was deleted."""


class NonFiniteWeightsError(UserFacingError, ValueError):
  """Weights to start from hold NaN or Inf values: the message names the file, the array and
  how many; training from them would make the first loss NaN. Found as a stage starts,
  before it compiles or trains: a usage error."""
  exit_code = EXIT_USAGE


class ExportRefusedError(UserFacingError, ValueError):
  """An export that cannot be written as asked: weights in a format (timm, Hugging Face) that
  cannot express the model faithfully (nothing approximate is written), or an --output folder
  that would mix with a run or with files the export did not write."""
  exit_code = EXIT_USAGE


class Preempted(BaseException):
  """A run stopped on a preemption notice (SIGTERM or Ctrl-C), after saving what it had.

  A BaseException, as KeyboardInterrupt is: it may be raised from a signal handler
  anywhere (train/faults.py), and code that catches Exception must not swallow it."""
  exit_code = EXIT_PREEMPTED
