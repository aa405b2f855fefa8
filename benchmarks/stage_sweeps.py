"""Shared by the benchmarks that train many stages and compare them over seeds
(pre_pretraining.py, image_text_losses.py): a stage run once and read back, and the paired
statistics of their tables. Not a script."""

from __future__ import annotations

import json
import math
import os
import statistics
import time

# Two-sided 95% Student t quantiles by degrees of freedom (seeds - 1).
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228}
RESULT_FILE = 'sweep_result.json'


def mean_sd(values) -> tuple[float, float]:
  return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_interval(differences) -> tuple[float, float]:
  """(mean, half-width of the 95% t-interval) of paired differences (nan for one pair)."""
  mean, sd = mean_sd(differences)
  if len(differences) < 2:
    return mean, math.nan
  return mean, T_95.get(len(differences) - 1, 1.96) * sd / math.sqrt(len(differences))


def read_curves(workdir: str) -> dict:
  """{tag: [(step, value)]} of the stage's scalars, from its TensorBoard events."""
  from tensorboard.backend.event_processing import plugin_event_accumulator
  from tensorboard.util import tensor_util
  events = plugin_event_accumulator.EventAccumulator(
      workdir, size_guidance={plugin_event_accumulator.TENSORS: 0})
  events.Reload()
  tags = (events.PluginTagToContent('scalars') if 'scalars' in events.ActivePlugins()
          else {})
  return {tag: sorted({e.step: float(tensor_util.make_ndarray(e.tensor_proto))
                       for e in events.Tensors(tag)}.items()) for tag in tags}


def run_stage(config, workdir: str) -> dict:
  """{'eval': final eval results, 'curves': scalars by step, 'seconds': training time,
  'steps'} of the stage in `workdir`, training it first (resuming a stopped run) unless a
  finished run recorded them."""
  from big_pretrain.config.validation import validate_stage_config
  from big_pretrain.stages import chain
  from big_pretrain.train.loop import train_stage
  result_file = os.path.join(workdir, RESULT_FILE)
  if os.path.exists(result_file):
    with open(result_file) as f:
      return json.load(f)
  validate_stage_config(config)
  start = time.time()
  train_stage(config, workdir, initialize=chain.initializer_from(config.init_from, workdir))
  seconds = time.time() - start
  evals = {}
  if os.path.exists(os.path.join(workdir, 'eval_results.json')):  # a stage may run none
    with open(os.path.join(workdir, 'eval_results.json')) as f:
      evals = json.load(f)
  result = {'eval': evals, 'curves': read_curves(workdir), 'seconds': seconds,
            'steps': config.total_steps}
  with open(result_file, 'w') as f:
    json.dump(result, f)
  return result
