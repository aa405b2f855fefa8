"""Evaluators score each held-out image exactly once: min(asked, available) distinct images,
the last batch padded with masked rows, the same on 2 processes as on one."""

import jax
import numpy as np
import pytest

from big_pretrain import sharding as sharding_lib
from helpers.eval_counting import ODD_EXAMPLES, held_out_images
from helpers.hashes import image_hashes
from helpers.images import VALID_IMAGES_PER_CLASS
from helpers.jax_workers import launch_workers
from helpers.tiny_config import tiny_multiprocess_config


def test_a_split_smaller_than_asked_is_scored_once_per_readable_image(image_folder):
  config = tiny_multiprocess_config()
  data = config.data.copy_and_resolve_references()
  data.update(source='image_folder', test_path=str(image_folder))
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:4])
  # 10 files, 2 of them unreadable; 1024 asked, batches of 8 over 4 devices.
  images, labels = held_out_images(config, mesh, num_examples=1024, data=data)
  assert len(images) == len(set(image_hashes(images))) == 2 * VALID_IMAGES_PER_CLASS
  assert sorted(labels.tolist()) == [0] * VALID_IMAGES_PER_CLASS + [1] * VALID_IMAGES_PER_CLASS
  # Asking for fewer scores exactly that many of the same images.
  few, _ = held_out_images(config, mesh, num_examples=3, data=data)
  assert len(few) <= 3 and set(image_hashes(few)) <= set(image_hashes(images))


@pytest.mark.multiprocess
def test_two_processes_score_an_odd_split_as_one_process(tmp_path):
  workers = launch_workers('eval_odd', str(tmp_path))
  config = tiny_multiprocess_config()
  images, labels = held_out_images(config, sharding_lib.make_mesh(config.mesh,
                                                                   jax.devices()[:4]))
  assert len(images) == len(set(image_hashes(images))) == ODD_EXAMPLES
  for worker in workers:
    assert worker['images'] == image_hashes(images)
    assert worker['labels'] == labels.tolist()
  assert np.unique(labels).size > 1
