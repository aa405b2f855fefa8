"""Device mesh from the config, and the rules mapping logical axis names to it.

Layers name the axes of their parameters ('embed', 'mlp', 'heads', ...); one
small rule table decides which mesh axis each name is split over. Changing
the parallelism strategy is a config change, never a model change.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from big_pretrain import schema

MESH_AXES = ('data', 'fsdp', 'tensor')

# The batch is split over every axis that holds a different slice of data.
BATCH_AXES = ('data', 'fsdp')

# logical name -> mesh axis (or None: replicated). FSDP shards the model
# width; tensor parallelism shards the MLP hidden and attention-head axes.
DEFAULT_LOGICAL_AXIS_RULES = (
    ('batch', BATCH_AXES),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('vocab', 'tensor'),
    ('layers', None),
    ('tokens', None),
)


_MESH_AXIS = schema.Rule(lambda v: isinstance(v, int) and not isinstance(v, bool)
                         and (v == -1 or v >= 1),
                         'must be -1 (all the devices left) or an integer >= 1')
# config.mesh: the devices' layout, one size per axis.
MESH_KEYS = schema.Group(
    "the device mesh: each axis's size; one may be -1, the devices left",
    data=schema.Key(-1, _MESH_AXIS, 'data parallelism: replicas that each see their own rows'),
    fsdp=schema.Key(1, _MESH_AXIS, 'FSDP: the model width sharded, and the batch split too'),
    tensor=schema.Key(1, _MESH_AXIS, 'tensor parallelism: MLP hidden units and heads sharded'),
)
# config.sharding_rules: overrides of DEFAULT_LOGICAL_AXIS_RULES, e.g. embed: None.
SHARDING_RULES_KEY = schema.FreeForm(
    'logical axis name -> mesh axes, overriding DEFAULT_LOGICAL_AXIS_RULES (e.g. embed: None '
    'replicates the model width)')


def resolve_mesh_shape(mesh_config, num_devices: int, num_slices: int = 1) -> tuple[int, ...]:
  """Sizes of ('data', 'fsdp', 'tensor') over `num_devices` devices in `num_slices` slices.

  `config.mesh` describes one slice: one -1 means "all the devices of a slice left", and
  over K slices the data axis is K times the slice's (only the data axis crosses the
  data-centre network). A mesh whose sizes already multiply to every slice's devices is
  taken as the whole mesh, as it is written.
  """
  sizes = [int(mesh_config[name]) for name in MESH_AXES]
  unknown = [name for name, size in zip(MESH_AXES, sizes) if size == -1]
  if len(unknown) > 1:
    raise ValueError(
        f'config.mesh: only one axis may be -1, got {unknown}. Give explicit '
        'sizes to all but one of data/fsdp/tensor.')
  for name, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise ValueError(f'config.mesh.{name}={size}: sizes are positive or -1.')
  if num_slices < 1 or num_devices % num_slices:
    raise ValueError(f'{num_devices} devices do not split into {num_slices} equal slices.')
  known = math.prod(size for size in sizes if size != -1)
  if num_slices > 1 and not unknown and known == num_devices:
    if sizes[0] % num_slices:
      raise ValueError(
          f'config.mesh={dict(zip(MESH_AXES, sizes))} over {num_slices} slices: the data axis '
          f'spans the slices, so data must be a multiple of {num_slices} (FSDP and tensor '
          'parallelism stay inside a slice).')
    return tuple(sizes)
  per_slice = num_devices // num_slices
  where = (f'the {per_slice} devices of a slice ({num_slices} slices)' if num_slices > 1
           else f'the {num_devices} devices available')
  if unknown:
    if per_slice % known:
      raise ValueError(
          f'config.mesh={dict(zip(MESH_AXES, sizes))}: the fixed axes use '
          f'{known} devices, which does not divide {where}.')
    sizes[MESH_AXES.index(unknown[0])] = per_slice // known
  elif known != per_slice:
    raise ValueError(
        f'config.mesh={dict(zip(MESH_AXES, sizes))} needs {known} devices but '
        f'{where} are available. Set one axis to -1 to use the rest.')
  sizes[0] *= num_slices
  return tuple(sizes)


def cross_slice_axes(mesh: Mesh, num_slices: int | None = None) -> tuple[str, ...]:
  """The mesh axes along which devices of different slices meet (traffic over the
  data-centre network): ('data',) on a multi-slice mesh, () on one slice. Slices are the
  devices' slice_index, or with `num_slices` (simulated, as make_mesh's) equal blocks of
  the devices in their id order."""
  devices = sorted(mesh.devices.flat, key=lambda device: device.id)
  slice_of = {device: index for index, block in enumerate(_slices(devices, num_slices))
              for device in block}
  slices = np.vectorize(slice_of.get)(mesh.devices)
  return tuple(axis for index, axis in enumerate(mesh.axis_names)
               if (np.diff(slices, axis=index) != 0).any())


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None,
              num_slices: int | None = None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh of `config.mesh` over `devices` (default: all).

  Devices of several TPU slices (their `slice_index`; or `num_slices` equal blocks of
  `devices`, which is how tests simulate them) are joined by the data-centre network, much
  slower than the chips' own links: the data axis spans the slices, so only the gradients'
  all-reduce crosses it, while FSDP and tensor parallelism stay inside one slice. Each
  slice holds data / num_slices of the data axis, laid out on its chips as one slice's
  mesh would be; `config.mesh` is read as one slice's (resolve_mesh_shape).
  """
  devices = list(devices) if devices is not None else jax.devices()
  slices = _slices(devices, num_slices)
  shape = resolve_mesh_shape(mesh_config, len(devices), len(slices))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if len(slices) == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  per_slice = (shape[0] // len(slices), *shape[1:])
  blocks = [mesh_utils.create_device_mesh(per_slice, devices=block) for block in slices]
  return Mesh(np.concatenate(blocks, axis=0), MESH_AXES, axis_types=axis_types)


def count_slices(devices: Sequence[jax.Device]) -> int:
  """How many TPU slices `devices` come from (1 off TPU, or on one slice)."""
  return len(_slices(list(devices), None))


def _slices(devices: list, num_slices: int | None) -> list[list]:
  """`devices` grouped by slice: by their slice_index, else in `num_slices` equal blocks."""
  if num_slices is None:
    indices = sorted({getattr(device, 'slice_index', 0) for device in devices})
    return [[d for d in devices if getattr(d, 'slice_index', 0) == i] for i in indices]
  if num_slices < 1 or len(devices) % num_slices:
    raise ValueError(f'{len(devices)} devices do not split into {num_slices} equal slices.')
  size = len(devices) // num_slices
  return [devices[i * size:(i + 1) * size] for i in range(num_slices)]


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
  """The mesh and logical-axis rules that tracing sharded model code needs."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_axis_rules(config) -> tuple[tuple[str, object], ...]:
  """The rule table: defaults, with `config.sharding_rules` entries overriding."""
  rules = dict(DEFAULT_LOGICAL_AXIS_RULES)
  for name, axes in (config.get('sharding_rules') or {}).items():
    rules[name] = tuple(axes) if isinstance(axes, (list, tuple)) else axes
  return tuple(rules.items())


def logical_to_shardings(logical_specs, mesh: Mesh, rules):
  """PartitionSpecs of logical names -> NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def num_batch_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def shard_bytes(leaf) -> int:
  """The bytes one device holds of a sharded array, or of a ShapeDtypeStruct with a sharding
  (abstract state: nothing allocated)."""
  shape = leaf.sharding.shard_shape(leaf.shape)
  return int(np.prod(shape, dtype=np.int64)) * leaf.dtype.itemsize


def _bytes_in_all_and_per_device(tree) -> tuple[int, int]:
  leaves = [leaf for leaf in jax.tree_util.tree_leaves(tree)
            if getattr(leaf, 'sharding', None) is not None]
  return (sum(leaf.size * leaf.dtype.itemsize for leaf in leaves),
          sum(shard_bytes(leaf) for leaf in leaves))


def describe_param_shardings(params, opt_state=None, max_rows: int = 12) -> str:
  """A short table: the largest parameters, their shardings, bytes per device (of arrays, or
  of ShapeDtypeStructs with shardings)."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  total, per_device = _bytes_in_all_and_per_device(params)
  rows = sorted(leaves, key=lambda item: -item[1].size)[:max_rows]
  lines = [f'{"parameter":<60} {"shape":<18} {"spec":<30} {"MiB/device":>10}']
  for path, leaf in rows:
    spec = getattr(leaf.sharding, 'spec', '?')
    lines.append(
        f'{jax.tree_util.keystr(path, simple=True, separator="/"):<60} {str(leaf.shape):<18} '
        f'{str(spec):<30} {shard_bytes(leaf) / 2**20:>10.2f}')
  lines.append(
      f'{len(leaves)} parameter arrays, {total / 2**20:.1f} MiB in all, '
      f'{per_device / 2**20:.1f} MiB on each device.')
  if opt_state is not None:
    total, per_device = _bytes_in_all_and_per_device(opt_state)
    lines.append(f'Optimizer state: {total / 2**20:.1f} MiB in all, '
                 f'{per_device / 2**20:.1f} MiB on each device.')
  return '\n'.join(lines)
