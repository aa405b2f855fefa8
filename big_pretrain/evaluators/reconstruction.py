"""A grid of reconstructions for objectives that predict pixels (MAE, later AIM).

Each row is one held-out image; the columns are the panels the objective's
`visualize` returns (for MAE: input, masked input, reconstruction, and the
normalized target beside the normalized prediction). Written as an image
summary and as a PNG in the workdir.

The images are the first `num_images` of the held-out split, read as every
evaluator reads a split (eval_split.py) in one batch: a split smaller than
`num_images` shows every image it has, and an unreadable image leaves out its row.
"""

from __future__ import annotations

import io

from absl import logging
import jax
import numpy as np
from PIL import Image

from big_pretrain import schema
from big_pretrain.evaluators.evaluator import EvalResult, Evaluator, evaluator_keys, split_overrides
from big_pretrain.objectives.objective import RECONSTRUCTS
from big_pretrain.storage import files as storage
from big_pretrain.storage.stage_dir import StageDir


class ReconstructionEvaluator(Evaluator):

  config_keys = evaluator_keys(
      'reconstruction', "a grid of the objective's reconstructions of held-out images",
      num_images=schema.Key(8, schema.COUNT, 'the images in the grid'),
      test_data=split_overrides('test', 'held-out'))

  needs = RECONSTRUCTS

  def visualize(self, params, batch):
    """The objective's panels of the batch's images, the same masks at every run."""
    return self.objective.visualize(params, batch['image'],
                                    jax.random.key(self.stage_config.seed))

  def device_programs(self):
    return {'visualize': (self.visualize,
                          ({'image': self.image_batch(self.eval_config.num_images)},))}

  def run(self, params, step):
    num_images = self.eval_config.num_images
    panels, _, _ = self.split_outputs(self.jit('visualize', self.visualize), params,
                                      data_key='test_data', num_examples=num_images,
                                      batch_size=num_images)  # one batch holds them all
    panels = {k: panels[k] for k in self.objective.visualization_panels}
    if not len(next(iter(panels.values()))):
      logging.warning('%s: none of the held-out images could be read: no reconstructions to '
                      'show.', self.culprit())
      return EvalResult()
    grid = panels_to_grid(panels)
    if jax.process_index() == 0:
      png = io.BytesIO()
      Image.fromarray((grid * 255).round().astype(np.uint8)).save(png, format='PNG')
      storage.write_bytes(StageDir(self.workdir).evaluator_image(self.name), png.getvalue())
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
