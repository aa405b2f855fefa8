"""The cases reliability/bad_inputs.py runs: the table of bad inputs and faults as filed
(TABLE_ROWS; a row may name several cases), and the cases that cover it and a few more, each
with what was done and the check that does it (reliability/bad_input_checks.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
from typing import Callable

from big_pretrain.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_STOPPED, EXIT_USAGE
from reliability.bad_input_checks import (
    BASE_TOTAL_STEPS, CARRY_ON, EXIT_OK, REFUSE, Context, Observed, chain_unreadable,
    checkpoints_deleted, disk_full, empty_lock_file, finished_rerun, held_out_smaller_than_batch,
    image_folder_run, read_only_workdir, refused_at_start, refused_unchanged, remove_arrays,
    remove_metadata, resume_allowed, sigkill_then_rerun, signalled, signalled_at_start,
    truncate_config_json, truncate_largest, two_runs_at_once, unreadable_checkpoint)
from reliability import fourth_ring_checks as checks
from reliability.damaged_file_checks import (
    DAMAGED_DATA_FILES, backend_cannot_start, damaged_block_mid_shard, damaged_config_history,
    damaged_eval_results, flip_a_bit_that_still_decodes, refused_data_file)

# The table of bad inputs and faults every run must answer clearly, as it was filed:
# row id -> (the row's words; the case names that cover it).
TABLE_ROWS = {
    'identity': ('restart in the same workdir with lr, mask ratio, batch size, seed or data '
                 'source changed', ('lr', 'mask_ratio', 'batch_size', 'seed', 'data_source')),
    'width': ('restart with a different model width', ('model_width',)),
    'metadata': ('checkpoints/<latest>/state/_METADATA missing', ('metadata_missing',)),
    'unreadable': ('every image in the folder unreadable', ('all_unreadable',)),
    'held_out': ('held-out folder smaller than an evaluator\'s batch', ('held_out_7_of_8',)),
    'mask_range': ('objective.mask_ratio=1.0 or 1.5 for MAE', ('mask_ratio_1.0',
                                                                'mask_ratio_1.5')),
    'one_line': ('--config.total_steps=abc, missing config file, a config that raises, :dmeo, '
                 'no --workdir, workdir is a file, read-only workdir, image size not a multiple '
                 'of the patch',
                 ('total_steps_abc', 'missing_config', 'config_raises', 'dmeo', 'no_workdir',
                  'workdir_is_file', 'read_only_workdir', 'image_size_30')),
    'late': ('batch not divisible by the devices; data path missing or empty',
             ('batch_vs_devices', 'data_path_missing', 'data_path_empty')),
    'two_runs': ('two runs started into one workdir', ('two_runs',)),
    'disk_full': ('disk full during a save', ('disk_full',)),
    'chain': ('an earlier stage\'s final checkpoint unreadable in a chain', ('chain_unreadable',)),
    'signals': ('SIGINT (Ctrl-C); SIGTERM', ('sigint', 'sigterm')),
    'deleted': ('all checkpoints deleted, folder kept', ('checkpoints_deleted',)),
    'finished': ('a finished workdir run again with another config',
                 ('finished_other_model', 'finished_other_mask_ratio', 'finished_other_seed')),
    'values': ('a config value out of its range or choices, or legal but suspicious',
               ('lr_negative', 'dtype_unknown', 'batch_size_0', 'warmup_beyond_total',
                'lr_above_0.1')),
    'damaged': ('a damaged file the run reads from its workdir or a data path',
                ('eval_results_truncated', 'config_history_truncated',
                 *(damaged.name for damaged in DAMAGED_DATA_FILES))),
    'start_signal': ('SIGTERM or Ctrl-C before the first step',
                     ('sigterm_at_start', 'sigterm_while_compiling', 'sigint_while_compiling')),
    'altered': ("bytes of a checkpoint's array data altered after it was written; a block "
                'damaged in the middle of an ArrayRecord shard; a backend that cannot start',
                ('checkpoint_bit_flipped', 'shard_block_damaged', 'backend_cannot_start')),
    'removable_integrity': (
        "a step's digests deleted, emptied or missing an array, its bytes altered: on resume, "
        'in init_from and in the export',
        ('digests_deleted', 'digests_emptied', 'digests_missing_array', 'init_from_damaged_step',
         'export_damaged_step')),
    'config_record': (
        "a stage's config.json that lost its model, objective, seed or batch size, or that an "
        'export wrote over',
        ('config_json_lost_model', 'config_json_lost_objective', 'config_json_lost_seed',
         'config_json_lost_batch_size', 'config_json_is_an_export')),
    'export_output': (
        "an export into a stage's folder, a workdir or a folder inside one, over another "
        "format's export, into a file or onto a read-only filesystem",
        ('export_into_stage', 'export_into_workdir', 'export_inside_stage',
         'export_over_timm_export', 'export_output_is_file', 'export_output_read_only')),
    'foreign_weights': (
        'init_from.checkpoint: a Hugging Face folder without config.json, bfloat16 safetensors, '
        'a file whose name says another format, a cut file, NaN values, a .pth holding other '
        'objects, a ViT of another width, no such path',
        ('init_from_hf_without_config', 'init_from_bf16', 'init_from_npz_named_safetensors',
         'init_from_html_named_pth', 'init_from_cut_safetensors', 'init_from_nan',
         'init_from_pth_with_args', 'init_from_other_width', 'init_from_missing')),
    'command_inputs': (
        "the export's --format, --step and stage; --compile_for with a file as --workdir or a "
        "slice larger than its generation's; the converter's and the vocabulary builder's paths "
        'and flags',
        ('export_bad_format', 'export_bad_step', 'export_missing_step', 'export_no_stage',
         'compile_for_workdir_is_file', 'compile_for_v5e_512', 'convert_input_missing',
         'convert_output_is_file', 'convert_examples_abc', 'vocabulary_source_missing',
         'vocabulary_output_is_folder')),
    'beam_inputs': (
        "the converter's input glob matching nothing, a tar that is not a tar, a Beam runner "
        'that does not exist, a Beam option no class declares, Dataflow without its companions',
        ('convert_glob_matches_nothing', 'convert_not_a_tar', 'convert_no_such_runner',
         'convert_unknown_beam_option', 'convert_dataflow_alone')),
}


@dataclasses.dataclass(frozen=True)
class Case:
  """A bad input or fault, and the check that tries it against main.py."""
  name: str
  row: str           # an TABLE_ROWS id, or 'added'
  done: str          # what was done, for the table
  check: Callable[[Context], Observed]
  needs: str = ''    # a shared fixture it copies: 'trained' or 'chain'


def _identity_case(name: str, override: str, diff: str) -> Case:
  return Case(name, 'identity', f'resume the 4-step workdir (total_steps 4 -> 6) with `{override}`',
              lambda ctx: refused_unchanged(ctx, *override.split(), evidence=re.escape(diff)),
              needs='trained')


def _bad_override(name: str, row: str, override: str, evidence: str, done_note: str = '',
                  devices: int = 1) -> Case:
  """A new run of the tiny config with `override`, which must be refused at the start."""
  return Case(name, row, f'`{override}`{done_note}',
              lambda ctx: refused_at_start(ctx, ctx.tiny(), ctx.fresh(), override,
                                           evidence=evidence, devices=devices))


def _finished_other(name: str, override: str, diff: str) -> Case:
  return Case(name, 'finished', f'rerun the finished 4-step workdir with `{override}`',
              lambda ctx: refused_unchanged(
                  ctx, f'--config.total_steps={BASE_TOTAL_STEPS}', override,
                  evidence=re.escape(diff) + '(?s:.*)That run is finished'), needs='trained')


def _carries_on_warning(name: str, override: str, evidence: str) -> Case:
  """A new run with `override`: legal, so it trains, after one warning line."""
  return Case(name, 'values', f'`{override}`',
              lambda ctx: Observed(ctx.main(ctx.tiny(), ctx.fresh(), override), CARRY_ON,
                                   (EXIT_OK,), evidence))


def _second_ring_cases() -> list[Case]:
  """Finished stages, every config value, damaged files and a signal before the first step."""
  return [
      _finished_other('finished_other_model', '--config.model.variant=Ti/8',
                      'model.variant: "mu/8" -> "Ti/8"'),
      _finished_other('finished_other_mask_ratio', '--config.objective.mask_ratio=0.5',
                      'objective.mask_ratio: 0.75 -> 0.5'),
      _finished_other('finished_other_seed', '--config.seed=1', 'seed: 0 -> 1'),
      _bad_override('lr_negative', 'values', '--config.optim.lr_per_256=-0.001',
                    re.escape('optim.lr_per_256=-0.001')),
      _bad_override('dtype_unknown', 'values', '--config.model.dtype=float17',
                    re.escape("model.dtype='float17'")),
      _bad_override('batch_size_0', 'values', '--config.batch_size=0',
                    re.escape('batch_size=0')),
      _carries_on_warning('warmup_beyond_total', '--config.optim.warmup_steps=10',
                          re.escape('warmup_steps=10 is not below')),
      _carries_on_warning('lr_above_0.1', '--config.optim.lr_per_256=5.0',
                          re.escape('lr_per_256=5.0 at batch')),
      Case('eval_results_truncated', 'damaged', 'the finished workdir with a reconstruction '
           'evaluator and its eval_results.json cut short; the same command',
           damaged_eval_results, needs='trained'),
      Case('config_history_truncated', 'damaged', 'config_history.jsonl of the 4-step workdir '
           'cut in half; resume to 6 steps', damaged_config_history, needs='trained'),
      *(Case(damaged.name, 'damaged', damaged.done,
             lambda ctx, damaged=damaged: refused_data_file(ctx, damaged))
        for damaged in DAMAGED_DATA_FILES),
      Case('sigterm_at_start', 'start_signal', 'SIGTERM once the run lock is taken',
           lambda ctx: signalled_at_start(ctx, signal.SIGTERM, (EXIT_PREEMPTED,),
                                          "SIGTERM before a stage's next step")),
      Case('sigterm_while_compiling', 'start_signal', 'SIGTERM 0.5 s after `Model FLOPs` is '
           'logged (the initialization compiles)',
           lambda ctx: signalled_at_start(ctx, signal.SIGTERM, (EXIT_PREEMPTED,), 'Preempted',
                                          after_line='Model FLOPs per step', delay=0.5)),
      Case('sigint_while_compiling', 'start_signal', 'Ctrl-C 0.5 s after `Model FLOPs` is logged',
           lambda ctx: signalled_at_start(ctx, signal.SIGINT, (EXIT_INTERRUPTED, EXIT_PREEMPTED),
                                          'Interrupted|Preempted',
                                          after_line='Model FLOPs per step', delay=0.5)),
  ]


def cases() -> list[Case]:
  """Every case, in the order of the table's rows; added ones after their row."""
  bad_images = ['--config.data.source=image_folder']
  return [
      _identity_case('lr', '--config.optim.lr_per_256=2e-3', 'optim.lr_per_256: 0.001 -> 0.002'),
      _identity_case('mask_ratio', '--config.objective.mask_ratio=0.5',
                     'objective.mask_ratio: 0.75 -> 0.5'),
      _identity_case('batch_size', '--config.batch_size=32', 'batch_size: 16 -> 32'),
      _identity_case('seed', '--config.seed=1', 'seed: 0 -> 1'),
      Case('data_source', 'identity', 'resume the 4-step workdir with `--config.data.source='
           'image_folder --config.data.path=<16 PNGs>`',
           lambda ctx: refused_unchanged(
               ctx, *bad_images, f'--config.data.path={ctx.fixture("good_images")}',
               evidence=re.escape('data.source: "synthetic" -> "image_folder"')),
           needs='trained'),
      Case('resume_with_changes', 'added', 'the `lr` case with `--config.resume_with_changes='
           'True`', lambda ctx: resume_allowed(
               ctx, '--config.optim.lr_per_256=2e-3', '--config.resume_with_changes=True',
               evidence='resume_with_changes=True allows'), needs='trained'),
      Case('longer_schedule', 'added', 'resume the 4-step workdir with total_steps 6 only',
           lambda ctx: resume_allowed(ctx, evidence='Resuming with changed keys'),
           needs='trained'),
      Case('model_width', 'width', 'resume the 4-step workdir with `--config.model.variant=Ti/8`'
           ' (width 192)', lambda ctx: refused_unchanged(
               ctx, '--config.model.variant=Ti/8', evidence=re.escape(
                   'model.variant: "mu/8" -> "Ti/8"')), needs='trained'),
      Case('metadata_missing', 'metadata', 'delete checkpoints/4/state/_METADATA, rerun',
           lambda ctx: unreadable_checkpoint(ctx, remove_metadata, '_METADATA is missing'),
           needs='trained'),
      Case('arrays_missing', 'added', 'delete the array files of checkpoints/4, rerun',
           lambda ctx: unreadable_checkpoint(ctx, remove_arrays, 'cannot be read'),
           needs='trained'),
      Case('truncated_file', 'added', 'truncate the largest file of checkpoints/4 to half, rerun',
           lambda ctx: unreadable_checkpoint(ctx, truncate_largest, 'cannot be read'),
           needs='trained'),
      Case('all_unreadable', 'unreadable', 'train on a folder of 8 garbage .jpg files only',
           lambda ctx: image_folder_run(ctx, 'garbage_images', expect=REFUSE,
                                        exit_codes=(EXIT_STOPPED,),
                                        evidence='max_consecutive_unreadable')),
      Case('half_unreadable', 'added', 'train on 16 PNGs and 8 garbage .jpg files',
           lambda ctx: image_folder_run(ctx, 'half_garbage', expect=CARRY_ON,
                                        exit_codes=(EXIT_OK,),
                                        evidence='Skipping unreadable image')),
      Case('held_out_7_of_8', 'held_out', 'reconstruction of 8 images, held-out folder of 7; '
           'then the same command again', held_out_smaller_than_batch),
      _bad_override('mask_ratio_1.0', 'mask_range', '--config.objective.mask_ratio=1.0',
                    re.escape('must lie in [0, 1)')),
      _bad_override('mask_ratio_1.5', 'mask_range', '--config.objective.mask_ratio=1.5',
                    re.escape('must lie in [0, 1)')),
      _bad_override('mask_ratio_0.99', 'added', '--config.objective.mask_ratio=0.99',
                    'keeps 0 of the 16 patches visible', ' (16 patches)'),
      _bad_override('total_steps_abc', 'one_line', '--config.total_steps=abc', 'invalid literal'),
      Case('missing_config', 'one_line', '`--config=configs/nope.py`',
           lambda ctx: refused_at_start(ctx, '--config=configs/nope.py', ctx.fresh(),
                                        evidence='no such file')),
      Case('config_raises', 'one_line', 'a config file whose get_config raises ValueError',
           lambda ctx: refused_at_start(ctx, f'--config={ctx.fixture("raising.py")}',
                                        ctx.fresh(), evidence='ValueError: no such recipe')),
      Case('dmeo', 'one_line', '`--config=configs/mae.py:dmeo`',
           lambda ctx: refused_at_start(ctx, '--config=configs/mae.py:dmeo', ctx.fresh(),
                                        evidence="unknown variant 'dmeo'")),
      Case('no_workdir', 'one_line', 'no `--workdir`',
           lambda ctx: refused_at_start(ctx, ctx.tiny(), evidence='--workdir=DIR is required')),
      Case('no_config', 'added', 'no `--config`',
           lambda ctx: refused_at_start(ctx, ctx.fresh(), evidence='--config=.* is required')),
      _bad_override('unknown_key', 'added', '--config.optim.lr=1', 'lr_per_256',
                    ' (no such key)'),
      Case('workdir_is_file', 'one_line', '`--workdir=` an existing file',
           lambda ctx: refused_at_start(ctx, ctx.tiny(),
                                        f'--workdir={ctx.fixture("raising.py")}',
                                        evidence='is a file, not a folder')),
      Case('read_only_workdir', 'one_line', '`--workdir=` inside a read-only tmpfs mount',
           read_only_workdir),
      _bad_override('image_size_30', 'one_line', '--config.data.image_size=30',
                    'not a multiple of the patch size 8', ' (patch 8)'),
      _bad_override('batch_vs_devices', 'late', '--config.batch_size=12',
                    'multiple of the 8 devices', ' on 8 CPU devices', devices=8),
      Case('data_path_missing', 'late', '`--config.data.path=` a folder that does not exist',
           lambda ctx: refused_at_start(ctx, ctx.tiny(), ctx.fresh(), *bad_images,
                                        f'--config.data.path={ctx.fixture("nowhere")}',
                                        evidence='does not exist')),
      Case('data_path_empty', 'late', '`--config.data.path=` a class folder with no images',
           lambda ctx: refused_at_start(ctx, ctx.tiny(), ctx.fresh(), *bad_images,
                                        f'--config.data.path={ctx.fixture("no_images")}',
                                        evidence='No images found')),
      Case('two_runs', 'two_runs', 'start the same command twice at once into one new workdir',
           two_runs_at_once),
      Case('empty_lock', 'added', 'an empty run.lock in the workdir (a run killed while '
           'writing it)', lambda ctx: refused_unchanged(
               ctx, damage=empty_lock_file, exit_codes=(EXIT_USAGE,),
               evidence='lock file that names no run'), needs='trained'),
      Case('disk_full', 'disk_full', 'workdir on a 64 MiB tmpfs, filled up after the first '
           'checkpoint; then freed and the same command rerun', disk_full),
      Case('chain_unreadable', 'chain', 'MAE -> WSP chain finished; delete '
           'mae/checkpoints/4/state/_METADATA, rerun', chain_unreadable, needs='chain'),
      Case('sigint', 'signals', 'SIGINT (Ctrl-C) after the first checkpoint; then the same '
           'command', lambda ctx: signalled(ctx, (signal.SIGINT,), (EXIT_PREEMPTED,),
                                            'Preempted', resume=True)),
      Case('sigterm', 'signals', 'SIGTERM after the first checkpoint',
           lambda ctx: signalled(ctx, (signal.SIGTERM,), (EXIT_PREEMPTED,), 'Preempted',
                                 resume=False)),
      Case('double_ctrl_c', 'added', 'two SIGINTs 20 ms apart after the first checkpoint',
           lambda ctx: signalled(ctx, (signal.SIGINT, signal.SIGINT),
                                 (EXIT_INTERRUPTED, EXIT_PREEMPTED), 'Interrupted|Preempted',
                                 resume=False)),
      Case('sigkill', 'added', 'SIGKILL after the first checkpoint; then the same command',
           sigkill_then_rerun),
      Case('checkpoints_deleted', 'deleted', 'delete everything in checkpoints/, keep the folder,'
           ' rerun', checkpoints_deleted, needs='trained'),
      Case('finished_rerun', 'added', 'rerun the finished 4-step workdir as it was',
           finished_rerun, needs='trained'),
      Case('damaged_config_json', 'added', 'truncate the workdir\'s config.json to half, rerun',
           lambda ctx: refused_unchanged(ctx, damage=truncate_config_json,
                                         evidence='config.json cannot be read'),
           needs='trained'),
  ] + _second_ring_cases() + _third_ring_cases() + _fourth_ring_cases()


def _third_ring_cases() -> list[Case]:
  """Bytes altered in place (read back as other numbers), and a backend that does not start."""
  return [
      Case('checkpoint_bit_flipped', 'altered', 'flip one bit of checkpoints/4\'s largest array '
           'file where it still decodes (to other numbers), rerun',
           lambda ctx: unreadable_checkpoint(ctx, flip_a_bit_that_still_decodes,
                                             'does not match the digest it was saved with'),
           needs='trained'),
      Case('shard_block_damaged', 'altered', 'train on a converted folder whose shard has bytes '
           'zeroed inside its records (it still opens)',
           lambda ctx: Observed(ctx.main(ctx.tiny(), ctx.fresh(),
                                         *damaged_block_mid_shard(ctx.folder)),
                                CARRY_ON, (EXIT_OK,), 'Skipping damaged record at')),
      Case('backend_cannot_start', 'altered', '`JAX_PLATFORMS=tpu` on this machine (no TPU)',
           backend_cannot_start),
  ]


def _fourth_ring_cases() -> list[Case]:
  """Integrity that deleting a record does not switch off, config records that lost keys,
  exports that must not overwrite, foreign weight files, and every other command's inputs."""
  lost = '(?s)lacks keys that every config written by its version'
  weights = lambda *edit: checks.copied_export(checks.TIMM_EXPORT, *edit)  # noqa: E731

  def init_from(name, done, make, evidence, *args, expect=REFUSE, exit_codes=(EXIT_USAGE,),
                before_workdir=True, needs=checks.TIMM_EXPORT):
    return Case(name, 'foreign_weights', done, lambda ctx: checks.init_from_run(
        ctx, make, *args, expect=expect, exit_codes=exit_codes, evidence=evidence,
        before_workdir=before_workdir), needs=needs)

  def export_output(name, done, output, evidence, *args, base='trained'):
    return Case(name, 'export_output', done, lambda ctx: checks.export_refused(
        ctx, output, *args, evidence=evidence, base=base), needs=base)

  def command(name, done, program, *args, evidence, output=''):
    return Case(name, 'command_inputs', done,
                checks.command_refused(program, *args, evidence=evidence, output=output))

  vocabulary = ('labels', '--source=image_folder', '--path={fixtures}/good_images')
  return [
      Case('digests_deleted', 'removable_integrity', 'flip a bit of checkpoints/4 where it '
           'still decodes, delete its digests item, rerun',
           checks.digests_resume_check('deleted'), needs='trained'),
      Case('digests_emptied', 'removable_integrity', 'flip a bit of checkpoints/4, write {} '
           'into its digests.json, rerun', checks.digests_resume_check('emptied'),
           needs='trained'),
      Case('digests_missing_array', 'removable_integrity', "remove one array's record from "
           "checkpoints/4's digests.json, rerun",
           checks.digests_resume_check('missing an array'), needs='trained'),
      Case('init_from_damaged_step', 'removable_integrity', "the chain's finished MAE: flip a "
           'bit of its final step, delete its digests; rerun with WSP not started',
           checks.init_from_a_damaged_step, needs='chain'),
      Case('export_damaged_step', 'removable_integrity', 'flip a bit of checkpoints/4, empty '
           'its digests.json; export the stage', checks.export_skips_a_damaged_step,
           needs='trained'),
      *[Case(f'config_json_lost_{key}', 'config_record', f'delete `{key}` from the 4-step '
             "workdir's config.json, rerun", lambda ctx, key=key: refused_unchanged(
                 ctx, damage=checks.config_json_edited(checks.without(key)),
                 evidence=lost + f'.*{key}', exit_codes=(EXIT_STOPPED,)), needs='trained')
        for key in ('model', 'objective', 'seed', 'batch_size')],
      Case('config_json_is_an_export', 'config_record', "a timm export's config.json written "
           "over the 4-step workdir's, rerun", lambda ctx: refused_unchanged(
               ctx, damage=checks.config_json_edited(checks.timm_config), evidence=lost,
               exit_codes=(EXIT_STOPPED,)), needs='trained'),
      export_output('export_into_stage', '`--output=` the stage folder itself',
                    lambda ctx, workdir: workdir, 'is a stage folder'),
      export_output('export_into_workdir', "the chain's MAE exported with `--output=` the "
                    "chain's workdir", lambda ctx, workdir: workdir, 'is the workdir of a run',
                    base='chain'),
      export_output('export_inside_stage', '`--output=STAGE/exported`',
                    lambda ctx, workdir: os.path.join(workdir, 'exported'),
                    'is a stage folder'),
      export_output('export_over_timm_export', '`--format=hf --output=` a folder holding a timm '
                    'export', checks.a_timm_export, 'holds a timm export: add --overwrite'),
      Case('export_overwrite', 'added', 'the same with `--overwrite`: only the hf files remain',
           checks.export_overwrites_the_other_format, needs='trained'),
      export_output('export_output_is_file', '`--output=` an existing file',
                    lambda ctx, workdir: ctx.fixture('raising.py'), 'is a file, not a folder'),
      Case('export_output_read_only', 'export_output', '`--output=` inside a read-only tmpfs',
           checks.export_to_read_only, needs='trained'),
      init_from('init_from_hf_without_config', 'a Hugging Face export without its config.json',
                checks.copied_export(checks.HF_EXPORT, checks.without_config_json),
                'has no config.json', expect=CARRY_ON, exit_codes=(EXIT_OK,),
                needs=checks.HF_EXPORT),
      init_from('init_from_bf16', 'the timm export in bfloat16 (a .safetensors of BF16 tensors)',
                weights(checks.in_bfloat16), 'Initialized params/encoder from',
                expect=CARRY_ON, exit_codes=(EXIT_OK,)),
      init_from('init_from_npz_named_safetensors', 'an .npz file named model.safetensors',
                weights(checks.npz_named_safetensors), 'its bytes are a NumPy .npz'),
      init_from('init_from_html_named_pth', 'an HTML page (a failed download) named '
                'weights.pth', weights(checks.html_named_pth), 'its bytes are an HTML page'),
      init_from('init_from_cut_safetensors', "the timm export's model.safetensors cut in half",
                weights(checks.cut_weights), 'cut short'),
      init_from('init_from_nan', "the timm export's weights with one NaN",
                weights(checks.with_a_nan), "'patch_embed.proj.weight' holds 1 NaN",
                before_workdir=False),
      Case('init_from_pth_with_args', 'foreign_weights', "a .pth of {'model': tensors, 'epoch', "
           "'args': argparse.Namespace}", checks.needs_torch(lambda ctx: checks.init_from_run(
               ctx, weights(checks.pth_with_args), expect=REFUSE, exit_codes=(EXIT_USAGE,),
               evidence=r"'args' \(argparse.Namespace\)", before_workdir=True)),
           needs=checks.TIMM_EXPORT),
      init_from('init_from_other_width', 'the timm export (width 64) into '
                '`--config.model.variant=Ti/8` (width 192)', weights(), 'width 64',
                '--config.model.variant=Ti/8', exit_codes=(EXIT_STOPPED,), before_workdir=False),
      init_from('init_from_missing', '`--config.init_from.checkpoint=` a file that is not there',
                lambda ctx: os.path.join(ctx.folder, 'nowhere.safetensors'), 'does not exist',
                needs=''),
      command('export_bad_format', '`--format=onnx`', checks.EXPORT,
              '{fixtures}/trained', '--format=onnx', '--output={folder}/exported',
              evidence="--format='onnx': choose one of timm, hf"),
      command('export_bad_step', '`--step=abc`', checks.EXPORT, '{fixtures}/trained',
              '--format=timm', '--step=abc', '--output={folder}/exported',
              evidence="--step='abc': give a step number"),
      command('export_missing_step', '`--step=99` (no such step)', checks.EXPORT,
              '{fixtures}/trained', '--format=timm', '--step=99', '--output={folder}/exported',
              evidence='Step 99 .*cannot be read', output='{folder}/exported'),
      command('export_no_stage', 'a stage folder that is not there', checks.EXPORT,
              '{folder}/nowhere', '--format=timm', '--output={folder}/exported',
              evidence='nowhere', output='{folder}/exported'),
      Case('compile_for_workdir_is_file', 'command_inputs', '`--compile_for=v5e-4 --workdir=` '
           'a file', lambda ctx: checks.compile_for_refused(
               ctx, f'--workdir={ctx.fixture("raising.py")}', '--compile_for=v5e-4',
               evidence='is a file, not a folder')),
      Case('compile_for_v5e_512', 'command_inputs', '`--compile_for=v5e-512` (v5e slices stop '
           'at 256 chips)', lambda ctx: checks.compile_for_refused(
               ctx, ctx.fresh(), '--compile_for=v5e-512', evidence='larger than any v5e slice')),
      command('convert_input_missing', '`--input=` a folder that is not there', checks.CONVERT,
              '--input={folder}/nowhere', '--output={folder}/converted',
              evidence='does not exist', output='{folder}/converted'),
      command('convert_output_is_file', '`--output=` an existing file', checks.CONVERT,
              '--input={fixtures}/good_images', '--output={fixtures}/raising.py',
              evidence='is a file, not a folder'),
      command('convert_examples_abc', '`--examples_per_shard=abc`', checks.CONVERT,
              '--input={fixtures}/good_images', '--examples_per_shard=abc',
              '--output={folder}/converted', evidence="--examples_per_shard='abc'",
              output='{folder}/converted'),
      *[Case(name, 'beam_inputs', done, checks.command_refused(
            checks.CONVERT, *args, '--output={folder}/converted', evidence=evidence,
            output='{folder}/converted'))
        for name, done, args, evidence in (
            ('convert_glob_matches_nothing', "`--input='{folder}/none-*.tar'`",
             ('--input={folder}/none-*.tar',), 'No tar shard matches'),
            ('convert_not_a_tar', '`--input=` a Python file as a tar',
             ('--input={fixtures}/raising.py',), 'is not a tar file'),
            ('convert_no_such_runner', '`--runner=TurboRunner`',
             ('--input={fixtures}/good_images', '--runner=TurboRunner'), 'no such runner'),
            ('convert_unknown_beam_option', '`--runner=DirectRunner --direct_wrokers=2`',
             ('--input={fixtures}/good_images', '--runner=DirectRunner', '--direct_wrokers=2'),
             'no Beam pipeline option knows it|neither this command nor any Beam'),
            ('convert_dataflow_alone', '`--runner=DataflowRunner --project=p` alone',
             ('--input=gs://bucket/shard-*.tar', '--runner=DataflowRunner', '--project=p-1'),
             'needs --region, --temp_location'))],
      command('vocabulary_source_missing', 'labels from `--path=` a folder that is not there',
              checks.VOCABULARY, 'labels', '--source=image_folder', '--path={folder}/nowhere',
              '--output={folder}/vocab.txt', evidence='does not exist. Set --path'),
      command('vocabulary_output_is_folder', '`--output=` an existing folder', checks.VOCABULARY,
              *vocabulary, '--output={folder}', evidence='is a folder'),
      Case('vocabulary_is_folder', 'added', "`--config.stages.wsp.data.labels.vocabulary=` a "
           'folder', lambda ctx: refused_at_start(
               ctx, ctx.tiny('chain'), ctx.fresh(),
               f'--config.stages.wsp.data.labels.vocabulary={ctx.fixtures}',
               evidence='is not a file')),
      *[Case(name, 'added', f'configs/pseudo_label.py with `--config.teacher.workdir=` {what}',
             lambda ctx, teacher=teacher, evidence=evidence: refused_at_start(
                 ctx, '--config=configs/pseudo_label.py', ctx.fresh(),
                 f'--config.teacher.workdir={teacher(ctx)}',
                 f'--config.data.path={ctx.fixture("good_images")}', evidence=evidence),
             needs=needs)
        for name, what, teacher, evidence, needs in (
            ('teacher_not_a_stage', 'a folder of images',
             lambda ctx: ctx.fixture('good_images'), 'has no config.json', ''),
            ('teacher_without_head', 'a MAE stage (no classification head)',
             lambda ctx: ctx.fixture('trained'), 'has no classification head', 'trained'))],
      Case('data_path_is_file', 'added', '`--config.data.path=` a file for an image folder',
           lambda ctx: refused_at_start(ctx, ctx.tiny(), ctx.fresh(),
                                        '--config.data.source=image_folder',
                                        f'--config.data.path={ctx.fixture("raising.py")}',
                                        evidence='is a file, not a folder')),
  ]
