"""Tests for the image-text evaluators: zero-shot classification and retrieval recall.

The model is a lookup table standing in for FLIP's two towers, so the expected
scores are known exactly and nothing large compiles: an image's embedding is a
row picked by its (uniform) pixel value, a text's the normalized sum of rows
picked by its token ids.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from big_pretrain import sharding as sharding_lib
from big_pretrain.config.validation import validate_stage_config
from big_pretrain.data.text import tokenizer as tokenizer_lib
from big_pretrain.evaluators import build_evaluators, evaluator_config
from big_pretrain.evaluators.retrieval import paired_ranks, retrieval_recalls
from big_pretrain.evaluators.zero_shot import (
    DEFAULT_PROMPTS, class_prompts, class_text_embeddings, embed_token_rows,
    readable_class_name, zero_shot_predictions)
from big_pretrain.objectives import build_objective
from big_pretrain.objectives.objective import COSINE_SCORING, EMBEDS_IMAGES_AND_TEXTS, PairScoring
from helpers.tiny_config import tiny_mae_config

CLASS_NAMES = ('circle', 'square', 'star', 'ring')
IMAGES_PER_CLASS = 4
IMAGE_SIZE = 8


def normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class LookupObjective:
  """FLIP's embedding interface over two lookup tables (the params)."""

  name = 'lookup'
  offers = frozenset({EMBEDS_IMAGES_AND_TEXTS})

  def __init__(self, config):
    self.config = config

  def embed_images(self, params, images):
    value = jnp.round(images[..., 0].astype(jnp.float32).mean(axis=(1, 2))).astype(jnp.int32)
    return normalize(params['image_table'][value])

  def embed_texts(self, params, text_tokens):
    return normalize(params['text_table'][text_tokens].sum(axis=1))

  def pair_scoring(self, params):
    """A sigmoid-loss model's scale and bias where the params give them; else cosine."""
    if 'scale' not in params:
      return COSINE_SCORING
    return PairScoring(scale=params['scale'], bias=params['bias'], independent=True)


def write_image_folder(root, class_images):
  """class name -> [(pixel value, caption)]: uniform 8x8 PNGs with .txt captions."""
  for class_name, images in class_images.items():
    (root / class_name).mkdir(parents=True)
    for index, (value, caption) in enumerate(images):
      Image.new('RGB', (IMAGE_SIZE, IMAGE_SIZE), (value, 0, 0)).save(
          root / class_name / f'{index}.png')
      (root / class_name / f'{index}.txt').write_text(caption, encoding='utf-8')
  return str(root)


def pixel_value(class_id, index):
  return 10 + 40 * class_id + 5 * index


def image_text_config(data_path, tokenizer_path, kind, devices, mesh_shape):
  config = tiny_mae_config()
  config.model.variant = 'mu/4'  # 2x2 patches of the 8-pixel images: a valid MAE config
  config.mesh.update(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=1)
  config.data.update(source='image_folder', path=data_path, test_path=data_path,
                     image_size=IMAGE_SIZE)
  config.data.text.tokenizer = tokenizer_path
  validate_stage_config(config)  # the MAE stage carries LookupObjective's evaluator, unvalidated:
  # validation would refuse an image-text evaluator beside MAE, which embeds no text.
  config.evals[kind] = evaluator_config(kind, test_examples=16, batch_size=8)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  trainer = types.SimpleNamespace(mesh=mesh, rules=sharding_lib.logical_axis_rules(config))
  return config, trainer


def run_evaluator(config, trainer, params):
  (evaluator,) = build_evaluators(config, LookupObjective(config), trainer, workdir=None)
  return evaluator.run(params, step=0).scalars


# --- Zero-shot -------------------------------------------------------------------

@pytest.fixture(scope='module')
def classification_data(tmp_path_factory):
  root = tmp_path_factory.mktemp('zero_shot')
  data_path = write_image_folder(root / 'images', {
      name: [(pixel_value(c, i), '') for i in range(IMAGES_PER_CLASS)]
      for c, name in enumerate(CLASS_NAMES)})
  tokenizer = tokenizer_lib.build_tokenizer(
      class_prompts(CLASS_NAMES, DEFAULT_PROMPTS), min_count=1, max_size=100)
  tokenizer_path = str(root / 'tokenizer.txt')
  tokenizer.write(tokenizer_path)
  # Class c's embedding is the unit vector e_c; only the class-name words carry it.
  text_table = np.zeros((tokenizer.vocab_size, 8), np.float32)
  for class_id, name in enumerate(CLASS_NAMES):
    text_table[tokenizer.token_id(name), class_id] = 1.0
  return data_path, tokenizer_path, text_table


def image_table_for(image_class):
  """(256, 8): pixel value of image i of class c -> e_{image_class(c, i)}."""
  table = np.zeros((256, 8), np.float32)
  for class_id in range(len(CLASS_NAMES)):
    for index in range(IMAGES_PER_CLASS):
      table[pixel_value(class_id, index), image_class(class_id, index)] = 1.0
  return table


@pytest.mark.parametrize('devices, mesh_shape', [(1, (1, 1)), (8, (2, 4))])
def test_zero_shot_is_perfect_when_images_embed_as_their_class_name(
    classification_data, devices, mesh_shape):
  data_path, tokenizer_path, text_table = classification_data
  config, trainer = image_text_config(
      data_path, tokenizer_path, 'zero_shot', jax.devices()[:devices], mesh_shape)
  params = {'image_table': image_table_for(lambda class_id, index: class_id),
            'text_table': text_table, 'scale': 10.0, 'bias': -10.0}
  # Every image's own class at cosine 1: logit 10 * 1 - 10 = 0, a match probability of 1/2.
  assert run_evaluator(config, trainer, params) == {'accuracy': 1.0, 'chance': 0.25,
                                                    'true_class_probability': 0.5}


def test_zero_shot_is_at_chance_with_a_shuffled_class_mapping(classification_data):
  data_path, tokenizer_path, text_table = classification_data
  config, trainer = image_text_config(
      data_path, tokenizer_path, 'zero_shot', jax.devices(), (2, 4))
  # Image i of class c looks like class (c + i) % C: exactly one image per class is right.
  shuffled = image_table_for(lambda class_id, index: (class_id + index) % len(CLASS_NAMES))
  scalars = run_evaluator(config, trainer, {'image_table': shuffled, 'text_table': text_table})
  assert scalars['accuracy'] == pytest.approx(scalars['chance']) == pytest.approx(0.25)


def test_zero_shot_config_errors_are_named(classification_data):
  data_path, tokenizer_path, _ = classification_data
  config, trainer = image_text_config(
      data_path, tokenizer_path, 'zero_shot', jax.devices()[:1], (1, 1))
  config.evals.zero_shot.prompts = ('a photo of a {}.', 'a photo')
  with pytest.raises(ValueError, match=r"zero_shot\.prompts=\('a photo of a \{\}\.', 'a photo'\): "
                                       r"must be a non-empty tuple of strings, each with '\{\}' once"):
    validate_stage_config(config)  # before any evaluator is built
  config.evals.zero_shot.prompts = DEFAULT_PROMPTS
  config.evals.zero_shot.class_names = ('only one',)
  (evaluator,) = build_evaluators(config, LookupObjective(config), trainer, workdir=None)
  with pytest.raises(ValueError, match=r'class_names has 1 names, but the held-out split has 4'):
    evaluator.class_names(CLASS_NAMES)
  config.data.text.tokenizer = None
  with pytest.raises(ValueError, match=r'config\.data\.text\.tokenizer is not set'):
    build_evaluators(config, LookupObjective(config), trainer, workdir=None)
  config.data.text.tokenizer = tokenizer_path
  with pytest.raises(ValueError, match=r"zero_shot: kind='zero_shot' needs an objective that "
                                       r'embeds images and texts.*objective \'mae\' does not '
                                       r"offer: use it with objective 'flip' or 'lit'"):
    build_evaluators(config, build_objective(config), trainer, workdir=None)


def test_class_prompts_are_class_major_and_names_readable():
  assert readable_class_name('golden_retriever') == 'golden retriever'
  assert class_prompts(['cat', 'dog'], ('a {}.', '{} {{x}}')) == [
      'a cat.', 'cat {{x}}', 'a dog.', 'dog {{x}}']
  with pytest.raises(ValueError, match=r'non-empty sequence of templates'):
    class_prompts(['cat'], ())


def test_class_embeddings_average_normalized_prompts():
  prompt_embeddings = np.array([[2, 0], [0, 5],   # class 0: two prompts
                                [0, -1], [0, -3]], np.float32)
  np.testing.assert_allclose(class_text_embeddings(prompt_embeddings, 2),
                             [[np.sqrt(0.5), np.sqrt(0.5)], [0, -1]], atol=1e-6)
  images = np.array([[1, 1.1], [0.1, -1], [3, 2]], np.float32)
  np.testing.assert_array_equal(
      zero_shot_predictions(images, class_text_embeddings(prompt_embeddings, 2)), [0, 1, 0])


def test_embed_token_rows_pads_the_last_batch_and_drops_it():
  mesh = sharding_lib.make_mesh(dict(data=2, fsdp=4, tensor=1), jax.devices())
  embed = jax.jit(lambda params, tokens: tokens.astype(jnp.float32) * params,
                  out_shardings=sharding_lib.batch_sharding(mesh))
  tokens = np.arange(30 * 3, dtype=np.int32).reshape(30, 3)
  embeddings = embed_token_rows(embed, 2.0, tokens, pad_id=0, batch_size=12, mesh=mesh,
                                rules=sharding_lib.DEFAULT_LOGICAL_AXIS_RULES)
  np.testing.assert_array_equal(embeddings, tokens * 2.0)


# --- Retrieval ---------------------------------------------------------------------

def brute_force_recall(similarities, k):
  """Fraction of rows whose diagonal is among the k first of a stable descending sort."""
  order = np.argsort(-similarities, axis=1, kind='stable')[:, :k]
  return float(np.mean([row in order[row] for row in range(len(similarities))]))


def test_recalls_equal_a_brute_force_including_ties():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(40, 6)).astype(np.float32)
  texts = rng.normal(size=(40, 6)).astype(np.float32)
  texts[10:20] = texts[0]      # Repeated captions: exact ties among texts.
  images[30:35] = images[25]   # And among images.
  texts[25] = images[25]
  recalls = retrieval_recalls(images, texts, ks=(1, 5, 10))
  similarities = images @ texts.T
  for k in (1, 5, 10):
    assert recalls[f'image_to_text_recall@{k}'] == brute_force_recall(similarities, k)
    assert recalls[f'text_to_image_recall@{k}'] == brute_force_recall(similarities.T, k)
  assert paired_ranks(np.ones((3, 3))).tolist() == [0, 1, 2]  # Ties go to the lower index.
  with pytest.raises(ValueError, match='one caption per image'):
    retrieval_recalls(images, texts[:5])


@pytest.fixture(scope='module')
def retrieval_data(tmp_path_factory):
  """16 images, each with its own caption word; text i and image i embed as e_i."""
  root = tmp_path_factory.mktemp('retrieval')
  words = [f'word{chr(ord("a") + i)}' for i in range(16)]
  data_path = write_image_folder(root / 'images', {
      name: [(pixel_value(c, i), f'a photo of {words[4 * c + i]}')
             for i in range(IMAGES_PER_CLASS)]
      for c, name in enumerate(CLASS_NAMES)})
  tokenizer = tokenizer_lib.build_tokenizer(
      [f'a photo of {word}' for word in words], min_count=1, max_size=100)
  tokenizer_path = str(root / 'tokenizer.txt')
  tokenizer.write(tokenizer_path)
  text_table = np.zeros((tokenizer.vocab_size, 16), np.float32)
  for index, word in enumerate(words):
    text_table[tokenizer.token_id(word), index] = 1.0
  return data_path, tokenizer_path, text_table


def retrieval_image_table(image_embedding):
  table = np.zeros((256, 16), np.float32)
  for class_id in range(len(CLASS_NAMES)):
    for index in range(IMAGES_PER_CLASS):
      table[pixel_value(class_id, index)] = image_embedding(4 * class_id + index)
  return table


def test_recall_is_perfect_when_image_and_caption_embeddings_coincide(retrieval_data):
  data_path, tokenizer_path, text_table = retrieval_data
  config, trainer = image_text_config(
      data_path, tokenizer_path, 'retrieval', jax.devices(), (2, 4))
  params = {'image_table': retrieval_image_table(lambda i: np.eye(16)[i]),
            'text_table': text_table}
  scalars = run_evaluator(config, trainer, params)
  # Cosine scoring (no temperature): a softmax over 16 captions, the own one at cosine 1.
  assert scalars.pop('pair_probability') == pytest.approx(np.e / (np.e + 15), rel=1e-6)
  assert scalars == {
      'image_to_text_recall@1': 1.0, 'image_to_text_recall@5': 1.0,
      'text_to_image_recall@1': 1.0, 'text_to_image_recall@5': 1.0}


def test_recall_at_five_finds_a_pair_that_is_always_second(retrieval_data):
  data_path, tokenizer_path, text_table = retrieval_data
  config, trainer = image_text_config(
      data_path, tokenizer_path, 'retrieval', jax.devices(), (2, 4))
  # Image i is closest to caption i + 1 and second closest to its own, caption i.
  neighbour_first = lambda i: np.eye(16)[i] + 2 * np.eye(16)[(i + 1) % 16]
  params = {'image_table': retrieval_image_table(neighbour_first), 'text_table': text_table,
            'scale': 10.0, 'bias': -10.0}
  scalars = run_evaluator(config, trainer, params)
  # The own caption at cosine 1 / sqrt(5), scored by the model's sigmoid.
  own_logit = 10 / np.sqrt(5) - 10
  assert scalars.pop('pair_probability') == pytest.approx(1 / (1 + np.exp(-own_logit)),
                                                          rel=1e-5)
  assert scalars == {
      'image_to_text_recall@1': 0.0, 'image_to_text_recall@5': 1.0,
      'text_to_image_recall@1': 0.0, 'text_to_image_recall@5': 1.0}
