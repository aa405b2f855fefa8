"""Self-training: a teacher's pseudo-labels (sharded, resumable, byte-identical) and a
student that learns from human and pseudo-labels mixed in every batch."""

import json
import logging
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from big_pretrain import sharding as sharding_lib
from big_pretrain.config.defaults import chain_config
from big_pretrain.data import augment as augment_lib
from big_pretrain.data import records as records_lib
from big_pretrain.data import sources
from big_pretrain.data.sources import pseudo_labelled
from big_pretrain.data.train_input import InputPipeline
from big_pretrain.errors import ConfigError, DamagedFileError
from big_pretrain.objectives import build_objective, self_training
from big_pretrain.stages.chain_validation import validate_config
from big_pretrain.stages.pseudo_label_job import run_pseudo_label
from big_pretrain.train.loop import train_stage
from helpers import checkpoint_damage
from helpers.hashes import file_hashes
from helpers.jax_workers import launch_workers
from helpers.tiny_config import (tiny_mae_config, tiny_pseudo_label_config, tiny_student_config,
                                 tiny_teacher_config)

FOUR_DEVICES = 4  # the two worker processes' 2 devices each, or one process's 4


@pytest.fixture(scope='module')
def teacher_dir(tmp_path_factory):
  """A tiny classifier trained 2 steps on the labelled quarter of the images."""
  workdir = str(tmp_path_factory.mktemp('teacher'))
  train_stage(tiny_teacher_config(), workdir)
  return workdir


@pytest.fixture(scope='module')
def pseudo_labels(teacher_dir, tmp_path_factory):
  """The teacher's soft labels (top 3) for the other three quarters, on 4 devices."""
  folder = str(tmp_path_factory.mktemp('pseudo_labels'))
  result = run_pseudo_label(tiny_pseudo_label_config(), folder, teacher_dir=teacher_dir,
                            devices=jax.devices()[:FOUR_DEVICES])
  assert result.finished and result.shards_written == 3
  return folder


def _records(folder):
  metadata = pseudo_labelled.read_metadata(folder)
  shards = [os.path.join(folder, shard['file']) for shard in metadata['shards']
            if shard['num_records']]
  data = grain.sources.ArrayRecordDataSource(shards)
  return [records_lib.decode_pseudo_label_record(data[i]) for i in range(len(data))]


@pytest.mark.integration
def test_soft_labels_cover_every_unlabelled_image_once_and_sum_to_one(pseudo_labels):
  records = _records(pseudo_labels)
  unlabelled = sources.build_source(tiny_pseudo_label_config().data)
  assert len(records) == len(unlabelled) == 192
  assert [r['index'] for r in records] == list(range(192))
  assert [r['key'] for r in records] == [unlabelled[i]['key'] for i in range(192)]
  for record in records:
    assert record['label_ids'].shape == (3,) and len(set(record['label_ids'])) == 3
    assert np.isclose(record['label_probs'].sum(), 1.0, atol=1e-6)
    assert np.all(np.diff(record['label_probs']) <= 0)  # most probable first
  metadata = pseudo_labelled.read_metadata(pseudo_labels)
  assert metadata['num_records'] == 192 and sum(metadata['label_counts']) == 192
  assert metadata['num_classes'] == 10 and metadata['class_names'][0] == 'circle'


@pytest.mark.integration
def test_pseudo_labels_resume_after_a_kill_to_the_same_bytes(teacher_dir, pseudo_labels,
                                                              tmp_path):
  config = tiny_pseudo_label_config()
  folder = str(tmp_path / 'killed')
  killed = run_pseudo_label(config, folder, teacher_dir=teacher_dir,
                            devices=jax.devices()[:FOUR_DEVICES], stop_after_shards=1)
  assert not killed.finished and killed.shards_written == 1
  assert not os.path.exists(os.path.join(folder, records_lib.METADATA_FILE))
  # A kill while the second shard was being written left a partial file behind.
  with open(os.path.join(folder, records_lib.pseudo_label_shard_name(1, 3)), 'wb') as f:
    f.write(b'half a shard')
  resumed = run_pseudo_label(config, folder, teacher_dir=teacher_dir,
                             devices=jax.devices()[:FOUR_DEVICES])
  assert resumed.finished and resumed.shards_written == 2
  assert file_hashes(folder) == file_hashes(pseudo_labels)
  # Other settings in the same folder are refused, not mixed in.
  config.labels.kind = 'hard'
  with pytest.raises(ConfigError, match='other settings.*labels'):
    run_pseudo_label(config, folder, teacher_dir=teacher_dir)


@pytest.mark.integration
def test_a_teacher_whose_newest_step_is_damaged_labels_with_the_previous_intact_one(
    teacher_dir, tmp_path, caplog):
  """A bit flipped in the teacher's newest step, its digests deleted: the step is skipped
  (and left where it is), the job labels with the previous one and records that."""
  teacher = tmp_path / 'teacher'
  shutil.copytree(teacher_dir, teacher)
  newest = teacher / 'checkpoints' / '2'
  leaf = 'params/encoder/transformer/block_1/mlp/fc1/kernel'
  checkpoint_damage.alter_one_value(newest, leaf)
  checkpoint_damage.damage_digests(newest, 'deleted', leaf)
  folder = tmp_path / 'labels'
  with caplog.at_level(logging.WARNING):
    result = run_pseudo_label(tiny_pseudo_label_config(), str(folder), teacher_dir=str(teacher),
                              devices=jax.devices()[:FOUR_DEVICES], stop_after_shards=1)
  assert result.shards_written == 1
  assert f'Skipping checkpoint {newest}' in caplog.text and 'counts as damaged' in caplog.text
  job = json.loads((folder / 'job.json').read_text())
  assert job['teacher'] == str(teacher / 'checkpoints' / '1')
  assert newest.exists()


@pytest.mark.integration
def test_damaged_job_files_are_rebuilt_or_named_and_nothing_is_deleted(teacher_dir,
                                                                       pseudo_labels, tmp_path):
  config = tiny_pseudo_label_config()
  folder = tmp_path / 'labels'
  shutil.copytree(pseudo_labels, folder)
  # A shard's counts and the summary cut short (a full disk): set aside, the shard labelled
  # again, the summary written again, to the same bytes.
  counts = folder / records_lib.pseudo_label_shard_name(1, 3).replace('.array_record', '.json')
  for path in (counts, folder / records_lib.METADATA_FILE):
    path.write_bytes(path.read_bytes()[:10])
  rerun = run_pseudo_label(config, str(folder), teacher_dir=teacher_dir,
                           devices=jax.devices()[:FOUR_DEVICES])
  assert rerun.finished and rerun.shards_written == 1
  kept = {name for name in os.listdir(folder) if name.endswith('.damaged')}
  assert kept == {counts.name + '.damaged', records_lib.METADATA_FILE + '.damaged'}
  rebuilt = {name: digest for name, digest in file_hashes(folder).items()
             if not name.endswith('.damaged')}
  assert rebuilt == file_hashes(pseudo_labels)
  # The job's settings cut short: nothing to check the job against, so it is refused.
  job = folder / 'job.json'
  job.write_bytes(job.read_bytes()[:10])
  with pytest.raises(DamagedFileError, match=r'job\.json cannot be read .*restore it, or use '
                                             'a new --workdir'):
    run_pseudo_label(config, str(folder), teacher_dir=teacher_dir)


@pytest.mark.multiprocess
def test_two_processes_write_the_same_pseudo_labels_as_one(teacher_dir, pseudo_labels,
                                                           tmp_path):
  shutil.copytree(teacher_dir, tmp_path / 'teacher')
  workers = launch_workers('pseudo_label', str(tmp_path))
  assert [w['process_count'] for w in workers] == [2, 2]
  shards = {name: digest for name, digest in workers[0]['files'].items()
            if name.startswith(records_lib.PSEUDO_LABEL_SHARD_PREFIX)}
  assert len(shards) == 6  # 3 record files and their counts
  assert shards == file_hashes(pseudo_labels,
                              name_prefix=records_lib.PSEUDO_LABEL_SHARD_PREFIX)


@pytest.mark.integration
def test_hard_labels_keep_only_images_at_or_above_the_threshold(teacher_dir, tmp_path):
  soft = run_pseudo_label(tiny_pseudo_label_config(**{'labels.top_k': 10}),
                          str(tmp_path / 'all'), teacher_dir=teacher_dir)
  confidences = {r['key']: r['confidence'] for r in _records(soft.folder)}
  threshold = float(np.median(list(confidences.values())))
  hard = run_pseudo_label(
      tiny_pseudo_label_config(**{'labels.kind': 'hard', 'labels.threshold': threshold}),
      str(tmp_path / 'hard'), teacher_dir=teacher_dir)
  records = _records(hard.folder)
  assert {r['key'] for r in records} == {k for k, c in confidences.items() if c >= threshold}
  assert 0 < len(records) < len(confidences)
  for record in records:
    assert record['confidence'] >= threshold
    assert record['label_ids'].shape == (1,) and record['label_probs'].tolist() == [1.0]
  assert hard.metadata['num_below_threshold'] == len(confidences) - len(records)


def _student_pipeline(pseudo_labels, **overrides):
  config = tiny_student_config(pseudo_labels, **overrides)
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:FOUR_DEVICES])
  return config, InputPipeline(config.data, global_batch_size=config.batch_size, mesh=mesh,
                               seed=config.seed)


@pytest.mark.parametrize('fraction, batch_size', [(0.5, 16), (0.25, 16), (0.75, 8)])
@pytest.mark.integration
def test_every_batch_holds_exactly_the_configured_share_of_pseudo_labels(
    pseudo_labels, fraction, batch_size):
  config, data = _student_pipeline(pseudo_labels, **{'data.pseudo_labels.fraction': fraction,
                                                     'batch_size': batch_size})
  labelled_keys = {sources.build_source(config.data)[i]['key'] for i in range(64)}
  for _ in range(6):
    batch = data.next_local_numpy()
    pseudo = batch['is_pseudo'] == 1
    assert pseudo.sum() == fraction * batch_size
    assert np.all(batch['label'][pseudo] == -1) and np.all(batch['label'][~pseudo] >= 0)
    assert np.all(batch['pseudo_ids'][~pseudo] == -1)
    np.testing.assert_allclose(batch['pseudo_probs'][pseudo].sum(-1), 1.0, atol=1e-6)
  assert len(labelled_keys) == 64


@pytest.mark.integration
def test_the_student_never_sees_the_unlabelled_images_true_labels(pseudo_labels, monkeypatch):
  """Poisoning every label, caption and hashtag of the unlabelled part changes no batch."""
  _, clean = _student_pipeline(pseudo_labels)
  clean_batches = [clean.next_local_numpy() for _ in range(4)]
  original = sources.SubsetSource.__getitem__

  def poisoned(self, index):
    example = original(self, index)
    if len(self) == 192:  # the unlabelled three quarters
      example = dict(example, label=(example['label'] + 3) % 10, caption='#poison',
                     hashtags=['#poison'])
    return example

  monkeypatch.setattr(sources.SubsetSource, '__getitem__', poisoned)
  _, poisoned_data = _student_pipeline(pseudo_labels)
  for clean_batch in clean_batches:
    batch = poisoned_data.next_local_numpy()
    assert batch.keys() == clean_batch.keys()
    for name in batch:
      np.testing.assert_array_equal(batch[name], clean_batch[name], err_msg=name)


@pytest.mark.integration
def test_the_loss_normalizes_each_part_separately_as_computed_by_hand(pseudo_labels):
  config = tiny_student_config(pseudo_labels, **{'objective.pseudo_label_weight': 2.0,
                                                 'objective.label_smoothing': 0.1})
  objective = build_objective(config)
  params = nn.meta.unbox(objective.init_params(jax.random.key(1)))
  params['head']['kernel'] = jax.random.normal(jax.random.key(2), params['head']['kernel'].shape)
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (6, 32, 32, 3), np.uint8),
           'label': np.array([3, 7, -1, -1, 1, -1], np.int32),
           'is_pseudo': np.array([0, 0, 1, 1, 0, 1], np.int32),
           'pseudo_ids': np.array([[-1, -1], [-1, -1], [4, 2], [9, -1], [-1, -1], [0, 5]],
                                  np.int32),
           'pseudo_probs': np.array([[0, 0], [0, 0], [0.75, 0.25], [1, 0], [0, 0], [0.5, 0.5]],
                                    np.float32)}
  log_probs = np.asarray(jax.nn.log_softmax(objective.predict(params, batch['image'])),
                         np.float64)
  human = [-(0.9 * log_probs[i, c] + 0.01 * log_probs[i].sum())
           for i, c in ((0, 3), (1, 7), (4, 1))]
  pseudo = [-(0.75 * log_probs[2, 4] + 0.25 * log_probs[2, 2]), -log_probs[3, 9],
            -(0.5 * log_probs[5, 0] + 0.5 * log_probs[5, 5])]
  expected = (np.mean(human) + 2.0 * np.mean(pseudo)) / 3.0
  loss, metrics = objective.loss(params, jax.tree.map(jnp.asarray, batch), jax.random.key(0),
                                 train=False)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['loss_human']), np.mean(human), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['loss_pseudo']), np.mean(pseudo), rtol=1e-5)
  # The paper's balance: the pseudo term rescaled to the human one's size, value-wise.
  balanced, _, _ = self_training.combined_loss(
      jnp.array([1.0, 3.0, 8.0]), jnp.array([0, 0, 1]), 1.0, balance=True)
  np.testing.assert_allclose(float(balanced), (2.0 + 2.0) / 2.0)


@pytest.mark.integration
def test_teacher_pseudo_labels_student_as_a_chain(teacher_dir, tmp_path):
  """The chain runs teacher -> pseudo-labels -> student; the student resumes exactly."""
  shutil.copytree(teacher_dir, tmp_path / 'chain' / 'teacher')
  labels = tiny_pseudo_label_config()
  labels.teacher.update(workdir=None, stage='teacher')
  student = tiny_student_config(None, **{'data.pseudo_labels.stage': 'pseudo_labels',
                                         'total_steps': 4, 'evals.classification': dict(
                                             kind='classification', test_examples=32,
                                             batch_size=16)})
  from big_pretrain.stages import chain  # pylint: disable=import-outside-toplevel
  config = chain_config(teacher=tiny_teacher_config(), pseudo_labels=labels, student=student)
  validate_config(config)
  stage_dirs = chain.stage_workdirs(config, str(tmp_path / 'chain'))
  # Stop the student half way, as a preemption would; the same command resumes it.
  run_pseudo_label(labels, stage_dirs['pseudo_labels'], teacher_dir=stage_dirs['teacher'])
  resolved = chain.with_stage_folders(student, stage_dirs)
  half = train_stage(resolved, stage_dirs['student'], stop_after_steps=2)
  assert not half.finished
  results = chain.run(config, str(tmp_path / 'chain'))
  whole = train_stage(resolved, str(tmp_path / 'uninterrupted'))
  assert results['student']['classification']['examples'] == 32
  assert results['pseudo_labels']['pseudo_labels']['labelled'] == 192
  np.testing.assert_array_equal(
      jax.tree.leaves(jax.device_get(whole.state.params))[0],
      jax.tree.leaves(jax.device_get(train_stage(resolved, stage_dirs['student']).state.params))[0])


def test_a_teacher_folder_that_cannot_label_is_refused_at_validation(tmp_path):
  """config.teacher.workdir is checked before anything starts: a folder that is no stage,
  and a stage without a classification head (MAE, whose `predict` reconstructs pixels); and
  a student's folder of pseudo-labels."""
  labels = tiny_pseudo_label_config(**{'teacher.workdir': str(tmp_path)})
  with pytest.raises(ConfigError, match=r"teacher\.workdir: .* has no config\.json"):
    validate_config(labels)
  (tmp_path / 'config.json').write_text(tiny_mae_config().to_json_best_effort())
  with pytest.raises(ConfigError, match=r"trains objective 'mae', which has no classification "
                                        'head'):
    validate_config(labels)
  # A student's pseudo_labels.path that holds no finished labels, likewise.
  with pytest.raises(ConfigError, match=r'data\.pseudo_labels\.path: No finished pseudo-labels '
                                        r'in .* \(metadata\.json is missing\)'):
    validate_config(tiny_student_config(str(tmp_path)))


def test_configs_that_cannot_self_train_are_refused_before_any_compute():
  student = tiny_student_config(None)
  with pytest.raises(ConfigError, match='needs pseudo-labels'):
    validate_config(student)
  student.data.pseudo_labels.path = '/labels'
  student.objective.mixup_alpha = 0.8
  with pytest.raises(ConfigError, match='mixup_alpha and cutmix_alpha must be 0'):
    validate_config(student)
  student.objective.mixup_alpha = 0.0
  student.data.pseudo_labels.fraction = 0.3  # of 16 rows: 4.8
  with pytest.raises(ConfigError, match='whole rows'):
    validate_config(student)
  with pytest.raises(ConfigError, match="train them with objective 'self_training'"):
    validate_config(tiny_teacher_config(**{'data.pseudo_labels.path': '/labels'}))
  labels = tiny_pseudo_label_config(**{'labels.kind': 'softest'})
  with pytest.raises(ConfigError, match="labels.kind='softest'"):
    validate_config(labels)
  labels = tiny_pseudo_label_config(**{'teacher.stage': 'student'})
  config = chain_config(labels=labels)
  with pytest.raises(ConfigError, match='teacher: give stage .* or workdir'):
    validate_config(config)
  labels.teacher.workdir = None
  with pytest.raises(ConfigError, match=r"teacher.stage='student' must name an earlier stage"):
    validate_config(config)


def test_subset_parts_are_disjoint_and_cover_the_source_and_policies_have_names():
  data = tiny_pseudo_label_config().data
  unlabelled = {sources.build_source(data)[i]['key'] for i in range(192)}
  data.subset.complement = False
  labelled = {sources.build_source(data)[i]['key'] for i in range(64)}
  assert not unlabelled & labelled and len(unlabelled | labelled) == 256
  assert augment_lib.parse_augment('S1') == ('crop', 'flip')
  assert augment_lib.parse_augment('S4') == ('scale_jitter', 'crop', 'flip', 'randaugment')
