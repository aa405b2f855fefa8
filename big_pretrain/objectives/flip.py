"""FLIP: image-text contrastive learning with most image patches dropped (docs/methods.md, section 4).

In training, a fraction `mask_ratio` of each image's patches is dropped
before the image encoder (MAE's per-example masking), which is where FLIP's
speed comes from; at evaluation nothing is dropped. Image embedding: mean of
the output tokens -> dense (no bias) -> L2 normalize; text embedding: the
text tower's first position -> dense (no bias) -> L2 normalize. The loss is
CLIP's symmetric InfoNCE over the GLOBAL batch with a learnable temperature
(`loss='softmax'`, the default), or SigLIP's sigmoid loss over every pair
with a learnable temperature and bias (`loss='sigmoid'`,
objectives/sigmoid_loss.py: chunked over the devices, no global logits).

Global batch, exact gradients: the step is one jit over global arrays, so
`image_embeddings @ text_embeddings.T` pairs every example with every other
on every device; XLA inserts the all-gathers, and they are differentiated
like any other op. Nothing is gathered without gradient. The sigmoid loss
passes the texts around the devices instead, also with gradient.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from big_pretrain import schema
from big_pretrain.data.text.tokenizer import synthetic_tokenizer_path
from big_pretrain.data.text.tokenizer_files import load_tokenizer
from big_pretrain.errors import ConfigError
from big_pretrain.models.masking import num_kept, random_masking
from big_pretrain.models.patches import normalize_images
from big_pretrain.models.text_tower import TextTransformer
from big_pretrain.models.transformer import dense, dense_flops, transformer_forward_flops
from big_pretrain.models.vit import (VisionTransformer, compute_dtype, num_patches,
                                     parse_variant, vit_from_config)
from big_pretrain.objectives import sigmoid_loss
from big_pretrain.objectives.objective import EMBEDS_IMAGES_AND_TEXTS, Objective, PairScoring

MAX_LOGIT_SCALE = 100.0
SOFTMAX, SIGMOID = 'softmax', 'sigmoid'
# Each loss's paper initialisation of the temperature (t = 1 / temperature).
DEFAULT_TEMPERATURE_INIT = {SOFTMAX: 0.07, SIGMOID: sigmoid_loss.TEMPERATURE_INIT}

# config.objective for FLIP, with the paper's defaults.
CONFIG_KEYS = schema.Group(
    'FLIP: image-text contrastive pretraining with image patches dropped',
    name=schema.Key('flip', schema.REQUIRED_TEXT, 'the objective'),
    mask_ratio=schema.Key(0.5, schema.UNIT_FRACTION,
                          "the fraction of each image's patches dropped in training; 0 for "
                          'the final unmasked tuning stage'),
    embed_dim=schema.Key(512, schema.COUNT, 'the width of the joint image-text embedding'),
    text_width=schema.Key(512, schema.COUNT, "the text tower's width"),
    text_depth=schema.Key(12, schema.COUNT, "the text tower's blocks"),
    text_heads=schema.Key(8, schema.COUNT, "the text tower's attention heads"),
    loss=schema.Key(SOFTMAX, schema.one_of(SOFTMAX, SIGMOID),
                    "'softmax': CLIP's InfoNCE over the global batch (FLIP); 'sigmoid': "
                    "SigLIP's per-pair loss with a learned bias, chunked over the devices"),
    temperature_init=schema.Key(None, schema.above(0, or_none=True),
                                'the logit scale starts at 1 / temperature_init; None: the '
                                "loss's paper value (softmax 0.07, sigmoid 0.1)", type=float),
    bias_init=schema.Key(sigmoid_loss.BIAS_INIT, schema.within(-math.inf, math.inf,
                                                                low_open=True, high_open=True),
                         "the sigmoid loss's learned bias starts here (every pair judged "
                         "'no match')"),
)


def temperature_init(objective_config) -> float:
  """The configured initial temperature, or the loss's paper value."""
  if objective_config.temperature_init is not None:
    return objective_config.temperature_init
  return DEFAULT_TEMPERATURE_INIT[objective_config.loss]


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def logit_scale_from(theta: jax.Array) -> jax.Array:
  """s = exp(clip(theta, 0, ln 100)): the learnable scale, capped at 100."""
  return jnp.exp(jnp.clip(theta, 0.0, math.log(MAX_LOGIT_SCALE)))


def contrastive_loss(image_embeddings, text_embeddings, logit_scale):
  """CLIP's symmetric InfoNCE: 1/2 [CE(rows) + CE(cols)], the diagonal as targets.

  Both inputs are L2-normalized (N, E); the log-softmax is the stable one.
  Returns (loss, image->text top-1 accuracy within the batch).
  """
  logits = logit_scale * image_embeddings @ text_embeddings.T
  logits = nn.with_logical_constraint(logits, ('batch', None))
  targets = jnp.arange(logits.shape[0])
  image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, targets)
  loss = 0.5 * (image_to_text.mean() + text_to_image.mean())
  accuracy = jnp.mean(jnp.argmax(logits, axis=1) == targets)
  return loss, accuracy


class FLIPModel(nn.Module):
  """Image tower (params['encoder']), text tower, two projections, the temperature (and
  the sigmoid loss's bias)."""
  encoder: VisionTransformer
  text_encoder: TextTransformer
  embed_dim: int
  temperature_init: float
  loss: str = SOFTMAX
  bias_init: float = sigmoid_loss.BIAS_INIT

  def setup(self):
    self.image_projection = dense(self.embed_dim, ('embed', None), self.encoder.dtype,
                                  use_bias=False)
    self.text_projection = dense(self.embed_dim, ('embed', None), self.encoder.dtype,
                                 use_bias=False)
    self.logit_scale = self.param(
        'logit_scale', nn.with_logical_partitioning(
            nn.initializers.constant(math.log(1 / self.temperature_init)), ()), ())
    if self.loss == SIGMOID:
      self.logit_bias = self.param(
          'logit_bias', nn.with_logical_partitioning(
              nn.initializers.constant(self.bias_init), ()), ())

  def embed_images(self, images, keep_indices=None):
    """Normalized images (and the visible patches, in training) -> (B, E) unit vectors."""
    tokens = self.encoder(images, keep_indices=keep_indices)['patch_tokens']
    return l2_normalize(self.image_projection(tokens.mean(axis=1)))

  def embed_texts(self, tokens):
    return l2_normalize(self.text_projection(self.text_encoder(tokens)))

  def pair_scoring(self):
    """(scale, bias) of a pair's logit scale * cosine + bias: softmax's capped scale and no
    bias; the sigmoid loss's exp(t') (uncapped, as in SigLIP) and its learned bias."""
    if self.loss == SIGMOID:
      return jnp.exp(self.logit_scale), self.logit_bias
    return logit_scale_from(self.logit_scale), None

  def __call__(self, images, tokens, keep_indices=None):
    return (self.embed_images(images, keep_indices), self.embed_texts(tokens),
            *self.pair_scoring())


class FLIP(Objective):
  name = 'flip'
  config_keys = CONFIG_KEYS
  offers = frozenset({EMBEDS_IMAGES_AND_TEXTS})

  @classmethod
  def tiny_settings(cls):
    return {'model.use_cls_token': False, 'model.pool': 'gap', 'objective.mask_ratio': 0.5,
            **cls.tiny_text_tower()}

  @classmethod
  def tiny_text_tower(cls):
    """A 1-block width-32 text tower on the synthetic captions' tokenizer."""
    return {'objective.embed_dim': 32, 'objective.text_width': 32, 'objective.text_depth': 1,
            'objective.text_heads': 4, 'data.text.tokenizer': synthetic_tokenizer_path(),
            'data.text.max_length': 16}
  model_class = FLIPModel  # LiT (objectives/lit.py) swaps in its locked image tower.

  @classmethod
  def check_config(cls, config, path):
    if not config.data.text.tokenizer:
      raise ConfigError(
          f'{path}.data.text.tokenizer is not set: FLIP needs a tokenizer for the captions. '
          'Build one with `python -m big_pretrain.data.text.build_vocabulary tokenizer '
          '--source=image_folder '
          '--path=DATA_DIR --output=tokenizer.txt`, or give a SentencePiece .model file.')

  @classmethod
  def resolve_config(cls, config):
    """The initial temperature recorded as a number (None: the loss's paper value)."""
    config = super().resolve_config(config)
    if config.objective.temperature_init is None:
      config = config.copy_and_resolve_references()
      config.objective.temperature_init = temperature_init(config.objective)
    return config

  @classmethod
  def encoder_patches(cls, config):
    """The patches left after dropping `mask_ratio` of them (in training)."""
    return num_kept(num_patches(config.model, config.data.image_size),
                    config.objective.mask_ratio)

  @classmethod
  def flops_beyond_encoder(cls, config, encoder_tokens, num_labels=None):
    """The text tower, both projections, and the logits of every image against every text
    of the GLOBAL batch (B x B; the sigmoid loss computes them too, a block at a time)."""
    del encoder_tokens, num_labels
    objective, batch = config.objective, config.batch_size
    image_width = parse_variant(config.model.variant).width
    return {
        **transformer_forward_flops(batch, config.data.text.max_length, objective.text_width,
                                    objective.text_depth, objective.text_heads, prefix='text'),
        'projections': (dense_flops(batch, image_width, objective.embed_dim)
                        + dense_flops(batch, objective.text_width, objective.embed_dim)),
        'logits': dense_flops(batch, objective.embed_dim, batch),
    }

  def __init__(self, config):
    super().__init__(config)
    objective = config.objective
    self.mask_ratio = objective.mask_ratio
    self.max_length = config.data.text.max_length
    tokenizer = load_tokenizer(config.data.text.tokenizer)
    encoder = vit_from_config(config.model)
    self.model = self.model_class(
        encoder=encoder,
        text_encoder=TextTransformer(
            vocab_size=tokenizer.vocab_size, width=objective.text_width,
            depth=objective.text_depth, num_heads=objective.text_heads,
            max_length=self.max_length, pad_id=tokenizer.pad_id,
            dtype=compute_dtype(config.model.dtype),
            scan=encoder.scan, remat=config.model.remat,
            attention_impl=config.model.attention_impl),
        embed_dim=objective.embed_dim, temperature_init=temperature_init(objective),
        loss=objective.loss, bias_init=objective.bias_init)

  def init_params(self, rng):
    tokens = jnp.zeros((1, self.max_length), jnp.int32)
    return self.model.init({'params': rng}, self.dummy_images(), tokens)['params']

  def _keep_indices(self, rng, images, train):
    """Per-example random visible patches in training; None (all patches) otherwise."""
    if not train or self.mask_ratio == 0:
      return None
    grid = images.shape[1] // self.model.encoder.patch_size
    return random_masking(rng, images.shape[0], grid * grid, self.mask_ratio).keep_indices

  def loss(self, params, batch, rng, train=True):
    images = normalize_images(batch['image'])
    image_embeddings, text_embeddings, logit_scale, logit_bias = self.model.apply(
        {'params': params}, images, batch['text_tokens'], self._keep_indices(rng, images, train))
    if self.model.loss == SIGMOID:
      loss, accuracy = sigmoid_loss.sigmoid_loss(image_embeddings, text_embeddings,
                                                 logit_scale, logit_bias)
      return loss, {'loss': loss, 'logit_scale': logit_scale, 'logit_bias': logit_bias,
                    'batch_accuracy': accuracy}
    loss, accuracy = contrastive_loss(image_embeddings, text_embeddings, logit_scale)
    return loss, {'loss': loss, 'logit_scale': logit_scale, 'batch_accuracy': accuracy}

  def embed_images(self, params, images):
    """(B, E) unit image embeddings, no patches dropped (for evaluators)."""
    # Methods by name, so a subclass's model (LiT's) runs its own.
    return self.model.apply({'params': params}, normalize_images(images),
                            method='embed_images')

  def embed_texts(self, params, text_tokens):
    return self.model.apply({'params': params}, text_tokens, method='embed_texts')

  def pair_scoring(self, params) -> PairScoring:
    """How the trained model scores an image-text pair (for evaluators)."""
    scale, bias = self.model.apply({'params': params}, method='pair_scoring')
    return PairScoring(scale=float(scale), bias=0.0 if bias is None else float(bias),
                       independent=self.model.loss == SIGMOID)
