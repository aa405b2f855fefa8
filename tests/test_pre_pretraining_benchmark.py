"""benchmarks/pre_pretraining.py's small mode: the MAWS experiment's pairing, end to end."""

import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest

from helpers.tiny_config import one_device

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          'benchmarks')
BENCHMARK = os.path.join(BENCHMARKS, 'pre_pretraining.py')
sys.path.insert(0, BENCHMARKS)  # its shared module, stage_sweeps.py, lives beside it


def _benchmark_module():
  spec = importlib.util.spec_from_file_location('pre_pretraining_benchmark', BENCHMARK)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclass looks its module up
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def small_sweep(tmp_path_factory):
  """The small sweep, trained as the full one is: each (seed, MAE budget) unit in a child
  process, two at once (--processes=2), then tabulated from what they recorded."""
  benchmark = _benchmark_module()
  argv = ['--small', f'--workdir={tmp_path_factory.mktemp("sweep")}']
  lines = []
  benchmark.main(argv + ['--processes=2'], log=lines.append)
  sweep = benchmark.parse_args(argv)
  results = benchmark.run_sweep(sweep, log=lambda line: None)  # read back
  return benchmark, sweep, results, lines


def _recorded_config(sweep, name):
  with open(os.path.join(sweep.workdir, name, 'config.json')) as f:
    return json.load(f)


@pytest.mark.benchmarks
@pytest.mark.integration
def test_the_small_mode_is_one_seed_and_one_mae_budget_beside_random_init(small_sweep):
  benchmark, sweep, results, lines = small_sweep
  # Its two units trained in child processes, each writing its own log.
  trained = sorted(line.split(':')[0].strip() for line in lines if 'epochs: trained' in line)
  assert trained == ['seed 0, MAE 0 epochs', 'seed 0, MAE 0.01 epochs']
  assert sorted(os.listdir(os.path.join(sweep.workdir, 'logs'))) == [
      'seed0_mae0.01ep.log', 'seed0_mae0ep.log']
  assert sweep.seeds == (0,) and len([e for e in sweep.mae_epochs if e]) == 1
  budget = sweep.mae_epochs[1]
  assert set(results) == {
      benchmark.run_name('mae', 0, budget),
      *(benchmark.run_name(kind, 0, epochs, length) for epochs in sweep.mae_epochs
        for kind, length in (('wsp', 'short'), ('wsp', 'long'), ('finetune', 'long')))}


@pytest.mark.parametrize('kind, length', [('wsp', 'short'), ('wsp', 'long'),
                                          ('finetune', 'long')])
@pytest.mark.benchmarks
@pytest.mark.integration
def test_paired_runs_differ_only_in_the_encoder_they_start_from(small_sweep, kind, length):
  benchmark, sweep, _, _ = small_sweep
  random_name = benchmark.run_name(kind, 0, 0.0, length)
  mae_name = benchmark.run_name(kind, 0, sweep.mae_epochs[1], length)
  random_init, mae_init = (_recorded_config(sweep, name) for name in (random_name, mae_name))
  # The whole recorded config (seed, data and its seed, steps, optimizer, evaluators) is the
  # same; only init_from's source differs.
  random_source = random_init.pop('init_from')
  mae_source = mae_init.pop('init_from')
  assert random_init == mae_init
  assert random_source['take'] == mae_source['take'] == ['encoder']
  expected = {'wsp': (None, benchmark.run_name('mae', 0, sweep.mae_epochs[1])),
              'finetune': (benchmark.run_name('wsp', 0, 0.0, 'long'),
                           benchmark.run_name('wsp', 0, sweep.mae_epochs[1], 'long'))}[kind]
  assert [source and os.path.basename(source) for source in
          (random_source['checkpoint'], mae_source['checkpoint'])] == list(expected)


@pytest.mark.benchmarks
@pytest.mark.integration
def test_paired_wsp_runs_read_the_same_batches(small_sweep):
  from big_pretrain.data.train_input import InputPipeline
  from big_pretrain import sharding as sharding_lib
  benchmark, sweep, _, _ = small_sweep
  _, wsp_base, _ = benchmark.base_stages(sweep)
  mesh = sharding_lib.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, one_device())
  batches = []
  for epochs in sweep.mae_epochs:
    mae_dir = os.path.join(sweep.workdir, benchmark.run_name('mae', 0, epochs)) if epochs else None
    config = benchmark.wsp_config(wsp_base, 0, sweep.wsp_steps[0], mae_dir)
    pipeline = InputPipeline(config.data, global_batch_size=config.batch_size, mesh=mesh)
    batches.append([jax.device_get(next(pipeline)) for _ in range(2)])
  for first, second in zip(*batches):
    assert first.keys() == second.keys()
    for feature in first:
      np.testing.assert_array_equal(first[feature], second[feature])
  # And another seed reads other batches: the check can fail.
  other = benchmark.wsp_config(wsp_base, 1, sweep.wsp_steps[0], None)
  other_batch = jax.device_get(next(InputPipeline(other.data, global_batch_size=other.batch_size,
                                                  mesh=mesh)))
  assert not np.array_equal(other_batch['image'], batches[0][0]['image'])


@pytest.mark.benchmarks
@pytest.mark.integration
def test_the_mae_arm_starts_from_the_mae_encoder_and_the_rest_as_random_init(small_sweep):
  from flax import linen as nn
  from big_pretrain.export import read_params
  from big_pretrain.objectives import build_objective
  from big_pretrain.stages import chain
  benchmark, sweep, results, _ = small_sweep
  _, wsp_base, _ = benchmark.base_stages(sweep)
  mae_dir = os.path.join(sweep.workdir, benchmark.run_name('mae', 0, sweep.mae_epochs[1]))
  config = benchmark.wsp_config(wsp_base, 0, sweep.wsp_steps[0], mae_dir)
  fresh = nn.meta.unbox(jax.jit(build_objective(config).init_params)(jax.random.key(0)))
  started = chain.initializer_from(config.init_from, sweep.workdir)(fresh)
  _, saved = read_params(mae_dir, ['encoder'], None)
  assert_trees_equal = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  assert_trees_equal(jax.device_get(started['encoder']), saved['encoder'])
  assert_trees_equal(jax.device_get(started['head']), jax.device_get(fresh['head']))
  # Both arms' probes also scored their starting encoders (step 0).
  for epochs in sweep.mae_epochs:
    curve = results[benchmark.run_name('wsp', 0, epochs, 'short')]['curves']
    assert 0 in dict(curve['eval/linear_probe/accuracy'])


@pytest.mark.benchmarks
@pytest.mark.integration
def test_tables_and_plots_come_out_and_a_rerun_trains_nothing(small_sweep, tmp_path):
  benchmark, sweep, results, lines = small_sweep
  rows = benchmark.summary_rows(sweep, results)
  assert len(rows) == 2 * len(sweep.mae_epochs)
  long_mae = next(row for row in rows if row['length'] == 'long' and row['mae_epochs'])
  for metric in ('linear probe', 'k-NN', 'WSP loss', 'WSP precision@1', 'fine-tuning top-1'):
    mean, sd = long_mae[metric]
    assert np.isfinite(mean) and sd == 0.0  # one seed
  assert long_mae['tflop'] > next(row for row in rows if row['length'] == 'long'
                                  and not row['mae_epochs'])['tflop']  # MAE's steps count
  # Equal compute: MAE's 3 steps cost ~4 WSP steps (the analytic FLOPs' ratio), so the short
  # MAE arm (4 WSP steps) compares with the random long run near its step 8, its last probe;
  # the long arm spent more than that run did.
  short_mae = next(row for row in rows if row['length'] == 'short' and row['mae_epochs'])
  assert sweep.wsp_steps[0] < short_mae['equal_compute_step'] <= sweep.wsp_steps[1]
  assert 'linear probe equal-compute diff' in short_mae
  assert 'linear probe equal-compute diff' not in long_mae
  table = benchmark.format_table(rows)
  assert 'fine-tuning top-1: MAE - random (95% CI)' in table
  assert f"past random's {sweep.wsp_steps[1]} steps" in table
  for path in benchmark.plot(sweep, results, rows, str(tmp_path)):
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  again = benchmark.run_sweep(sweep, log=lambda line: None)
  assert again == json.loads(json.dumps(results))  # read back, not retrained


def test_a_curve_is_read_between_its_points_and_not_past_its_end():
  benchmark = _benchmark_module()
  curve = [(0, 0.25), (600, 0.5), (1200, 1.0)]  # binary fractions: exact arithmetic
  assert benchmark.value_at(curve, 0) == 0.25
  assert benchmark.value_at(curve, 900) == 0.75
  assert benchmark.value_at(curve, 1200) == 1.0
  assert benchmark.value_at(curve, 1201) is None
