"""SigLIP's sigmoid image-text loss (Zhai et al., 2023), chunked over the device mesh.

Every image-text pair of the global batch is its own binary decision: z_ij = +1
for image i's own caption, -1 for every other, logits_ij = t <x_i, y_j> + b with
x, y unit vectors, and

  loss = -(1/N) sum_i sum_j log sigmoid(z_ij logits_ij).

t = exp(t') and b are learned; t' starts at log 10 and b at -10, so that every
pair starts out judged "no match", as nearly all of the N^2 pairs are.

Nothing normalises over a row (as InfoNCE's softmax does), so the sum splits
into blocks: each device scores its local images against its own texts (the
block holding the positives), then against every other device's texts in
turn, passed one step around a ring of the batch axes (`ppermute`). A device
holds one local x local block of logits at a time, never the rows of the global
batch; the gradient flows back around the ring (ppermute's transpose is the
reverse permutation). Each block is recomputed in the backward pass rather than
kept, so the residuals are the text blocks (N x E per device, as an all-gather
of the texts would hold), not N_local x N logits.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from big_pretrain.sharding import BATCH_AXES

# The paper's initialisation: t' = log 10, b = -10.
TEMPERATURE_INIT = 0.1      # t = 1 / temperature = 10
BIAS_INIT = -10.0


def pair_logits(images: jax.Array, texts: jax.Array, scale, bias) -> jax.Array:
  """(N_images, N_texts): t <x_i, y_j> + b."""
  return scale * images @ texts.T + bias


def _block_terms(images, texts, scale, bias, with_positives):
  """(-sum of the block's log-likelihoods, each row's best negative logit).

  with_positives: the block of the images' own texts (z = +1 on its diagonal); every other
  block holds negatives only.
  """
  logits = pair_logits(images, texts, scale, bias)
  if with_positives:
    is_positive = jnp.eye(*logits.shape, dtype=bool)
    signs = jnp.where(is_positive, 1.0, -1.0)
    negatives = jnp.where(is_positive, -jnp.inf, logits)
  else:
    signs, negatives = -1.0, logits
  nll = -jnp.sum(jax.nn.log_sigmoid(signs * logits))
  return nll, jax.lax.stop_gradient(jnp.max(negatives, axis=1))


def _accuracy(images, texts, scale, bias, best_negative):
  """Image -> text top-1 in the batch: the own caption's logit beats every other."""
  positive = scale * jnp.sum(images * texts, axis=1) + bias
  return jnp.mean(jax.lax.stop_gradient(positive) > best_negative)


def dense_sigmoid_loss(images, texts, scale, bias):
  """The reference: all N x N logits at once. Returns (loss, image->text top-1 accuracy)."""
  nll, best_negative = _block_terms(images, texts, scale, bias, with_positives=True)
  return nll / images.shape[0], _accuracy(images, texts, scale, bias, best_negative)


def ring_axes() -> tuple[str, ...]:
  """The batch axes of the current mesh (jax.set_mesh) that split the batch: the ring."""
  mesh = jax.sharding.get_abstract_mesh()
  return tuple(axis for axis in BATCH_AXES
               if axis in mesh.axis_names and mesh.shape[axis] > 1)


def sigmoid_loss(images, texts, scale, bias):
  """The sigmoid loss of L2-normalised (N, E) embeddings, chunked over the current mesh's
  batch axes; outside a mesh (or on one batch shard) the blocks are the whole batch.

  Returns (loss, image->text top-1 accuracy within the global batch).
  """
  axes = ring_axes()
  if not axes:
    return dense_sigmoid_loss(images, texts, scale, bias)
  mesh = jax.sharding.get_abstract_mesh()
  ring_size = math.prod(mesh.shape[axis] for axis in axes)
  # Each device passes its current text block to the next one around the ring.
  to_next = [(i, (i + 1) % ring_size) for i in range(ring_size)]
  # Recomputed in the backward pass: the ring keeps its text blocks, not its logits.
  negatives_block = jax.checkpoint(
      lambda images, texts, scale, bias: _block_terms(images, texts, scale, bias, False))

  def per_device(images, texts, scale, bias):
    own_texts = texts
    nll, best_negative = _block_terms(images, texts, scale, bias, with_positives=True)

    def next_block(_, carry):
      texts, nll, best_negative = carry
      texts = jax.lax.ppermute(texts, axes, to_next)
      block_nll, block_best = negatives_block(images, texts, scale, bias)
      return texts, nll + block_nll, jnp.maximum(best_negative, block_best)

    _, nll, best_negative = jax.lax.fori_loop(1, ring_size, next_block,
                                              (texts, nll, best_negative))
    correct = jnp.sum(_accuracy(images, own_texts, scale, bias, best_negative)
                      * images.shape[0])
    return jax.lax.psum(nll, axes), jax.lax.psum(correct, axes)

  batch, replicated = PartitionSpec(axes), PartitionSpec()
  nll, correct = jax.shard_map(
      per_device, mesh=mesh, in_specs=(batch, batch, replicated, replicated),
      out_specs=(replicated, replicated))(images, texts, scale, bias)
  return nll / images.shape[0], correct / images.shape[0]
