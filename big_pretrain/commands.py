"""What the package's commands share with main.py: one line per mistake, its exit code,
--verbose for the traceback.

Every `python -m big_pretrain.<command>` (export, data.convert, data.text.build_vocabulary)
answers a mistake in its flags, or an error a user can cause (errors.UserFacingError), with
one line `<command>: <message>` on stderr and the error's exit code (a flag mistake: 2,
errors.EXIT_USAGE), as main.py does (cli.py); --verbose, or BIG_PRETRAIN_VERBOSE=1, adds the
traceback. --help prints argparse's help as usual.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import traceback
from typing import NoReturn, Sequence

from big_pretrain.errors import EXIT_USAGE, UserFacingError

VERBOSE_ENV = 'BIG_PRETRAIN_VERBOSE'
VERBOSE_FLAGS = ('--verbose', '--verbose=true', '--verbose=True', '--verbose=1')
RUN_MODULE = 'python -m '  # how the commands are run, as their --help shows them

# argparse's own words for a value it refuses, turned into '--flag=VALUE: what to give.'
_ARGUMENT_ERROR = re.compile(r'argument (?P<flag>[^:]+): (?P<problem>.*)', re.S)
_INVALID_CHOICE = re.compile(r'invalid choice: (?P<value>.*) \(choose from (?P<choices>.*)\)',
                             re.S)
_INVALID_TYPE = re.compile(r'invalid (?P<type>\w+) value: (?P<value>.*)', re.S)
_VALUE_AND_FIX = re.compile(r"(?P<value>'.*?'): (?P<fix>.*)", re.S)
_TYPE_FIXES = {'int': 'give a whole number', 'float': 'give a number'}


def verbose_asked(argv: Sequence[str]) -> bool:
  """--verbose among `argv`, or BIG_PRETRAIN_VERBOSE set: readable before the flags are
  parsed (an error may come first)."""
  return (os.environ.get(VERBOSE_ENV, '') not in ('', '0')
          or any(arg in VERBOSE_FLAGS for arg in argv))


def print_error(prog: str, message: str, verbose: bool) -> None:
  """`<prog>: <message>` on stderr; first the traceback of the exception being handled, if
  `verbose`."""
  if verbose and sys.exc_info()[0] is not None:
    traceback.print_exc()
  print(f'{prog}: {message}', file=sys.stderr)


def one_line(text: str) -> str:
  """`text`'s lines joined into one."""
  return ' '.join(line.strip() for line in str(text).splitlines() if line.strip())


def exit_with(prog: str, message: str, code: int, argv: Sequence[str]) -> NoReturn:
  print_error(prog, one_line(message), verbose_asked(argv))
  sys.exit(code)


@contextlib.contextmanager
def one_line_errors(prog: str, argv: Sequence[str], expected: dict | None = None):
  """Ends the command in one line when the block raises a UserFacingError (with its exit
  code) or an exception of a type in `expected` ({type or tuple of types: exit code}, the
  first that matches); anything else is a bug, and keeps its traceback."""
  try:
    yield
  except UserFacingError as error:
    exit_with(prog, str(error), error.exit_code, argv)
  except Exception as error:  # noqa: BLE001  (re-raised unless `expected` names it)
    code = next((code for kinds, code in (expected or {}).items() if isinstance(error, kinds)),
                None)
    if code is None:
      raise
    exit_with(prog, str(error), code, argv)


class CommandParser(argparse.ArgumentParser):
  """argparse for `python -m <module>`: a mistake in the flags ends in one line
  `<module>: <message>` and exit 2, instead of the usage block; every parser takes
  --verbose. A sub-command's parser (add_subparsers) is one too, and answers as its module."""

  def __init__(self, prog: str, **kwargs):
    # argparse makes a sub-command's parser with prog 'python -m <module> <sub-command>'.
    super().__init__(prog=prog if prog.startswith(RUN_MODULE) else RUN_MODULE + prog,
                     **kwargs)
    self.add_argument('--verbose', action='store_true',
                      help=f'On an error, print the traceback too (or set {VERBOSE_ENV}=1).')

  @property
  def module(self) -> str:
    """'big_pretrain.export': what each one-line message starts with."""
    return self.prog[len(RUN_MODULE):].split()[0]

  def error(self, message: str) -> NoReturn:
    print_error(self.module, describe_argument_error(message), verbose=False)
    sys.exit(EXIT_USAGE)


def describe_argument_error(message: str) -> str:
  """argparse's message for a refused value, as '--flag=VALUE: what to give.'; any other
  message (a missing or unknown flag) as it is."""
  argument = _ARGUMENT_ERROR.fullmatch(message)
  if not argument:
    return message
  flag, problem = argument.group('flag'), argument.group('problem')
  choice = _INVALID_CHOICE.fullmatch(problem)
  if choice:
    choices = ', '.join(name.strip().strip("'") for name in choice.group('choices').split(','))
    return f"{flag}={choice.group('value')}: choose one of {choices}."
  wrong_type = _INVALID_TYPE.fullmatch(problem)
  if wrong_type and wrong_type.group('type') in _TYPE_FIXES:
    return f"{flag}={wrong_type.group('value')}: {_TYPE_FIXES[wrong_type.group('type')]}."
  value_and_fix = _VALUE_AND_FIX.fullmatch(problem)  # from a `value_type` converter
  if value_and_fix:
    return f"{flag}={value_and_fix.group('value')}: {value_and_fix.group('fix')}"
  return f'{flag}: {problem}'


def value_type(convert, fix: str):
  """An argparse `type` that converts with `convert` and refuses a value it cannot take as
  '--flag=VALUE: `fix`' (e.g. fix='give a step number')."""

  def converted(text: str):
    try:
      return convert(text)
    except (TypeError, ValueError):
      raise argparse.ArgumentTypeError(f'{text!r}: {fix}') from None

  return converted
