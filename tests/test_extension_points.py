"""The extension points are closed: an objective, evaluator, data source or job supplies
everything the central code asks of it, so adding one touches its own module (and its
config file and tests), never the loop, validation or the MFU count."""

import ast
import os
import pathlib
import re
import shutil
import types

import jax
import numpy as np
import pytest
from flax import linen as nn

from big_pretrain import export as export_lib
from big_pretrain import schema
from big_pretrain import tpu_slices
from big_pretrain.accelerators import ACCELERATORS, GIB, Accelerator
from big_pretrain.compile_for import with_stand_ins
from big_pretrain.config.defaults import stage_config, tiny_stage_config
from big_pretrain.config.validation import validate_stage_config
from big_pretrain.data import convert
from big_pretrain.data import sources
from big_pretrain.data.batch_features import random_batch
from big_pretrain.data.data_config import DATA_KEYS
from big_pretrain.errors import ConfigError
from big_pretrain.evaluators import EVALUATORS, evaluator_class, evaluator_config, evaluator_names
from big_pretrain.models import transformer
from big_pretrain.models.vit import ENCODER
from big_pretrain.objectives import (CAPABILITIES, OBJECTIVES, build_objective, objective_class,
                                     objective_names, objectives_offering)
from big_pretrain.objectives.objective import Objective
from big_pretrain.stages import jobs
from big_pretrain.stages.chain import initializer_from
from big_pretrain.stages.chain_validation import validate_config
from big_pretrain.train import mfu, remat_choice, roofline
from big_pretrain.train.loop import train_stage
from big_pretrain.weights import FORMATS, public_checkpoints
from big_pretrain.weights.weight_format import WeightSource
from helpers.fictional_accelerators import V9X, Z100
from helpers.images import write_image_folder_with_broken_files
from helpers.tiny_config import one_device, one_device_trainer
from helpers.toy_weight_format import PARAMS_FILE, JsonOfLists
from helpers.trees import assert_trees_equal, named_leaves

PACKAGE = pathlib.Path(__file__).parents[1] / 'big_pretrain'


# Every table of the package (registry.Registry), each walked by parametrised tests below.
TABLES = {'OBJECTIVES': OBJECTIVES, 'EVALUATORS': EVALUATORS, 'JOBS': jobs.JOBS,
          'SOURCES': sources.SOURCES, 'FORMATS': FORMATS, 'ACCELERATORS': ACCELERATORS}


def test_every_table_of_the_package_is_walked_here():
  """A new extension point's table must join TABLES, with tests over its entries."""
  found = set()
  for path in PACKAGE.rglob('*.py'):
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
      if (isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call)
          and getattr(node.value.func, 'id', None) == 'Registry'):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        found |= {target.id for target in targets}
  assert found == set(TABLES)
  assert all(len(table) >= 1 for table in TABLES.values())


def _declared_keys(group: schema.Group):
  return [(name, key) for name, key in group.walk() if isinstance(key, schema.Key)]


def _assert_every_key_is_declared_whole(group: schema.Group, where: str):
  keys = _declared_keys(group)
  assert keys, f'{where} declares no keys'
  for name, key in keys:
    assert isinstance(key.rule, schema.Rule) and key.rule.allowed, (where, name)
    assert len(key.meaning) >= 10, (where, name, key.meaning)
    assert not key.rule.refuses(key.default), (where, name, key.default)


def _small_stage(objective: str):
  """`objective`'s tiny stage, unrolled, at batch 4."""
  return tiny_stage_config(objective, **{'model.scan': False, 'model.remat': 'none',
                                         'batch_size': 4})


@pytest.mark.parametrize('name', objective_names())
def test_each_objective_declares_its_keys_with_rules_and_meanings(name):
  objective = objective_class(name)
  assert objective.name == name and issubclass(objective, Objective)
  _assert_every_key_is_declared_whole(objective.config_keys, f'objective {name!r}')
  assert objective.config_keys['name'].default == name


@pytest.mark.parametrize('name', objective_names())
def test_each_objective_supplies_its_flops_beyond_the_encoder_and_its_encoder_tokens(name):
  objective = objective_class(name)
  assert objective.flops_beyond_encoder.__func__ is not Objective.flops_beyond_encoder.__func__
  config = _small_stage(name)
  patches = objective.encoder_patches(config)
  assert 1 <= patches <= (32 // 8) ** 2
  parts = objective.flops_beyond_encoder(config, patches + 1, num_labels=10)
  assert parts and all(flops > 0 for flops in parts.values()), parts
  assert not any(part.startswith('encoder/') for part in parts)  # the encoder is mfu.py's
  step = mfu.model_flops_breakdown(config, num_labels=10)
  assert set(parts) < set(step.forward)
  assert all(any(part.startswith(prefix) for part in step.forward)
             for prefix in objective.forward_only_parts)


def _defines(objective, method: str) -> bool:
  """Whether `objective` defines `method` itself (or a parent does), not the contract's
  default."""
  found = getattr(objective, method, None)
  default = getattr(Objective, method, None)
  return found is not None and getattr(found, '__func__', found) is not getattr(
      default, '__func__', default)


@pytest.mark.parametrize('name', objective_names())
def test_each_objective_offers_exactly_the_capabilities_it_defines(name):
  """A declared capability brings its methods; an undeclared one brings none of them (so no
  evaluator, job or export finds a method the declaration does not name)."""
  objective = objective_class(name)
  assert objective.offers <= set(CAPABILITIES), objective.offers
  for capability in CAPABILITIES:
    defined = {method: _defines(objective, method) for method in capability.methods}
    if capability in objective.offers:
      assert all(defined.values()), (name, capability.name, defined)
    else:
      assert not any(defined.values()), (name, capability.name, defined)
  for capability in objective.offers:
    assert name in objectives_offering(capability)


@pytest.mark.parametrize('kind', evaluator_names())
def test_each_evaluators_need_is_offered_and_refused_before_any_compute(kind):
  needs = evaluator_class(kind).needs
  if needs is None:
    return
  assert objectives_offering(needs), f'no objective offers what {kind!r} needs'
  refusing = next(name for name in objective_names() if needs not in objective_class(name).offers)
  config = tiny_stage_config(refusing)
  config.evals[kind] = evaluator_config(kind)
  with pytest.raises(ConfigError, match=rf"config\.evals\.{kind}: kind='{kind}' needs an "
                                        rf'objective that .*objective \'{refusing}\' does not'):
    validate_stage_config(config)


@pytest.mark.parametrize('name', objective_names())
@pytest.mark.integration
def test_each_objectives_tiny_stage_takes_a_training_step(name, tmp_path):
  """objective.tiny_settings() on config.defaults.TINY_STAGE: a small model whose loss and
  gradients are finite on a batch of its data's features (pseudo-labels stand in for a
  student's)."""
  config, _ = with_stand_ins(tiny_stage_config(name), str(tmp_path))
  objective = build_objective(config)
  params = nn.meta.unbox(objective.init_params(jax.random.key(0)))
  assert sum(leaf.size for leaf in jax.tree_util.tree_leaves(params)) < 1_000_000
  batch = random_batch(config.data, config.batch_size, np.random.default_rng(0))
  (loss, _), grads = jax.jit(jax.value_and_grad(
      lambda p: objective.loss(p, batch, jax.random.key(1)), has_aux=True))(params)
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(grad)) for grad in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize('kind', evaluator_names())
def test_each_evaluator_declares_its_keys_with_rules_and_meanings(kind):
  keys = evaluator_class(kind).config_keys
  _assert_every_key_is_declared_whole(keys, f'evaluator {kind!r}')
  assert keys['kind'].default == kind and 'every_steps' in keys


def test_the_data_config_declares_every_key_and_each_source_is_built():
  _assert_every_key_is_declared_whole(DATA_KEYS, 'config.data')
  assert DATA_KEYS['source'].rule.allowed == f'choose one of {tuple(sources.SOURCES.names())}'


def _image_folder(tmp_path) -> dict:
  return {'path': str(write_image_folder_with_broken_files(tmp_path / 'images'))}


def _converted_image_folder(tmp_path) -> dict:
  convert.convert(_image_folder(tmp_path)['path'], str(tmp_path / 'converted'))
  return {'path': str(tmp_path / 'converted')}


def _prepared_tfds_dataset(tmp_path) -> dict:
  pytest.importorskip('tensorflow_datasets')
  # test_array_record.py's tiny dataset, as TFDS prepared it (read without TensorFlow).
  shutil.copytree(pathlib.Path(__file__).parent / 'data' / 'tfds' / 'array_record',
                  tmp_path / 'tfds')
  return {'tfds_name': 'tiny_tfds_for_test', 'tfds_data_dir': str(tmp_path / 'tfds')}


# config.data's settings that give a source small data to read, for the sources that read
# files (written under tmp_path); the others are built from their keys' defaults.
_SMALL_DATA = {'image_folder': _image_folder, 'array_record': _converted_image_folder,
               'tfds': _prepared_tfds_dataset}


def _assert_source_declares_itself_and_builds(source, data_settings: dict):
  """What the registry asks of a data source: its name and keys declared (each in config.data,
  as declared), and a stage reading it validates and builds it, examples as source.py says."""
  name = source.name
  assert sources.SOURCES[name] is source and issubclass(source, sources.RegisteredSource)
  assert isinstance(source.data_keys, schema.Group)
  assert source.data_keys or source.path_holds, f'nothing configures data source {name!r}'
  if source.data_keys:
    _assert_every_key_is_declared_whole(source.data_keys, f'data source {name!r}')
  for key, declared in source.data_keys.items():
    assert DATA_KEYS[key] is declared, (name, key)  # no other module declares it anew
  assert not DATA_KEYS['source'].rule.refuses(name) and name in DATA_KEYS['source'].rule.allowed
  config = _small_stage('mae')
  config.data.update(source=name, **data_settings)
  validate_config(config)
  built = sources.build_source(config.data)
  assert isinstance(built, source) and len(built) > 0
  assert len(built.class_names) == built.num_classes
  example = built[0]
  assert isinstance(example['key'], str) and isinstance(example['label'], int)
  assert isinstance(example['caption'], str) and isinstance(example['hashtags'], list)
  assert len({'image', 'image_path', 'image_bytes'} & set(example)) == 1, sorted(example)


@pytest.mark.parametrize('name', sources.SOURCES.names())
def test_each_data_source_declares_its_name_and_keys_and_builds_from_a_config(name, tmp_path):
  settings = _SMALL_DATA.get(name, lambda _: {})(tmp_path)
  _assert_source_declares_itself_and_builds(sources.SOURCES[name], settings)


class _BlankImages(sources.RegisteredSource):
  """A data source written outside the package: `constant_examples` black images."""

  name = 'constant'
  data_keys = schema.Group(
      'black images, for a test',
      constant_examples=schema.Key(4, schema.COUNT, 'constant only: how many black images'))
  class_names, num_classes = [], 0

  def __init__(self, num_examples: int):
    self._num_examples = num_examples

  @classmethod
  def from_config(cls, data, split: str):
    return cls(data.constant_examples)

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index: int) -> dict:
    return {'key': f'constant/{int(index)}', 'image': np.zeros((8, 8, 3), np.uint8),
            'label': -1, 'caption': '', 'hashtags': []}


def test_a_data_source_registered_outside_the_package_is_configured_validated_and_built():
  """Adding a source is its class and one line in SOURCES: nothing else names it."""
  with sources.SOURCES.registered(_BlankImages):
    assert stage_config('mae').data.constant_examples == 4  # its key, in every stage config
    config = _small_stage('mae')
    config.data.update(source='constant', constant_examples=3)
    validate_config(config)
    assert len(sources.build_source(config.data)) == 3
    config.data.constant_examples = 0
    with pytest.raises(ValueError, match=r'config\.data\.constant_examples=0: must be an integer '
                                         r'>= 1 \(constant only: how many black images\)'):
      validate_config(config)
    _assert_source_declares_itself_and_builds(_BlankImages, {})
  assert 'constant_examples' not in stage_config('mae').data
  config = _small_stage('mae')
  config.data.source = 'constant'
  with pytest.raises(ValueError, match=r"config\.data\.source='constant': choose one of "
                                       r"\('array_record', 'image_folder', 'synthetic', 'tfds'\)"):
    validate_config(config)

  class Clash(_BlankImages):  # declares a key the tfds source declares
    name = 'clash'
    data_keys = schema.Group('a clash, for a test', tfds_name=schema.Key(
        None, schema.OPTIONAL_TEXT, 'clash only: a name', type=str))

  with sources.SOURCES.registered(Clash), pytest.raises(
      ValueError, match=r"'tfds_name' .* declared twice: by 'a TFDS dataset prepared in "
                        r"ArrayRecord format' and by 'a clash, for a test'"):
    stage_config('mae')


@pytest.mark.parametrize('name', jobs.job_names())
def test_each_job_declares_its_keys_and_validates_its_defaults_but_the_teacher(name):
  job = jobs.job_module(name)
  _assert_every_key_is_declared_whole(job.CONFIG_KEYS, f'job {name!r}')
  assert job.JOB == name and job.default_config().job == name
  for attribute in ('check_config', 'results', 'run'):
    assert callable(getattr(job, attribute)), attribute


def test_central_modules_name_no_objective():
  """What the issue that closed these extension points asked: no per-objective branch in
  train/ or config/."""
  for folder in ('train', 'config'):
    for path in (PACKAGE / folder).glob('*.py'):
      for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute):
          assert not (node.left.attr == 'name' and ast.unparse(node.left).endswith(
              'objective.name')), f'{path}: {ast.unparse(node)}'
        if isinstance(node, ast.Constant) and node.value in objective_names():
          raise AssertionError(f'{path}: names objective {node.value!r}')


def test_a_chain_checks_each_stage_reference_by_its_declared_kind():
  """init_from.stage must name a training stage; a student's data.pseudo_labels.stage a
  pseudo-label stage: the declarations say so, the chain checks it."""
  from big_pretrain.config.defaults import chain_config  # pylint: disable=import-outside-toplevel
  first, second = _small_stage('mae'), _small_stage('wsp')
  second.init_from.stage = 'mae'
  validate_config(chain_config(mae=first, wsp=second))
  student = _small_stage('self_training')
  student.data.pseudo_labels.stage = 'mae'
  with pytest.raises(ValueError, match=r"pseudo_labels\.stage='mae' is a training stage; name a "
                                       r'pseudo_label stage \(job=pseudo_label\)'):
    validate_config(chain_config(mae=first, student=student))


# ---------------------------------------------------------------- accelerators


def _assert_accelerator_is_whole(accelerator: Accelerator):
  """What every reader of ACCELERATORS asks of an entry: positive numbers, its device kinds
  matched back to it alone (the MFU's peak), and for a Cloud TPU generation its bandwidths
  (the roofline) and slices that parse back to it with hosts to run them (--compile_for,
  launch/tpu_pod.sh, whose agreement tests/test_tpu_pod_launch.py checks)."""
  assert accelerator.platform in ('tpu', 'gpu') and accelerator.label and accelerator.peak_source
  assert accelerator.hbm_per_device > 0 and accelerator.bf16_flops >= accelerator.f32_flops > 0
  assert accelerator.device_kinds, f'{accelerator.name}: no device_kind to find it by'
  for kind in accelerator.device_kinds:
    assert [entry.name for entry in ACCELERATORS if entry.matches(kind)] == [accelerator.name]
    device = types.SimpleNamespace(device_kind=kind)
    assert mfu.peak_flops_per_device(device, 'bfloat16') == accelerator.bf16_flops
    assert mfu.describe_peak(device).startswith(f'{accelerator.label} bfloat16: ')
  rules = accelerator.slices
  if rules is None:
    return
  assert accelerator.platform == 'tpu', 'only a Cloud TPU generation has slices'
  assert accelerator.hbm_bandwidth > 0 and accelerator.ici_bandwidth > 0
  assert accelerator.dcn_bandwidth is None or accelerator.dcn_bandwidth > 0
  assert roofline.Chip.of(accelerator).peak_flops == accelerator.bf16_flops
  assert rules.runtime_version and rules.chips_per_host > 0
  assert 1 <= rules.min_chips <= rules.single_host_max_chips <= rules.max_chips
  assert rules.example in tpu_slices.slice_names(accelerator)  # named with Cloud TPU's prefix
  assert f"'{rules.example}'" in tpu_slices.slice_names_example()
  for prefix in rules.prefixes:
    for name in tpu_slices.slice_names(accelerator, prefix):
      tpu_slice = tpu_slices.parse_slice(name)
      assert tpu_slice.generation is accelerator and tpu_slice.hosts >= 1, name
      assert tpu_slice.topology.startswith(f'{rules.topology_prefix}:'), name


@pytest.mark.parametrize('name', ACCELERATORS.names())
def test_each_accelerator_is_complete_and_found_by_its_device_kinds(name):
  _assert_accelerator_is_whole(ACCELERATORS[name])


def test_an_accelerator_registered_outside_the_package_is_found_and_its_slices_parse():
  tpu = types.SimpleNamespace(device_kind='TPU v9x')  # a topology's device: no memory_stats
  gpu = types.SimpleNamespace(device_kind='NVIDIA Z100-SXM-192GB')  # a variant of its kind
  assert mfu.peak_flops_per_device(tpu) is None and mfu.peak_flops_per_device(gpu) is None
  with ACCELERATORS.registered(V9X), ACCELERATORS.registered(Z100):
    _assert_accelerator_is_whole(V9X)
    _assert_accelerator_is_whole(Z100)
    assert mfu.peak_flops_per_device(tpu, 'bfloat16') == 2000e12
    assert mfu.peak_flops_per_device(gpu, 'float32') == 1500e12
    assert remat_choice.device_memory_limit(tpu) == 64 * GIB
    two_slices = tpu_slices.parse_slice('v9x-8', num_slices=2)
    assert (two_slices.topology, two_slices.num_devices, two_slices.hosts) == ('v9x:2x4', 16, 2)
    assert "'v9x-16'" in tpu_slices.slice_names_example()
    assert tpu_slices.slice_name_forms().endswith(', v9x-N')  # --compile_for's refusals
    with pytest.raises(ValueError, match="'v9x-512' is larger than any v9x slice"):
      tpu_slices.parse_slice('v9x-512')
  assert 'v9x' not in ACCELERATORS and mfu.peak_flops_per_device(tpu) is None
  with pytest.raises(ValueError, match="'v9x-8' is not a Cloud TPU slice name"):
    tpu_slices.parse_slice('v9x-8')


# --- Weight formats: every entry of weights.FORMATS keeps weight_format.py's contract.

def _random_params(config, seed=0):
  """The objective's parameters, each leaf drawn at random (a zero head or bias would hide
  a misplaced one)."""
  shapes = nn.meta.unbox(jax.eval_shape(build_objective(config).init_params, jax.random.key(0)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: rng.normal(0, 0.5, leaf.shape).astype(np.float32), shapes)


def _big_vision_npz(params: dict, folder: pathlib.Path) -> tuple[str, dict]:
  """An .npz of `params`' encoder and head under big_vision's module names (its ViT is ours
  in flax), and those parts."""
  renames = ((r'^encoder/patch_embed/', 'embedding/'), (r'^encoder/cls_token$', 'cls'),
             (r'^encoder/pos_embedding$', 'pos_embedding'),
             (r'^encoder/transformer/norm/', 'Transformer/encoder_norm/'),
             (r'^encoder/transformer/block_(\d+)/', r'Transformer/encoderblock_\1/'),
             ('/norm1/', '/LayerNorm_0/'), ('/norm2/', '/LayerNorm_1/'),
             ('/attention/', '/MultiHeadDotProductAttention_0/'),
             ('/mlp/fc1/', '/MlpBlock_0/Dense_0/'), ('/mlp/fc2/', '/MlpBlock_0/Dense_1/'))
  parts = {name: params[name] for name in (ENCODER, 'head')}
  arrays = {}
  for name, leaf in named_leaves(transformer.scanned_to_unrolled(parts)).items():
    for pattern, replacement in renames:
      name = re.sub(pattern, replacement, name)
    arrays[f'params/{name}'] = leaf
  np.savez(folder / 'model.npz', **arrays)
  return str(folder / 'model.npz'), parts


# How a test gets a checkpoint of each format that is read, not written.
_READ_ONLY_FIXTURES = {'big_vision': _big_vision_npz}


def _checkpoint_in(weight_format, config, params: dict, folder: pathlib.Path) -> tuple[str, dict]:
  """(a checkpoint of `params` in `weight_format`: an export it wrote, or a fixture of its
  kind; the parameter subtrees it holds)."""
  folder.mkdir(parents=True)
  if not weight_format.can_write:
    assert weight_format.name in _READ_ONLY_FIXTURES, (
        f'add a fixture of {weight_format.name} weights to _READ_ONLY_FIXTURES')
    return _READ_ONLY_FIXTURES[weight_format.name](params, folder)
  model = export_lib.stage_model(config, encoder_only=False)
  parts = {name: params[name] for name in weight_format.params_written(model) if name in params}
  labels = [f'label_{i}' for i in range(params['head']['kernel'].shape[-1])] if model.head else None
  exported = weight_format.write(model, parts, labels)
  assert exported.files and set(exported.files) <= set(weight_format.export_files)
  assert exported.model and exported.arrays > 0 and exported.parameters > 0
  for name, data in exported.files.items():
    (folder / name).write_bytes(data)
  return str(folder), parts


def _assert_keeps_the_weight_format_contract(weight_format, tmp_path: pathlib.Path):
  """What every entry of FORMATS must do: its name is its key; it recognises a checkpoint
  of its own (one it wrote, or a fixture of its kind) and no other format's, and no other
  format recognises its own; init_from's checks pass on it; and reading one gives back the
  parameters it holds, bit for bit (for a format that writes MAE's decoder, a MAE stage's
  too)."""
  assert weight_format.name and FORMATS[weight_format.name] is weight_format
  assert weight_format.title and all(suffix.startswith('.') for suffix in weight_format.suffixes)
  config = tiny_stage_config('wsp', **{'model.posemb': 'learned'})
  params = _random_params(config)
  checkpoints = {other.name: _checkpoint_in(other, config, params, tmp_path / other.name)
                 for other in FORMATS}
  for name, (path, _) in checkpoints.items():
    assert weight_format.recognises(WeightSource(path)) == (name == weight_format.name), path
  path, parts = checkpoints[weight_format.name]
  assert public_checkpoints.format_of(WeightSource(path)) is weight_format
  assert public_checkpoints.is_public_checkpoint(path)
  public_checkpoints.check_public_checkpoint(path)
  if weight_format.can_write:  # an export of it is recognised as its, or as no format's
    assert [f.name for f in FORMATS if f.holds_export(path)] in ([], [weight_format.name])
  round_trips = [(params, path, parts)]
  if weight_format.writes_decoder:
    mae_config = tiny_stage_config('mae')
    mae_params = _random_params(mae_config)
    mae_path, mae_parts = _checkpoint_in(weight_format, mae_config, mae_params, tmp_path / 'mae')
    assert 'decoder' in mae_parts
    round_trips.append((mae_params, mae_path, mae_parts))
  for target, path, parts in round_trips:
    read = public_checkpoints.read_public_checkpoint(path, target)
    assert sorted(read) == sorted(parts), path
    assert_trees_equal(transformer.scanned_to_unrolled(read),
                       transformer.scanned_to_unrolled(parts))


@pytest.mark.parametrize('name', FORMATS.names())
def test_each_weight_format_keeps_the_contract(name, tmp_path):
  _assert_keeps_the_weight_format_contract(FORMATS[name], tmp_path)


@pytest.fixture(scope='module', name='trained_wsp')
def fixture_trained_wsp(tmp_path_factory):
  """(a trained tiny WSP stage's folder in its workdir, its parameters)."""
  stage = tmp_path_factory.mktemp('run') / 'wsp'
  config = tiny_stage_config('wsp', total_steps=2)
  result = train_stage(config, str(stage), devices=one_device())
  return stage, jax.device_get(result.state.params)


@pytest.mark.integration
def test_a_weight_format_registered_outside_the_package_is_exported_and_read(trained_wsp,
                                                                            tmp_path):
  """export's --format offers it and writes it; init_from recognises, checks and reads its
  export, into a stage's own layout; and the contract's check passes on it."""
  stage, trained = trained_wsp
  out = tmp_path / 'exported'
  toy = JsonOfLists()
  with FORMATS.registered(toy):
    _assert_keeps_the_weight_format_contract(toy, tmp_path / 'contract')
    export_lib.main([str(stage), f'--format={toy.name}', f'--output={out}'])
    assert sorted(os.listdir(out)) == [PARAMS_FILE]
    for checkpoint in (str(out), str(out / PARAMS_FILE)):
      config = tiny_stage_config('wsp', **{'init_from.checkpoint': checkpoint})
      validate_config(config)  # init_from's checks, before any model is built
      fresh = one_device_trainer(config).init_state(jax.random.key(1)).params
      started = initializer_from(config.init_from, str(tmp_path))(fresh)
      assert_trees_equal(jax.device_get(started[ENCODER]), trained[ENCODER])
  assert toy.name not in FORMATS
  with pytest.raises(SystemExit) as refused:
    export_lib.main([str(stage), f'--format={toy.name}', f'--output={tmp_path / "again"}'])
  assert refused.value.code == 2
