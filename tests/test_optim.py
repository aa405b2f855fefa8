"""AdamW, warmup + cosine, clipping and the weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from big_pretrain.train.optim import (make_optimizer, make_schedule, peak_learning_rate,
                                      weight_decay_mask)
from big_pretrain.train.optim import OPTIM_KEYS


def test_peak_lr_follows_the_linear_scaling_rule():
  config = OPTIM_KEYS.defaults()
  config.lr_per_256 = 1.5e-4
  assert peak_learning_rate(config, 4096) == pytest.approx(2.4e-3)


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_end_fraction():
  config = OPTIM_KEYS.defaults()
  config.update(lr_per_256=1.0, warmup_steps=10, end_lr_fraction=0.1)
  schedule = make_schedule(config, 256, total_steps=110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  # Half-way through the cosine: the mean of peak and end.
  assert float(schedule(60)) == pytest.approx(0.55, abs=1e-6)
  assert float(schedule(110)) == pytest.approx(0.1)


def test_biases_and_norms_are_not_decayed():
  params = {'dense': {'kernel': jnp.ones((3, 4)), 'bias': jnp.ones((4,))},
            'norm': {'scale': jnp.ones((4,))}, 'cls_token': jnp.ones((1, 1, 4))}
  mask = weight_decay_mask(params)
  assert mask == {'dense': {'kernel': True, 'bias': False}, 'norm': {'scale': False},
                  'cls_token': True}
  config = OPTIM_KEYS.defaults()
  config.update(lr_per_256=1.0, warmup_steps=0, weight_decay=0.5)
  tx = make_optimizer(config, optax.constant_schedule(1.0))
  zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  # With zero gradients only weight decay moves parameters.
  np.testing.assert_allclose(updates['dense']['kernel'], -0.5)
  np.testing.assert_allclose(updates['dense']['bias'], 0.0)
  np.testing.assert_allclose(updates['norm']['scale'], 0.0)


def test_gradient_clipping_bounds_the_global_norm():
  config = OPTIM_KEYS.defaults()
  # eps=1 makes Adam's step depend on the gradient's magnitude, so clipping shows.
  config.update(weight_decay=0.0, clip_grad_norm=1.0, b1=0.0, eps=1.0)
  params = {'w': jnp.zeros((4,))}
  huge = {'w': jnp.array([300.0, 400.0, 0.0, 0.0])}
  clipped_tx = make_optimizer(config, optax.constant_schedule(1.0))
  config.clip_grad_norm = None
  plain_tx = make_optimizer(config, optax.constant_schedule(1.0))
  # The clipped step equals the plain step on the gradient rescaled to norm 1,
  # and differs from the plain step on the huge gradient.
  clipped, _ = clipped_tx.update(huge, clipped_tx.init(params), params)
  rescaled, _ = plain_tx.update({'w': huge['w'] / 500.0}, plain_tx.init(params), params)
  unclipped, _ = plain_tx.update(huge, plain_tx.init(params), params)
  np.testing.assert_allclose(clipped['w'], rescaled['w'], rtol=1e-6)
  assert abs(float(unclipped['w'][0])) > 2 * abs(float(clipped['w'][0]))
