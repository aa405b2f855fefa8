"""Image-text retrieval recall on held-out images and their captions (FLIP, CLIP).

The first `test_examples` images of the held-out split and their captions are
embedded; each image ranks all the captions by cosine similarity (image ->
text) and each caption ranks all the images (text -> image). Recall@k is the
fraction of queries whose own pair (the caption of that image, the image of
that caption) is among the k best. Reports `image_to_text_recall@1`, `@5` and
`text_to_image_recall@1`, `@5`, and `pair_probability`: the mean probability
the model gives an image's own caption, from its logits (learned temperature,
and bias for the sigmoid loss: the objective's `pair_scoring`): the pair's own
sigmoid for the sigmoid loss, the softmax over the captions for the softmax
loss. Ranks are read from the cosines (a positive scale and a shared bias keep
the order).

Only the paired index counts as a hit, as in the standard COCO / Flickr
protocol. Where captions repeat (the synthetic captions describe shape, colour,
size and background, so many images share one), the other images with the
same caption are equally right answers that still count as misses: the recall
is then a lower bound on "a correct caption is among the k best". Ties are
broken towards the lower index, as a stable sort would.
"""

from __future__ import annotations

from typing import Sequence

from absl import logging
import numpy as np

from big_pretrain.data import batch_features
from big_pretrain.evaluators.evaluator import EvalResult, held_out_keys
from big_pretrain.evaluators.zero_shot import ImageTextEvaluator
from big_pretrain.objectives.objective import COSINE_SCORING, PairScoring

DEFAULT_RECALL_KS = (1, 5)


def paired_ranks(similarities: np.ndarray) -> np.ndarray:
  """(N,): for each row, how many candidates rank above its paired candidate (the diagonal).

  A candidate ranks above the pair if it is more similar, or equally similar and
  at a lower index (a stable sort's order). Rank 0: the pair comes first.
  """
  similarities = np.asarray(similarities)
  if similarities.ndim != 2 or similarities.shape[0] != similarities.shape[1]:
    raise ValueError(f'similarities must be a square (N, N) matrix; got {similarities.shape}.')
  paired = np.diagonal(similarities)[:, None]
  index = np.arange(len(similarities))
  ahead = (similarities > paired) | ((similarities == paired) & (index[None, :] < index[:, None]))
  return ahead.sum(axis=1)


def retrieval_recalls(image_embeddings: np.ndarray, text_embeddings: np.ndarray,
                      ks: Sequence[int] = DEFAULT_RECALL_KS,
                      scoring: PairScoring = COSINE_SCORING) -> dict[str, float]:
  """Image->text and text->image recall@k; image i's caption is text i.

  Forms the (N, N) similarity matrix, so N is meant to be a few thousand at most.

  Returns:
    {'image_to_text_recall@k': ..., 'text_to_image_recall@k': ...} for each k, and
    'pair_probability': the mean probability `scoring` gives image i's caption i.
  """
  images = np.asarray(image_embeddings, np.float32)
  texts = np.asarray(text_embeddings, np.float32)
  if images.ndim != 2 or images.shape != texts.shape or not len(images):
    raise ValueError(
        f'Need non-empty (N, E) image and text embeddings of the same shape, one caption '
        f'per image; got {images.shape} and {texts.shape}.')
  if not ks or any(k < 1 for k in ks):
    raise ValueError(f'ks={tuple(ks)} must be positive integers such as {DEFAULT_RECALL_KS}.')
  similarities = images @ texts.T  # Rows: images; columns: captions.
  image_to_text = paired_ranks(similarities)
  text_to_image = paired_ranks(similarities.T)
  scalars = {}
  for k in ks:
    scalars[f'image_to_text_recall@{k}'] = float(np.mean(image_to_text < k))
    scalars[f'text_to_image_recall@{k}'] = float(np.mean(text_to_image < k))
  scalars['pair_probability'] = float(np.mean(np.diagonal(
      scoring.probabilities(similarities, axis=1))))
  return scalars


class RetrievalEvaluator(ImageTextEvaluator):

  # Held-out image-caption pairs; each query ranks all of them.
  config_keys = held_out_keys('retrieval', 'image <-> text recall@k on held-out pairs',
                              test_examples=512)

  def embed_pairs(self, params, batch):
    text_tokens = batch[batch_features.TEXT_TOKENS_FEATURE]
    return {'image': self.embed_images(params, batch['image']),
            'text': self.embed_texts(params, text_tokens),
            'text_tokens': text_tokens}  # Kept to count the examples without a caption.

  def _warn_about_missing_captions(self, text_tokens: np.ndarray) -> None:
    tokenizer = self.tokenizer
    specials = [i for i in (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
                if i is not None]
    empty = int(np.all(np.isin(text_tokens, specials), axis=1).sum())
    if empty:
      logging.warning(
          '%s: %d of %d held-out examples have no caption, so retrieval cannot find them. '
          'Image folders read captions from a .txt file beside each image.',
          self.culprit('test_data'), empty, len(text_tokens))

  def run(self, params, step):
    outputs, _, _ = self.split_outputs(self.embed_pairs, params, data_key='test_data',
                                       num_examples=self.eval_config.test_examples)
    self._warn_about_missing_captions(outputs['text_tokens'])
    return EvalResult(scalars=retrieval_recalls(outputs['image'], outputs['text'],
                                                scoring=self.pair_scoring(params)))
