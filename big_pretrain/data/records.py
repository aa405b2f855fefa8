"""tf.train.Example records, read and written without TensorFlow.

Our ArrayRecord shards (the converter's images, the pseudo-label jobs' labels)
hold serialized `tf.train.Example`s, the format every TF and TFDS tool reads.
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
