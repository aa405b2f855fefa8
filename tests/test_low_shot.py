"""Low-shot linear probes: k per class drawn exactly and repeatably, scored honestly."""

import itertools

import jax
import ml_collections
import numpy as np
import pytest

from big_pretrain.config.validation import validate_stage_config
from big_pretrain.errors import ConfigError
from big_pretrain.evaluators import build_evaluators
from big_pretrain.evaluators.linear_probe import classify, fit_linear_classifier, standardize
from big_pretrain.evaluators.low_shot import (
    check_pool_has_shots, low_shot_accuracies, select_k_per_class, summarize_accuracies)
from helpers.probe_data import gaussian_blobs
from helpers.tiny_config import tiny_mae_config, tiny_mae_with_evaluator_on_eight_devices

NUM_CLASSES = 10


def unbalanced_labels(rng):
  """Shuffled labels: 10 examples of class 0, 15 of class 1, ..., 55 of class 9."""
  return rng.permutation(np.repeat(np.arange(NUM_CLASSES), 10 + 5 * np.arange(NUM_CLASSES)))


# --- Selection ----------------------------------------------------------------

def test_selection_takes_exactly_k_of_each_class_without_repeats():
  labels = unbalanced_labels(np.random.default_rng(0))
  for k, seed in itertools.product((1, 5, 10), range(3)):
    chosen = select_k_per_class(labels, k, seed)
    assert len(np.unique(chosen)) == len(chosen) == k * NUM_CLASSES, (k, seed)
    np.testing.assert_array_equal(np.bincount(labels[chosen], minlength=NUM_CLASSES),
                                  np.full(NUM_CLASSES, k))


def test_selection_is_repeatable_differs_between_seeds_and_nests_over_k():
  labels = unbalanced_labels(np.random.default_rng(1))
  draws = [select_k_per_class(labels, 5, seed) for seed in range(3)]
  for seed, chosen in enumerate(draws):
    np.testing.assert_array_equal(select_k_per_class(labels, 5, seed), chosen)
    # A smaller k of the same draw keeps a subset of its examples.
    assert set(select_k_per_class(labels, 1, seed)) <= set(chosen)
  for first, second in itertools.combinations(draws, 2):
    assert set(first) != set(second)


def test_selection_is_uniform_within_each_class():
  labels = np.array([0] * 4 + [1] * 6)
  picked = np.zeros(len(labels))
  num_draws = 3000
  for seed in range(num_draws):
    picked[select_k_per_class(labels, 2, seed)] += 1
  # 2 of 4: each picked half the time; 2 of 6: a third. Std <= sqrt(0.25 / 3000) ~ 0.009.
  expected = np.array([2 / 4] * 4 + [2 / 6] * 6)
  np.testing.assert_allclose(picked / num_draws, expected, atol=0.04)


def test_selection_refuses_a_class_with_fewer_than_k():
  labels = np.array([0, 0, 0, 1, 2, 2, 2])
  with pytest.raises(ValueError, match=r'class 1 has 1 examples, fewer than k=3'):
    select_k_per_class(labels, 3, seed=0)
  with pytest.raises(ValueError, match=r'class 3 has 0 examples, fewer than k=1'):
    select_k_per_class(labels, 1, seed=0, num_classes=4)  # Class 3 is absent.


def test_short_pool_error_names_the_classes_and_the_fix():
  labels = np.array([0] * 6 + [1] * 2 + [2] * 6)  # No 'dog' at all.
  names = ['cat', 'bird', 'fish', 'dog']
  expected = (r"config\.evals\.low_shot: 5-shot .* 2 of the 4 classes have fewer: 'bird' has 2, "
              r"'dog' has 0\. Raise config\.evals\.low_shot\.train_examples \(to about 100 .*"
              r'or drop 5 from config\.evals\.low_shot\.shots')
  with pytest.raises(ValueError, match=expected):
    check_pool_has_shots(labels, 5, names, 'config.evals.low_shot')
  check_pool_has_shots(labels, 2, names[:3], 'config.evals.low_shot')  # Enough: no error.


# --- Fitting and scoring on synthetic features --------------------------------

SHOTS = (1, 5, 25)


@pytest.fixture(scope='module')
def noisy_blobs():
  """Ten overlapping Gaussian blobs: one example per class is a poor guide, 25 a good one."""
  rng = np.random.default_rng(2)
  # 64 dimensions and 1 and 5 shots, as the end-to-end test: the fits compile once.
  centres = 0.6 * rng.normal(size=(NUM_CLASSES, 64))
  pool, pool_labels = gaussian_blobs(rng, 600, centres)
  test, test_labels = gaussian_blobs(rng, 500, centres)
  accuracies = low_shot_accuracies(pool, pool_labels, test, test_labels,
                                   num_classes=NUM_CLASSES, shots=SHOTS, seeds=3, l2=1e-4,
                                   num_steps=100)
  return (pool, pool_labels, test, test_labels), accuracies


def test_accuracy_is_high_and_rises_with_k(noisy_blobs):
  _, accuracies = noisy_blobs
  means = [np.mean(accuracies[k]) for k in SHOTS]
  assert means[-1] >= 0.9, means
  assert means[0] < means[1] < means[2], means
  assert means[0] > 2 / NUM_CLASSES, means  # Even one example per class beats chance.


def test_each_draw_is_the_linear_probe_on_its_subset(noisy_blobs):
  (pool, pool_labels, test, test_labels), accuracies = noisy_blobs
  for seed in range(3):
    chosen = select_k_per_class(pool_labels, 5, seed)
    train, scored = standardize(pool[chosen], test)
    weights, bias = fit_linear_classifier(train, pool_labels[chosen], NUM_CLASSES, l2=1e-4,
                                          num_steps=100)
    assert accuracies[5][seed] == np.mean(classify(scored, weights, bias) == test_labels)
  assert len(set(accuracies[1])) > 1  # Different draws, different 1-shot probes.


def test_summary_is_mean_population_std_min_max_over_draws(noisy_blobs):
  _, accuracies = noisy_blobs
  scalars = summarize_accuracies(accuracies)
  assert set(scalars) == {f'{k}shot/accuracy_{stat}' for k in SHOTS
                          for stat in ('mean', 'std', 'min', 'max')}
  for k in SHOTS:
    values = np.array(accuracies[k])
    np.testing.assert_allclose(
        [scalars[f'{k}shot/accuracy_{stat}'] for stat in ('mean', 'std', 'min', 'max')],
        [values.mean(), values.std(ddof=0), values.min(), values.max()], rtol=1e-12)
  assert summarize_accuracies({5: [0.75]})['5shot/accuracy_std'] == 0.0  # One draw.


# --- Config -------------------------------------------------------------------

@pytest.mark.parametrize('overrides, expected', [
    (dict(shots=(0, 5)), r'low_shot\.shots=\(0, 5\): give a tuple of positive whole numbers'),
    (dict(shots=(1, 2.5)), r'low_shot\.shots=\(1, 2\.5\): give a tuple of positive whole'),
    (dict(shots=(5, 5)), r'low_shot\.shots=\(5, 5\) repeats a value'),
    (dict(shots=(5,), train_examples=4), r'low_shot\.shots=\(5,\): .* Raise .*train_examples'),
    (dict(seeds=0), r'low_shot\.seeds=0: give the number of draws per k'),
    (dict(shots=5), r'low_shot\.shots=5: expected a tuple'),
])
def test_bad_config_is_named_before_any_compute(overrides, expected):
  config = tiny_mae_config()
  config.evals.low_shot = ml_collections.ConfigDict(dict(kind='low_shot', **overrides))
  with pytest.raises(ConfigError, match=r'config\.evals\.' + expected):
    validate_stage_config(config)


# --- End to end on the embedded data ------------------------------------------

@pytest.fixture(scope='module')
def tiny_mae_on_eight_devices():
  config, objective, trainer = tiny_mae_with_evaluator_on_eight_devices(
      'low_shot', shots=(1, 5), seeds=2, train_examples=256, test_examples=128,
      batch_size=128, num_steps=50)
  params = trainer.init_state(jax.random.key(config.seed)).params
  return config, objective, trainer, params


@pytest.mark.integration
def test_evaluator_runs_end_to_end_and_repeats_its_draws(tiny_mae_on_eight_devices):
  config, objective, trainer, params = tiny_mae_on_eight_devices
  (evaluator,) = build_evaluators(config, objective, trainer, workdir='unused')
  scalars = evaluator.run(params, step=0).scalars
  assert set(scalars) == {f'{k}shot/accuracy_{stat}' for k in (1, 5)
                          for stat in ('mean', 'std', 'min', 'max')} | {'chance'}
  for k in (1, 5):
    assert 0.0 <= scalars[f'{k}shot/accuracy_min'] <= scalars[f'{k}shot/accuracy_mean'] \
        <= scalars[f'{k}shot/accuracy_max'] <= 1.0
  # The features once more, and the draws from scratch: the same numbers.
  data = evaluator.features(params)
  assert data.train_features.shape == (256, 64)
  accuracies = low_shot_accuracies(
      data.train_features, data.train_labels, data.test_features, data.test_labels,
      num_classes=data.num_classes, shots=(1, 5), seeds=2, l2=1e-4, num_steps=50)
  assert {**summarize_accuracies(accuracies), 'chance': data.chance} == scalars


@pytest.mark.integration
def test_evaluator_refuses_a_pool_too_small_for_its_shots(tiny_mae_on_eight_devices):
  config, objective, trainer, params = tiny_mae_on_eight_devices
  config = config.copy_and_resolve_references()
  config.evals.low_shot.update(train_examples=24, shots=(5,))  # ~2.4 images per class.
  validate_stage_config(config)  # Only the classes read can tell.
  (evaluator,) = build_evaluators(config, objective, trainer, workdir='unused')
  with pytest.raises(ValueError, match=r'config\.evals\.low_shot: 5-shot .* Raise '
                                       r'config\.evals\.low_shot\.train_examples'):
    evaluator.run(params, step=0)
