"""WSP: weakly-supervised pretraining on hashtags (docs/methods.md, section 3).

Each image's hashtags are mapped to a label vocabulary by the input pipeline
('label_ids': sorted ids padded with -1). The encoder's pooled feature feeds
a linear head over the vocabulary; the loss is softmax cross-entropy against
the count-normalized multi-hot target y / sum(y). Examples with no known
label are left out of the mean (and counted in the metrics).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import linen as nn

from big_pretrain import schema
from big_pretrain.data.text.labels import LabelVocabulary, synthetic_vocabulary_path
from big_pretrain.errors import ConfigError
from big_pretrain.models.patches import normalize_images
from big_pretrain.models.transformer import dense, dense_flops
from big_pretrain.models.vit import VisionTransformer, parse_variant, vit_from_config
from big_pretrain.objectives.objective import CLASSIFIES, Objective

# config.objective for WSP: no keys of its own; the head's size is the label vocabulary's
# (config.data.labels.vocabulary).
CONFIG_KEYS = schema.Group(
    'WSP: weakly-supervised pretraining on hashtags',
    name=schema.Key('wsp', schema.REQUIRED_TEXT, 'the objective'))


def soft_target_cross_entropy(logits: jax.Array, label_ids: jax.Array):
  """Per-example CE against y / sum(y), y the multi-hot of `label_ids` (-1 = padding).

  -sum_c (y_c / k) log softmax(z)_c = logsumexp(z) - mean_{c in labels} z_c, so the
  (B, vocabulary) target is never built. Returns (per-example loss, has_label).
  """
  logits = logits.astype(jnp.float32)
  is_label = label_ids >= 0
  num_labels = is_label.sum(axis=-1)
  label_logits = jnp.take_along_axis(logits, jnp.maximum(label_ids, 0), axis=-1)
  mean_label_logit = (label_logits * is_label).sum(-1) / jnp.maximum(num_labels, 1)
  per_example = jax.nn.logsumexp(logits, axis=-1) - mean_label_logit
  has_label = num_labels > 0
  return jnp.where(has_label, per_example, 0.0), has_label


class WSPModel(nn.Module):
  """ViT encoder -> pooled feature -> linear head over the label vocabulary."""
  encoder: VisionTransformer
  num_labels: int

  @nn.compact
  def __call__(self, images):
    pooled = self.encoder(images)['pooled']
    # Zero-initialized head: every label starts equally likely.
    head = dense(self.num_labels, ('embed', 'vocab'), self.encoder.dtype, name='head',
                 kernel_init=nn.initializers.zeros)
    return head(pooled)


def _build_vocabulary_command(output: str) -> str:
  return ('python -m big_pretrain.data.text.build_vocabulary labels --source=image_folder '
          f'--path=DATA_DIR --output={output}')


class WSP(Objective):
  name = 'wsp'
  config_keys = CONFIG_KEYS
  offers = frozenset({CLASSIFIES})

  @classmethod
  def tiny_settings(cls):
    return {'data.labels.vocabulary': synthetic_vocabulary_path()}

  @classmethod
  def exported_head(cls, config):
    return 'multi_label'  # one sigmoid per hashtag

  @classmethod
  def check_config(cls, config, path):
    vocabulary = config.data.labels.vocabulary
    if not vocabulary:
      raise ConfigError(
          f'{path}.data.labels.vocabulary is not set: WSP needs a label vocabulary. Build one '
          f'with `{_build_vocabulary_command("vocab.txt")}` and set it.')
    if not os.path.isfile(vocabulary):
      raise ConfigError(f'{path}.data.labels.vocabulary={vocabulary!r} is not a file. Build it '
                        f'with `{_build_vocabulary_command(vocabulary)}`.')

  @classmethod
  def flops_beyond_encoder(cls, config, encoder_tokens, num_labels=None):
    """The linear head over the label vocabulary."""
    del encoder_tokens
    if num_labels is None:
      num_labels = len(LabelVocabulary.from_file(config.data.labels.vocabulary))
    return {'head': dense_flops(config.batch_size, parse_variant(config.model.variant).width,
                                num_labels)}

  def __init__(self, config):
    super().__init__(config)
    vocabulary_path = config.data.labels.vocabulary
    self.num_labels = len(LabelVocabulary.from_file(vocabulary_path))
    self.model = WSPModel(encoder=vit_from_config(config.model), num_labels=self.num_labels)

  def init_params(self, rng):
    return self.model.init({'params': rng}, self.dummy_images())['params']

  def predict(self, params, images: jax.Array) -> jax.Array:
    """Logits over the label vocabulary (B, num_labels) of uint8 images: a WSP stage can be
    a self-training teacher, its pseudo-labels the vocabulary's labels."""
    return self.model.apply({'params': params}, normalize_images(images))

  def loss(self, params, batch, rng, train=True):
    del rng, train  # No dropout or masking: the only randomness is the input pipeline's.
    logits = self.model.apply({'params': params}, normalize_images(batch['image']))
    per_example, has_label = soft_target_cross_entropy(logits, batch['label_ids'])
    num_labelled = has_label.sum()
    loss = per_example.sum() / jnp.maximum(num_labelled, 1)
    top1 = jnp.argmax(logits, axis=-1)
    top1_is_a_label = (batch['label_ids'] == top1[:, None]).any(axis=-1)
    return loss, {
        'loss': loss,
        'labelled_fraction': has_label.mean(),
        'precision_at_1': (top1_is_a_label * has_label).sum() / jnp.maximum(num_labelled, 1),
    }
