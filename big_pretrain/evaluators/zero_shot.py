"""Zero-shot classification with an image-text model (FLIP, CLIP).

As in CLIP (Radford et al., 2021): every class name is written into each of
the `prompts` ("a photo of a {}."), the prompts are embedded by the text tower,
and a class's embedding is the mean of its L2-normalized prompt embeddings,
normalized again. Each held-out image is assigned the class whose embedding is
most cosine-similar to the image's. Reports `accuracy` and, beside it,
`chance` = 1 / number of classes, and `true_class_probability`: the mean
probability the model gives each image's own class, from its logits (its
learned temperature, and bias for the sigmoid loss: the objective's
`pair_scoring`). With the sigmoid loss each class is its own yes/no decision;
with the softmax loss the classes share one softmax. A positive scale and a
shared bias do not change which class ranks first, so the prediction is read
from the cosines themselves (the logits' float32 rounding could only add ties).

Class names come from the split's source (image folders: the subfolder names,
'_' read as a space), or from `class_names` in the evaluator config, e.g.
readable names for ImageNet's wnid folders. Names whose words are not in a
word tokenizer's vocabulary become <unk> and are logged: zero-shot accuracy on
them means little.

`ImageTextEvaluator` here is the base of this and the retrieval evaluator: the
tokenizer the model was trained with, the objective's jitted embeddings, and
embedding host token rows (the prompts) in sharded batches.
"""

from __future__ import annotations

import functools
from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from big_pretrain import sharding as sharding_lib
from big_pretrain.data.text import tokenizer as tokenizer_lib
from big_pretrain.data.text import tokenizer_files
from big_pretrain.evaluators.eval_split import images_only, round_up
from big_pretrain import schema
from big_pretrain.evaluators.evaluator import EvalResult, Evaluator, held_out_keys
from big_pretrain.evaluators.knn import l2_normalize
from big_pretrain.objectives.objective import EMBEDS_IMAGES_AND_TEXTS, PairScoring

DEFAULT_PROMPTS = ('a photo of a {}.', 'a {}.', 'an image of a {}.')
# Where a prompt takes the class name.
CLASS_NAME_SLOT = '{}'


# --- Pure functions -------------------------------------------------------------

def readable_class_name(name: str) -> str:
  """'golden_retriever' -> 'golden retriever': folder names use '_' for spaces."""
  return ' '.join(name.replace('_', ' ').split())


def class_prompts(class_names: Sequence[str], prompts: Sequence[str]) -> list[str]:
  """Every prompt filled with every class name, class-major: row c * len(prompts) + p.

  Raises:
    ValueError: no prompts, or a prompt without exactly one '{}'.
  """
  if isinstance(prompts, str) or not prompts:
    raise ValueError(
        f'prompts={prompts!r} must be a non-empty sequence of templates such as '
        f'{DEFAULT_PROMPTS}.')
  for prompt in prompts:
    if not isinstance(prompt, str) or prompt.count(CLASS_NAME_SLOT) != 1:
      raise ValueError(
          f'Prompt {prompt!r} must contain {CLASS_NAME_SLOT!r} exactly once, where the class'
          " name goes, e.g. 'a photo of a {}.'.")
  # replace, not format: other braces in a prompt are kept as written.
  return [prompt.replace(CLASS_NAME_SLOT, name) for name in class_names for prompt in prompts]


def class_text_embeddings(prompt_embeddings: np.ndarray, num_prompts: int) -> np.ndarray:
  """(C, E): the normalized mean of each class's normalized prompt embeddings.

  Args:
    prompt_embeddings: (C * num_prompts, E), class-major as `class_prompts` orders them.
    num_prompts: P, the prompts per class.
  """
  prompt_embeddings = np.asarray(prompt_embeddings, np.float32)
  if prompt_embeddings.ndim != 2 or num_prompts < 1 or len(prompt_embeddings) % num_prompts:
    raise ValueError(
        f'prompt_embeddings {prompt_embeddings.shape} must be (C * num_prompts, E) with '
        f'num_prompts={num_prompts}.')
  per_class = l2_normalize(prompt_embeddings).reshape(-1, num_prompts,
                                                      prompt_embeddings.shape[1])
  return l2_normalize(per_class.mean(axis=1))


def class_cosines(image_embeddings: np.ndarray, class_embeddings: np.ndarray) -> np.ndarray:
  """(N, C): each image's cosine similarity to each class embedding."""
  image_embeddings = l2_normalize(image_embeddings)
  class_embeddings = l2_normalize(class_embeddings)
  if image_embeddings.shape[1] != class_embeddings.shape[1]:
    raise ValueError(
        f'Image embeddings {image_embeddings.shape} and class embeddings '
        f'{class_embeddings.shape} differ in width: the towers must project to the same size.')
  return image_embeddings @ class_embeddings.T


def zero_shot_predictions(image_embeddings: np.ndarray, class_embeddings: np.ndarray) -> np.ndarray:
  """(N,): the class most cosine-similar to each image (ties: the lower class id)."""
  return class_cosines(image_embeddings, class_embeddings).argmax(axis=1)


def true_class_probability(cosines: np.ndarray, labels: np.ndarray,
                           scoring: PairScoring) -> float:
  """The mean probability `scoring` gives each image's own class ((N, C) cosines)."""
  probabilities = scoring.probabilities(cosines, axis=1)
  return float(np.mean(probabilities[np.arange(len(labels)), labels]))


# --- Device helpers ---------------------------------------------------------------

def embed_token_rows(embed_texts, params, tokens: np.ndarray, *, pad_id: int, batch_size: int,
                     mesh, rules) -> np.ndarray:
  """`embed_texts(params, tokens)` over host token rows, in batch-sharded global batches.

  Args:
    embed_texts: jitted `(params, int32 (B, L)) -> (B, E)`, batch-sharded.
    tokens: int32 (N, L), identical on every process (e.g. tokenised prompts).
    pad_id: fills the rows that complete the last batch (their outputs are dropped).
    batch_size: requested global batch; rounded up to a multiple of the batch shards.

  Returns:
    (N, E) float32, identical on every process.
  """
  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim != 2 or not len(tokens):
    raise ValueError(f'tokens must be a non-empty (N, L) array; got shape {tokens.shape}.')
  # One fixed batch shape, so the text tower compiles once.
  global_batch = round_up(min(batch_size, len(tokens)), sharding_lib.num_batch_shards(mesh))
  sharding = sharding_lib.batch_sharding(mesh)
  embeddings = []
  for start in range(0, len(tokens), global_batch):
    rows = tokens[start:start + global_batch]
    rows = np.pad(rows, ((0, global_batch - len(rows)), (0, 0)), constant_values=pad_id)
    # Every process holds all rows and fills the shards on its own devices.
    batch = jax.make_array_from_callback(rows.shape, sharding, rows.__getitem__)
    with sharding_lib.activate(mesh, rules):
      batch_embeddings = embed_texts(params, batch)
    embeddings.append(multihost_utils.process_allgather(batch_embeddings, tiled=True))
  return np.concatenate(embeddings)[:len(tokens)].astype(np.float32)


class ImageTextEvaluator(Evaluator):
  """Base of the evaluators of an image-text objective (see the module docstring).

  The objective provides `embed_images(params, uint8 images) -> (B, E)` and
  `embed_texts(params, int32 tokens) -> (B, E)`, both L2-normalized.
  """

  needs = EMBEDS_IMAGES_AND_TEXTS

  def __init__(self, *args):
    super().__init__(*args)
    if not tokenizer_files.configured_tokenizer_path(self.stage_config.data):
      raise ValueError(
          f'{self.culprit()} embeds text, but config.data.text.tokenizer is not set. '
          'Set it to the tokenizer the model trains with, e.g. '
          'big_pretrain.data.text.tokenizer.synthetic_tokenizer_path() for the synthetic data.')

  @functools.cached_property
  def tokenizer_path(self) -> str:
    """The tokenizer recorded in the workdir (the one trained with) if any, else the configured."""
    return tokenizer_files.evaluation_tokenizer_path(self.stage_config.data, self.workdir)

  @functools.cached_property
  def tokenizer(self) -> tokenizer_lib.Tokenizer:
    return tokenizer_files.load_tokenizer(self.tokenizer_path)

  @property
  def max_length(self) -> int:
    return self.stage_config.data.text.max_length

  def split_config(self, data_key, num_examples):
    """The split's data config, tokenising captions with `tokenizer_path`."""
    data_config = super().split_config(data_key, num_examples)
    data_config.text.tokenizer = self.tokenizer_path
    return data_config

  def _image_embeddings(self, params, images):
    return self.objective.embed_images(params, images).astype(jnp.float32)

  def _text_embeddings(self, params, tokens):
    return self.objective.embed_texts(params, tokens).astype(jnp.float32)

  @property
  def embed_images(self):
    """Jitted `(params, uint8 images) -> (B, E) float32`."""
    return self.jit('embed_images', self._image_embeddings)

  @property
  def embed_texts(self):
    """Jitted `(params, int32 tokens) -> (B, E) float32`."""
    return self.jit('embed_texts', self._text_embeddings)

  def pair_scoring(self, params) -> PairScoring:
    """The model's temperature and bias."""
    return self.objective.pair_scoring(params)

  def device_programs(self):
    return {'embed_images': (self._image_embeddings, (self.image_batch(),)),
            'embed_texts': (self._text_embeddings,
                            (self.batch_of((self.max_length,), np.int32),))}


class ZeroShotEvaluator(ImageTextEvaluator):

  config_keys = held_out_keys(
      'zero_shot', 'zero-shot classification of held-out images from prompts',
      test_examples=1024,
      prompts=schema.Key(
          DEFAULT_PROMPTS, schema.Rule(
              lambda v: len(v) > 0 and all(isinstance(p, str) and p.count(CLASS_NAME_SLOT) == 1
                                           for p in v),
              f"must be a non-empty tuple of strings, each with {CLASS_NAME_SLOT!r} once"),
          "the templates; '{}' takes the class name"),
      class_names=schema.Key(
          None, schema.Rule(lambda v: v is None or schema.texts().accepts(v),
                            "must be a tuple of strings (or None: the data's names)"),
          "readable class names in class-id order; None: the source's (folder names)",
          type=tuple),
  )

  def class_names(self, source_class_names: Sequence[str]) -> list[str]:
    """The names written into the prompts, one per class id."""
    configured = self.eval_config.class_names
    if configured is None:
      return [readable_class_name(name) for name in source_class_names]
    if len(configured) != len(source_class_names):
      raise ValueError(
          f'{self.culprit("class_names")} has {len(configured)} names, but the held-out '
          f'split has {len(source_class_names)} classes ({list(source_class_names)[:5]}...). '
          'Give one name per class, in the order of the sorted class folders.')
    return list(configured)

  def _warn_about_unknown_words(self, class_names: Sequence[str]) -> None:
    tokenizer = self.tokenizer
    if not isinstance(tokenizer, tokenizer_lib.WordTokenizer):
      return  # SentencePiece spells any word out of pieces.
    unknown = [name for name in class_names
               if any(tokenizer.token_id(word) == tokenizer.unk_id
                      for word in tokenizer_lib.split_words(name))]
    if unknown:
      logging.warning(
          '%s: %d of %d class names have words outside the tokenizer %s (they become <unk>), '
          'e.g. %s. Give readable names in %s, or a tokenizer built from captions that use them.',
          self.culprit('class_names'), len(unknown), len(class_names), self.tokenizer_path,
          unknown[:5], self.culprit('class_names'))

  def class_embeddings(self, params, class_names: Sequence[str]) -> np.ndarray:
    """(C, E): each class's prompt embeddings averaged (see `class_text_embeddings`)."""
    prompts = tuple(self.eval_config.prompts)
    tokens = self.tokenizer.tokenize_batch(class_prompts(class_names, prompts), self.max_length)
    prompt_embeddings = embed_token_rows(
        self.embed_texts, params, tokens, pad_id=self.tokenizer.pad_id,
        batch_size=self.eval_config.batch_size, mesh=self.trainer.mesh, rules=self.trainer.rules)
    return class_text_embeddings(prompt_embeddings, len(prompts))

  def run(self, params, step):
    image_embeddings, labels, source_class_names = self.split_outputs(
        images_only(self.embed_images), params, data_key='test_data',
        num_examples=self.eval_config.test_examples, check_classes=True)
    class_names = self.class_names(source_class_names)
    self._warn_about_unknown_words(class_names)
    class_embeddings = self.class_embeddings(params, class_names)
    cosines = class_cosines(image_embeddings, class_embeddings)
    predictions = cosines.argmax(axis=1)
    return EvalResult(scalars={
        'accuracy': float(np.mean(predictions == labels)),
        'chance': 1.0 / len(class_names),
        'true_class_probability': true_class_probability(cosines, labels,
                                                         self.pair_scoring(params)),
    })
