"""Compiling for a Cloud TPU slice on this CPU machine (main.py --compile_for), with the TPU
compiler of the libtpu wheel: the mesh lies on the topology's chips, each chip's memory is
reported, model.remat='auto' chooses against the chip's memory, a stage that does not fit
ends in one line with a change that was compiled and fits, and a run's folder is left as
it was."""

import dataclasses
import os
import subprocess
import sys

import jax
import pytest

from big_pretrain import sharding as sharding_lib
from big_pretrain import tpu_slices
from big_pretrain.accelerators import ACCELERATORS
from big_pretrain.data.batch_features import global_batch_shapes
from big_pretrain import compile_for
from big_pretrain.train import mfu
from big_pretrain.train.optim import make_optimizer, make_schedule
from big_pretrain.train.remat_choice import (CANDIDATES, MEMORY_FRACTION, build_with_remat_choice,
                                             step_bytes_per_device)
from helpers.paths import REPO_ROOT, TINY_CONFIG_FILE
from helpers.tiny_config import tiny_mae_config

pytest.importorskip('libtpu', reason='the TPU compiler: make install-tpu-compile')
pytestmark = pytest.mark.tpu_compile  # the test tiers: pytest.ini


@pytest.fixture(autouse=True, scope='module')
def _no_persistent_cache():
  """Programs compiled for a topology cannot be read back from JAX's persistent cache (that
  needs a TPU client): this module's stay out of the one tests/conftest.py sets up."""
  with compile_for.persistent_cache_off():
    yield


def _tiny_mae(**overrides):
  config = tiny_mae_config(**overrides)
  config.evals = {}
  return config


def test_slice_names_give_cloud_tpus_topologies():
  assert tpu_slices.parse_slice('v5p-256').topology == 'v5p:4x4x8'
  assert tpu_slices.parse_slice('v5p-128').chips == 64
  assert tpu_slices.parse_slice('v4-32').topology == 'v4:2x2x4'
  assert tpu_slices.parse_slice('v5litepod-16').topology == 'v5e:4x4'
  assert tpu_slices.parse_slice('v5e-256').topology == 'v5e:16x16'
  assert tpu_slices.parse_slice('v6e-64').topology == 'v6e:8x8'
  assert tpu_slices.parse_slice('v6e-8').topology == 'v6e:2x4'
  assert tpu_slices.parse_slice('v5p-8', num_slices=2).num_devices == 8
  for bad, fix in (('v5p-6', 'a power of two of at least 8'), ('v5p-4', 'at least 8'),
                   ('v7-8', "such as 'v4-32', 'v5p-256'"), ('tpu', "such as 'v4-32'")):
    with pytest.raises(ValueError, match=f"'{bad}'.*{fix}"):
      tpu_slices.parse_slice(bad)


def test_a_slice_larger_than_cloud_tpu_offers_is_refused_in_one_line():
  # libtpu describes such topologies, and then aborts the process compiling for some
  # (v5e-512: 'Check failed: chip_bounds().y <= 16', exit 134).
  assert tpu_slices.parse_slice('v5e-256').chips == tpu_slices.parse_slice('v6e-256').chips
  assert tpu_slices.parse_slice('v4-8192').chips == tpu_slices.parse_slice('v5p-8192').chips
  for bad, largest in (('v5e-512', 'v5e-256'), ('v5litepod-512', 'v5litepod-256'),
                       ('v6e-512', 'v6e-256'), ('v4-16384', 'v4-8192'),
                       ('v5p-16384', 'v5p-8192')):
    with pytest.raises(ValueError) as refusal:
      tpu_slices.parse_slice(bad)
    assert str(refusal.value).startswith(f"'{bad}' is larger than any ")
    assert f'so {largest} at the most' in str(refusal.value) and '\n' not in str(refusal.value)
  assert tpu_slices.parse_slice('v5e-4', num_slices=511).num_devices == 2044
  with pytest.raises(ValueError, match='num_slices=512: give 1 to 511 slices'):
    tpu_slices.parse_slice('v5e-4', num_slices=512)  # libtpu aborts on 512


@pytest.mark.integration
def test_main_py_refuses_a_slice_too_large_and_a_workdir_that_is_a_file_before_compiling(
    tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('not a folder')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('BIG_PRETRAIN_VERBOSE', None)
  runs = {
      args[0]: subprocess.Popen(
          [sys.executable, 'main.py', f'--config={TINY_CONFIG_FILE}', *args], cwd=REPO_ROOT,
          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for args in (['--compile_for=v6e-512', f'--workdir={tmp_path / "check"}'],
                   ['--compile_for=v5e-4', f'--workdir={a_file}'])}
  outputs = {flag: run.communicate(timeout=300) for flag, run in runs.items()}
  _, stderr = outputs['--compile_for=v6e-512']
  assert runs['--compile_for=v6e-512'].returncode == 2, stderr
  assert stderr.strip().splitlines() == [
      "main.py: --compile_for=v6e-512: 'v6e-512' is larger than any v6e slice: Cloud TPU "
      'offers at most 256 chips, so v6e-256 at the most; for more, give --num_slices.']
  stdout, stderr = outputs['--compile_for=v5e-4']
  assert runs['--compile_for=v5e-4'].returncode == 2, stderr
  assert stderr.strip().splitlines() == [
      f'main.py: --workdir={a_file} is a file, not a folder: give a folder for the compile '
      'report (compile_for/ in it).']
  assert 'Compiling stage' not in stderr and 'Compiled for' not in stdout  # nothing compiled
  assert not (tmp_path / 'check').exists()


@pytest.mark.integration
def test_the_mesh_lies_on_the_topologys_chips_and_each_chip_is_reported():
  tpu_slice = tpu_slices.parse_slice('v5e-4')
  devices = tpu_slices.topology_devices(tpu_slice)
  assert len(devices) == 4 and {d.device_kind for d in devices} == {'TPU v5 lite'}
  config = _tiny_mae()
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  assert set(mesh.devices.flat) == set(devices) and dict(mesh.shape)['data'] == 4

  report = compile_for.check_stage('mae', config, 'config', tpu_slice, devices, '/tmp')
  assert report.fits and report.mesh['data'] == 4
  assert report.capacity_bytes == 16 * 2 ** 30  # v5e's HBM per chip: the table's
  assert 0 < report.argument_bytes <= report.peak_bytes < report.capacity_bytes
  # The analytic FLOPs and the lowered program's (loops multiplied out) agree.
  assert report.analytic_flops == mfu.model_flops_per_step(config)
  assert abs(report.program_flops / report.analytic_flops - 1) < 0.05


@pytest.mark.integration
def test_two_slices_keep_fsdp_inside_a_slice_and_split_the_data_axis_across_them():
  tpu_slice = tpu_slices.parse_slice('v5p-8', num_slices=2)
  devices = tpu_slices.topology_devices(tpu_slice)
  assert sorted({d.slice_index for d in devices}) == [0, 1]
  config = _tiny_mae(**{'mesh.data': -1, 'mesh.fsdp': 2})
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 2, 'tensor': 1}
  for row, data_index in enumerate(range(4)):
    # The first half of the data axis is slice 0; each FSDP pair is within one slice.
    assert {d.slice_index for d in mesh.devices[data_index].flat} == {row // 2}
  report = compile_for.check_stage('mae', config, 'config', tpu_slice, devices, '/tmp')
  assert report.fits and report.mesh == {'data': 4, 'fsdp': 2, 'tensor': 1}


@pytest.mark.integration
def test_remat_auto_takes_the_first_policy_that_fits_the_chips_memory():
  tpu_slice = tpu_slices.parse_slice('v5e-4')
  devices = tpu_slices.topology_devices(tpu_slice)
  config = _tiny_mae(**{'model.variant': 'mu/4'})  # more tokens: remat saves more
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  rules = sharding_lib.logical_axis_rules(config)
  schedule = make_schedule(config.optim, config.batch_size, config.total_steps)
  shapes = global_batch_shapes(config.data, config.batch_size)

  def build(remat, limit=None):
    config.model.remat = remat
    return build_with_remat_choice(config, mesh, rules, make_optimizer(config.optim, schedule),
                                   schedule, shapes, memory_limit=limit)

  # A chip smaller than any policy needs: every candidate is compiled and measured, the
  # least is kept, and said not to fit. (Each TPU compile takes seconds: the measurements
  # of this one pass serve the rest of the test.)
  least_policy = 'full'
  least_alone = step_bytes_per_device(build(least_policy).trainer.compile_step(shapes))
  small = build('auto', int(least_alone / 2))
  assert not small.fits
  needs = small.step_bytes
  assert set(needs) == set(CANDIDATES)
  assert needs[least_policy] == least_alone  # auto measures what a compile of the policy needs
  least = min(needs, key=needs.get)
  assert small.policy == least
  assert needs[least] < needs['none']  # the test needs remat to save memory
  # A chip just big enough for the least policy: 'auto' measures its way to the first
  # candidate (in the order of least recomputation) that fits.
  limit = int(needs[least] / MEMORY_FRACTION) + 1
  choice = build('auto', limit)
  expected = next(p for p in CANDIDATES if needs[p] <= MEMORY_FRACTION * limit)
  assert choice.policy == expected and choice.fits
  assert choice.step_bytes[expected] == needs[expected]


@pytest.mark.integration
def test_a_stage_that_does_not_fit_ends_in_one_line(tmp_path, capsys):
  # A v5e of 256 KiB of HBM: the tiny MAE's parameters and Adam moments alone (1.5 MiB,
  # 0.4 MiB with FSDP over all 4 chips) overflow it, so no change can fit.
  small = dataclasses.replace(ACCELERATORS['v5e'], hbm_per_device=256 * 2 ** 10)
  with ACCELERATORS.replaced(small), pytest.raises(compile_for.DoesNotFitError) as refusal:
    compile_for.check(_tiny_mae(), tpu_slices.parse_slice('v5e-4'), str(tmp_path / 'check'))
  line = str(refusal.value)
  assert '\n' not in line
  assert "Stage 'main' (mae mu/8, batch 16) does not fit v5e-4" in line
  assert 'it needs 1.53 MiB per chip, a chip has 256 KiB' in line
  assert 'No change tried fits' in line
  printed = capsys.readouterr().out
  assert 'NO' in printed.splitlines()[2]


@pytest.mark.integration
def test_a_runs_folder_is_left_as_it_was(tmp_path):
  run = tmp_path / 'run'
  (run / 'checkpoints').mkdir(parents=True)
  (run / 'config.json').write_text('{}')
  before = {path: os.stat(path).st_mtime_ns for path in run.rglob('*')}
  compile_for.check(_tiny_mae(), tpu_slices.parse_slice('v5e-4'), str(run))
  assert {path: os.stat(path).st_mtime_ns for path in run.rglob('*')} == before
  fresh = tmp_path / 'fresh'
  compile_for.check(_tiny_mae(), tpu_slices.parse_slice('v5e-4'), str(fresh))
  assert (fresh / 'compile_for' / 'v5e-4.json').is_file()
  assert jax.devices()[0].platform == 'cpu'  # nothing left the CPU
