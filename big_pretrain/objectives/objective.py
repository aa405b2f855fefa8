"""What every objective provides (the contract: `Objective`).

An objective is one module: its config keys, its checks, its model, its loss
`loss(params, batch, rng, train) -> (loss, metrics)` and its analytic FLOPs.
The loop, the step, sharding, checkpoints, logging, config validation and the
MFU count know nothing else about it. docs/extending.md, "Adding an objective", walks
through writing one.
"""

from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from big_pretrain import schema
from big_pretrain.models import vit
from big_pretrain.models.patches import normalize_images
from big_pretrain.models.transformer import stacked_block_outputs
from big_pretrain.models.vit import SCAN_AUTO, parse_variant, scan_layers


@dataclasses.dataclass(frozen=True)
class PairScoring:
  """A pair's logit, scale * cosine + bias, and what it means: with `independent` (the
  sigmoid loss) sigmoid(logit) is the probability that the pair matches; otherwise the
  logits of one query over its candidates go through a softmax."""
  scale: float
  bias: float
  independent: bool

  def logits(self, cosines: np.ndarray) -> np.ndarray:
    return self.scale * np.asarray(cosines, np.float32) + self.bias

  def probabilities(self, cosines: np.ndarray, axis: int = -1) -> np.ndarray:
    """Match probabilities: per pair (sigmoid), or over `axis`'s candidates (softmax)."""
    logits = self.logits(cosines).astype(np.float64)
    if self.independent:
      return np.exp(-np.logaddexp(0.0, -logits))  # sigmoid, without overflow
    logits = logits - logits.max(axis=axis, keepdims=True)
    return np.exp(logits) / np.exp(logits).sum(axis=axis, keepdims=True)


# A model that scores pairs by cosine alone: the ranking of its similarities.
COSINE_SCORING = PairScoring(scale=1.0, bias=0.0, independent=False)


@dataclasses.dataclass(frozen=True)
class Capability:
  """Something an objective may offer beyond its loss: its name, the methods that bring it
  (which the objective then defines) and who uses it."""
  name: str
  methods: tuple[str, ...]
  meaning: str


CLASSIFIES = Capability(
    'classifies', ('predict', 'exported_head'),
    'predict(params, uint8 images) -> (B, num_classes) logits, scored by the '
    "'classification' evaluator, and which makes the stage a pseudo-label teacher; "
    "exported_head(config): what params['head'] (after 'fc_norm', if any) is when the "
    "weights leave for timm or Hugging Face ('single_label' or 'multi_label')")
EMBEDS_IMAGES_AND_TEXTS = Capability(
    'embeds_images_and_texts', ('embed_images', 'embed_texts', 'pair_scoring'),
    'embed_images(params, uint8 images), embed_texts(params, int32 tokens) -> (B, E) unit '
    "vectors, scored by the 'zero_shot' and 'retrieval' evaluators; "
    'pair_scoring(params) -> PairScoring: how a pair\'s cosine becomes a logit (the learned '
    'temperature and bias) and a probability')
RECONSTRUCTS = Capability(
    'reconstructs', ('visualize', 'exported_decoder'),
    'visualize(params, uint8 images, rng) -> {panel: (B, H, W, 3) in [0, 1]} with '
    "`visualization_panels` (their column order), drawn by the 'reconstruction' evaluator; "
    "exported_decoder(config): the pixel decoder's settings, for transformers' "
    'ViTMAEForPreTraining')
CAPABILITIES = (CLASSIFIES, EMBEDS_IMAGES_AND_TEXTS, RECONSTRUCTS)


def prefixed(prefix: str, parts: dict[str, float]) -> dict[str, float]:
  """FLOPs parts renamed '<prefix>/<part>'."""
  return {f'{prefix}/{name}': flops for name, flops in parts.items()}


class Objective(abc.ABC):
  """The contract of an objective. A module objectives/<name>.py defines a subclass,
  registered in objectives/__init__.py, that defines:

    name: the registry name, e.g. 'mae'.
    config_keys: a schema.Group declaring every `config.objective` key (`name` among
      them) with its default (the paper's), the values it may take and its meaning.
      stage_config(name) (config/defaults.py) builds a stage config from it, so every
      key exists and can be set on the command line, and validation checks every value
      against its rule before any compute: code past validation trusts the values.
    check_config(config, path) (class method, optional): the checks across keys of the
      whole stage config that this objective needs (a single key's range is its rule's),
      run before any compute; raise ConfigError naming `path.key` and the fix. Among
      them: that the data config gives the batch features `loss` reads (below).
    flops_beyond_encoder(config, encoder_tokens, num_labels) (class method): the
      analytic forward FLOPs of everything but the encoder (its decoder, heads, text
      tower, logits) for the global batch, by part; train/mfu.py adds the encoder's and
      counts a training step. `forward_only_parts` (prefixes of part names) run forward
      only, with no gradient (LiT's locked image tower).
    encoder_patches(config) (class method, optional): the patches the encoder's blocks
      see per example in a training step; all of them unless the objective drops some.
    resolve_config(config) (class method, optional): the stage config with values
      derived once per stage filled in (recorded in config.json); extend, do not drop,
      this base version.
    __init__(config): builds `self.model` (a flax module) from the stage config. The
      encoder is the ViT of `models.vit.vit_from_config(config.model)`, held as
      `self.model.encoder` and named 'encoder' in the parameters, so probes
      (`encode`), init_from (which takes the 'encoder' subtree by default) and the
      other objectives share it.
    init_params(rng): fresh parameters for one example shape (`dummy_images`), with
      their logical-axis metadata (boxed, as nn.with_logical_partitioning gives). The
      trainer calls it under jax.eval_shape and jit, so nothing is materialised whole.
    loss(params, batch, rng, train) -> (scalar loss, {name: scalar}): pure and
      jittable. `batch` holds global arrays: 'image' (uint8 (B, H, W, 3); see
      models.patches.normalize_images) and 'label' (int32 (B,)) always; 'label_ids'
      when config.data.labels.vocabulary is set; 'text_tokens' when
      config.data.text.tokenizer is set; 'is_pseudo', 'pseudo_ids', 'pseudo_probs'
      when config.data.pseudo_labels is set (data.batch_features.device_feature_names).
      `rng` is this step's key (fold_in(base, step): draw masks, drops, mixup from it,
      so resumption is exact). `train` is True in the train step; with False, no
      training-only randomness (FLIP's patch dropping, drop path). The metrics are
      logged under their names, averaged over each log interval, beside the 'loss',
      'grad_norm' and 'learning_rate' the step adds.

  Optional: `is_trainable(path)` (False freezes a parameter: no gradient, no optimizer
  state) and `encode(params, images, num_last_blocks)` (frozen features for the probes;
  given here for the shared encoder).

  Capabilities: what an objective offers beyond its loss, declared in `offers` (a set of
  the module's CAPABILITIES, each naming the methods it brings). Evaluators, jobs and export
  read `offers`, never probe for a method: an objective that declares a capability must
  define its methods (tests/test_extension_points.py checks both ways), and
  objectives.objectives_offering(capability) lists who offers what. An evaluator states
  the capability it needs (`Evaluator.needs`) and config validation refuses the pair
  before any compute when the objective does not offer it.

  Its tiny setting: `tiny_settings()` (class method) shrinks the objective's own parts
  (decoder, heads, text tower) to a CPU test size on top of config.defaults.TINY_STAGE,
  and names the small files its data needs (the synthetic vocabulary, tokenizer).
  config.defaults.tiny_stage_config(name) builds it; every test and benchmark that needs
  a tiny stage of an objective starts there.
  """

  name: str = ''
  config_keys: schema.Group = schema.Group()
  forward_only_parts: tuple[str, ...] = ()
  offers: frozenset[Capability] = frozenset()
  # Whether `loss` reads the rows of a second source mixed into its batches
  # (config.data.pseudo_labels: data.sources.second_source), telling them apart from the
  # main source's rows; an objective that does not would read them as its own.
  reads_second_source: bool = False

  def __init__(self, config):
    self.config = config  # The full stage config (read-only by convention).

  @classmethod
  def check_config(cls, config, path: str) -> None:
    """Objective-specific config checks, run before any compute (raise ConfigError)."""

  @classmethod
  def encoder_patches(cls, config) -> int:
    """The patches the encoder's blocks see per example in a training step."""
    return vit.num_patches(config.model, config.data.image_size)

  @classmethod
  @abc.abstractmethod
  def flops_beyond_encoder(cls, config, encoder_tokens: int,
                           num_labels: int | None = None) -> dict[str, float]:
    """Forward matmul FLOPs of the parts beyond the encoder for config.batch_size examples,
    by part name ('decoder/mlp', 'head', ...). `encoder_tokens`: the tokens the encoder
    outputs per example (visible patches + cls). `num_labels`: the size of a head whose
    size the data decides (a label vocabulary), when the caller knows it; else it is read
    from the config."""

  @classmethod
  def tiny_settings(cls) -> dict:
    """{'a.b': value} shrinking this objective's own parts to a CPU test size (see the class
    docstring); nothing when the common tiny stage already fits."""
    return {}

  @classmethod
  def exported_head(cls, config) -> str | None:
    """CLASSIFIES: 'single_label' / 'multi_label', what params['head'] is when it leaves
    with the encoder; None (an objective without a head): the encoder leaves alone."""
    del config
    return None

  @classmethod
  def exported_decoder(cls, config) -> dict | None:
    """RECONSTRUCTS: the pixel decoder's settings when it leaves with the encoder (MAE);
    None: no decoder leaves."""
    del config
    return None

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

    Frozen ones get no gradient and no optimizer state (train/optim.py).
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
      return encoder.apply({'params': params[vit.ENCODER]}, normalize_images(images))
    outputs, variables = encoder.apply(
        {'params': params[vit.ENCODER]}, normalize_images(images), mutable=['intermediates'])
    blocks = stacked_block_outputs(variables['intermediates']['transformer'])
    if not 0 < num_last_blocks <= blocks.shape[0]:
      raise ValueError(f'num_last_blocks={num_last_blocks}: the encoder has {blocks.shape[0]}.')
    prefix = 1 if encoder.use_cls_token else 0
    outputs['last_blocks_mean'] = blocks[-num_last_blocks:, :, prefix:].mean(axis=0)
    return outputs
