"""The values every config key may take: a range or a set of choices, checked before any
compile, one line naming the key; and the legal but suspicious combinations, one warning each.

config/defaults.py gives each key its type (validation.py checks it first); RULES gives
its values. Keys are dotted from a stage (or pseudo-label) config's root; an evaluator's
keys are 'evals.*.KEY', and its `train_data` / `test_data` overrides are checked as
'data.KEY'. tests/test_config.py checks that every key of every objective's, evaluator's
and the pseudo-label job's defaults has a rule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from absl import logging

from big_pretrain.data import sources
from big_pretrain.data.sources.synthetic import SYNTHETIC_LABELS
from big_pretrain.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Rule:
  """`accepts(value)`, and what it accepts in words, for the error."""
  accepts: Callable[[Any], bool]
  allowed: str


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def at_least(low, *, integer: bool = False, or_none: bool = False) -> Rule:
  kind = 'an integer' if integer else 'a number'
  return Rule(lambda v: (or_none and v is None) or (
      (_integer(v) if integer else _number(v)) and v >= low),
              f'must be {kind} >= {low}' + (' (or None)' if or_none else ''))


def above(low, *, or_none: bool = False) -> Rule:
  return Rule(lambda v: (or_none and v is None) or (_number(v) and v > low),
              f'must be a number > {low}' + (' (or None)' if or_none else ''))


def within(low, high, *, low_open=False, high_open=False, or_none=False) -> Rule:
  def accepts(v):
    if or_none and v is None:
      return True
    return (_number(v) and math.isfinite(v) and (low < v if low_open else low <= v)
            and (v < high if high_open else v <= high))
  interval = f'{"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
  return Rule(accepts, f'must lie in {interval}' + (' (or None)' if or_none else ''))


def one_of(*choices) -> Rule:
  return Rule(lambda v: v in choices, f'choose one of {choices}')


def text(*, or_none: bool = True) -> Rule:
  return Rule(lambda v: isinstance(v, str) or (or_none and v is None),
              'must be a string' + (' (or None)' if or_none else ''))


def texts() -> Rule:
  return Rule(lambda v: isinstance(v, (tuple, list)) and all(isinstance(x, str) for x in v),
              'must be a tuple of strings')


BOOLEAN = Rule(lambda v: isinstance(v, bool), 'must be True or False')
MESH_AXIS = Rule(lambda v: _integer(v) and (v == -1 or v >= 1),
                 'must be -1 (all the devices left) or an integer >= 1')
FRACTION_PAIR = Rule(lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
                     'must be (min, max) with 0 < min <= max <= 1')
POSITIVE_INTEGERS = Rule(lambda v: len(v) > 0 and all(_integer(x) and x >= 1 for x in v),
                         'must be a non-empty tuple of integers >= 1')
FREE_FORM = Rule(lambda v: True, 'anything')  # checked where it is used (named groups)

_DATA_RULES = {
    'source': one_of(*sources.SOURCE_NAMES),
    'path': text(), 'test_path': text(),
    'tfds_name': text(), 'tfds_data_dir': text(), 'tfds_train_split': text(or_none=False),
    'tfds_test_split': text(or_none=False), 'tfds_image_key': text(or_none=False),
    'tfds_label_key': text(), 'tfds_caption_key': text(),
    'split': one_of(*sources.SPLITS),
    'subset.fraction': within(0, 1, low_open=True), 'subset.complement': BOOLEAN,
    'pseudo_labels.stage': text(), 'pseudo_labels.path': text(),
    'pseudo_labels.fraction': within(0, 1, high_open=True),
    'num_examples': at_least(1, integer=True),
    'source_image_size': at_least(8, integer=True),
    'synthetic_label': one_of(*SYNTHETIC_LABELS),
    'seed': at_least(0, integer=True),
    'image_size': at_least(1, integer=True),
    'crop_scale': FRACTION_PAIR,
    'augment': text(or_none=False),
    'decode_at_crop_scale': BOOLEAN,
    'randaugment_ops': at_least(0, integer=True),
    'randaugment_magnitude': within(0, 10),
    'randaugment_magnitude_std': at_least(0),
    'erasing_prob': within(0, 1),
    'scale_jitter': Rule(lambda v: len(v) == 2 and 0 < v[0] <= v[1],
                         'must be (min, max) with 0 < min <= max'),
    'eval_crop_fraction': within(0, 1, low_open=True),
    'num_threads': at_least(1, integer=True, or_none=True),
    'max_consecutive_unreadable': at_least(1, integer=True),
    'prefetch_buffer_size': at_least(0, integer=True),
    'device_prefetch': at_least(0, integer=True),
    'labels.vocabulary': text(), 'labels.max_labels_per_example': at_least(1, integer=True),
    'labels.use_caption_words': BOOLEAN,
    'text.tokenizer': text(), 'text.max_length': at_least(2, integer=True),
}

RULES: dict[str, Rule] = {
    'schema_version': at_least(1, integer=True),  # equal to today's: validation.py
    'seed': at_least(0, integer=True),
    'total_steps': at_least(1, integer=True),
    'batch_size': at_least(1, integer=True),
    'resume_with_changes': BOOLEAN,
    'model.variant': text(or_none=False),  # parsed by validation.py
    'model.use_cls_token': BOOLEAN,
    'model.pool': one_of('cls', 'gap'),
    'model.posemb': one_of('sincos', 'learned'),
    'model.dtype': one_of('float32', 'bfloat16'),
    'model.scan': one_of(True, False, 'auto'),
    'model.remat': text(or_none=False),  # a policy name: validation.py
    'model.attention_impl': text(),       # validation.py
    'model.drop_path': within(0, 1, high_open=True),
    'model.patch_embed_impl': text(or_none=False),  # validation.py
    'objective.name': text(or_none=False),
    'objective.mask_ratio': within(0, 1, high_open=True),
    'objective.norm_pix_loss': BOOLEAN, 'objective.encoder_on_all_tokens': BOOLEAN,
    'objective.decoder_width': at_least(1, integer=True),
    'objective.decoder_depth': at_least(1, integer=True),
    'objective.decoder_heads': at_least(1, integer=True),
    'objective.embed_dim': at_least(1, integer=True),
    'objective.text_width': at_least(1, integer=True),
    'objective.text_depth': at_least(1, integer=True),
    'objective.text_heads': at_least(1, integer=True),
    'objective.temperature_init': above(0),
    'objective.head_width': at_least(1, integer=True),
    'objective.head_depth': at_least(1, integer=True),
    'objective.num_classes': at_least(1, integer=True, or_none=True),
    'objective.label_smoothing': within(0, 1, high_open=True),
    'objective.mixup_alpha': at_least(0), 'objective.cutmix_alpha': at_least(0),
    'objective.switch_prob': within(0, 1),
    'objective.trainable': text(or_none=False),  # the objective's check_config
    'objective.trainable_blocks': at_least(1, integer=True),
    'objective.head_dropout': within(0, 1, high_open=True),
    'objective.pseudo_label_weight': at_least(0),
    'objective.balance_pseudo_loss': BOOLEAN,
    'optim.name': one_of('adamw'),
    'optim.lr_per_256': at_least(0),  # 0 trains nothing; below, the loss would ascend
    'optim.b1': within(0, 1, high_open=True), 'optim.b2': within(0, 1, high_open=True),
    'optim.eps': above(0),
    'optim.weight_decay': at_least(0),
    'optim.warmup_steps': at_least(0, integer=True),
    'optim.end_lr_fraction': within(0, 1),
    'optim.clip_grad_norm': above(0, or_none=True),
    'optim.skip_nonfinite_updates': at_least(0, integer=True),
    'optim.no_weight_decay': texts(),
    'optim.layer_decay': within(0, 1, low_open=True, or_none=True),
    'optim.ema_decay': within(0, 1, high_open=True, or_none=True),
    'mesh.data': MESH_AXIS, 'mesh.fsdp': MESH_AXIS, 'mesh.tensor': MESH_AXIS,
    'sharding_rules': FREE_FORM,
    'checkpoint.every_steps': at_least(1, integer=True),
    'checkpoint.keep': at_least(1, integer=True),
    'checkpoint.async_save': BOOLEAN,
    'log.every_steps': at_least(1, integer=True),
    'init_from.stage': text(), 'init_from.checkpoint': text(), 'init_from.take': texts(),
    # Evaluators (evals.<name>.KEY).
    'evals.*.kind': text(or_none=False),
    'evals.*.every_steps': at_least(0, integer=True),
    'evals.*.at_start': BOOLEAN, 'evals.*.also_ema': BOOLEAN,
    'evals.*.batch_size': at_least(1, integer=True),
    'evals.*.probe_batch_size': at_least(1, integer=True),
    'evals.*.train_examples': at_least(1, integer=True),
    'evals.*.test_examples': at_least(1, integer=True),
    'evals.*.num_images': at_least(1, integer=True),
    'evals.*.k': at_least(1, integer=True),
    'evals.*.temperature': above(0),
    'evals.*.l2': at_least(0),
    'evals.*.num_steps': at_least(1, integer=True),
    'evals.*.learning_rate': above(0),
    'evals.*.weight_decay': at_least(0),
    'evals.*.num_heads': at_least(1, integer=True),
    'evals.*.num_last_blocks': at_least(1, integer=True),
    'evals.*.seeds': at_least(1, integer=True),
    'evals.*.shots': POSITIVE_INTEGERS,
    'evals.*.class_names': Rule(lambda v: v is None or texts().accepts(v),
                                'must be a tuple of strings (or None: the data\'s names)'),
    'evals.*.prompts': Rule(lambda v: len(v) > 0 and all(isinstance(p, str) and '{}' in p
                                                         for p in v),
                            "must be a non-empty tuple of strings, each with '{}'"),
    # The pseudo-label job (config/defaults.py pseudo_label_config).
    'job': one_of('pseudo_label'),
    'teacher.stage': text(), 'teacher.workdir': text(),
    'labels.kind': one_of('hard', 'soft'),
    'labels.threshold': within(0, 1, high_open=True),
    'labels.top_k': at_least(1, integer=True),
    'labels.temperature': above(0),
    'examples_per_shard': at_least(1, integer=True),
    **{f'data.{key}': rule for key, rule in _DATA_RULES.items()},
}


def rule_for(dotted: str) -> Rule | None:
  """The rule of a key dotted from a stage config's root (None: no rule)."""
  parts = dotted.split('.')
  if parts[0] == 'evals' and len(parts) > 2:
    if parts[2] in ('train_data', 'test_data'):
      return RULES.get('.'.join(['data', *parts[3:]]))
    return RULES.get('.'.join(['evals', '*', *parts[2:]]))
  return RULES.get(dotted)


def leaf_keys(config, prefix: str = '') -> dict[str, Any]:
  """Dotted key -> value of every leaf of `config` (free-form groups are leaves)."""
  leaves = {}
  for key, value in config.items():
    dotted = f'{prefix}{key}'
    if hasattr(value, 'items') and rule_for(dotted) is not FREE_FORM:
      leaves.update(leaf_keys(value, f'{dotted}.'))
    else:
      leaves[dotted] = value
  return leaves


def check_values(config, path: str) -> None:
  """Raises ConfigError naming the first key whose value its rule refuses."""
  for dotted, value in leaf_keys(config).items():
    rule = rule_for(dotted)
    if rule is not None and not _accepts(rule, value):
      raise ConfigError(f'{path}.{dotted}={value!r}: {rule.allowed}.')


def _accepts(rule: Rule, value) -> bool:
  try:
    return bool(rule.accepts(value))
  except (TypeError, ValueError):  # e.g. a number where a pair belongs
    return False


def warn_if_suspicious(config, path: str) -> None:
  """One warning line for each legal but suspicious combination of a stage's values."""
  total = config.total_steps
  warnings = []
  if config.optim.warmup_steps >= total:
    warnings.append(f'{path}.optim.warmup_steps={config.optim.warmup_steps} is not below '
                    f'total_steps={total}: the learning rate never reaches its peak.')
  for key in ('log.every_steps', 'checkpoint.every_steps'):
    group, name = key.split('.')
    if config[group][name] > total:
      warnings.append(f'{path}.{key}={config[group][name]} is above total_steps={total}: '
                      'only the final step does it.')
  for name, evaluator in config.evals.items():
    if evaluator.get('every_steps', 0) > total:
      warnings.append(f'{path}.evals.{name}.every_steps={evaluator.every_steps} is above '
                      f'total_steps={total}: it runs at the final step only.')
  if config.optim.lr_per_256 * config.batch_size / 256 > 0.1:
    warnings.append(f'{path}.optim.lr_per_256={config.optim.lr_per_256} at batch '
                    f'{config.batch_size} is a peak learning rate above 0.1: AdamW usually '
                    'diverges there.')
  for warning in warnings:
    logging.warning('%s', warning)
