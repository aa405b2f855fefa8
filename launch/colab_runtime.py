"""What launch/colab_demo.ipynb needs to know about its runtime: TPU, GPU or CPU.

The notebook imports this module before anything is installed, so it uses the
standard library alone. Every probe of the machine (environment, device files,
programs on PATH) can be passed in, so tests can fake each kind of runtime.

Signals relied on (Colab, 2024-2025):
  TPU  Colab's TPU runtimes (v2-8, v5e-1, v6e-1) are TPU VMs: they set
       COLAB_TPU_1VM=1 and TPU_ACCELERATOR_TYPE (e.g. 'v5e-1'), and the chips
       are device files, /dev/accel0... (v2-v4) or /dev/vfio/0... (v5e on).
       The retired "TPU (deprecated)" runtime set only COLAB_TPU_ADDR: a TPU
       node on another machine, which current jax cannot drive.
  GPU  an NVIDIA driver: /dev/nvidia0... and nvidia-smi on PATH (Colab sets
       COLAB_GPU on every runtime, so it says nothing).
  CPU  none of these.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import subprocess
from typing import Callable, Mapping

RUNTIMES = ('tpu', 'gpu', 'cpu')
LAUNCH_DIR = os.path.dirname(os.path.abspath(__file__))
CUDA_JAX_EXTRA_SCRIPT = os.path.join(LAUNCH_DIR, 'cuda_jax_extra.sh')


class UnsupportedRuntimeError(RuntimeError):
  """A runtime the pinned jax cannot use, with what to choose instead."""


def detect_runtime(env: Mapping[str, str] = os.environ, dev_dir: str = '/dev',
                   which: Callable[[str], str | None] = shutil.which) -> str:
  """'tpu', 'gpu' or 'cpu': the accelerator this machine has (see the module docstring)."""
  if env.get('COLAB_TPU_1VM') == '1' or env.get('TPU_ACCELERATOR_TYPE'):
    return 'tpu'
  if glob.glob(os.path.join(dev_dir, 'nvidia[0-9]*')) and which('nvidia-smi'):
    return 'gpu'
  if (glob.glob(os.path.join(dev_dir, 'accel[0-9]*'))
      or glob.glob(os.path.join(dev_dir, 'vfio', '[0-9]*'))):
    return 'tpu'
  if env.get('COLAB_TPU_ADDR'):
    raise UnsupportedRuntimeError(
        f"COLAB_TPU_ADDR={env['COLAB_TPU_ADDR']} names a TPU node on another machine (Colab's "
        'retired "TPU (deprecated)" runtime), which current jax cannot use. Choose Runtime > '
        'Change runtime type > a TPU VM (v2-8, v5e-1, v6e-1), or set RUNTIME = "cpu".')
  return 'cpu'


def pinned_version(requirements_path: str, package: str) -> str:
  """The version that `requirements_path` pins `package` to (`package==VERSION`)."""
  wanted = _normalized_name(package)
  with open(requirements_path) as f:
    for line in f:
      name, pinned, version = line.split('#', 1)[0].partition('==')
      if pinned and _normalized_name(name.split('[', 1)[0]) == wanted:
        return version.strip()
  raise ValueError(f'{requirements_path} pins no {package}==VERSION.')


def _normalized_name(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name.strip()).lower()  # PEP 503: jax-cuda12 == JAX_cuda12


def cuda_jax_extra(script: str = CUDA_JAX_EXTRA_SCRIPT,
                   env: Mapping[str, str] | None = None) -> str:
  """'cuda12' or 'cuda13': the jax extra for the CUDA version the NVIDIA driver runs.

  launch/cuda_jax_extra.sh decides (as for `make install-gpu` and gpu_host.sh),
  so the rule lives in one place.
  """
  result = subprocess.run([script], env=None if env is None else dict(env),
                          capture_output=True, text=True, check=False)
  if result.returncode != 0:
    raise RuntimeError(result.stderr.strip() or f'{script} failed ({result.returncode}).')
  return result.stdout.strip()


def jax_requirement(runtime: str, jax_version: str, cuda_extra: str | None = None) -> list[str]:
  """pip arguments that install jax `jax_version` built for `runtime`.

  TPU: jax[tpu] pulls in the matching libtpu from PyPI (as launch/tpu_pod.sh
  installs it). GPU: jax[cuda12] or jax[cuda13] (`cuda_extra`, from
  `cuda_jax_extra()`), whose wheels bring CUDA and cuDNN; the driver is all the
  runtime needs. CPU: plain jax, as requirements.txt has it.
  """
  if runtime == 'tpu':
    return [f'jax[tpu]=={jax_version}']
  if runtime == 'gpu':
    if cuda_extra not in ('cuda12', 'cuda13'):
      raise ValueError(f"a GPU needs cuda_extra 'cuda12' or 'cuda13', got {cuda_extra!r}.")
    return [f'jax[{cuda_extra}]=={jax_version}']
  if runtime == 'cpu':
    return [f'jax=={jax_version}']
  raise ValueError(f'runtime {runtime!r}: choose one of {RUNTIMES}.')


def gpu_compute_capability(run: Callable[..., subprocess.CompletedProcess] = subprocess.run
                           ) -> tuple[int, int]:
  """(major, minor) compute capability of GPU 0, from nvidia-smi (e.g. (7, 5) for a T4)."""
  result = run(['nvidia-smi', '--query-gpu=compute_cap', '--format=csv,noheader'],
               capture_output=True, text=True, check=True)
  major, minor = result.stdout.split()[0].split('.')
  return int(major), int(minor)


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
  """What the notebook trains: `python main.py --config=CONFIG --workdir=W *overrides`."""
  config: str
  overrides: tuple[str, ...]
  stage_dirs: dict[str, str]       # stage name -> its folder, relative to the workdir
  tfds_name: str | None = None     # a TFDS dataset to download and prepare first


# The accelerator run: ViT-B/16 MAE on Imagenette at 224 px (configs/mae.py:imagenette).
ACCELERATOR_CONFIG = 'configs/mae.py:imagenette'
ACCELERATOR_TFDS_NAME = 'imagenette/320px-v2'
PRE_AMPERE_STEPS = 300


def config_for_runtime(runtime: str, tfds_data_dir: str,
                       gpu_capability: tuple[int, int] | None = None) -> TrainingPlan:
  """The config the notebook trains on `runtime`.

  CPU: the demo chain, MAE then WSP on the embedded synthetic data. TPU, GPU:
  ViT-B/16 MAE on Imagenette, prepared in `tfds_data_dir`. A GPU older than
  Ampere (`gpu_capability` < (8, 0): Colab's T4) has neither bfloat16 nor
  cuDNN's flash attention, so it computes in float32 with XLA's attention, and
  trains PRE_AMPERE_STEPS steps: at a T4's 8 TFLOP/s of float32 the full 2000
  would take 2-3 hours.
  """
  if runtime == 'cpu':
    return TrainingPlan('configs/mae_then_wsp.py:demo', (), {'mae': 'mae', 'wsp': 'wsp'})
  if runtime not in RUNTIMES:
    raise ValueError(f'runtime {runtime!r}: choose one of {RUNTIMES}.')
  overrides = [f'--config.data.tfds_data_dir={tfds_data_dir}']
  if runtime == 'gpu' and gpu_capability is not None and gpu_capability < (8, 0):
    overrides += ['--config.model.dtype=float32', '--config.model.attention_impl=xla',
                  f'--config.total_steps={PRE_AMPERE_STEPS}',
                  f'--config.optim.warmup_steps={PRE_AMPERE_STEPS // 10}']
  return TrainingPlan(ACCELERATOR_CONFIG, tuple(overrides), {'mae': ''},
                      tfds_name=ACCELERATOR_TFDS_NAME)


def prepare_tfds_command(python: str, name: str, data_dir: str) -> list[str]:
  """Downloads and prepares TFDS dataset `name` as ArrayRecord (what the tfds source reads)."""
  code = ('import sys, tensorflow_datasets as tfds; '
          'builder = tfds.builder(sys.argv[1], data_dir=sys.argv[2]); '
          'builder.download_and_prepare(file_format="array_record"); '
          "print(builder.info.splits)")
  return [python, '-c', code, name, data_dir]


def device_check_code(runtime: str) -> str:
  """Python that prints jax's devices and exits 3 unless jax runs on `runtime`."""
  return ('import sys, jax; devices = jax.devices(); '
          "print(f'{len(devices)} x {devices[0].device_kind} ({jax.default_backend()}):', devices); "
          f'sys.exit(0 if jax.default_backend() == {runtime!r} else 3)')
