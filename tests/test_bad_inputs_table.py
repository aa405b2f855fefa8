"""reliability/bad_inputs.py covers every row of the bad-input table, and judges what it sees
correctly.

No training here: the case list and the verdict function on made-up runs.
"""

import collections

import pytest

from reliability import bad_input_cases, bad_inputs
from reliability.bad_input_checks import CARRY_ON, REFUSE, Observed
from reliability.processes import Run


def test_every_row_of_the_table_is_split_into_its_cases():
  cases = bad_input_cases.cases()
  names = [case.name for case in cases]
  assert len(names) == len(set(names)), 'case names must be unique'
  rows = collections.defaultdict(set)
  for case in cases:
    rows[case.row].add(case.name)
  assert set(rows) - {'added'} == set(bad_input_cases.TABLE_ROWS)
  for row, (_, expected_cases) in bad_input_cases.TABLE_ROWS.items():
    assert set(expected_cases) <= rows[row], f'row {row!r} lacks {set(expected_cases) - rows[row]}'
  assert 90 <= len(cases) <= 120


def _observed(rc, output, expect=REFUSE, exit_codes=(2,), **fields):
  run = Run(['--config=x'], rc, output, 3.0)
  return Observed(run, expect, exit_codes, **fields)


@pytest.mark.parametrize('observed, expected', [
    (_observed(2, 'I1126 10:00:00.000 1 main.py:1] start\nmain.py: config.x=1: bad\n'),
     'clear one-line message'),
    (_observed(2, 'Traceback (most recent call last):\n  File "main.py"\nValueError: x\n'),
     'TRACEBACK'),
    (_observed(1, 'main.py: Stopped: x\n', exit_codes=(1,),
               extra_output='Traceback (most recent call last):\n'), 'TRACEBACK'),
    (_observed(None, 'W skipping\n' * 10), 'HANG (timeout 3 s)'),
    (_observed(1, 'W skipping broken.jpg\n' * 5000, exit_codes=(1,)), 'LOOP (5000 log lines)'),
    (_observed(0, 'I resumed at step 4\n'), 'SILENT MIX'),
    (_observed(1, 'main.py: Stopped: x\n', exit_codes=(1,), lost=['config.json changed']),
     'data lost: config.json changed'),
    (_observed(2, 'main.py: a\nmain.py: b\n'), 'UNCLEAR (2 main.py lines)'),
    (_observed(1, 'main.py: Stopped: x\n', exit_codes=(2,)), 'UNEXPECTED (exit 1, documented (2,))'),
    (_observed(0, 'W Checkpoint step 4 cannot be read\n', expect=CARRY_ON,
               exit_codes=(0,), evidence='cannot be read'), 'graceful handling'),
    (_observed(0, 'I done\n', expect=CARRY_ON, exit_codes=(0,),
               evidence='cannot be read'), "UNEXPECTED (no 'cannot be read' in the output)"),
    (Observed(None, REFUSE, (1,), not_run='no tmpfs'),
     'not run here: no tmpfs'),
    # Another command's one line is its own, never main.py's.
    (_observed(2, 'big_pretrain.export: --output=run is a stage folder\n',
               program='big_pretrain.export'), 'clear one-line message'),
    (_observed(2, 'main.py: x\n', program='big_pretrain.export'),
     'UNCLEAR (0 big_pretrain.export lines)'),
])
def test_verdict(observed, expected):
  assert bad_inputs.verdict(observed) == expected


def test_outcome_is_main_pys_line_or_the_evidence_shortened():
  refused = _observed(2, 'I1126 10:00:00.000000 12 loop.py:3] x\nmain.py: --workdir=/tmp/r/c/a/'
                         'run is a file\n')
  assert bad_inputs.outcome(refused, '/tmp/r/c/a', '/tmp/r') == 'main.py: --workdir=run is a file'
  handled = _observed(0, 'W1126 10:00:00.000000 12 checkpoint.py:9] Checkpoint step 4 cannot be '
                         'read: ' + 'x' * 200, expect=CARRY_ON, evidence='cannot be')
  line = bad_inputs.outcome(handled)
  assert line.startswith('Checkpoint step 4') and len(line) == bad_inputs.OUTCOME_CHARS


def test_the_table_escapes_pipes():
  case = bad_input_cases.Case('a|b', 'added', 'x | y', lambda ctx: None)
  table = bad_inputs.markdown_table([(case, _observed(2, 'main.py: p|q\n'))])
  assert table.splitlines()[-1] == (
      '| a\\|b | x \\| y | 2 | main.py: p\\|q | clear one-line message |')
