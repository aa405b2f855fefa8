"""AdamW with linear warmup + cosine decay and optional global-norm clipping (optax)."""

from __future__ import annotations

import jax
import optax


def peak_learning_rate(optim_config, global_batch_size: int) -> float:
  """The linear scaling rule of MAE/FLIP: lr = lr_per_256 * batch / 256."""
  return optim_config.lr_per_256 * global_batch_size / 256


def make_schedule(optim_config, global_batch_size: int, total_steps: int) -> optax.Schedule:
  peak = peak_learning_rate(optim_config, global_batch_size)
  warmup = min(optim_config.warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=optim_config.end_lr_fraction * peak)


def weight_decay_mask(params):
  """Decay matrices and tokens, not biases or norm scales (the MAE reference's rule: ndim > 1)."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def make_optimizer(optim_config, schedule: optax.Schedule) -> optax.GradientTransformation:
  if optim_config.name != 'adamw':
    raise ValueError(f"config.optim.name={optim_config.name!r}: only 'adamw' is implemented.")
  adamw = optax.adamw(
      schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
      weight_decay=optim_config.weight_decay, mask=weight_decay_mask)
  tx = adamw
  if optim_config.clip_grad_norm:
    tx = optax.chain(optax.clip_by_global_norm(optim_config.clip_grad_norm), tx)
  skip = optim_config.get('skip_nonfinite_updates', 0)
  if not isinstance(skip, int) or skip < 0:
    raise ValueError(f'config.optim.skip_nonfinite_updates={skip!r} must be an integer >= 0: '
                     'how many NaN/Inf updates in a row may be skipped (0: stop at the first).')
  if skip:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=skip)
  return tx
