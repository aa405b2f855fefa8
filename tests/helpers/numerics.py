"""Comparing float32 results that two computation orders produced (sharded vs one device,
padded vs unpadded attention, permuted tokens, ...), on any x86-64 CPU.

Reordering a float32 sum of n terms changes it by about sqrt(n) * eps * sum|terms|
(Higham's probabilistic bound; eps = 2**-23 ~ 1.2e-7), and which order runs
depends on the CPU's vector width (SSE, AVX2, AVX-512) as much as on the code.
An element that is a small difference of large terms (a gradient near zero)
can then be off by far more than its own value: an elementwise `rtol` fails on
one CPU and passes on another. So these comparisons bound the error by the
tensor's scale instead:

    max |got - want| <= tol * max |want|

With the tiny test models (reductions of at most a few hundred terms, sqrt(256)
= 16 eps each, through a handful of layers forward and backward), errors stay
below ~10 eps of the scale; REORDERED_FLOAT32 = 1e-5 (~84 eps) leaves room for
that on every instruction set, yet any real difference (a wrong mask, a missing
term, another token's value) moves results by 1e-3 of the scale or more.
"""

import jax
import numpy as np

FLOAT32_EPS = float(np.finfo(np.float32).eps)
REORDERED_FLOAT32 = 1e-5


def assert_close_in_scale(got, want, *, tol: float = REORDERED_FLOAT32, what: str = '',
                          min_scale: float = 0.0):
  """max |got - want| <= tol * max(max |want|, min_scale) (shapes equal)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, f'{what}: shape {got.shape} != {want.shape}'
  scale = max(float(np.max(np.abs(want))) if want.size else 0.0, min_scale)
  error = float(np.max(np.abs(got - want))) if want.size else 0.0
  assert error <= tol * scale, (
      f'{what}: max |got - want| = {error:.3g} is {error / max(scale, 1e-300):.3g} of the '
      f'scale {scale:.3g}; allowed {tol:.3g}')


# A leaf's rounding error is eps times the terms it sums, and those are the model's
# activations and gradients, not the leaf's result: a gradient that sums to ~0 (a key
# bias's is exactly 0 in exact arithmetic, since softmax ignores a shift shared by all
# keys) is rounding noise of terms of ordinary size. So no leaf's scale is taken below
# this fraction of the largest leaf's.
MIN_LEAF_SCALE_OF_TREE = 1e-2


def assert_trees_close_in_scale(got, want, *, tol: float = REORDERED_FLOAT32):
  """`assert_close_in_scale` for every leaf, each against its own scale (at least
  MIN_LEAF_SCALE_OF_TREE of the tree's), named on failure."""
  got_paths, got_leaves = zip(*jax.tree_util.tree_leaves_with_path(got))
  want_paths, want_leaves = zip(*jax.tree_util.tree_leaves_with_path(want))
  assert got_paths == want_paths
  tree_scale = max(float(np.max(np.abs(np.asarray(leaf, np.float64)))) for leaf in want_leaves
                   if np.size(leaf))
  for path, got_leaf, want_leaf in zip(got_paths, got_leaves, want_leaves):
    assert_close_in_scale(got_leaf, want_leaf, tol=tol, what=jax.tree_util.keystr(path),
                          min_scale=MIN_LEAF_SCALE_OF_TREE * tree_scale)
