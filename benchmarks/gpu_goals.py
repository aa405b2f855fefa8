"""The GPU side-by-side table and its speed goals, from one run of gpu_side_by_side.sh.

  python benchmarks/gpu_goals.py ROWS_JSON... TORCH_LOG

ROWS_JSON: benchmarks/step.py --json outputs; TORCH_LOG: the 'TORCH ...' lines of the PyTorch
MAE reference (torch_mae_bench.py), eager and compiled. Prints one table, every row from the
same run on the same card, then each goal with its measured value and whether it holds:
MAE B/16 at most 45 ms/step and at least 1.25x faster than the compiled PyTorch reference;
MAE L/16 at least 45% MFU; WSP and FLIP B/16 at least 40% MFU; no attention run by XLA
(on a GPU every attention should get cuDNN's fused kernel).
"""

from __future__ import annotations

import json
import re
import sys

TORCH_LINE = re.compile(r'TORCH (\S+) .*compile=(\S+) fused_adam=(\S+) batch=(\d+) '
                        r'ms/step=([\d.]+)')
PEER_VARIANTS = {'mae_vit_base_patch16': 'B/16', 'mae_vit_large_patch16': 'L/16'}


def read_rows(paths: list[str]) -> list[dict]:
  rows = []
  for path in paths:
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


def find(rows: list[dict], objective: str, variant: str) -> dict | None:
  return next((r for r in rows if r['objective'] == objective and r['variant'] == variant), None)


def goals(rows: list[dict], torch_rows: list[dict]) -> list[tuple[str, str, bool | None]]:
  """(goal, measured, holds) for each goal; holds is None where a row is missing."""
  results = []
  mae_b = find(rows, 'mae', 'B/16')
  compiled_b = next((r for r in torch_rows if r['variant'] == 'B/16' and r['compiled']), None)
  if mae_b:
    results.append(('MAE B/16 <= 45 ms/step', f"{mae_b['ms_per_step']:.1f} ms",
                    mae_b['ms_per_step'] <= 45))
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
  return results


def main(argv: list[str]) -> int:
  if len(argv) < 2:
    print(__doc__)
    return 2
  rows, torch_rows = read_rows(argv[:-1]), read_torch(argv[-1])
  devices = sorted({r['device'] for r in rows})
  print(f"\nOne run on {', '.join(devices)}; global batch "
        f"{', '.join(sorted({str(r['batch_size']) for r in rows}))}, "
        f"{', '.join(sorted({r['dtype'] for r in rows}))} compute\n")
  print('| step | ms/step | MFU | attention |')
  print('|---|---:|---:|---|')
  for row in torch_rows:
    print(f"| {row['name']} | {row['ms_per_step']:.1f} | | |")
  for row in rows:
    print(f"| big_pretrain {row['objective'].upper()} {row['variant']} | "
          f"{row['ms_per_step']:.1f} | {row['mfu']:.1%} | {row['attention']} |")
  print('\n| goal | measured | holds |')
  print('|---|---:|:---:|')
  for goal, measured, holds in goals(rows, torch_rows):
    print(f"| {goal} | {measured} | {'-' if holds is None else 'yes' if holds else 'NO'} |")
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
