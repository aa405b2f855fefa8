"""The 'tfds' source: a TFDS dataset prepared in ArrayRecord format, read with random access."""

from __future__ import annotations

from typing import Any

from absl import logging
import numpy as np

from big_pretrain import schema
from big_pretrain.data import transforms
from big_pretrain.data.sources.source import RegisteredSource
from big_pretrain.data.text import labels as labels_lib
from big_pretrain.errors import ConfigError

# The keys of config.data this source reads beside the shared ones (data_config.py).
DATA_KEYS = schema.Group(
    'a TFDS dataset prepared in ArrayRecord format',
    tfds_name=schema.Key(None, schema.OPTIONAL_TEXT,
                         "tfds only: the dataset, prepared with file_format='array_record', "
                         "e.g. 'imagenet2012'", type=str),
    tfds_data_dir=schema.Key(None, schema.OPTIONAL_TEXT,
                             "tfds only: where it was prepared; None: TFDS's default",
                             type=str),
    tfds_train_split=schema.Key('train', schema.REQUIRED_TEXT,
                                "tfds only: the training split, any TFDS split spec, e.g. "
                                "'train[:90%]'"),
    tfds_test_split=schema.Key('validation', schema.REQUIRED_TEXT,
                               'tfds only: what evaluators read as the held-out split'),
    tfds_image_key=schema.Key('image', schema.REQUIRED_TEXT,
                              'tfds only: the image feature (encoded or decoded)'),
    tfds_label_key=schema.Key('label', schema.OPTIONAL_TEXT,
                              'tfds only: the integer label feature (a ClassLabel names the '
                              'classes); None or absent: -1', type=str),
    tfds_caption_key=schema.Key(None, schema.OPTIONAL_TEXT,
                                'tfds only: a text feature, or None', type=str),
)


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
        "config.data.source='tfds' needs tensorflow-datasets: pip install -r requirements.txt"
    ) from error
  return tfds


class TfdsSource(RegisteredSource):
  """A TFDS dataset read with random access (`tfds.data_source`): ArrayRecord files only.

  The dataset must already be prepared in ``data_dir`` with
  ``file_format='array_record'``; nothing is downloaded. Encoded images are
  passed on undecoded ('image_bytes') so the pipeline decodes them and skips
  corrupt ones; image features that are plain arrays are passed as pixels.
  """

  name = 'tfds'
  data_keys = DATA_KEYS

  @classmethod
  def check_config(cls, data, path: str) -> None:
    if not data.tfds_name:
      raise ConfigError(
          f"{path}.data.tfds_name is not set, and {path}.data.source='tfds' needs it: the "
          "name of a TFDS dataset prepared with file_format='array_record' (`tfds build NAME "
          '--file_format=array_record`), with --config.data.tfds_data_dir=ITS_DATA_DIR.')

  @classmethod
  def from_config(cls, data, split: str) -> TfdsSource:
    split_key = 'tfds_test_split' if split == 'test' else 'tfds_train_split'
    return cls(data.tfds_name, split=data[split_key], data_dir=data.tfds_data_dir,
               image_key=data.tfds_image_key, label_key=data.tfds_label_key,
               caption_key=data.tfds_caption_key, split_key=split_key)

  def __init__(self, name: str, split: str = 'train', data_dir: str | None = None, *,
               image_key: str = 'image', label_key: str | None = 'label',
               caption_key: str | None = None, split_key: str = 'tfds_train_split'):
    tfds = _import_tfds()
    build_command = (
        f'`tfds build {name} --data_dir=DATA_DIR --file_format=array_record` (or'
        " builder.download_and_prepare(file_format='array_record'); preparing needs TensorFlow:"
        ' pip install -r requirements-tf.txt), and set config.data.tfds_data_dir=DATA_DIR.')
    prepare_hint = f'Prepare it first, in ArrayRecord format: {build_command}'
    where = f'data_dir {data_dir!r}' if data_dir else "TFDS's default data_dir"
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
      raise FileNotFoundError(
          f'TFDS dataset {name!r} is neither prepared in {where} nor a registered dataset'
          f' (config.data.tfds_name). {prepare_hint}') from error
    if not builder.is_prepared():
      raise FileNotFoundError(
          f'TFDS dataset {name!r} is not prepared in {where} (nothing is downloaded).'
          f' {prepare_hint}')
    features = builder.info.features
    if image_key not in features:
      raise ValueError(
          f'TFDS dataset {name!r} has no feature {image_key!r} (config.data.tfds_image_key);'
          f' its features are {sorted(features.keys())}.')
    if caption_key and caption_key not in features:
      raise ValueError(
          f'TFDS dataset {name!r} has no feature {caption_key!r} (config.data.tfds_caption_key);'
          f' its features are {sorted(features.keys())}.')
    if label_key and label_key not in features:
      logging.warning('TFDS dataset %r has no label feature %r: every label is -1.',
                      name, label_key)
      label_key = None
    decoders = None
    if isinstance(features[image_key], tfds.features.Image):
      decoders = {image_key: tfds.decode.SkipDecoding()}  # The pipeline decodes.
    try:
      self._data = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                    decoders=decoders)
    except NotImplementedError as error:  # Prepared, but as TFRecords: no random access.
      file_format = getattr(builder.info.file_format, 'value', builder.info.file_format)
      raise ValueError(
          f'TFDS dataset {name!r} in {where} was prepared as {file_format}, which has no'
          ' random access; Grain needs ArrayRecord. Prepare it again (in another data_dir,'
          f' or after deleting this one): {build_command}') from error
    except ValueError as error:
      if 'split' not in str(error).lower():
        raise
      raise ValueError(
          f'TFDS dataset {name!r}: bad split {split!r} (config.data.{split_key}): {error}'
      ) from error

    self._name, self._split = name, split
    self._image_key, self._label_key, self._caption_key = image_key, label_key, caption_key
    label_feature = features[label_key] if label_key else None
    names = list(getattr(label_feature, 'names', None) or ())
    self.num_classes = int(getattr(label_feature, 'num_classes', None) or 0)
    self.class_names = names or [str(label) for label in range(self.num_classes)]

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    features = self._data[index]
    image = features[self._image_key]
    example = {'key': f'{self._name}/{self._split}[{index}]'}
    if isinstance(image, (bytes, np.bytes_)):
      example['image_bytes'] = bytes(image)
    else:
      example['image'] = transforms.to_rgb(image)
    example['label'] = int(features[self._label_key]) if self._label_key else -1
    caption = features[self._caption_key] if self._caption_key else ''
    if isinstance(caption, (bytes, np.bytes_)):
      caption = bytes(caption).decode('utf-8', errors='replace')
    example['caption'] = str(caption).strip()
    example['hashtags'] = labels_lib.caption_hashtags(example['caption'])
    return example
