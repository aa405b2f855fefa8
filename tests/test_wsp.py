"""The WSP loss facts of docs/methods.md, section 3."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from big_pretrain.objectives.wsp import soft_target_cross_entropy


def _logits(batch=6, vocabulary=9, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, vocabulary)) * 3


def test_one_hot_target_equals_standard_cross_entropy():
  logits = _logits()
  labels = jnp.array([0, 3, 8, 2, 2, 5])
  label_ids = jnp.full((6, 4), -1).at[:, 0].set(labels)  # one label, padded
  per_example, has_label = soft_target_cross_entropy(logits, label_ids)
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  np.testing.assert_allclose(per_example, expected, rtol=1e-6)
  assert has_label.all()


def test_k_hot_equals_ce_against_normalized_multi_hot_and_gradient_is_softmax_minus_y_over_k():
  logits = _logits()
  label_ids = jnp.array([[1, 4, 7, -1], [0, -1, -1, -1], [2, 3, 5, 8],
                         [6, 7, -1, -1], [0, 8, -1, -1], [3, 4, 5, -1]])
  multi_hot = np.zeros((6, 9), np.float32)
  for row, ids in enumerate(np.asarray(label_ids)):
    multi_hot[row, ids[ids >= 0]] = 1
  targets = multi_hot / multi_hot.sum(-1, keepdims=True)

  per_example, _ = soft_target_cross_entropy(logits, label_ids)
  np.testing.assert_allclose(per_example, optax.softmax_cross_entropy(logits, targets), rtol=1e-6)

  grad = jax.grad(lambda z: soft_target_cross_entropy(z, label_ids)[0].sum())(logits)
  np.testing.assert_allclose(grad, jax.nn.softmax(logits) - targets, atol=1e-6)


def test_examples_without_labels_are_left_out_and_flagged():
  logits = _logits()
  label_ids = jnp.array([[1, -1], [-1, -1], [2, 3], [-1, -1], [0, -1], [5, -1]])
  per_example, has_label = soft_target_cross_entropy(logits, label_ids)
  np.testing.assert_array_equal(has_label, [True, False, True, False, True, True])
  np.testing.assert_array_equal(per_example[~np.asarray(has_label)], 0.0)
  # No gradient flows from unlabelled rows.
  grad = jax.grad(lambda z: soft_target_cross_entropy(z, label_ids)[0].sum())(logits)
  np.testing.assert_array_equal(grad[1], 0.0)
  np.testing.assert_array_equal(grad[3], 0.0)


def test_padding_width_does_not_matter():
  logits = _logits()
  narrow = jnp.array([[1, 4]] * 6)
  wide = jnp.concatenate([narrow, jnp.full((6, 5), -1)], axis=1)
  np.testing.assert_allclose(soft_target_cross_entropy(logits, narrow)[0],
                             soft_target_cross_entropy(logits, wide)[0], rtol=1e-7)


def test_stable_for_large_logits():
  logits = jnp.array([[1e4, -1e4, 0.0]])
  per_example, _ = soft_target_cross_entropy(logits, jnp.array([[1, -1]]))
  assert np.isfinite(per_example).all() and float(per_example[0]) == 2e4


def test_wsp_config_without_a_vocabulary_is_refused_before_compute(tmp_path):
  import pytest
  from big_pretrain.stages.chain_validation import validate_config
  from big_pretrain.errors import ConfigError
  from configs import wsp
  config = wsp.get_config('demo')
  config.data.labels.vocabulary = None
  with pytest.raises(ConfigError, match=r'labels\.vocabulary is not set.*build_vocabulary labels'):
    validate_config(config)
  config.data.labels.vocabulary = str(tmp_path)  # a folder, not a file
  with pytest.raises(ConfigError, match=r'is not a file'):
    validate_config(config)
