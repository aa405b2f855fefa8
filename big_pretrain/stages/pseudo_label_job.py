"""Pseudo-labelling, self-training's middle step: a teacher labels unlabelled images.

  python main.py --config=configs/self_training.py --workdir=DIR        # inside a chain
  python main.py --config=configs/pseudo_label.py --workdir=OUT \\
      --config.teacher.workdir=RUNS/finetune --config.data.path=/data/unlabelled

The teacher is a finished stage with a classification head (finetune, a
self-training student, or WSP over its label vocabulary): its config.json
and latest checkpoint are read from its folder. It runs jitted and sharded
over the mesh, every process reading its share of each batch, on centre
crops at the teacher's image size.

The unlabelled source is cut into shards of `examples_per_shard` consecutive
examples. For each shard, process 0 writes an ArrayRecord file of the
examples that pass the confidence threshold (big_pretrain/data/records.py
has the record format), renamed into place once whole, then a small JSON of
the shard's counts. A killed job therefore resumes at the first shard
without counts, and a job run again writes the same bytes. `metadata.json`
is written last: the settings, the shards, how many images were labelled,
and the distribution of their labels.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from big_pretrain import schema
from big_pretrain import sharding as sharding_lib
from big_pretrain.config.defaults import SCHEMA_VERSION_KEY
from big_pretrain.data import data_config
from big_pretrain.data import records as records_lib
from big_pretrain.data import sources
from big_pretrain.data.data_config import DATA_KEYS
from big_pretrain.data.eval_input import decode_key, ordered_batches
from big_pretrain.data.sources import pseudo_labelled
from big_pretrain.errors import ConfigError, UserFacingError
from big_pretrain.objectives import build_objective, objective_class
from big_pretrain.objectives.objective import CLASSIFIES
from big_pretrain.stages import init_from as init_from_lib
from big_pretrain.stages import trained_stage
from big_pretrain.storage import files as storage
from big_pretrain.storage.stage_dir import StageDir
from big_pretrain.train.step import abstract_params


JOB = 'pseudo_label'  # config.job of this stage
LABEL_KINDS = ('hard', 'soft')

# A pseudo-label stage's config: every key, its default, rule and meaning.
CONFIG_KEYS = schema.Group(
    'a pseudo-label stage: a teacher labels unlabelled images (self-training)',
    schema_version=SCHEMA_VERSION_KEY,
    job=schema.Key(JOB, schema.one_of(JOB),
                   'marks a stage that labels images with a trained model instead of training'),
    teacher=schema.Group(
        'the teacher: a stage with a classification head (finetune, self_training, wsp)',
        stage=schema.Key(None, schema.OPTIONAL_TEXT, 'an earlier stage of config.stages',
                         type=str, names_stage='training', path_key='workdir',
                         chain_fills_path=True),
        workdir=schema.Key(None, schema.OPTIONAL_TEXT,
                           "or such a stage's folder (config.json + checkpoints/)", type=str),
    ),
    # The unlabelled images (their labels are never read). Image size and eval crop are the
    # teacher's; of the rest only the keys naming the source matter.
    data=DATA_KEYS,
    labels=schema.Group(
        'the labels written',
        kind=schema.Key('hard', schema.one_of(*LABEL_KINDS),
                        "'hard': the teacher's top class; 'soft': its top_k classes with "
                        "their probabilities renormalized to sum to 1 (Noisy Student's)"),
        threshold=schema.Key(0.0, schema.UNIT_FRACTION,
                             "only images whose top probability is at least this are "
                             'labelled (Noisy Student: 0.3)'),
        top_k=schema.Key(5, schema.COUNT, "'soft' only: the classes kept per image"),
        temperature=schema.Key(1.0, schema.above(0), 'softmax(logits / temperature)'),
    ),
    batch_size=schema.Key(256, schema.COUNT, 'the global batch, over all processes and devices'),
    examples_per_shard=schema.Key(50_000, schema.COUNT,
                                  'the unit of resumption: a killed job redoes at most one'),
    mesh=sharding_lib.MESH_KEYS,
    sharding_rules=sharding_lib.SHARDING_RULES_KEY,
)


def default_config():
  """A pseudo-label stage's config, every key at its default."""
  return CONFIG_KEYS.defaults()


def check_config(config, path: str) -> None:
  """The checks across this job's keys (each value's own rule is checked before)."""
  if bool(config.teacher.stage) == bool(config.teacher.workdir):
    raise ConfigError(
        f'{path}.teacher: give stage (an earlier stage of config.stages) or workdir (the '
        'folder of a finished stage with a classification head), exactly one of them.')
  if config.teacher.workdir:  # a chain's teacher stage is checked when it has run
    try:
      check_teacher(config.teacher.workdir)
    except UserFacingError as error:
      raise ConfigError(f'{path}.teacher.workdir: {error}') from error
  data_config.check_config(config.data, path)


def check_teacher(teacher_dir: str) -> ml_collections.ConfigDict:
  """The teacher stage's recorded config, once it is known to train a classifier (a head
  that scores classes: finetune, a self-training student, WSP); a one-line error otherwise."""
  teacher_config = read_teacher_config(teacher_dir)
  objective = objective_class(teacher_config.objective.name)
  if CLASSIFIES not in objective.offers:
    raise ConfigError(
        f'The teacher in {teacher_dir} trains objective {objective.name!r}, which has no '
        "classification head: use a 'finetune', 'self_training' or 'wsp' stage.")
  return teacher_config


def results(workdir: str) -> dict | None:
  """What the results table shows of a finished job: how many images it labelled."""
  metadata = storage.read_json(
      os.path.join(workdir, records_lib.METADATA_FILE),
      if_damaged='Run the same command: the pseudo-label stage writes it again.')
  if metadata is None:
    return None
  total = max(metadata['num_examples'], 1)
  return {'step': '', 'pseudo_labels': {
      'labelled': float(metadata['num_records']),
      'labelled_fraction': metadata['num_records'] / total,
      'unreadable': float(metadata['num_unreadable'])}}


@dataclasses.dataclass
class PseudoLabelResult:
  folder: str
  finished: bool
  shards_written: int             # by this call
  metadata: dict | None = None    # metadata.json's content once finished


def read_teacher_config(teacher_dir: str) -> ml_collections.ConfigDict:
  """The stage config the teacher stage recorded, in today's schema."""
  return trained_stage.read_stage_config(
      teacher_dir,
      if_damaged="It records the teacher's config, without which its checkpoint cannot be "
      'read: restore it from a copy of the teacher folder (or the config the teacher was '
      'trained with, as main.py wrote it), or label with another teacher.',
      if_missing='point config.teacher.workdir at the folder of a trained stage (it holds '
      'config.json and checkpoints/), or config.teacher.stage at an earlier stage of the '
      'chain.')


def teacher_params(objective, checkpoint: str, mesh, rules) -> tuple[str, dict]:
  """(step dir, the teacher's parameters), sharded as its train state's are: from the step
  folder `checkpoint`, or the newest intact step of a stage folder (a damaged one skipped)."""
  abstract = abstract_params(objective, mesh, rules)
  return init_from_lib.load_intact_into(abstract, checkpoint, tuple(abstract))


def job_settings(config, teacher_step_dir: str, num_examples: int) -> dict:
  """What the labels depend on: a folder holding labels made otherwise is not resumed."""
  data = config.data.to_dict()
  return {'teacher': teacher_step_dir,
          'data': {key: data[key] for key in pseudo_labelled.SOURCE_KEYS if key in data},
          'labels': config.labels.to_dict(),
          'num_examples': num_examples,
          'examples_per_shard': config.examples_per_shard}


def run_pseudo_label(config, workdir: str, *, teacher_dir: str | None = None, devices=None,
                     stop_after_shards: int | None = None) -> PseudoLabelResult:
  """Labels every unlabelled image not labelled yet in `workdir`; see the module doc.

  `teacher_dir` (a chain resolves `teacher.stage` to it) overrides
  `config.teacher.workdir`. `stop_after_shards` stops early, as a killed job would.
  """
  teacher_dir = teacher_dir or config.teacher.workdir
  teacher_config = check_teacher(teacher_dir)
  objective = build_objective(teacher_config)
  step_dir = init_from_lib.resolve_checkpoint_dir(teacher_dir)  # the newest whose metadata reads

  data = config.data.copy_and_resolve_references()
  # The teacher sees images as it was evaluated: its size and centre crop.
  data.image_size = teacher_config.data.image_size
  data.eval_crop_fraction = teacher_config.data.eval_crop_fraction
  data.split = 'train'
  source = sources.build_source(data)
  num_examples = len(source)
  settings = job_settings(config, step_dir, num_examples)
  recorded = _recorded_settings(workdir)
  if recorded is not None:
    _check_same_settings(workdir, recorded, settings)
  metadata = _finished_metadata(workdir)
  if metadata is not None:
    logging.info('Pseudo-labels in %s are finished: nothing to do.', workdir)
    return PseudoLabelResult(workdir, True, 0, metadata)

  mesh = sharding_lib.make_mesh(config.mesh, devices)
  rules = sharding_lib.logical_axis_rules(config)
  # Every array is checked against its digest. A new job skips a damaged newest step for the
  # previous intact one; labels already made with a step go on with that step or stop.
  step_dir, params = teacher_params(objective, teacher_dir if recorded is None else step_dir,
                                    mesh, rules)
  if recorded is None:
    settings = job_settings(config, step_dir, num_examples)
    _record_settings(workdir, settings)
  if int(os.path.basename(step_dir)) < teacher_config.total_steps:
    logging.warning('The teacher in %s has not finished (step %s of %d): labelling with it.',
                    teacher_dir, os.path.basename(step_dir), teacher_config.total_steps)
  labels = config.labels
  top_k = 1 if labels.kind == 'hard' else labels.top_k

  def top_classes(params, images):
    logits = objective.predict(params, images).astype(jnp.float32)
    probs = jax.nn.softmax(logits / labels.temperature, axis=-1)
    return jax.lax.top_k(probs, min(top_k, probs.shape[-1]))

  predict = jax.jit(top_classes, out_shardings=sharding_lib.batch_sharding(mesh))
  with sharding_lib.activate(mesh, rules):
    num_classes = int(jax.eval_shape(
        lambda p: objective.predict(p, objective.dummy_images()), params).shape[-1])
  shards_per_batch = sharding_lib.num_batch_shards(mesh) * jax.process_count()
  batch_size = math.ceil(min(config.batch_size, config.examples_per_shard,
                             num_examples) / shards_per_batch) * shards_per_batch
  num_shards = math.ceil(num_examples / config.examples_per_shard)
  done = _finished_shards(workdir, num_shards)
  logging.info('Pseudo-labelling %d images in %d shards with the teacher %s (%d classes); %d '
               'shards done earlier.', num_examples, num_shards, step_dir, num_classes,
               int(done.sum()))
  written = 0
  for shard in range(num_shards):
    if done[shard]:
      continue
    if stop_after_shards is not None and written >= stop_after_shards:
      return PseudoLabelResult(workdir, False, written)
    indices = np.arange(shard * config.examples_per_shard,
                        min((shard + 1) * config.examples_per_shard, num_examples))
    records, counts = [], _ShardCounts(num_classes)
    for batch, rows in ordered_batches(source, indices, data, global_batch_size=batch_size,
                                       mesh=mesh):
      with sharding_lib.activate(mesh, rules):
        probs, ids = predict(params, batch['image'])
      probs = np.asarray(multihost_utils.process_allgather(probs, tiled=True))
      ids = np.asarray(multihost_utils.process_allgather(ids, tiled=True))
      for row in np.flatnonzero(rows['index'] >= 0):
        record = counts.label(bool(rows['valid'][row]), probs[row], ids[row], labels)
        if record is not None:
          records.append(records_lib.encode_pseudo_label_record(
              decode_key(rows['key_bytes'][row]), int(rows['index'][row]), *record))
    if jax.process_index() == 0:
      _write_shard(workdir, shard, num_shards, records, counts.as_dict())
    multihost_utils.sync_global_devices(f'pseudo_label shard {shard}')
    written += 1
    logging.info('Pseudo-label shard %d of %d: %d of %d images labelled.', shard + 1,
                 num_shards, counts.labelled, len(indices))

  metadata = _summary(workdir, num_shards, settings, num_classes,
                      trained_stage.class_names(teacher_config, num_classes))
  if jax.process_index() == 0:
    storage.write_text(os.path.join(workdir, records_lib.METADATA_FILE),
                       json.dumps(metadata, indent=2))
  multihost_utils.sync_global_devices('pseudo_label metadata')
  logging.info('%s', format_report(metadata))
  return PseudoLabelResult(workdir, True, written, metadata)


class _ShardCounts:
  """How a shard's images fared, and the distribution of the labels given."""

  def __init__(self, num_classes: int):
    self.examples = self.labelled = self.unreadable = self.below_threshold = 0
    self.label_counts = np.zeros(num_classes, np.int64)

  def label(self, valid: bool, probs: np.ndarray, ids: np.ndarray, labels):
    """(label_ids, label_probs, confidence) for one image, or None when it gets none."""
    self.examples += 1
    if not valid:
      self.unreadable += 1
      return None
    confidence = float(probs[0])
    if confidence < labels.threshold:
      self.below_threshold += 1
      return None
    self.labelled += 1
    self.label_counts[ids[0]] += 1
    if labels.kind == 'hard':
      return ids[:1], np.ones(1, np.float32), confidence
    return ids, probs / probs.sum(), confidence

  def as_dict(self) -> dict:
    return {'num_examples': self.examples, 'num_records': self.labelled,
            'num_unreadable': self.unreadable, 'num_below_threshold': self.below_threshold,
            'label_counts': self.label_counts.tolist()}


def _finished_metadata(workdir: str) -> dict | None:
  """The finished job's metadata.json, or None. A damaged one is set aside (by process 0; any
  other process then finds none: None alike) and written again from the shards' counts."""
  return storage.read_json_or_set_aside(
      os.path.join(workdir, records_lib.METADATA_FILE),
      "It is written again from the shards' counts.", rename=jax.process_index() == 0)


def _counts_file(shard: int, num_shards: int) -> str:
  return records_lib.pseudo_label_shard_name(shard, num_shards).replace('.array_record', '.json')


def _finished_shards(workdir: str, num_shards: int) -> np.ndarray:
  """Which shards have their counts written whole (process 0 looks; every process agrees).
  A damaged counts file is set aside, and its shard labelled again (the same bytes)."""
  present = set(storage.list_dir(workdir)) if jax.process_index() == 0 else set()
  done = np.array([_counts_file(s, num_shards) in present for s in range(num_shards)], bool)
  for shard in np.flatnonzero(done):  # present on process 0 only
    done[shard] = storage.read_json_or_set_aside(
        os.path.join(workdir, _counts_file(shard, num_shards)),
        f'Shard {shard} is labelled again.', rename=True) is not None
  if jax.process_count() > 1:
    done = np.asarray(multihost_utils.broadcast_one_to_all(done))
  return done


def _write_shard(workdir: str, shard: int, num_shards: int, records: list[bytes],
                 counts: dict) -> None:
  """The shard's records, whole or not at all, then its counts (which mark it done)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as local:
    path = os.path.join(local, 'shard.array_record')
    writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
    for record in records:
      writer.write(record)
    if not writer.ok():
      raise OSError(f'Writing pseudo-label shard {shard} failed.')
    writer.close()
    with open(path, 'rb') as f:
      storage.write_bytes(
          os.path.join(workdir, records_lib.pseudo_label_shard_name(shard, num_shards)), f.read())
  storage.write_text(os.path.join(workdir, _counts_file(shard, num_shards)),
                     json.dumps(counts))


def _recorded_settings(workdir: str) -> dict | None:
  """The settings job.json recorded, or None; read by every process before any writes it."""
  path = StageDir(workdir).job_file
  recorded = storage.read_json(
      path, if_damaged=f'It records the settings the pseudo-labels in {workdir} were made '
      'with, so this job cannot be checked against them: restore it, or use a new --workdir. '
      'Nothing was modified.')
  multihost_utils.sync_global_devices('pseudo_label settings read')
  return recorded


def _check_same_settings(workdir: str, recorded: dict, settings: dict) -> None:
  """Resumes only the same job: other settings in the same folder are refused."""
  changed = sorted(key for key in settings if recorded.get(key) != settings[key])
  if changed:
    raise ConfigError(
        f'{workdir} holds pseudo-labels made with other settings ({", ".join(changed)} '
        f'differ; recorded in {StageDir(workdir).job_file}). Use a new --workdir for new '
        'labels; nothing was changed.')


def _record_settings(workdir: str, settings: dict) -> None:
  if jax.process_index() == 0:
    storage.write_text(StageDir(workdir).job_file, json.dumps(settings, indent=2))
  multihost_utils.sync_global_devices('pseudo_label settings')


def _summary(workdir: str, num_shards: int, settings: dict, num_classes: int,
             class_names: list[str]) -> dict:
  shards, totals = [], {}
  label_counts = np.zeros(num_classes, np.int64)
  for shard in range(num_shards):
    counts = storage.read_json(os.path.join(workdir, _counts_file(shard, num_shards)),
                               if_damaged='Run the same command: it labels that shard again.')
    shards.append({'file': records_lib.pseudo_label_shard_name(shard, num_shards),
                   'num_records': counts['num_records']})
    label_counts += np.asarray(counts.pop('label_counts'), np.int64)
    for key, value in counts.items():
      totals[key] = totals.get(key, 0) + value
  return {'format': records_lib.PSEUDO_LABEL_FORMAT,
          'format_version': records_lib.PSEUDO_LABEL_FORMAT_VERSION,
          **settings, **totals, 'num_classes': num_classes, 'class_names': class_names,
          'label_counts': label_counts.tolist(), 'shards': shards}


def format_report(metadata: dict) -> str:
  """How many images were labelled, and the labels' distribution, as a table."""
  total, labelled = metadata['num_examples'], metadata['num_records']
  lines = [f'Pseudo-labels ({metadata["labels"]["kind"]}, threshold '
           f'{metadata["labels"]["threshold"]}): {labelled} of {total} images labelled '
           f'({labelled / max(total, 1):.1%}); {metadata["num_below_threshold"]} below the '
           f'threshold, {metadata["num_unreadable"]} unreadable.',
           f'{"class":<24} {"images":>8} {"share":>7}']
  counts = np.asarray(metadata['label_counts'])
  names = metadata['class_names']
  for c in np.argsort(-counts, kind='stable')[:20]:
    lines.append(f'{names[c][:24]:<24} {counts[c]:>8} {counts[c] / max(labelled, 1):>7.1%}')
  if len(counts) > 20:
    lines.append(f'... {len(counts) - 20} more classes, {int((counts > 0).sum())} with images')
  return '\n'.join(lines)


run = run_pseudo_label  # the job's runner, as stages/jobs.py names it: run(config, workdir, devices=)
