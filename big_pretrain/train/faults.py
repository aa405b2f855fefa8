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

import math
import os
import signal

import jax
from absl import logging
from jax.experimental import multihost_utils


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
  non-finite step whose update the optimiser skipped (see
  `config.optim.skip_nonfinite_updates`) is harmless, unless more than
  `max_skipped_in_a_row` came in a row, when the update is applied after all.
  """
  for offset, metrics in enumerate(pending_metrics):
    finite = all(math.isfinite(float(metrics[key])) for key in ('loss', 'grad_norm'))
    skipped = int(metrics.get('nonfinite_updates_in_a_row', max_skipped_in_a_row + 1))
    if not finite and skipped > max_skipped_in_a_row:
      return first_step + offset, metrics
  return None
