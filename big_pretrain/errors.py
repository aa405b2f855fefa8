"""Errors meant for people: each message names the culprit and the fix."""


class ConfigError(ValueError):
  """A config that cannot run; the message names the key and the fix."""
