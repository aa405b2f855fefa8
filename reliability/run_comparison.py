"""The end of reliability/kill_resume.py: a killed run's final checkpoints against an
uninterrupted run's, every array of the train state bit for bit (or, for a stage whose
process count changed, within a bound on ||dθ|| / ||θ||), with the global data positions
(data_position/data_position.json, without 'written_by') and eval_results.json."""

from __future__ import annotations

import json
import logging
import os

from reliability.kill_schedule import Stage, scan_checkpoints


def final_step_dir(run_dir: str, stage: Stage) -> tuple[int | None, str | None]:
  finished, _ = scan_checkpoints(run_dir, stage)
  if not finished:
    return None, None
  return finished[-1], os.path.join(run_dir, stage.dir, 'checkpoints', str(finished[-1]))


def restore_arrays(step_dir: str) -> dict:
  """{path: numpy array} of the step's 'state' item, read as host numpy arrays: the saved
  shardings' devices and processes need not exist here (a step saved by 2 processes x 1
  device, read by this 1-device process)."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  checkpointer = ocp.PyTreeCheckpointer()
  path = os.path.join(step_dir, 'state')
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  # Orbax warns that the item has no _CHECKPOINT_METADATA of its own (the step folder has).
  absl_logger.setLevel(logging.ERROR)
  try:
    metadata = checkpointer.metadata(path)
    tree = getattr(metadata, 'item_metadata', metadata)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    tree = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  finally:
    absl_logger.setLevel(level)
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


# big_pretrain/storage/checkpoints.py: DATA_POSITION_ITEM / DATA_POSITION_FILE.
DATA_POSITION = os.path.join('data_position', 'data_position.json')


def data_position(step_dir: str) -> tuple[dict | None, dict | None]:
  """(the step's global data position without 'written_by', its 'written_by'), or
  (None, None) for a step without one. 'written_by' names the processes, devices and mesh
  that saved it: it differs where the killed run's last save ran on another process count."""
  position = read_json(os.path.join(step_dir, DATA_POSITION))
  if position is None:
    return None, None
  written_by = position.pop('written_by', None)
  return position, written_by


def compare_data_positions(ref_path: str, run_path: str) -> tuple[bool, str]:
  """(equal, what the table says): the global positions without 'written_by'; for steps
  written before global positions, the text of their per-process data/ files."""
  ref, ref_by = data_position(ref_path)
  run, run_by = data_position(run_path)
  if ref is None and run is None:
    old_ref = read_text_files(os.path.join(ref_path, 'data'))
    equal = old_ref == read_text_files(os.path.join(run_path, 'data')) != {}
    return equal, 'equal (data/, per process)' if equal else 'DIFFERS (data/, per process)'
  if ref is None or run is None:
    return False, f'MISSING in the {"reference" if ref is None else "killed run"}'
  note = 'equal' if ref == run else 'DIFFERS'
  if ref_by != run_by:
    note += f' (written by {describe_writer(ref_by)} / {describe_writer(run_by)})'
  return ref == run, note


def describe_writer(written_by: dict | None) -> str:
  """'2 processes x 1 device' for {'processes': 2, 'devices': 2, ...} (devices in all)."""
  try:
    processes, devices = int(written_by['processes']), int(written_by['devices'])
  except (TypeError, KeyError, ValueError):
    return '?'
  per = devices // processes if processes else devices
  return (f'{processes} process{"es" if processes != 1 else ""} x {per} '
          f'device{"s" if per != 1 else ""}')


def params_relative_diff(ref: dict, run: dict) -> float:
  """||dθ|| / ||θ||: the parameters' (arrays under 'params') difference over their norm."""
  import numpy as np
  names = [n for n in ref if n.startswith('params') and n in run
           and ref[n].shape == run[n].shape and np.issubdtype(ref[n].dtype, np.floating)]
  if not names:
    return float('nan')
  diff = sum(float(np.sum((ref[n].astype(np.float64) - run[n].astype(np.float64)) ** 2))
             for n in names)
  norm = sum(float(np.sum(ref[n].astype(np.float64) ** 2)) for n in names)
  return float(np.sqrt(diff / norm)) if norm > 0 else float('inf')


def numeric_diff(a, b) -> float:
  """The largest |a - b| over the numbers of two JSON trees of the same shape; inf where
  their shapes or any non-number differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    if a.keys() != b.keys():
      return float('inf')
    return max((numeric_diff(a[k], b[k]) for k in a), default=0.0)
  if isinstance(a, list) and isinstance(b, list):
    if len(a) != len(b):
      return float('inf')
    return max((numeric_diff(x, y) for x, y in zip(a, b)), default=0.0)
  numbers = (int, float)
  if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
    return abs(float(a) - float(b))
  return 0.0 if a == b else float('inf')


def compare_runs(reference_dir: str, killed_dir: str, stages: list[Stage],
                 exact: dict[str, bool] | None = None,
                 bound: float = 0.0) -> tuple[list, bool]:
  """One row per stage. `exact[stage]` (default True): its train state must be bit-identical;
  False: bit-identical, or parameters within ||dθ|| / ||θ|| < `bound` (and then its
  eval_results.json may differ by what such parameters evaluate to: reported, not failed)."""
  import numpy as np
  rows, ok = [], True
  for stage in stages:
    ref_step, ref_path = final_step_dir(reference_dir, stage)
    run_step, run_path = final_step_dir(killed_dir, stage)
    exact_required = True if exact is None else exact.get(stage.name, True)
    row = dict(stage=stage.name, ref_step=ref_step, run_step=run_step, arrays=0, identical=0,
               max_diff=float('nan'), rel_diff=float('nan'), missing=[], data_equal=False,
               data_note='MISSING', evals_equal=False, exact=exact_required, bound=bound)
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
      row['rel_diff'] = params_relative_diff(ref, run)
      row['data_equal'], row['data_note'] = compare_data_positions(ref_path, run_path)
    ref_evals = read_json(os.path.join(reference_dir, stage.dir, 'eval_results.json'))
    run_evals = read_json(os.path.join(killed_dir, stage.dir, 'eval_results.json'))
    row['evals_equal'] = ref_evals is not None and ref_evals == run_evals
    row['evals_note'] = ('equal' if row['evals_equal'] else
                         'missing in killed run' if run_evals is None else
                         'missing in reference' if ref_evals is None else
                         f'differ (max |diff| {numeric_diff(ref_evals, run_evals):.3g})')
    row['bit_identical'] = (row['arrays'] > 0 and row['identical'] == row['arrays']
                            and not row['missing'])
    row['within_bound'] = (not exact_required and row['arrays'] > 0 and not row['missing']
                           and row['rel_diff'] < bound)  # nan (no params) fails
    state_ok = row['bit_identical'] or row['within_bound']
    # Evaluations of a state that differs within the bound may differ too.
    evals_ok = row['evals_equal'] or (row['within_bound'] and not row['bit_identical']
                                      and ref_evals is not None and run_evals is not None)
    row['ok'] = (ref_step is not None and ref_step == run_step == stage.total_steps
                 and state_ok and row['data_equal'] and evals_ok)
    ok &= row['ok']
    rows.append(row)
  return rows, ok


def comparison_problems(row: dict, stages: list[Stage]) -> list[str]:
  total = next(s.total_steps for s in stages if s.name == row['stage'])
  problems = []
  if not (row['ref_step'] == row['run_step'] == total):
    problems.append(f'final steps {row["ref_step"]} / {row["run_step"]}, expected {total}')
  if not row['bit_identical'] and not row['within_bound']:
    problems.append(f'{row["arrays"] - row["identical"]} of {row["arrays"]} arrays differ '
                    f'(max abs diff {row["max_diff"]:.3g}, ||dθ||/||θ|| {row["rel_diff"]:.3g}'
                    + (', where the process count never changed: must be bit-identical)'
                       if row['exact'] else f', bound {row["bound"]:g})'))
  if not row['data_equal']:
    problems.append(f'data positions: {row["data_note"]}')
  if not row['evals_equal'] and not (row['within_bound'] and not row['bit_identical']):
    problems.append(f'eval_results.json {row["evals_note"]}')
  return problems


def format_table(rows: list) -> str:
  lines = ['| stage | final step (ref / killed) | process count changed | arrays | bit-identical '
           '| max abs diff | ‖dθ‖/‖θ‖ (params) | state | data position (without written_by) '
           '| eval_results.json |',
           '|-------|--------------------------:|-----------------------|-------:|--------------:'
           '|-------------:|------------------:|-------|-------------------------------------'
           '|-------------------|']
  for r in rows:
    state = ('bit-identical' if r['bit_identical'] else
             f'within {r["bound"]:g}' if r['within_bound'] else 'DIFFERS')
    lines.append(f'| {r["stage"]} | {r["ref_step"]} / {r["run_step"]} '
                 f'| {"no: exact" if r["exact"] else "yes"} | {r["arrays"]} '
                 f'| {r["identical"]} | {r["max_diff"]:.3g} | {r["rel_diff"]:.3g} | {state} '
                 f'| {r["data_note"]} | {r["evals_note"]} |')
  return '\n'.join(lines)
