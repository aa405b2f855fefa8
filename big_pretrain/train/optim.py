"""The optimizer: AdamW with linear warmup + cosine decay (optax), and what fine-tuning adds.

- Gradient clipping by global norm; skipping a few NaN/Inf updates.
- Layer-wise learning-rate decay (`optim.layer_decay`, MAE/BEiT fine-tuning):
  the update of a parameter at layer l is scaled by decay^(L - l), L = depth + 1,
  with the patch embedding, cls token and position embedding at layer 0,
  block i at layer i + 1 and everything after the blocks (final norm, head) at L.
  A scanned stack's leaves carry the layer on their leading axis: each row gets
  its own scale. Scaling the whole AdamW update scales its weight decay alike,
  as a per-group lr does in PyTorch.
- Frozen parameters (`frozen_where_untrainable`): no optimizer state, no update.
- An exponential moving average of the parameters (`optim.ema_decay`), kept in
  the optimizer state so checkpoints and resumes carry it.
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from big_pretrain import schema
from big_pretrain.models.vit import encoder_depth, encoder_layer

# config.optim: AdamW and what it is scheduled and wrapped with.
OPTIM_KEYS = schema.Group(
    'the optimizer: AdamW, linear warmup then cosine decay',
    name=schema.Key('adamw', schema.one_of('adamw'), 'the optimizer'),
    # 0 trains nothing; below it, the loss would ascend.
    lr_per_256=schema.Key(1.5e-4, schema.at_least(0),
                          'the peak learning rate is lr_per_256 * batch_size / 256'),
    b1=schema.Key(0.9, schema.UNIT_FRACTION, "Adam's first-moment decay"),
    b2=schema.Key(0.95, schema.UNIT_FRACTION, "Adam's second-moment decay"),
    eps=schema.Key(1e-8, schema.above(0), "Adam's epsilon"),
    weight_decay=schema.Key(0.05, schema.at_least(0), "AdamW's decoupled weight decay"),
    warmup_steps=schema.Key(1000, schema.NON_NEGATIVE_COUNT, 'steps of linear warmup'),
    end_lr_fraction=schema.Key(0.0, schema.within(0, 1),
                               'the learning rate at the last step, over the peak'),
    clip_grad_norm=schema.Key(None, schema.above(0, or_none=True),
                              'clip the gradient to this global norm; None: no clipping',
                              type=float),
    skip_nonfinite_updates=schema.Key(
        0, schema.NON_NEGATIVE_COUNT,
        'a NaN/Inf gradient stops the run (0), or up to this many in a row are skipped (the '
        'parameters left as they were) before it does'),
    no_weight_decay=schema.Key(
        (), schema.texts(),
        "regexes of parameter paths never decayed, beside biases and norms (fine-tuning: "
        "('cls_token', 'pos_embedding'), as MAE's no_weight_decay list)"),
    layer_decay=schema.Key(
        None, schema.within(0, 1, low_open=True, or_none=True),
        'layer-wise lr decay (MAE fine-tuning: 0.65 B, 0.75 L/H): the update at encoder layer '
        'l is scaled by layer_decay^(depth + 1 - l); None: off', type=float),
    ema_decay=schema.Key(
        None, schema.within(0, 1, low_open=True, high_open=True, or_none=True),
        'a moving average of the parameters kept beside them (e.g. 0.9999), scored by '
        'evaluators with also_ema; None: off', type=float),
)


def param_path(path) -> str:
  """A jax key path -> 'encoder/transformer/block_0/mlp/fc1/kernel'."""
  return '/'.join(str(getattr(key, 'key', getattr(key, 'name', key))) for key in path)


def peak_learning_rate(optim_config, global_batch_size: int) -> float:
  """The linear scaling rule of MAE/FLIP: lr = lr_per_256 * batch / 256."""
  return optim_config.lr_per_256 * global_batch_size / 256


def make_schedule(optim_config, global_batch_size: int, total_steps: int) -> optax.Schedule:
  peak = peak_learning_rate(optim_config, global_batch_size)
  warmup = min(optim_config.warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=optim_config.end_lr_fraction * peak)


def weight_decay_mask(params, exclude: tuple[str, ...] = ()):
  """Decay matrices and tokens, not biases or norm scales (the MAE reference's rule: ndim > 1),
  nor parameters whose path matches a regex of `exclude` (fine-tuning: 'cls_token', 'pos_embedding')."""
  patterns = [re.compile(pattern) for pattern in exclude]
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim > 1 and not any(pt.search(param_path(path)) for pt in patterns),
      params)


def layer_decay_scale(path: str, shape: tuple[int, ...], decay: float, depth: int):
  """decay^(L - layer) for the parameter at `path` (L = depth + 1): a float, or for a
  scanned stack's leaf an array (depth, 1, ...) with one scale per layer row."""
  layer = encoder_layer(path, depth)
  if layer is not None:
    return float(decay ** (depth + 1 - layer))
  rows = np.array([decay ** (depth - i) for i in range(shape[0])], np.float32)
  return rows.reshape((shape[0],) + (1,) * (len(shape) - 1))


def tree_encoder_depth(tree) -> int:
  """The number of blocks of the encoder in a parameter (or update) tree."""
  return encoder_depth((param_path(path), leaf.shape)
                       for path, leaf in jax.tree_util.tree_leaves_with_path(tree))


def scale_by_layer_decay(decay: float) -> optax.GradientTransformation:
  """Multiplies each update by its parameter's layer_decay_scale (stateless)."""

  def update(updates, state, params=None):
    del params
    depth = tree_encoder_depth(updates)
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, u: u * jnp.asarray(layer_decay_scale(param_path(path), u.shape, decay,
                                                          depth), u.dtype),
        updates)
    return scaled, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class EmaParamsState(NamedTuple):
  """The moving average of the parameters (same tree and shardings as the parameters)."""
  ema: Any


def track_params_ema(decay: float) -> optax.GradientTransformation:
  """Keeps ema <- decay * ema + (1 - decay) * (params + updates); updates pass unchanged.

  Last in the chain, so `params + updates` are the new parameters.
  """

  def init(params):
    return EmaParamsState(ema=jax.tree_util.tree_map(jnp.copy, params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('track_params_ema needs the parameters: call tx.update(grads, state, params).')
    ema = jax.tree_util.tree_map(
        lambda average, p, u: (decay * average + (1 - decay) * (p + u)).astype(average.dtype),
        state.ema, params, updates)
    return updates, EmaParamsState(ema)

  return optax.GradientTransformation(init, update)


def find_state(opt_state, state_type):
  """The first `state_type` instance in an optimizer state tree (chains, masks), or None."""
  found = [node for node in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda node: isinstance(node, state_type))
           if isinstance(node, state_type)]
  return found[0] if found else None


def ema_params(opt_state, params):
  """The parameters' moving average kept by `optim.ema_decay` (frozen ones: `params`'
  own, which never move), or None without one."""
  state = find_state(opt_state, EmaParamsState)
  if state is None:
    return None
  return jax.tree_util.tree_map(
      lambda p, average: p if isinstance(average, optax.MaskedNode) else average,
      params, state.ema)


def make_optimizer(optim_config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW per `config.optim`, with what its other keys ask for (see the module doc)."""
  exclude = tuple(optim_config.no_weight_decay)
  adamw = optax.adamw(
      schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
      weight_decay=optim_config.weight_decay,
      mask=lambda params: weight_decay_mask(params, exclude))
  parts = [adamw]
  if optim_config.clip_grad_norm:
    parts.insert(0, optax.clip_by_global_norm(optim_config.clip_grad_norm))
  if optim_config.layer_decay is not None:
    parts.append(scale_by_layer_decay(optim_config.layer_decay))
  if optim_config.ema_decay is not None:
    parts.append(track_params_ema(optim_config.ema_decay))
  tx = parts[0] if len(parts) == 1 else optax.chain(*parts)
  skip = optim_config.skip_nonfinite_updates
  if skip:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=skip)
  return tx


def frozen_where_untrainable(tx: optax.GradientTransformation,
                             is_trainable: Callable[[str], bool]) -> optax.GradientTransformation:
  """`tx` on the parameters whose path `is_trainable`; the others get zero updates and no
  state (optax.multi_transform keeps no moments for them)."""

  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: 'train' if is_trainable(param_path(path)) else 'frozen', params)

  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)
