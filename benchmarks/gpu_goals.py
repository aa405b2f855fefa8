"""The GPU side-by-side table and its speed goals, from one run of gpu_side_by_side.sh.

  python benchmarks/gpu_goals.py [--loop=LOOP_JSON] ROWS_JSON... TORCH_LOG

ROWS_JSON: benchmarks/step_speed.py --json outputs (every table's rows; a row named as its
objective, e.g. 'mae', is a main-table row, others are named for their variant, e.g.
'mae scan=True'); LOOP_JSON: benchmarks/loop_speed.py --json; TORCH_LOG: the 'TORCH ...' lines of
the PyTorch MAE reference (torch_mae_bench.py), eager and compiled. Prints one table, every
row from the same run on the same card, then each goal with its measured value and whether
it holds: MAE B/16 at most 45 ms/step and at least 1.25x faster than the compiled PyTorch
reference; MAE L/16 at least 45% MFU; WSP and FLIP B/16 at least 40% MFU; no attention run by
XLA (on a GPU every attention should get cuDNN's fused kernel); the GPU idle less than 5% of
MAE B/16's traced step (command buffers on while tracing); the training loop at least 90% of
its bare step's images/s.
"""

from __future__ import annotations

import json
import os
import re
import sys

TORCH_LINE = re.compile(r'TORCH (\S+) .*compile=(\S+) fused_adam=(\S+) batch=(\d+) '
                        r'ms/step=([\d.]+)')
PEER_VARIANTS = {'mae_vit_base_patch16': 'B/16', 'mae_vit_large_patch16': 'L/16'}
WHILE_IN_COMMAND_BUFFERS = '+WHILE'


def read_rows(paths: list[str]) -> list[dict]:
  rows = []
  for path in paths:
    if not os.path.exists(path):  # a step the run skipped or that failed
      continue
    with open(path, encoding='utf-8') as file:
      rows.extend(json.load(file))
  return rows


def read_torch(path: str) -> list[dict]:
  rows = []
  with open(path, encoding='utf-8') as file:
    for line in file:
      match = TORCH_LINE.search(line)
      if match:
        model, compiled, fused, batch, ms = match.groups()
        rows.append(dict(
            name=f'PyTorch MAE {PEER_VARIANTS.get(model, model)}, '
                 + ('torch.compile + fused AdamW' if compiled == 'True' else 'eager'),
            variant=PEER_VARIANTS.get(model, model), compiled=compiled == 'True',
            fused_adam=fused == 'True', batch_size=int(batch), ms_per_step=float(ms)))
  return rows


def row_name(row: dict) -> str:
  """What the row ran: its objective and variant, layers, and what differs from the default
  (WHILE in the command buffers, the patch embedding)."""
  name = f"big_pretrain {row.get('objective_name', row['objective']).upper()} {row['variant']}"
  details = [row.get('scan', '')]
  if WHILE_IN_COMMAND_BUFFERS in row.get('xla_flags', ''):
    details.append('WHILE in command buffers')
  if row.get('patch_embed_impl', 'matmul') != 'matmul':
    details.append(f"patch embedding by {row['patch_embed_impl']}")
  return name + ''.join(f', {d}' for d in details if d)


def find(rows: list[dict], objective: str, variant: str) -> dict | None:
  """The main-table row of `objective` at `variant`: default layers and flags."""
  return next((r for r in rows if r['objective'] == objective and r['variant'] == variant
               and WHILE_IN_COMMAND_BUFFERS not in r.get('xla_flags', '')), None)


def goals(rows: list[dict], torch_rows: list[dict],
          loop: dict | None) -> list[tuple[str, str, bool | None]]:
  """(goal, measured, holds) for each goal; holds is None where a row is missing."""
  results = []
  mae_b = find(rows, 'mae', 'B/16')
  compiled_b = next((r for r in torch_rows if r['variant'] == 'B/16' and r['compiled']), None)
  results.append(('MAE B/16 <= 45 ms/step', f"{mae_b['ms_per_step']:.1f} ms",
                  mae_b['ms_per_step'] <= 45) if mae_b
                 else ('MAE B/16 <= 45 ms/step', 'row missing', None))
  if mae_b and compiled_b:
    speedup = compiled_b['ms_per_step'] / mae_b['ms_per_step']
    results.append(('MAE B/16 >= 1.25x the compiled PyTorch reference', f'{speedup:.2f}x',
                    speedup >= 1.25))
  else:
    results.append(('MAE B/16 >= 1.25x the compiled PyTorch reference', 'row missing', None))
  for objective, variant, floor in (('mae', 'L/16', 0.45), ('wsp', 'B/16', 0.40),
                                    ('flip', 'B/16', 0.40)):
    row = find(rows, objective, variant)
    goal = f'{objective.upper()} {variant} MFU >= {floor:.0%}'
    results.append((goal, f"{row['mfu']:.1%}", row['mfu'] >= floor) if row
                   else (goal, 'row missing', None))
  by_xla = [f"{r['objective']} {r['variant']}: {r['attention']}" for r in rows
            if 'xla' in r['attention']]
  results.append(('no attention run by XLA', '; '.join(by_xla) or 'all cuDNN', not by_xla))
  goal = 'idle GPU < 5% of the MAE B/16 step (traced, command buffers on)'
  profile = (mae_b or {}).get('profile')
  results.append((goal, f"{profile['idle_fraction']:.1%} of {profile['span_ms']:.1f} ms",
                  profile['idle_fraction'] < 0.05) if profile
                 else (goal, 'no device trace', None))
  goal = 'training loop >= 90% of its bare step (images/s)'
  results.append((goal, f"{loop['loop_fraction']:.0%} ({loop['loop_images_per_sec']:.0f} of "
                        f"{loop['bare_images_per_sec']:.0f})", loop['loop_fraction'] >= 0.9)
                 if loop else (goal, 'row missing', None))
  return results


def main(argv: list[str]) -> int:
  loop_paths = [a.split('=', 1)[1] for a in argv if a.startswith('--loop=')]
  argv = [a for a in argv if not a.startswith('--loop=')]
  if len(argv) < 2:
    print(__doc__)
    return 2
  rows, torch_rows = read_rows(argv[:-1]), read_torch(argv[-1])
  loop = None
  if loop_paths and os.path.exists(loop_paths[0]):
    with open(loop_paths[0], encoding='utf-8') as file:
      loop = json.load(file)
  devices = sorted({r['device'] for r in rows})
  print(f"\nOne run on {', '.join(devices) or 'no device (every row missing)'}; global batch "
        f"{', '.join(sorted({str(r['batch_size']) for r in rows}))}, "
        f"{', '.join(sorted({r['dtype'] for r in rows}))} compute\n")
  print('| step | ms/step | MFU | attention | compile s | idle in trace |')
  print('|---|---:|---:|---|---:|---:|')
  for row in torch_rows:
    print(f"| {row['name']} | {row['ms_per_step']:.1f} | | | | |")
  for row in rows:
    profile = row.get('profile')
    idle = (f"{profile['idle_fraction']:.1%} ({profile['launches']} launches)"
            if profile else '')
    print(f"| {row_name(row)} | {row['ms_per_step']:.1f} | {row['mfu']:.1%} | "
          f"{row['attention']} | {row['compile_seconds']:.0f} | {idle} |")
  if loop:
    print(f"\nTraining loop, MAE {loop['variant']} batch {loop['batch_size']} on {loop['data']}; "
          f"{loop['host_cores']} host cores:\n")
    print('| row | images/s | of bare step |')
    print('|---|---:|---:|')
    for name, value in loop['rows'].items():
      print(f"| {name} | {value:.0f} | {value / loop['bare_images_per_sec']:.0%} |")
    if loop.get('input_images_per_cpu_second'):
      print(f"\nThe input makes {loop['input_images_per_cpu_second']:.0f} images per CPU-second: "
            f"{loop['cores_to_feed_bare_step']:.1f} cores feed the bare step.")
  print('\n| goal | measured | holds |')
  print('|---|---:|:---:|')
  for goal, measured, holds in goals(rows, torch_rows, loop):
    print(f"| {goal} | {measured} | {'-' if holds is None else 'yes' if holds else 'NO'} |")
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
