"""tf.train.Example records without TensorFlow (big_pretrain/data/records.py): the shards and
records written before, when TensorFlow's own Example class wrote them, read and re-encode
byte for byte; where TensorFlow is installed, both directions are checked against it."""

import io
import pathlib
import subprocess
import sys

import grain
import numpy as np
import pytest
from PIL import Image

from big_pretrain.data import records, sources

# Written by the converter of commit 6d94fda, which encoded with TensorFlow's example_pb2:
# an image folder of circle/{circle_0.png (caption), circle_1.jpeg}, square/square_0.png
# (caption), pixels from np.random.default_rng(0), (6 + i, 5, 3) each.
SHARDS_WRITTEN_WITH_TENSORFLOW = pathlib.Path(__file__).parent / 'data' / 'shards_written_with_tensorflow'
# pseudo_labels.encode_record('circle/circle_0.png', 3, [2, 0], [0.75, 0.25], 0.7) at 6d94fda.
PSEUDO_LABEL_WRITTEN_WITH_TENSORFLOW = bytes.fromhex(
    '0a7a0a160a0a636f6e666964656e6365120812060a043333333f0a0e0a05696e64657812051a030a01030a1e'
    '0a036b657912170a150a13636972636c652f636972636c655f302e706e670a130a096c6162656c5f69647312'
    '061a040a0202000a1b0a0b6c6162656c5f70726f6273120c120a0a080000403f0000803e')


def test_shards_written_with_tensorflow_read_identically_and_re_encode_to_the_same_bytes():
  source = sources.ArrayRecordSource(str(SHARDS_WRITTEN_WITH_TENSORFLOW))
  assert source.class_names == ['circle', 'square'] and len(source) == 3
  examples = [source[i] for i in range(3)]
  assert [(e['key'], e['label'], e['caption'], e['hashtags']) for e in examples] == [
      ('circle/circle_0.png', 0, 'a circle #circle été', ['#circle']),
      ('circle/circle_1.jpeg', 0, '', []),
      ('square/square_0.png', 1, 'a square #square été', ['#square'])]
  rng = np.random.default_rng(0)
  for example, (shape, lossless) in zip(examples, (((6, 5, 3), True), ((7, 5, 3), False),
                                                   ((6, 5, 3), True))):
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(example['image_bytes'])))
    assert decoded.shape == shape
    if lossless:
      np.testing.assert_array_equal(decoded, pixels)
  # The bytes on disk are what today's encoder writes for the same example.
  raw = grain.sources.ArrayRecordDataSource(
      sorted(str(p) for p in SHARDS_WRITTEN_WITH_TENSORFLOW.glob('*.array_record')))
  for index, example in enumerate(examples):
    assert records.encode_image_record(example['image_bytes'], example['caption'], example['label'],
                                 example['key']) == raw[index]


def test_a_pseudo_label_written_with_tensorflow_reads_and_re_encodes_identically():
  record = records.decode_pseudo_label_record(PSEUDO_LABEL_WRITTEN_WITH_TENSORFLOW)
  assert record['key'] == 'circle/circle_0.png' and record['index'] == 3
  np.testing.assert_array_equal(record['label_ids'], [2, 0])
  np.testing.assert_array_equal(record['label_probs'], np.float32([0.75, 0.25]))
  assert record['confidence'] == float(np.float32(0.7))
  assert records.encode_pseudo_label_record('circle/circle_0.png', 3, [2, 0], [0.75, 0.25],
                                     0.7) == PSEUDO_LABEL_WRITTEN_WITH_TENSORFLOW


def test_examples_round_trip_and_bad_bytes_are_refused():
  record = records.encode_example(bytes_features={'b': [b'\x00\xff', b'']},
                                  int64_features={'i': [-1, 2**40], 'none': []},
                                  float_features={'f': [0.5, -2.0]})
  assert records.decode_example(record) == {'b': [b'\x00\xff', b''], 'i': [-1, 2**40],
                                            'none': [], 'f': [0.5, -2.0]}
  assert records.encode_example() == b''  # an empty Example, as TF serialises it
  with pytest.raises(ValueError, match='not a serialized tf.train.Example'):
    records.decode_example(b'\xff\xff not an Example')


def test_training_reading_data_and_writing_records_never_import_tensorflow():
  # Without TensorFlow, gs:// paths go through etils.epath's fsspec backend (gcsfs).
  code = ('import sys, big_pretrain.train.loop, big_pretrain.data.sources, '
          'big_pretrain.data.convert, big_pretrain.stages.pseudo_label_job; '
          'from importlib.util import find_spec; '
          'from etils import epath; from etils.epath import backend; '
          "assert find_spec('tensorflow') or find_spec('gcsfs') and isinstance("
          "epath.Path('gs://bucket/run')._backend, backend._FileSystemSpecBackend); "
          'from big_pretrain.data import records; records.example_class(); '
          "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
  subprocess.run([sys.executable, '-c', code], check=True)


def test_both_directions_against_tensorflows_own_example():
  example_pb2 = pytest.importorskip('tensorflow.core.example.example_pb2')
  ours = records.encode_image_record(b'\x89PNG...', 'été #x', 4, 'a/b.png')
  theirs = example_pb2.Example()
  for name, value in (('image', b'\x89PNG...'), ('caption', 'été #x'.encode()),
                      ('key', b'a/b.png')):
    theirs.features.feature[name].bytes_list.value.append(value)
  theirs.features.feature['label'].int64_list.value.append(4)
  assert theirs.SerializeToString(deterministic=True) == ours
  assert example_pb2.Example.FromString(ours) == theirs
  parsed = example_pb2.Example.FromString(PSEUDO_LABEL_WRITTEN_WITH_TENSORFLOW)
  assert list(parsed.features.feature['label_probs'].float_list.value) == [0.75, 0.25]
  assert records.decode_image_record(theirs.SerializeToString())['caption'] == 'été #x'
