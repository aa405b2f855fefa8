"""The step's lower bound read from the compiled program (train/roofline.py): its FLOPs are the
lowered program's count (program_flops), a matmul is bound by the chip's peak and an
elementwise op by its HBM bandwidth, loops count their trips, attention's padded
convolutions count only their real taps, and across two slices the bytes sent over the
data-centre network are the gradient's."""

import importlib.util
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from big_pretrain import sharding as sharding_lib
from big_pretrain import tpu_slices
from big_pretrain.accelerators import ACCELERATORS
from big_pretrain import compile_for
from big_pretrain.train import roofline
from big_pretrain.train.program_flops import program_flops
from helpers.tiny_config import tiny_mae_config

# Round numbers: the tests' expected times are these ratios exactly.
CHIP = roofline.Chip(peak_flops=100e12, hbm_bandwidth=1e12, ici_bandwidth=100e9,
                     dcn_bandwidth=10e9)

# A loop of 5 matmuls (its trip count in its condition), a loop of 3 (XLA's
# known_trip_count), a conditional whose costlier branch has a matmul, and attention's
# batched matmul as TPU programs write it: a convolution whose window is padded.
PROGRAM = """HloModule test, is_scheduled=true

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %w = f32[16,16]{1,0:S(1)} parameter(1)
  %d = f32[8,16]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %one = s32[] constant(1)
  %n = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%n, %d)
}

%cond (q: (s32[], f32[8,16])) -> pred[] {
  %q = (s32[], f32[8,16]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %limit = s32[] constant(5)
  ROOT %lt = pred[] compare(%j, %limit), direction=LT
}

%cond.unknown (r: (s32[], f32[8,16])) -> pred[] {
  %r = (s32[], f32[8,16]{1,0}) parameter(0)
  ROOT %k = pred[] constant(true)
}

%branch.matmul (b: f32[8,16]) -> f32[8,8] {
  %b = f32[8,16]{1,0} parameter(0)
  ROOT %bb = f32[8,8]{1,0} dot(%b, %b), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}

%branch.nothing (c: f32[8,16]) -> f32[8,8] {
  %c = f32[8,16]{1,0} parameter(0)
  ROOT %z = f32[8,8]{1,0} constant({...})
}

ENTRY %main (a: f32[8,16], lhs: f32[2,5,64,1], rhs: f32[64,4,16,1], flag: pred[]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  %lhs = f32[2,5,64,1]{3,2,1,0} parameter(1)
  %rhs = f32[64,4,16,1]{3,2,1,0} parameter(2)
  %flag = pred[] parameter(3)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,16]{1,0}) tuple(%zero, %a)
  %five = (s32[], f32[8,16]{1,0}) while(%init), condition=%cond, body=%body
  %three = (s32[], f32[8,16]{1,0}) while(%init), condition=%cond.unknown, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %choice = f32[8,8]{1,0} conditional(%flag, %a, %a), branch_computations={%branch.nothing, %branch.matmul}
  %attention = f32[2,5,4,16]{3,2,1,0} convolution(%lhs, %rhs), window={size=1x4 pad=0_0x3_3 rhs_reversal=0x1}, dim_labels=0bf1_i1o0->0b1f
  ROOT %out = f32[8,16]{1,0} get-tuple-element(%five), index=1
}
"""


def test_loops_count_their_trips_a_conditional_its_costlier_branch_and_padding_no_flops():
  bound = roofline.roofline(PROGRAM, CHIP)
  matmul = 2 * 8 * 16 * 16
  # Attention as a convolution: spatial dim 0 has 2 real taps; dim 1 has one real input
  # padded by 3 on each side under a 4-wide window, so 4 of its 16 window positions land on
  # it: 2 x 5 batch x 16 out x 64 in x 2 x 4, not 2 x 5 x 16 x 64 x 2 x 16.
  attention = 2 * 5 * 16 * 64 * 2 * 4
  assert bound.flops == (5 + 3) * matmul + 2 * 8 * 8 * 16 + attention
  assert bound.exact
  dots = {op.name: op for op in bound.ops if op.opcode == 'dot'}
  assert dots['d'].count == 8 and dots['bb'].count == 1
  # The matmul's weights are in on-chip memory (S(1)): only x is read and the result written.
  assert dots['d'].hbm_bytes == 8 * (8 * 16 * 4 + 8 * 16 * 4)
  assert bound.seconds(CHIP) == pytest.approx(
      sum(max(op.flops / CHIP.peak_flops, op.hbm_bytes / CHIP.hbm_bandwidth)
          for op in bound.ops), rel=1e-12)  # only the core's ops: their times add up


def test_a_convolutions_real_taps_are_counted_in_closed_form_as_one_by_one():
  # Every (output, tap) pair of one spatial dimension, tried one by one, against the
  # closed form: strides, padding (negative too), dilations of input and kernel.
  def one_by_one(n_in, n_out, size, stride, pad_low, lhs_dilation, rhs_dilation):
    last = (n_in - 1) * lhs_dilation
    return sum(1 for tap in range(size) for out in range(n_out)
               if 0 <= out * stride + tap * rhs_dilation - pad_low <= last
               and (out * stride + tap * rhs_dilation - pad_low) % lhs_dilation == 0)

  generator = np.random.default_rng(0)
  for _ in range(2000):
    case = [int(v) for v in generator.integers([1, 1, 1, 1, -3, 1, 1], [13, 13, 7, 5, 7, 5, 4])]
    assert roofline._taps(*case) == one_by_one(*case), case


def test_a_loop_whose_trip_count_cannot_be_read_counts_once_and_says_so():
  program = PROGRAM.replace(', backend_config={"known_trip_count":{"n":"3"}}', '')
  bound = roofline.roofline(program, CHIP)
  assert not bound.exact
  assert {op.name: op.count for op in bound.ops}['d'] == 5 + 1


def test_the_estimates_flops_are_program_flops_count_on_a_cpu_program():
  def step(w, x):
    def layer(h, w_layer):
      return jnp.tanh(h @ w_layer), None
    h, _ = jax.lax.scan(layer, x, w)  # a while loop of 6 trips
    return jnp.sum(h @ w[0].T)

  w = jax.ShapeDtypeStruct((6, 32, 32), jnp.float32)
  x = jax.ShapeDtypeStruct((16, 32), jnp.float32)
  lowered = jax.jit(jax.grad(step)).lower(w, x)
  bound = roofline.roofline(lowered.compile().as_text(), CHIP)
  counted = program_flops(lowered.as_text())
  assert counted.loops >= 1 and bound.exact
  assert bound.flops == counted.flops > 0


needs_tpu_compiler = pytest.mark.skipif(not importlib.util.find_spec('libtpu'),
                                        reason='the TPU compiler: make install-tpu-compile')


@pytest.fixture(name='no_persistent_cache')
def fixture_no_persistent_cache():
  """Programs compiled for a topology cannot be read back from JAX's persistent cache."""
  with compile_for.persistent_cache_off():
    yield


def _v5p_chip():
  return roofline.Chip.of(ACCELERATORS['v5p'])  # at its bf16 peak, 459 TFLOP/s


@needs_tpu_compiler
@pytest.mark.tpu_compile
def test_a_matmul_is_bound_by_the_chips_peak_and_an_elementwise_op_by_its_hbm(
    no_persistent_cache):
  del no_persistent_cache
  device = tpu_slices.topology_devices(tpu_slices.parse_slice('v5p-8'))[0]
  chip, n = _v5p_chip(), 4096

  def compiled(function, *shapes):
    arguments = [jax.ShapeDtypeStruct(shape, dtype, sharding=SingleDeviceSharding(device))
                 for shape, dtype in shapes]
    return roofline.roofline(jax.jit(function).lower(*arguments).compile().as_text(), chip)

  matmul = compiled(jnp.matmul, ((n, n), jnp.bfloat16), ((n, n), jnp.bfloat16))
  assert matmul.flops == 2 * n ** 3
  assert matmul.dominant(chip) == 'compute'
  # Its bytes (at most both operands and the result) take a seventh of its FLOPs' time.
  assert matmul.hbm_bytes <= 3 * n * n * 2
  assert matmul.seconds(chip) == 2 * n ** 3 / chip.peak_flops
  elementwise = compiled(lambda x: x * 2 + 1, ((n, n), jnp.float32))
  assert elementwise.flops == 0 and elementwise.dominant(chip) == 'HBM'
  # Read once, written once: 2 x 64 MiB at the HBM bandwidth.
  assert elementwise.hbm_bytes == 2 * n * n * 4
  assert elementwise.seconds(chip) == 2 * n * n * 4 / chip.hbm_bandwidth


@needs_tpu_compiler
@pytest.mark.tpu_compile
def test_two_slices_send_the_gradient_over_the_data_centre_network(no_persistent_cache):
  del no_persistent_cache
  tpu_slice = tpu_slices.parse_slice('v5p-8', num_slices=2)
  devices = tpu_slices.topology_devices(tpu_slice)
  mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
                                devices)
  assert dict(mesh.shape)['data'] == 8 and sharding_lib.cross_slice_axes(mesh) == ('data',)
  n, chips_per_slice = 512, tpu_slice.chips

  def gradient(w, x):
    return jax.grad(lambda w: jnp.sum((x @ w) ** 2))(w)

  w = jax.ShapeDtypeStruct((n, n), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
  x = jax.ShapeDtypeStruct((64, n), jnp.float32,
                           sharding=NamedSharding(mesh, PartitionSpec('data')))
  program = jax.jit(gradient, out_shardings=NamedSharding(mesh, PartitionSpec()))
  chip = _v5p_chip()
  bound = roofline.roofline(program.lower(w, x).compile().as_text(), chip, num_slices=2)
  gradient_bytes = n * n * 4
  # The data axis's all-reduce: reduced over each slice's chips (ICI), each chip sends its
  # quarter across, and gathers back: a slice sends the whole gradient over DCN once.
  assert bound.dcn_bytes * chips_per_slice == gradient_bytes
  assert bound.ici_bytes == 2 * (chips_per_slice - 1) / chips_per_slice * gradient_bytes
  # An all-reduce over 2 slices sends each byte once: the DCN term is bytes / bandwidth.
  assert bound.dcn_seconds == bound.dcn_bytes / chip.dcn_bandwidth
  assert bound.dominant(chip) == 'DCN'


@needs_tpu_compiler
@pytest.mark.tpu_compile
def test_a_tiny_train_step_compiled_for_a_tpu_reports_its_bound(no_persistent_cache, tmp_path):
  del no_persistent_cache
  tpu_slice = tpu_slices.parse_slice('v5e-4', num_slices=2)
  devices = tpu_slices.topology_devices(tpu_slice)
  config = tiny_mae_config(**{'mesh.data': 1, 'mesh.fsdp': -1})  # MAWS 2B's mesh: per slice
  config.evals = {}
  report = compile_for.check_stage('main', config, 'config', tpu_slice, devices,
                                     str(tmp_path))
  assert report.mesh == {'data': 2, 'fsdp': 4, 'tensor': 1}
  assert compile_for.slice_mesh(report) == {'data': 1, 'fsdp': 4, 'tensor': 1}
  assert report.cross_slice_axes == ['data']
  # The compiled program's matmuls are the lowered program's, shared by the 8 chips.
  assert report.roofline['flops_per_chip'] * 8 == report.program_flops
  assert report.roofline['dcn_bytes_per_chip'] > 0
  assert 0 < report.mfu_at_most <= 1 and report.bound_by in roofline.TERMS
  assert report.step_seconds_at_least >= max(report.roofline['seconds_by_term'].values())
  assert len(report.costliest_ops) == 5
  assert report.summed_bytes >= report.peak_bytes > 0
  table = compile_for.format_table([report], tpu_slice)
  row = table.splitlines()[2]
  assert 'fsdp4' in row and 'data x2' in row and 'DCN/chip' in row
  assert 'not a measurement' in table.splitlines()[0]
  assert 'main: costliest ops of the bound: ' in table
  np.testing.assert_equal(report.fits, True)


@needs_tpu_compiler
@pytest.mark.tpu_compile
def test_compiling_for_a_slice_leaves_the_persistent_cache_alone(tmp_path):
  # A persistent cache of this test's own (tests/conftest.py's is shared by the xdist
  # workers), used by a CPU program first: once JAX has used it, switching its flag off is
  # not enough (JAX decides once per process).
  cache = tmp_path / 'cache'
  was_dir = jax.config.jax_compilation_cache_dir
  jax.config.update('jax_compilation_cache_dir', str(cache))
  compilation_cache.reset_cache()
  try:
    jax.jit(lambda x: x * 3 + 1)(jnp.arange(7.0)).block_until_ready()
    before = sorted(cache.iterdir())
    assert before
    config = tiny_mae_config()
    config.evals = {}
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      compile_for.check(config, tpu_slices.parse_slice('v5e-4'), str(tmp_path / 'check'))
    assert sorted(cache.iterdir()) == before
    assert not [w for w in caught if 'compilation cache' in str(w.message)]
    assert jax.config.jax_enable_compilation_cache  # and it is on again for what follows
    jax.jit(lambda x: x * 5 + 2)(jnp.arange(7.0)).block_until_ready()
    assert len(list(cache.iterdir())) == len(before) + 1
  finally:
    jax.config.update('jax_compilation_cache_dir', was_dir)
    compilation_cache.reset_cache()
