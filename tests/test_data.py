"""Tests for big_pretrain.data: sources, transforms and the Grain input pipeline."""

import json
import logging

import jax
import numpy as np
from PIL import Image
import pytest

from big_pretrain.config.validation import check_fits_devices, validate_stage_config
from big_pretrain.data import data_config
from big_pretrain.data import eval_input
from big_pretrain.data import example_maps
from big_pretrain.data import process_share
from big_pretrain.data import sources
from big_pretrain.data import train_input
from big_pretrain.data import transforms
from big_pretrain.data.data_config import default_data_config
from big_pretrain.data.sources import synthetic
from helpers.batches import (IMAGE_SIZE, assert_batches_equal, first_devices_mesh,
                          eval_split_batches, small_data_config, take, unreadable_rows,
                          valid_rows)
from helpers.images import VALID_IMAGES_PER_CLASS, truncated_jpeg_bytes
from helpers.tiny_config import tiny_mae_config


# --- SyntheticShapes ----------------------------------------------------------

def test_synthetic_example_is_a_function_of_seed_and_index():
  first, second = sources.SyntheticShapes(50, 48, seed=3), sources.SyntheticShapes(50, 48, seed=3)
  for index in (0, 7, 49):
    a, b = first[index], second[index]
    np.testing.assert_array_equal(a['image'], b['image'])
    assert (a['label'], a['caption'], a['hashtags']) == (b['label'], b['caption'], b['hashtags'])
  other_seed = sources.SyntheticShapes(50, 48, seed=4)
  assert not np.array_equal(first[7]['image'], other_seed[7]['image'])


def test_synthetic_examples_differ_between_indices():
  source = sources.SyntheticShapes(20, 48)
  images = [source[i]['image'] for i in range(20)]
  for i in range(20):
    for j in range(i + 1, 20):
      assert not np.array_equal(images[i], images[j]), (i, j)


def test_synthetic_example_format_and_caption_match_label():
  source = sources.SyntheticShapes(300, 40)
  assert source.num_classes == len(synthetic.SHAPE_NAMES) >= 8
  assert source.class_names == list(synthetic.SHAPE_NAMES)
  colour_names = {name for name, _ in synthetic.PALETTE}
  size_names = {name for name, _ in synthetic.SIZES}
  labels = []
  for index in range(len(source)):
    example = source[index]
    assert example['image'].shape == (40, 40, 3) and example['image'].dtype == np.uint8
    shape_name = source.class_names[example['label']]
    shape_tag, colour_tag, size_tag, background_tag = example['hashtags']
    assert shape_tag == f'#{shape_name}'
    assert colour_tag[1:] in colour_names and size_tag[1:] in size_names
    assert background_tag.endswith('_background')
    assert background_tag[1:-len('_background')] != colour_tag[1:]
    assert example['caption'] == (
        f'a {size_tag[1:]} {colour_tag[1:]} {shape_name} on a'
        f' {background_tag[1:-len("_background")]} background')
    labels.append(example['label'])
  assert set(labels) == set(range(source.num_classes))


def test_synthetic_colour_and_size_vary_within_a_class():
  source = sources.SyntheticShapes(400, 32)
  circles = [source[i] for i in range(len(source)) if source[i]['label'] == 0]
  assert len({example['hashtags'][1] for example in circles}) >= 5
  assert len({example['hashtags'][2] for example in circles}) == len(synthetic.SIZES)


def test_synthetic_images_are_textured_and_show_the_shape_colour():
  source = sources.SyntheticShapes(10, 64)
  palette = dict(synthetic.PALETTE)
  for index in range(len(source)):
    example = source[index]
    pixels = example['image'].reshape(-1, 3).astype(np.int32)
    assert len(np.unique(pixels, axis=0)) > 100  # Noise and gradient, not flat.
    shape_colour = np.array(palette[example['hashtags'][1][1:]])
    near_shape_colour = np.abs(pixels - shape_colour).sum(axis=1) < 40
    assert 0.01 < near_shape_colour.mean() < 0.7


# --- Transforms ---------------------------------------------------------------

def test_random_resized_crop_shape_and_determinism():
  image = sources.SyntheticShapes(1, 64)[0]['image'][:, :50]  # Non-square input.
  crops = [
      transforms.random_resized_crop(image, np.random.default_rng(seed), IMAGE_SIZE)
      for seed in (0, 0, 1)
  ]
  assert crops[0].shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and crops[0].dtype == np.uint8
  np.testing.assert_array_equal(crops[0], crops[1])
  assert not np.array_equal(crops[0], crops[2])


def test_random_resized_crop_falls_back_to_centre_crop_for_extreme_aspect():
  image = np.zeros((4, 200, 3), np.uint8)
  crop = transforms.random_resized_crop(image, np.random.default_rng(0), 16, scale=(0.9, 1.0))
  assert crop.shape == (16, 16, 3)


def test_center_crop_resize_and_flip():
  image = np.arange(30 * 40 * 3, dtype=np.uint8).reshape(30, 40, 3)
  assert transforms.center_crop_resize(image, 16).shape == (16, 16, 3)
  flips = {transforms.random_horizontal_flip(image, np.random.default_rng(seed)).tobytes()
           for seed in range(20)}
  assert flips == {image.tobytes(), image[:, ::-1].tobytes()}


@pytest.mark.parametrize('mode, suffix', [('RGB', '.png'), ('RGB', '.jpg'), ('L', '.png'),
                                          ('RGBA', '.png'), ('P', '.png')])
def test_decode_image_gives_uint8_rgb(tmp_path, mode, suffix):
  path = tmp_path / f'image{suffix}'
  Image.new(mode, (20, 12)).save(path)
  image = transforms.decode_image(str(path))
  assert image.shape == (12, 20, 3) and image.dtype == np.uint8


def test_decode_image_rejects_garbage_and_truncated_files(tmp_path):
  garbage = tmp_path / 'garbage.jpg'
  garbage.write_bytes(np.random.default_rng(0).bytes(500))
  truncated = tmp_path / 'truncated.jpg'
  truncated.write_bytes(truncated_jpeg_bytes())
  with Image.open(truncated) as lazily_opened:  # PIL only notices when decoding.
    assert lazily_opened.size == (48, 40)
  for path in (garbage, truncated):
    with pytest.raises(transforms.CorruptImageError, match=path.name):
      transforms.decode_image(str(path))


def _smooth_picture(width, height):
  """uint8 RGB (height, width, 3): sinusoids of periods >= 96 px, at most ~3 levels per px."""
  y, x = np.mgrid[0:height, 0:width].astype(np.float64)
  channels = [128 + 60 * np.sin(2 * np.pi * x / 128 + phase) + 40 * np.cos(2 * np.pi * y / 96)
              for phase in (0.0, 1.0, 2.0)]
  return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


def test_decoding_a_jpeg_at_its_crops_scale_matches_the_full_decode(tmp_path):
  """decode_at_crop_scale: a 512 x 384 JPEG whose crop (area >= 90%) is > 4x the output
  (64 px) is decoded at 1/4 of its size; the crop matches the full decode's. PNGs,
  crops under 2x the output and broken files go the full decode's way exactly."""
  size, crop_scale = 64, (0.9, 1.0)
  picture = Image.fromarray(_smooth_picture(512, 384))
  rotated_exif = Image.Exif()
  rotated_exif[0x0112] = 6  # shown rotated by 90 degrees: the crop is drawn 384 wide
  files = {'jpeg': dict(format='JPEG', quality=95), 'rotated.jpeg': dict(
      format='JPEG', quality=95, exif=rotated_exif.tobytes()), 'png': dict(format='PNG')}
  for name, options in files.items():
    picture.save(tmp_path / name, **options)
  picture.resize((100, 75)).save(tmp_path / 'small.jpeg', quality=95)

  def crop_flip(name, decode_at_crop_scale, seed):
    rng = np.random.default_rng(seed)
    example = example_maps.augment_for_training(
        {'image_path': str(tmp_path / name), 'label': 0}, rng, image_size=size,
        crop_scale=crop_scale, augment=('crop', 'flip'), randaugment_ops=0,
        randaugment_magnitude=0.0, randaugment_magnitude_std=0.0, erasing_prob=0.0,
        scale_jitter=(1.0, 1.0), decode_at_crop_scale=decode_at_crop_scale)
    return example['image'].astype(np.int32), rng.random()  # and where rng's draws ended

  for seed in range(3):
    box = transforms.sample_crop_box(384, 512, np.random.default_rng(seed), crop_scale)
    assert transforms.decode_reduction(box, size) == 4
    for name in files:
      (reduced, reduced_next), (full, full_next) = (crop_flip(name, on, seed)
                                                    for on in (True, False))
      assert reduced.shape == (size, size, 3) and reduced_next == full_next  # same draws
      if name == 'png':  # PIL's draft mode is for JPEG only
        np.testing.assert_array_equal(reduced, full)
        continue
      # The picture's finest detail (96 px) is 6 output pixels even in the crop, so both
      # resamplings keep it; they differ by JPEG's noise at q95 (~1 level) averaged
      # over 4 x 4 blocks by the reduced decode and by the resize's kernel in the full
      # one, and bicubic overshoot at the steepest slopes (~3 levels per source pixel).
      # A wrong crop box (a shift of 10 px, or the box not rotated) is off by 10+ levels.
      difference = np.abs(reduced - full)
      assert difference.mean() < 1.0 and difference.max() <= 4, (name, difference.max())
    np.testing.assert_array_equal(*(crop_flip('small.jpeg', on, seed)[0] for on in (True, False)))

  (tmp_path / 'truncated.jpeg').write_bytes(truncated_jpeg_bytes())
  (tmp_path / 'garbage.jpeg').write_bytes(np.random.default_rng(0).bytes(300))
  for name in ('truncated.jpeg', 'garbage.jpeg'):
    skipped = example_maps.augment_for_training(
        {'image_path': str(tmp_path / name)}, np.random.default_rng(0), image_size=size,
        crop_scale=crop_scale, augment=('crop',), randaugment_ops=0, randaugment_magnitude=0.0,
        randaugment_magnitude_std=0.0, erasing_prob=0.0, scale_jitter=(1.0, 1.0),
        decode_at_crop_scale=True)
    assert isinstance(skipped, transforms.SkippedExample) and skipped.path.endswith(name)


# --- Pipeline on synthetic data -----------------------------------------------

def test_pipeline_yields_sharded_global_batches():
  data = train_input.InputPipeline(small_data_config(), global_batch_size=8,
                                   mesh=first_devices_mesh())
  batch = next(data)
  assert set(batch) == {'image', 'label'}
  assert isinstance(batch['image'], jax.Array)
  assert batch['image'].shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert batch['image'].dtype == np.uint8
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  assert batch['image'].sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'))
  assert np.all((np.asarray(batch['label']) >= 0) & (np.asarray(batch['label']) < data.num_classes))
  assert data.class_names == list(synthetic.SHAPE_NAMES)


def test_pipeline_shards_batch_over_data_and_fsdp():
  mesh = first_devices_mesh((4, 2, 1))
  data = train_input.InputPipeline(small_data_config(), global_batch_size=16, mesh=mesh)
  twin = train_input.InputPipeline(small_data_config(), global_batch_size=16, mesh=mesh)
  batch = next(data)
  shards = batch['image'].addressable_shards
  assert len(shards) == 8
  assert all(shard.data.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) for shard in shards)
  assert all(shard.data.shape == (2,) for shard in batch['label'].addressable_shards)
  np.testing.assert_array_equal(np.asarray(batch['image']), twin.next_local_numpy()['image'])


def test_a_batch_not_divisible_by_the_batch_devices_is_refused_before_the_pipeline():
  config = tiny_mae_config(batch_size=12)
  config.mesh.update(data=4, fsdp=2, tensor=1)
  with pytest.raises(ValueError, match=r'batch_size=12 must be a multiple of the 8 devices '
                                       r'along the batch axes'):
    check_fits_devices(config, num_devices=8, num_processes=1)


def test_pipeline_resumes_exactly_from_saved_state():
  config = small_data_config()
  data = train_input.InputPipeline(config, global_batch_size=8, mesh=first_devices_mesh(), seed=5)
  take(data, 3)
  # A checkpoint stores the global position as JSON.
  state = json.loads(json.dumps(data.local_batches.global_position().to_json()))
  expected = take(data, 2)

  resumed = train_input.InputPipeline(config, global_batch_size=8, mesh=first_devices_mesh(),
                                      seed=5)
  resumed.local_batches.set_state(state)
  assert_batches_equal(expected, take(resumed, 2))


def test_run_seed_changes_order_and_augmentation():
  config = small_data_config()
  first = train_input.InputPipeline(config, global_batch_size=8, mesh=first_devices_mesh(), seed=0)
  second = train_input.InputPipeline(config, global_batch_size=8, mesh=first_devices_mesh(), seed=1)
  assert not np.array_equal(first.next_local_numpy()['image'], second.next_local_numpy()['image'])


def test_train_pipeline_reshuffles_each_epoch():
  config = small_data_config(num_examples=16)
  data = train_input.InputPipeline(config, global_batch_size=8, mesh=first_devices_mesh())
  epoch_labels = [np.concatenate([b['label'] for b in take(data, 2)]) for _ in range(2)]
  # Same multiset of examples per epoch, different order.
  np.testing.assert_array_equal(np.sort(epoch_labels[0]), np.sort(epoch_labels[1]))
  assert not np.array_equal(epoch_labels[0], epoch_labels[1])


def test_evaluation_reads_one_epoch_in_a_fixed_shuffled_order():
  config = small_data_config(num_examples=24)
  read = lambda data_config: valid_rows(eval_split_batches(data_config, 8), 'label')
  labels = read(config)
  # Every example exactly once ...
  np.testing.assert_array_equal(np.sort(labels),
                                np.sort(np.arange(24) % len(synthetic.SHAPE_NAMES)))
  # ... not in listing order (so the first N span the classes), but in the order drawn from
  # the data's seed alone (eval_order takes nothing of the run), so evaluations compare
  # across runs.
  assert not np.array_equal(labels, np.arange(24) % len(synthetic.SHAPE_NAMES))
  source = sources.build_source(config)
  np.testing.assert_array_equal(
      labels, [source[int(i)]['label'] for i in eval_input.eval_order(config, 24)])
  np.testing.assert_array_equal(labels, read(config))


# --- Image folder -------------------------------------------------------------

def test_image_folder_lists_classes_captions_and_hashtags(image_folder):
  source = sources.ImageFolder(str(image_folder))
  assert source.class_names == ['cats', 'dogs'] and source.num_classes == 2
  assert len(source) == 2 * VALID_IMAGES_PER_CLASS + 2
  examples = [source[i] for i in range(len(source))]
  assert [e['label'] for e in examples] == [0] * 4 + [1] * 6
  assert examples[0]['image_path'].endswith('cats0.jpg')
  assert examples[0]['caption'] == 'a fluffy cat #cat #cute'
  assert examples[0]['hashtags'] == ['#cat', '#cute']
  assert examples[1]['caption'] == '' and examples[1]['hashtags'] == []


def test_evaluation_marks_and_names_corrupt_images(image_folder, caplog):
  config = small_data_config(source='image_folder', path=str(image_folder))
  with caplog.at_level(logging.WARNING):
    batches = eval_split_batches(config, global_batch_size=2)
  labels = valid_rows(batches, 'label')
  assert len(labels) == 2 * VALID_IMAGES_PER_CLASS
  assert np.bincount(labels).tolist() == [VALID_IMAGES_PER_CLASS] * 2
  assert all(batch['image'].shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) for batch in batches)
  assert unreadable_rows(batches) == 2
  assert 'broken.jpg' in caplog.text and 'truncated.jpg' in caplog.text


def test_train_pipeline_skips_corrupt_images_and_resumes_the_count(image_folder):
  config = small_data_config(source='image_folder', path=str(image_folder))
  data = train_input.InputPipeline(config, global_batch_size=4, mesh=first_devices_mesh())
  take(data, 2)  # One epoch's worth of valid images.
  state = data.local_batches.get_state()
  count_at_save = data.corrupt_images_skipped
  expected = take(data, 3)
  assert data.corrupt_images_skipped >= 2  # Read at least one full epoch by now.

  resumed = train_input.InputPipeline(config, global_batch_size=4, mesh=first_devices_mesh())
  resumed.local_batches.set_state(state)
  assert resumed.corrupt_images_skipped == count_at_save
  assert_batches_equal(expected, take(resumed, 3))
  assert resumed.corrupt_images_skipped == data.corrupt_images_skipped


def test_missing_image_folder_names_the_path(tmp_path):
  missing = str(tmp_path / 'no_such_folder')
  config = small_data_config(source='image_folder', path=missing)
  with pytest.raises(FileNotFoundError, match='no_such_folder') as error:
    train_input.InputPipeline(config, global_batch_size=8, mesh=first_devices_mesh())
  assert missing in str(error.value) and 'config.data.path' in str(error.value)


def test_image_folder_source_without_path_says_what_to_set():
  with pytest.raises(ValueError, match='config.data.path'):
    data_config.check_config(small_data_config(source='image_folder'))


def test_image_folder_without_images_names_folder_and_extensions(tmp_path):
  (tmp_path / 'empty_class').mkdir()
  with pytest.raises(ValueError, match='.jpg') as error:
    sources.ImageFolder(str(tmp_path))
  assert str(tmp_path) in str(error.value)


def test_unknown_source_lists_valid_names():
  config = tiny_mae_config()
  config.data = small_data_config(source='imagenet')
  with pytest.raises(ValueError, match="'array_record', 'image_folder', 'synthetic', 'tfds'"):
    validate_stage_config(config)


def test_synthetic_colour_label_names_the_shape_colour_in_the_caption():
  shapes = sources.SyntheticShapes(50, 32)
  colours = sources.SyntheticShapes(50, 32, label='colour')
  assert colours.class_names == [name for name, _ in synthetic.PALETTE]
  for index in range(50):
    shape_example, colour_example = shapes[index], colours[index]
    np.testing.assert_array_equal(shape_example['image'], colour_example['image'])  # same pixels
    colour_name = colours.class_names[colour_example['label']]
    assert shape_example['caption'].split()[2] == colour_name  # 'a large red circle on ...'
  assert len({colours[i]['label'] for i in range(50)}) > 5
  with pytest.raises(ValueError, match='colour'):
    sources.SyntheticShapes(10, 32, label='size')


def test_reader_threads_default_to_the_available_cores_capped_at_grains_default(monkeypatch):
  config = default_data_config()
  assert config.num_threads is None
  monkeypatch.setattr(process_share.os, 'sched_getaffinity', lambda pid: set(range(2)))
  assert process_share.num_reader_threads(config) == 2
  monkeypatch.setattr(process_share.os, 'sched_getaffinity', lambda pid: set(range(96)))
  assert process_share.num_reader_threads(config) == process_share.MAX_AUTO_THREADS
  config.num_threads = 5
  assert process_share.num_reader_threads(config) == 5
