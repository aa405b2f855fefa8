"""A grid of reconstructions for objectives that predict pixels (MAE, later AIM).

Each row is one held-out image; the columns are the panels the objective's
`visualize` returns (for MAE: input, masked input, reconstruction, and the
normalised target beside the normalised prediction). Written as an image
summary and as a PNG in the workdir.

The images are the first `num_images` of the held-out split in its fixed order
(`pipeline.eval_order`), read once like the feature evaluators' (`pipeline.ordered_batches`):
a split smaller than `num_images` shows every image it has, and an unreadable
image leaves out its row.
"""

from __future__ import annotations

import io
import os

from absl import logging
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from big_pretrain import sharding as sharding_lib
from big_pretrain.storage import files as storage
from big_pretrain.data import sources
from big_pretrain.data.pipeline import eval_order, ordered_batches
from big_pretrain.evaluators.evaluator import EvalResult, Evaluator
from big_pretrain.evaluators.features import round_up, split_data_config


class ReconstructionEvaluator(Evaluator):

  @staticmethod
  def default_config():
    return ml_collections.ConfigDict(dict(
        kind='reconstruction', every_steps=0, num_images=8,
        test_data=ml_collections.ConfigDict(dict(split='test'))))  # overrides of config.data

  def __init__(self, *args):
    super().__init__(*args)
    if not hasattr(self.objective, 'visualize'):
      raise ValueError(
          f'config.evals.{self.name}: kind=reconstruction needs an objective that predicts '
          f'pixels; {self.objective.name!r} does not.')
    self._images = None  # batch-sharded, padded to whole batches
    self._readable = None  # (batch,) bool: the rows that hold a held-out image
    self._visualize = None

  def _held_out_images(self):
    """(images, readable rows) of the first images of the evaluation split, the same at
    every run."""
    if self._images is None:
      num_images = self.eval_config.num_images
      data = split_data_config(self.stage_config.data, self.eval_config.test_data,
                               num_examples=num_images,
                               culprit=f'config.evals.{self.name}.test_data')
      source = sources.build_source(data)
      indices = eval_order(data, len(source))[:num_images]
      if len(indices) < num_images:
        logging.info('config.evals.%s: the held-out split has %d images (%d asked for): '
                     'showing each of them.', self.name, len(indices), num_images)
      shards = sharding_lib.num_batch_shards(self.trainer.mesh) * jax.process_count()
      # One batch holds them all; rows past them are padding that `run` leaves out.
      batch, rows = next(ordered_batches(
          source, indices, data, global_batch_size=round_up(len(indices), shards),
          mesh=self.trainer.mesh))
      self._images, self._readable = batch['image'], rows['valid']
    return self._images, self._readable

  def run(self, params, step):
    images, readable = self._held_out_images()
    if not readable.any():
      logging.warning('config.evals.%s: none of the held-out images could be read: no '
                      'reconstructions to show.', self.name)
      return EvalResult()
    if self._visualize is None:
      self._visualize = jax.jit(self.objective.visualize)
    with sharding_lib.activate(self.trainer.mesh, self.trainer.rules):
      panels = self._visualize(params, images, jax.random.key(self.stage_config.seed))
    panels = {k: np.asarray(multihost_utils.process_allgather(panels[k], tiled=True))[readable]
              for k in self.objective.visualization_panels}
    grid = panels_to_grid(panels)
    if jax.process_index() == 0:
      png = io.BytesIO()
      Image.fromarray((grid * 255).round().astype(np.uint8)).save(png, format='PNG')
      storage.write_bytes(os.path.join(self.workdir, f'{self.name}.png'), png.getvalue())
    return EvalResult(images={f'{self.name}/{"_".join(panels)}': grid})


def panels_to_grid(panels: dict[str, np.ndarray], gap: int = 2) -> np.ndarray:
  """{'input': (N, H, W, 3), ...} in [0, 1] -> one (N*(H+gap), P*(W+gap), 3) image."""
  columns = list(panels.values())
  n, h, w, _ = columns[0].shape
  grid = np.ones((n * (h + gap) - gap, len(columns) * (w + gap) - gap, 3), np.float32)
  for col, images in enumerate(columns):
    for row in range(n):
      grid[row * (h + gap):row * (h + gap) + h, col * (w + gap):col * (w + gap) + w] = images[row]
  return grid
