"""A grid of reconstructions for objectives that predict pixels (MAE, later AIM).

Each row is one held-out image; the columns are the panels the objective's
`visualize` returns (for MAE: input, masked input, reconstruction, and the
normalised target beside the normalised prediction). Written as an image
summary and as a PNG in the workdir.
"""

from __future__ import annotations

import io
import os

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from big_pretrain import sharding as sharding_lib
from big_pretrain import workdir as workdir_lib
from big_pretrain.data.pipeline import InputPipeline
from big_pretrain.evaluators.base import EvalResult, Evaluator
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
    self._images = None
    self._visualize = None

  def _held_out_images(self):
    """The first images of the evaluation split, the same at every run."""
    if self._images is None:
      shards = sharding_lib.num_batch_shards(self.trainer.mesh) * jax.process_count()
      batch = round_up(self.eval_config.num_images, shards)
      data = split_data_config(self.stage_config.data, self.eval_config.test_data,
                               culprit=f'config.evals.{self.name}.test_data')
      pipeline = InputPipeline(data, global_batch_size=batch,
                               mesh=self.trainer.mesh, train=False, seed=self.stage_config.seed)
      self._images = next(pipeline)['image']
    return self._images

  def run(self, params, step):
    images = self._held_out_images()
    if self._visualize is None:
      self._visualize = jax.jit(self.objective.visualize)
    with sharding_lib.activate(self.trainer.mesh, self.trainer.rules):
      panels = self._visualize(params, images, jax.random.key(self.stage_config.seed))
    panels = {k: np.asarray(multihost_utils.process_allgather(panels[k], tiled=True))
              [:self.eval_config.num_images] for k in self.objective.visualization_panels}
    grid = panels_to_grid(panels)
    if jax.process_index() == 0:
      png = io.BytesIO()
      Image.fromarray((grid * 255).round().astype(np.uint8)).save(png, format='PNG')
      workdir_lib.write_bytes(os.path.join(self.workdir, f'{self.name}.png'), png.getvalue())
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
