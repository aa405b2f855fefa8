"""What every objective provides to the one training loop.

An objective builds its model from the stage config and defines
`loss(params, batch, rng, train) -> (loss, metrics)`. The loop, the step,
sharding, checkpoints and logging know nothing else about it.
"""

from __future__ import annotations

import abc

import jax
import jax.numpy as jnp

from big_pretrain.models.patches import normalize_images
from big_pretrain.models.vit import SCAN_AUTO, parse_variant, scan_layers, stacked_block_outputs


class Objective(abc.ABC):
  """Base class; subclasses set `name` and implement `init_params` and `loss`."""

  name: str = ''

  def __init__(self, config):
    self.config = config  # The full stage config (read-only by convention).

  @classmethod
  def check_config(cls, config, path: str) -> None:
    """Objective-specific config checks, run before any compute (raise ConfigError)."""

  @classmethod
  def resolve_config(cls, config):
    """The stage config with values derived from the data and the model filled in, once per
    stage (the loop records the result in config.json): here model.scan='auto' becomes
    the layout chosen for the encoder's depth, which the checkpoints hold."""
    if config.model.scan != SCAN_AUTO:
      return config
    config = config.copy_and_resolve_references()
    with config.ignore_type():  # resolved, the field holds a str ('auto'); it becomes a bool
      config.model.scan = scan_layers(SCAN_AUTO, parse_variant(config.model.variant).depth)
    return config

  @property
  def image_shape(self) -> tuple[int, int, int]:
    size = self.config.data.image_size
    return (size, size, 3)

  def dummy_images(self, batch_size: int = 1) -> jax.Array:
    return jnp.zeros((batch_size, *self.image_shape), jnp.float32)

  @abc.abstractmethod
  def init_params(self, rng: jax.Array):
    """Fresh parameters, with logical-axis metadata (boxed), for one example shape."""

  @abc.abstractmethod
  def loss(self, params, batch: dict, rng: jax.Array, train: bool = True):
    """Returns (scalar loss, dict of scalar metrics)."""

  def is_trainable(self, path: str) -> bool:
    """Whether the parameter at `path` ('encoder/transformer/block_0/mlp/fc1/kernel') trains.

    Frozen ones get no gradient and no optimiser state (train/optim.py).
    """
    del path
    return True

  def encode(self, params, images: jax.Array, num_last_blocks: int = 0) -> dict:
    """Frozen-feature view for evaluators: the unmasked encoder on uint8 images.

    Returns the ViT's dict: 'pooled' (B, D), 'patch_tokens' (B, L, D), 'tokens';
    with `num_last_blocks` = k > 0 also 'last_blocks_mean' (B, L, D), the mean
    of the last k blocks' patch-token outputs (AIM's attentive-probe features).
    Every objective keeps its ViT under params['encoder'] and as `self.model.encoder`.
    """
    encoder = self.model.encoder
    if not num_last_blocks:
      return encoder.apply({'params': params['encoder']}, normalize_images(images))
    outputs, variables = encoder.apply(
        {'params': params['encoder']}, normalize_images(images), mutable=['intermediates'])
    blocks = stacked_block_outputs(variables['intermediates']['transformer'])
    if not 0 < num_last_blocks <= blocks.shape[0]:
      raise ValueError(f'num_last_blocks={num_last_blocks}: the encoder has {blocks.shape[0]}.')
    prefix = 1 if encoder.use_cls_token else 0
    outputs['last_blocks_mean'] = blocks[-num_last_blocks:, :, prefix:].mean(axis=0)
    return outputs
