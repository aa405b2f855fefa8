"""The end of reliability/kill_resume.py: a killed run's final checkpoints against an
uninterrupted run's, every array of the train state bit for bit, with the data iterator
positions and eval_results.json."""

from __future__ import annotations

import json
import os

from reliability.kill_schedule import Stage, scan_checkpoints


def final_step_dir(run_dir: str, stage: Stage) -> tuple[int | None, str | None]:
  finished, _ = scan_checkpoints(run_dir, stage)
  if not finished:
    return None, None
  return finished[-1], os.path.join(run_dir, stage.dir, 'checkpoints', str(finished[-1]))


def restore_arrays(step_dir: str) -> dict:
  """{path: numpy array} of the step's 'state' item, restored as saved (no target)."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  checkpointer = ocp.StandardCheckpointer()
  try:
    tree = checkpointer.restore(os.path.join(step_dir, 'state'))
  finally:
    checkpointer.close()
  return {jax.tree_util.keystr(path, simple=True, separator='/'): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def read_text_files(folder: str) -> dict[str, str]:
  if not os.path.isdir(folder):
    return {}
  return {name: open(os.path.join(folder, name)).read() for name in sorted(os.listdir(folder))
          if name.endswith('.json')}


def read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def compare_runs(reference_dir: str, killed_dir: str, stages: list[Stage]) -> tuple[list, bool]:
  import numpy as np
  rows, ok = [], True
  for stage in stages:
    ref_step, ref_path = final_step_dir(reference_dir, stage)
    run_step, run_path = final_step_dir(killed_dir, stage)
    row = dict(stage=stage.name, ref_step=ref_step, run_step=run_step, arrays=0, identical=0,
               max_diff=float('nan'), missing=[], data_equal=False, evals_equal=False)
    if ref_path and run_path:
      ref, run = restore_arrays(ref_path), restore_arrays(run_path)
      row['arrays'] = len(ref)
      row['missing'] = sorted(set(ref) ^ set(run))
      diffs = []
      for key in sorted(set(ref) & set(run)):
        a, b = ref[key], run[key]
        same = (a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
                and a.tobytes() == b.tobytes())
        row['identical'] += same
        if a.shape == b.shape and a.size and np.issubdtype(a.dtype, np.number):
          diffs.append(float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
        elif not same:
          diffs.append(float('inf'))
      row['max_diff'] = max(diffs) if diffs else 0.0
      row['data_equal'] = (read_text_files(os.path.join(ref_path, 'data'))
                           == read_text_files(os.path.join(run_path, 'data')) != {})
    ref_evals = read_json(os.path.join(reference_dir, stage.dir, 'eval_results.json'))
    run_evals = read_json(os.path.join(killed_dir, stage.dir, 'eval_results.json'))
    row['evals_equal'] = ref_evals is not None and ref_evals == run_evals
    row['evals_note'] = ('equal' if row['evals_equal'] else
                         'missing in killed run' if run_evals is None else
                         'missing in reference' if ref_evals is None else 'differ')
    row['ok'] = (ref_step is not None and ref_step == run_step == stage.total_steps
                 and row['arrays'] > 0 and row['identical'] == row['arrays']
                 and not row['missing'] and row['data_equal'] and row['evals_equal'])
    ok &= row['ok']
    rows.append(row)
  return rows, ok


def comparison_problems(row: dict, stages: list[Stage]) -> list[str]:
  total = next(s.total_steps for s in stages if s.name == row['stage'])
  problems = []
  if not (row['ref_step'] == row['run_step'] == total):
    problems.append(f'final steps {row["ref_step"]} / {row["run_step"]}, expected {total}')
  if row['identical'] != row['arrays'] or row['missing'] or not row['arrays']:
    problems.append(f'{row["arrays"] - row["identical"]} of {row["arrays"]} arrays differ '
                    f'(max abs diff {row["max_diff"]:.3g})')
  if not row['data_equal']:
    problems.append('data iterator positions differ')
  if not row['evals_equal']:
    problems.append(f'eval_results.json {row["evals_note"]}')
  return problems


def format_table(rows: list) -> str:
  lines = ['| stage | final step (ref / killed) | arrays | bit-identical | max abs diff '
           '| data iterator | eval_results.json |',
           '|-------|--------------------------:|-------:|--------------:|-------------:'
           '|---------------|-------------------|']
  for r in rows:
    lines.append(f'| {r["stage"]} | {r["ref_step"]} / {r["run_step"]} | {r["arrays"]} '
                 f'| {r["identical"]} | {r["max_diff"]:.3g} '
                 f'| {"equal" if r["data_equal"] else "DIFFERS"} | {r["evals_note"]} |')
  return '\n'.join(lines)
