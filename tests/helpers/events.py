"""What TensorBoard's own reader finds in a run's event files."""

import io

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.util import tensor_util


def read_events(logdir):
  """TensorBoard's reader over `logdir`: {'scalars': {tag: [(step, value)]},
  'images': {tag: [(step, [uint8 arrays])]}, 'hparams': {name: value}}."""
  events = plugin_event_accumulator.EventAccumulator(
      str(logdir), size_guidance={plugin_event_accumulator.TENSORS: 0})
  events.Reload()
  scalars = {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
                   for e in events.Tensors(tag)]
             for tag in _tags(events, 'scalars')}
  images = {}
  for tag in _tags(events, 'images'):
    images[tag] = []
    for event in events.Tensors(tag):
      width, height, *pngs = tensor_util.make_ndarray(event.tensor_proto)
      decoded = [np.asarray(Image.open(io.BytesIO(png))) for png in pngs]
      assert all(d.shape[:2] == (int(height), int(width)) for d in decoded)
      images[tag].append((event.step, decoded))
  hparams = {}
  for content in _tags(events, 'hparams').values():
    start = hparams_metadata.parse_session_start_info_plugin_data(content)
    for name, value in start.hparams.items():
      hparams[name] = value.WhichOneof('kind') and getattr(value, value.WhichOneof('kind'))
  return {'scalars': scalars, 'images': images, 'hparams': hparams}


def _tags(events, plugin):
  """Tag -> plugin content of `plugin`'s summaries (none: {})."""
  return events.PluginTagToContent(plugin) if plugin in events.ActivePlugins() else {}
