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

COUNT = at_least(1, integer=True)  # a size, a number of steps or of things
NON_NEGATIVE_COUNT = at_least(0, integer=True)
UNIT_FRACTION = within(0, 1, high_open=True)  # a probability or a ratio below 1
OPTIONAL_TEXT, REQUIRED_TEXT = text(), text(or_none=False)

# Keys under data. (also an evaluator's train_data / test_data overrides).
_DATA_COUNTS = ('num_examples', 'image_size', 'max_consecutive_unreadable',
                'labels.max_labels_per_example')
_DATA_NON_NEGATIVE_COUNTS = ('seed', 'randaugment_ops', 'prefetch_buffer_size',
                             'device_prefetch')
_DATA_FLAGS = ('subset.complement', 'decode_at_crop_scale', 'labels.use_caption_words')
_DATA_OPTIONAL_TEXTS = ('path', 'test_path', 'tfds_name', 'tfds_data_dir', 'tfds_label_key',
                        'tfds_caption_key', 'pseudo_labels.stage', 'pseudo_labels.path',
                        'labels.vocabulary', 'text.tokenizer')
_DATA_REQUIRED_TEXTS = ('tfds_train_split', 'tfds_test_split', 'tfds_image_key', 'augment')
_DATA_RULES = {
    **dict.fromkeys(_DATA_COUNTS, COUNT),
    **dict.fromkeys(_DATA_NON_NEGATIVE_COUNTS, NON_NEGATIVE_COUNT),
    **dict.fromkeys(_DATA_FLAGS, BOOLEAN),
    **dict.fromkeys(_DATA_OPTIONAL_TEXTS, OPTIONAL_TEXT),
    **dict.fromkeys(_DATA_REQUIRED_TEXTS, REQUIRED_TEXT),
    'source': one_of(*sources.SOURCE_NAMES),
    'split': one_of(*sources.SPLITS),
    'subset.fraction': within(0, 1, low_open=True),
    'pseudo_labels.fraction': UNIT_FRACTION,
    'source_image_size': at_least(8, integer=True),
    'synthetic_label': one_of(*SYNTHETIC_LABELS),
    'crop_scale': FRACTION_PAIR,
    'randaugment_magnitude': within(0, 10),
    'randaugment_magnitude_std': at_least(0),
    'erasing_prob': within(0, 1),
    'scale_jitter': Rule(lambda v: len(v) == 2 and 0 < v[0] <= v[1],
                         'must be (min, max) with 0 < min <= max'),
    'eval_crop_fraction': within(0, 1, low_open=True),
    'num_threads': at_least(1, integer=True, or_none=True),
    'text.max_length': at_least(2, integer=True),
}

_COUNTS = (
    'total_steps', 'batch_size', 'checkpoint.every_steps', 'checkpoint.keep', 'log.every_steps',
    'objective.decoder_width', 'objective.decoder_depth', 'objective.decoder_heads',
    'objective.embed_dim', 'objective.text_width', 'objective.text_depth',
    'objective.text_heads', 'objective.head_width', 'objective.head_depth',
    'objective.trainable_blocks', 'examples_per_shard', 'labels.top_k',
    # Evaluators (evals.<name>.KEY).
    'evals.*.batch_size', 'evals.*.probe_batch_size', 'evals.*.train_examples',
    'evals.*.test_examples', 'evals.*.num_images', 'evals.*.k', 'evals.*.num_steps',
    'evals.*.num_heads', 'evals.*.num_last_blocks', 'evals.*.seeds')
_FLAGS = ('resume_with_changes', 'model.use_cls_token', 'objective.norm_pix_loss',
          'objective.encoder_on_all_tokens', 'objective.balance_pseudo_loss',
          'checkpoint.async_save', 'evals.*.at_start', 'evals.*.also_ema')
# Names checked against their choices where they are used (validation.py, the objective's
# or evaluator's check_config).
_NAMES = ('model.variant', 'model.remat', 'model.patch_embed_impl', 'objective.name',
          'objective.trainable', 'evals.*.kind')
_OPTIONAL_TEXTS = ('model.attention_impl', 'init_from.stage', 'init_from.checkpoint',
                   'teacher.stage', 'teacher.workdir')
_UNIT_FRACTIONS = ('model.drop_path', 'objective.mask_ratio', 'objective.label_smoothing',
                   'objective.head_dropout', 'optim.b1', 'optim.b2', 'labels.threshold')
_NON_NEGATIVE = ('objective.mixup_alpha', 'objective.cutmix_alpha',
                 'objective.pseudo_label_weight', 'optim.weight_decay', 'evals.*.l2',
                 'evals.*.weight_decay',
                 'optim.lr_per_256')  # 0 trains nothing; below it, the loss would ascend
_POSITIVE = ('objective.temperature_init', 'optim.eps', 'evals.*.temperature',
             'evals.*.learning_rate', 'labels.temperature')

RULES: dict[str, Rule] = {
    **dict.fromkeys(_COUNTS, COUNT),
    **dict.fromkeys(_FLAGS, BOOLEAN),
    **dict.fromkeys(_NAMES, REQUIRED_TEXT),
    **dict.fromkeys(_OPTIONAL_TEXTS, OPTIONAL_TEXT),
    **dict.fromkeys(_UNIT_FRACTIONS, UNIT_FRACTION),
    **dict.fromkeys(_NON_NEGATIVE, at_least(0)),
    **dict.fromkeys(_POSITIVE, above(0)),
    **dict.fromkeys(('mesh.data', 'mesh.fsdp', 'mesh.tensor'), MESH_AXIS),
    'schema_version': COUNT,  # equal to today's: validation.py
    'seed': NON_NEGATIVE_COUNT,
    'model.pool': one_of('cls', 'gap'),
    'model.posemb': one_of('sincos', 'learned'),
    'model.dtype': one_of('float32', 'bfloat16'),
    'model.scan': one_of(True, False, 'auto'),
    'objective.num_classes': at_least(1, integer=True, or_none=True),
    'objective.switch_prob': within(0, 1),
    'optim.name': one_of('adamw'),
    'optim.warmup_steps': NON_NEGATIVE_COUNT,
    'optim.end_lr_fraction': within(0, 1),
    'optim.clip_grad_norm': above(0, or_none=True),
    'optim.skip_nonfinite_updates': NON_NEGATIVE_COUNT,
    'optim.no_weight_decay': texts(),
    'optim.layer_decay': within(0, 1, low_open=True, or_none=True),
    'optim.ema_decay': within(0, 1, high_open=True, or_none=True),
    'sharding_rules': FREE_FORM,
    'init_from.take': texts(),
    'evals.*.every_steps': NON_NEGATIVE_COUNT,
    'evals.*.shots': POSITIVE_INTEGERS,
    'evals.*.class_names': Rule(lambda v: v is None or texts().accepts(v),
                                'must be a tuple of strings (or None: the data\'s names)'),
    'evals.*.prompts': Rule(lambda v: len(v) > 0 and all(isinstance(p, str) and '{}' in p
                                                         for p in v),
                            "must be a non-empty tuple of strings, each with '{}'"),
    # The pseudo-label job (config/defaults.py pseudo_label_config).
    'job': one_of('pseudo_label'),
    'labels.kind': one_of('hard', 'soft'),
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
