"""Test-wide set-up: 8 fake CPU devices, so sharded code paths run for real,
and cheap compilation, since compiling dominates a tiny model's test time."""

import atexit
import importlib.util
import itertools
import os
import re
import shutil
import tempfile

import pytest
from _pytest.mark.expression import Expression  # -m's own parser (pytest is pinned)

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
    'test_init_from.py', 'test_attention.py', 'test_chain.py', 'test_flip.py',
    'test_remat_choice.py', 'test_sharding.py', 'test_config.py', 'test_linear_probe_and_knn.py',
    'test_aim.py', 'test_eval_counting.py')


# Test tiers: the markers (registered in pytest.ini) that take a test out of the unit tier, each
# with the modules it needs beyond requirements.txt + requirements-test.txt and what installs them.
# `make test-fast` runs `-m unit`: every test marked with none of these.
TIERS = {
    'integration': ((), ''),
    'multiprocess': ((), ''),
    'interop': (('torch', 'timm', 'transformers'), 'make install-weights-test'),
    'tpu_compile': (('libtpu',), 'make install-tpu-compile'),
    'beam': (('apache_beam', 'imagehash'), 'make install-beam'),
    'benchmarks': (('matplotlib',), 'make install-benchmarks'),
    'docs': (('mkdocs', 'material'), 'make install-docs'),
}
_MISSING = {tier: [module for module in modules if importlib.util.find_spec(module) is None]
            for tier, (modules, _) in TIERS.items()}
_MISSING = {tier: modules for tier, modules in _MISSING.items() if modules}
_PYTESTMARK = re.compile(r'^pytestmark\s*=(.*?)(?=^\S|\Z)', re.MULTILINE | re.DOTALL)


def _file_tiers(path):
  """The tiers a test file's module-level `pytestmark = ...` gives all its tests, read
  without importing it."""
  try:
    text = path.read_text(encoding='utf-8')
  except (OSError, UnicodeDecodeError):
    return set()
  match = _PYTESTMARK.search(text)
  return set(re.findall(r'\bmark\.(\w+)', match.group(1))) & set(TIERS) if match else set()


def _no_test_can_be_selected(tiers, config):
  """Whether -m deselects every test carrying `tiers`, whatever other markers each carries."""
  markexpr = config.option.markexpr
  if not markexpr:
    return False
  try:
    expression = Expression.compile(markexpr)
  except SyntaxError:
    return False  # pytest names the mistake
  others = sorted(expression.idents() - tiers - {'unit'})  # a tiered test is never unit
  for present in itertools.product((False, True), repeat=len(others)):
    names = tiers | {name for name, on in zip(others, present) if on}
    if expression.evaluate(lambda name, names=names, **kwargs: name in names):
      return False
  return True


def pytest_ignore_collect(collection_path, config):
  """Test files whose module-level tier is deselected (by -m, or for want of its libraries)
  are not imported: their imports cost seconds per worker, and a module-level importorskip
  would report the whole file as skipped."""
  if collection_path.suffix != '.py' or not collection_path.name.startswith('test_'):
    return None
  tiers = _file_tiers(collection_path)
  if tiers and (tiers & set(_MISSING) or _no_test_can_be_selected(tiers, config)):
    return True
  return None


def pytest_report_header(config):
  del config
  return [f'tier {tier} deselected: no {", ".join(modules)} here ({TIERS[tier][1]})'
          for tier, modules in _MISSING.items()]


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config, items):
  unit = pytest.mark.unit
  deselected = []
  for item in items:
    tiers = {mark.name for mark in item.iter_markers()} & set(TIERS)
    if not tiers:
      item.add_marker(unit)
    elif tiers & set(_MISSING):
      deselected.append(item)
  if deselected:
    config.hook.pytest_deselected(items=deselected)
    deselected = set(deselected)
    items[:] = [item for item in items if item not in deselected]
  rank = {name: i for i, name in enumerate(_SLOWEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


@pytest.fixture(name='image_folder')
def fixture_image_folder(tmp_path):
  """helpers.images.write_image_folder_with_broken_files's folder, in tmp_path / 'images'."""
  from helpers.images import write_image_folder_with_broken_files  # pylint: disable=import-outside-toplevel
  return write_image_folder_with_broken_files(tmp_path / 'images')
