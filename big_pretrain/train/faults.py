"""What stops a run early on purpose: a preemption notice or a loss that is no longer a number.

Preemption: TPU and cloud schedulers send SIGTERM some seconds before taking a
machine away. The loop then saves at the current step and returns; the same
command resumes (main.py exits with 75, EX_TEMPFAIL, so supervisors rerun it).
Ctrl-C (SIGINT) does the same; a second Ctrl-C stops at once, unsaved. With
several processes the notice may reach one host only, so JAX's preemption
sync service (started by jax.distributed) picks a step at which every
process stops together.

Non-finite loss: metrics stay on the device between log steps, so the loop
checks the pending losses whenever it fetches them, and always before a
checkpoint is written: a NaN state is never saved over a good one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal

import jax
from absl import logging
from jax.experimental import multihost_utils

from big_pretrain.errors import NonFiniteLossError, Preempted


class SigtermOutsideTraining:
  """main.py's SIGTERM handler outside the training loop (PreemptionNotice's inside it).

  It raises Preempted wherever the main thread is (starting up, compiling, between stages).
  A library may swallow an exception raised at an arbitrary point (in a finaliser, say), so
  the notice is also remembered: the next stage's PreemptionNotice raises it again.
  """

  def __init__(self):
    self.received = False

  def __call__(self, signum, frame) -> None:
    del signum, frame
    self.received = True
    raise self.preempted()

  @staticmethod
  def preempted() -> Preempted:
    return Preempted('SIGTERM before a stage\'s next step (while starting up, compiling or '
                     'between stages): nothing new to save. Run the same command to carry on '
                     'from the last checkpoint.')


class PreemptionNotice:
  """A context manager; `reached(step)` says when to save and stop.

  Single process: our own SIGTERM and SIGINT handlers set a flag (the previous
  handlers are restored on exit). Several processes: JAX's preemption sync
  manager catches SIGTERM and agrees on a step shared by all processes; our
  SIGINT handler turns a Ctrl-C into that SIGTERM.
  """

  def __init__(self):
    self._received = False
    self._previous_handlers = {}
    self._multi_process = False

  def __enter__(self) -> PreemptionNotice:
    outside_training = signal.getsignal(signal.SIGTERM)
    if isinstance(outside_training, SigtermOutsideTraining) and outside_training.received:
      raise outside_training.preempted()  # it arrived before, and its exception was lost
    self._multi_process = jax.process_count() > 1
    self._previous_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
    if not self._multi_process:
      self._previous_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous_handlers.items():
      signal.signal(signum, handler)
    self._previous_handlers = {}

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._received = True

  def _on_sigint(self, signum, frame) -> None:
    if self._received:  # the second Ctrl-C: the user will not wait for the save
      raise KeyboardInterrupt
    logging.warning('Ctrl-C: saving a checkpoint at the end of this step, then stopping '
                    '(Ctrl-C again stops at once, unsaved).')
    if self._multi_process:
      self._received = True
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's sync manager, which all processes hear
    else:
      self._on_sigterm(signum, frame)

  def reached(self, step: int) -> bool:
    """Whether to save at `step` and stop; called once per step, by every process."""
    if self._multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._received


def first_nonfinite_step(pending_metrics: list[dict], first_step: int,
                         max_skipped_in_a_row: int) -> tuple[int, dict] | None:
  """(step, its metrics) of the first step whose update made the state non-finite, or None.

  `pending_metrics[i]` are the (fetched) metrics of step `first_step + i`. A
  non-finite step whose update the optimizer skipped (see
  `config.optim.skip_nonfinite_updates`) is harmless, unless more than
  `max_skipped_in_a_row` came in a row, when the update is applied after all.
  """
  for offset, metrics in enumerate(pending_metrics):
    finite = all(math.isfinite(float(metrics[key])) for key in ('loss', 'grad_norm'))
    skipped = int(metrics.get('nonfinite_updates_in_a_row', max_skipped_in_a_row + 1))
    if not finite and skipped > max_skipped_in_a_row:
      return first_step + offset, metrics
  return None


# The metrics that say whether a step's update was finite, and whether it was skipped.
_FINITE_CHECK_KEYS = ('loss', 'grad_norm', 'nonfinite_updates_in_a_row')


def stop_if_nonfinite(pending_metrics: list[dict], step: int, max_skipped_in_a_row: int,
                      checkpointer) -> None:
  """Raises NonFiniteLossError naming the first of the steps ending at `step` whose update
  was NaN or Inf (after the checkpoint being written, if any, is whole)."""
  first_step = step - len(pending_metrics) + 1
  found = first_nonfinite_step(
      jax.device_get([{k: m[k] for k in m if k in _FINITE_CHECK_KEYS} for m in pending_metrics]),
      first_step, max_skipped_in_a_row)
  if found is None:
    return
  bad_step, metrics = found
  checkpointer.wait_until_finished()
  latest = checkpointer.latest_step()
  raise NonFiniteLossError(
      f'The loss became {float(metrics["loss"])} (gradient norm {float(metrics["grad_norm"])}) '
      f'at step {bad_step}: stopping. The last checkpoint, '
      + (f'step {latest} in {checkpointer.directory}, ' if latest is not None else 'none, ')
      + 'was written before it and is intact; nothing after it was saved. Lower '
      'config.optim.lr_per_256, set config.optim.clip_grad_norm, or let '
      'config.optim.skip_nonfinite_updates skip a few such steps, then run the same command '
      'to resume from that checkpoint.')


@dataclasses.dataclass(frozen=True)
class StepEnd:
  """What the loop does after a step."""
  final: bool       # the stage's last step
  preempted: bool   # a preemption notice: save and stop, evaluations wait for the rerun
  stopping: bool    # save and stop (preempted, or `stop_after_steps` reached)


@dataclasses.dataclass(frozen=True)
class StopPolicy:
  """When a stage stops: at total_steps, on a preemption notice, or after `stop_after_steps`
  steps of this call (tests and benchmarks stop early as a preempted run would)."""
  total_steps: int
  start_step: int
  stop_after_steps: int | None
  preemption: PreemptionNotice

  def after(self, step: int) -> StepEnd:
    """Called once per step, by every process (the preemption check may be collective)."""
    preempted = self.preemption.reached(step)
    stopped_early = (self.stop_after_steps is not None
                     and step - self.start_step >= self.stop_after_steps)
    return StepEnd(final=step == self.total_steps, preempted=preempted,
                   stopping=preempted or stopped_early)
