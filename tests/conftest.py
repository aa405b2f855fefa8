"""Test-wide set-up: 8 fake CPU devices, so sharded code paths run for real,
and cheap compilation, since compiling dominates a tiny model's test time."""

import atexit
import os
import shutil
import tempfile

# All of this must happen before JAX is imported anywhere.
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
