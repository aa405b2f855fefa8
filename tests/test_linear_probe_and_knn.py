"""Linear-probe and k-NN evaluators: exact on known data, sharded == one device."""

import jax
import numpy as np
import pytest

from big_pretrain import sharding as sharding_lib
from big_pretrain.config.defaults import chain_config
from big_pretrain.config.validation import validate_stage_config
from big_pretrain.evaluators import build_evaluators, evaluator_config
from big_pretrain.evaluators.eval_split import split_data_config
from big_pretrain.evaluators.features import SplitFeatures, extract_features
from big_pretrain.evaluators.knn import knn_classify, nearest_neighbours, weighted_vote
from big_pretrain.evaluators.linear_probe import classify, fit_linear_classifier, standardize
from big_pretrain.stages import chain
from big_pretrain.storage.stage_dir import StageDir
from helpers.numerics import assert_close_in_scale
from helpers.probe_data import gaussian_blobs
from helpers.tiny_config import tiny_mae_config, tiny_trainer


def brute_force_cosine(train, test):
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  return test @ train.T  # (N_test, N_train)


# --- Linear probe -------------------------------------------------------------

def test_linear_probe_separates_far_apart_blobs():
  rng = np.random.default_rng(0)
  centres = 8.0 * rng.normal(size=(5, 16))  # ~45 apart, unit spread: linearly separable.
  train, train_labels = gaussian_blobs(rng, 500, centres)
  test, test_labels = gaussian_blobs(rng, 500, centres)  # drawn separately
  train, test = standardize(train, test)
  weights, bias = fit_linear_classifier(train, train_labels, 5, l2=1e-4, num_steps=200)
  assert weights.shape == (16, 5) and bias.shape == (5,)
  assert np.mean(classify(test, weights, bias) == test_labels) >= 0.98
  assert np.mean(classify(train, weights, bias) == train_labels) >= 0.98


def test_linear_probe_is_at_chance_on_random_labels():
  rng = np.random.default_rng(1)
  features = rng.normal(size=(2000, 32))
  labels = rng.integers(10, size=2000)
  train, test = standardize(features[:1000], features[1000:])
  weights, bias = fit_linear_classifier(train, labels[:1000], 10, l2=1e-4, num_steps=200)
  accuracy = np.mean(classify(test, weights, bias) == labels[1000:])
  # Chance is 0.1; over 1000 independent test points its std is sqrt(0.1 * 0.9 / 1000)
  # ~ 0.0095, so 0.05 is a ~5-sigma margin.
  assert abs(accuracy - 0.1) < 0.05


def test_linear_probe_rejects_labels_outside_the_classes():
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 3\).*num_classes'):
    fit_linear_classifier(np.zeros((4, 2)), np.array([0, 1, 2, 3]), 3, l2=1e-4, num_steps=5)


# --- k-NN -----------------------------------------------------------------------

@pytest.mark.parametrize('chunk_size', [4, 64, 4096])  # below k, below both splits, above both
def test_nearest_neighbours_equal_brute_force(chunk_size):
  rng = np.random.default_rng(2)
  train, test = rng.normal(size=(300, 8)), rng.normal(size=(70, 8))
  k = 10
  similarities, indices = nearest_neighbours(train, test, k, chunk_size=chunk_size)
  assert similarities.shape == indices.shape == (70, k)
  brute = brute_force_cosine(train, test)
  expected = np.argsort(-brute, axis=1, kind='stable')[:, :k]
  for row in range(len(test)):
    assert set(indices[row]) == set(expected[row]), row
  np.testing.assert_allclose(similarities, np.take_along_axis(brute, expected, axis=1),
                             atol=1e-5)
  assert np.all(np.diff(similarities, axis=1) <= 0)  # best first


def test_train_point_is_its_own_nearest_neighbour():
  rng = np.random.default_rng(3)
  train = rng.normal(size=(200, 16))
  similarities, indices = nearest_neighbours(train, train[:50], k=3, chunk_size=32)
  np.testing.assert_array_equal(indices[:, 0], np.arange(50))
  np.testing.assert_allclose(similarities[:, 0], 1.0, atol=1e-5)


def test_knn_is_perfect_on_separated_clusters():
  rng = np.random.default_rng(4)
  centres = rng.normal(size=(6, 32))  # random directions: nearly orthogonal in 32-D
  train, train_labels = gaussian_blobs(rng, 600, centres, spread=0.05)
  test, test_labels = gaussian_blobs(rng, 200, centres, spread=0.05)
  predictions = knn_classify(train, train_labels, test, num_classes=6, k=20,
                             temperature=0.07, chunk_size=128)
  assert np.mean(predictions == test_labels) == 1.0


def test_one_neighbour_gives_the_nearest_label():
  rng = np.random.default_rng(5)
  train, test = rng.normal(size=(100, 8)), rng.normal(size=(40, 8))
  train_labels = rng.integers(7, size=100)
  predictions = knn_classify(train, train_labels, test, num_classes=7, k=1, temperature=0.07)
  nearest = brute_force_cosine(train, test).argmax(axis=1)
  np.testing.assert_array_equal(predictions, train_labels[nearest])


def test_vote_weights_follow_the_temperature():
  # One very similar neighbour of class 1 against two less similar ones of class 0.
  similarities = np.array([[0.9, 0.5, 0.5]])
  labels = np.array([[1, 0, 0]])
  assert weighted_vote(similarities, labels, 2, temperature=0.07)[0] == 1  # sharp: closest wins
  assert weighted_vote(similarities, labels, 2, temperature=100.0)[0] == 0  # flat: majority


def test_too_many_neighbours_is_named():
  with pytest.raises(ValueError, match=r'k=5 must lie in \[1, 4\]'):
    nearest_neighbours(np.ones((4, 3)), np.ones((2, 3)), k=5)


# --- Data config per split -----------------------------------------------------

def test_split_overrides_apply_and_unknown_keys_are_named():
  data = tiny_mae_config().data
  test_data = split_data_config(data, {'split': 'test'}, num_examples=96)
  assert (test_data.split, test_data.num_examples, data.split) == ('test', 96, 'train')
  with pytest.raises(ValueError, match=r'config\.evals\.knn\.test_data\.splt: not a config\.data'):
    split_data_config(data, {'splt': 'test'}, culprit='config.evals.knn.test_data')


def test_extract_features_reads_exactly_num_examples_on_eight_devices():
  config = tiny_mae_config()
  config.mesh.update(data=2, fsdp=4, tensor=1)
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices())
  # A stand-in encoder: the mean colour of each image, so no model needs compiling.
  encode = jax.jit(lambda params, images: images.mean(axis=(1, 2)),
                   out_shardings=sharding_lib.batch_sharding(mesh))
  # batch_size=12 rounds up to 16 for the 8 batch shards; 21 examples need a second,
  # partly used batch, and the result must still hold exactly 21.
  data = split_data_config(config.data, {'split': 'test'}, num_examples=21)
  features, labels, class_names = extract_features(
      encode, None, data, num_examples=21, batch_size=12, mesh=mesh,
      rules=sharding_lib.logical_axis_rules(config))
  assert features.shape == (21, 3) and features.dtype == np.float32
  # 21 distinct examples of the split (a fixed shuffled subset of the 32 generated).
  assert len(np.unique(features, axis=0)) == 21
  assert labels.shape == (21,) and set(labels) <= set(range(10))
  assert len(class_names) == 10


# --- End to end on the embedded data ------------------------------------------

def _evaluate_untrained_mae(devices, mesh_shape):
  """Runs both evaluators on an untrained tiny MAE on `devices`; returns scalars and features."""
  config = tiny_mae_config()
  config.mesh.update(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=1)
  for kind in ('linear_probe', 'knn'):
    config.evals[kind] = evaluator_config(kind)
    config.evals[kind].update(train_examples=256, test_examples=128, batch_size=128)
  config.evals.linear_probe.num_steps = 100
  validate_stage_config(config)
  objective, trainer = tiny_trainer(config, devices)
  params = trainer.init_state(jax.random.key(config.seed)).params
  evaluators = build_evaluators(config, objective, trainer, workdir='unused')
  scalars = {evaluator.name: evaluator.run(params, step=0).scalars for evaluator in evaluators}
  return scalars, evaluators[0].features(params)


@pytest.fixture(scope='module')
def one_and_eight_devices():
  return (_evaluate_untrained_mae(jax.devices()[:1], (1, 1)),
          _evaluate_untrained_mae(jax.devices(), (2, 4)))


@pytest.mark.integration
def test_evaluators_run_end_to_end_and_sharded_equals_one_device(one_and_eight_devices):
  (single_scalars, single_features), (sharded_scalars, sharded_features) = one_and_eight_devices
  assert set(single_scalars['linear_probe']) == {'accuracy', 'train_accuracy', 'chance'}
  assert set(single_scalars['knn']) == {'accuracy', 'chance'}
  for scalars in (single_scalars, sharded_scalars):
    for result in scalars.values():
      assert all(0.0 <= value <= 1.0 for value in result.values())
  assert single_features.train_features.shape == (256, 64)
  assert single_features.test_features.shape == (128, 64)
  assert single_features.num_classes == 10
  assert_close_in_scale(sharded_features.train_features, single_features.train_features)
  assert_close_in_scale(sharded_features.test_features, single_features.test_features)
  np.testing.assert_array_equal(sharded_features.test_labels, single_features.test_labels)
  assert sharded_scalars == single_scalars


@pytest.mark.integration
def test_held_out_split_differs_from_train_split(one_and_eight_devices):
  (_, features), _ = one_and_eight_devices
  # Held-out images are new images: no test feature repeats a training feature.
  for row in range(8):
    distances = np.abs(features.train_features - features.test_features[row]).max(axis=1)
    assert distances.min() > 1e-6, row


def test_chance_is_one_over_the_number_of_classes():
  empty = np.zeros((0, 2), np.float32)
  features = SplitFeatures(empty, np.zeros(0, np.int32), np.zeros((5, 2), np.float32),
                           np.array([2, 0, 2, 1, 2], np.int32), ['a', 'b', 'c', 'd'])
  assert features.chance == 1 / 4  # not 3/5, however unbalanced the held-out labels


def test_the_closing_summary_names_the_image_an_evaluator_drew(tmp_path):
  """MAE's reconstruction scores nothing: the summary lists the grid it wrote, not '(no
  evaluator results yet)'."""
  stage = StageDir(str(tmp_path))
  stage.write_results(stage.eval_results_file, 6, {'reconstruction': {}})
  with open(stage.evaluator_image('reconstruction'), 'wb') as f:
    f.write(b'\x89PNG')
  results = chain.collect_eval_results(chain_config(mae=tiny_mae_config()), {'mae': str(tmp_path)})
  table = chain.format_eval_results(results)
  assert results == {'mae': {'step': 6, 'reconstruction': {'image': stage.evaluator_image(
      'reconstruction')}}}
  assert f'reconstruction           image                      {tmp_path}/reconstruction.png' in table
