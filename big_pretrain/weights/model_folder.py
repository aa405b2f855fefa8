"""The model folder that timm and Hugging Face transformers both read and write: config.json
beside model.safetensors (or its shards and their index), or the weights file alone (a
.safetensors, or a PyTorch .pth / .pt / .bin).

ModelFolderFormat is what the two formats share: a folder is theirs by its config.json's
key (`config_key`: timm's 'architecture', transformers' 'model_type'); a folder without
config.json, or a lone file, by its arrays' names (`names_are_ours`). An export of theirs is
config.json and model.safetensors (float32), whose metadata records the format
(weight_format.EXPORT_MARK), so that a folder is recognised as a previous export of it.
"""

from __future__ import annotations

import json
import os

import numpy as np

from big_pretrain.storage import files as storage
from big_pretrain.weights import safetensors_format, weight_files
from big_pretrain.weights.weight_format import EXPORT_MARK, Exported, WeightFormat, WeightSource


class ModelFolderFormat(WeightFormat):
  """A format of model folders (see the module doc); subclasses name their config key and
  say which arrays' names are theirs."""
  suffixes = ('.safetensors',) + weight_files.PYTORCH_SUFFIXES
  can_write = True
  export_files = (weight_files.SAFETENSORS_FILE, weight_files.CONFIG_FILE)

  def names_are_ours(self, names: list[str]) -> bool:
    raise NotImplementedError

  def recognises(self, source: WeightSource) -> bool:
    if source.is_folder:
      if source.config is not None:
        return self.config_key in source.config
      return source.holds_model_weights() and self.names_are_ours(source.names)
    return source.path.endswith(self.suffixes) and self.names_are_ours(source.names)

  def check(self, source: WeightSource) -> None:
    """The folder's weight files are there, each one's bytes the format its name says, a
    safetensors header whole (weight_files.check_file)."""
    for file in weight_files.folder_weight_files(source.path):
      weight_files.check_file(file)

  def exported(self, state: dict, model_config: dict, model: str,
               more_files: dict[str, bytes] | None = None) -> Exported:
    """The export of a state dict in this format's names and its config.json: float32,
    C-contiguous, model.safetensors' metadata naming the format."""
    state = {name: np.ascontiguousarray(value, np.float32) for name, value in state.items()}
    files = {
        weight_files.CONFIG_FILE: json.dumps(model_config, indent=2).encode(),
        weight_files.SAFETENSORS_FILE: weight_files.safetensors_bytes(state,
                                                                      {EXPORT_MARK: self.name}),
        **(more_files or {}),
    }
    return Exported(files=files, model=model, arrays=len(state),
                    parameters=int(sum(value.size for value in state.values())))

  def holds_export(self, folder: str) -> bool:
    """Recognised by its content: only this format's files, and model.safetensors' metadata
    naming it."""
    recorded = safetensors_format.read_metadata(
        os.path.join(folder, weight_files.SAFETENSORS_FILE)).get(EXPORT_MARK)
    return recorded == self.name and set(storage.list_dir(folder)) <= set(self.export_files)
