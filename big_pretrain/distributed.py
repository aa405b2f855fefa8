"""Starting JAX's distributed runtime when a run spans several processes.

Every host of a TPU pod or GPU cluster runs the same command. Before JAX
touches a device, each process must join the others through
``jax.distributed.initialize``; JAX can discover the coordinator, the process
count and this process's id itself on Cloud TPU VMs, SLURM and Open MPI, and
elsewhere they are given explicitly (flags or ``JAX_COORDINATOR_ADDRESS``).
"""

from __future__ import annotations

import glob
import importlib.util
import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

MODES = ('auto', 'on', 'off')
MAX_SHARED_MESSAGE_BYTES = 4096


def _on_cloud_tpu_vm() -> bool:
  return bool(importlib.util.find_spec('libtpu')) and bool(
      glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def detected_cluster() -> str | None:
  """The multi-process environment JAX can configure itself from, or None."""
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return 'JAX_COORDINATOR_ADDRESS'
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in os.environ:
    return 'SLURM'
  if int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return 'Open MPI'
  if _on_cloud_tpu_vm():
    return 'Cloud TPU VM'
  return None


def initialize(mode: str = 'auto', *, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               initialization_timeout_s: int = 300) -> bool:
  """Joins the other processes of this run; returns whether the runtime was started.

  mode 'auto': start it when the three explicit values are given or a cluster
  is detected; 'on': always (JAX detects what is not given); 'off': never.
  """
  if mode not in MODES:
    raise ValueError(f'--distributed={mode!r}: use one of {", ".join(MODES)}.')
  explicit = (coordinator_address, num_processes, process_id)
  if any(value is not None for value in explicit) and None in explicit:
    raise ValueError(
        'Give all three of --coordinator_address, --num_processes and --process_id, or none'
        f' of them (got coordinator_address={coordinator_address!r},'
        f' num_processes={num_processes!r}, process_id={process_id!r}).')
  if mode == 'off' or jax.distributed.is_initialized():
    return False
  cluster = 'flags' if coordinator_address is not None else detected_cluster()
  if mode == 'auto' and cluster is None:
    return False
  # CPU-only processes (tests, CPU clusters) need a collectives backend for
  # cross-process reductions; GPU and TPU ignore this setting.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, initialization_timeout=initialization_timeout_s)
  logging.info('Distributed runtime started (%s): process %d of %d, %d local and %d global '
               'devices.', cluster or 'auto-detected', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def process_0_message(message: str | None) -> str | None:
  """Process 0's `message` (None: it had none), on every process; each must call it.

  For a step that only process 0 takes, such as locking the workdir: when it fails,
  every process must stop with it instead of waiting for process 0 in a collective
  until the runtime's heartbeat gives up.
  """
  if jax.process_count() == 1:
    return message
  encoded = np.zeros(MAX_SHARED_MESSAGE_BYTES, np.uint8)
  data = (message or '').encode()[:MAX_SHARED_MESSAGE_BYTES]
  encoded[:len(data)] = np.frombuffer(data, np.uint8)
  shared = np.asarray(multihost_utils.broadcast_one_to_all(encoded))
  return bytes(shared).rstrip(b'\0').decode(errors='replace') or None
