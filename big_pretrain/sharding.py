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


def resolve_mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Sizes of ('data', 'fsdp', 'tensor'); one -1 means "all remaining devices"."""
  sizes = [int(mesh_config[name]) for name in MESH_AXES]
  unknown = [name for name, size in zip(MESH_AXES, sizes) if size == -1]
  if len(unknown) > 1:
    raise ValueError(
        f'config.mesh: only one axis may be -1, got {unknown}. Give explicit '
        'sizes to all but one of data/fsdp/tensor.')
  for name, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise ValueError(f'config.mesh.{name}={size}: sizes are positive or -1.')
  known = math.prod(size for size in sizes if size != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(
          f'config.mesh={dict(zip(MESH_AXES, sizes))}: the fixed axes use '
          f'{known} devices, which does not divide the {num_devices} devices '
          'available.')
    sizes[MESH_AXES.index(unknown[0])] = num_devices // known
  elif known != num_devices:
    raise ValueError(
        f'config.mesh={dict(zip(MESH_AXES, sizes))} needs {known} devices but '
        f'{num_devices} are available. Set one axis to -1 to use the rest.')
  return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices) if devices is not None else jax.devices()
  shape = resolve_mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(
      shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
      devices=devices)


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


def _bytes_in_all_and_per_device(tree) -> tuple[int, int]:
  leaves = [leaf for leaf in jax.tree_util.tree_leaves(tree) if hasattr(leaf, 'addressable_shards')]
  return (sum(leaf.size * leaf.dtype.itemsize for leaf in leaves),
          sum(leaf.addressable_shards[0].data.nbytes for leaf in leaves))


def describe_param_shardings(params, opt_state=None, max_rows: int = 12) -> str:
  """A short table: the largest parameters, their shardings, bytes per device."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  total, per_device = _bytes_in_all_and_per_device(params)
  rows = sorted(leaves, key=lambda item: -item[1].size)[:max_rows]
  lines = [f'{"parameter":<60} {"shape":<18} {"spec":<30} {"MiB/device":>10}']
  for path, leaf in rows:
    spec = getattr(leaf.sharding, 'spec', '?')
    shard_bytes = leaf.addressable_shards[0].data.nbytes
    lines.append(
        f'{jax.tree_util.keystr(path, simple=True, separator="/"):<60} {str(leaf.shape):<18} '
        f'{str(spec):<30} {shard_bytes / 2**20:>10.2f}')
  lines.append(
      f'{len(leaves)} parameter arrays, {total / 2**20:.1f} MiB in all, '
      f'{per_device / 2**20:.1f} MiB on each device.')
  if opt_state is not None:
    total, per_device = _bytes_in_all_and_per_device(opt_state)
    lines.append(f'Optimizer state: {total / 2**20:.1f} MiB in all, '
                 f'{per_device / 2**20:.1f} MiB on each device.')
  return '\n'.join(lines)
