"""Test-wide set-up: 8 fake CPU devices, so sharded code paths run for real."""

import os

# Must happen before JAX is imported anywhere.
os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
