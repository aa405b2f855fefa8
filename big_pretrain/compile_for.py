"""main.py --compile_for=SLICE: every stage of a run compiled for a Cloud TPU slice on this
machine, and whether it fits the slice's chips, before anyone books one.

For each training stage of the config, as train_stage would build it but with nothing
allocated: the state's and the batches' shapes, the mesh over the slice's chips (the
topology's devices, from the libtpu wheel: tpu_slices.py), the train step compiled by the
TPU compiler with model.remat='auto' (and scan='auto') chosen against the chip's HBM by the
same code as on a real TPU (train/remat_choice.py), and the evaluators' device programs.
Then one table: the model, its parameters, the global batch, the mesh, the remat and layout
chosen, each chip's HBM (arguments, temporaries, the compiler's peak and the sum of every
buffer) against its capacity, the analytic model FLOPs beside the lowered program's
(program_flops.py: its loops multiplied out), a lower bound on the step's time read from the
compiled program (train/roofline.py) with the MFU it allows and the term it is made of, the
compile time. Over several slices, the mesh of one slice and the axis that joins them, with
the bytes each chip sends across per step. The same goes to WORKDIR/compile_for/<slice>.json,
unless WORKDIR holds a run: nothing of a run changes.

What the data would decide (a label vocabulary's size, a tokenizer's, the classes of a
fine-tuning set, a teacher's pseudo-labels) is taken from the config's own files where
they can be read here, and otherwise from a stand-in of a typical size that the report
names: nothing is read from the datasets themselves.

A stage that does not fit is tried with the cheapest changes, each compiled to be sure:
more FSDP sharding (data parallel devices moved to the fsdp axis), then a smaller global
batch; one compile per change, none for a change the state's size and the last refusal
already rule out (_cheapest_fix). `check` raises DoesNotFitError, one line naming the first
stage that does not fit, what it needs per chip against what the chip has, and the change
that fits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time

from absl import logging
import jax
from jax.experimental.compilation_cache import compilation_cache

from big_pretrain import accelerators
from big_pretrain import sharding as sharding_lib
from big_pretrain import tpu_slices
from big_pretrain.config.validation import check_fits_devices
from big_pretrain.data import records
from big_pretrain.data import sources
from big_pretrain.data.batch_features import global_batch_shapes
from big_pretrain.data.text import labels as labels_lib
from big_pretrain.data.text import tokenizer as tokenizer_lib
from big_pretrain.errors import ConfigError, UserFacingError
from big_pretrain.evaluators import build_evaluators
from big_pretrain.models.vit import SCAN_AUTO
from big_pretrain.objectives import objective_class
from big_pretrain.stages import jobs
from big_pretrain.stages.chain_validation import validate_stage
from big_pretrain.storage import files as storage
from big_pretrain.train import mfu as mfu_lib
from big_pretrain.train.optim import make_optimizer, make_schedule
from big_pretrain.train import roofline as roofline_lib
from big_pretrain.train.program_flops import program_flops
from big_pretrain.train.remat_choice import (MEMORY_FRACTION, STATE_ALONE, DoesNotFit,
                                             build_with_remat_choice, compile_or_refusal,
                                             state_bytes_per_device,
                                             step_bytes_per_device, summed_step_bytes)

GIB = 2 ** 30
# Stand-ins for what the data decides, where the config's files cannot be read here.
STAND_IN_LABELS = 27_000       # a hashtag vocabulary of WSP's scale (SWAG / MAWS: ~27k)
STAND_IN_TOKENS = 32_000       # a SentencePiece vocabulary of the usual size
STAND_IN_CLASSES = 1_000       # ImageNet-1k, what fine-tuning is measured on
REPORT_FOLDER = 'compile_for'


class DoesNotFitError(UserFacingError):
  """A stage's train step does not fit the chips of the slice it was compiled for."""


@dataclasses.dataclass
class StageReport:
  """One stage compiled for the slice (bytes are per chip)."""
  stage: str
  kind: str                          # the objective, or the job
  variant: str = ''
  parameters: int = 0
  batch_size: int = 0
  mesh: dict = dataclasses.field(default_factory=dict)  # the whole mesh, over every slice
  num_slices: int = 1
  cross_slice_axes: list = dataclasses.field(default_factory=list)  # axes joining slices
  remat: str = ''
  layout: str = ''                   # 'scanned' or 'unrolled'
  argument_bytes: int | None = None  # None: not compiled (it did not fit)
  temporary_bytes: int | None = None
  peak_bytes: int | None = None      # the compiler's peak (remat_choice.step_bytes_per_device)
  summed_bytes: int | None = None    # every buffer as if live at once (summed_step_bytes)
  capacity_bytes: int = 0
  fits: bool = False                 # the compiler accepted it, peak <= MEMORY_FRACTION of HBM
  refusals: dict = dataclasses.field(default_factory=dict)  # remat policy -> bytes or None
  analytic_flops: float = 0.0        # model FLOPs per step (train/mfu.py)
  program_flops: float = 0.0         # matmul FLOPs of the lowered step, loops multiplied out
  # The roofline of the compiled program (train/roofline.py), per chip and step: a bound.
  step_seconds_at_least: float | None = None
  mfu_at_most: float | None = None
  bound_by: str = ''                 # 'compute', 'HBM', 'ICI' or 'DCN'
  roofline: dict = dataclasses.field(default_factory=dict)  # its terms, bytes and FLOPs
  costliest_ops: list = dataclasses.field(default_factory=list)
  compile_seconds: float = 0.0
  evaluators: dict = dataclasses.field(default_factory=dict)  # program -> peak bytes
  stand_ins: list = dataclasses.field(default_factory=list)
  note: str = ''
  fix: str = ''                      # a change that fits, compiled, when the stage does not


def stage_configs(config) -> dict:
  return {'main': config} if 'stages' not in config else dict(config.stages.items())


def check(config, tpu_slice: tpu_slices.TpuSlice, workdir: str) -> list[StageReport]:
  """Compiles every stage of `config` for `tpu_slice`; prints and records the table; raises
  DoesNotFitError (one line) when a stage does not fit. See the module doc."""
  check_report_folder(workdir)
  devices = tpu_slices.topology_devices(tpu_slice)
  reports = []
  with persistent_cache_off(), tempfile.TemporaryDirectory(
      prefix='big_pretrain_stand_ins_') as stand_in_dir:
    for name, stage in stage_configs(config).items():
      path = f'config.stages.{name}' if 'stages' in config else 'config'
      logging.info('Compiling stage %r for %s.', name, tpu_slice.describe())
      reports.append(check_stage(name, stage, path, tpu_slice, devices, stand_in_dir))
  print(format_table(reports, tpu_slice))
  _write_report(reports, tpu_slice, workdir)
  for report in reports:
    if not report.fits and report.note == '':
      raise DoesNotFitError(_does_not_fit_line(report, tpu_slice))
  return reports


@contextlib.contextmanager
def persistent_cache_off():
  """JAX's persistent compilation cache, off for what is compiled inside: a program compiled
  for a topology cannot be loaded back from it (that needs a TPU client). JAX decides once
  per process whether it uses the cache, so the decision is reset on the way in and out."""
  was_on = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update('jax_enable_compilation_cache', was_on)
    compilation_cache.reset_cache()


def check_stage(name: str, stage_config, path: str, tpu_slice, devices, stand_in_dir: str, *,
                find_fix: bool = True, with_evaluators: bool = True) -> StageReport:
  """One stage compiled for the slice (a job is reported, not compiled); if it does not
  fit and `find_fix`, the cheapest change that does."""
  if jobs.is_job(stage_config):
    return StageReport(name, stage_config.job, note='a job: nothing of it is compiled here')
  config, stand_ins = with_stand_ins(stage_config, stand_in_dir)
  validate_stage(config, path)
  check_fits_devices(config, len(devices), tpu_slice.hosts, tpu_slice.num_slices)
  report = _compile(name, config, tpu_slice, devices, with_evaluators=with_evaluators)
  report.stand_ins = stand_ins
  if not report.fits and find_fix:
    report.fix = _cheapest_fix(name, config, path, tpu_slice, devices)
  return report


def _compile(name: str, config, tpu_slice, devices, with_evaluators: bool = True,
             may_unroll: bool = True) -> StageReport:
  started = time.perf_counter()
  mesh, rules, batch_shapes, built = _build(config, devices, may_unroll)
  config, trainer = built.config, built.trainer
  if trainer.compiled_step is not None:
    compiled = trainer.compiled_step
  elif not built.fits:  # nothing compiled fits: the state alone overflows, or every policy
    measured = [value for value in built.step_bytes.values() if value]
    compiled = DoesNotFit(min(measured, default=None), built.memory_limit,  # the least need
                          'no remat policy fits')
  else:
    compiled = compile_or_refusal(trainer, batch_shapes)
  capacity = built.memory_limit or accelerators.hbm_per_device(devices[0].device_kind)
  report = StageReport(
      name, config.objective.name, config.model.variant,
      parameters=sum(leaf.size for leaf in jax.tree_util.tree_leaves(
          trainer.abstract_state.params)),
      batch_size=config.batch_size, mesh=dict(mesh.shape), num_slices=tpu_slice.num_slices,
      cross_slice_axes=list(sharding_lib.cross_slice_axes(mesh)), remat=config.model.remat,
      layout='scanned' if config.model.scan else 'unrolled', capacity_bytes=capacity,
      analytic_flops=mfu_lib.model_flops_per_step(config))
  if isinstance(compiled, DoesNotFit):  # an honest row: what was measured, nothing invented
    report.refusals = dict(built.step_bytes) or {report.remat: compiled.needed}
    report.remat = 'none fits'
    report.peak_bytes = compiled.needed
    report.compile_seconds = time.perf_counter() - started
    return report
  memory = compiled.memory_analysis()
  report.argument_bytes = memory.argument_size_in_bytes
  report.temporary_bytes = memory.temp_size_in_bytes
  report.peak_bytes = step_bytes_per_device(compiled)
  report.summed_bytes = summed_step_bytes(compiled)
  report.fits = report.peak_bytes <= MEMORY_FRACTION * capacity  # and the compiler took it
  counted = program_flops(trainer.lower_step(batch_shapes).as_text())
  report.program_flops = counted.flops
  _add_roofline(report, compiled, devices[0], config.model.dtype, mesh.size)
  if with_evaluators:
    evaluators = build_evaluators(config, built.objective, trainer, workdir=None)
    for evaluator in evaluators:
      for program, lowered in evaluator.lower_programs(trainer.abstract_state.params).items():
        with sharding_lib.activate(mesh, rules):
          compiled_program = lowered.compile()
        report.evaluators[f'{evaluator.name}/{program}'] = step_bytes_per_device(
            compiled_program)
  report.compile_seconds = time.perf_counter() - started
  return report


def _add_roofline(report: StageReport, compiled, device, dtype: str, num_devices: int) -> None:
  """The step's lower bound from the compiled program (train/roofline.py), on the chip's
  peak and bandwidths (accelerators.ACCELERATORS)."""
  accelerator = accelerators.of_device_kind(device.device_kind)
  peak = mfu_lib.peak_flops_per_device(device, dtype)
  if accelerator is None or not accelerator.hbm_bandwidth or not peak:
    return
  chip = roofline_lib.Chip.of(accelerator, peak)
  started = time.perf_counter()
  bound = roofline_lib.roofline(compiled.as_text(), chip, report.num_slices)
  logging.info('%s: the roofline of the compiled step read in %.1f s.', report.stage,
               time.perf_counter() - started)
  report.step_seconds_at_least = bound.seconds(chip)
  if report.step_seconds_at_least > 0:
    report.mfu_at_most = mfu_lib.mfu(report.analytic_flops, report.step_seconds_at_least,
                                     num_devices, peak)
  report.bound_by = bound.dominant(chip)
  report.roofline = {
      'flops_per_chip': bound.flops, 'hbm_bytes_per_chip': bound.hbm_bytes,
      'async_hbm_bytes_per_chip': bound.async_bytes, 'ici_bytes_per_chip': bound.ici_bytes,
      'dcn_bytes_per_chip': bound.dcn_bytes,
      'dcn_bytes_per_slice': bound.dcn_bytes * num_devices // report.num_slices,
      'seconds_by_term': bound.term_seconds(chip),
      'loops_counted_exactly': bound.exact,
      'chip': dataclasses.asdict(chip)}
  report.costliest_ops = [op.to_json() for op in bound.top(5)]


def _cheapest_fix(name: str, config, path: str, tpu_slice, devices) -> str:
  """The first change that fits, compiled, as command-line overrides: remat 'auto' (if the
  config fixed a policy); more FSDP (data parallel devices moved to the fsdp axis, doubling,
  up to one slice); then, with the most FSDP, half the global batch, and half again.

  Each try compiles once, with remat 'full', the policy that needs the least memory: if it
  does not fit, none does (the run's remat 'auto' then takes the least recompute that fits).
  A try that what is known already rules out is not compiled: its parameters and optimizer
  state are counted from their shardings, and the last refusal's need less its state is
  what the activations took then, which more FSDP leaves as it is (the batch per chip stays)
  and a halved batch halves."""
  per_slice = len(devices) // tpu_slice.num_slices
  fsdp = config.mesh.fsdp if config.mesh.fsdp != -1 else 1
  tensor = config.mesh.tensor if config.mesh.tensor != -1 else 1
  tries = [{'model.remat': 'auto'}] if config.model.remat != 'auto' else []
  while fsdp * 2 * tensor <= per_slice:
    fsdp *= 2
    tries.append({'model.remat': 'auto', 'mesh.data': -1, 'mesh.fsdp': fsdp})
  most_fsdp = dict(tries[-1]) if tries else {'model.remat': 'auto'}
  batch = config.batch_size
  while batch % 2 == 0 and batch // 2 >= len(devices):
    batch //= 2
    tries.append({**most_fsdp, 'batch_size': batch})
  capacity = accelerators.hbm_per_device(devices[0].device_kind) or 0
  budget = MEMORY_FRACTION * capacity
  last = None  # (activation bytes the last refusal implies, its global batch)
  for overrides in tries:
    candidate = config.copy_and_resolve_references()
    for dotted, value in overrides.items():
      group, _, key = dotted.rpartition('.')
      (candidate[group] if group else candidate)[key] = value
    try:
      check_fits_devices(candidate, len(devices), tpu_slice.hosts, tpu_slice.num_slices)
    except ConfigError:
      continue
    changed = {key: value for key, value in overrides.items()
               if value != _value_at(config, key)}
    state = _state_bytes(candidate, devices)
    activations = 0 if last is None else last[0] * candidate.batch_size / last[1]
    if capacity and state + activations > budget:
      logging.info('Stage %r does not fit: %s is ruled out without compiling (state %s + '
                   'activations at least %s per chip).', name, changed, describe_bytes(state),
                   describe_bytes(int(activations)))
      continue
    logging.info('Stage %r does not fit: trying %s (compiled with remat full).', name, changed)
    trial = candidate.copy_and_resolve_references()
    trial.model.remat = 'full'
    report = _compile(name, trial, tpu_slice, devices, with_evaluators=False, may_unroll=False)
    if report.fits:
      flags = ' '.join(f'--{path}.{key}={value}' for key, value in changed.items())
      return (f'{flags} fits (compiled with remat \'full\': {describe_bytes(report.peak_bytes)} '
              f'of {describe_bytes(report.capacity_bytes)} per chip)')
    if report.peak_bytes:
      last = (max(report.peak_bytes - state, 0), candidate.batch_size)
  return ''


def _build(config, devices, may_unroll: bool = False):
  """(mesh, logical-axis rules, global batch shapes, remat_choice.RematChoice) of a stage
  as train_stage would build it over `devices`: remat chosen (compiled) if 'auto', else
  nothing compiled."""
  layout_asked_auto = config.model.scan == SCAN_AUTO and may_unroll
  config = objective_class(config.objective.name).resolve_config(config)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  rules = sharding_lib.logical_axis_rules(config)
  schedule = make_schedule(config.optim, config.batch_size, config.total_steps)
  batch_shapes = global_batch_shapes(config.data, config.batch_size)
  built = build_with_remat_choice(config, mesh, rules, make_optimizer(config.optim, schedule),
                                  schedule, batch_shapes, may_unroll=layout_asked_auto)
  return mesh, rules, batch_shapes, built


def _state_bytes(config, devices) -> int:
  """The bytes a chip holds of the parameters and optimizer state under `config`'s mesh:
  from the abstract state's shardings, nothing compiled (a fixed remat policy)."""
  fixed = config.copy_and_resolve_references()
  fixed.model.remat = 'full'
  return state_bytes_per_device(_build(fixed, devices)[3].trainer)


def _value_at(config, dotted: str):
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def with_stand_ins(stage_config, folder: str):
  """A copy of the stage config whose data-decided sizes can be known here, and the list of
  what stands in for what (see the module doc)."""
  config = stage_config.copy_and_resolve_references()
  data = config.data
  notes = []
  generated = data.source == 'synthetic'  # its classes and captions are known here
  if data.source != 'synthetic' and not _readable(data.get('path')):
    # Nothing is read to compile; a source that cannot be listed here is replaced by one
    # of the same image size.
    notes.append(f'data.source={data.source!r} (its path is not here): synthetic images')
    data.source, data.path, data.test_path = 'synthetic', None, None
  if ('num_classes' in config.objective and config.objective.num_classes is None
      and not generated and not data.labels.vocabulary):
    config.objective.num_classes = STAND_IN_CLASSES
    notes.append(f'objective.num_classes: {STAND_IN_CLASSES}')
  needs_vocabulary = _objective_refuses_without(config, 'labels.vocabulary')
  if needs_vocabulary or (data.labels.vocabulary and not _readable(data.labels.vocabulary)):
    data.labels.vocabulary = _stand_in_vocabulary(folder, STAND_IN_LABELS)
    notes.append(f'data.labels.vocabulary: {STAND_IN_LABELS} labels')
  needs_tokenizer = _objective_refuses_without(config, 'text.tokenizer')
  if needs_tokenizer or (data.text.tokenizer and not _readable(data.text.tokenizer)):
    data.text.tokenizer = _stand_in_tokenizer(folder, STAND_IN_TOKENS)
    notes.append(f'data.text.tokenizer: {STAND_IN_TOKENS} tokens')
  if sources.second_source_key(data) and not _readable(
      os.path.join(data.pseudo_labels.path or '', records.METADATA_FILE)):
    data.pseudo_labels.update(stage=None, path=_stand_in_pseudo_labels(folder))
    notes.append('data.pseudo_labels: hard labels (the pseudo-label stage has not run)')
  return config, notes


def _readable(path: str | None) -> bool:
  return bool(path) and not storage.is_bucket(path) and os.path.exists(path)


def _objective_refuses_without(config, key: str) -> bool:
  """Whether the objective's own checks refuse the config for want of config.data.<key>."""
  try:
    objective_class(config.objective.name).check_config(config, 'config')
  except ConfigError as error:
    return f'data.{key}' in str(error)
  return False


def _stand_in_vocabulary(folder: str, size: int) -> str:
  path = os.path.join(folder, f'labels_{size}.txt')
  if not os.path.exists(path):
    labels_lib.LabelVocabulary([f'label{i}' for i in range(size)]).write(path)
  return path


def _stand_in_tokenizer(folder: str, size: int) -> str:
  path = os.path.join(folder, f'tokenizer_{size}.txt')
  if not os.path.exists(path):
    words = [f'word{i}' for i in range(size - len(tokenizer_lib.SPECIAL_TOKENS))]
    tokenizer_lib.WordTokenizer(words).write(path)
  return path


def _stand_in_pseudo_labels(folder: str) -> str:
  path = os.path.join(folder, 'pseudo_labels')
  os.makedirs(path, exist_ok=True)
  metadata = {'format': records.PSEUDO_LABEL_FORMAT,
              'format_version': records.PSEUDO_LABEL_FORMAT_VERSION,
              'labels': {'kind': 'hard', 'top_k': 1}, 'data': {}, 'shards': [],
              'num_examples': 0, 'num_records': 0, 'num_classes': STAND_IN_CLASSES}
  with open(os.path.join(path, records.METADATA_FILE), 'w', encoding='utf-8') as f:
    json.dump(metadata, f)
  return path


# --- The report ------------------------------------------------------------------------

def describe_bytes(num_bytes: int | None) -> str:
  """Bytes in GiB, or MiB or KiB below one; '?' when unknown."""
  return '?' if num_bytes is None else tpu_slices.describe_bytes(num_bytes)


def describe_count(value: float, unit: str = '') -> str:
  """1.2e9 -> '1.2G'."""
  for scale, prefix in ((1e15, 'P'), (1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(value) >= scale:
      return f'{value / scale:.3g}{prefix}{unit}'
  return f'{value:.3g}{unit}'


def describe_seconds(seconds: float) -> str:
  if seconds >= 1:
    return f'{seconds:.3g} s'
  return f'{seconds * 1e3:.3g} ms' if seconds >= 1e-3 else f'{seconds * 1e6:.3g} us'


def describe_mesh(mesh: dict) -> str:
  return ' '.join(f'{axis}{size}' for axis, size in mesh.items() if size > 1) or 'one device'


def slice_mesh(report: StageReport) -> dict:
  """The mesh of one slice: the data axis spans the slices (sharding.make_mesh)."""
  mesh = dict(report.mesh)
  if report.num_slices > 1 and 'data' in mesh:
    mesh['data'] //= report.num_slices
  return mesh


def describe_across_slices(report: StageReport) -> str:
  """'data x2, 377 KiB DCN/chip': the axis joining the slices and what crosses per step."""
  if report.num_slices <= 1:
    return '-'
  axes = '+'.join(report.cross_slice_axes) or '?'
  dcn = report.roofline.get('dcn_bytes_per_chip')
  crossing = f', {describe_bytes(int(dcn))} DCN/chip' if dcn is not None else ''
  return f'{axes} x{report.num_slices}{crossing}'


def describe_fits(report: StageReport) -> str:
  if report.fits:
    return 'yes'
  if report.summed_bytes is not None:  # compiled, with a peak above the usable part
    return f'NO (> {MEMORY_FRACTION:.0%})'
  return 'NO (state)' if STATE_ALONE in report.refusals else 'NO (refused)'


TABLE_NOTE = (
    "'peak' is the compiler's own (XLA's buffer assignment); 'sum' adds every buffer as if all "
    "were live at once. A step fits when the compiler accepts it for the chip and its peak is at "
    "most {fraction:.0%} of the chip's HBM. 'step >=' is a lower bound computed from the "
    "compiled program (per op: FLOPs at the chip's peak or bytes at its HBM bandwidth, "
    "collectives at ICI and DCN bandwidth; loops times their trip counts), not a measurement; "
    "'MFU <=' the model FLOPs over it; 'bound by' the term it is made of most.")


def format_table(reports: list[StageReport], tpu_slice) -> str:
  """The table main.py prints."""
  header = ('stage', 'model', 'params', 'batch', 'mesh/slice', 'across slices', 'remat',
            'layout', 'args', 'temps', 'peak/chip', 'sum', 'of', 'fits', 'model FLOP',
            'program FLOP', 'step >=', 'MFU <=', 'bound by', 'compile')
  rows = []
  for r in reports:
    if r.note:
      rows.append((r.stage, r.kind, *[''] * 11, r.note, *[''] * 6))
      continue
    rows.append((
        r.stage, f'{r.kind} {r.variant}', describe_count(r.parameters), f'{r.batch_size:,}',
        describe_mesh(slice_mesh(r)), describe_across_slices(r), r.remat, r.layout,
        describe_bytes(r.argument_bytes), describe_bytes(r.temporary_bytes),
        describe_bytes(r.peak_bytes), describe_bytes(r.summed_bytes),
        describe_bytes(r.capacity_bytes), describe_fits(r), describe_count(r.analytic_flops),
        describe_count(r.program_flops) if r.program_flops else '?',
        describe_seconds(r.step_seconds_at_least) if r.step_seconds_at_least else '?',
        f'{r.mfu_at_most:.0%}' if r.mfu_at_most else '?', r.bound_by or '?',
        f'{r.compile_seconds:.0f} s'))
  widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
  lines = [f'Compiled for {tpu_slice.describe()}. ' + TABLE_NOTE.format(fraction=MEMORY_FRACTION),
           '  '.join(h.ljust(w) for h, w in zip(header, widths))]
  lines += ['  '.join(str(v).ljust(w) for v, w in zip(row, widths)) for row in rows]
  for r in reports:
    if r.costliest_ops:
      ops = '; '.join(f"{op['name']} x{op['count']} {describe_seconds(op['seconds'])} "
                      f"({op['term']})" for op in r.costliest_ops)
      lines.append(f'{r.stage}: costliest ops of the bound: {ops}.')
    if r.refusals:
      lines.append(f'{r.stage}: no remat policy fits: ' + ', '.join(
          f'{policy} {describe_bytes(need) if need else "refused by the compiler"}'
          for policy, need in r.refusals.items()) + '.')
    if r.stand_ins:
      lines.append(f'{r.stage}: stand-ins for what the data decides: {"; ".join(r.stand_ins)}.')
    if r.evaluators:
      programs = ', '.join(f'{k} {describe_bytes(v)}' for k, v in r.evaluators.items())
      lines.append(f'{r.stage}: evaluators compiled: {programs}.')
    if r.fix:
      lines.append(f'{r.stage}: does not fit; {r.fix}.')
  return '\n'.join(lines)


def _does_not_fit_line(report: StageReport, tpu_slice) -> str:
  need = (f'needs {describe_bytes(report.peak_bytes)} per chip' if report.peak_bytes
          else 'is larger than the compiler can place')
  fix = (f'{report.fix}.' if report.fix else
         'No change tried fits: use a larger slice, or a smaller model or batch.')
  return (f"Stage {report.stage!r} ({report.kind} {report.variant}, batch "
          f'{report.batch_size}) does not fit {tpu_slice.describe()}: it {need}, a chip has '
          f'{describe_bytes(report.capacity_bytes)} ({MEMORY_FRACTION:.0%} usable). {fix}')


def check_report_folder(workdir: str) -> None:
  """Raises WorkdirError (one line) before anything is compiled when the report cannot be
  written where it goes: a `workdir` that is a file, or that this user cannot write. A
  workdir that holds a run is only read (the report is printed, not written into it)."""
  if storage.is_dir(workdir) and _holds_a_run(workdir):
    return
  storage.check_writable_folder(
      workdir, '--workdir', f'give a folder for the compile report ({REPORT_FOLDER}/ in it)')


def _holds_a_run(workdir: str) -> bool:
  """Whether `workdir` has anything but compile reports in it (a run's folder)."""
  names = [name for name in storage.list_dir(workdir) if name != REPORT_FOLDER]
  return bool(names)


def _write_report(reports: list[StageReport], tpu_slice, workdir: str) -> None:
  if storage.is_dir(workdir) and _holds_a_run(workdir):
    logging.warning('%s holds a run: the compile report is printed, not written into it.',
                    workdir)
    return
  slices = f'x{tpu_slice.num_slices}' if tpu_slice.num_slices > 1 else ''
  path = os.path.join(workdir, REPORT_FOLDER, f'{tpu_slice.name}{slices}.json')
  report = {'slice': dataclasses.asdict(tpu_slice), 'topology': tpu_slice.topology,
            'memory_fraction': MEMORY_FRACTION, 'jax': jax.__version__,
            'libtpu': _libtpu_version(), 'compiled_at': time.strftime('%Y-%m-%d %H:%M UTC',
                                                                      time.gmtime()),
            'stages': [{**dataclasses.asdict(r), 'mesh_per_slice': slice_mesh(r)}
                       for r in reports]}
  storage.write_text(path, json.dumps(report, indent=2, default=str))
  logging.info('Compile report: %s', path)


def _libtpu_version() -> str:
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return metadata.version('libtpu')
  except Exception:  # noqa: BLE001
    return 'unknown'
