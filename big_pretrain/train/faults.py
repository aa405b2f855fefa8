"""What stops a run early on purpose: a preemption notice or a loss that is no longer a number.

Preemption: TPU and cloud schedulers send SIGTERM some seconds before taking a
machine away. The loop then saves at the current step and returns; the same
command resumes. With several processes the notice may reach one host only,
so JAX's preemption sync service (started by jax.distributed) picks a step
at which every process stops together.

Non-finite loss: metrics stay on the device between log steps, so the loop
checks the pending losses whenever it fetches them, and always before a
checkpoint is written: a NaN state is never saved over a good one.
"""

from __future__ import annotations

import math
import signal

import jax
from jax.experimental import multihost_utils


class PreemptionNotice:
  """A context manager; `reached(step)` says when to save and stop.

  Single process: our own SIGTERM handler sets a flag (the previous handler
  is restored on exit). Several processes: JAX's preemption sync manager
  catches the signal and agrees on a step shared by all processes.
  """

  def __init__(self):
    self._received = False
    self._previous_handler = None
    self._multi_process = False

  def __enter__(self) -> PreemptionNotice:
    self._multi_process = jax.process_count() > 1
    if not self._multi_process:
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._received = True

  def reached(self, step: int) -> bool:
    """Whether to save at `step` and stop; called once per step, by every process."""
    if self._multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._received


class NonFiniteLossError(RuntimeError):
  """The loss or gradient norm became NaN or Inf, and no skip budget is left."""


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
