"""main.py --compile_for=SLICE: every stage of a run compiled for a Cloud TPU slice on this
machine, and whether it fits the slice's chips, before anyone books one.

For each training stage of the config, as train_stage would build it but with nothing
allocated: the state's and the batches' shapes, the mesh over the slice's chips (the
topology's devices, from the libtpu wheel: tpu_slices.py), the train step compiled by the
TPU compiler with model.remat='auto' (and scan='auto') chosen against the chip's HBM by the
same code as on a real TPU (train/remat_choice.py), and the evaluators' device programs.
Then one table: the model, its parameters, the global batch, the mesh, the remat and layout
chosen, each chip's HBM (arguments, temporaries, the step's peak) against its capacity, the
analytic model FLOPs beside the lowered program's (program_flops.py: its loops multiplied
out), XLA's estimated step time and the MFU it implies, the compile time. The same goes to
WORKDIR/compile_for/<slice>.json, unless WORKDIR holds a run: nothing of a run changes.

What the data would decide (a label vocabulary's size, a tokenizer's, the classes of a
fine-tuning set, a teacher's pseudo-labels) is taken from the config's own files where
they can be read here, and otherwise from a stand-in of a typical size that the report
names: nothing is read from the datasets themselves.

A stage that does not fit is tried with the cheapest changes, each compiled to be sure:
more FSDP sharding (data parallel devices moved to the fsdp axis), then a smaller global
batch. `check` raises DoesNotFitError, one line naming the first stage that does not fit,
what it needs per chip against what the chip has, and the change that fits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time

from absl import logging
import jax

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
from big_pretrain.train.program_flops import program_flops
from big_pretrain.train.remat_choice import (MEMORY_FRACTION, DoesNotFit, build_with_remat_choice,
                                             compile_or_refusal, step_bytes_per_device)

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
  mesh: dict = dataclasses.field(default_factory=dict)
  remat: str = ''
  layout: str = ''                   # 'scanned' or 'unrolled'
  argument_bytes: int | None = None  # None: not compiled (it did not fit)
  temporary_bytes: int | None = None
  peak_bytes: int | None = None      # the step's (train/remat_choice.step_bytes_per_device)
  capacity_bytes: int = 0
  fits: bool = False
  analytic_flops: float = 0.0        # model FLOPs per step (train/mfu.py)
  program_flops: float = 0.0         # matmul FLOPs of the lowered step, loops multiplied out
  estimated_seconds: float | None = None  # XLA's estimate for one step
  estimated_mfu: float | None = None
  compile_seconds: float = 0.0
  evaluators: dict = dataclasses.field(default_factory=dict)  # program -> peak bytes
  stand_ins: list = dataclasses.field(default_factory=list)
  note: str = ''
  fix: str = ''                      # a change that fits, compiled, when the stage does not

  @property
  def margin_bytes(self) -> int | None:
    return None if self.peak_bytes is None else self.capacity_bytes - self.peak_bytes


def stage_configs(config) -> dict:
  return {'main': config} if 'stages' not in config else dict(config.stages.items())


def check(config, tpu_slice: tpu_slices.TpuSlice, workdir: str) -> list[StageReport]:
  """Compiles every stage of `config` for `tpu_slice`; prints and records the table; raises
  DoesNotFitError (one line) when a stage does not fit. See the module doc."""
  check_report_folder(workdir)
  devices = tpu_slices.topology_devices(tpu_slice)
  reports = []
  # Programs compiled for a topology cannot be loaded back from JAX's persistent cache
  # (that needs a TPU client): keep them out of it.
  cache_was_on = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  try:
    with tempfile.TemporaryDirectory(prefix='big_pretrain_stand_ins_') as stand_in_dir:
      for name, stage in stage_configs(config).items():
        path = f'config.stages.{name}' if 'stages' in config else 'config'
        logging.info('Compiling stage %r for %s.', name, tpu_slice.describe())
        reports.append(check_stage(name, stage, path, tpu_slice, devices, stand_in_dir))
  finally:
    jax.config.update('jax_enable_compilation_cache', cache_was_on)
  print(format_table(reports, tpu_slice))
  _write_report(reports, tpu_slice, workdir)
  for report in reports:
    if not report.fits and report.note == '':
      raise DoesNotFitError(_does_not_fit_line(report, tpu_slice))
  return reports


def check_stage(name: str, stage_config, path: str, tpu_slice, devices, stand_in_dir: str, *,
                find_fix: bool = True, with_evaluators: bool = True) -> StageReport:
  """One stage compiled for the slice (a job is reported, not compiled); if it does not
  fit and `find_fix`, the cheapest change that does."""
  if jobs.is_job(stage_config):
    return StageReport(name, stage_config.job, note='a job: nothing of it is compiled here')
  config, stand_ins = with_stand_ins(stage_config, stand_in_dir)
  validate_stage(config, path)
  check_fits_devices(config, len(devices), tpu_slice.hosts)
  report = _compile(name, config, tpu_slice, devices, with_evaluators=with_evaluators)
  report.stand_ins = stand_ins
  if not report.fits and find_fix:
    report.fix = _cheapest_fix(name, config, path, tpu_slice, devices)
  return report


def _compile(name: str, config, tpu_slice, devices, with_evaluators: bool = True,
             may_unroll: bool = True) -> StageReport:
  started = time.perf_counter()
  objective = objective_class(config.objective.name)
  layout_asked_auto = config.model.scan == SCAN_AUTO and may_unroll
  config = objective.resolve_config(config)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  rules = sharding_lib.logical_axis_rules(config)
  schedule = make_schedule(config.optim, config.batch_size, config.total_steps)
  batch_shapes = global_batch_shapes(config.data, config.batch_size)
  built = build_with_remat_choice(config, mesh, rules, make_optimizer(config.optim, schedule),
                                  schedule, batch_shapes, may_unroll=layout_asked_auto)
  config, trainer = built.config, built.trainer
  if trainer.compiled_step is not None:
    compiled = trainer.compiled_step
  elif not built.fits:  # nothing compiled fits: the state alone overflows, or every policy
    measured = [value for value in built.step_bytes.values() if value]
    compiled = DoesNotFit(min(measured, default=None), built.memory_limit,  # the least need
                          'no remat policy fits')
  else:
    compiled = compile_or_refusal(trainer, batch_shapes)
  capacity = built.memory_limit or tpu_slices.hbm_per_device(devices[0].device_kind)
  report = StageReport(
      name, config.objective.name, config.model.variant,
      parameters=sum(leaf.size for leaf in jax.tree_util.tree_leaves(
          trainer.abstract_state.params)),
      batch_size=config.batch_size, mesh=dict(mesh.shape), remat=config.model.remat,
      layout='scanned' if config.model.scan else 'unrolled', capacity_bytes=capacity,
      analytic_flops=mfu_lib.model_flops_per_step(config))
  if isinstance(compiled, DoesNotFit):
    report.peak_bytes = compiled.needed
    report.compile_seconds = time.perf_counter() - started
    return report
  memory = compiled.memory_analysis()
  report.argument_bytes = memory.argument_size_in_bytes
  report.temporary_bytes = memory.temp_size_in_bytes
  report.peak_bytes = step_bytes_per_device(compiled)
  report.fits = report.peak_bytes <= MEMORY_FRACTION * capacity
  counted = program_flops(trainer.lower_step(batch_shapes).as_text())
  report.program_flops = counted.flops
  report.estimated_seconds = _estimated_seconds(compiled, counted.flops, mesh.size)
  peak = mfu_lib.peak_flops_per_device(devices[0], config.model.dtype)
  if report.estimated_seconds and peak:
    report.estimated_mfu = mfu_lib.mfu(report.analytic_flops, report.estimated_seconds,
                                       mesh.size, peak)
    if report.estimated_mfu > 1:  # faster than the chips' peak: the cost model is wrong here
      logging.info("%s: XLA's step estimate (%s) is below what the model's FLOPs take at the "
                   "chips' peak: shown as '?'.", name, describe_seconds(report.estimated_seconds))
      report.estimated_seconds = report.estimated_mfu = None
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


def _estimated_seconds(compiled, counted_flops: float, num_devices: int) -> float | None:
  """XLA's estimate of one step ('optimal_seconds'). Its cost model, like its FLOPs count,
  takes a while loop's body once: for a scanned stack it is scaled by the loops' share of
  the program's FLOPs it left out (counted over the lowered program, loops multiplied out)."""
  costs = compiled.cost_analysis() or {}
  if isinstance(costs, list):  # older jax: one dict per program
    costs = costs[0] if costs else {}
  seconds, flops = costs.get('optimal_seconds'), costs.get('flops')
  if not seconds or seconds <= 0:
    return None
  if flops and counted_flops > 1.05 * flops * num_devices:
    seconds *= counted_flops / (flops * num_devices)
  return float(seconds)


def _cheapest_fix(name: str, config, path: str, tpu_slice, devices) -> str:
  """The first change that fits, compiled, as command-line overrides: remat 'auto' (if the
  config fixed a policy); more FSDP (data parallel devices moved to the fsdp axis, doubling,
  up to one slice); then, with the most FSDP, half the global batch, and half again. A try
  whose parameters and optimizer state alone overflow a chip costs no compile."""
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
  for overrides in tries:
    candidate = config.copy_and_resolve_references()
    for dotted, value in overrides.items():
      group, _, key = dotted.rpartition('.')
      (candidate[group] if group else candidate)[key] = value
    try:
      check_fits_devices(candidate, len(devices), tpu_slice.hosts)
    except ConfigError:
      continue
    changed = {key: value for key, value in overrides.items()
               if value != _value_at(config, key)}
    logging.info('Stage %r does not fit: trying %s.', name, changed)
    report = _compile(name, candidate, tpu_slice, devices, with_evaluators=False,
                      may_unroll=False)
    if report.fits:
      flags = ' '.join(f'--{path}.{key}={value}' for key, value in changed.items())
      return (f'{flags} fits (compiled: {describe_bytes(report.peak_bytes)} of '
              f'{describe_bytes(report.capacity_bytes)} per chip, remat {report.remat!r})')
  return ''


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


def format_table(reports: list[StageReport], tpu_slice) -> str:
  """The table main.py prints."""
  header = ('stage', 'model', 'params', 'batch', 'mesh', 'remat', 'layout', 'args',
            'temps', 'peak/chip', 'of', 'margin', 'fits', 'model FLOP', 'program FLOP',
            'est. step', 'est. MFU', 'compile')
  rows = []
  for r in reports:
    if r.note:
      rows.append((r.stage, r.kind, *[''] * 10, r.note, *[''] * 5))
      continue
    rows.append((
        r.stage, f'{r.kind} {r.variant}', describe_count(r.parameters), f'{r.batch_size:,}',
        describe_mesh(r.mesh), r.remat, r.layout, describe_bytes(r.argument_bytes),
        describe_bytes(r.temporary_bytes),
        describe_bytes(r.peak_bytes), describe_bytes(r.capacity_bytes),
        describe_bytes(r.margin_bytes) if r.margin_bytes is not None else '?',
        'yes' if r.fits else 'NO', describe_count(r.analytic_flops),
        describe_count(r.program_flops) if r.program_flops else '?',
        describe_seconds(r.estimated_seconds) if r.estimated_seconds else '?',
        f'{r.estimated_mfu:.0%}' if r.estimated_mfu else '?', f'{r.compile_seconds:.0f} s'))
  widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
  lines = [f'Compiled for {tpu_slice.describe()}; a step fits when its peak is at most '
           f'{MEMORY_FRACTION:.0%} of a chip\'s HBM.',
           '  '.join(h.ljust(w) for h, w in zip(header, widths))]
  lines += ['  '.join(str(v).ljust(w) for v, w in zip(row, widths)) for row in rows]
  for r in reports:
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
            'stages': [dataclasses.asdict(r) for r in reports]}
  storage.write_text(path, json.dumps(report, indent=2, default=str))
  logging.info('Compile report: %s', path)


def _libtpu_version() -> str:
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return metadata.version('libtpu')
  except Exception:  # noqa: BLE001
    return 'unknown'
