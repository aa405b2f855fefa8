"""The train state, created already sharded, and the one jitted train step.

Nothing here knows which objective it trains: the objective supplies
`init_params` and `loss`; the step differentiates, clips, updates.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from big_pretrain import sharding as sharding_lib
from big_pretrain.train import optim


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class ShardedTrainer:
  """Everything the loop needs to create, restore and step a sharded state."""
  mesh: Mesh
  rules: tuple
  abstract_state: TrainState      # ShapeDtypeStructs carrying their shardings.
  state_shardings: TrainState     # NamedSharding per leaf.
  init_state: Callable[[jax.Array], TrainState]
  jitted_step: Any                # the jax.jit of the step, for lowering and compiling
  # The step compiled ahead of time for the loop's batches (remat 'auto' compiles
  # it to measure it), or None: jit compiles on the first call. jit does not see
  # an ahead-of-time compilation, so without this the step would compile twice.
  compiled_step: Any = None

  def train_step(self, state: TrainState, batch: dict,
                 base_rng: jax.Array) -> tuple[TrainState, dict]:
    """One step (donates `state`): the ahead-of-time compiled step if any, else jit's."""
    step = self.jitted_step if self.compiled_step is None else self.compiled_step
    with sharding_lib.activate(self.mesh, self.rules):
      return step(state, batch, base_rng)

  def lower_step(self, batch_shapes: dict[str, jax.ShapeDtypeStruct]):
    """The step traced and lowered for `batch_shapes` (global shapes), not yet compiled:
    its cost_analysis() counts the program as written, before XLA optimizes it."""
    batch = {name: jax.ShapeDtypeStruct(shape.shape, shape.dtype,
                                        sharding=sharding_lib.batch_sharding(self.mesh))
             for name, shape in batch_shapes.items()}
    rng = _abstract_key()
    with sharding_lib.activate(self.mesh, self.rules):
      return self.jitted_step.lower(self.abstract_state, batch, rng)

  def compile_step(self, batch_shapes: dict[str, jax.ShapeDtypeStruct]):
    """The step compiled for `batch_shapes` (global shapes): memory_analysis(), as_text()."""
    lowered = self.lower_step(batch_shapes)
    with sharding_lib.activate(self.mesh, self.rules):
      return lowered.compile()

  def with_compiled_step(self, compiled) -> ShardedTrainer:
    """This trainer, its train_step running `compiled` (from compile_step) from now on.

    Batches must then have exactly the compiled shapes, dtypes and shardings;
    a batch that differs is an error, not a silent recompilation.
    """
    return dataclasses.replace(self, compiled_step=compiled)


def build_trainer(objective, tx: optax.GradientTransformation, schedule: optax.Schedule,
                  mesh: Mesh, rules) -> ShardedTrainer:
  """eval_shape(init) -> logical specs -> shardings -> jit(init, out_shardings).

  Parameters the objective does not train (`objective.is_trainable`) are held
  out of the loss's gradient (XLA then skips their backward) and of `tx`.
  """
  rng = _abstract_key()
  with sharding_lib.activate(mesh, rules):
    boxed_params = jax.eval_shape(objective.init_params, rng)
  trainable = _trainable_mask(objective, nn.meta.unbox(boxed_params))
  if trainable is not None:
    tx = optim.frozen_where_untrainable(tx, objective.is_trainable)

  def init_boxed(rng):
    params = objective.init_params(rng)
    # Optimizer moments mirror the boxed parameters, so they inherit their axes.
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  with sharding_lib.activate(mesh, rules):
    boxed_shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=boxed_params,
                              opt_state=jax.eval_shape(tx.init, boxed_params))
  abstract_state, state_shardings = _sharded_abstract(boxed_shapes, mesh, rules)

  init_fn = jax.jit(lambda rng: nn.meta.unbox(init_boxed(rng)), out_shardings=state_shardings)

  def init_state(rng):
    with sharding_lib.activate(mesh, rules):
      return init_fn(rng)

  def step_fn(state: TrainState, batch: dict, base_rng: jax.Array):
    # Per-step rng from the step number: nothing to save, resume is exact.
    rng = jax.random.fold_in(base_rng, state.step)
    grad_fn = jax.value_and_grad(
        lambda params, *args: objective.loss(_hold_out_frozen(params, trainable), *args),
        has_aux=True)
    (loss, metrics), grads = grad_fn(state.params, batch, rng, True)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   learning_rate=schedule(state.step))
    skipping = optim.find_state(opt_state, optax.ApplyIfFiniteState)
    if skipping is not None:  # config.optim.skip_nonfinite_updates
      metrics.update(nonfinite_updates_in_a_row=skipping.notfinite_count,
                     nonfinite_updates_skipped=skipping.total_notfinite)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  replicated = sharding_lib.replicated(mesh)
  jitted_step = jax.jit(
      step_fn,
      in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh), replicated),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,))

  return ShardedTrainer(mesh, rules, abstract_state, state_shardings, init_state, jitted_step)


def abstract_params(objective, mesh: Mesh, rules):
  """The objective's parameters as ShapeDtypeStructs carrying the shardings the train state
  gives them, without allocating anything: what a checkpoint's parameters restore into
  (a pseudo-label teacher's, say)."""
  rng = _abstract_key()
  with sharding_lib.activate(mesh, rules):
    boxed_params = jax.eval_shape(objective.init_params, rng)
  return _sharded_abstract(boxed_params, mesh, rules)[0]


def _abstract_key() -> jax.ShapeDtypeStruct:
  """The shape and dtype of an rng key, to trace with: no device work, so it serves a mesh
  of a topology's devices too (which run nothing, and on which an eager op fails)."""
  return jax.eval_shape(lambda: jax.random.key(0))


def _sharded_abstract(boxed_tree, mesh: Mesh, rules):
  """(ShapeDtypeStructs carrying their shardings, the NamedShardings) of an abstract tree
  whose leaves are boxed with their logical axes."""
  with sharding_lib.activate(mesh, rules):
    shardings = sharding_lib.logical_to_shardings(_logical_specs(boxed_tree), mesh, rules)
  abstract = jax.tree_util.tree_map(
      lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
      nn.meta.unbox(boxed_tree), shardings)
  return abstract, shardings


def _logical_specs(boxed_tree):
  """nn.get_partition_spec, but a frozen parameter's absent optimizer moment (optax's
  MaskedNode, boxed with the parameter's axes) stays absent instead of getting a spec."""

  def spec(leaf):
    if isinstance(getattr(leaf, 'value', None), optax.MaskedNode):
      return optax.MaskedNode()
    return nn.get_partition_spec(leaf)

  return jax.tree_util.tree_map(spec, boxed_tree,
                                is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _trainable_mask(objective, shapes):
  """{path: bool} pytree of the objective's parameters (`shapes`), or None when all train."""
  mask = jax.tree_util.tree_map_with_path(
      lambda path, _: objective.is_trainable(optim.param_path(path)), shapes)
  return None if all(jax.tree_util.tree_leaves(mask)) else mask


def _hold_out_frozen(params, trainable):
  """params with the frozen leaves behind stop_gradient: no gradient is computed for them."""
  if trainable is None:
    return params
  return jax.tree_util.tree_map(
      lambda p, train: p if train else jax.lax.stop_gradient(p), params, trainable)
