"""Attentive probe: order-invariant, finds the one informative token, at chance on
noise, and runs end to end."""

import jax
import numpy as np
import pytest

from big_pretrain.evaluators import build_evaluators
from big_pretrain.evaluators.attentive_probe import (
    attentive_probe_logits, attentive_probe_predict, fit_attentive_probe, standardize_tokens)
from big_pretrain.evaluators.linear_probe import classify, fit_linear_classifier, standardize
from helpers.numerics import assert_close_in_scale
from helpers.tiny_config import tiny_mae_with_evaluator_on_eight_devices

NUM_HEADS = 4
# One setting for every synthetic fit, so the probe's jitted fit compiles once per shape.
FIT = dict(num_heads=NUM_HEADS, num_steps=300, batch_size=128, learning_rate=3e-3,
           weight_decay=1e-4, seed=0)


def one_informative_token(rng, num_examples, prototypes, num_tokens, marker):
  """Tokens (N, L, D): pure noise, except one token per example at a random position.

  That token is marker + its class's prototype + a little noise. The shared
  marker lets one query find it whatever the class; the mean over the tokens
  dilutes its class signal L-fold under the noise of the other L - 1 tokens.
  """
  num_classes, dim = prototypes.shape
  labels = rng.integers(num_classes, size=num_examples)
  tokens = rng.normal(size=(num_examples, num_tokens, dim)).astype(np.float32)
  positions = rng.integers(num_tokens, size=num_examples)
  tokens[np.arange(num_examples), positions] = (
      marker + prototypes[labels] + 0.5 * rng.normal(size=(num_examples, dim)))
  return tokens, labels


@pytest.fixture(scope='module')
def one_token_task():
  rng = np.random.default_rng(0)
  num_classes, num_tokens, dim = 8, 32, 16
  prototypes = 2.0 * rng.normal(size=(num_classes, dim))
  marker = np.zeros(dim)
  marker[0] = 4.0
  train, train_labels = one_informative_token(rng, 1000, prototypes, num_tokens, marker)
  test, test_labels = one_informative_token(rng, 500, prototypes, num_tokens, marker)
  train, test = standardize_tokens(train, test)
  params = fit_attentive_probe(train, train_labels, num_classes, **FIT)
  return dict(train=train, train_labels=train_labels, test=test, test_labels=test_labels,
              num_classes=num_classes, params=params)


def test_probe_finds_the_one_informative_token_where_mean_pooling_fails(one_token_task):
  task = one_token_task
  accuracy = np.mean(attentive_probe_predict(task['params'], task['test'], NUM_HEADS)
                     == task['test_labels'])
  # The same classifier family on mean-pooled tokens: one linear layer, no attention.
  train_mean, test_mean = standardize(task['train'].mean(axis=1), task['test'].mean(axis=1))
  weights, bias = fit_linear_classifier(train_mean, task['train_labels'], task['num_classes'],
                                        l2=1e-4, num_steps=200)
  mean_accuracy = np.mean(classify(test_mean, weights, bias) == task['test_labels'])
  # Measured ~1.0 against ~0.45-0.51 over six data seeds (chance 0.125).
  assert accuracy >= 0.9
  assert mean_accuracy <= 0.7


def test_probe_is_invariant_to_token_order(one_token_task):
  task = one_token_task
  rng = np.random.default_rng(1)
  tokens = task['test'][:200]
  # A different random permutation of the tokens of every example.
  order = np.argsort(rng.random(tokens.shape[:2]), axis=1)
  permuted = np.take_along_axis(tokens, order[..., None], axis=1)
  assert not np.allclose(permuted, tokens)
  logits = attentive_probe_logits(task['params'], tokens, NUM_HEADS)
  # Permuted tokens reorder the pooling's sums only.
  assert_close_in_scale(attentive_probe_logits(task['params'], permuted, NUM_HEADS), logits)
  np.testing.assert_array_equal(attentive_probe_predict(task['params'], permuted, NUM_HEADS),
                                logits.argmax(axis=1))


def test_fit_is_deterministic(one_token_task):
  task = one_token_task
  again = fit_attentive_probe(task['train'], task['train_labels'], task['num_classes'], **FIT)
  jax.tree.map(np.testing.assert_array_equal, again, task['params'])


def test_probe_is_at_chance_on_random_labels():
  rng = np.random.default_rng(2)
  tokens = rng.normal(size=(2000, 8, 16)).astype(np.float32)
  labels = rng.integers(10, size=2000)
  train, test = standardize_tokens(tokens[:1000], tokens[1000:])
  params = fit_attentive_probe(train, labels[:1000], 10, **FIT)
  accuracy = np.mean(attentive_probe_predict(params, test, NUM_HEADS) == labels[1000:])
  # Test labels are independent of everything the probe saw, so whatever it predicts,
  # its hits are Binomial(1000, 0.1): std sqrt(0.1 * 0.9 / 1000) ~ 0.0095, and 0.05 is
  # a ~5-sigma margin.
  assert abs(accuracy - 0.1) < 0.05


def test_fit_rejects_bad_inputs():
  tokens = np.zeros((4, 3, 8), np.float32)
  kwargs = dict(FIT, num_steps=2)
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 3\).*num_classes'):
    fit_attentive_probe(tokens, np.array([0, 1, 2, 3]), 3, **kwargs)
  with pytest.raises(ValueError, match=r'num_heads=3 must divide the feature width 8'):
    fit_attentive_probe(tokens, np.array([0, 1, 2, 0]), 3, **dict(kwargs, num_heads=3))
  with pytest.raises(ValueError, match=r'token_features must be \(N, L, D\)'):
    fit_attentive_probe(tokens[:, 0], np.array([0, 1, 2, 0]), 3, **kwargs)


# --- End to end on the embedded data ------------------------------------------

@pytest.fixture(scope='module')
def tiny_mae_on_eight_devices():
  return tiny_mae_with_evaluator_on_eight_devices(
      'attentive_probe', train_examples=128, test_examples=64, batch_size=64,
      num_steps=20, probe_batch_size=64)


@pytest.mark.integration
def test_evaluator_runs_end_to_end_on_eight_devices(tiny_mae_on_eight_devices):
  config, objective, trainer = tiny_mae_on_eight_devices
  params = trainer.init_state(jax.random.key(config.seed)).params
  (evaluator,) = build_evaluators(config, objective, trainer, workdir='unused')
  scalars = evaluator.run(params, step=0).scalars
  assert set(scalars) == {'accuracy', 'train_accuracy', 'chance'}
  assert all(0.0 <= value <= 1.0 for value in scalars.values())
  # The probe sees every patch token of the 'mu/8' encoder: 16 patches of width 64.
  features = evaluator.features(params)
  assert features.train_features.shape == (128, 16, 64)
  assert features.test_features.shape == (64, 16, 64)


@pytest.mark.integration
def test_more_blocks_than_the_encoder_has_is_named(tiny_mae_on_eight_devices):
  config, objective, trainer = tiny_mae_on_eight_devices
  config = config.copy_and_resolve_references()
  config.evals.attentive_probe.num_last_blocks = 3  # The 'mu' encoder has 2 blocks.
  expected = r'config\.evals\.attentive_probe\.num_last_blocks=3 must lie in \[1, 2\]'
  with pytest.raises(ValueError, match=expected):
    build_evaluators(config, objective, trainer, workdir='unused')
