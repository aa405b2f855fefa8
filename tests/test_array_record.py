"""Data at scale: the ArrayRecord and TFDS sources, and the converter to ArrayRecord shards."""

import argparse
import io
import json
import logging
import pathlib
import shutil
import tarfile

from array_record.python import array_record_module
import numpy as np
import pytest

from big_pretrain.config.validation import validate_stage_config
from big_pretrain.data import convert
from big_pretrain.data.prepare import convert_job
from big_pretrain.data import data_config
from big_pretrain.data import records as records_lib
from big_pretrain.data import sources
from big_pretrain.data import train_input
from big_pretrain.data import transforms
from big_pretrain.data.sources import source_texts
from big_pretrain.errors import ConfigError, UnreadableDataError
from big_pretrain.evaluators import evaluator_config
from configs import mae as mae_config
from helpers.batches import (IMAGE_SIZE, assert_batches_equal, first_devices_mesh,
                          eval_split_batches, small_data_config, take, unreadable_rows,
                          valid_rows)
from helpers.images import (VALID_IMAGES_PER_CLASS, encoded_image, random_pixels,
                            truncated_jpeg_bytes)
from helpers.tiny_config import tiny_mae_config


def _state_round_trip(data):
  # A checkpoint stores the global position as JSON.
  return json.loads(json.dumps(data.local_batches.global_position().to_json()))


# --- Image folder -> ArrayRecord ------------------------------------------------

@pytest.fixture(name='converted')
def fixture_converted(image_folder, tmp_path):
  output = tmp_path / 'converted'
  summary = convert.convert(str(image_folder), str(output), examples_per_shard=3)
  return output, summary


def test_image_folder_conversion_round_trips(image_folder, converted):
  output, summary = converted
  folder = sources.ImageFolder(str(image_folder))
  # 10 files (8 images, 2 corrupt: kept as they are, skipped when training) in shards of 3.
  assert summary.num_examples == len(folder) == 10 and summary.num_with_caption == 1
  shard_names = [f'train-{i:05d}-of-00004.array_record' for i in range(4)]
  assert sorted(f.name for f in output.iterdir()) == sorted(shard_names + ['metadata.json'])
  metadata = json.loads((output / 'metadata.json').read_text())
  assert metadata['class_names'] == ['cats', 'dogs'] and metadata['num_examples'] == 10
  assert [s['file'] for s in metadata['shards']] == shard_names
  assert [s['num_examples'] for s in metadata['shards']] == [3, 3, 3, 1]
  assert metadata['format_version'] == records_lib.IMAGE_FORMAT_VERSION

  source = sources.ArrayRecordSource(str(output))
  assert len(source) == len(folder)
  assert source.class_names == folder.class_names and source.num_classes == 2
  for index in range(len(folder)):
    want, got = folder[index], source[index]
    assert (got['label'], got['caption'], got['hashtags']) == (
        want['label'], want['caption'], want['hashtags'])
    original = image_folder / got['key']
    assert str(original) == want['image_path']
    assert got['image_bytes'] == original.read_bytes()  # Not re-encoded.
    try:
      pixels = transforms.decode_image(want['image_path'])
    except transforms.CorruptImageError:
      with pytest.raises(transforms.CorruptImageError, match=got['key']):
        transforms.decode_image_bytes(got['image_bytes'], got['key'])
      continue
    np.testing.assert_array_equal(transforms.decode_image_bytes(got['image_bytes'], 'x'), pixels)
  assert source[0]['caption'] == 'a fluffy cat #cat #cute'
  assert source[0]['hashtags'] == ['#cat', '#cute']


def test_converted_folder_gives_the_image_folder_batches_and_skips_corrupt_records(
    image_folder, converted, caplog):
  output, _ = converted
  folder_config = small_data_config(source='image_folder', path=str(image_folder))
  record_config = small_data_config(source='array_record', path=str(output))
  # As evaluators read them: batches of 2 of the 12 files, in the fixed evaluation order.
  with caplog.at_level(logging.WARNING):
    records = eval_split_batches(record_config, global_batch_size=2)
  folder = eval_split_batches(folder_config, global_batch_size=2)
  # Same examples in the same order, so the same pixels, labels and shuffled order.
  assert_batches_equal(folder, records)
  assert len(valid_rows(records, 'label')) == 2 * VALID_IMAGES_PER_CLASS
  assert unreadable_rows(records) == unreadable_rows(folder) == 2
  # The warning names the record by the original file.
  assert 'dogs/broken.jpg' in caplog.text and 'dogs/truncated.jpg' in caplog.text
  assert sources.build_source(record_config).class_names == ['cats', 'dogs']


def test_array_record_pipeline_resumes_exactly(converted):
  output, _ = converted
  config = small_data_config(source='array_record', path=str(output))
  data = train_input.InputPipeline(config, global_batch_size=4, mesh=first_devices_mesh(), seed=3)
  take(data, 3)  # Past one epoch: the 2 corrupt records were skipped once.
  state = _state_round_trip(data)
  count_at_save = data.corrupt_images_skipped
  expected = take(data, 3)
  assert count_at_save >= 2

  resumed = train_input.InputPipeline(config, global_batch_size=4, mesh=first_devices_mesh(),
                                      seed=3)
  resumed.local_batches.set_state(state)
  assert resumed.corrupt_images_skipped == count_at_save
  assert_batches_equal(expected, take(resumed, 3))
  assert resumed.corrupt_images_skipped == data.corrupt_images_skipped


def test_array_record_test_path_is_the_held_out_split(image_folder, converted, tmp_path):
  output, _ = converted
  held_out = tmp_path / 'held_out'
  convert.convert(str(image_folder), str(held_out), split='val')
  assert (held_out / 'val-00000-of-00001.array_record').is_file()
  config = small_data_config(source='array_record', path=str(output), test_path=str(held_out),
                             split='test')
  assert len(sources.build_source(config)) == 10
  stage = tiny_mae_config()  # evaluators read the held-out split: validation asks for it
  stage.data = small_data_config(source='array_record', path=str(output))
  stage.evals.knn = evaluator_config('knn')
  with pytest.raises(ValueError, match='config.data.test_path'):
    validate_stage_config(stage)


# --- Webdataset tars -> ArrayRecord -----------------------------------------------

def _add(archive, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  archive.addfile(info, io.BytesIO(data))


@pytest.fixture(name='tar_shards')
def fixture_tar_shards(tmp_path):
  """Two webdataset shards: 5 examples (jpg/png/webp/jpeg), 1 group without an image."""
  folder = tmp_path / 'shards'
  folder.mkdir()
  images = {
      '000000.jpg': encoded_image(random_pixels(0), 'JPEG'),
      '000001.png': encoded_image(random_pixels(1), 'PNG'),
      'sub/000003.webp': encoded_image(random_pixels(3), 'WEBP'),
      '000004.jpeg': encoded_image(random_pixels(4), 'JPEG'),
      '000005.png': encoded_image(random_pixels(5, (16, 16)), 'PNG'),  # grey
  }
  with tarfile.open(folder / 'shard-000.tar', 'w') as archive:
    _add(archive, '000000.jpg', images['000000.jpg'])
    _add(archive, '000000.txt', 'a red #circle\n'.encode())
    _add(archive, '000000.cls', b'2')
    _add(archive, '000001.json', json.dumps({'caption': 'a blue square #square'}).encode())
    _add(archive, '000001.png', images['000001.png'])
    _add(archive, '000001.cls', b'0')
    _add(archive, '000002.txt', b'a caption without an image')
    _add(archive, '000002.json', b'{}')
    _add(archive, 'sub/000003.webp', images['sub/000003.webp'])
    _add(archive, 'sub/000003.json', json.dumps({'text': 'caf\u00e9 #cafe', 'w': 24}).encode())
  with tarfile.open(folder / 'shard-001.tar', 'w') as archive:
    _add(archive, '000004.jpeg', images['000004.jpeg'])
    _add(archive, '000005.png', images['000005.png'])
    _add(archive, '000005.cls', b'1')
  return folder, images


def test_webdataset_conversion_round_trips(tar_shards, tmp_path, capsys):
  folder, images = tar_shards
  output = tmp_path / 'converted'
  assert convert.main([f'--input={folder}/shard-*.tar', f'--output={output}',
                       '--examples_per_shard=4']) == 0
  printed = capsys.readouterr().out
  assert 'Wrote 5 examples to 2 ArrayRecord shards' in printed
  assert 'Skipped 1 key groups without an image' in printed
  assert f'--config.data.path={output}' in printed

  source = sources.ArrayRecordSource(str(output))
  assert len(source) == 5
  assert source.num_classes == 3 and source.class_names == ['0', '1', '2']  # labels without names
  assert json.loads((output / 'metadata.json').read_text())['class_names'] == []
  examples = [source[i] for i in range(len(source))]
  assert [e['key'] for e in examples] == [
      'shard-000.tar/000000.jpg', 'shard-000.tar/000001.png', 'shard-000.tar/sub/000003.webp',
      'shard-001.tar/000004.jpeg', 'shard-001.tar/000005.png']
  assert [e['caption'] for e in examples] == [
      'a red #circle', 'a blue square #square', 'caf\u00e9 #cafe', '', '']
  assert [e['hashtags'] for e in examples] == [['#circle'], ['#square'], ['#cafe'], [], []]
  assert [e['label'] for e in examples] == [2, 0, -1, -1, 1]
  for example, original in zip(examples, images.values()):
    assert example['image_bytes'] == original
  lossless = transforms.decode_image_bytes(examples[1]['image_bytes'], 'png')
  np.testing.assert_array_equal(lossless, random_pixels(1))
  grey = transforms.decode_image_bytes(examples[4]['image_bytes'], 'grey png')
  np.testing.assert_array_equal(grey, np.repeat(random_pixels(5, (16, 16))[..., None], 3, axis=-1))

  # The same shards named as a range or a folder convert to the same records.
  again = tmp_path / 'again'
  convert.convert(f'{folder}/shard-{{000..001}}.tar', str(again), examples_per_shard=4)
  for name in ('train-00000-of-00002.array_record', 'train-00001-of-00002.array_record'):
    assert (again / name).read_bytes() == (output / name).read_bytes()
  assert convert.resolve_input([str(folder)]) == (
      'webdataset', [str(folder / 'shard-000.tar'), str(folder / 'shard-001.tar')])


def test_corrupt_image_in_a_record_is_skipped_and_counted(tmp_path, caplog):
  with tarfile.open(tmp_path / 'data.tar', 'w') as archive:
    for index in range(10):  # 10 good + 2 corrupt: 3 batches of 4 read, 2 full after skipping.
      _add(archive, f'{index:03d}.jpg', encoded_image(random_pixels(index, (40, 40, 3)), 'JPEG'))
      _add(archive, f'{index:03d}.cls', str(index % 2).encode())
    _add(archive, 'bad.jpg', truncated_jpeg_bytes())
    _add(archive, 'garbage.png', b'not a png at all')
  convert.convert(str(tmp_path / 'data.tar'), str(tmp_path / 'out'))
  config = small_data_config(source='array_record', path=str(tmp_path / 'out'))
  with caplog.at_level(logging.WARNING):
    batches = eval_split_batches(config, global_batch_size=4)
  assert len(valid_rows(batches, 'label')) == 10 and unreadable_rows(batches) == 2
  assert 'data.tar/bad.jpg' in caplog.text and 'data.tar/garbage.png' in caplog.text


# --- Errors -------------------------------------------------------------------------

def test_missing_array_record_path_says_how_to_convert(tmp_path):
  missing = str(tmp_path / 'no_such_folder')
  config = small_data_config(source='array_record', path=missing)
  with pytest.raises(FileNotFoundError, match='no_such_folder') as error:
    train_input.InputPipeline(config, global_batch_size=4, mesh=first_devices_mesh())
  assert 'config.data.path' in str(error.value)
  assert 'python -m big_pretrain.data.convert' in str(error.value)
  with pytest.raises(FileNotFoundError, match='No ArrayRecord shard matches'):
    sources.ArrayRecordSource(str(tmp_path / '*.array_record'))
  with pytest.raises(ValueError, match='config.data.path'):
    data_config.check_config(small_data_config(source='array_record'))


def test_folder_without_shards_or_metadata_says_what_is_wrong(converted, tmp_path):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match=r'No ArrayRecord shards .* in .*empty') as error:
    sources.ArrayRecordSource(str(tmp_path / 'empty'))
  assert 'big_pretrain.data.convert' in str(error.value)

  output, _ = converted
  (output / 'metadata.json').unlink()  # As if the converter was stopped before the end.
  with pytest.raises(ValueError, match='conversion did not finish.*--overwrite'):
    sources.ArrayRecordSource(str(output))
  # A glob still reads the shards as they are, without class names.
  assert len(sources.ArrayRecordSource(str(output / '*.array_record'))) == 10


def test_converter_will_not_mix_with_an_earlier_conversion(image_folder, converted):
  output, _ = converted
  with pytest.raises(SystemExit) as stopped:
    convert.main([f'--input={image_folder}', f'--output={output}'])
  assert stopped.value.code == 2  # refused before anything was written
  summary = convert.convert(str(image_folder), str(output), overwrite=True)
  assert [s['file'] for s in summary.shards] == ['train-00000-of-00001.array_record']
  assert sorted(f.name for f in output.iterdir()) == [
      'metadata.json', 'train-00000-of-00001.array_record']
  assert len(sources.ArrayRecordSource(str(output))) == 10


def test_files_that_are_not_converter_records_are_named(tmp_path):
  (tmp_path / 'garbage.array_record').write_bytes(np.random.default_rng(0).bytes(70_000))
  with pytest.raises(ValueError, match=r'garbage\.array_record.*big_pretrain\.data\.convert'):
    sources.ArrayRecordSource(str(tmp_path / 'garbage.array_record'))
  writer = array_record_module.ArrayRecordWriter(str(tmp_path / 'other.array_record'),
                                                 'group_size:1')
  writer.write(b'\xff\xff not a tf.train.Example')
  writer.close()
  with pytest.raises(ValueError, match=r'other\.array_record.*not a serialized tf.train.Example'):
    sources.ArrayRecordSource(str(tmp_path / 'other.array_record'))


def test_config_validation_asks_for_the_new_sources_data():
  config = mae_config.get_config('demo')
  config.data.source = 'array_record'
  with pytest.raises(ConfigError, match=r'data\.path is not set.*big_pretrain\.data\.convert'):
    validate_stage_config(config)
  config.data.path = '/data/converted/train'
  with pytest.raises(ConfigError, match=r'evals\.reconstruction .*config\.data\.test_path'):
    validate_stage_config(config)
  config.data.test_path = '/data/converted/val'
  validate_stage_config(config)
  config.data.update(source='tfds', path=None, test_path=None)
  with pytest.raises(ConfigError, match=r"data\.tfds_name is not set.*array_record"):
    validate_stage_config(config)
  config.data.tfds_name = 'imagenet2012'
  validate_stage_config(config)


# --- TFDS ---------------------------------------------------------------------------

TFDS_CLASSES = ('circle', 'square', 'star')


def _tiny_tfds_builder(data_dir, file_format):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class TinyTfdsForTest(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Small random images with a class label and a caption."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3)),
          'label': tfds.features.ClassLabel(names=TFDS_CLASSES),
          'caption': tfds.features.Text(),
      }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(12, 0), 'validation': self._generate_examples(6, 1)}

    def _generate_examples(self, num_examples, stream):
      for index in range(num_examples):
        yield index, {'image': random_pixels((stream, index), (20 + index, 24, 3)),
                      'label': index % 3,
                      'caption': f'a {TFDS_CLASSES[index % 3]} #{TFDS_CLASSES[index % 3]} {index}'}

  builder = TinyTfdsForTest(data_dir=str(data_dir), file_format=file_format)
  builder.download_and_prepare()
  return builder


# `_tiny_tfds_builder`'s dataset, prepared once with TensorFlow (TFDS needs it to prepare,
# not to read): the tests read it without TensorFlow, as users of prepared datasets do.
SHIPPED_TFDS = pathlib.Path(__file__).parent / 'data' / 'tfds'


def _shipped_tfds_copy(tmp_path_factory, file_format):
  data_dir = tmp_path_factory.mktemp(f'tfds_{file_format}')
  shutil.copytree(SHIPPED_TFDS / file_format, data_dir, dirs_exist_ok=True)
  return data_dir


@pytest.fixture(name='tfds_dir', scope='module')
def fixture_tfds_dir(tmp_path_factory):
  return _shipped_tfds_copy(tmp_path_factory, 'array_record')


def test_the_shipped_tfds_dataset_is_what_the_builder_prepares(tfds_dir, tmp_path):
  pytest.importorskip('tensorflow', reason='TFDS prepares datasets with TensorFlow')
  _tiny_tfds_builder(tmp_path, 'array_record')
  prepared, shipped = (sources.build_source(tfds_config(d)) for d in (tmp_path, tfds_dir))
  assert len(prepared) == len(shipped) == 12
  for index in range(len(shipped)):
    assert prepared[index]['image_bytes'] == shipped[index]['image_bytes']
    assert prepared[index]['caption'] == shipped[index]['caption']


def tfds_config(tfds_dir, **overrides):
  return small_data_config(**{'source': 'tfds', 'tfds_name': 'tiny_tfds_for_test',
                               'tfds_data_dir': str(tfds_dir), 'tfds_caption_key': 'caption',
                               **overrides})


def test_tfds_source_reads_images_labels_and_captions(tfds_dir):
  source = sources.build_source(tfds_config(tfds_dir))
  assert len(source) == 12
  assert source.class_names == list(TFDS_CLASSES) and source.num_classes == 3
  # TFDS shuffles examples when preparing: find each by its caption.
  for index in range(len(source)):
    example = source[index]
    number = int(example['caption'].split()[-1])
    assert example['label'] == number % 3
    assert example['hashtags'] == [f'#{TFDS_CLASSES[number % 3]}']
    np.testing.assert_array_equal(  # Encoded losslessly (PNG), decoded by the pipeline.
        transforms.decode_image_bytes(example['image_bytes'], example['key']),
        random_pixels((0, number), (20 + number, 24, 3)))
  held_out = sources.build_source(tfds_config(tfds_dir, split='test'))
  assert len(held_out) == 6 and held_out.class_names == list(TFDS_CLASSES)
  no_labels = sources.build_source(tfds_config(tfds_dir, tfds_label_key=None))
  assert no_labels[0]['label'] == -1 and no_labels.num_classes == 0


def test_tfds_pipeline_yields_batches_and_resumes_exactly(tfds_dir):
  config = tfds_config(tfds_dir)
  data = train_input.InputPipeline(config, global_batch_size=4, mesh=first_devices_mesh(), seed=1)
  first = take(data, 4)  # More than one epoch of 12.
  assert first[0]['image'].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert np.all((first[0]['label'] >= 0) & (first[0]['label'] < 3))
  state = _state_round_trip(data)
  expected = take(data, 3)
  resumed = train_input.InputPipeline(config, global_batch_size=4, mesh=first_devices_mesh(),
                                      seed=1)
  resumed.local_batches.set_state(state)
  assert_batches_equal(expected, take(resumed, 3))
  assert data.corrupt_images_skipped == 0


def test_tfds_errors_say_how_to_prepare_the_dataset(tfds_dir, tmp_path, tmp_path_factory):
  with pytest.raises(FileNotFoundError, match=r"'tiny_tfds_for_test'.*tfds build.*array_record"):
    sources.build_source(tfds_config(tmp_path))
  with pytest.raises(ValueError, match=r"split 'nope'.*tfds_train_split"):
    sources.build_source(tfds_config(tfds_dir, tfds_train_split='nope'))
  with pytest.raises(ValueError, match=r"no feature 'text'.*tfds_caption_key.*caption"):
    sources.build_source(tfds_config(tfds_dir, tfds_caption_key='text'))
  with pytest.raises(ValueError, match='tfds_name'):
    data_config.check_config(small_data_config(source='tfds'))
  # Prepared, but without random access (its dataset_info.json; the records are not read).
  with pytest.raises(ValueError, match=r'(?i)tfrecord.*file_format=array_record'):
    sources.build_source(tfds_config(_shipped_tfds_copy(tmp_path_factory, 'tfrecord')))


def test_source_texts_of_array_record_and_tfds_for_the_build_commands(converted, tfds_dir):
  output, _ = converted
  parser = argparse.ArgumentParser()
  source_texts.add_source_arguments(parser)
  texts = list(source_texts.iter_source_texts(
      parser.parse_args(['--source=array_record', f'--path={output}']), parser))
  assert len(texts) == 10 and texts[0] == {'hashtags': ['#cat', '#cute'],
                                           'caption': 'a fluffy cat #cat #cute'}
  texts = list(source_texts.iter_source_texts(parser.parse_args([
      '--source=tfds', '--tfds_name=tiny_tfds_for_test', f'--tfds_data_dir={tfds_dir}',
      '--tfds_caption_key=caption', '--num_examples=5']), parser))
  assert len(texts) == 5 and all(t['hashtags'][0][1:] in TFDS_CLASSES for t in texts)


def test_to_rgb_converts_decoded_arrays_like_decode_image():
  grey = random_pixels(0, (5, 6))
  np.testing.assert_array_equal(transforms.to_rgb(grey[..., None]),
                                np.repeat(grey[..., None], 3, axis=-1))
  rgba = np.zeros((2, 2, 4), np.uint8)  # Fully transparent: white.
  np.testing.assert_array_equal(transforms.to_rgb(rgba), np.full((2, 2, 3), 255, np.uint8))
  with pytest.raises(ValueError, match='uint8'):
    transforms.to_rgb(np.zeros((2, 2, 3), np.float32))


# --- Damaged bytes in the middle of a shard ----------------------------------------------

def _tar_of_images(path, count):
  with tarfile.open(path, 'w') as archive:
    for index in range(count):
      _add(archive, f'{index:03d}.jpg', encoded_image(random_pixels(index, (40, 40, 3)), 'JPEG'))
      _add(archive, f'{index:03d}.cls', str(index % 2).encode())


def _unreadable_records(shard) -> list[int]:
  reader = array_record_module.ArrayRecordReader(str(shard))
  bad = []
  for index in range(reader.num_records()):
    try:
      reader.read([index])
    except RuntimeError:
      bad.append(index)
  reader.close()
  return bad


def test_a_damaged_block_mid_shard_is_skipped_counted_and_named(tmp_path, caplog):
  """Bytes zeroed in the middle of a shard (not cut short): the records whose bytes fail
  their hash are skipped like corrupt images, counted as data/corrupt_records_skipped, named
  by shard and position; the rest of the shard trains."""
  _tar_of_images(tmp_path / 'data.tar', 64)
  convert.convert(str(tmp_path / 'data.tar'), str(tmp_path / 'out'))
  [shard] = (tmp_path / 'out').glob('*.array_record')
  data = bytearray(shard.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 16] = bytes(16)
  shard.write_bytes(bytes(data))
  damaged = _unreadable_records(shard)
  assert 0 < len(damaged) < 8, damaged  # one block: a record or two, not the shard

  config = small_data_config(source='array_record', path=str(tmp_path / 'out'))
  pipeline = train_input.InputPipeline(config, global_batch_size=8, mesh=first_devices_mesh(),
                                       seed=0)
  with caplog.at_level(logging.WARNING):
    batches = take(pipeline, 8)  # one epoch of 64
  assert pipeline.corrupt_records_skipped == len(damaged)
  assert pipeline.corrupt_images_skipped == 0
  assert all(batch['image'].shape[0] == 8 for batch in batches)
  assert f'Skipping damaged record at record {damaged[0]}, position' in caplog.text
  assert str(shard) in caplog.text and 'hash mismatch' in caplog.text
  # The count survives a checkpoint of the data position.
  state = _state_round_trip(pipeline)
  assert state['corrupt_records_skipped'] == len(damaged)


def test_a_shard_damaged_everywhere_stops_in_one_line(tmp_path):
  _tar_of_images(tmp_path / 'data.tar', 160)
  convert.convert(str(tmp_path / 'data.tar'), str(tmp_path / 'out'))
  [shard] = (tmp_path / 'out').glob('*.array_record')
  # Bytes zeroed all through the shard, except where the shard would no longer open (its
  # index): every record is damaged, the file is not cut short.
  for offset in range(0, shard.stat().st_size, 256):
    before = shard.read_bytes()
    data = bytearray(before)
    data[offset:offset + 8] = bytes(8)
    shard.write_bytes(bytes(data))
    try:
      array_record_module.ArrayRecordReader(str(shard)).close()
      opens = True
    except RuntimeError:
      opens = False
    if not opens:
      shard.write_bytes(before)
  assert len(_unreadable_records(shard)) > 150
  config = small_data_config(source='array_record', path=str(tmp_path / 'out'),
                             max_consecutive_unreadable=10)
  pipeline = train_input.InputPipeline(config, global_batch_size=4, mesh=first_devices_mesh(),
                                       seed=0)
  with pytest.raises(UnreadableDataError, match=r'No readable image in the last 10 read from '
                     r"config.data.path=.*damaged records in all, e.g. record") as error:
    take(pipeline, 4)
  assert '\n' not in str(error.value) and str(shard) in str(error.value)


def test_the_converter_reads_each_shard_back_after_writing(tmp_path, monkeypatch):
  """A shard that does not read back whole (here: a write the disk altered) fails the
  conversion naming the shard, instead of leaving a damaged dataset behind."""
  _tar_of_images(tmp_path / 'data.tar', 12)
  real_verify = convert_job.verify_shard

  def verify_after_damage(path, num_examples):
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 16] = bytes(16)
    path.write_bytes(bytes(data))
    real_verify(path, num_examples)

  monkeypatch.setattr(convert_job, 'verify_shard', verify_after_damage)
  with pytest.raises(OSError, match=r'does not read back .*hash mismatch.*Convert again'):
    convert.convert(str(tmp_path / 'data.tar'), str(tmp_path / 'out'))
  monkeypatch.setattr(convert_job, 'verify_shard', real_verify)
  summary = convert.convert(str(tmp_path / 'data.tar'), str(tmp_path / 'again'))
  assert summary.num_examples == 12  # verified and kept
