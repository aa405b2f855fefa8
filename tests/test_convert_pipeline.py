"""The converter on Apache Beam: the same shards, byte for byte, as in process, whatever the
worker count, the retries and the crashes; near-duplicates of held-out images left out.

The dataset: 8 webdataset tars of 250 groups (2,000), of which some have no image, some
images do not decode, one tar is cut short, and 6 are near-duplicates (cropped, resized,
re-encoded) of 6 held-out images. Every conversion here deduplicates against them.
"""

import io
import json
import pathlib
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image
import pytest

pytest.importorskip('apache_beam')  # requirements-beam.txt: `make test` installs it
pytestmark = pytest.mark.beam  # the test tiers: pytest.ini

from big_pretrain.data import convert
from big_pretrain.data import records as records_lib
from big_pretrain.data import sources
from big_pretrain.data.prepare import beam_options
from big_pretrain.data.prepare import convert_job
from big_pretrain.data.prepare import convert_pipeline
from helpers import near_duplicate_images

NUM_TARS, GROUPS_PER_TAR = 8, 250
TRUNCATED_TAR = 5
# Which groups of each tar are special (by position in the tar).
NO_IMAGE_EVERY, NO_IMAGE_AT = 97, 5  # a caption without an image
UNDECODABLE_EVERY, UNDECODABLE_AT = 89, 7  # the JPEG cut in half
PLANTED_AT = 11  # tars 0-5: a near-duplicate of held-out image t
# Copies within 6 bits of their original on 500 images (test_near_duplicates.py): found at
# the default 8 with room for a bit flipped on another CPU.
PLANTED_KINDS = ('jpeg_q75', 'resized_0.5x', 'png', 'resized_1.7x', 'jpeg_q75', 'resized_0.5x')
BEAM_2_WORKERS = ('--runner=DirectRunner', '--direct_num_workers=2',
                  '--direct_running_mode=multi_processing')


def _add(archive, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  archive.addfile(info, io.BytesIO(data))


def _noise_jpeg(rng):
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
      buffer, 'JPEG', quality=85)
  return buffer.getvalue()


@pytest.fixture(name='dataset', scope='module')
def fixture_dataset(tmp_path_factory):
  """The tars, the held-out folder, and what the conversion must find in them."""
  root = tmp_path_factory.mktemp('webdataset')
  held_out = root / 'held_out' / 'val'
  held_out.mkdir(parents=True)
  originals = near_duplicate_images.distinct_images(len(PLANTED_KINDS), seed=7)
  for index, image in enumerate(originals):
    (held_out / f'{index}.jpg').write_bytes(image)
  rng = np.random.default_rng(0)
  planted = {}
  for tar_index in range(NUM_TARS):
    path = root / f'shard-{tar_index:04d}.tar'
    with tarfile.open(path, 'w') as archive:
      for position in range(GROUPS_PER_TAR):
        key = f'{tar_index:04d}{position:05d}'
        if position % NO_IMAGE_EVERY == NO_IMAGE_AT:
          _add(archive, f'{key}.txt', b'a caption without an image')
          continue
        image, extension = _noise_jpeg(rng), 'jpg'
        if position % UNDECODABLE_EVERY == UNDECODABLE_AT:
          image = image[:len(image) // 2]
        if position == PLANTED_AT and tar_index < len(PLANTED_KINDS):
          kind = PLANTED_KINDS[tar_index]
          image = near_duplicate_images.variants(originals[tar_index])[kind]
          extension = 'png' if kind == 'png' else 'jpg'
          planted[f'{path.name}/{key}.{extension}'] = f'val/{tar_index}.jpg'
        _add(archive, f'{key}.{extension}', image)
        _add(archive, f'{key}.txt', f'photo {position} #tag{position % 10}'.encode())
        _add(archive, f'{key}.cls', str(position % 5).encode())
    if tar_index == TRUNCATED_TAR:
      data = path.read_bytes()
      path.write_bytes(data[:len(data) * 2 // 3])
  return {'tars': str(root / 'shard-{0000..0007}.tar'), 'held_out': str(held_out),
          'planted': planted, 'root': root}


def _flags(dataset, output, *extra):
  return [f'--input={dataset["tars"]}', f'--output={output}',
          f'--dedup_against={dataset["held_out"]}', *extra]


def _identity(path: pathlib.Path) -> tuple[int, int]:
  """Which file this is: a file written again has another (inode, modification time)."""
  status = path.stat()
  return status.st_ino, status.st_mtime_ns


def _files(folder) -> dict[str, bytes]:
  folder = pathlib.Path(folder)
  return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


@pytest.fixture(name='in_process', scope='module')
def fixture_in_process(dataset, tmp_path_factory):
  output = tmp_path_factory.mktemp('in_process') / 'converted'
  assert convert.main(_flags(dataset, output)) == 0
  return output


def test_in_process_conversion_counts_and_drops_what_it_should(dataset, in_process):
  metadata = json.loads((in_process / records_lib.METADATA_FILE).read_text())
  # Counted from the fixture's rules: tar 5 keeps the groups before its cut.
  source = sources.ArrayRecordSource(str(in_process))
  keys = [source[index]['key'] for index in range(len(source))]
  truncated = [key for key in keys if key.startswith(f'shard-{TRUNCATED_TAR:04d}.tar/')]
  assert 0 < len(truncated) < GROUPS_PER_TAR - 10
  whole_tars = NUM_TARS - 1
  no_image = len(range(NO_IMAGE_AT, GROUPS_PER_TAR, NO_IMAGE_EVERY))
  undecodable = len(range(UNDECODABLE_AT, GROUPS_PER_TAR, UNDECODABLE_EVERY))
  last_position = int(truncated[-1].split('/')[1][4:9])
  cut_no_image = len(range(NO_IMAGE_AT, last_position + 1, NO_IMAGE_EVERY))
  cut_undecodable = len(range(UNDECODABLE_AT, last_position + 1, UNDECODABLE_EVERY))
  assert metadata['truncated_tars'] == [f'shard-{TRUNCATED_TAR:04d}.tar']
  assert metadata['groups_without_image'] == whole_tars * no_image + cut_no_image
  assert metadata['undecodable_images'] == whole_tars * undecodable + cut_undecodable
  planted = len(dataset['planted'])
  # The tars' groups with an image, less the planted near-duplicates (the undecodable kept).
  assert metadata['num_examples'] == (whole_tars * (GROUPS_PER_TAR - no_image)
                                      + last_position + 1 - cut_no_image - planted)
  assert len(keys) == metadata['num_examples'] == len(set(keys))
  # Every planted near-duplicate found, named with its held-out image, and left out; nothing
  # else matched.
  report = json.loads((in_process / convert_job.NEAR_DUPLICATES_FILE).read_text())
  assert {match['key']: match['held_out'] for match in report['matches']} == dataset['planted']
  assert all(match['distance'] <= report['max_distance'] for match in report['matches'])
  assert not set(keys) & set(dataset['planted'])
  assert metadata['near_duplicates']['found'] == metadata['near_duplicates']['dropped'] == 6
  # One shard per tar, in tar order, the original bytes.
  assert [shard['file'] for shard in metadata['shards']] == [
      f'train-{index:05d}-of-{NUM_TARS:05d}.array_record' for index in range(NUM_TARS)]
  with tarfile.open(pathlib.Path(dataset['root']) / 'shard-0001.tar') as archive:
    first = archive.extractfile(archive.getmembers()[0]).read()
  assert source[0]['key'] == 'shard-0000.tar/000000000.jpg'
  assert source[GROUPS_PER_TAR - no_image - 1]['image_bytes'] == first
  assert not (in_process / convert_job.PROGRESS_FOLDER).exists()


def test_listing_keeps_the_near_duplicates(dataset, in_process, tmp_path):
  output = tmp_path / 'listed'
  summary = convert.convert(dataset['tars'], str(output), dedup_against=[dataset['held_out']],
                            dedup='list', undecodable='drop')
  reference = json.loads((in_process / records_lib.METADATA_FILE).read_text())
  assert summary.near_duplicates['found'] == 6 and summary.near_duplicates['dropped'] == 0
  assert summary.num_examples == (reference['num_examples'] + 6
                                  - reference['undecodable_images'])


def test_beam_with_two_workers_and_with_one_writes_the_same_bytes(dataset, in_process,
                                                                  tmp_path):
  expected = _files(in_process)
  for name, flags in (('two', BEAM_2_WORKERS), ('one', ('--runner=DirectRunner',
                                                         '--direct_num_workers=1'))):
    output = tmp_path / name
    plan = convert_job.plan_conversion(
        [dataset['tars']], str(output), held_out=[dataset['held_out']])
    options = beam_options.pipeline_options(flags[0].split('=')[1], flags[1:], paths={})
    convert_job.prepare_output(str(output), overwrite=False)
    metadata, counters = convert_pipeline.run(plan, options)
    assert _files(output) == expected, name
    # Beam's counters say what metadata.json says.
    assert counters['num_examples'] == metadata['num_examples']
    assert counters['undecodable_images'] == metadata['undecodable_images']
    assert counters['groups_without_image'] == metadata['groups_without_image']
    assert counters['near_duplicates'] == 6 and counters['truncated_tars'] == 1
    assert counters['shards_written'] == NUM_TARS


def test_a_shard_that_fails_once_is_retried_by_the_runner(dataset, in_process, tmp_path,
                                                          monkeypatch):
  """An exception mid-shard the first time one record is written: Beam's bundle-based
  DirectRunner retries the bundle (as Dataflow would), and the output is the same."""
  failed = []
  real_encode = records_lib.encode_image_record

  def fails_once(image, caption, label, key):
    if key == 'shard-0002.tar/000200100.jpg' and not failed:
      failed.append(key)
      raise RuntimeError('injected worker failure')
    return real_encode(image, caption, label, key)

  monkeypatch.setattr(records_lib, 'encode_image_record', fails_once)
  output = tmp_path / 'retried'
  convert.convert(dataset['tars'], str(output), dedup_against=[dataset['held_out']],
                  runner='BundleBasedDirectRunner')
  assert failed  # the fault fired, mid-shard
  assert _files(output) == _files(in_process)  # the failed attempt's file is gone too


_KILLED_AFTER_THREE_SHARDS = '''
import os, sys
from big_pretrain.data import convert
from big_pretrain.data.prepare import convert_job
real_convert_shard, finished = convert_job.convert_shard, []
def convert_shard_then_die(*args, **kwargs):
  result = real_convert_shard(*args, **kwargs)
  finished.append(result.index)
  if len(finished) == 3:
    os._exit(9)  # as a killed machine: no cleanup, no exception handler
  return result
convert_job.convert_shard = convert_shard_then_die
convert.main(sys.argv[1:])
'''


def _convert_killed_after_three_shards(dataset, output) -> None:
  killed = subprocess.run([sys.executable, '-c', _KILLED_AFTER_THREE_SHARDS,
                           *_flags(dataset, output)], capture_output=True, text=True,
                          check=False)
  assert killed.returncode == 9, killed.stderr


def test_a_killed_conversion_reads_as_unfinished_and_a_rerun_completes_it(
    dataset, in_process, tmp_path):
  output = tmp_path / 'killed'
  _convert_killed_after_three_shards(dataset, output)
  assert not (output / records_lib.METADATA_FILE).exists()
  with pytest.raises(ValueError, match='conversion did not finish'):
    sources.ArrayRecordSource(str(output))
  finished = sorted(output.glob('*.array_record'))
  assert len(finished) == 3
  before = {path.name: _identity(path) for path in finished}
  # The rerun (here on Beam) keeps the three finished shards and writes the rest.
  assert convert.main(_flags(dataset, output, *BEAM_2_WORKERS)) == 0
  assert {name: _identity(output / name) for name in before} == before
  assert _files(output) == _files(in_process)


def test_a_rerun_with_other_settings_converts_every_shard_again(dataset, tmp_path):
  """The finished shards of an unfinished conversion are kept only by a rerun of the same
  conversion: here the rerun lists the near-duplicates instead of dropping them."""
  output = tmp_path / 'killed'
  _convert_killed_after_three_shards(dataset, output)
  before = {path.name: _identity(path) for path in output.glob('*.array_record')}
  assert len(before) == 3
  summary = convert.convert(dataset['tars'], str(output), dedup_against=[dataset['held_out']],
                            dedup='list')
  assert summary.near_duplicates['found'] == 6 and summary.near_duplicates['dropped'] == 0
  assert all(_identity(output / name) != identity for name, identity in before.items())
  source = sources.ArrayRecordSource(str(output))
  keys = {source[index]['key'] for index in range(len(source))}
  assert set(dataset['planted']) <= keys


def _run_command(*flags):
  return subprocess.run([sys.executable, '-m', 'big_pretrain.data.convert', *flags],
                        capture_output=True, text=True, check=False)


@pytest.mark.parametrize('case, flags, message', [
    ('glob_matching_nothing', ['--input={root}/nothing-*.tar'], 'No tar shard matches'),
    ('not_a_tar', ['--input={root}/fake.tar'], 'is not a tar file'),
    ('no_such_runner', ['--input={tars}', '--runner=TurboRunner'], 'Beam has no such runner'),
    ('unknown_beam_flag', ['--input={tars}', '--runner=DirectRunner', '--direct_wrokers=2'],
     '--direct_wrokers=2: neither this command nor any Beam pipeline option knows it'),
    ('dataflow_without_companions', ['--input=gs://bucket/shard-*.tar',
                                     '--runner=DataflowRunner', '--project=my-project'],
     'needs --region, --temp_location as well'),
    ('dataflow_with_local_paths', ['--input={tars}', '--runner=DataflowRunner',
                                   '--project=my-project', '--region=us-central1',
                                   '--temp_location=gs://bucket/tmp'],
     'runs on other machines'),
])
def test_bad_inputs_are_one_line_exit_2_and_nothing_written(dataset, tmp_path, case, flags,
                                                             message):
  (pathlib.Path(dataset['root']) / 'fake.tar').write_text('this is no tar archive\n' * 40)
  output = tmp_path / 'out'
  flags = [flag.format(root=dataset['root'], tars=dataset['tars']) for flag in flags]
  finished = _run_command(*flags, f'--output={output}')
  assert finished.returncode == 2, finished.stderr
  lines = finished.stderr.strip().splitlines()
  assert lines[-1].startswith('big_pretrain.data.convert: ') and message in lines[-1], (
      finished.stderr)
  assert 'Traceback' not in finished.stderr
  assert not output.exists()


def test_a_finished_conversion_is_not_replaced_without_overwrite(dataset, in_process):
  before = _files(in_process)
  finished = _run_command(*_flags(dataset, in_process))
  assert finished.returncode == 2
  assert 'already holds a finished conversion' in finished.stderr
  assert 'Pass --overwrite' in finished.stderr
  assert _files(in_process) == before
