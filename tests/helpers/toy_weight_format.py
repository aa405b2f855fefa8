"""A weight format the package does not ship, for tests to register (FORMATS.registered) and
see picked up by everything that reads the table: a stage's parameters under their own
'/'-joined names, each array a JSON {"shape", "values"} (float32 values are exact in JSON's
float64), in one file ending in .params.json."""

import json
import os

import numpy as np
from etils import epath

from big_pretrain.weights.weight_format import Exported, WeightFormat, WeightSource
from helpers.trees import named_leaves

PARAMS_FILE = 'weights.params.json'


class JsonOfLists(WeightFormat):
  name = 'json_of_lists'
  title = 'JSON of lists'
  suffixes = ('.params.json',)
  can_write = True
  export_files = (PARAMS_FILE,)

  def recognises(self, source: WeightSource) -> bool:
    if source.is_folder:
      return source.holds(PARAMS_FILE)
    return source.path.endswith(self.suffixes)

  def read(self, source: WeightSource, target: dict) -> dict:
    path = os.path.join(source.path, PARAMS_FILE) if source.is_folder else source.path
    parts = {}
    for name, array in json.loads(epath.Path(path).read_text()).items():
      *parents, leaf = name.split('/')
      node = parts
      for parent in parents:
        node = node.setdefault(parent, {})
      node[leaf] = np.asarray(array['values'], np.float32).reshape(array['shape'])
    return {name: part for name, part in parts.items() if name in target}

  def write(self, model, params: dict, labels) -> Exported:
    del model, labels  # the parameters say it all
    leaves = {name: np.asarray(leaf, np.float32) for name, leaf in named_leaves(params).items()}
    arrays = {name: {'shape': list(leaf.shape), 'values': leaf.ravel().tolist()}
              for name, leaf in leaves.items()}
    return Exported(files={PARAMS_FILE: json.dumps(arrays).encode()}, model='JSON of lists',
                    arrays=len(leaves), parameters=sum(leaf.size for leaf in leaves.values()))
