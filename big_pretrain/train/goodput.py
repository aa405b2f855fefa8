"""Where a stage's wall time goes: productive steps (goodput) and each kind of badput.

Every start of a stage accounts for its wall time, in these parts, which add up to it. It
begins where the accounting before it ended: for the first stage a process trains, when the
process started (Python, the imports, the distributed runtime: main.py passes it); for the
next one, when the previous stage's ended (so a chain's time between stages is counted).

  start_up            the process starting, configs, mesh, input pipeline, writer:
                      everything before the steps that is not one of the parts below
  compile             choosing and compiling the step (model.remat='auto' compiles it
                      several times), initializing a fresh stage's parameters (which
                      compiles the initializer), and the first step of each start
  checkpoint_restore  reading the checkpoint back (or the init_from weights)
  data_wait           the loop blocked on the next batch while the device had nothing to do:
                      waits during which the previous step was still running are the
                      step's time (on a CPU the input and the step share the cores), so
                      only waits that end with the previous step done count, whole
  checkpoint_save     the blocking part of each save (an asynchronous save's copy is not)
  evaluation          the evaluators, at the start, during training and at the end
  productive          the rest of the steps loop: the device training
  lost_to_restarts    steps a start trained after its last checkpoint, which a crash or a
                      kill threw away: their time, moved out of that start's productive time

The record of each start is one line of goodput.jsonl in the stage's folder, rewritten by
process 0 every RECORD_EVERY_SECONDS (a thread), at every log step and save, and at the end,
so a start killed without warning loses at most that much of its accounting. Lost progress is found when the next start restores an
earlier step than the last one recorded. TensorBoard gets `goodput/*` at each log step;
`python -m big_pretrain.goodput WORKDIR` prints the table over all starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from typing import Iterator

from absl import logging

from big_pretrain.storage import files as storage

GOODPUT_FILE = 'goodput.jsonl'
BADPUT = ('start_up', 'compile', 'checkpoint_restore', 'data_wait', 'checkpoint_save',
          'evaluation', 'lost_to_restarts')
PARTS = ('productive', *BADPUT)
# Parts measured with `measure`; start_up and productive are what is left before and
# during the steps loop, lost_to_restarts is found at the next start.
_MEASURED = ('compile', 'checkpoint_restore', 'data_wait', 'checkpoint_save', 'evaluation')
# How often the record is rewritten in any case: what a kill without warning can lose.
RECORD_EVERY_SECONDS = 1.0


def process_started_at() -> float | None:
  """When this process started, as time.time() (Linux: /proc); None where that is unknown."""
  try:
    with open('/proc/self/stat', encoding='ascii') as f:
      # After the command name (in parentheses, which may hold spaces): field 3 on;
      # field 22 is the start time in clock ticks since boot.
      start_ticks = int(f.read().rsplit(')', 1)[1].split()[19])
    with open('/proc/uptime', encoding='ascii') as f:
      uptime = float(f.read().split()[0])
    return time.time() - (uptime - start_ticks / os.sysconf('SC_CLK_TCK'))
  except (OSError, ValueError, IndexError):
    return None


class StageClock:
  """The accounting of one start of a stage: the loop's thread measures; `recording` runs
  a thread that rewrites the record every RECORD_EVERY_SECONDS."""

  def __init__(self, goodput_file: str, *, write: bool, clock=time.perf_counter,
               started_at: float | None = None):
    self._file = goodput_file
    self._write = write
    self._clock = clock
    now = time.time()
    # Started where the accounting before it ended (`started_at`), else now.
    started_at = now if started_at is None else min(started_at, now)
    self._started = clock() - (now - started_at)
    self._started_at = started_at  # when, to order the stages of a chain
    self._steps_started: float | None = None  # when the steps loop began
    self._measured = {part: 0.0 for part in _MEASURED}
    self._measuring: tuple[str, float] | None = None  # the block in progress, for a record
    self._measured_before_steps = 0.0  # of _measured, before the steps loop began
    self._write_lock = threading.Lock()
    self._records_started = False  # nothing is written for a start refused before it ran
    self.accounted_until = started_at  # time.time() of the last record
    self.start_step = 0
    self.last_step = 0
    self.last_saved_step = 0
    self.previous = read_starts(goodput_file)

  @contextlib.contextmanager
  def measure(self, part: str) -> Iterator[None]:
    """Adds the time the block takes to `part` (one of the measured parts)."""
    begin = self._clock()
    self._measuring = (part, begin)
    try:
      yield
    finally:
      seconds = self._clock() - begin
      self._measuring = None  # first: a record in between counts the block once, not twice
      self._measured[part] += seconds

  def start_records(self) -> None:
    """From now on `record` writes: the start goes ahead (its config was accepted)."""
    self._records_started = True

  @contextlib.contextmanager
  def recording(self) -> Iterator[None]:
    """Rewrites the record every RECORD_EVERY_SECONDS in a thread while the block runs, and
    once more at its end."""
    stop = threading.Event()

    def rewrite():
      while not stop.wait(RECORD_EVERY_SECONDS):
        self.record()

    thread = threading.Thread(target=rewrite, name='goodput_record', daemon=True)
    thread.start()
    try:
      yield
    finally:
      stop.set()
      thread.join()
      self.record()

  def waited_for_input(self, seconds: float, device_busy: bool) -> None:
    """The loop waited `seconds` for a batch; `device_busy`: the previous step was still
    running when it came (so the wait cost nothing)."""
    if not device_busy:
      self._measured['data_wait'] += seconds

  def steps_begin(self, start_step: int) -> None:
    """The steps loop starts (after restoring `start_step`)."""
    self._steps_started = self._clock()
    self._measured_before_steps = sum(self._measured.values())
    self.start_step = self.last_step = self.last_saved_step = start_step

  def step_done(self, step: int) -> None:
    self.last_step = step

  def saved(self, step: int) -> None:
    self.last_saved_step = step

  def parts(self, now: float | None = None) -> dict[str, float]:
    """Seconds in each part of this start until `now` (default: now); lost_to_restarts is
    found by `account`, from the start after it. start_up and productive are what the
    measured parts leave of the time before and during the steps loop."""
    now = self._clock() if now is None else now
    parts = dict(self._measured)
    measuring = self._measuring
    if measuring is not None:  # a record written while a block runs counts it so far
      parts[measuring[0]] += max(0.0, now - measuring[1])
    measured = sum(parts[part] for part in _MEASURED)
    if self._steps_started is None:
      parts['start_up'] = max(0.0, now - self._started - measured)
      parts['productive'] = 0.0
    else:
      parts['start_up'] = max(0.0, self._steps_started - self._started
                              - self._measured_before_steps)
      parts['productive'] = max(0.0, now - self._steps_started
                                - (measured - self._measured_before_steps))
    parts['lost_to_restarts'] = 0.0
    return parts

  def record(self) -> dict:
    """This start's line of goodput.jsonl, written now (process 0). Accounting never stops a
    run: a write that fails (a full disk, which the checkpoint reports) is a warning."""
    with self._write_lock:
      entry = self._entry()
      self.accounted_until = self._started_at + entry['wall_seconds']
      if self._write and self._records_started:
        lines = [json.dumps(start) for start in self.previous] + [json.dumps(entry)]
        try:
          storage.write_text(self._file, '\n'.join(lines) + '\n')
        except OSError as error:
          logging.warning('Could not record the goodput in %s: %s', self._file, error)
    return entry

  def scalars(self) -> dict[str, float]:
    """goodput/* over every start so far, for TensorBoard."""
    table = self.table()
    scalars = {f'goodput/{part}_seconds': table['parts'][part] for part in PARTS}
    scalars['goodput/fraction'] = table['goodput']
    return scalars

  def table(self) -> dict:
    """`account` over the earlier starts and this one so far."""
    return account([*self.previous, self._entry()])

  def _entry(self) -> dict:
    now = self._clock()  # one reading: the parts add up to the wall time
    return {'started_at': self._started_at, 'start_step': self.start_step,
            'last_step': self.last_step, 'last_saved_step': self.last_saved_step,
            'wall_seconds': now - self._started, 'parts': self.parts(now)}


def read_starts(goodput_file: str) -> list[dict]:
  """The records of the earlier starts; a line that does not read (a start killed while it
  wrote it: the file is replaced whole, so only by hand) is left out."""
  text = storage.read_text(goodput_file)
  starts = []
  for line in (text or '').splitlines():
    try:
      entry = json.loads(line)
    except ValueError:
      continue
    if isinstance(entry, dict) and isinstance(entry.get('parts'), dict):
      starts.append(entry)
  return starts


def account(starts: list[dict]) -> dict:
  """The parts summed over `starts` (in order), with the progress each restart lost moved
  from productive to lost_to_restarts: a start that recorded step s, followed by one that
  restored step r < s, lost s - r steps, at the first start's seconds per productive step.
  Returns {'wall_seconds', 'parts', 'goodput', 'lost_steps', 'starts'}."""
  parts = {part: 0.0 for part in PARTS}
  wall, lost_steps = 0.0, 0
  for index, start in enumerate(starts):
    for part in PARTS:
      parts[part] += float(start['parts'].get(part, 0.0))
    wall += float(start.get('wall_seconds', 0.0))
    if index + 1 < len(starts):
      restored = starts[index + 1]['start_step']
      lost = max(0, start['last_step'] - max(restored, start['start_step']))
      trained = start['last_step'] - start['start_step']
      if lost and trained > 0:
        seconds = start['parts'].get('productive', 0.0) * lost / trained
        parts['productive'] -= seconds
        parts['lost_to_restarts'] += seconds
        lost_steps += lost
  return {'wall_seconds': wall, 'parts': parts,
          'goodput': parts['productive'] / wall if wall > 0 else 0.0,
          'lost_steps': lost_steps, 'starts': len(starts)}


def format_line(table: dict) -> str:
  """'goodput 81% of 5m 10s (compile 9%, data_wait 3%, ...)': the badput over 0.5%."""
  wall = table['wall_seconds']
  shares = [f'{part} {100 * table["parts"][part] / wall:.0f}%' for part in BADPUT
            if wall and table['parts'][part] / wall >= 0.005]
  return (f'goodput {100 * table["goodput"]:.0f}% of {wall:.0f}s over {table["starts"]} '
          f'start{"s" if table["starts"] != 1 else ""}'
          + (f' ({", ".join(shares)})' if shares else ''))
