"""model.remat='auto' (and a deep encoder's scan='auto'): the least recomputation whose compiled
train step fits the device.

Remat trades compute for memory: 'none' keeps every activation for the
backward pass, 'dots' keeps the matmul outputs and recomputes the rest, 'full'
keeps only each block's input and recomputes the whole block (about one more
forward). Which one a stage needs depends on the model, batch, mesh and
device, and no rule of thumb predicts XLA's buffer assignment (on a CPU, remat
of unrolled layers even uses more memory), so 'auto' measures: the train step
is compiled for the real global batch shapes with each policy of CANDIDATES in
turn, and the first whose per-device bytes (the compiler's own peak,
step_bytes_per_device) fit in MEMORY_FRACTION of the device's memory is taken.
A compiler that finds a program too large for the device refuses it (the TPU
compiler's RESOURCE_EXHAUSTED): that policy does not fit, and the next is tried.
The compiled step of the choice is kept on the trainer, so when 'none' fits
choosing costs no compile at all.

The layers' layout is part of the choice when it may be: a stage that asked for
model.scan='auto' and has no checkpoint yet takes the depth rule's layout
(vit.scan_layers: scanned past 24 layers, for its flat compile time), and where
no policy fits that scanned stack, the unrolled one, which XLA lays out in less
memory (a scanned L/16 took 2x the HBM of the unrolled one on a TPU), with each
policy again. The stage records the layout chosen; its checkpoints hold it.

The same code path runs on a real device and for a topology's devices (main.py
--compile_for), which report no memory: their capacity is their TPU
generation's (accelerators.ACCELERATORS). Devices that report none and are no TPU
we know (a CPU) get 'none' without compiling.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from big_pretrain import accelerators
from big_pretrain import sharding as sharding_lib
from big_pretrain.models.transformer import REMAT_AUTO
from big_pretrain.objectives import build_objective
from big_pretrain.train.step import ShardedTrainer, build_trainer

# In order of increasing recomputation: the first that fits is the fastest.
CANDIDATES = ('none', 'dots', 'full')
# The step's compiled program does not count everything on the device: batches
# prefetched ahead of the step, evaluators' programs, allocator fragmentation.
MEMORY_FRACTION = 0.9
# RematChoice.step_bytes's key when the parameters and optimizer state alone overflow.
STATE_ALONE = 'state alone'

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class RematChoice:
  """The stage's objective and trainer, built with the remat policy (and layout) chosen."""
  config: ml_collections.ConfigDict  # the stage config, model.remat the policy chosen
  objective: Any
  trainer: ShardedTrainer            # its step compiled already when it was measured
  # 'policy' or 'policy, unrolled' -> per-device bytes of its compiled step, if measured; None
  # where the compiler refused it as too large without saying by how much.
  step_bytes: dict[str, int | None]
  memory_limit: int | None = None    # the bytes per device it had to fit in, if known
  fits: bool = True                  # whether the step chosen fits in MEMORY_FRACTION of it

  @property
  def policy(self) -> str:
    return self.config.model.remat


@dataclasses.dataclass(frozen=True)
class DoesNotFit:
  """What the compiler said of a program too large for the device."""
  needed: int | None     # the bytes it asked for (temporaries, in the TPU compiler's words)
  available: int | None  # the bytes it had
  message: str


def build_with_remat_choice(config, mesh: Mesh, rules, tx: optax.GradientTransformation,
                            schedule: optax.Schedule,
                            batch_shapes: dict[str, jax.ShapeDtypeStruct], *,
                            may_unroll: bool = False,
                            memory_limit: int | None = None) -> RematChoice:
  """build_objective and build_trainer for the stage, choosing model.remat first if 'auto'.

  `batch_shapes` are the global shapes of the training batches
  (pipeline.global_batch_shapes). An explicit policy is built as it is, with
  nothing compiled. `may_unroll`: the stage asked for scan='auto' and holds no
  checkpoint yet, so a scanned stack that fits under no policy may be unrolled
  (see the module doc). `memory_limit`: the bytes per device to fit in, instead
  of what the devices report (or their generation's).
  """
  if config.model.remat != REMAT_AUTO:
    return _build(config, mesh, rules, tx, schedule)
  limit = memory_limit if memory_limit is not None else mesh_memory_limit(mesh)
  if limit is None:
    logging.info("model.remat='auto': the %s devices report no memory limit, so no remat.",
                 mesh.devices.flat[0].platform)
    return _build(_with_remat(config, 'none'), mesh, rules, tx, schedule)

  budget = int(MEMORY_FRACTION * limit)
  first = _build(_with_remat(config, CANDIDATES[0]), mesh, rules, tx, schedule)
  state = state_bytes_per_device(first.trainer)
  if state > budget:  # no policy can help: the parameters and optimizer state alone overflow
    logging.warning(
        "model.remat='auto': the parameters and optimizer state alone take %s per device, "
        'above the %s it may use (%.0f%% of %s): no remat policy can fit. Shard the model over '
        'more devices (a larger config.mesh.fsdp).', _gib(state), _gib(budget),
        100 * MEMORY_FRACTION, _gib(limit))
    return dataclasses.replace(first, step_bytes={STATE_ALONE: state}, memory_limit=limit,
                               fits=False)
  layouts = [config]
  if may_unroll and config.model.scan is True:
    layouts.append(_unrolled(config))
  measured, least = {}, None
  for layout in layouts:
    for policy in CANDIDATES:
      label = policy if layout is config else f'{policy}, unrolled'
      candidate = _build(_with_remat(layout, policy), mesh, rules, tx, schedule)
      compiled = compile_or_refusal(candidate.trainer, batch_shapes)
      if isinstance(compiled, DoesNotFit):
        measured[label] = compiled.needed
        logging.info("model.remat='auto': with remat '%s' the compiler refused the train step "
                     'as too large: %s', label, compiled.message)
        continue
      measured[label] = step_bytes_per_device(compiled)
      logging.info("model.remat='auto': with remat '%s' the train step needs %s per device.",
                   label, _gib(measured[label]))
      candidate = dataclasses.replace(
          candidate, trainer=candidate.trainer.with_compiled_step(compiled))
      if measured[label] <= budget:
        logging.info("model.remat='auto' chose '%s': %s of the %s per device it may use "
                     '(%.0f%% of %s); measured: %s.', label, _gib(measured[label]),
                     _gib(budget), 100 * MEMORY_FRACTION, _gib(limit), _describe(measured))
        return dataclasses.replace(candidate, step_bytes=measured, memory_limit=limit)
      if least is None or measured[label] < least[1]:
        least = (candidate, measured[label])
  need = (f'at least {_gib(least[1])} per device' if least else
          'more than the device has: the compiler refused every policy')
  logging.warning(
      "model.remat='auto': no remat policy fits the %s per device it may use (%.0f%% of %s). "
      'The train step needs %s (measured: %s): it will likely run out of memory. Shard the '
      'model over more devices (a larger config.mesh.fsdp) or lower config.batch_size.',
      _gib(budget), 100 * MEMORY_FRACTION, _gib(limit), need, _describe(measured))
  if least is None:  # the compiler refused every policy: build the last, uncompiled
    least = (_build(_with_remat(layouts[-1], CANDIDATES[-1]), mesh, rules, tx, schedule), None)
  return dataclasses.replace(least[0], step_bytes=measured, memory_limit=limit, fits=False)


def compile_or_refusal(trainer: ShardedTrainer, batch_shapes) -> Any:
  """The train step compiled for `batch_shapes`, or DoesNotFit when the compiler refuses it
  for the device's memory (RESOURCE_EXHAUSTED); any other compile error is raised."""
  try:
    return trainer.compile_step(batch_shapes)
  except Exception as error:  # noqa: BLE001  (XlaRuntimeError; which class varies by version)
    refusal = does_not_fit(error)
    if refusal is None:
      raise
    return refusal


_TOO_LARGE = re.compile(r'required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available '
                        r'HBM \(([\d.]+)([KMGT]?)\)')
_USED_OF = re.compile(r'Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm')
_UNIT = {'': 1, 'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}


def does_not_fit(error: Exception) -> DoesNotFit | None:
  """The compiler's refusal of a program too large for the device's memory, read from its
  error; None for any other error."""
  message = str(error)
  if 'RESOURCE_EXHAUSTED' not in message and 'Ran out of memory' not in message:
    return None
  first_line = message.strip().splitlines()[0][:300]
  for pattern in (_TOO_LARGE, _USED_OF):
    if match := pattern.search(message):
      needed, unit, available, available_unit = match.groups()
      return DoesNotFit(int(float(needed) * _UNIT[unit]),
                        int(float(available) * _UNIT[available_unit]), first_line)
  return DoesNotFit(None, None, first_line)


def state_bytes_per_device(trainer: ShardedTrainer) -> int:
  """The bytes one device holds of the train state (parameters, optimizer state), from the
  abstract state's shardings: what any step needs before its first activation."""
  return sum(sharding_lib.shard_bytes(leaf)
             for leaf in jax.tree_util.tree_leaves(trainer.abstract_state))


def step_bytes_per_device(compiled) -> int:
  """Device bytes a compiled step needs on one device: on a TPU or GPU the compiler's own
  peak (XLA's memory_analysis().peak_memory_in_bytes, from its buffer assignment: what the
  compiler tests a program against the device's memory by); on a CPU, whose compiler tests
  nothing and whose peak does not tell remat policies apart, the sum `summed_step_bytes`,
  which is never below it."""
  peak = getattr(compiled.memory_analysis(), 'peak_memory_in_bytes', 0) or 0
  if peak > 0 and _platform(compiled) != 'cpu':
    return int(peak)
  return summed_step_bytes(compiled)


def _platform(compiled) -> str:
  shardings = jax.tree_util.tree_leaves(compiled.input_shardings)
  devices = shardings[0].device_set if shardings else ()
  return next(iter(devices)).platform if devices else 'cpu'


def summed_step_bytes(compiled) -> int:
  """Arguments (the state and batch) + outputs + temporaries (activations kept for the
  backward pass, gradients, ...) + the program's code, less the outputs that reuse donated
  argument buffers (aliases): as if every buffer were live at once, so above the compiler's
  peak (0.6-4.9 GiB above it for the paper-scale steps on v5p)."""
  memory = compiled.memory_analysis()
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes
          + memory.generated_code_size_in_bytes)


def device_memory_limit(device: jax.Device) -> int | None:
  """The bytes `device` can allocate: as it reports, or for a TPU that reports nothing (a
  topology's devices, which run nothing) its generation's HBM; None for a CPU."""
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001  (a topology's device: 'only supported for addressable')
    stats = None
  if stats and stats.get('bytes_limit'):
    return stats['bytes_limit']
  return accelerators.hbm_per_device(getattr(device, 'device_kind', ''))


def mesh_memory_limit(mesh: Mesh) -> int | None:
  """The smallest memory limit of the mesh's devices, in every process; None if unknown.

  Every process must choose the same policy, or their programs would differ:
  the limit is agreed over all processes first.
  """
  local = [device_memory_limit(device) for device in mesh.devices.flat
           if device.process_index == jax.process_index()]
  if not local:  # a topology's devices: none is this process's, all are alike
    local = [device_memory_limit(mesh.devices.flat[0])]
  if not local or any(limit is None for limit in local):
    return None
  limit = min(local)
  if jax.process_count() > 1:
    limit = int(np.min(multihost_utils.process_allgather(np.asarray(limit, np.int64))))
  return limit


def _build(config, mesh, rules, tx, schedule) -> RematChoice:
  objective = build_objective(config)
  return RematChoice(config, objective, build_trainer(objective, tx, schedule, mesh, rules), {})


def _unrolled(config):
  """A copy of the stage config with its layers unrolled (model.scan=False)."""
  config = config.copy_and_resolve_references()
  with config.ignore_type():
    config.model.scan = False
  return config


def _with_remat(config, policy: str):
  """A copy of the stage config with model.remat = policy; the caller's stays as it was."""
  config = config.copy_and_resolve_references()
  config.model.remat = policy
  return config


def _gib(num_bytes: int) -> str:
  return f'{num_bytes / GIB:.3g} GiB'


def _describe(measured: dict[str, int | None]) -> str:
  return ', '.join(f'{policy} {_gib(num_bytes) if num_bytes else "too large"}'
                   for policy, num_bytes in measured.items())
