"""Goodput: each start's wall time split into productive time and badput, the parts adding
up to it; a slow input, slow saves and progress lost to a crash attributed where they belong."""

import json
import os
import subprocess
import sys
import time

import pytest

from big_pretrain import goodput as goodput_command
from big_pretrain.data.sources import synthetic
from big_pretrain.storage.checkpoints import Checkpointer
from big_pretrain.train import faults
from big_pretrain.train import goodput
from big_pretrain.train.loop import train_stage
from helpers.paths import REPO_ROOT
from helpers.tiny_config import one_device, tiny_mae_config

# A sum of ~10 float64 durations: its rounding is ~1e-15 of the wall time.
ADDS_UP = 1e-9
SAVE_DELAY = 0.3  # seconds added to each save
EXAMPLE_DELAY = 0.01  # seconds added to reading each example


def _starts(workdir) -> list[dict]:
  return goodput.read_starts(os.path.join(workdir, goodput.GOODPUT_FILE))


def _assert_adds_up(entry):
  assert sum(entry['parts'].values()) == pytest.approx(entry['wall_seconds'], rel=ADDS_UP)


def test_account_moves_the_steps_a_crash_lost_out_of_productive():
  # Start 1 trained steps 0-12 in 12 s of productive time and saved at 10; start 2
  # restored 10, so steps 11 and 12 (2 s) were lost.
  first = {'start_step': 0, 'last_step': 12, 'wall_seconds': 20.0,
           'parts': {'productive': 12.0, 'compile': 8.0}}
  second = {'start_step': 10, 'last_step': 20, 'wall_seconds': 15.0,
            'parts': {'productive': 10.0, 'compile': 5.0}}
  table = goodput.account([first, second])
  assert table['lost_steps'] == 2 and table['starts'] == 2
  assert table['parts']['lost_to_restarts'] == pytest.approx(2.0)
  assert table['parts']['productive'] == pytest.approx(20.0)
  assert sum(table['parts'].values()) == pytest.approx(table['wall_seconds'])
  assert table['goodput'] == pytest.approx(20.0 / 35.0)
  # A clean stop (restored where it stopped) loses nothing.
  assert goodput.account([first, {**second, 'start_step': 12}])['lost_steps'] == 0


@pytest.mark.integration
def test_a_slow_input_and_slow_saves_are_badput_of_their_own(tmp_path, monkeypatch):
  real_getitem, real_save = synthetic.SyntheticShapes.__getitem__, Checkpointer.save

  def slow_example(self, index):
    time.sleep(EXAMPLE_DELAY)
    return real_getitem(self, index)

  def slow_save(self, *args, **kwargs):
    time.sleep(SAVE_DELAY)
    return real_save(self, *args, **kwargs)

  monkeypatch.setattr(synthetic.SyntheticShapes, '__getitem__', slow_example)
  monkeypatch.setattr(Checkpointer, 'save', slow_save)
  config = tiny_mae_config(**{'checkpoint.every_steps': 2})
  train_stage(config, str(tmp_path), devices=one_device())
  [entry] = _starts(tmp_path)
  _assert_adds_up(entry)
  parts = entry['parts']
  saves = config.total_steps // 2  # steps 2, 4, 6
  assert parts['checkpoint_save'] >= saves * SAVE_DELAY
  # The input reads batch_size examples a step in at most num_threads threads, ahead of the
  # step; at least the first batch (read while nothing else runs) is waited for in full.
  assert parts['data_wait'] >= config.batch_size * EXAMPLE_DELAY / os.cpu_count()
  assert parts['compile'] > 0 and parts['productive'] > 0 and parts['start_up'] > 0
  assert parts['lost_to_restarts'] == 0
  assert entry['start_step'] == 0 and entry['last_step'] == entry['last_saved_step'] == 6


@pytest.mark.integration
def test_steps_after_the_last_save_are_lost_to_the_crash_and_the_report_says_so(
    tmp_path, monkeypatch, capsys):
  config = tiny_mae_config(**{'checkpoint.every_steps': 3, 'log.every_steps': 1})
  real_after = faults.StopPolicy.after

  def crash_at_step_5(self, step):
    if step == 5:
      raise RuntimeError('the machine died')
    return real_after(self, step)

  monkeypatch.setattr(faults.StopPolicy, 'after', crash_at_step_5)
  with pytest.raises(RuntimeError, match='machine died'):
    train_stage(config, str(tmp_path), devices=one_device())
  monkeypatch.setattr(faults.StopPolicy, 'after', real_after)
  train_stage(config, str(tmp_path), devices=one_device())

  crashed, resumed = _starts(tmp_path)
  assert (crashed['start_step'], crashed['last_step'], crashed['last_saved_step']) == (0, 5, 3)
  assert (resumed['start_step'], resumed['last_step']) == (3, 6)
  table = goodput.account([crashed, resumed])
  assert table['lost_steps'] == 2  # steps 4 and 5, trained again
  trained = crashed['last_step'] - crashed['start_step']
  assert table['parts']['lost_to_restarts'] == pytest.approx(
      crashed['parts']['productive'] * 2 / trained)
  assert sum(table['parts'].values()) == pytest.approx(table['wall_seconds'], rel=ADDS_UP)

  assert goodput_command.main([str(tmp_path)]) == 0
  printed = capsys.readouterr().out
  assert '2 starts' in printed and '2 steps lost to restarts' in printed
  for part in goodput.PARTS:
    assert part in printed


def test_the_report_refuses_a_folder_without_records(tmp_path, capsys):
  with pytest.raises(SystemExit) as stopped:
    goodput_command.main([str(tmp_path)])
  assert stopped.value.code == 2
  assert 'holds no goodput.jsonl' in capsys.readouterr().err
  (tmp_path / goodput.GOODPUT_FILE).write_text('not json\n' + json.dumps(
      {'start_step': 0, 'last_step': 1, 'wall_seconds': 1.0, 'parts': {'productive': 1.0}})
      + '\n')
  assert len(_starts(tmp_path)) == 1  # the line that does not read is left out


def test_a_start_counts_from_where_the_accounting_before_it_ended_and_records_as_it_goes(
    tmp_path, monkeypatch):
  # The first stage of a process counts from the process's start (main.py passes it): here
  # 3 s before the clock exists. A thread rewrites the record, so a start killed in the
  # middle of a compile keeps what it had accounted up to the last rewrite.
  monkeypatch.setattr(goodput, 'RECORD_EVERY_SECONDS', 0.1)
  path = str(tmp_path / goodput.GOODPUT_FILE)
  clock = goodput.StageClock(path, write=True, started_at=time.time() - 3.0)
  with clock.recording():
    time.sleep(0.3)
    assert not os.path.exists(path)  # nothing written before the start goes ahead
    clock.start_records()
    with clock.measure('compile'):
      time.sleep(0.5)
      [mid_compile] = _starts(tmp_path)
  [final] = _starts(tmp_path)
  # Written by the thread within the last 0.1 s (plus scheduling) of the compile's 0.5 s.
  assert 0.2 <= mid_compile['parts']['compile'] <= 0.5
  assert mid_compile['wall_seconds'] >= 3.3
  _assert_adds_up(mid_compile)
  _assert_adds_up(final)
  assert final['parts']['compile'] >= 0.5
  assert 3.3 <= final['parts']['start_up'] < 3.3 + 0.5  # the 3 s before, and the 0.3 s wait
  assert clock.accounted_until == pytest.approx(final['started_at'] + final['wall_seconds'])
  assert abs(clock.accounted_until - time.time()) < 0.5


def test_process_started_at_is_when_the_process_began():
  if goodput.process_started_at() is None:
    pytest.skip('no /proc here')
  # A child that waits 1 s after starting, then says when it started: before that wait,
  # after this process launched it (the clock ticks are 1/100 s; the boot time a float).
  launched = time.time()
  said = subprocess.run(
      [sys.executable, '-c', 'import time; time.sleep(1); '
       'from big_pretrain.train import goodput; print(goodput.process_started_at())'],
      capture_output=True, text=True, check=True, cwd=REPO_ROOT).stdout
  started = float(said)
  assert launched - 0.02 <= started <= launched + 0.5
