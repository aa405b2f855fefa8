"""The Colab notebook: runtime detection, the jax it installs, the config it trains, and
the shell commands its cells run on each runtime (executed here with the shell lines
recorded instead of run: the install and the training are far too slow for CI)."""

import json
import os
import re
import stat
import subprocess
import sys

import jax
import pytest
from ml_collections import config_flags
from absl import flags

from big_pretrain.stages.chain_validation import validate_config
from helpers.paths import REPO_ROOT

NOTEBOOK = os.path.join(REPO_ROOT, 'launch', 'colab_demo.ipynb')
# Imported the way the notebook imports it, so a test's monkeypatch reaches the notebook.
sys.path.insert(0, os.path.join(REPO_ROOT, 'launch'))
import colab_runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

NO_PROGRAMS = lambda name: None  # pylint: disable=unnecessary-lambda-assignment


def _make_devices(dev_dir, *names):
  for name in names:
    path = dev_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
  return str(dev_dir)


# --- Detection -------------------------------------------------------------------

@pytest.mark.parametrize('env, devices', [
    ({'COLAB_TPU_1VM': '1', 'TPU_ACCELERATOR_TYPE': 'v5e-1'}, ()),  # Colab's TPU VMs
    ({'TPU_ACCELERATOR_TYPE': 'v2-8'}, ()),
    ({}, ('accel0', 'accel1')),                                     # v2-v4 chips
    ({}, ('vfio/vfio', 'vfio/0')),                                  # v5e and later
])
def test_tpu_runtimes_are_detected(tmp_path, env, devices):
  dev_dir = _make_devices(tmp_path, *devices)
  assert colab_runtime.detect_runtime(env, dev_dir, NO_PROGRAMS) == 'tpu'


def test_gpu_needs_a_device_and_nvidia_smi(tmp_path):
  dev_dir = _make_devices(tmp_path, 'nvidia0', 'nvidiactl')
  which = {'nvidia-smi': '/usr/bin/nvidia-smi'}.get
  # Colab sets COLAB_GPU and an empty COLAB_TPU_1VM on every runtime: neither counts.
  env = {'COLAB_GPU': '1', 'COLAB_TPU_1VM': ''}
  assert colab_runtime.detect_runtime(env, dev_dir, which) == 'gpu'
  assert colab_runtime.detect_runtime(env, dev_dir, NO_PROGRAMS) == 'cpu'  # no driver tools
  assert colab_runtime.detect_runtime(env, _make_devices(tmp_path / 'ctl', 'nvidiactl'),
                                      which) == 'cpu'  # nvidia-smi alone, no GPU


def test_cpu_runtime_and_vfio_control_file_alone(tmp_path):
  dev_dir = _make_devices(tmp_path, 'vfio/vfio', 'null')
  assert colab_runtime.detect_runtime({'COLAB_GPU': '0'}, dev_dir, NO_PROGRAMS) == 'cpu'


def test_retired_tpu_node_runtime_is_refused_with_advice(tmp_path):
  with pytest.raises(colab_runtime.UnsupportedRuntimeError, match='TPU VM.*RUNTIME = "cpu"'):
    colab_runtime.detect_runtime({'COLAB_TPU_ADDR': '10.0.0.2:8470'}, str(tmp_path),
                                 NO_PROGRAMS)


# --- Which jax ---------------------------------------------------------------------

def _fake_nvidia_smi(tmp_path, output):
  """A PATH on which nvidia-smi prints `output` (its banner, or a --query answer)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir(exist_ok=True)
  script = bin_dir / 'nvidia-smi'
  script.write_text(f'#!/bin/sh\ncat <<"EOF"\n{output}\nEOF\n')
  script.chmod(script.stat().st_mode | stat.S_IXUSR)
  return {**os.environ, 'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}'}


BANNER = '| NVIDIA-SMI 580.82.07   Driver Version: 580.82.07   CUDA Version: {} |'


@pytest.mark.parametrize('cuda, extra', [('12.4', 'cuda12'), ('12.9', 'cuda12'),
                                         ('13.0', 'cuda13')])
def test_cuda_extra_comes_from_the_shared_script(tmp_path, cuda, extra):
  env = _fake_nvidia_smi(tmp_path, BANNER.format(cuda))
  assert colab_runtime.cuda_jax_extra(env=env) == extra
  # The same answer as `make install-gpu` and gpu_host.sh get from the script itself.
  assert subprocess.run([colab_runtime.CUDA_JAX_EXTRA_SCRIPT], env=env, capture_output=True,
                        text=True, check=True).stdout.strip() == extra


def test_too_old_a_driver_is_named(tmp_path):
  env = _fake_nvidia_smi(tmp_path, BANNER.format('11.8'))
  with pytest.raises(RuntimeError, match='CUDA 11; jax needs CUDA 12 or 13'):
    colab_runtime.cuda_jax_extra(env=env)


def test_gpu_compute_capability_is_read_from_nvidia_smi(tmp_path):
  env = _fake_nvidia_smi(tmp_path, '7.5')
  run = lambda *args, **kwargs: subprocess.run(*args, env=env, **kwargs)
  assert colab_runtime.gpu_compute_capability(run) == (7, 5)


def test_jax_requirement_per_runtime():
  assert colab_runtime.jax_requirement('tpu', '0.10.2') == ['jax[tpu]==0.10.2']
  assert colab_runtime.jax_requirement('gpu', '0.10.2', 'cuda12') == ['jax[cuda12]==0.10.2']
  assert colab_runtime.jax_requirement('gpu', '0.10.2', 'cuda13') == ['jax[cuda13]==0.10.2']
  assert colab_runtime.jax_requirement('cpu', '0.10.2') == ['jax==0.10.2']
  with pytest.raises(ValueError, match='cuda12'):
    colab_runtime.jax_requirement('gpu', '0.10.2')
  with pytest.raises(ValueError, match='runtime'):
    colab_runtime.jax_requirement('ipu', '0.10.2')


def test_pinned_version_is_the_jax_the_tests_run():
  requirements = os.path.join(REPO_ROOT, 'requirements.txt')
  assert colab_runtime.pinned_version(requirements, 'jax') == jax.__version__
  assert colab_runtime.pinned_version(requirements, 'jaxlib') == jax.__version__


def test_pinned_version_reads_names_as_pip_does(tmp_path):
  requirements = tmp_path / 'requirements.txt'
  requirements.write_text('# jax==0.0.1 in a comment\njaxlib==0.10.2\nArray_Record==0.8.6  # x\n'
                          'orbax-checkpoint[extra]==0.12.8\n')
  assert colab_runtime.pinned_version(str(requirements), 'array-record') == '0.8.6'
  assert colab_runtime.pinned_version(str(requirements), 'orbax_checkpoint') == '0.12.8'
  with pytest.raises(ValueError, match='pins no jax=='):
    colab_runtime.pinned_version(str(requirements), 'jax')


# --- What it trains ------------------------------------------------------------------

def _load_config(plan):
  """The config main.py would run for `plan`: the same flag parser, its overrides applied."""
  argv = ['main.py', f'--config={plan.config}', *plan.overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  cwd = os.getcwd()
  os.chdir(REPO_ROOT)  # the plan's config paths are relative to the repository, as in Colab
  try:
    flag_values(argv)
  finally:
    os.chdir(cwd)
  return flag_values.config


def test_cpu_runs_the_demo_chain():
  plan = colab_runtime.config_for_runtime('cpu', '/content/tensorflow_datasets')
  assert plan.config == 'configs/mae_then_wsp.py:demo' and plan.tfds_name is None
  config = _load_config(plan)
  validate_config(config)
  assert list(plan.stage_dirs) == list(config.stages)


@pytest.mark.parametrize('runtime, capability', [('tpu', None), ('gpu', (8, 0)), ('gpu', (9, 0))])
def test_accelerators_run_vit_b16_mae_on_imagenette_in_bfloat16(runtime, capability):
  plan = colab_runtime.config_for_runtime(runtime, '/content/tfds', capability)
  config = _load_config(plan)
  validate_config(config)  # nothing is downloaded: the tfds source is only named
  assert config.objective.name == 'mae' and config.model.variant == 'B/16'
  assert config.model.dtype == 'bfloat16' and config.model.attention_impl == 'auto'
  assert (config.data.source, config.data.tfds_name) == ('tfds', plan.tfds_name)
  assert config.data.tfds_data_dir == '/content/tfds' and config.data.image_size == 224
  assert config.batch_size == 256 and config.total_steps == 2000
  assert config.log.every_steps == 50
  assert plan.stage_dirs == {'mae': ''}  # a single stage trains in the workdir itself


def test_a_t4_trains_fewer_steps_in_float32_with_xla_attention():
  plan = colab_runtime.config_for_runtime('gpu', '/content/tfds', (7, 5))
  config = _load_config(plan)
  validate_config(config)
  assert config.model.dtype == 'float32' and config.model.attention_impl == 'xla'
  assert config.total_steps == colab_runtime.PRE_AMPERE_STEPS
  assert config.optim.warmup_steps < config.total_steps


def test_prepare_command_runs_tfds_with_the_given_python():
  command = colab_runtime.prepare_tfds_command('/venv/bin/python', 'imagenette/320px-v2', '/d')
  assert command[0] == '/venv/bin/python' and command[-2:] == ['imagenette/320px-v2', '/d']
  compile(command[2], '<prepare>', 'exec')
  assert "file_format=\"array_record\"" in command[2]


@pytest.mark.integration
def test_device_check_exits_3_off_the_expected_backend():
  for runtime, code in (('cpu', 0), ('tpu', 3)):
    result = subprocess.run(
        [sys.executable, '-c', colab_runtime.device_check_code(runtime)],
        env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, capture_output=True, text=True,
        check=False, timeout=120)
    assert result.returncode == code, result.stderr
    assert '(cpu): [CpuDevice' in result.stdout


# --- The notebook ----------------------------------------------------------------------

def _notebook():
  with open(NOTEBOOK) as f:
    return json.load(f)


def _code_cells(notebook):
  return [''.join(cell['source']) for cell in notebook['cells'] if cell['cell_type'] == 'code']


# IPython's `!command {python}` and `%magic {python}` lines, indented or not.
_ESCAPE = re.compile(r'^(\s*)([!%])(\S*)(.*)$')


def _as_python(source):
  """A cell's IPython lines become calls of _shell / _magic with the {}-expanded text."""
  def replace(match):
    indent, escape, word, rest = match.groups()
    if escape == '!':
      return f'{indent}_shell(f{(word + rest)!r})'
    return f'{indent}_magic({word!r}, f{rest.strip()!r})'
  return '\n'.join(_ESCAPE.sub(replace, line) for line in source.split('\n'))


def test_notebook_is_a_valid_nbformat_4_document():
  notebook = _notebook()
  assert notebook['nbformat'] == 4 and notebook['nbformat_minor'] >= 5
  ids = [cell['id'] for cell in notebook['cells']]
  assert len(set(ids)) == len(ids)
  for cell in notebook['cells']:
    assert cell['cell_type'] in ('markdown', 'code') and isinstance(cell['source'], list)
    if cell['cell_type'] == 'code':
      assert cell['outputs'] == [] and cell['execution_count'] is None  # committed clean
  for index, source in enumerate(_code_cells(notebook)):
    compile(_as_python(source), f'<code cell {index}>', 'exec')


def _run_notebook_until_training(tmp_path, runtime):
  """Runs the notebook's cells up to the training one, recording its shell commands."""
  commands = []
  namespace = {
      '_shell': lambda command: (commands.append(command),
                                 namespace.__setitem__('_exit_code', 0)),
      '_magic': lambda name, arg: commands.append(f'%{name} {arg}'),
  }
  cells = _code_cells(_notebook())
  for index, source in enumerate(cells):
    exec(compile(_as_python(source), f'<code cell {index}>', 'exec'), namespace)  # pylint: disable=exec-used
    if index == 0:  # the settings cell: this checkout, a scratch workdir, the runtime
      namespace.update(REPO_DIR=REPO_ROOT, RUNTIME=runtime, VENV=str(tmp_path / 'venv'))
    if '!{TRAIN}' in source:
      return namespace, commands
  raise AssertionError('no code cell runs the training')


def test_notebook_on_a_cpu_installs_cpu_jax_and_runs_the_demo(tmp_path, monkeypatch):
  monkeypatch.setattr(colab_runtime, 'detect_runtime', lambda: 'cpu')  # RUNTIME = 'auto' asks it
  namespace, commands = _run_notebook_until_training(tmp_path, 'auto')
  assert namespace['RUNTIME'] == 'cpu'
  venv_python = f'{tmp_path}/venv/bin/python'
  install = next(c for c in commands if '-r requirements.txt' in c)
  assert f'jax=={jax.__version__}' in install.split()
  device_check = next(c for c in commands if c.startswith(f'{venv_python} -c'))
  assert 'jax.devices()' in device_check and "'cpu'" in device_check
  assert not any('tensorflow_datasets' in c for c in commands)  # nothing to download
  assert 'requirements-tf.txt' not in install  # nor TensorFlow to prepare it with
  assert commands[-1] == (f'{venv_python} main.py --config=configs/mae_then_wsp.py:demo'
                          ' --workdir=/content/workdirs/cpu')
  assert namespace['STAGE_DIRS'] == {'mae': '/content/workdirs/cpu/mae',
                                     'wsp': '/content/workdirs/cpu/wsp'}


def test_notebook_on_a_tpu_installs_jax_tpu_and_prepares_imagenette(tmp_path):
  namespace, commands = _run_notebook_until_training(tmp_path, 'tpu')
  install = next(c for c in commands if '-r requirements.txt' in c)
  assert f'jax[tpu]=={jax.__version__}' in install
  assert '-r requirements-tf.txt' in install  # TFDS prepares Imagenette with TensorFlow
  prepare = next(c for c in commands if 'download_and_prepare' in c)
  assert prepare.endswith('imagenette/320px-v2 /content/tensorflow_datasets')
  assert commands[-1] == (f'{tmp_path}/venv/bin/python main.py --config=configs/mae.py:imagenette'
                          ' --workdir=/content/workdirs/tpu'
                          ' --config.data.tfds_data_dir=/content/tensorflow_datasets')
  assert namespace['STAGE_DIRS'] == {'mae': '/content/workdirs/tpu/'}


@pytest.mark.parametrize('capability, extra', [((7, 5), 'cuda12'), ((8, 9), 'cuda13')])
def test_notebook_on_a_gpu_asks_the_driver(tmp_path, monkeypatch, capability, extra):
  monkeypatch.setattr(colab_runtime, 'cuda_jax_extra', lambda: extra)
  monkeypatch.setattr(colab_runtime, 'gpu_compute_capability', lambda: capability)
  _, commands = _run_notebook_until_training(tmp_path, 'gpu')
  install = next(c for c in commands if '-r requirements.txt' in c)
  assert f'jax[{extra}]=={jax.__version__}' in install
  assert ('--config.model.dtype=float32' in commands[-1]) == (capability < (8, 0))
