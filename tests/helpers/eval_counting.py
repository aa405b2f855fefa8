"""What an evaluator reads of a held-out split, for tests/test_eval_counting.py and its workers."""

import jax
import jax.numpy as jnp

from big_pretrain.evaluators.eval_split import extract_outputs

ODD_EXAMPLES = 13


def held_out_images(config, mesh, num_examples: int = ODD_EXAMPLES, data=None):
  """(images, labels) that extract_outputs scores of the 'test' split, on `mesh`."""
  data = (data or config.data).copy_and_resolve_references()
  data.split = 'test'
  rules = ()
  images, labels, _ = extract_outputs(
      jax.jit(lambda params, batch: batch['image'] + jnp.zeros((), jnp.uint8)), None, data,
      num_examples=num_examples, batch_size=8, mesh=mesh, rules=rules)
  return images, labels
