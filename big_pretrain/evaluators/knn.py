"""Weighted k-nearest-neighbour classification on frozen, pooled features.

As in DINO (Caron et al., 2021): features are L2-normalized, each held-out
feature finds its `k` most cosine-similar training features, and every
neighbour votes for its label with weight exp(similarity / temperature).
Reports the top-1 `accuracy` of the vote on the held-out split.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from big_pretrain.errors import ConfigError
from big_pretrain.evaluators.evaluator import EvalResult
from big_pretrain import schema
from big_pretrain.evaluators.features import FrozenFeatureEvaluator, feature_eval_keys

# Rows of train and of test features compared at once: the similarity block is
# at most this squared (4096^2 float32 = 64 MiB), however large the splits.
DEFAULT_CHUNK_SIZE = 4096
# Zero features stay zero (similarity 0 to everything) instead of becoming NaN.
MIN_FEATURE_NORM = 1e-12


def l2_normalize(features: np.ndarray) -> np.ndarray:
  features = np.asarray(features, np.float32)
  norms = np.linalg.norm(features, axis=1, keepdims=True)
  return features / np.maximum(norms, MIN_FEATURE_NORM)


@functools.partial(jax.jit, static_argnames=('k',))
def _top_k_over_train_chunks(test_chunk, train_chunks, num_train, *, k):
  """(similarities, indices) of the k best of all train chunks for one test chunk.

  train_chunks: (num_chunks, chunk, D), zero-padded past `num_train` rows.
  """
  num_chunks, chunk, _ = train_chunks.shape

  def merge_chunk(best, chunk_and_offset):
    best_similarities, best_indices = best
    train_chunk, offset = chunk_and_offset
    # HIGHEST: TPUs otherwise multiply float32 in bfloat16 passes, which reorders neighbours.
    similarities = jnp.dot(test_chunk, train_chunk.T, precision=jax.lax.Precision.HIGHEST)
    indices = offset + jnp.arange(chunk, dtype=jnp.int32)
    similarities = jnp.where(indices < num_train, similarities, -jnp.inf)  # padding rows
    # The running best come first, and top_k prefers the earlier of equal values, so
    # ties resolve to the lower train index, as a stable sort would.
    candidates = jnp.concatenate([best_similarities, similarities], axis=1)
    candidate_indices = jnp.concatenate(
        [best_indices, jnp.broadcast_to(indices, similarities.shape)], axis=1)
    top_similarities, positions = jax.lax.top_k(candidates, k)
    return (top_similarities,
            jnp.take_along_axis(candidate_indices, positions, axis=1)), None

  start = (jnp.full((test_chunk.shape[0], k), -jnp.inf, jnp.float32),
           jnp.full((test_chunk.shape[0], k), -1, jnp.int32))
  offsets = jnp.arange(num_chunks, dtype=jnp.int32) * chunk
  best, _ = jax.lax.scan(merge_chunk, start, (train_chunks, offsets))
  return best


def _pad_rows(array: np.ndarray, multiple: int) -> np.ndarray:
  padding = -len(array) % multiple
  return np.pad(array, ((0, padding), (0, 0))) if padding else array


def nearest_neighbours(train_features, test_features, k: int,
                       chunk_size: int = DEFAULT_CHUNK_SIZE):
  """The k train features most cosine-similar to each test feature, exactly.

  Compares `chunk_size` rows of each side at a time and keeps a running top-k,
  so no (N_test, N_train) matrix is ever formed.

  Returns:
    (similarities (N_test, k) float32, indices (N_test, k) int32 into
    train_features), each row by decreasing similarity; ties go to the lower index.
  """
  train = l2_normalize(train_features)
  test = l2_normalize(test_features)
  if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
    raise ValueError(
        f'Need (N, D) train and test features of the same D; got {train.shape} and '
        f'{test.shape}.')
  if not 1 <= k <= len(train):
    raise ValueError(f'k={k} must lie in [1, {len(train)}], the number of train features.')
  if chunk_size <= 0:
    raise ValueError(f'chunk_size={chunk_size} must be positive.')
  train_chunk = min(chunk_size, len(train))
  test_chunk = min(chunk_size, max(len(test), 1))
  train_chunks = _pad_rows(train, train_chunk).reshape(-1, train_chunk, train.shape[1])
  padded_test = _pad_rows(test, test_chunk)
  similarities, indices = [], []
  for start in range(0, len(padded_test), test_chunk):
    chunk_similarities, chunk_indices = _top_k_over_train_chunks(
        padded_test[start:start + test_chunk], train_chunks, np.int32(len(train)), k=k)
    similarities.append(np.asarray(chunk_similarities))
    indices.append(np.asarray(chunk_indices))
  if not similarities:  # No test features.
    return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
  return (np.concatenate(similarities)[:len(test)],
          np.concatenate(indices)[:len(test)])


def weighted_vote(similarities, neighbour_labels, num_classes: int,
                  temperature: float) -> np.ndarray:
  """Each row's class with the largest sum of exp(similarity / temperature) over its neighbours.

  Ties between classes go to the lower class id.
  """
  similarities = np.asarray(similarities, np.float64)
  neighbour_labels = np.asarray(neighbour_labels)
  if temperature <= 0:
    raise ValueError(f'temperature={temperature} must be positive.')
  if neighbour_labels.size and (neighbour_labels.min() < 0
                                or neighbour_labels.max() >= num_classes):
    raise ValueError(
        f'Labels must lie in [0, {num_classes}); got [{neighbour_labels.min()}, '
        f'{neighbour_labels.max()}]. Pass the number of classes of the dataset.')
  # Shifting by each row's largest similarity leaves the vote unchanged and keeps
  # exp() finite at small temperatures.
  weights = np.exp((similarities - similarities.max(axis=1, keepdims=True)) / temperature)
  votes = np.zeros((len(similarities), num_classes))
  rows = np.arange(len(similarities))
  for column in range(similarities.shape[1]):  # k columns: no (N, k, C) one-hot tensor.
    np.add.at(votes, (rows, neighbour_labels[:, column]), weights[:, column])
  return votes.argmax(axis=1)


def knn_classify(train_features, train_labels, test_features, *, num_classes: int, k: int,
                 temperature: float, chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
  """Predicted class (N_test,) of each test feature by the weighted vote of its k neighbours."""
  train_labels = np.asarray(train_labels)
  if train_labels.shape != (len(train_features),):
    raise ValueError(
        f'train_labels must be ({len(train_features)},); got {train_labels.shape}.')
  similarities, indices = nearest_neighbours(train_features, test_features, k, chunk_size)
  return weighted_vote(similarities, train_labels[indices], num_classes, temperature)


class KnnEvaluator(FrozenFeatureEvaluator):

  config_keys = feature_eval_keys(
      'knn', 'weighted cosine k-nearest-neighbour classification on the frozen features',
      k=schema.Key(20, schema.COUNT, 'the neighbours that vote'),
      temperature=schema.Key(0.07, schema.above(0),
                             'a vote weighs exp(similarity / temperature), as in DINO'))

  @classmethod
  def check_config(cls, eval_config, path):
    if not 1 <= eval_config.k <= eval_config.train_examples:
      raise ConfigError(
          f'{path}.k={eval_config.k} must lie in [1, train_examples='
          f'{eval_config.train_examples}]: lower k or raise train_examples.')

  def run(self, params, step):
    data = self.features(params)
    if self.eval_config.k > len(data.train_labels):
      raise ValueError(
          f'{self.culprit("k")}={self.eval_config.k} exceeds the '
          f'{len(data.train_labels)} train examples read: the train split is smaller than '
          'train_examples. Lower k, or point train_data at a larger split.')
    predictions = knn_classify(
        data.train_features, data.train_labels, data.test_features,
        num_classes=data.num_classes, k=self.eval_config.k,
        temperature=self.eval_config.temperature)
    return EvalResult(scalars={'accuracy': float(np.mean(predictions == data.test_labels)),
                               'chance': data.chance})
