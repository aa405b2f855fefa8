"""Self-training's student (Zoph et al. 2020, "Rethinking Pre-training and Self-training";
Noisy Student, Xie et al. 2020).

A teacher's pseudo-labels on unlabelled images (big_pretrain/stages/pseudo_label_job.py)
are mixed into every training batch beside the human-labelled images
(config.data.pseudo_labels: exactly `fraction` of each batch); the student
is the fine-tuning classifier, trained on both under strong augmentation
(config.data.augment, e.g. S4: RandAugment + flip + crop + large scale
jitter) and, as Noisy Student's, optionally stochastic depth
(config.model.drop_path) and dropout before the head (objective.head_dropout).

The loss normalizes each part over its own rows and combines them with a
weight w (objective.pseudo_label_weight):

    L = (L_h + w * s * L_p) / (1 + w)

L_h is the mean cross-entropy over the human-labelled rows against their
label-smoothed targets, L_p over the pseudo-labelled rows against the
teacher's probabilities (a hard label is probability 1). With
`balance_pseudo_loss` (the paper's Loss Normalization) s = L_h / L_p, held
out of the gradient, so the pseudo-label term is always on the scale of the
human one; (choice) the paper divides moving averages of the two losses,
ours divides this batch's. Otherwise s = 1.

The student may start from scratch or from any earlier stage's encoder
(`init_from`), so pre-training and self-training compose; and, having a
classification head, it can be the next round's teacher.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from big_pretrain import schema
from big_pretrain.errors import ConfigError
from big_pretrain.models.patches import normalize_images
from big_pretrain.objectives import finetune

# config.objective for the student: fine-tuning's keys, and the pseudo-label term's.
CONFIG_KEYS = finetune.CONFIG_KEYS.with_keys(
    "self-training's student: human labels and a teacher's pseudo-labels in every batch",
    name=schema.Key('self_training', schema.REQUIRED_TEXT, 'the objective'),
    # Mixup and cutmix would mix human with pseudo-labelled rows: off (the paper's students
    # use neither).
    mixup_alpha=schema.Key(0.0, schema.at_least(0), 'must stay 0: it would mix human- with '
                           'pseudo-labelled rows'),
    cutmix_alpha=schema.Key(0.0, schema.at_least(0), 'must stay 0: it would mix human- with '
                            'pseudo-labelled rows'),
    pseudo_label_weight=schema.Key(1.0, schema.at_least(0),
                                   'w: the weight of the pseudo-label term'),
    balance_pseudo_loss=schema.Key(False, schema.BOOLEAN,
                                   "s = L_h / L_p (the paper's loss normalization); else 1"),
)


def pseudo_targets(pseudo_ids: jax.Array, pseudo_probs: jax.Array, num_classes: int):
  """(B, k) class ids (-1: none) and probabilities -> dense (B, num_classes) targets."""
  return jnp.einsum('bk,bkc->bc', pseudo_probs, jax.nn.one_hot(pseudo_ids, num_classes))


def combined_loss(per_example: jax.Array, is_pseudo: jax.Array, weight: float,
                  balance: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(L, L_h, L_p) of the module doc from per-example losses and the pseudo-row mask."""
  pseudo = is_pseudo.astype(jnp.float32)
  human = 1.0 - pseudo
  human_loss = (per_example * human).sum() / jnp.maximum(human.sum(), 1.0)
  pseudo_loss = (per_example * pseudo).sum() / jnp.maximum(pseudo.sum(), 1.0)
  scale = jax.lax.stop_gradient(human_loss / jnp.maximum(pseudo_loss, 1e-12)) if balance else 1.0
  return (human_loss + weight * scale * pseudo_loss) / (1.0 + weight), human_loss, pseudo_loss


class SelfTrainingStudent(finetune.Finetune):
  name = 'self_training'
  config_keys = CONFIG_KEYS
  reads_second_source = True  # the pseudo-labelled rows, by their 'is_pseudo' feature

  @classmethod
  def check_config(cls, config, path):
    super().check_config(config, path)
    objective, pseudo_labels = config.objective, config.data.pseudo_labels
    if not (pseudo_labels.stage or pseudo_labels.path):
      raise ConfigError(
          f'{path}.data.pseudo_labels: the student needs pseudo-labels. Set stage to an '
          'earlier pseudo-label stage of the chain, or path to its folder.')
    rows = config.batch_size * pseudo_labels.fraction
    if abs(rows - round(rows)) > 1e-9:
      raise ConfigError(
          f'{path}.data.pseudo_labels.fraction={pseudo_labels.fraction} of batch_size '
          f'{config.batch_size} is {rows:g} rows: choose a fraction that gives whole rows.')
    if objective.mixup_alpha or objective.cutmix_alpha:
      raise ConfigError(f'{path}.objective.mixup_alpha and cutmix_alpha must be 0 for the '
                        'student: they would mix human- with pseudo-labelled rows.')

  def loss(self, params, batch, rng, train=True):
    objective = self.config.objective
    logits = self.model.apply({'params': params}, normalize_images(batch['image']),
                              train=train, rngs={'dropout': rng})
    if 'is_pseudo' not in batch:  # evaluation batches hold human labels only
      loss = finetune.soft_cross_entropy(logits, self.targets(batch)).mean()
      return loss, {'loss': loss}
    is_pseudo = batch['is_pseudo'] > 0
    targets = jnp.where(is_pseudo[:, None],
                        pseudo_targets(batch['pseudo_ids'], batch['pseudo_probs'],
                                       self.num_classes),
                        self.targets(batch))
    per_example = finetune.soft_cross_entropy(logits, targets)
    loss, human_loss, pseudo_loss = combined_loss(
        per_example, is_pseudo, objective.pseudo_label_weight, objective.balance_pseudo_loss)
    agrees = jnp.argmax(logits, -1) == batch['pseudo_ids'][:, 0]
    pseudo = is_pseudo.astype(jnp.float32)
    return loss, {'loss': loss, 'loss_human': human_loss, 'loss_pseudo': pseudo_loss,
                  'pseudo_fraction': pseudo.mean(),
                  'agrees_with_teacher': (agrees * pseudo).sum() / jnp.maximum(pseudo.sum(), 1)}
