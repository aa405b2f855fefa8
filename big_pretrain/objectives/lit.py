"""LiT: a text tower taught to read a locked image tower (Zhai et al., 2022).

How MAWS gets zero-shot numbers for an encoder that never saw text (MAE,
WSP, AIM, fine-tuning): the image tower comes from an earlier stage
(`init_from`, taking 'encoder') and is locked; a fresh text tower, both
projection heads and the temperature learn FLIP's contrastive loss
(objectives/flip.py) on image-text data. The `zero_shot` and `retrieval`
evaluators then score the pair.

Locked means what fine-tuning's frozen layers mean, by the same mechanism:
`is_trainable` is False under params['encoder'], so the step holds the tower
out of the gradient (stop_gradient: XLA skips its backward, so the image
features are one forward per batch) and the optimizer keeps no state for it
and never moves it (train/optim.py `frozen_where_untrainable`: no moments,
no weight decay, no EMA copy).

The image embedding is the tower's own pooled feature (`config.model.pool`:
the cls token, or the mean of the patch tokens), as the linear and k-NN
probes read it, then the trained projection and an L2 normalization. So
`config.model` must describe the earlier stage's encoder (variant, cls
token, pool); the transfer checks every shape. Nothing is masked: a locked
tower is seen whole, as at evaluation (objective.mask_ratio stays 0).
"""

from __future__ import annotations

from big_pretrain import schema
from big_pretrain.errors import ConfigError
from big_pretrain.models.vit import ENCODER
from big_pretrain.objectives import flip

# config.objective for LiT: FLIP's text tower and loss, nothing masked.
CONFIG_KEYS = flip.CONFIG_KEYS.with_keys(
    'LiT: a text tower taught to read a locked image tower',
    name=schema.Key('lit', schema.REQUIRED_TEXT, 'the objective'),
    mask_ratio=schema.Key(0.0, schema.UNIT_FRACTION,
                          'must stay 0: a locked tower is seen whole, as at evaluation'),
)


class LiTModel(flip.FLIPModel):
  """FLIP's towers, the image embedding from the locked tower's pooled feature."""

  def embed_images(self, images, keep_indices=None):
    del keep_indices  # LiT drops no patches.
    pooled = self.encoder(images)['pooled']
    return flip.l2_normalize(self.image_projection(pooled))


class LiT(flip.FLIP):
  name = 'lit'
  config_keys = CONFIG_KEYS

  @classmethod
  def tiny_settings(cls):
    # The image tower keeps its cls token: it is locked as an earlier stage (MAE's) left it.
    return cls.tiny_text_tower()
  model_class = LiTModel
  # The locked image tower runs one forward per batch: no backward (train/mfu.py).
  forward_only_parts = (f'{ENCODER}/',)

  @classmethod
  def check_config(cls, config, path):
    super().check_config(config, path)
    if config.objective.mask_ratio != 0:
      raise ConfigError(
          f'{path}.objective.mask_ratio={config.objective.mask_ratio}: LiT sees every patch of '
          'its locked image tower, as evaluation will; set it to 0 (masking speeds up FLIP, '
          "whose image tower trains: objective 'flip').")
    init_from = config.init_from
    if not (init_from.stage or init_from.checkpoint):
      raise ConfigError(
          f'{path}.init_from is not set: LiT locks the image tower it starts from, and a random '
          f"one would stay random. Set {path}.init_from.stage to an earlier stage (e.g. 'wsp') "
          f'or {path}.init_from.checkpoint=PATH, with init_from.take including "encoder".')
    if ENCODER not in tuple(init_from.take):
      raise ConfigError(
          f'{path}.init_from.take={tuple(init_from.take)!r} does not take the "encoder": LiT '
          f"would lock a random image tower. Set {path}.init_from.take=('encoder',).")

  def is_trainable(self, path: str) -> bool:
    """The text tower, both projections and the temperature; not the image tower."""
    return not path.startswith(f'{ENCODER}/')
