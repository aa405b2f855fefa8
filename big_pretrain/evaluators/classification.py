"""Top-1 / top-5 accuracy of a classifier objective on held-out images (fine-tuning).

The objective's own `predict(params, images) -> logits` on the held-out
split's first `test_examples` images (centre crops, no augmentation), each
image counted once; top-5 only where there are at least 5 classes. With
`also_ema` and `config.optim.ema_decay` set, the training loop runs it on the
moving average of the parameters too (metrics prefixed `ema_`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from big_pretrain import sharding as sharding_lib
from big_pretrain.evaluators.evaluator import EvalResult, Evaluator
from big_pretrain.evaluators.features import extract_outputs, split_data_config


def top_k_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """The fraction of rows whose label is among the k highest logits (ties: lower index first)."""
  top = np.argsort(-np.asarray(logits, np.float64), axis=1, kind='stable')[:, :k]
  return float(np.mean((top == np.asarray(labels)[:, None]).any(axis=1)))


class ClassificationEvaluator(Evaluator):

  @staticmethod
  def default_config():
    return ml_collections.ConfigDict(dict(
        kind='classification',
        every_steps=0,
        test_examples=50_000,  # At most this many held-out images (ImageNet val: all).
        batch_size=256,        # Global; rounded up to a multiple of the batch shards.
        test_data=ml_collections.ConfigDict(dict(split='test')),
        also_ema=False,        # Also score config.optim.ema_decay's moving average.
    ))

  def __init__(self, *args):
    super().__init__(*args)
    culprit = f'config.evals.{self.name}'
    if not hasattr(self.objective, 'predict'):
      raise ValueError(
          f'{culprit}: kind=classification scores class logits, which the '
          f'{self.objective.name!r} objective does not give. Use it with objective '
          "'finetune', or probe this encoder with kind='linear_probe'.")
    if self.eval_config.also_ema and self.stage_config.optim.get('ema_decay') is None:
      raise ValueError(f'{culprit}.also_ema=True, but config.optim.ema_decay is not set: '
                       'there is no moving average to score.')
    for key in ('test_examples', 'batch_size'):
      if self.eval_config[key] <= 0:
        raise ValueError(f'{culprit}.{key}={self.eval_config[key]} must be positive.')
    objective = self.objective
    self._predict = jax.jit(
        lambda params, batch: objective.predict(params, batch['image']).astype(jnp.float32),
        out_shardings=sharding_lib.batch_sharding(self.trainer.mesh))

  def run(self, params, step):
    del step
    num_examples = self.eval_config.test_examples
    data_config = split_data_config(
        self.stage_config.data, self.eval_config.test_data, num_examples=num_examples,
        culprit=f'config.evals.{self.name}.test_data')
    logits, labels, class_names = extract_outputs(
        self._predict, params, data_config, num_examples=num_examples,
        batch_size=self.eval_config.batch_size, mesh=self.trainer.mesh,
        rules=self.trainer.rules, culprit=f'config.evals.{self.name}')
    scalars = {'top1': top_k_accuracy(logits, labels, 1)}
    if logits.shape[1] >= 5:
      scalars['top5'] = top_k_accuracy(logits, labels, 5)
    scalars['examples'] = float(len(labels))
    scalars['chance'] = 1.0 / max(len(class_names), logits.shape[1])
    return EvalResult(scalars=scalars)
