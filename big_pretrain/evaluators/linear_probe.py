"""Linear probe: multinomial logistic regression on frozen, pooled features.

Features of the first `train_examples` training images are standardised with
their own mean and standard deviation (the held-out features with the same
statistics), a softmax classifier with an L2 penalty is fitted full-batch with
L-BFGS, and its top-1 accuracy is reported on the held-out split (`accuracy`)
and on the training features (`train_accuracy`), beside `chance` (1 / the
number of classes). The fit is deterministic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from big_pretrain.evaluators.evaluator import EvalResult
from big_pretrain import schema
from big_pretrain.evaluators.features import FrozenFeatureEvaluator, feature_eval_keys

# The fit stops early once the gradient norm of the objective falls below this.
GRADIENT_TOLERANCE = 1e-6
# Features with (near) zero spread stay ~0 after standardising instead of blowing up.
MIN_FEATURE_STD = 1e-6


def standardize(train_features: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """Every array shifted and scaled by the train features' per-dimension mean and std."""
  train = np.asarray(train_features, np.float64)
  mean = train.mean(axis=0)
  std = np.maximum(train.std(axis=0), MIN_FEATURE_STD)
  return [((np.asarray(x, np.float64) - mean) / std).astype(np.float32)
          for x in (train_features, *others)]


def _logits(features, weights, bias):
  # HIGHEST: TPUs otherwise multiply float32 in bfloat16 passes.
  return jnp.dot(features, weights, precision=jax.lax.Precision.HIGHEST) + bias


@functools.partial(jax.jit, static_argnames=('num_classes',))
def _fit_lbfgs(features, labels, l2, num_steps, *, num_classes):
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)

  def objective(classifier):
    logits = _logits(features, classifier['weights'], classifier['bias'])
    cross_entropy = optax.softmax_cross_entropy(logits, one_hot).mean()
    return cross_entropy + 0.5 * l2 * jnp.sum(jnp.square(classifier['weights']))

  solver = optax.lbfgs()
  # The zoom line search already evaluated value and gradient at the new point: reuse them.
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    classifier, state = carry
    value, grad = value_and_grad(classifier, state=state)
    updates, state = solver.update(
        grad, state, classifier, value=value, grad=grad, value_fn=objective)
    return optax.apply_updates(classifier, updates), state

  def keep_going(carry):
    _, state = carry
    count = optax.tree.get(state, 'count')
    grad_norm = optax.tree.norm(optax.tree.get(state, 'grad'))
    return (count == 0) | ((count < num_steps) & (grad_norm >= GRADIENT_TOLERANCE))

  dim = features.shape[1]
  classifier = {'weights': jnp.zeros((dim, num_classes), jnp.float32),
                'bias': jnp.zeros((num_classes,), jnp.float32)}
  classifier, _ = jax.lax.while_loop(keep_going, step, (classifier, solver.init(classifier)))
  return classifier['weights'], classifier['bias']


def fit_linear_classifier(features, labels, num_classes: int, l2: float, num_steps: int):
  """Softmax regression: min mean cross-entropy + l2/2 |W|^2 (bias not penalised).

  Args:
    features: (N, D) float, ideally standardised (see `standardize`).
    labels: (N,) ints in [0, num_classes).
    num_classes: C, the number of outputs.
    l2: strength of the L2 penalty on the weights.
    num_steps: at most this many L-BFGS iterations (fewer once converged).

  Returns:
    (weights (D, C), bias (C,)) as float32 numpy arrays.
  """
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels)
  if features.ndim != 2 or labels.shape != features.shape[:1]:
    raise ValueError(
        f'features must be (N, D) and labels (N,); got {features.shape} and {labels.shape}.')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
        f'labels must lie in [0, {num_classes}); got [{labels.min()}, {labels.max()}].'
        ' Pass the number of classes of the dataset as num_classes.')
  if l2 < 0 or num_steps <= 0:
    raise ValueError(f'Need l2 >= 0 and num_steps > 0; got l2={l2}, num_steps={num_steps}.')
  weights, bias = _fit_lbfgs(features, labels.astype(np.int32), np.float32(l2),
                             np.int32(num_steps), num_classes=num_classes)
  weights, bias = np.asarray(weights), np.asarray(bias)
  if not (np.isfinite(weights).all() and np.isfinite(bias).all()):
    raise FloatingPointError(
        'The linear probe diverged (non-finite weights). Standardise the features, or '
        'raise l2.')
  return weights, bias


def classify(features, weights, bias) -> np.ndarray:
  """The top-1 class (N,) of each feature row under the linear classifier."""
  logits = np.asarray(features, np.float64) @ np.asarray(weights, np.float64) + bias
  return logits.argmax(axis=1)


# The probe's keys (the low-shot probes share them).
PROBE_KEYS = dict(
    l2=schema.Key(1e-4, schema.at_least(0),
                  'the L2 penalty on the weights (the features are standardised)'),
    num_steps=schema.Key(500, schema.COUNT, 'at most this many L-BFGS iterations'),
)


class LinearProbeEvaluator(FrozenFeatureEvaluator):

  config_keys = feature_eval_keys(
      'linear_probe', 'L-BFGS logistic regression on the frozen features', **PROBE_KEYS)

  def run(self, params, step):
    data = self.features(params)
    train, test = standardize(data.train_features, data.test_features)
    weights, bias = fit_linear_classifier(
        train, data.train_labels, data.num_classes, self.eval_config.l2,
        self.eval_config.num_steps)
    return EvalResult(scalars={
        'accuracy': float(np.mean(classify(test, weights, bias) == data.test_labels)),
        'train_accuracy': float(np.mean(classify(train, weights, bias) == data.train_labels)),
        'chance': data.chance,
    })
