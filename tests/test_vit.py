"""ViT encoder tests (docs/methods.md, section 1).

Tiny models only ('mu': width 64, depth 2, heads 4, patch 8 on 32x32 images ->
16 patches); every apply is jitted once per module configuration.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec

from big_pretrain.config.defaults import stage_config
from big_pretrain.models import transformer as transformer_lib
from big_pretrain.models import vit as vit_lib
from big_pretrain.models.patches import sincos_2d_position_embedding
from big_pretrain.models.transformer import REMAT_POLICIES, Attention, Projection
from big_pretrain.models.vit import VIT_SIZES, VisionTransformer, parse_variant
from big_pretrain.objectives import objective_class
from helpers.numerics import assert_close_in_scale, assert_trees_close_in_scale
from helpers.trees import assert_trees_equal

WIDTH, DEPTH, HEADS, PATCH = 64, 2, 4, 8
BATCH, IMAGE_SIZE = 2, 32
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2


def make_vit(**overrides):
  kwargs = dict(width=WIDTH, depth=DEPTH, num_heads=HEADS, patch_size=PATCH)
  kwargs.update(overrides)
  return VisionTransformer(**kwargs)


_APPLY_CACHE = {}


def apply(module, params, images, **kwargs):
  """module.apply, jitted once per module configuration (shapes permitting)."""
  key = repr(module)
  if key not in _APPLY_CACHE:
    _APPLY_CACHE[key] = jax.jit(module.apply)
  return _APPLY_CACHE[key]({'params': params}, images, **kwargs)


@pytest.fixture(scope='module')
def images():
  return jnp.asarray(np.random.default_rng(0).normal(
      size=(BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32))


@pytest.fixture(scope='module')
def boxed_params(images):
  return jax.jit(make_vit().init)(jax.random.key(0), images)['params']


@pytest.fixture(scope='module')
def params(boxed_params):
  return nn.meta.unbox(boxed_params)


@pytest.fixture(scope='module')
def base_out(params, images):
  return apply(make_vit(), params, images)


def stack_blocks(unrolled_params, depth):
  """Unrolled params (block_0..) -> the scanned layout ('blocks', leading layer axis)."""
  transformer = dict(unrolled_params['transformer'])
  blocks = [transformer.pop(f'block_{i}') for i in range(depth)]
  transformer['blocks'] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *blocks)
  return {**unrolled_params, 'transformer': transformer}


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize('variant, expected', [
    ('B/16', (768, 12, 12, 16)),
    ('L/16', (1024, 24, 16, 16)),
    ('H/14', (1280, 32, 16, 14)),
    ('mu/8', (64, 2, 4, 8)),
    ('Ti/16', (192, 12, 3, 16)),
    ('S/16', (384, 12, 6, 16)),
    ('g/14', (1408, 40, 16, 14)),
    ('2B/14', (2560, 24, 32, 14)),
])
def test_parse_variant(variant, expected):
  size = parse_variant(variant)
  assert (size.width, size.depth, size.heads, size.patch_size) == expected


@pytest.mark.parametrize('variant', ['X/16', 'B16', 'B/', '/16', 'B/16/2', 'b/16', ''])
def test_parse_variant_rejects_bad_variant_and_names_it(variant):
  with pytest.raises(ValueError) as error:
    parse_variant(variant)
  assert repr(variant) in str(error.value)


def test_size_table_matches_methods():
  assert VIT_SIZES['Ti'] == (192, 12, 3)
  assert VIT_SIZES['S'] == (384, 12, 6)
  assert VIT_SIZES['B'] == (768, 12, 12)
  assert VIT_SIZES['L'] == (1024, 24, 16)
  assert VIT_SIZES['H'] == (1280, 32, 16)
  assert VIT_SIZES['g'] == (1408, 40, 16)
  assert VIT_SIZES['2B'] == (2560, 24, 32)
  for width, _, heads in VIT_SIZES.values():
    assert width % heads == 0


# ---------------------------------------------------------------- sin-cos


def mae_reference_2d_sincos(embed_dim, grid_h, grid_w):
  """The MAE reference (util/pos_embed.py), written independently in numpy."""

  def one_d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float64)
    omega /= dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  gh = np.arange(grid_h, dtype=np.float64)
  gw = np.arange(grid_w, dtype=np.float64)
  grid = np.meshgrid(gw, gh)  # w goes first
  grid = np.stack(grid, axis=0).reshape(2, 1, grid_h, grid_w)
  emb_h = one_d(embed_dim // 2, grid[0])  # the reference's "emb_h" reads grid[0]: the column
  emb_w = one_d(embed_dim // 2, grid[1])
  return np.concatenate([emb_h, emb_w], axis=1)


@pytest.mark.parametrize('dim, grid_h, grid_w', [(16, 4, 4), (64, 4, 4), (8, 2, 3), (32, 14, 14)])
def test_sincos_matches_mae_reference(dim, grid_h, grid_w):
  got = sincos_2d_position_embedding(dim, grid_h, grid_w)
  assert got.shape == (grid_h * grid_w, dim)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, mae_reference_2d_sincos(dim, grid_h, grid_w), atol=1e-6)


def test_sincos_layout_by_hand():
  """dim 16 on 4x4: channels 0-3 sin(col*omega), 4-7 cos(col*omega), 8-15 the same for the row."""
  dim, grid = 16, 4
  emb = sincos_2d_position_embedding(dim, grid, grid)
  omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
  for index in range(grid * grid):
    row, col = divmod(index, grid)
    expected = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                               np.sin(row * omega), np.cos(row * omega)])
    np.testing.assert_allclose(emb[index], expected, atol=1e-6)


def test_sincos_rejects_width_not_divisible_by_4():
  with pytest.raises(ValueError):
    sincos_2d_position_embedding(18, 4, 4)


# ---------------------------------------------------------------- forward


def test_forward_shapes_cls_pooling(base_out):
  assert base_out['tokens'].shape == (BATCH, 1 + NUM_PATCHES, WIDTH)
  assert base_out['patch_tokens'].shape == (BATCH, NUM_PATCHES, WIDTH)
  assert base_out['pooled'].shape == (BATCH, WIDTH)
  assert base_out['tokens'].dtype == jnp.float32
  np.testing.assert_array_equal(base_out['pooled'], base_out['tokens'][:, 0])
  np.testing.assert_array_equal(base_out['patch_tokens'], base_out['tokens'][:, 1:])


def test_forward_gap_pooling(params, images, base_out):
  out = apply(make_vit(pool='gap'), params, images)
  assert out['pooled'].shape == (BATCH, WIDTH)
  assert_close_in_scale(out['pooled'], out['patch_tokens'].mean(axis=1))
  # Same parameters, same tokens: pooling only changes the summary.
  assert_close_in_scale(out['tokens'], base_out['tokens'])


def test_forward_without_cls_token_gap():
  vit = make_vit(use_cls_token=False, pool='gap')
  x = jnp.zeros((BATCH, 16, 16, 3))
  shapes = jax.eval_shape(vit.init, jax.random.key(0), x)
  assert 'cls_token' not in shapes['params']
  out = jax.eval_shape(lambda v: vit.apply(v, x), shapes)
  assert out['tokens'].shape == (BATCH, 4, WIDTH)
  with pytest.raises(ValueError):
    jax.eval_shape(make_vit(use_cls_token=False, pool='cls').init, jax.random.key(0), x)


def test_keep_indices_select_tokens(params, images):
  keep = jnp.asarray([[3, 0, 9, 15, 7], [1, 2, 14, 8, 11]], jnp.int32)
  out = apply(make_vit(), params, images, keep_indices=keep)
  assert out['tokens'].shape == (BATCH, 1 + 5, WIDTH)
  assert out['patch_tokens'].shape == (BATCH, 5, WIDTH)
  assert out['pooled'].shape == (BATCH, WIDTH)


def test_patch_embedding_by_matmul_of_kept_patches_equals_conv_then_gather():
  """'matmul' (patchify, gather the kept patches, one matmul) against 'conv' (embed every
  patch, then gather): nn.Conv's parameters, and the same tokens up to float rounding."""
  patch, width, channels = 16, 64, 3
  k = patch * patch * channels  # the length of each token's dot product: 768
  x = jnp.asarray(np.random.default_rng(2).normal(size=(BATCH, 64, 64, channels)), jnp.float32)
  keep = jnp.asarray([[5, 2, 12, 0], [15, 9, 3, 6]], jnp.int32)
  by_matmul = vit_lib.PatchEmbedding(width, patch, implementation='matmul')
  by_conv = vit_lib.PatchEmbedding(width, patch, implementation='conv')
  params = nn.meta.unbox(by_matmul.init(jax.random.key(3), x)['params'])
  # The same parameters as the nn.Conv the ViT had: names, shapes, init and rng.
  conv = nn.Conv(width, (patch, patch), strides=(patch, patch), padding='VALID',
                 kernel_init=transformer_lib.xavier_uniform(in_axis=(0, 1, 2), out_axis=3))
  assert_trees_equal(params, conv.init(jax.random.key(3), x)['params'])
  params['bias'] = jnp.asarray(np.random.default_rng(4).normal(size=width), jnp.float32)

  @jax.jit
  def embed(params):
    apply_with = lambda module, kept: module.apply({'params': params}, x, kept)
    return [apply_with(m, kept) for m in (by_matmul, by_conv) for kept in (keep, None)]

  matmul_kept, matmul_all, conv_kept, conv_all = embed(params)
  assert matmul_kept.shape == (BATCH, 4, width) and matmul_all.shape == (BATCH, 16, width)
  # Both sum the same K products in float32, in orders XLA picks per CPU (AVX2 and
  # AVX-512 kernels block differently). Any order is within gamma_K = K u / (1 - K u)
  # of the exact sum, relative to the sum of the products' magnitudes (Higham, Accuracy
  # and Stability of Numerical Algorithms, 3.1), u = 2^-24; the bias add rounds once
  # more. Two orders differ by at most twice that: ~1e-4 of |x| . |w| here, while a
  # wrong patch layout or a wrong kept patch would be off by O(1) of it.
  patches = np.asarray(jnp.abs(vit_lib.patchify(x, patch)), np.float64)
  magnitude = patches @ np.abs(np.asarray(params['kernel'], np.float64)).reshape(k, width)
  magnitude += np.abs(np.asarray(params['bias']))
  unit = 2.0 ** -24
  bound = 2 * ((k + 1) * unit / (1 - (k + 1) * unit)) * magnitude
  kept_bound = np.take_along_axis(bound, np.asarray(keep)[..., None], axis=1)
  for got, want, tolerance in ((matmul_all, conv_all, bound), (matmul_kept, conv_kept, kept_bound),
                               (matmul_kept, np.take_along_axis(np.asarray(conv_all),
                                                                np.asarray(keep)[..., None], 1),
                                kept_bound)):
    assert np.all(np.abs(np.asarray(got) - np.asarray(want)) <= tolerance)


def test_position_embedding_is_added_before_dropping_patches():
  """Depth 0 (only the final LN): each token is independent, so the kept tokens
  must equal the full output gathered at keep_indices, and with a zero patch
  embedding the patch tokens are LN(sin-cos) in raster order."""
  vit = make_vit(depth=0)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(BATCH, 32, 32, 3)), jnp.float32)
  p = nn.meta.unbox(jax.jit(vit.init)(jax.random.key(1), x)['params'])
  full = apply(vit, p, x)
  keep = jnp.asarray([[5, 2, 12, 0], [15, 9, 3, 6]], jnp.int32)
  kept = apply(vit, p, x, keep_indices=keep)
  assert_close_in_scale(kept['patch_tokens'],
                        jnp.take_along_axis(full['patch_tokens'], keep[..., None], 1))
  assert_close_in_scale(kept['tokens'][:, 0], full['tokens'][:, 0])

  zero = jax.tree_util.tree_map(lambda a: a, p)
  zero['patch_embed'] = jax.tree_util.tree_map(jnp.zeros_like, p['patch_embed'])
  out = apply(vit, zero, x)
  pos = mae_reference_2d_sincos(WIDTH, 4, 4)
  normed = (pos - pos.mean(-1, keepdims=True)) / np.sqrt(pos.var(-1, keepdims=True) + 1e-6)
  for b in range(BATCH):
    np.testing.assert_allclose(out['patch_tokens'][b], normed, rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_keeps_float32_params(params, images, base_out):
  vit = make_vit(dtype=jnp.bfloat16)
  shapes = nn.meta.unbox(jax.eval_shape(vit.init, jax.random.key(0), images)['params'])
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
    assert leaf.dtype == jnp.float32, jax.tree_util.keystr(path)
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(params)
  out = apply(vit, params, images)
  for name in ('tokens', 'patch_tokens', 'pooled'):
    assert out[name].dtype == jnp.bfloat16, name
  diff = np.abs(np.asarray(out['tokens'], np.float32) - np.asarray(base_out['tokens']))
  assert diff.mean() < 0.05 and np.isfinite(diff).all()


def test_scan_param_layout(params, images):
  scanned = nn.meta.unbox(
      jax.eval_shape(make_vit(scan=True).init, jax.random.key(0), images)['params'])
  transformer = scanned['transformer']
  assert set(transformer) == {'blocks', 'norm'}
  for path, leaf in jax.tree_util.tree_leaves_with_path(transformer['blocks']):
    unrolled = params['transformer']['block_0']
    for key in path:
      unrolled = unrolled[key.key]
    assert leaf.shape == (DEPTH, *unrolled.shape), jax.tree_util.keystr(path)
  assert set(params['transformer']) == {f'block_{i}' for i in range(DEPTH)} | {'norm'}


def test_scanned_equals_unrolled(params, images, base_out):
  stacked = stack_blocks(params, DEPTH)
  scanned_shapes = nn.meta.unbox(
      jax.eval_shape(make_vit(scan=True).init, jax.random.key(0), images)['params'])
  assert (jax.tree_util.tree_structure(stacked) ==
          jax.tree_util.tree_structure(scanned_shapes))
  out = apply(make_vit(scan=True), stacked, images)
  assert_close_in_scale(out['tokens'], base_out['tokens'])
  # And the gradients, which a train step takes: the same, in the scanned layout.
  def grads(vit, p):
    return jax.jit(jax.grad(lambda p: jnp.sum(vit.apply({'params': p}, images)['pooled'] ** 2)))(p)
  assert_trees_close_in_scale(grads(make_vit(scan=True), stacked),
                              stack_blocks(grads(make_vit(), params), DEPTH))


def test_scan_auto_unrolls_up_to_24_layers_and_the_stage_records_the_choice():
  assert not vit_lib.scan_layers('auto', 12) and not vit_lib.scan_layers('auto', 24)
  assert vit_lib.scan_layers('auto', 32)
  assert vit_lib.scan_layers(True, 2) and not vit_lib.scan_layers(False, 40)
  config = stage_config('mae')
  assert config.model.scan == 'auto'
  for variant, scanned in (('B/16', False), ('L/16', False), ('H/14', True)):
    config.model.variant = variant
    # The stage records the layout, which its checkpoints hold, not 'auto'.
    assert objective_class('mae').resolve_config(config).model.scan is scanned
    assert vit_lib.vit_from_config(config.model).scan is scanned
  assert config.model.scan == 'auto'  # the caller's config is left as it was


@pytest.mark.parametrize('scan', [False, True])
def test_remat_full_equals_no_remat(params, images, base_out, scan):
  p = stack_blocks(params, DEPTH) if scan else params
  out = apply(make_vit(remat='full', scan=scan), p, images)
  assert_close_in_scale(out['tokens'], base_out['tokens'])


def test_unknown_remat_policy_raises(images):
  assert set(REMAT_POLICIES) >= {'none', 'full', 'dots', 'dots_no_batch'}
  with pytest.raises(ValueError, match='bogus'):
    jax.eval_shape(make_vit(remat='bogus').init, jax.random.key(0), images)


def test_unresolved_auto_remat_means_no_remat(params, images):
  # Only the training loop can measure; a model built with 'auto' elsewhere has no remat.
  def gradient_jaxpr(remat):
    vit = make_vit(remat=remat)
    loss = lambda p: vit.apply({'params': p}, images)['pooled'].sum()
    return str(jax.make_jaxpr(jax.grad(loss))(params))
  assert gradient_jaxpr('auto') == gradient_jaxpr('none') != gradient_jaxpr('full')


# ---------------------------------------------------------------- logical axes


def test_logical_axis_names(boxed_params, images):
  specs = nn.get_partition_spec(boxed_params)
  block = specs['transformer']['block_0']
  assert block['mlp']['fc1']['kernel'] == PartitionSpec('embed', 'mlp')
  assert block['mlp']['fc2']['kernel'] == PartitionSpec('mlp', 'embed')
  assert block['attention']['query']['kernel'] == PartitionSpec('embed', 'heads', 'kv')
  assert block['attention']['out']['kernel'] == PartitionSpec('heads', 'kv', 'embed')
  assert block['norm1']['scale'] == PartitionSpec('embed')

  scanned = jax.eval_shape(make_vit(scan=True).init, jax.random.key(0), images)['params']
  specs = nn.get_partition_spec(scanned)['transformer']['blocks']
  assert specs['mlp']['fc1']['kernel'] == PartitionSpec('layers', 'embed', 'mlp')
  assert specs['attention']['query']['kernel'] == PartitionSpec('layers', 'embed', 'heads', 'kv')
  for spec in jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec)):
    assert spec[0] == 'layers'


# ---------------------------------------------------------------- init


def _check_xavier(kernel, fan_in, fan_out, rel_tol=0.1):
  kernel = np.asarray(kernel)
  limit = np.sqrt(6.0 / (fan_in + fan_out))
  assert np.abs(kernel).max() <= limit * (1 + 1e-6)
  np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (fan_in + fan_out)), rtol=rel_tol)


def test_xavier_uniform_projection_kernel():
  proj = Projection((256, 1024), ('embed', 'mlp'))
  variables = nn.meta.unbox(jax.jit(proj.init)(jax.random.key(2), jnp.zeros((1, 256))))
  _check_xavier(variables['params']['kernel'], 256, 1024)
  np.testing.assert_array_equal(variables['params']['bias'], 0.0)


def test_xavier_attention_kernels_use_flattened_fans():
  width, heads = 256, 8  # head_dim 32: query kernel (256, 8, 32) ~ a (256, 256) Linear.
  attention = Attention(num_heads=heads)
  variables = nn.meta.unbox(jax.jit(attention.init)(jax.random.key(3), jnp.zeros((1, 2, width))))
  p = variables['params']
  for name in ('query', 'key', 'value'):
    assert p[name]['kernel'].shape == (width, heads, width // heads)
    _check_xavier(p[name]['kernel'], width, width)
    np.testing.assert_array_equal(p[name]['bias'], 0.0)
  assert p['out']['kernel'].shape == (heads, width // heads, width)
  _check_xavier(p['out']['kernel'], width, width)
  # A per-axis (non-flattened) xavier would give std sqrt(2 / (8*256 + 32*256)) ~ 0.014,
  # far below sqrt(2/512) ~ 0.0625: the check above tells them apart.


def test_vit_init_dense_conv_and_norms(params):
  block = params['transformer']['block_0']
  _check_xavier(block['mlp']['fc1']['kernel'], WIDTH, 4 * WIDTH)
  _check_xavier(block['mlp']['fc2']['kernel'], 4 * WIDTH, WIDTH)
  np.testing.assert_array_equal(block['mlp']['fc1']['bias'], 0.0)
  # Patch embedding: a Linear over the p*p*3 pixels of a patch.
  assert params['patch_embed']['kernel'].shape == (PATCH, PATCH, 3, WIDTH)
  _check_xavier(params['patch_embed']['kernel'], PATCH * PATCH * 3, WIDTH)
  np.testing.assert_array_equal(params['patch_embed']['bias'], 0.0)
  np.testing.assert_array_equal(block['norm1']['scale'], 1.0)
  np.testing.assert_array_equal(params['transformer']['norm']['bias'], 0.0)
  assert 'pos_embedding' not in params  # sin-cos is fixed, not a parameter


def test_layernorm_epsilon_is_1e6():
  assert transformer_lib.LAYERNORM_EPSILON == 1e-6
  module = transformer_lib.layer_norm(jnp.float32)
  assert module.epsilon == 1e-6


# ---------------------------------------------------------------- attention mask


def test_attention_mask(params, images, base_out):
  tokens = 1 + NUM_PATCHES
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((tokens, tokens), bool)), (BATCH, 1, tokens, tokens))
  out_causal = apply(make_vit(), params, images, attention_mask=causal)
  assert np.abs(np.asarray(out_causal['tokens']) - np.asarray(base_out['tokens'])).max() > 1e-3

  all_true = jnp.ones((BATCH, 1, tokens, tokens), bool)
  out_true = apply(make_vit(), params, images, attention_mask=all_true)
  assert_close_in_scale(out_true['tokens'], base_out['tokens'])

  # True = may attend: under the causal mask, changing the last patch (raster
  # order) leaves every earlier token unchanged; without a mask it changes them all.
  perturbed = np.asarray(images).copy()
  perturbed[:, -PATCH:, -PATCH:] += 2.0
  changed = apply(make_vit(), params, jnp.asarray(perturbed), attention_mask=causal)
  assert_close_in_scale(changed['tokens'][:, :-1], out_causal['tokens'][:, :-1])
  assert np.abs(np.asarray(changed['tokens'][:, -1]) -
                np.asarray(out_causal['tokens'][:, -1])).max() > 1e-3
  unmasked = apply(make_vit(), params, jnp.asarray(perturbed))
  assert np.abs(np.asarray(unmasked['tokens'][:, 0]) -
                np.asarray(base_out['tokens'][:, 0])).max() > 1e-3
