"""Top-1 / top-5 accuracy of a classifier objective on held-out images (fine-tuning).

The objective's own `predict(params, images) -> logits` on the held-out
split's first `test_examples` images (centre crops, no augmentation), each
image counted once; top-5 only where there are at least 5 classes. With
`also_ema` and `config.optim.ema_decay` set, the training loop runs it on the
moving average of the parameters too (metrics prefixed `ema_`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from big_pretrain.evaluators.eval_split import images_only
from big_pretrain import schema
from big_pretrain.evaluators.evaluator import EvalResult, Evaluator, held_out_keys
from big_pretrain.objectives.objective import CLASSIFIES


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """The fraction of rows whose label is among the k highest logits (ties: lower index first)."""
  top = np.argsort(-np.asarray(logits, np.float64), axis=1, kind='stable')[:, :k]
  return float(np.mean((top == np.asarray(labels)[:, None]).any(axis=1)))


class ClassificationEvaluator(Evaluator):

  config_keys = held_out_keys(
      'classification', "top-1 / top-5 of the objective's own head on held-out images",
      test_examples=50_000,  # ImageNet val: all of it
      also_ema=schema.Key(False, schema.BOOLEAN,
                          "also score config.optim.ema_decay's moving average (as ema_*)"))

  needs = CLASSIFIES

  def __init__(self, *args):
    super().__init__(*args)
    if self.eval_config.also_ema and self.stage_config.optim.ema_decay is None:
      raise ValueError(f'{self.culprit("also_ema")}=True, but config.optim.ema_decay is not '
                       'set: there is no moving average to score.')

  def predict(self, params, images):
    return self.objective.predict(params, images).astype(jnp.float32)

  def device_programs(self):
    return {'predict': (self.predict, (self.image_batch(),))}

  def run(self, params, step):
    del step
    logits, labels, class_names = self.split_outputs(
        images_only(self.jit('predict', self.predict)), params, data_key='test_data',
        num_examples=self.eval_config.test_examples)
    scalars = {'top1': top_k_accuracy(logits, labels, 1)}
    if logits.shape[1] >= 5:
      scalars['top5'] = top_k_accuracy(logits, labels, 5)
    scalars['examples'] = float(len(labels))
    scalars['chance'] = 1.0 / max(len(class_names), logits.shape[1])
    return EvalResult(scalars=scalars)
