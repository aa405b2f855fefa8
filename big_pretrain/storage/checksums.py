"""Digests of a checkpoint's arrays, so that bytes altered on disk are never trained on.

Why our own: Orbax's zarr3 arrays carry a crc32c of each shard's index only, not of the
chunks, and zstd frames carry no checksum of their content by default; a flipped bit in an
array's data reads back as another number. So every checkpoint holds, beside the state,
a digest of each array (the 'digests' item, written by Orbax with the step, atomically),
and every restore recomputes and compares them.

The digest of an array is two sums over its elements' bits b (as unsigned integers of the
element's width), in wrapping uint32 arithmetic:

  h1 = sum b        h2 = sum b * b

One flipped bit, b -> b +- 2^k, moves h1 by 2^k mod 2^32, never 0: every single flipped bit
is caught. Damage that leaves h1 unchanged (two flips of the same bit in opposite
directions, a block of bytes whose sum happens to be preserved) moves h2 by a term
quadratic in the values, so both stay equal only by chance (about 2^-32 for such damage).
Sums are exact in any order and split over shards: a sharded array's digest is the sum of
its shards' partial digests, the same on any mesh, any number of processes, and in numpy
(`numpy_digest`) as on the devices. Where the arrays are on accelerators they are digested
there (a jitted reduction at memory bandwidth); on CPUs, where XLA's integer reductions run
at a fifth of numpy's speed, numpy digests the shards in place (no copy).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

DIGESTS_ITEM = 'digests'      # the Orbax item beside 'state' and 'data'
DIGESTS_FILE = 'digests.json'
DATA_POSITION_DIGEST_KEY = 'data_position'  # the global data position record's digest
# Checkpoints from before global data positions: {process: digest of its own position}.
PER_PROCESS_DATA_DIGEST_KEY = 'data_iterator'
_WORKERS = os.cpu_count() or 1     # threads digesting host arrays
_SLICE = 1 << 22                   # elements: below this, a shard is not split


def _bits(x):
  """The elements' bits as uint32 (one per element), for any 8-, 16- or 32-bit dtype."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
  if width is None:
    raise TypeError(f'No digest for {x.dtype} arrays (64-bit values are not in a train state).')
  return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)


def array_digest(x) -> jax.Array:
  """(h1, h2) uint32 of one array (see the module doc); jittable."""
  bits = _bits(x)
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * bits, dtype=jnp.uint32)])


def _numpy_bits(array: np.ndarray) -> np.ndarray:
  """The flat bits of a host array, in its own width (a view where it can be)."""
  array = np.asarray(array)
  if array.dtype == np.bool_:
    return array.reshape(-1).astype(np.uint8)
  if array.dtype.kind == 'V' and array.dtype.itemsize == 2:  # ml_dtypes' bfloat16 and kin
    return np.ascontiguousarray(array).reshape(-1).view(np.uint16)
  width = {1: np.uint8, 2: np.uint16, 4: np.uint32}.get(array.dtype.itemsize)
  if width is None:
    raise TypeError(f'No digest for {array.dtype} arrays.')
  return np.ascontiguousarray(array).reshape(-1).view(width)


def numpy_digest(array: np.ndarray, chunk: int = 1 << 16) -> list[int]:
  """`array_digest` of a host array, the same two numbers; in cache-sized chunks."""
  flat = _numpy_bits(array)
  h1 = h2 = np.uint32(0)
  with np.errstate(over='ignore'):
    for start in range(0, flat.size, chunk):
      bits = flat[start:start + chunk].astype(np.uint32)
      h1 = h1 + np.add.reduce(bits, dtype=np.uint32)
      h2 = h2 + np.add.reduce(bits * bits, dtype=np.uint32)
  return [int(h1), int(h2)]


def leaf_paths(tree) -> list[tuple[str, object]]:
  """(path, leaf) of every array of a tree, paths as storage.checkpoints.tree_shapes names
  them ('params/encoder/patch_embed/kernel')."""
  leaves = jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: hasattr(x, 'shape') and not isinstance(x, dict))
  return [(jax.tree_util.keystr(path, simple=True, separator='/'), leaf)
          for path, leaf in leaves if hasattr(leaf, 'shape')]


@jax.jit
def _digests_on_devices(leaves):
  return [array_digest(leaf) for leaf in leaves]


def _digests_of_local_shards(leaves) -> np.ndarray:
  """(leaves, 2) partial digests of this process's shards (one replica of each), in numpy,
  in parallel over slices of every shard (numpy's reductions release the GIL)."""
  work = []  # (row, flat bits slice)
  for row, leaf in enumerate(leaves):
    if isinstance(leaf, jax.Array):
      arrays = [shard.data for shard in leaf.addressable_shards if shard.replica_id == 0]
    else:
      arrays = [leaf] if jax.process_index() == 0 else []
    for array in arrays:
      flat = _numpy_bits(np.asarray(array))
      step = max(_SLICE, -(-flat.size // _WORKERS))
      work += [(row, flat[start:start + step]) for start in range(0, flat.size, step)]
  partial = np.zeros((len(leaves), 2), np.uint32)
  with concurrent.futures.ThreadPoolExecutor(_WORKERS) as pool:
    digests = pool.map(lambda item: numpy_digest(item[1]), work)
    with np.errstate(over='ignore'):
      for (row, _), digest in zip(work, digests):
        partial[row] += np.asarray(digest, np.uint32)
  return partial


def tree_digests(tree) -> dict[str, list[int]]:
  """{path: [h1, h2]} of every array of a (sharded) tree, computed where the arrays are:
  on accelerators by one jitted program, on CPUs by numpy over the shards in place (the
  partial digests of every process added up)."""
  named = leaf_paths(tree)
  leaves = [leaf for _, leaf in named]
  on_cpu = all(device.platform == 'cpu' for leaf in leaves if isinstance(leaf, jax.Array)
               for device in leaf.sharding.device_set)
  if on_cpu:
    partial = _digests_of_local_shards(leaves)
    if jax.process_count() > 1:
      with np.errstate(over='ignore'):
        partial = np.sum(np.asarray(multihost_utils.process_allgather(partial), np.uint32),
                         axis=0, dtype=np.uint32)
    digests = partial
  else:
    digests = jax.device_get(_digests_on_devices(leaves))
  return {path: [int(d) for d in digest] for (path, _), digest in zip(named, digests)}


def first_mismatch(restored: dict[str, list[int]], recorded: dict[str, list[int]]) -> str | None:
  """The first path (in order) whose digest differs from the recorded one; paths the
  record lacks are not judged here (storage/checkpoints.damaged_array counts them as damage)."""
  for path, digest in restored.items():
    if path in recorded and list(recorded[path]) != list(digest):
      return path
  return None


def bytes_digest(data: bytes) -> str:
  """A per-process data position's digest (before global positions): its file's sha256."""
  return hashlib.sha256(data).hexdigest()


def json_digest(record) -> str:
  """The sha256 of a JSON record, the same for any key order it is read back in."""
  return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
