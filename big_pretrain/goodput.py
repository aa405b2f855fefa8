"""Where a workdir's hours went: goodput and badput of every stage over all its starts.

  python -m big_pretrain.goodput WORKDIR

WORKDIR is what main.py was given: a stage's folder, or a chain's (one folder per stage).
Each stage's goodput.jsonl (train/goodput.py: one record per start) is summed: a table per
stage, then the whole chain, with seconds and the share of wall time of each part. The
parts add up to the wall time the starts recorded (a start killed without warning stops
counting at its last log step or save).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from big_pretrain import commands
from big_pretrain.errors import EXIT_USAGE, UsageError
from big_pretrain.storage import files as storage
from big_pretrain.train import goodput

PROGRAM = 'big_pretrain.goodput'


def stage_tables(workdir: str) -> dict[str, dict]:
  """{stage folder name: goodput.account of its starts}, stages in the order they started."""
  candidates = [workdir] + [os.path.join(workdir, name)
                            for name in sorted(storage.list_dir(workdir))]
  found = []
  for folder in candidates:
    starts = goodput.read_starts(os.path.join(folder, goodput.GOODPUT_FILE))
    if starts:
      name = os.path.basename(os.path.normpath(folder))
      found.append((starts[0].get('started_at', 0.0), name, goodput.account(starts)))
  return {name: table for _, name, table in sorted(found)}


def chain_table(tables: dict[str, dict]) -> dict:
  """The stages' tables summed."""
  parts = {part: sum(table['parts'][part] for table in tables.values())
           for part in goodput.PARTS}
  wall = sum(table['wall_seconds'] for table in tables.values())
  return {'wall_seconds': wall, 'parts': parts,
          'goodput': parts['productive'] / wall if wall > 0 else 0.0,
          'lost_steps': sum(table['lost_steps'] for table in tables.values()),
          'starts': sum(table['starts'] for table in tables.values())}


def format_table(name: str, table: dict) -> str:
  wall = table['wall_seconds']
  lines = [f'{name}: {table["starts"]} start{"s" if table["starts"] != 1 else ""}, '
           f'{wall:.1f} s, goodput {100 * table["goodput"]:.1f}%'
           + (f', {table["lost_steps"]} steps lost to restarts' if table['lost_steps'] else ''),
           f'  {"part":<20} {"seconds":>10} {"share":>7}']
  for part in goodput.PARTS:
    seconds = table['parts'][part]
    lines.append(f'  {part:<20} {seconds:>10.1f} {100 * seconds / wall if wall else 0:>6.1f}%')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = commands.CommandParser(PROGRAM, description=__doc__.split('\n')[0])
  parser.add_argument('workdir', help="main.py's --workdir: a stage's folder or a chain's.")
  args = parser.parse_args(argv)
  with commands.one_line_errors(PROGRAM, argv, {OSError: EXIT_USAGE}):
    if not storage.is_dir(args.workdir):
      raise UsageError(f'{args.workdir} is not a folder: give the --workdir of a run.')
    tables = stage_tables(args.workdir)
    if not tables:
      raise UsageError(f'{args.workdir} holds no goodput.jsonl (in it or its stage folders): '
                       'no stage has started there with this version.')
  for name, table in tables.items():
    print(format_table(name, table))
    print()
  if len(tables) > 1:
    print(format_table('all stages', chain_table(tables)))
  return 0


if __name__ == '__main__':
  sys.exit(main())
