"""A stage's evaluations: which evaluators run when, their scores logged and recorded in the
stage's folder, and what a failure at the final step means.

The scores are written after the step's checkpoint: a stage is finished once its final
checkpoint and its final scores exist, and a stage stopped between the two reruns only its
final evaluations.
"""

from __future__ import annotations

from big_pretrain.errors import FinalEvaluationError
from big_pretrain.storage.stage_dir import StageDir
from big_pretrain.train.optim import ema_params


class StageEvaluations:
  """The evaluators of config.evals for one stage, and `results`: each one's latest scalars."""

  def __init__(self, evaluators: list, writer, stage_dir: StageDir):
    self._evaluators = evaluators
    self._writer = writer
    self._stage_dir = stage_dir
    self.results: dict[str, dict] = {}

  def at_start(self, params) -> None:
    """Evaluators with `at_start` score the starting parameters, logged at step 0 and kept in
    eval_results_at_start.json: the baseline the stage's final scores are read against."""
    results = {}
    for evaluator in self._evaluators:
      if evaluator.eval_config.get('at_start'):  # only probes have this option
        results[evaluator.name] = evaluator.run(params, 0).scalars
        self._log_scalars(0, evaluator.name, results[evaluator.name])
    if results:
      self._stage_dir.write_results(self._stage_dir.at_start_results_file, 0, results)

  def run_due(self, state, step: int, *, final: bool) -> None:
    """The evaluators due at `step` (all of them at the final step)."""
    self._run([e for e in self._evaluators if e.due(step, final)], state, step, final=final)

  def run_final(self, state, step: int) -> None:
    """Every evaluator, at the final step: a finished stage whose final scores are missing."""
    self._run(self._evaluators, state, step, final=True)

  def _run(self, evaluators: list, state, step: int, *, final: bool) -> None:
    for evaluator in evaluators:
      try:
        result = evaluator.run(state.params, step)
        if evaluator.eval_config.get('also_ema'):  # only classification has it
          ema = evaluator.run(ema_params(state.opt_state, state.params), step)
          result.scalars.update({f'ema_{k}': v for k, v in ema.scalars.items()})
      except Exception as error:  # pylint: disable=broad-exception-caught
        if not final:
          raise
        raise FinalEvaluationError(
            f'Evaluator {evaluator.name!r} failed at the final step {step}: '
            f'{type(error).__name__}: {error}. Training is done and the final checkpoint is '
            f'saved in {self._stage_dir.checkpoints}; fix the cause '
            f'(config.evals.{evaluator.name}) and run the same command: it runs only the '
            'final evaluations.') from error
      self.results[evaluator.name] = result.scalars
      self._log_scalars(step, evaluator.name, result.scalars)
      if result.images:
        self._writer.write_images(step, {k: v[None] for k, v in result.images.items()})
    if evaluators:
      self._stage_dir.write_results(self._stage_dir.eval_results_file, step, self.results)

  def _log_scalars(self, step: int, name: str, scalars: dict) -> None:
    if scalars:
      self._writer.write_scalars(step, {f'eval/{name}/{k}': v for k, v in scalars.items()})
