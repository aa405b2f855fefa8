"""What an evaluator is: built from its config, run on the current parameters."""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable

import jax
import ml_collections
import numpy as np

from big_pretrain import schema
from big_pretrain import sharding as sharding_lib
from big_pretrain.evaluators.eval_split import (extract_outputs, round_up, split_data_config,
                                                warn_about_missing_classes)
from big_pretrain.objectives import objectives_offering
from big_pretrain.objectives.objective import Capability


@dataclasses.dataclass
class EvalResult:
  scalars: dict[str, float] = dataclasses.field(default_factory=dict)
  images: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # (H, W, 3) in [0, 1]


def split_overrides(split: str, which: str) -> schema.FreeForm:
  """A `*_data` key: overrides of config.data keys for a split an evaluator reads."""
  return schema.FreeForm(f'config.data keys overridden for the {which} split (e.g. '
                         f'{split}_data.test_path)', default=(('split', split),))


def evaluator_keys(kind: str, meaning: str, **declared) -> schema.Group:
  """An evaluator's keys: its `kind`, when it runs, and `declared`."""
  return schema.Group(
      meaning,
      kind=schema.Key(kind, schema.REQUIRED_TEXT, 'the evaluator'),
      every_steps=schema.Key(0, schema.NON_NEGATIVE_COUNT,
                             'run every this many steps; 0: only at the final step'),
      **declared)


def held_out_keys(kind: str, meaning: str, *, test_examples: int, **declared) -> schema.Group:
  """The keys of an evaluator that scores the first `test_examples` held-out images."""
  return evaluator_keys(
      kind, meaning,
      test_examples=schema.Key(test_examples, schema.COUNT,
                               'at most this many images of the held-out split'),
      batch_size=schema.Key(256, schema.COUNT,
                            'the global batch; rounded up to a multiple of the batch shards'),
      test_data=split_overrides('test', 'held-out'),
      **declared)


class Evaluator(abc.ABC):
  """The contract of an evaluator (register a subclass in evaluators/__init__.py).

  A subclass defines:
    config_keys: a schema.Group declaring every key it reads, with its default, rule and
      meaning (`evaluator_keys` / `held_out_keys` give the shared ones), among them
      `kind` (its registry name) and `every_steps` (0: only at a stage's final step).
      Keys named `*_data` override config.data for a split it reads (`split_outputs`).
      The loop also reads two optional keys: `at_start` (score the stage's starting
      parameters too) and `also_ema` (score the moving average too, as ema_<key>).
    needs (optional): the objective capability (objectives/objective.py, CAPABILITIES)
      whose methods it scores, e.g. CLASSIFIES for 'classification'; config validation
      refuses it beside an objective that does not offer it (`capability_refusal`).
    check_config(eval_config, path) (class method, optional): the checks across its keys
      (defaults filled in; a single key's range is its rule's), raising ConfigError that
      names `path.key`. Run before any compute by config validation.
    run(params, step) -> EvalResult: scores `params` (sharded as in the train state)
      at `step`: `scalars` are logged as eval/<name>/<key> and recorded in the stage's
      folder, `images` are written as image summaries.
    device_programs() (optional): the programs `run` compiles (`jit`), each with the
      shapes of its inputs after the parameters, so a run can be compiled for a TPU
      slice without data (main.py --compile_for).
  and may extend the constructor with checks that need the objective or the trainer
  (raise ValueError naming `self.culprit(key)`).

  The loop builds each evaluator once per stage, as
  `cls(name, eval_config, stage_config, objective, trainer, workdir)`, and calls
  `due(step, final)` then `run` on every process alike. `run` is collective: every
  process must make the same device calls in the same order and return the same
  result, or one waits forever for the others. The helpers here keep it so: read data
  only with `split_outputs` (each process reads its share of the same batches, and
  the outputs are gathered on all of them), and compile device code only with `jit`.
  Host-side work on the gathered numpy arrays (fitting a probe, ranking) is then the
  same on every process. Write files on process 0 only.
  """

  def __init__(self, name, eval_config, stage_config, objective, trainer, workdir):
    self.name = name
    self.eval_config = eval_config
    self.stage_config = stage_config
    self.objective = objective
    self.trainer = trainer
    self.workdir = workdir
    self._jitted: dict[str, Callable] = {}
    refusal = capability_refusal(type(self), type(objective))
    if refusal:  # validation refuses it first; an evaluator built by hand is refused here
      raise ValueError(f'{self.culprit()}: {refusal}')

  config_keys: schema.Group = schema.Group()
  needs: Capability | None = None

  @classmethod
  def check_config(cls, eval_config, path: str) -> None:
    """Evaluator-specific checks across keys, run before any compute (raise ConfigError).

    `eval_config` holds every key (defaults filled in); `path` names it in errors
    ('config.stages.mae.evals.low_shot'). Nothing to check by default.
    """

  @property
  def every_steps(self) -> int:
    return self.eval_config.every_steps

  def due(self, step: int, final: bool) -> bool:
    return final or (self.every_steps > 0 and step % self.every_steps == 0)

  @abc.abstractmethod
  def run(self, params, step: int) -> EvalResult:
    """Evaluates `params` (sharded, as in the train state); collective (see the class doc)."""

  def device_programs(self) -> dict[str, tuple[Callable, tuple]]:
    """{key: (function(params, *inputs), the inputs' global ShapeDtypeStructs)} of the
    programs `run` jits under `key`: what a compile check compiles (see `lower_programs`).
    None by default."""
    return {}

  def lower_programs(self, abstract_params) -> dict:
    """`device_programs` lowered for `abstract_params` (ShapeDtypeStructs with the train
    state's shardings) on the trainer's mesh, as `jit` would compile them; nothing runs."""
    mesh, rules = self.trainer.mesh, self.trainer.rules
    lowered = {}
    for key, (function, inputs) in self.device_programs().items():
      jitted = jax.jit(function, out_shardings=sharding_lib.batch_sharding(mesh))
      with sharding_lib.activate(mesh, rules):
        lowered[key] = jitted.lower(abstract_params, *inputs)
    return lowered

  def batch_of(self, row_shape: tuple[int, ...], dtype, batch_size: int | None = None):
    """The global shape of an input batch of rows of `row_shape`, as `split_outputs` reads
    it: `batch_size` (default: the config's) rounded up to the batch shards."""
    shards = sharding_lib.num_batch_shards(self.trainer.mesh)
    rows = round_up(batch_size or self.eval_config.batch_size, shards)
    return jax.ShapeDtypeStruct((rows, *row_shape), dtype,
                                sharding=sharding_lib.batch_sharding(self.trainer.mesh))

  def image_batch(self, batch_size: int | None = None):
    """The global shape of a batch of uint8 images at the stage's image size."""
    size = self.stage_config.data.image_size
    return self.batch_of((size, size, 3), np.uint8, batch_size)

  def culprit(self, key: str | None = None) -> str:
    """'config.evals.<name>[.<key>]': how errors and logs name this evaluator's config."""
    return f'config.evals.{self.name}' + (f'.{key}' if key else '')

  def jit(self, key: str, function: Callable) -> Callable:
    """`function(params, ...)` jitted once for this evaluator, kept under `key`.

    Every run reuses the compiled program. Its outputs are batch-sharded over the
    trainer's mesh (each has a leading batch axis), and it is traced and run under
    the trainer's mesh and logical-axis rules.
    """
    if key not in self._jitted:
      mesh, rules = self.trainer.mesh, self.trainer.rules
      jitted = jax.jit(function, out_shardings=sharding_lib.batch_sharding(mesh))

      def on_mesh(*args):
        with sharding_lib.activate(mesh, rules):
          return jitted(*args)
      self._jitted[key] = on_mesh
    return self._jitted[key]

  def split_config(self, data_key: str, num_examples: int) -> ml_collections.ConfigDict:
    """config.data with this evaluator's `data_key` overrides ('test_data') applied."""
    return split_data_config(self.stage_config.data, self.eval_config[data_key],
                             num_examples=num_examples, culprit=self.culprit(data_key))

  def split_outputs(self, function, params, *, data_key: str, num_examples: int,
                    batch_size: int | None = None, check_classes: bool = False):
    """`function(params, batch)` on the first `num_examples` examples of a split.

    The one way an evaluator reads data (eval_split.extract_outputs): the split
    `split_config(data_key)` gives, in its fixed order, each example once, in global
    batches of `batch_size` (default: the config's `batch_size`). `check_classes`:
    log when the examples read miss some of the split's classes (a class accuracy
    then measures only those).

    Returns:
      (outputs: `function`'s pytree of (N, ...) numpy arrays, labels (N,) int32,
      class_names of the split), identical on every process.
    """
    data_config = self.split_config(data_key, num_examples)
    outputs, labels, class_names = extract_outputs(
        function, params, data_config, num_examples=num_examples,
        batch_size=batch_size or self.eval_config.batch_size, mesh=self.trainer.mesh,
        rules=self.trainer.rules, culprit=self.culprit(data_key))
    if check_classes:
      warn_about_missing_classes(labels, class_names, data_config.split, self.culprit(data_key))
    return outputs, labels, class_names


def capability_refusal(evaluator_class, objective_class) -> str | None:
  """Why an evaluator cannot score a stage of `objective_class` (the capability it needs,
  which the objective does not offer, and who offers it), or None when it can."""
  needs = evaluator_class.needs
  if needs is None or needs in objective_class.offers:
    return None
  kind = evaluator_class.config_keys['kind'].default
  return (f'kind={kind!r} needs an objective that {needs.name.replace("_", " ")} '
          f'({", ".join(needs.methods)}), which objective {objective_class.name!r} does not '
          f'offer: use it with objective {" or ".join(map(repr, objectives_offering(needs)))}, '
          'or remove this evaluator.')

