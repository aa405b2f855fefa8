"""SigLIP's sigmoid loss (objectives/sigmoid_loss.py) and FLIP / LiT with it."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from big_pretrain import sharding as sharding_lib
from big_pretrain.config.validation import validate_stage_config
from big_pretrain.objectives import build_objective
from big_pretrain.objectives.flip import contrastive_loss, l2_normalize, logit_scale_from
from big_pretrain.objectives.objective import PairScoring
from big_pretrain.objectives.sigmoid_loss import dense_sigmoid_loss, sigmoid_loss
from helpers.numerics import FLOAT32_EPS, assert_trees_close_in_scale
from helpers.tiny_config import tiny_flip_config, tiny_trainer

T_PRIME_INIT, BIAS_INIT = math.log(10), -10.0


def _raw_embeddings(n=32, dim=8, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (n, dim)), jax.random.normal(k2, (n, dim))


def _loss_from_raw(loss_fn):
  def loss(raw_images, raw_texts, t_prime, bias):
    return loss_fn(l2_normalize(raw_images), l2_normalize(raw_texts), jnp.exp(t_prime), bias)[0]
  return loss


def _random_batch(objective, n=16):
  """Random uint8 images and token ids within the tokenizer's vocabulary."""
  rng = np.random.default_rng(0)
  vocab_size = objective.model.text_encoder.vocab_size
  return {'image': rng.integers(0, 256, (n, 32, 32, 3), np.uint8),
          'text_tokens': rng.integers(4, vocab_size, (n, 16), np.int32)}


def _sigmoid_flip_config(**objective):
  config = tiny_flip_config()
  config.objective.update(loss='sigmoid', **objective)
  return config


# --- The loss ---------------------------------------------------------------------------

@pytest.mark.parametrize('mesh_shape', [(2, 4, 1), (1, 2, 4), (1, 1, 1)],
                         ids=['data2_fsdp4', 'fsdp2_tensor4', 'one_device'])
def test_chunked_loss_and_gradients_equal_the_dense_all_pairs_loss(mesh_shape):
  raw_images, raw_texts = _raw_embeddings()
  args = (jnp.float32(T_PRIME_INIT + 0.3), jnp.float32(-4.0))  # both loss terms matter
  grad_fn = lambda loss_fn: jax.jit(jax.value_and_grad(_loss_from_raw(loss_fn),
                                                       argnums=(0, 1, 2, 3)))
  dense_loss, dense_grads = grad_fn(dense_sigmoid_loss)(raw_images, raw_texts, *args)

  devices = jax.devices()[:math.prod(mesh_shape)]
  mesh = sharding_lib.make_mesh(dict(zip(sharding_lib.MESH_AXES, mesh_shape)), devices)
  batch = NamedSharding(mesh, PartitionSpec(sharding_lib.BATCH_AXES))
  with sharding_lib.activate(mesh, sharding_lib.DEFAULT_LOGICAL_AXIS_RULES):
    chunked_loss, chunked_grads = grad_fn(sigmoid_loss)(
        jax.device_put(raw_images, batch), jax.device_put(raw_texts, batch), *args)
  # A sum of N^2 = 1024 positive terms in another order: a few eps relative (sqrt(1024)
  # eps = 4e-6 is Higham's bound); the gradients sum the same terms, compared in scale.
  np.testing.assert_allclose(chunked_loss, dense_loss, rtol=32 * FLOAT32_EPS)
  assert_trees_close_in_scale(chunked_grads, dense_grads)


def test_every_other_devices_texts_take_part():
  """The ring's negatives count: per-device (local) losses alone give another loss."""
  raw_images, raw_texts = _raw_embeddings()
  loss = _loss_from_raw(dense_sigmoid_loss)
  args = (jnp.float32(T_PRIME_INIT), jnp.float32(-4.0))
  local = sum(loss(raw_images[i:i + 4], raw_texts[i:i + 4], *args) * 4 for i in range(0, 32, 4))
  assert abs(float(local) / 32 - float(loss(raw_images, raw_texts, *args))) > 0.1


def test_loss_of_orthonormal_pairs_at_initialisation_is_the_closed_form():
  # Own caption: cosine 1, logit t + b = 0, -log sigmoid(0) = log 2. Any other: cosine 0,
  # logit b = -10, -log sigmoid(10) = log(1 + e^-10). Divided by N: log 2 + (N-1) log(1+e^-10).
  n = 16
  embeddings = jnp.eye(n, 32)
  loss, accuracy = dense_sigmoid_loss(embeddings, embeddings, jnp.float32(10.0),
                                      jnp.float32(BIAS_INIT))
  # A float32 sum of N^2 = 256 positive terms: sqrt(256) eps relative (Higham's bound).
  np.testing.assert_allclose(loss, math.log(2) + (n - 1) * math.log1p(math.exp(-10)),
                             rtol=16 * FLOAT32_EPS)
  assert accuracy == 1.0


def test_gradient_of_a_logit_is_what_the_derivation_gives_and_pulls_pairs_together():
  """d loss / d logit_ij = -z_ij sigmoid(-z_ij logit_ij) / N: negative for a matching pair
  (its logit is pushed up, the pair's embeddings pulled together), positive for the rest."""
  raw_images, raw_texts = _raw_embeddings(n=8)
  images, texts = l2_normalize(raw_images), l2_normalize(raw_texts)
  scale, bias = jnp.float32(10.0), jnp.float32(BIAS_INIT)
  logits = np.asarray(scale * images @ texts.T + bias, np.float64)
  signs = 2 * np.eye(8) - 1
  want = -signs / (1 + np.exp(signs * logits)) / 8
  # Through the embeddings: d loss / d x_i = t sum_j (d loss / d logit_ij) y_j.
  got = jax.grad(lambda x: dense_sigmoid_loss(x, texts, scale, bias)[0])(images)
  np.testing.assert_allclose(got, float(scale) * want @ np.asarray(texts, np.float64),
                             atol=1e-6 * np.abs(got).max())
  assert np.all(np.diagonal(want) < 0) and np.all(want[~np.eye(8, dtype=bool)] > 0)
  # A descent step moves each image towards its own caption.
  step = images - 0.1 * got
  assert np.all(np.sum(l2_normalize(step) * texts, axis=1) > np.sum(images * texts, axis=1))
  # The bias: up while the positives' pull (-1/2 each at logit 0) outweighs the negatives'.
  at_init = jax.grad(lambda b: dense_sigmoid_loss(jnp.eye(8), jnp.eye(8), scale, b)[0])(bias)
  np.testing.assert_allclose(at_init, -0.5 + 7 / (1 + math.exp(10)), rtol=1e-5)


def test_logits_live_in_local_blocks_in_the_compiled_program():
  """Read from the compiled HLO: a device's logits are local x local blocks for the sigmoid
  loss, while the softmax's rows span the global batch."""
  n, local, dim = 48, 6, 16  # 48 is no other size of this program
  mesh = sharding_lib.make_mesh({'data': 2, 'fsdp': 4, 'tensor': 1})
  embeddings = jax.ShapeDtypeStruct((n, dim), jnp.float32,
                                    sharding=NamedSharding(mesh, PartitionSpec(
                                        sharding_lib.BATCH_AXES)))
  scalar = jax.ShapeDtypeStruct((), jnp.float32)

  def shapes(loss):
    with sharding_lib.activate(mesh, sharding_lib.DEFAULT_LOGICAL_AXIS_RULES):
      hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(
          embeddings, embeddings, scalar, scalar).compile().as_text()
    return set(re.findall(r'f32\[(\d+),(\d+)\]', hlo))

  sigmoid_shapes = shapes(_loss_from_raw(sigmoid_loss))
  softmax_shapes = shapes(lambda x, y, t, b: contrastive_loss(
      l2_normalize(x), l2_normalize(y), logit_scale_from(t))[0])
  global_rows = {(str(local), str(n)), (str(n), str(local)), (str(n), str(n))}
  assert softmax_shapes & global_rows  # the check sees global rows where they exist
  assert not sigmoid_shapes & global_rows
  assert (str(local), str(local)) in sigmoid_shapes
  assert not any(str(n) in shape for shape in sigmoid_shapes)  # nothing global-batch sized


# --- FLIP and LiT with it -----------------------------------------------------------------

@pytest.mark.integration
def test_flip_with_sigmoid_loss_starts_at_the_closed_form_of_its_initialisation():
  config = _sigmoid_flip_config()
  validate_stage_config(config)
  objective = build_objective(config)
  params = nn.meta.unbox(jax.jit(objective.init_params)(jax.random.key(0)))
  assert float(params['logit_scale']) == np.float32(T_PRIME_INIT)
  assert float(params['logit_bias']) == BIAS_INIT
  scoring = objective.pair_scoring(params)
  assert scoring.independent and scoring.bias == BIAS_INIT
  np.testing.assert_allclose(scoring.scale, 10.0, rtol=2 * FLOAT32_EPS)
  batch = _random_batch(objective)
  loss, metrics = jax.jit(lambda p: objective.loss(p, batch, jax.random.key(0), False))(params)
  images = np.asarray(objective.embed_images(params, batch['image']), np.float64)
  texts = np.asarray(objective.embed_texts(params, batch['text_tokens']), np.float64)
  logits = 10.0 * images @ texts.T + BIAS_INIT
  signs = 2 * np.eye(16) - 1
  want = np.sum(np.logaddexp(0, -signs * logits)) / 16  # -log sigmoid(z l) = softplus(-z l)
  # 256 terms of float32 logits of size ~10: a few eps of 10 each, relative to the sum.
  assert np.isfinite(want)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert float(metrics['logit_bias']) == BIAS_INIT


@pytest.mark.integration
def test_flip_with_sigmoid_loss_on_8_devices_equals_one_device_with_patches_dropped():
  from big_pretrain.data.train_input import InputPipeline
  config = _sigmoid_flip_config()
  assert config.objective.mask_ratio == 0.5
  results = {}
  for name, mesh_shape, devices in (('sharded', (2, 4, 1), jax.devices()),
                                    ('single', (1, 1, 1), jax.devices()[:1])):
    config.mesh.update(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2])
    objective, trainer = tiny_trainer(config, devices)
    params = trainer.init_state(jax.random.key(0)).params
    batch = next(InputPipeline(config.data, global_batch_size=16, mesh=trainer.mesh))
    grad_fn = jax.jit(jax.value_and_grad(objective.loss, has_aux=True), static_argnums=3)
    with sharding_lib.activate(trainer.mesh, trainer.rules):
      (loss, metrics), grads = grad_fn(params, batch, jax.random.key(3), True)
    results[name] = (float(loss), float(metrics['batch_accuracy']), jax.device_get(grads))
  assert results['sharded'][0] == pytest.approx(results['single'][0], rel=1e-5)
  assert results['sharded'][1] == results['single'][1]
  assert_trees_close_in_scale(results['sharded'][2], results['single'][2])
  assert 'logit_bias' in results['single'][2]


@pytest.mark.integration
def test_softmax_is_the_default_and_unchanged():
  """The default FLIP model has no bias, starts at 1/0.07, and its loss is InfoNCE of its
  embeddings, bit for bit."""
  config = tiny_flip_config()
  assert config.objective.loss == 'softmax'
  objective = build_objective(config)
  params = nn.meta.unbox(jax.jit(objective.init_params)(jax.random.key(0)))
  assert 'logit_bias' not in params
  assert float(params['logit_scale']) == np.float32(math.log(1 / 0.07))
  resolved = type(objective).resolve_config(config)
  assert resolved.objective.temperature_init == 0.07
  batch = _random_batch(objective)

  @jax.jit
  def both(params):
    loss = objective.loss(params, batch, jax.random.key(0), False)[0]
    reference = contrastive_loss(objective.embed_images(params, batch['image']),
                                 objective.embed_texts(params, batch['text_tokens']),
                                 logit_scale_from(params['logit_scale']))[0]
    return loss, reference
  loss, reference = both(params)
  assert np.isfinite(float(loss)) and float(loss) == float(reference)
  assert not objective.pair_scoring(params).independent


def test_lit_with_sigmoid_loss_trains_the_bias_and_locks_the_tower():
  from configs import siglit
  config = siglit.get_config('demo')
  config.init_from.checkpoint = '/nonexistent'  # only the objective is built here
  assert config.objective.loss == 'sigmoid' and config.objective.temperature_init == 0.1
  objective = build_objective(config)
  assert objective.is_trainable('logit_bias') and objective.is_trainable('logit_scale')
  assert not objective.is_trainable('encoder/patch_embed/kernel')
  params = jax.eval_shape(objective.init_params, jax.random.key(0))
  assert 'logit_bias' in params


def test_siglip_configs_validate_and_the_masked_chain_carries_the_bias():
  from big_pretrain.stages.chain_validation import validate_config
  from configs import siglip
  paper = siglip.get_config()
  assert paper.objective.loss == 'sigmoid' and paper.objective.mask_ratio == 0
  assert paper.batch_size == 32768 and paper.objective.bias_init == BIAS_INIT
  assert paper.optim.lr_per_256 * paper.batch_size / 256 == pytest.approx(1e-3)
  demo = siglip.get_config('demo')
  validate_stage_config(demo)
  assert 'zero_shot_shape' in demo.evals
  masked = siglip.get_config('masked_demo')
  validate_config(masked)
  assert list(masked.stages) == ['pretrain', 'unmasked']
  assert masked.stages.pretrain.objective.mask_ratio == 0.5
  assert masked.stages.unmasked.objective.loss == 'sigmoid'
  assert 'logit_bias' in masked.stages.unmasked.init_from.take
  with pytest.raises(ValueError, match='unknown variant'):
    siglip.get_config('nope')


# --- Evaluators' scoring --------------------------------------------------------------------

def test_pair_scoring_gives_sigmoid_or_softmax_probabilities_of_the_models_logits():
  cosines = np.array([[0.9, 0.1, -0.2], [0.3, 0.8, 0.0]])
  sigmoid = PairScoring(scale=10.0, bias=-5.0, independent=True)
  np.testing.assert_allclose(sigmoid.probabilities(cosines),
                             1 / (1 + np.exp(-(10 * cosines - 5))), rtol=1e-6)
  softmax = PairScoring(scale=10.0, bias=-5.0, independent=False)
  probabilities = softmax.probabilities(cosines, axis=1)
  np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-12)
  # A shared bias cancels in a softmax.
  np.testing.assert_allclose(probabilities,
                             PairScoring(10.0, 0.0, False).probabilities(cosines, axis=1))
  # No overflow far from zero.
  assert np.all(np.isfinite(PairScoring(1000.0, -10.0, True).probabilities(-cosines)))


def test_zero_shot_and_retrieval_report_the_models_probabilities():
  from big_pretrain.evaluators.retrieval import retrieval_recalls
  from big_pretrain.evaluators.zero_shot import class_cosines, true_class_probability
  embeddings = np.eye(4, 8)
  scoring = PairScoring(scale=10.0, bias=-10.0, independent=True)
  labels = np.array([0, 1, 2, 3])
  # Own class: cosine 1, logit 0, probability 1/2.
  assert true_class_probability(class_cosines(embeddings, embeddings), labels,
                                scoring) == pytest.approx(0.5)
  recalls = retrieval_recalls(embeddings, embeddings, scoring=scoring)
  assert recalls['image_to_text_recall@1'] == 1.0
  assert recalls['pair_probability'] == pytest.approx(0.5)
  # Softmax over 4 captions at scale 10: e^10 / (e^10 + 3).
  softmax = retrieval_recalls(embeddings, embeddings, scoring=PairScoring(10.0, 0.0, False))
  assert softmax['pair_probability'] == pytest.approx(math.exp(10) / (math.exp(10) + 3))


@pytest.mark.integration
def test_a_sigmoid_flip_stage_trains_on_8_devices_and_its_evaluators_use_its_bias(tmp_path):
  from big_pretrain.evaluators import evaluator_config
  from big_pretrain.train.loop import train_stage
  config = _sigmoid_flip_config()
  config.mesh.update(data=2, fsdp=4, tensor=1)
  config.update(total_steps=3)
  config.log.every_steps = 1
  config.evals.zero_shot = evaluator_config('zero_shot', test_examples=32, batch_size=16,
                                            prompts=('a {}', 'a small {}'))
  config.evals.retrieval = evaluator_config('retrieval', test_examples=32, batch_size=16)
  validate_stage_config(config)
  result = train_stage(config, str(tmp_path))
  assert np.isfinite(result.last_metrics['loss'])
  assert result.last_metrics['logit_bias'] != BIAS_INIT  # the bias is trained
  # Near the initial bias every pair is judged "no match": probabilities far below 1/2.
  for evaluator, metric in (('zero_shot', 'true_class_probability'),
                            ('retrieval', 'pair_probability')):
    assert 0 < result.eval_results[evaluator][metric] < 0.1
