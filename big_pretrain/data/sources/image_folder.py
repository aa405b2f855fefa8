"""The 'image_folder' source: a folder of class subfolders, images listed, never decoded here."""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

from absl import logging
from etils import epath

from big_pretrain.data.sources.source import PathSource
from big_pretrain.data.text import labels as labels_lib

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


class ImageFolder(PathSource):
  """A folder of class subfolders: ``path/<class_name>/**/<image>``.

  Class ids follow the sorted subfolder names. An optional caption is read from
  a ``.txt`` file with the same stem next to each image. Files are listed once,
  sorted, so the example order is deterministic. Images are not decoded here.
  """

  name = 'image_folder'
  path_holds = 'a folder of class subfolders'
  path_hint = (
      'Point it at your data, e.g. --config.data.path=/data/imagenet/train (a folder of class '
      'subfolders of JPEG/PNG images, optional .txt captions beside them), or try the embedded '
      'synthetic data with the ":demo" config variant (e.g. --config=configs/mae.py:demo).')

  @classmethod
  def check_has_data(cls, location: str) -> None:
    check_has_images(location)

  def __init__(self, path: str, extensions: Sequence[str] = IMAGE_EXTENSIONS):
    root = pathlib.Path(path).expanduser()
    if not root.exists():
      raise FileNotFoundError(
          f'Image folder {str(path)!r} does not exist. Set config.data.path to a'
          ' folder of class subfolders (path/<class_name>/<images>), or use'
          " source='synthetic'.")
    if not root.is_dir():
      raise NotADirectoryError(
          f'{str(path)!r} is a file, not a folder. Set config.data.path to a folder'
          ' of class subfolders (path/<class_name>/<images>).')
    extensions = tuple(ext.lower() for ext in extensions)

    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith('.'))
    image_paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
      class_images = sorted(
          f for f in class_dir.rglob('*')
          if f.suffix.lower() in extensions and f.is_file() and not f.name.startswith('.'))
      if not class_images:
        logging.warning('Class folder %s has no images; its label %d will never appear.',
                        class_dir, label)
      image_paths.extend(str(f) for f in class_images)
      labels.extend([label] * len(class_images))
    if not image_paths:
      raise ValueError(
          f'No images found in class subfolders of {str(root)!r} (found'
          f' {len(class_dirs)} subfolders). Expected path/<class_name>/<image> files'
          f' with one of the extensions {", ".join(extensions)}.')

    self._root = root
    self._root_prefix = str(root) + '/'
    self._class_names = [d.name for d in class_dirs]
    self._image_paths = tuple(image_paths)
    self._labels = tuple(labels)

  def __len__(self) -> int:
    return len(self._image_paths)

  @property
  def class_names(self) -> list[str]:
    return list(self._class_names)

  @property
  def num_classes(self) -> int:
    return len(self._class_names)

  def listing(self) -> list[tuple[str, int]]:
    """(image path, label) of every example, in order: what the converter splits into shards."""
    return list(zip(self._image_paths, self._labels))

  def __getitem__(self, index: int) -> dict[str, Any]:
    image_path = self._image_paths[int(index)]
    caption = read_caption(image_path)
    return {
        'key': image_path[len(self._root_prefix):],  # The path under the folder.
        'image_path': image_path,
        'label': self._labels[int(index)],
        'caption': caption,
        'hashtags': labels_lib.caption_hashtags(caption),
    }


def read_caption(image_path: str) -> str:
  """The caption in the .txt file beside an image ('' without one), local or in a bucket:
  UTF-8 with errors replaced (a badly encoded caption must not stop training), universal
  newlines, stripped. The converter reads it the same way."""
  try:
    data = epath.Path(image_path).with_suffix('.txt').read_bytes()
  except FileNotFoundError:
    return ''
  return data.decode('utf-8', errors='replace').replace('\r\n', '\n').replace(
      '\r', '\n').strip()


def check_has_images(path: str) -> None:
  """Raises FileNotFoundError or ValueError, saying why, unless `path` is a folder with an
  image in a class subfolder; stops at the first image found (listing all of ImageNet
  would take minutes)."""
  root = pathlib.Path(path).expanduser()
  if not root.is_dir():
    what = 'is a file, not a folder' if root.exists() else 'does not exist'
    raise FileNotFoundError(
        f'Image folder {str(path)!r} {what}. Set it to a folder of class subfolders '
        "(path/<class_name>/<images>), or use source='synthetic'.")
  class_dirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith('.')]
  for class_dir in class_dirs:
    for image in class_dir.rglob('*'):
      if image.suffix.lower() in IMAGE_EXTENSIONS and not image.name.startswith('.'):
        return
  raise ValueError(
      f'No images found in class subfolders of {str(path)!r} (found {len(class_dirs)} '
      'subfolders). Expected path/<class_name>/<image> files with one of the extensions '
      f'{", ".join(IMAGE_EXTENSIONS)}.')
