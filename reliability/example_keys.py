"""reliability/kill_resume.py's check that a killed run trained on the same examples as the
uninterrupted one: the example keys every process wrote (config.log.example_keys), global
batch by global batch and column by column.

Every process appends one JSON line per batch it reads to
<stage folder>/example_keys/process_<i>-of-<P>.jsonl: {"batch": b, "first_column": c,
"keys": [...]}, its rows being columns c .. c+len(keys)-1 of global batch b (a key hashes the
augmented image: which example, which crop and flip). Batches read ahead and batches read
again after a resume are written too, so a killed run holds several records of many
(batch, column) pairs: every one must equal the uninterrupted run's key, and every column of
every batch the uninterrupted run trained on (0 .. total_steps-1) must be covered.
"""

from __future__ import annotations

import dataclasses
import json
import os

from reliability.kill_schedule import Stage

FOLDER = 'example_keys'  # big_pretrain/train/loop.py's EXAMPLE_KEYS_FOLDER


@dataclasses.dataclass
class Keys:
  """One run's records of one stage: every (batch, column)'s keys as read, in file order."""
  files: list[str] = dataclasses.field(default_factory=list)
  keys: dict[tuple[int, int], list[str]] = dataclasses.field(default_factory=dict)
  records: int = 0       # lines
  rows: int = 0          # (batch, column) keys over all lines
  torn: list[str] = dataclasses.field(default_factory=list)  # lines that are not JSON

  def first(self, batch: int, column: int) -> str | None:
    keys = self.keys.get((batch, column))
    return keys[0] if keys else None


def read_keys(run_dir: str, stage: Stage) -> Keys | None:
  """The stage's records in `run_dir`, or None where it wrote none (example keys off)."""
  folder = os.path.join(run_dir, stage.dir, FOLDER)
  if not os.path.isdir(folder):
    return None
  found = Keys(files=sorted(name for name in os.listdir(folder) if name.endswith('.jsonl')))
  for name in found.files:
    with open(os.path.join(folder, name), encoding='utf-8', errors='replace') as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
          batch, first, keys = int(record['batch']), int(record['first_column']), record['keys']
        except (ValueError, KeyError, TypeError):
          # A SIGKILL in the middle of an append: the next attempt appends after it.
          found.torn.append(f'{name}:{number}: {line.strip()[:80]}')
          continue
        found.records += 1
        for offset, key in enumerate(keys):
          found.keys.setdefault((batch, first + offset), []).append(key)
          found.rows += 1
  return found


def compare_keys(reference_dir: str, killed_dir: str, stages: list[Stage]) -> list[dict]:
  """One row per stage: coverage of batches 0 .. total_steps-1 by both runs, and every record
  of the killed run against the reference's key of its (batch, column)."""
  rows = []
  for stage in stages:
    ref, run = read_keys(reference_dir, stage), read_keys(killed_dir, stage)
    row = dict(stage=stage.name, batches=stage.total_steps, columns=stage.batch_size,
               ref=ref, run=run, ref_missing=0, ref_inconsistent=0, run_missing=0,
               compared=0, equal=0, differ=0, past_reference=0, run_inconsistent=0,
               examples=[], ok=False)
    if ref is None or run is None:
      row['note'] = ('no example keys in the reference run (a reused --reference_workdir run '
                     'without log.example_keys?)' if ref is None else
                     'no example keys in the killed run')
      rows.append(row)
      continue
    wanted = [(b, c) for b in range(stage.total_steps) for c in range(stage.batch_size)]
    row['ref_missing'] = sum(1 for pair in wanted if pair not in ref.keys)
    row['run_missing'] = sum(1 for pair in wanted if pair not in run.keys)
    row['ref_inconsistent'] = sum(1 for keys in ref.keys.values() if len(set(keys)) > 1)
    for pair, keys in sorted(run.keys.items()):
      expected = ref.first(*pair)
      if expected is None:
        # Read ahead past the end of the reference's records: compared with each other only.
        row['past_reference'] += len(keys)
        row['run_inconsistent'] += len(set(keys)) > 1
        continue
      for key in keys:
        row['compared'] += 1
        if key == expected:
          row['equal'] += 1
        else:
          row['differ'] += 1
          if len(row['examples']) < 5:
            row['examples'].append(f'batch {pair[0]} column {pair[1]}: {key} (reference '
                                   f'{expected})')
    row['ok'] = (not row['ref_missing'] and not row['run_missing'] and not row['differ']
                 and not row['ref_inconsistent'] and not row['run_inconsistent']
                 and row['compared'] > 0)
    row['note'] = ''
    rows.append(row)
  return rows


def keys_problems(row: dict) -> list[str]:
  if row['ref'] is None or row['run'] is None:
    return [row['note']]
  problems = []
  if row['run_missing']:
    problems.append(f'{row["run_missing"]} (batch, column) pairs of batches 0..'
                    f'{row["batches"] - 1} have no record in the killed run')
  if row['ref_missing']:
    problems.append(f'{row["ref_missing"]} (batch, column) pairs have no record in the '
                    'reference run')
  if row['differ']:
    problems.append(f'{row["differ"]} of {row["compared"]} records differ from the reference, '
                    f'e.g. {"; ".join(row["examples"])}')
  if row['ref_inconsistent'] or row['run_inconsistent']:
    problems.append(f'records of the same (batch, column) disagree within the reference '
                    f'({row["ref_inconsistent"]}) / within the killed run past the '
                    f'reference\'s records ({row["run_inconsistent"]})')
  return problems


def format_keys_table(rows: list[dict]) -> str:
  lines = ['| stage | batches x columns | reference records (rows) | killed-run records (rows) '
           '| rows read more than once | every column covered (ref / killed) '
           '| killed rows equal to reference | differ | past reference, not compared |',
           '|-------|------------------:|-------------------------:|--------------------------:'
           '|-------------------------:|-------------------------------------'
           '|-------------------------------:|-------:|-----------------------------:|']
  for r in rows:
    ref, run = r['ref'], r['run']
    if ref is None or run is None:
      counts = ['-' if keys is None else f'{keys.records} ({keys.rows})' for keys in (ref, run)]
      lines.append(f'| {r["stage"]} | {r["batches"]} x {r["columns"]} | {counts[0]} '
                   f'| {counts[1]} | | | | | |')
      continue
    read_again = run.rows - len(run.keys)
    covered = ' / '.join('yes' if not r[key] else f'{r[key]} MISSING'
                         for key in ('ref_missing', 'run_missing'))
    lines.append(f'| {r["stage"]} | {r["batches"]} x {r["columns"]} '
                 f'| {ref.records} ({ref.rows}) | {run.records} ({run.rows}) | {read_again} '
                 f'| {covered} | {r["equal"]} of {r["compared"]} | {r["differ"]} '
                 f'| {r["past_reference"]} |')
  return '\n'.join(lines)


def describe_files(rows: list[dict]) -> list[str]:
  """Which process files each run wrote, and any torn lines."""
  lines = []
  for r in rows:
    for label, keys in (('reference', r['ref']), ('killed run', r['run'])):
      if keys is None:
        continue
      lines.append(f'  {r["stage"]} {label}: {", ".join(keys.files)}'
                   + (f'; {len(keys.torn)} torn line(s) (a kill during an append): '
                      + '; '.join(keys.torn[:3]) if keys.torn else ''))
  return lines
