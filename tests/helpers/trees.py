"""Parameter trees: their leaves by name, and exact equality."""

import jax
import numpy as np

from big_pretrain.train.optim import param_path


def named_leaves(tree) -> dict:
  """{'encoder/patch_embed/kernel': leaf, ...}: every leaf by its parameter path, in tree order."""
  return {param_path(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_equal(got, want):
  """The same tree structure, every leaf bit-identical."""
  jax.tree.map(np.testing.assert_array_equal, got, want)
