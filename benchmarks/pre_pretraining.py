"""Does MAE pre-pretraining help WSP? The MAWS claim, measured over seeds and budgets.

For each seed: MAE at each budget (a fraction of an epoch of the training data;
0 = no MAE), then WSP at two lengths from each of those encoders (random
initialization for budget 0), then fine-tuning of each long WSP encoder. The
runs of one seed are paired: the WSP stages share their seed (the head's
initialization, every step's rng) and their data order, and differ only in the
encoder they start from; so do the fine-tuning stages.

Measured on held-out images of the embedded data, with the SHAPE as the label
(WSP sees it only as one of each image's four hashtags): the linear probe and
k-NN accuracy of the WSP encoder during and after WSP, fine-tuning top-1, and
WSP's loss and precision@1 curves. The tables give mean, standard deviation
and the paired difference against WSP from random initialization with its 95%
t-interval, at equal WSP steps and against total training compute (MAE's
steps counted); the plots (PNG, matplotlib) show the same.

Every run is a workdir under --workdir: a rerun skips finished runs and
resumes the others, so the sweep can be stopped and continued.

  python benchmarks/pre_pretraining.py --processes=2  # the full sweep (1 h 15 min on 2 CPU cores)
  python benchmarks/pre_pretraining.py --small        # one seed, one MAE budget, tiny steps
  python benchmarks/pre_pretraining.py --seeds=0,1 --mae_epochs=0,1 --wsp_steps=300,1200
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import subprocess
import sys
import time

# Run from anywhere: the configs/ package lives at the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from stage_sweeps import mean_sd, paired_interval, run_stage  # noqa: E402  (beside this script)

PROBES = ('linear_probe', 'knn')


@dataclasses.dataclass(frozen=True)
class Sweep:
  seeds: tuple[int, ...]
  mae_epochs: tuple[float, ...]    # 0: WSP from random initialization
  wsp_steps: tuple[int, int]       # (short, long)
  finetune_steps: int              # 0: no fine-tuning
  probe_every: int                 # WSP's probes also run every this many steps
  probe_examples: tuple[int, int]  # (train, test) images of the probes
  workdir: str
  plots: str                       # where the PNGs go


def parse_args(argv=None) -> Sweep:
  return _parse(argv)[0]


def _parse(argv=None) -> tuple[Sweep, argparse.Namespace]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seeds', default='0,1,2,3,4')
  parser.add_argument('--mae_epochs', default='0,0.1,0.3,1,3',
                      help='MAE budgets in epochs of the training data; 0: random init')
  parser.add_argument('--wsp_steps', default='600,1800', help='short,long')
  parser.add_argument('--finetune_steps', type=int, default=800,
                      help='fine-tuning after each long WSP run; 0: none')
  parser.add_argument('--probe_every', type=int, default=600)
  parser.add_argument('--workdir', default='workdirs/benchmarks/pre_pretraining')
  parser.add_argument('--plots', default=None,
                      help='folder of the PNGs; default: docs/images/ for the full sweep, '
                      'WORKDIR/plots otherwise')
  parser.add_argument('--small', action='store_true',
                      help='one seed, one MAE budget (0.01 epoch), 4 and 8 WSP steps, tiny '
                      'probes (the test suite runs it)')
  parser.add_argument('--processes', type=int, default=1,
                      help='train this many (seed, MAE budget) units at once, each in its own '
                      'process (one process keeps ~1.4 of 2 CPU cores busy here)')
  parser.add_argument('--only', default=None, metavar='SEED:EPOCHS',
                      help='train one unit of the sweep and stop (what --processes runs)')
  args = parser.parse_args(argv)
  if args.small:
    return Sweep(seeds=(0,), mae_epochs=(0.0, 0.01), wsp_steps=(4, 8), finetune_steps=4,
                 probe_every=4, probe_examples=(64, 64),
                 workdir=os.path.join(args.workdir, 'small'),
                 plots=args.plots or os.path.join(args.workdir, 'small', 'plots')), args
  short, long = (int(s) for s in args.wsp_steps.split(','))
  full = all(getattr(args, key) == parser.get_default(key) for key in
             ('seeds', 'mae_epochs', 'wsp_steps', 'finetune_steps', 'probe_every'))
  # The full sweep's plots are the documentation's (docs/images/, shown on the MAWS page).
  docs_images = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             'docs', 'images')
  plots = args.plots or (docs_images if full else os.path.join(args.workdir, 'plots'))
  return Sweep(seeds=tuple(int(s) for s in args.seeds.split(',')),
               mae_epochs=tuple(float(e) for e in args.mae_epochs.split(',')),
               wsp_steps=(short, long), finetune_steps=args.finetune_steps,
               probe_every=args.probe_every, probe_examples=(2048, 1024),
               workdir=args.workdir, plots=plots), args


# --- The stage configs ----------------------------------------------------------------------

def base_stages(sweep: Sweep):
  """(mae, wsp, finetune) stage configs: `make demo`'s chain (configs/mae_then_wsp.py:demo,
  which probes the shape and trains WSP at the lr that learns it), and fine-tuning on the
  shape after it."""
  from configs import finetune, mae_then_wsp
  chain = mae_then_wsp.get_config('demo')
  mae, wsp = chain.stages.mae, chain.stages.wsp
  tune = finetune.stage_after('wsp', 'demo')
  tune.data.synthetic_label = 'shape'
  mae.evals = {}  # MAE is judged by what WSP makes of it
  train_examples, test_examples = sweep.probe_examples
  wsp.evals = {name: wsp.evals[name] for name in PROBES}
  for name in PROBES:
    # at_start: the starting encoder's probe too (step 0): what MAE hands over.
    wsp.evals[name].update(every_steps=sweep.probe_every, train_examples=train_examples,
                           test_examples=test_examples, at_start=True)
  tune.evals = {'classification': tune.evals.classification}
  tune.evals.classification.update(every_steps=0, test_examples=test_examples)
  return mae, wsp, tune


def epoch_steps(config) -> float:
  """Steps of one pass over the training data."""
  return config.data.num_examples / config.batch_size


def with_budget(config, seed: int, steps: int):
  config = config.copy_and_resolve_references()
  config.seed = seed
  config.data.seed = seed  # the data order
  config.total_steps = steps
  config.optim.warmup_steps = max(1, min(config.optim.warmup_steps, steps // 10))
  config.checkpoint.every_steps = steps
  config.log.every_steps = max(1, min(config.log.every_steps, steps // 8))
  return config


def mae_steps(mae_config, epochs: float) -> int:
  return max(1, round(epochs * epoch_steps(mae_config)))


def mae_config(base, seed: int, epochs: float):
  return with_budget(base, seed, mae_steps(base, epochs))


def started_from(config, checkpoint: str | None):
  """`config` starting from the encoder of the stage in `checkpoint` (None: random)."""
  config = config.copy_and_resolve_references()
  config.init_from.stage = None
  config.init_from.checkpoint = checkpoint
  config.init_from.take = ('encoder',)
  return config


def wsp_config(base, seed: int, steps: int, mae_dir: str | None):
  return started_from(with_budget(base, seed, steps), mae_dir)


def finetune_config(base, seed: int, steps: int, wsp_dir: str):
  return started_from(with_budget(base, seed, steps), wsp_dir)


def run_name(kind: str, seed: int, epochs: float, wsp_length: str | None = None) -> str:
  """'mae0.1ep_seed0', 'wsp_long_mae0.1ep_seed0' (mae0ep: from random init), ..."""
  if kind == 'mae':
    return f'mae{epochs:g}ep_seed{seed}'
  return f'{kind}_{wsp_length}_mae{epochs:g}ep_seed{seed}'


# --- Running ----------------------------------------------------------------------------------

def units(sweep: Sweep) -> list[tuple[int, float]]:
  """The sweep's independent units, (seed, MAE budget): one MAE run, the WSP runs from its
  encoder, and their fine-tuning."""
  return [(seed, epochs) for seed in sweep.seeds for epochs in sweep.mae_epochs]


def run_sweep(sweep: Sweep, log=print, only=None) -> dict:
  """Every run of the sweep, or of the units in `only` (finished runs read back):
  {run name: result}."""
  mae_base, wsp_base, tune_base = base_stages(sweep)
  results, start = {}, time.time()

  def run(name, config):
    results[name] = run_stage(config, os.path.join(sweep.workdir, name))
    log(f'  {name}: {results[name]["seconds"]:.0f} s ({time.time() - start:.0f} s so far)')

  for seed, epochs in only or units(sweep):
    mae_dir = None
    if epochs:
      name = run_name('mae', seed, epochs)
      run(name, mae_config(mae_base, seed, epochs))
      mae_dir = os.path.join(sweep.workdir, name)
    for length, steps in zip(('short', 'long'), sweep.wsp_steps):
      wsp_name = run_name('wsp', seed, epochs, length)
      run(wsp_name, wsp_config(wsp_base, seed, steps, mae_dir))
      if length == 'long' and sweep.finetune_steps:
        run(run_name('finetune', seed, epochs, length),
            finetune_config(tune_base, seed, sweep.finetune_steps,
                            os.path.join(sweep.workdir, wsp_name)))
  return results


def train_in_processes(sweep: Sweep, args: argparse.Namespace, log=print) -> None:
  """Trains the sweep's units `args.processes` at a time, each in a child process running
  this script with --only (its output in WORKDIR/logs/); the largest MAE budgets first, so
  the last to finish is a short one."""
  command = [sys.executable, os.path.abspath(__file__), f'--seeds={args.seeds}',
             f'--mae_epochs={args.mae_epochs}', f'--wsp_steps={args.wsp_steps}',
             f'--finetune_steps={args.finetune_steps}', f'--probe_every={args.probe_every}',
             f'--workdir={args.workdir}'] + (['--small'] if args.small else [])
  os.makedirs(os.path.join(sweep.workdir, 'logs'), exist_ok=True)
  start = time.time()

  def train(unit):
    seed, epochs = unit
    log_path = os.path.join(sweep.workdir, 'logs', f'seed{seed}_mae{epochs:g}ep.log')
    with open(log_path, 'w') as output:
      exit_code = subprocess.run(command + [f'--only={seed}:{epochs:g}'], stdout=output,
                                 stderr=subprocess.STDOUT).returncode
    if exit_code:
      raise RuntimeError(f'seed {seed}, MAE {epochs:g} epochs: exit {exit_code}; its output '
                         f'is in {log_path}')
    log(f'  seed {seed}, MAE {epochs:g} epochs: trained ({time.time() - start:.0f} s so far)')

  ordered = sorted(units(sweep), key=lambda unit: -unit[1])
  with concurrent.futures.ThreadPoolExecutor(args.processes) as pool:
    list(pool.map(train, ordered))


# --- Tables ---------------------------------------------------------------------------------

def final_metric(result: dict, evaluator: str, metric: str) -> float:
  return result['eval'][evaluator][metric]


def metrics_of(results: dict, seed: int, epochs: float, length: str) -> dict[str, float]:
  wsp = results[run_name('wsp', seed, epochs, length)]
  values = {'linear probe': final_metric(wsp, 'linear_probe', 'accuracy'),
            'k-NN': final_metric(wsp, 'knn', 'accuracy'),
            # WSP's own measures, of its last log interval: the hashtags it is trained on
            'WSP loss': wsp['curves']['loss'][-1][1],
            'WSP precision@1': wsp['curves']['precision_at_1'][-1][1]}
  tune = results.get(run_name('finetune', seed, epochs, length))
  if tune:
    values['fine-tuning top-1'] = final_metric(tune, 'classification', 'top1')
  return values


def chance(sweep: Sweep, results: dict) -> float:
  """1 / the number of shape classes, as the probes recorded it."""
  return final_metric(results[run_name('wsp', sweep.seeds[0], 0.0, 'long')], 'linear_probe',
                      'chance')


def value_at(curve, step: float) -> float | None:
  """The curve ([(step, value)]) at `step`, linearly between its logged steps; None past
  its end."""
  for (step_a, a), (step_b, b) in zip(curve, curve[1:]):
    if step_a <= step <= step_b:
      return a + (b - a) * (step - step_a) / (step_b - step_a)
  return None


def summary_rows(sweep: Sweep, results: dict) -> list[dict]:
  """One row per (WSP length, MAE budget): each metric's mean, sd and paired difference
  against random initialization (budget 0, same seed), and the total compute (the analytic
  training FLOPs of MAE's and WSP's steps, train/mfu.py).

  And the linear probe against random initialization at EQUAL COMPUTE: the long
  random-init run's probe curve at the WSP step whose compute equals the MAE arm's (its
  WSP steps + MAE's steps converted at the FLOPs ratio), linearly between its probes. That
  run's lr has not decayed there, so this reading favours MAE; None where the MAE arm
  spent more than the long random run did."""
  from big_pretrain.train import mfu
  mae_base, wsp_base, _ = base_stages(sweep)
  flops = {'mae': mfu.model_flops_per_step(mae_base), 'wsp': mfu.model_flops_per_step(wsp_base)}
  rows = []
  for length, steps in zip(('short', 'long'), sweep.wsp_steps):
    for epochs in sweep.mae_epochs:
      per_seed = {seed: metrics_of(results, seed, epochs, length) for seed in sweep.seeds}
      baseline = {seed: metrics_of(results, seed, 0.0, length) for seed in sweep.seeds}
      row = {'length': length, 'wsp_steps': steps, 'mae_epochs': epochs,
             'mae_steps': mae_steps(mae_base, epochs) if epochs else 0}
      row['tflop'] = (row['mae_steps'] * flops['mae'] + steps * flops['wsp']) / 1e12
      for metric in per_seed[sweep.seeds[0]]:
        values = [per_seed[seed][metric] for seed in sweep.seeds]
        row[metric] = mean_sd(values)
        row[metric + ' diff'] = paired_interval(
            [per_seed[seed][metric] - baseline[seed][metric] for seed in sweep.seeds])
      if epochs:
        row['equal_compute_step'] = steps + row['mae_steps'] * flops['mae'] / flops['wsp']
        random_probe = [value_at(results[run_name('wsp', seed, 0.0, 'long')]['curves']
                                 ['eval/linear_probe/accuracy'], row['equal_compute_step'])
                        for seed in sweep.seeds]
        if None not in random_probe:
          row['linear probe equal-compute diff'] = paired_interval(
              [per_seed[seed]['linear probe'] - random for seed, random
               in zip(sweep.seeds, random_probe)])
      rows.append(row)
  return rows


def format_table(rows: list[dict]) -> str:
  metrics = list(dict.fromkeys(key for row in rows for key in row
                               if isinstance(row[key], tuple) and not key.endswith(' diff')))
  header = ('| WSP | MAE epochs | compute TFLOP | '
            + ' | '.join(f'{m} | {m}: MAE - random (95% CI)' for m in metrics)
            + ' | linear probe: MAE - random at equal compute (95% CI) |')
  lines = [header, '|' + '---|' * (4 + 2 * len(metrics))]
  for row in rows:
    cells = [f'{row["length"]} ({row["wsp_steps"]})', f'{row["mae_epochs"]:g}',
             f'{row["tflop"]:.3g}']
    for metric in metrics:
      if metric not in row:  # fine-tuning follows the long WSP runs only
        cells += ['', '']
        continue
      mean, sd = row[metric]
      cells.append(f'{mean:.3f} ± {sd:.3f}')
      cells.append(_difference(row, metric + ' diff'))
    if not row['mae_epochs']:
      cells.append('-')
    elif 'linear probe equal-compute diff' in row:
      cells.append(f'{_difference(row, "linear probe equal-compute diff")} '
                   f'(random at WSP step {row["equal_compute_step"]:.0f})')
    else:
      cells.append(f'past random\'s {max(r["wsp_steps"] for r in rows)} steps')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _difference(row: dict, key: str) -> str:
  if not row['mae_epochs']:
    return '-'
  difference, half_width = row[key]
  return f'{difference:+.3f} ± {half_width:.3f}'


# --- Plots ------------------------------------------------------------------------------------

def curve_band(results: dict, sweep: Sweep, epochs: float, length: str, tag: str):
  """(steps, mean, sd) of a WSP curve over seeds, at the steps every seed logged."""
  curves = [dict(results[run_name('wsp', seed, epochs, length)]['curves'].get(tag, []))
            for seed in sweep.seeds]
  steps = sorted(set.intersection(*(set(curve) for curve in curves)))
  bands = [mean_sd([curve[step] for curve in curves]) for step in steps]
  return steps, [mean for mean, _ in bands], [sd for _, sd in bands]


def plot(sweep: Sweep, results: dict, rows: list[dict], folder: str) -> list[str]:
  """Two PNGs: the long WSP runs' curves (random init vs the MAE budgets), and the final
  metrics against the MAE budget. Returns their paths."""
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  os.makedirs(folder, exist_ok=True)
  colours = plt.get_cmap('viridis')
  budgets = list(sweep.mae_epochs)
  chance_level = chance(sweep, results)

  figure, axes = plt.subplots(1, 4, figsize=(20, 4.2))
  for axis, tag, title in zip(
      axes, ('loss', 'precision_at_1', 'eval/linear_probe/accuracy', 'eval/knn/accuracy'),
      ('WSP train loss', 'WSP train precision@1 (hashtags)', 'linear probe, shape (held-out)',
       'k-NN, shape (held-out)')):
    for index, epochs in enumerate(budgets):
      steps, mean, sd = curve_band(results, sweep, epochs, 'long', tag)
      if not steps:
        continue
      label = 'random init' if not epochs else f'MAE {epochs:g} epoch'
      colour = 'black' if not epochs else colours(index / max(1, len(budgets) - 1))
      axis.plot(steps, mean, color=colour, label=label, marker='o' if 'eval' in tag else None)
      axis.fill_between(steps, [m - s for m, s in zip(mean, sd)],
                        [m + s for m, s in zip(mean, sd)], color=colour, alpha=0.15)
    axis.set_title(title)
    axis.set_xlabel('WSP step')
    if 'eval' in tag:
      axis.axhline(chance_level, color='gray', linestyle=':', label='chance')
  axes[0].legend(fontsize=8)
  figure.suptitle(f'WSP ({sweep.wsp_steps[1]} steps) from random init and from MAE: '
                  f'mean ± sd over {len(sweep.seeds)} seeds')
  figure.tight_layout()
  curves_path = os.path.join(folder, 'pre_pretraining_curves.png')
  figure.savefig(curves_path, dpi=110)
  plt.close(figure)

  metrics = [m for m in ('linear probe', 'k-NN', 'fine-tuning top-1')
             if any(m in row for row in rows)]
  # Top row: each arm's accuracy (sd over seeds). Bottom row: MAE - random, paired by seed,
  # with its 95% interval: the seeds' shared ups and downs cancel, so this is the answer.
  figure, axes = plt.subplots(2, len(metrics), figsize=(5 * len(metrics), 8), squeeze=False)
  positions = list(range(len(budgets)))
  for top, bottom, metric in zip(axes[0], axes[1], metrics):
    for length, marker, shift, colour in (('short', 's', -0.06, 'C0'), ('long', 'o', 0.06, 'C1')):
      chosen = [row for row in rows if row['length'] == length and metric in row]
      if not chosen:
        continue
      label = f'WSP {length} ({chosen[0]["wsp_steps"]} steps)'
      top.errorbar(positions[:len(chosen)], [row[metric][0] for row in chosen],
                   yerr=[row[metric][1] for row in chosen], marker=marker, capsize=3,
                   color=colour, label=label)
      paired = [(position + shift, row[metric + ' diff']) for position, row
                in zip(positions, chosen) if row['mae_epochs']]
      bottom.errorbar([x for x, _ in paired], [d for _, (d, _) in paired],
                      yerr=[w for _, (_, w) in paired], marker=marker, capsize=3,
                      color=colour, linestyle='none', label=label)
    top.axhline(chance_level, color='gray', linestyle=':', label='chance')
    bottom.axhline(0.0, color='black', linewidth=0.8)
    for axis in (top, bottom):
      axis.set_xticks(positions, [f'{e:g}' for e in budgets])
      axis.set_xlabel('MAE budget (epochs of the data; 0 = random init)')
      axis.legend(fontsize=8)
    top.set_title(f'{metric}, shape (held-out)')
    bottom.set_title(f'{metric}: MAE - random, paired (95% CI)')
  figure.suptitle(f'Final accuracy vs MAE budget over {len(sweep.seeds)} seeds: mean ± sd '
                  '(top), paired difference from random init (bottom)')
  figure.tight_layout()
  budget_path = os.path.join(folder, 'pre_pretraining_budgets.png')
  figure.savefig(budget_path, dpi=110)
  plt.close(figure)
  return [curves_path, budget_path]


def main(argv=None, log=print):
  sweep, args = _parse(argv)
  start = time.time()
  if args.only:
    seed, epochs = args.only.split(':')
    run_sweep(sweep, log, only=[(int(seed), float(epochs))])
    return
  if args.processes > 1:
    train_in_processes(sweep, args, log)
  results = run_sweep(sweep, log)  # reads back what the processes trained
  rows = summary_rows(sweep, results)
  mae_base, wsp_base, tune_base = base_stages(sweep)
  print()
  print(f'MAE then WSP on the embedded data, probed on the shape (chance '
        f'{chance(sweep, results):.2f}): '
        f'{wsp_base.model.variant}, batch {mae_base.batch_size} (MAE) / {wsp_base.batch_size} '
        f'(WSP); an epoch is {epoch_steps(mae_base):.0f} MAE steps; seeds {list(sweep.seeds)}; '
        f'fine-tuning {sweep.finetune_steps} steps after the long WSP runs.')
  print()
  print(format_table(rows))
  print()
  print('(mean ± standard deviation over seeds; MAE - random: the paired difference, same '
        'seed, with its 95% t-interval; compute: analytic training FLOPs of MAE and WSP; at '
        'equal compute: against the long random-init run\'s probe at the WSP step of the same '
        'compute, interpolated between its probes, before its lr decayed)')
  paths = plot(sweep, results, rows, sweep.plots)
  print(f'plots: {", ".join(paths)}')
  print(f'{time.time() - start:.0f} s')


if __name__ == '__main__':
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # the runs' step logs; not when imported (tests)
  main()
