"""Attentive probe (AIM, docs/methods.md section 5) on the frozen encoder's patch tokens.

The features of an image are its patch tokens averaged over the encoder's last
`num_last_blocks` blocks ('last_blocks_mean'). One learned query attends over
them with multi-head attention (keys and values projected from the tokens; no
position embedding, so the probe ignores token order), the pooled vector is
layer-normalized, and a linear layer gives the class logits. Features are
standardised per channel with the training tokens' statistics; the probe is
trained with AdamW on a cosine schedule over minibatches drawn with a fixed
seed, so the fit is deterministic. Reports the top-1 `accuracy` on the held-out
split and `train_accuracy` on the training features.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from big_pretrain import schema
from big_pretrain.evaluators.evaluator import EvalResult
from big_pretrain.evaluators.features import FrozenFeatureEvaluator, feature_eval_keys
from big_pretrain.evaluators.linear_probe import MIN_FEATURE_STD

# HIGHEST: TPUs otherwise multiply float32 in bfloat16 passes.
_PRECISION = jax.lax.Precision.HIGHEST


class AttentiveProbe(nn.Module):
  """Logits (B, num_classes) of token features (B, L, D) via one learned attention query."""
  num_classes: int
  num_heads: int

  @nn.compact
  def __call__(self, tokens):
    dim = tokens.shape[-1]
    if dim % self.num_heads:
      raise ValueError(
          f'num_heads={self.num_heads} must divide the feature width {dim}; pick a divisor.')
    head_dim = dim // self.num_heads
    # One (1, D) query shared by every example, split into heads as the keys are.
    query = self.param('query', nn.initializers.normal(0.02), (1, dim))
    query = query.reshape(self.num_heads, head_dim)
    project = functools.partial(nn.DenseGeneral, features=(self.num_heads, head_dim),
                                precision=_PRECISION)
    keys = project(name='key')(tokens)      # (B, L, H, K)
    values = project(name='value')(tokens)  # (B, L, H, K)
    scores = jnp.einsum('hk,blhk->bhl', query, keys, precision=_PRECISION) / np.sqrt(head_dim)
    # Softmax over the tokens and a weighted sum: no term depends on token positions.
    weights = jax.nn.softmax(scores, axis=-1)
    pooled = jnp.einsum('bhl,blhk->bhk', weights, values, precision=_PRECISION)
    pooled = nn.LayerNorm(name='norm')(pooled.reshape(tokens.shape[0], dim))
    return nn.Dense(self.num_classes, precision=_PRECISION, name='classifier')(pooled)


def standardize_tokens(train_tokens: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """Every (N, L, D) array shifted and scaled by the train tokens' per-channel mean and std."""
  train_tokens = np.asarray(train_tokens, np.float32)
  # float64 accumulators without a float64 copy: token arrays can be gigabytes.
  mean = train_tokens.mean(axis=(0, 1), dtype=np.float64)
  std = np.maximum(train_tokens.std(axis=(0, 1), dtype=np.float64), MIN_FEATURE_STD)
  mean, scale = mean.astype(np.float32), (1.0 / std).astype(np.float32)
  return [(np.asarray(x, np.float32) - mean) * scale for x in (train_tokens, *others)]


def _check_tokens(token_features, name='token_features') -> np.ndarray:
  token_features = np.asarray(token_features, np.float32)
  if token_features.ndim != 3:
    raise ValueError(f'{name} must be (N, L, D) tokens per example; got {token_features.shape}.')
  return token_features


def minibatch_indices(num_examples: int, batch_size: int, num_steps: int,
                      seed: int) -> np.ndarray:
  """(num_steps, batch_size) example indices: fresh seeded permutations, epoch after epoch.

  Every example is seen once per epoch; `batch_size` is capped at `num_examples`.
  """
  batch_size = min(batch_size, num_examples)
  rng = np.random.default_rng(seed)
  needed = num_steps * batch_size
  epochs = [rng.permutation(num_examples) for _ in range(-(-needed // num_examples))]
  return np.concatenate(epochs)[:needed].reshape(num_steps, batch_size).astype(np.int32)


def _decay_mask(params):
  # Decay the projection and classifier kernels only, not the query, biases or LayerNorm.
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: path[-1].key == 'kernel', params)


@functools.partial(jax.jit, static_argnames=('num_classes', 'num_heads', 'num_steps'))
def _fit(token_features, labels, batches, init_rng, learning_rate, weight_decay, *,
         num_classes, num_heads, num_steps):
  probe = AttentiveProbe(num_classes, num_heads)
  params = probe.init(init_rng, token_features[:1])['params']
  schedule = optax.cosine_decay_schedule(learning_rate, num_steps)
  optimizer = optax.adamw(schedule, weight_decay=weight_decay, mask=_decay_mask)

  def loss_fn(params, tokens, batch_labels):
    logits = probe.apply({'params': params}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels).mean()

  def step(carry, batch):
    params, opt_state = carry
    grads = jax.grad(loss_fn)(params, token_features[batch], labels[batch])
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  # All steps in one compiled scan over the precomputed minibatch indices.
  (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), batches)
  return params


def fit_attentive_probe(token_features, labels, num_classes: int, *, num_heads: int,
                        num_steps: int, batch_size: int, learning_rate: float,
                        weight_decay: float, seed: int = 0):
  """Trains an `AttentiveProbe` with AdamW + cosine decay on cross-entropy.

  Args:
    token_features: (N, L, D) float, ideally standardised (see `standardize_tokens`).
    labels: (N,) ints in [0, num_classes).
    num_classes: C, the number of outputs.
    num_heads: attention heads; must divide D.
    num_steps: optimizer steps.
    batch_size: examples per step (capped at N).
    learning_rate: peak learning rate, decayed to 0 by a cosine over `num_steps`.
    weight_decay: decoupled weight decay on the kernels.
    seed: seeds the initialization and the minibatch order; equal inputs give equal params.

  Returns:
    The probe's params (a pytree of numpy arrays), for `attentive_probe_predict`.
  """
  token_features = _check_tokens(token_features)
  labels = np.asarray(labels)
  if labels.shape != token_features.shape[:1]:
    raise ValueError(
        f'labels must be ({len(token_features)},), one per example; got {labels.shape}.')
  if not len(labels):
    raise ValueError('No training examples: token_features is empty.')
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(
        f'labels must lie in [0, {num_classes}); got [{labels.min()}, {labels.max()}].'
        ' Pass the number of classes of the dataset as num_classes.')
  if num_steps <= 0 or batch_size <= 0 or learning_rate <= 0 or weight_decay < 0:
    raise ValueError(
        f'Need num_steps, batch_size, learning_rate > 0 and weight_decay >= 0; got '
        f'num_steps={num_steps}, batch_size={batch_size}, learning_rate={learning_rate}, '
        f'weight_decay={weight_decay}.')
  if token_features.shape[-1] % num_heads:
    raise ValueError(f'num_heads={num_heads} must divide the feature width '
                     f'{token_features.shape[-1]}; pick a divisor.')
  batches = minibatch_indices(len(labels), batch_size, num_steps, seed)
  params = _fit(token_features, labels.astype(np.int32), batches, jax.random.key(seed),
                np.float32(learning_rate), np.float32(weight_decay),
                num_classes=num_classes, num_heads=num_heads, num_steps=num_steps)
  params = jax.tree.map(np.asarray, params)
  if not all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params)):
    raise FloatingPointError(
        'The attentive probe diverged (non-finite params). Standardise the features, or '
        'lower learning_rate.')
  return params


@functools.partial(jax.jit, static_argnames=('num_classes', 'num_heads'))
def _logits(params, token_features, *, num_classes, num_heads):
  return AttentiveProbe(num_classes, num_heads).apply({'params': params}, token_features)


def attentive_probe_logits(params, token_features, num_heads: int,
                           batch_size: int = 1024) -> np.ndarray:
  """Logits (N, C) of the fitted probe, `batch_size` examples at a time (bounded memory)."""
  token_features = _check_tokens(token_features)
  num_classes = params['classifier']['bias'].shape[0]
  logits = [np.asarray(_logits(params, token_features[start:start + batch_size],
                               num_classes=num_classes, num_heads=num_heads))
            for start in range(0, len(token_features), batch_size)]
  return np.concatenate(logits) if logits else np.zeros((0, num_classes), np.float32)


def attentive_probe_predict(params, token_features, num_heads: int) -> np.ndarray:
  """The top-1 class (N,) of each example under the fitted probe."""
  return attentive_probe_logits(params, token_features, num_heads).argmax(axis=1)


class AttentiveProbeEvaluator(FrozenFeatureEvaluator):
  """`FrozenFeatureEvaluator` whose features are (N, L, D) tokens, not pooled (N, D)."""

  config_keys = feature_eval_keys(
      'attentive_probe', 'one learned query over the frozen tokens, then a linear layer',
      # AIM's paper averages the last 6 of its deep trunks; the tiny test models have 2.
      num_last_blocks=schema.Key(2, schema.COUNT, 'the last blocks averaged into the features'),
      num_heads=schema.Key(4, schema.COUNT, "the probe's heads; must divide the encoder width"),
      num_steps=schema.Key(300, schema.COUNT, 'AdamW steps of the probe'),
      probe_batch_size=schema.Key(256, schema.COUNT,
                                  'examples per probe step (capped at train_examples)'),
      learning_rate=schema.Key(1e-3, schema.above(0), 'the peak; cosine-decayed to 0'),
      weight_decay=schema.Key(1e-4, schema.at_least(0), "the probe's AdamW weight decay"),
  )

  def __init__(self, *args):
    super().__init__(*args)
    config = self.eval_config
    encoder = self.objective.model.encoder  # the bounds below depend on the model
    if not 1 <= config.num_last_blocks <= encoder.depth:
      raise ValueError(
          f'{self.culprit("num_last_blocks")}={config.num_last_blocks} must lie in '
          f'[1, {encoder.depth}], the encoder depth of config.model.variant='
          f'{self.stage_config.model.variant!r}: lower it.')
    if config.num_heads <= 0 or encoder.width % config.num_heads:
      raise ValueError(
          f'{self.culprit("num_heads")}={config.num_heads} must divide the encoder width '
          f'{encoder.width}: pick a divisor.')

  def encode_images(self, params, images):
    outputs = self.objective.encode(params, images,
                                    num_last_blocks=self.eval_config.num_last_blocks)
    return outputs['last_blocks_mean'].astype(jnp.float32)

  def run(self, params, step):
    data = self.features(params)
    train, test = standardize_tokens(data.train_features, data.test_features)
    config = self.eval_config
    probe = fit_attentive_probe(
        train, data.train_labels, data.num_classes, num_heads=config.num_heads,
        num_steps=config.num_steps, batch_size=config.probe_batch_size,
        learning_rate=config.learning_rate, weight_decay=config.weight_decay)
    predict = functools.partial(attentive_probe_predict, probe, num_heads=config.num_heads)
    return EvalResult(scalars={
        'accuracy': float(np.mean(predict(test) == data.test_labels)),
        'train_accuracy': float(np.mean(predict(train) == data.train_labels)),
        'chance': data.chance,
    })
