"""Digests that a test compares with what its worker processes wrote."""

import hashlib
import os


def image_hashes(images) -> list[str]:
  """The first 16 hex digits of each image's SHA-1, in order."""
  return [hashlib.sha1(image.tobytes()).hexdigest()[:16] for image in images]


def file_hashes(folder, name_prefix: str = '') -> dict[str, str]:
  """{file name: SHA-1 hex digest} of the files in `folder` whose names start with
  `name_prefix`."""
  hashes = {}
  for name in sorted(os.listdir(folder)):
    if name.startswith(name_prefix):
      with open(os.path.join(folder, name), 'rb') as f:
        hashes[name] = hashlib.sha1(f.read()).hexdigest()
  return hashes
