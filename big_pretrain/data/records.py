"""Our record formats: tf.train.Example records, read and written without TensorFlow.

Our ArrayRecord shards hold serialized `tf.train.Example`s, the format every TF
and TFDS tool reads, in two formats (their features below):

* image records, written by the converter (`python -m big_pretrain.data.convert`)
  and read by the 'array_record' source (data/sources/array_record.py);
* pseudo-label records, written by a pseudo-label stage
  (big_pretrain/stages/pseudo_label_job.py) and read by a self-training student
  (data/sources/pseudo_labelled.py).

A folder of either holds its shards (`*.array_record`) and a `metadata.json`,
written last, that names the format and its version.

The protobuf schema is small (tensorflow/core/example/{example,feature}.proto):
it is declared here, field for field, so that the wire format is TF's own and
TensorFlow (1.3 GB) is never imported. The messages live in a private
descriptor pool under the package `big_pretrain.records`: TF's own classes, if
a user's process has them, do not clash with ours, and the bytes are the same
(the wire format knows field numbers and types, not message names).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
import numpy as np

_PACKAGE = 'big_pretrain.records'
_LABEL_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
_LABEL_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
_TYPE = descriptor_pb2.FieldDescriptorProto


def _schema() -> descriptor_pb2.FileDescriptorProto:
  """tensorflow/core/example/{feature,example}.proto as one file (proto3, same numbers)."""
  schema = descriptor_pb2.FileDescriptorProto(
      name='big_pretrain/records/example.proto', package=_PACKAGE, syntax='proto3')

  def message(name, *fields, options=None):
    proto = schema.message_type.add(name=name)
    for field_name, number, label, field_type, type_name in fields:
      field = proto.field.add(name=field_name, number=number, label=label, type=field_type)
      if type_name:
        field.type_name = f'.{_PACKAGE}.{type_name}'
    if options:
      proto.options.CopyFrom(options)
    return proto

  # repeated scalars are packed in proto3, as feature.proto asks with [packed = true].
  message('BytesList', ('value', 1, _LABEL_REPEATED, _TYPE.TYPE_BYTES, None))
  message('FloatList', ('value', 1, _LABEL_REPEATED, _TYPE.TYPE_FLOAT, None))
  message('Int64List', ('value', 1, _LABEL_REPEATED, _TYPE.TYPE_INT64, None))
  feature = message('Feature',
                    ('bytes_list', 1, _LABEL_OPTIONAL, _TYPE.TYPE_MESSAGE, 'BytesList'),
                    ('float_list', 2, _LABEL_OPTIONAL, _TYPE.TYPE_MESSAGE, 'FloatList'),
                    ('int64_list', 3, _LABEL_OPTIONAL, _TYPE.TYPE_MESSAGE, 'Int64List'))
  feature.oneof_decl.add(name='kind')
  for field in feature.field:
    field.oneof_index = 0
  features = message('Features',
                     ('feature', 1, _LABEL_REPEATED, _TYPE.TYPE_MESSAGE, 'Features.FeatureEntry'))
  # map<string, Feature> is a repeated nested entry message with map_entry set.
  entry = features.nested_type.add(name='FeatureEntry')
  entry.field.add(name='key', number=1, label=_LABEL_OPTIONAL, type=_TYPE.TYPE_STRING)
  entry.field.add(name='value', number=2, label=_LABEL_OPTIONAL, type=_TYPE.TYPE_MESSAGE,
                  type_name=f'.{_PACKAGE}.Feature')
  entry.options.map_entry = True
  message('Example', ('features', 1, _LABEL_OPTIONAL, _TYPE.TYPE_MESSAGE, 'Features'))
  return schema


@functools.cache
def example_class():
  """The protobuf class of a tf.train.Example (built once per process)."""
  pool = descriptor_pool.DescriptorPool()
  pool.Add(_schema())
  return message_factory.GetMessageClass(pool.FindMessageTypeByName(f'{_PACKAGE}.Example'))


def encode_example(*, bytes_features: Mapping[str, Sequence[bytes]] = (),
                   int64_features: Mapping[str, Sequence[int]] = (),
                   float_features: Mapping[str, Sequence[float]] = ()) -> bytes:
  """A serialized tf.train.Example; the same features always give the same bytes."""
  example = example_class()()
  feature = example.features.feature
  for name, values in dict(bytes_features).items():
    feature[name].bytes_list.value.extend(bytes(v) for v in values)
  for name, values in dict(int64_features).items():
    feature[name].int64_list.value.extend(int(v) for v in values)
  for name, values in dict(float_features).items():
    feature[name].float_list.value.extend(float(v) for v in values)
  return example.SerializeToString(deterministic=True)


def decode_example(record: bytes) -> dict[str, list[Any]]:
  """Feature name -> its values (bytes, int or float) of a serialized tf.train.Example.

  Raises ValueError for bytes that are not one.
  """
  try:
    features = example_class().FromString(record).features.feature
  except Exception as error:  # pylint: disable=broad-exception-caught  # protobuf's DecodeError
    raise ValueError(f'not a serialized tf.train.Example ({type(error).__name__}: {error})'
                     ) from error
  decoded = {}
  for name, feature in features.items():
    kind = feature.WhichOneof('kind')
    decoded[name] = list(getattr(feature, kind).value) if kind else []
  return decoded


# --- The folders ----------------------------------------------------------------
ARRAY_RECORD_SUFFIX = '.array_record'
# Written last into a folder of shards: its format, version and shards.
METADATA_FILE = 'metadata.json'


# --- Image records (the converter's) ----------------------------------------------
# A record's features:
#   image    bytes  the original encoded image (never re-encoded)
#   caption  bytes  utf-8, may be empty
#   label    int64  -1 when unknown
#   key      bytes  where the example came from (its path in the folder or tar)
IMAGE_FORMAT = 'big_pretrain.array_record'
IMAGE_FORMAT_VERSION = 1


def encode_image_record(image_bytes: bytes, caption: str, label: int, key: str) -> bytes:
  """One image record (features above); the same values always give the same bytes."""
  return encode_example(
      bytes_features={'image': [image_bytes], 'caption': [caption.encode('utf-8')],
                      'key': [key.encode('utf-8')]},
      int64_features={'label': [label]})


def decode_image_record(record: bytes) -> dict[str, Any]:
  """{'image_bytes', 'label', 'caption', 'key'} of an image record; raises ValueError if it
  is not one. A missing label reads -1, a missing caption or key ''."""
  feature = decode_example(record)
  if not feature.get('image'):
    raise ValueError(
        "a tf.train.Example without an 'image' bytes feature (features:"
        f' {sorted(feature)})')

  def text(name: str) -> str:
    values = feature.get(name)
    return values[0].decode('utf-8', errors='replace') if values else ''

  labels = feature.get('label')
  return {'image_bytes': feature['image'][0],
          'label': int(labels[0]) if labels else -1,
          'caption': text('caption'),
          'key': text('key')}


# --- Pseudo-label records (a pseudo-label stage's) ---------------------------------
# A record's features:
#   key          bytes    the example's key in the unlabelled source (checked on read)
#   index        int64    its index in that source
#   label_ids    int64[k] the teacher's classes, most probable first (hard labels: k = 1)
#   label_probs  float[k] their probabilities, summing to 1 (hard labels: [1.0])
#   confidence   float    the teacher's top probability, before any renormalization
PSEUDO_LABEL_FORMAT = 'big_pretrain.pseudo_labels'
PSEUDO_LABEL_FORMAT_VERSION = 1
PSEUDO_LABEL_SHARD_PREFIX = 'pseudo_labels'


def pseudo_label_shard_name(shard: int, num_shards: int) -> str:
  return f'{PSEUDO_LABEL_SHARD_PREFIX}-{shard:05d}-of-{num_shards:05d}{ARRAY_RECORD_SUFFIX}'


def encode_pseudo_label_record(key: str, index: int, label_ids, label_probs,
                               confidence: float) -> bytes:
  """One pseudo-label record (features above); the same values always give the same bytes."""
  return encode_example(
      bytes_features={'key': [key.encode('utf-8')]},
      int64_features={'index': [index], 'label_ids': label_ids},
      float_features={'label_probs': label_probs, 'confidence': [confidence]})


def decode_pseudo_label_record(record: bytes) -> dict[str, Any]:
  feature = decode_example(record)
  return {'key': feature['key'][0].decode('utf-8'),
          'index': int(feature['index'][0]),
          'label_ids': np.asarray(feature['label_ids'], np.int32),
          'label_probs': np.asarray(feature['label_probs'], np.float32),
          'confidence': float(feature['confidence'][0])}
