"""Damage done to a saved checkpoint step after it was written, as a disk fault, an unfinished
copy or a careless hand leaves it: bytes that still decode to other numbers, and a digests
record deleted, emptied or missing an array."""

import json
import shutil

import numpy as np
import orbax.checkpoint as ocp

# How a step's digests record is damaged (`damage_digests`).
DIGESTS_DAMAGE = ('deleted', 'emptied', 'missing the altered array')


def array_files(step_dir):
  """The state's array data files (OCDBT), largest first."""
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and '/d/' in str(p)]
  return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def reads_back(step_dir) -> bool:
  try:
    ocp.PyTreeCheckpointer().restore(str(step_dir / 'state'))
  except Exception:  # noqa: BLE001  (any failure: the damage shows without digests)
    return False
  return True


def damage_where_it_still_reads(step_dir, damage: str):
  """Alters the largest array file where the (compressed) data still decodes: the damage
  only a digest can see. Which offsets those are depends on the bytes, so they are tried
  from the middle on."""
  largest = array_files(step_dir)[0]
  original = largest.read_bytes()
  for offset in range(len(original) // 2, len(original) - 8, 97):
    data = bytearray(original)
    if damage == 'one flipped bit':
      data[offset] ^= 0x10
    else:
      data[offset:offset + 4] = b'\x5a\xa5\x5a\xa5'
    largest.write_bytes(bytes(data))
    if reads_back(step_dir):
      return
  raise AssertionError('no offset in the second half decodes after damage')


def alter_one_value(step_dir, leaf: str):
  """The step's stored state with one bit of one element of `leaf` ('params/encoder/...')
  flipped, written in place of the original without its digests knowing: what a disk
  fault in that array's bytes reads back as."""
  state_dir = step_dir / 'state'
  tree = ocp.PyTreeCheckpointer().restore(str(state_dir))
  node = tree
  *parents, name = leaf.split('/')
  for parent in parents:
    node = node[parent]
  value = np.array(node[name])
  value.reshape(-1).view(np.uint32)[value.size // 2] ^= 1 << 20
  node[name] = value
  shutil.rmtree(state_dir)
  ocp.PyTreeCheckpointer().save(str(state_dir), tree)


def damage_digests(step_dir, how: str, altered_leaf: str) -> None:
  """The step's digests record `how` (one of DIGESTS_DAMAGE): the item deleted, its file
  holding an empty object, or its record of `altered_leaf` removed."""
  folder = step_dir / 'digests'
  if how == 'deleted':
    shutil.rmtree(folder)
    return
  record_file = folder / 'digests.json'
  record = json.loads(record_file.read_text())
  if how == 'emptied':
    record = {}
  else:
    del record['arrays'][altered_leaf]
  record_file.write_text(json.dumps(record))


def as_if_written_before_digests(step_dir) -> None:
  """The step as a version before digests wrote it: no digests item, and none named in
  Orbax's record of the step's items."""
  shutil.rmtree(step_dir / 'digests')
  metadata_file = step_dir / '_CHECKPOINT_METADATA'
  metadata = json.loads(metadata_file.read_text())
  del metadata['item_handlers']['digests']
  metadata_file.write_text(json.dumps(metadata))
