"""config.model.remat='auto': the least recomputation whose compiled train step fits the device.

Remat trades compute for memory: 'none' keeps every activation for the
backward pass, 'dots' keeps the matmul outputs and recomputes the rest, 'full'
keeps only each block's input and recomputes the whole block (about one more
forward). Which one a stage needs depends on the model, batch, mesh and
device, and no rule of thumb predicts XLA's buffer assignment (on a CPU, remat
of unrolled layers even uses more memory), so 'auto' measures: the train step
is compiled for the real global batch shapes with each policy of CANDIDATES in
turn, and the first whose per-device bytes fit in MEMORY_FRACTION of the
device's memory is taken. The compiled step of the choice is kept on the
trainer, so when 'none' fits choosing costs no compile at all.

Devices that report no memory limit (CPU) get 'none' without compiling.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from big_pretrain.models.transformer import REMAT_AUTO
from big_pretrain.objectives import build_objective
from big_pretrain.train.step import ShardedTrainer, build_trainer

# In order of increasing recomputation: the first that fits is the fastest.
CANDIDATES = ('none', 'dots', 'full')
# The step's compiled program does not count everything on the device: batches
# prefetched ahead of the step, evaluators' programs, allocator fragmentation.
MEMORY_FRACTION = 0.9

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class RematChoice:
  """The stage's objective and trainer, built with the remat policy chosen."""
  config: ml_collections.ConfigDict  # the stage config, model.remat the policy chosen
  objective: Any
  trainer: ShardedTrainer            # its step compiled already when it was measured
  step_bytes: dict[str, int]         # policy -> per-device bytes of its compiled step, if measured

  @property
  def policy(self) -> str:
    return self.config.model.remat


def build_with_remat_choice(config, mesh: Mesh, rules, tx: optax.GradientTransformation,
                            schedule: optax.Schedule,
                            batch_shapes: dict[str, jax.ShapeDtypeStruct]) -> RematChoice:
  """build_objective and build_trainer for the stage, choosing model.remat first if 'auto'.

  `batch_shapes` are the global shapes of the training batches
  (pipeline.global_batch_shapes). An explicit policy is built as it is, with
  nothing compiled.
  """
  if config.model.remat != REMAT_AUTO:
    return _build(config, mesh, rules, tx, schedule)
  limit = mesh_memory_limit(mesh)
  if limit is None:
    logging.info("model.remat='auto': the %s devices report no memory limit, so no remat.",
                 mesh.devices.flat[0].platform)
    return _build(_with_remat(config, 'none'), mesh, rules, tx, schedule)

  budget = int(MEMORY_FRACTION * limit)
  measured, least = {}, None
  for policy in CANDIDATES:
    candidate = _build(_with_remat(config, policy), mesh, rules, tx, schedule)
    compiled = candidate.trainer.compile_step(batch_shapes)
    measured[policy] = step_bytes_per_device(compiled)
    logging.info("model.remat='auto': with remat '%s' the train step needs %s per device.",
                 policy, _gib(measured[policy]))
    candidate = dataclasses.replace(candidate, trainer=candidate.trainer.with_compiled_step(compiled))
    if measured[policy] <= budget:
      logging.info("model.remat='auto' chose '%s': %s of the %s per device it may use "
                   '(%.0f%% of %s); measured: %s.', policy, _gib(measured[policy]), _gib(budget),
                   100 * MEMORY_FRACTION, _gib(limit), _describe(measured))
      return dataclasses.replace(candidate, step_bytes=measured)
    if least is None or measured[policy] < measured[least.policy]:
      least = candidate
  logging.warning(
      "model.remat='auto': no remat policy fits. The train step needs %s per device even with "
      "remat '%s' (measured: %s), of the %s it may use (%.0f%% of %s): it will likely run out "
      'of memory. Shard the model over more devices (a larger config.mesh.fsdp) or lower '
      'config.batch_size.', _gib(measured[least.policy]), least.policy, _describe(measured),
      _gib(budget), 100 * MEMORY_FRACTION, _gib(limit))
  return dataclasses.replace(least, step_bytes=measured)


def step_bytes_per_device(compiled) -> int:
  """Device bytes a compiled step needs on one device, from XLA's memory_analysis().

  Arguments (the state and batch) + outputs + temporaries (activations kept for
  the backward pass, gradients, ...) + the program's code, less the outputs
  that reuse donated argument buffers (aliases), which would otherwise count twice.
  """
  memory = compiled.memory_analysis()
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes
          + memory.generated_code_size_in_bytes)


def device_memory_limit(device: jax.Device) -> int | None:
  """The bytes `device` can allocate, or None where it does not say (CPU)."""
  stats = device.memory_stats()
  return stats.get('bytes_limit') if stats else None


def mesh_memory_limit(mesh: Mesh) -> int | None:
  """The smallest memory limit of the mesh's devices, in every process; None if unknown.

  Every process must choose the same policy, or their programs would differ:
  the limit is agreed over all processes first.
  """
  local = [device_memory_limit(device) for device in mesh.devices.flat
           if device.process_index == jax.process_index()]
  if not local or any(limit is None for limit in local):
    return None
  limit = min(local)
  if jax.process_count() > 1:
    limit = int(np.min(multihost_utils.process_allgather(np.asarray(limit, np.int64))))
  return limit


def _build(config, mesh, rules, tx, schedule) -> RematChoice:
  objective = build_objective(config)
  return RematChoice(config, objective, build_trainer(objective, tx, schedule, mesh, rules), {})


def _with_remat(config, policy: str):
  """A copy of the stage config with model.remat = policy; the caller's stays as it was."""
  config = config.copy_and_resolve_references()
  config.model.remat = policy
  return config


def _gib(num_bytes: int) -> str:
  return f'{num_bytes / GIB:.3g} GiB'


def _describe(measured: dict[str, int]) -> str:
  return ', '.join(f'{policy} {_gib(num_bytes)}' for policy, num_bytes in measured.items())
