"""Errors meant for people: each message names the culprit and the fix."""


class ConfigError(ValueError):
  """A config that cannot run; the message names the key and the fix."""


class WorkdirError(ValueError):
  """A --workdir that cannot hold this run: a file, read-only, or in use by another run."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (e.g. a full disk); the earlier ones are intact."""


class FinalEvaluationError(RuntimeError):
  """An evaluator failed at a stage's final step, after the final checkpoint was saved."""
