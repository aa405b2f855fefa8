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


class Objective(abc.ABC):
  """Base class; subclasses set `name` and implement `init_params` and `loss`."""

  name: str = ''

  def __init__(self, config):
    self.config = config  # The full stage config (read-only by convention).

  @classmethod
  def check_config(cls, config, path: str) -> None:
    """Objective-specific config checks, run before any compute (raise ConfigError)."""

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

  def encode(self, params, images: jax.Array) -> dict:
    """Frozen-feature view for evaluators: the unmasked encoder on uint8 images.

    Returns the ViT's dict: 'pooled' (B, D), 'patch_tokens' (B, L, D), 'tokens'.
    Every objective keeps its ViT under params['encoder'] and as `self.model.encoder`.
    """
    return self.model.encoder.apply(
        {'params': params['encoder']}, normalize_images(images))
