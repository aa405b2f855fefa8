"""Test-wide set-up: 8 fake CPU devices, so sharded code paths run for real,
and cheap compilation, since compiling dominates a tiny model's test time."""

import atexit
import os
import shutil
import tempfile

import pytest

# All of this must happen before JAX is imported anywhere.
# The suite runs on 8 simulated CPU devices, also where the TPU compiler (libtpu, for the
# compile tests, which compile for a TPU topology without running on one) or a GPU is there.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
# -O0 code generation: compiles ~3x faster; the tiny test models run fast anyway.
os.environ.setdefault(
    'XLA_FLAGS', '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0')
# Tests build the same tiny programs many times: share compilations within the session.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix='big_pretrain_test_jax_cache_')
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache_dir
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'


def pytest_configure(config):
  del config
  # Orbax saves a replicated array in slices, one per replica, to spread the
  # device-to-host copies over accelerators. On 8 fake CPU devices that is pure
  # Python overhead (about 1 s per tiny checkpoint); the files are the same.
  # (tests/multiprocess_worker.py's processes keep Orbax's default.)
  import jax
  import orbax.checkpoint as ocp
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


# `make test` runs pytest-xdist workers, a whole file each at a time (--dist
# loadfile, so module fixtures are built once). Files start in this order, the
# slowest first, so the workers finish together; the rest follow in name order.
_SLOWEST_FILES_FIRST = (
    'test_multiprocess.py', 'test_finetune.py', 'test_self_training.py', 'test_faults.py', 'test_train.py',
    'test_transfer.py', 'test_attention.py', 'test_pipeline.py', 'test_flip.py',
    'test_remat_choice.py', 'test_sharding.py', 'test_config.py', 'test_evaluators.py',
    'test_aim.py', 'test_eval_counting.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_SLOWEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


@pytest.fixture(name='image_folder')
def fixture_image_folder(tmp_path):
  """helpers.images.write_image_folder_with_broken_files's folder, in tmp_path / 'images'."""
  from helpers.images import write_image_folder_with_broken_files  # pylint: disable=import-outside-toplevel
  return write_image_folder_with_broken_files(tmp_path / 'images')
