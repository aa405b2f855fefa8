"""The FLIP text tower: a transformer over caption tokens.

Token + learned position embeddings, the same pre-LN blocks as the ViT
(bidirectional, padding masked out), final LN, and the embedding read at the
first position (the <bos> token every caption starts with). Padding trails
the text (the tokenizers' `encode_padded`), so it is given to the attention
as each caption's length: the form cuDNN's fused attention takes, where a
(B, 1, 1, T) mask is refused.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from big_pretrain.models.transformer import TransformerTower


class TextTransformer(TransformerTower):
  """The blocks' options: `TransformerTower`'s."""
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  max_length: int
  pad_id: int = 0  # the tokenizer's padding id: masked out of attention

  @nn.compact
  def __call__(self, tokens):
    """tokens: int32 (B, T) with T <= max_length, pad_id after the text -> (B, width)."""
    if tokens.shape[1] > self.max_length:
      raise ValueError(f'Text of {tokens.shape[1]} tokens exceeds max_length={self.max_length}.')
    x = nn.Embed(
        self.vocab_size, self.width, dtype=self.dtype, name='token_embedding',
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ('vocab', 'embed')))(tokens)
    posemb = self.param('pos_embedding', nn.with_logical_partitioning(
        nn.initializers.normal(0.01), (None, 'tokens', 'embed')), (1, self.max_length, self.width))
    x = x + posemb[:, :tokens.shape[1]].astype(self.dtype)
    # Every query may attend to every real token: those up to the last non-padding one.
    positions = jnp.arange(1, tokens.shape[1] + 1, dtype=jnp.int32)
    lengths = jnp.max(jnp.where(tokens != self.pad_id, positions, 0), axis=1)
    lengths = jnp.maximum(lengths, 1)  # an all-padding row attends to its first token
    x = self.make_transformer()(x, key_lengths=lengths)
    return x[:, 0]
