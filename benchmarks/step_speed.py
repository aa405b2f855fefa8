"""Train-step time, model FLOPs and MFU of each objective, through the real training code.

For each objective: stage_config(objective) + the options below -> validated ->
build_objective, make_optimizer, build_trainer -> ShardedTrainer.compile_step
for synthetic device batches of the shapes and dtypes the input pipeline
gives (with --remat=auto, the default, the training loop's own choice of remat,
big_pretrain/train/remat_choice.py; the table shows the policy chosen, and the
compile seconds include every candidate compiled to choose it) -> the compiled
step run `--warmup` times, then timed `--steps` times
(block_until_ready on the outputs; the median is reported). Model FLOPs are
analytic (big_pretrain/train/mfu.py: matmuls only, 3 x forward, remat's extra
forward not counted); MFU is against the device's known dense peak, or on a
CPU against a dense matmul measured in the same run, just before and just
after each row's timed steps (median of 5 each; the faster of the two).
Peak memory is the compiled step's memory_analysis(): temp + arguments +
outputs + code - aliased (donated) bytes, per device
(remat_choice.step_bytes_per_device, what remat 'auto' compares).

  python benchmarks/step_speed.py --variant=Ti/16 --batch_size=8 --image_size=64      # CPU, 2-3 min
  python benchmarks/step_speed.py --variant=B/16 --batch_size=256 --dtype=bfloat16
      # one GPU: --attention=auto (the default) picks cuDNN's fused attention there
  python benchmarks/step_speed.py --objectives= --mae_all_tokens --variant=B/16 --batch_size=4 \\
      --steps=3
      # MAE's encoder on the visible tokens vs on all tokens with mask tokens (CPU, ~2.5 min)
  python benchmarks/step_speed.py --objectives= --compile_scan=wsp --variant=L/16 --batch_size=2 \\
      --image_size=64                       # scanned vs unrolled layers (CPU, ~1.5 min)
  python benchmarks/step_speed.py --set=aim.objective.head_depth=2 --set=objective.text_depth=4 ...

On a CPU use --devices=1: fake CPU devices share the same cores (see mfu.py).
The machine may be shared: compare rows of one run, not numbers across runs.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
import numpy as np  # noqa: E402

from big_pretrain import sharding as sharding_lib  # noqa: E402
from big_pretrain.config.defaults import stage_config  # noqa: E402
from big_pretrain.config.validation import validate_stage_config  # noqa: E402
from big_pretrain.data import batch_features as pipeline_lib  # noqa: E402
from big_pretrain.data.text.tokenizer import synthetic_tokenizer_path  # noqa: E402
from big_pretrain.models import attention as attention_lib  # noqa: E402
from big_pretrain.models import transformer as transformer_lib  # noqa: E402
from big_pretrain.models import vit as vit_lib  # noqa: E402
from big_pretrain.objectives import objective_names  # noqa: E402
from big_pretrain.train import mfu as mfu_lib  # noqa: E402
from big_pretrain.train import remat_choice  # noqa: E402
from big_pretrain.train.optim import make_optimizer, make_schedule  # noqa: E402
# Beside this script (its folder is on sys.path): the profile, and the tables printed.
from step_profile import PROFILE_WITH_COMMAND_BUFFERS, add_xla_flag, profile_steps  # noqa: E402
from step_tables import (Row, describe_peaks, describe_remat, describe_scan,  # noqa: E402
                         describe_setup, fmt_tflop, main_table, print_table, write_json)

MIB = 2 ** 20


def parse_bool(text: str) -> bool:
  if text.lower() in ('true', '1', 'yes'):
    return True
  if text.lower() in ('false', '0', 'no'):
    return False
  raise argparse.ArgumentTypeError(f'expected true or false, got {text!r}')


def parse_scan(text: str) -> bool | str:
  return vit_lib.SCAN_AUTO if text == vit_lib.SCAN_AUTO else parse_bool(text)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--objectives', default='mae,wsp,flip,aim',
                      help='comma-separated; empty to print only the extra tables')
  parser.add_argument('--variant', default='B/16',
                      help=f'SIZE/PATCH, SIZE in {list(vit_lib.VIT_SIZES)}')
  parser.add_argument('--depth', type=int, default=0,
                      help="override the variant's depth (benchmark only, e.g. a deep Ti)")
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch_size', type=int, default=8, help='global batch')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                      help='config.model.dtype, the compute dtype (parameters stay float32)')
  parser.add_argument('--scan', type=parse_scan, default=vit_lib.SCAN_AUTO,
                      help="config.model.scan: true, false or 'auto' (unrolled up to "
                           f'{vit_lib.UNROLLED_MAX_DEPTH} layers)')
  parser.add_argument('--remat', default=transformer_lib.REMAT_AUTO,
                      choices=[transformer_lib.REMAT_AUTO, *transformer_lib.REMAT_POLICIES],
                      help="config.model.remat ('auto': the least remat whose step fits the "
                           'device, measured as the training loop does)')
  parser.add_argument('--attention', default='auto', choices=attention_lib.ATTENTION_IMPLS,
                      help="config.model.attention_impl for jax.nn.dot_product_attention "
                           "('auto': cuDNN flash attention on a GPU in bfloat16 where it can "
                           "run, else XLA's)")
  parser.add_argument('--devices', type=int, default=1,
                      help='use the first N devices (mesh data=N)')
  parser.add_argument('--steps', type=int, default=5, help='timed steps per row')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps after compiling')
  parser.add_argument('--wsp_labels', type=int, default=1000, help="WSP's vocabulary size")
  parser.add_argument('--set', action='append', default=[], metavar='[OBJECTIVE.]KEY=VALUE',
                      help='config override, e.g. objective.head_depth=2 (every objective '
                           'whose config has the key) or flip.objective.mask_ratio=0')
  parser.add_argument('--breakdown', action='store_true', help='print the FLOPs per part too')
  parser.add_argument('--json', default='', metavar='PATH',
                      help="also write the main table's rows to PATH as JSON "
                           '(benchmarks/gpu_goals.py reads them)')
  parser.add_argument('--profile', default='', metavar='DIR',
                      help='after timing each row, trace 3 steps with jax.profiler into DIR and '
                           'print the step\'s wall time, its time in device kernels, the idle '
                           'time between them and the top kernels; DIR also gets each '
                           "row's optimized HLO (look up a kernel's fusion name there)")
  parser.add_argument('--profile_objectives', default='',
                      help='with --profile: only these rows of the main table (comma-separated; '
                           'default all)')
  parser.add_argument('--mae_all_tokens', action='store_true',
                      help="MAE's encoder on visible tokens vs on all tokens with mask tokens")
  parser.add_argument('--patch_embed', nargs='?', const='mae,wsp', default='',
                      metavar='OBJECTIVES',
                      help="model.patch_embed_impl 'matmul' vs 'conv': the embedding alone "
                           '(forward + backward) and the train steps of OBJECTIVES (default '
                           'mae,wsp: MAE embeds the kept patches, WSP all of them)')
  parser.add_argument('--compile_scan', nargs='?', const='mae', default=None,
                      choices=objective_names(), metavar='OBJECTIVE',
                      help='scanned vs unrolled layers of OBJECTIVE (default mae): compile '
                           'seconds and step time')
  return parser.parse_args(argv)


# --- Configs -----------------------------------------------------------------

def variant_name(args) -> str:
  """--variant, or with --depth a benchmark-only size registered in this process."""
  if not args.depth:
    return args.variant
  size = vit_lib.parse_variant(args.variant)
  name = f'{args.variant.split("/")[0]}d{args.depth}'
  vit_lib.VIT_SIZES[name] = (size.width, args.depth, size.heads)  # this process only
  return f'{name}/{size.patch_size}'


def write_vocabulary(num_labels: int, directory: str) -> str:
  path = os.path.join(directory, f'labels_{num_labels}.txt')
  with open(path, 'w', encoding='utf-8') as file:
    file.write(''.join(f'label{i}\n' for i in range(num_labels)))
  return path


def apply_override(config, objective: str, text: str) -> bool:
  """Applies '[objective.]a.b=value' if it names this objective (or none) and the key exists."""
  key, sep, raw = text.partition('=')
  if not sep:
    raise SystemExit(f'--set={text!r}: expected KEY=VALUE.')
  parts = key.split('.')
  if parts[0] in objective_names():
    if parts[0] != objective:
      return False
    parts = parts[1:]
  node = config
  for part in parts[:-1]:
    if part not in node:
      return False
    node = node[part]
  if parts[-1] not in node:
    return False
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  node[parts[-1]] = value
  return True


def stage_for(objective: str, args, workdir: str, applied: set | None = None,
              validate: bool = True, **model_overrides):
  """The stage config of one row: the objective's defaults (paper heads) + the options.

  validate=False only builds it: used to see which objectives a --set applies to, since some
  objectives (a self-training student) are valid only inside a chain.
  """
  config = stage_config(objective)
  config.model.update(variant=variant_name(args), dtype=args.dtype, scan=args.scan,
                      remat=args.remat, attention_impl=args.attention)
  if objective in ('flip', 'aim'):
    config.model.update(use_cls_token=False, pool='gap')  # as configs/flip.py and aim.py
  config.model.update(model_overrides)
  config.batch_size = args.batch_size
  config.data.image_size = args.image_size
  config.mesh.update(data=args.devices, fsdp=1, tensor=1)
  if objective == 'wsp':
    config.data.labels.vocabulary = write_vocabulary(args.wsp_labels, workdir)
  if objective == 'flip':
    config.data.text.tokenizer = synthetic_tokenizer_path()
  for text in args.set:
    if apply_override(config, objective, text) and applied is not None:
      applied.add(text)
  if validate:
    validate_stage_config(config)
  return config


# --- One row -----------------------------------------------------------------

def measured_peak(device, dtype: str) -> float:
  """A dense matmul of this dtype on `device`, measured now (median of 5)."""
  return mfu_lib.measure_matmul_peak_flops(dtype, repeats=5, device=device)


def run_row(objective: str, config, args) -> Row:
  """One row: build and compile the step as the training loop does, then time it."""
  return run_rows_interleaved([(objective, config)], args)[0]


@dataclasses.dataclass
class _ReadyStep:
  """A row's compiled step and its arguments, warmed up, not yet timed."""
  name: str
  config: object
  compiled: object
  state: object
  batch: dict
  base_rng: object
  compile_seconds: float
  memory_mib: float
  attention: str


def _ready_step(name: str, config, args) -> _ReadyStep:
  devices = jax.devices()[:args.devices]
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  schedule = make_schedule(config.optim, config.batch_size, config.total_steps)
  host_batch = pipeline_lib.random_batch(config.data, config.batch_size,
                                         np.random.default_rng(0))
  batch_shapes = {key: jax.ShapeDtypeStruct(value.shape, value.dtype)
                  for key, value in host_batch.items()}
  start = time.perf_counter()
  with attention_lib.choices_logged_per_stage() as attention_plans:
    # As the training loop builds it: remat 'auto' is chosen by compiling the step.
    built = remat_choice.build_with_remat_choice(
        config, mesh, sharding_lib.logical_axis_rules(config),
        make_optimizer(config.optim, schedule), schedule, batch_shapes)
    config, trainer = built.config, built.trainer
    compiled = (trainer.compile_step(batch_shapes) if trainer.compiled_step is None
                else trainer.compiled_step)
  compile_seconds = time.perf_counter() - start
  ready = _ReadyStep(
      name, config, compiled, trainer.init_state(jax.random.key(0)),
      jax.device_put(host_batch, sharding_lib.batch_sharding(mesh)),
      jax.device_put(jax.random.key(1), sharding_lib.replicated(mesh)), compile_seconds,
      remat_choice.step_bytes_per_device(compiled) / MIB,
      # Each stack's kernel, e.g. 'cudnn 50, cudnn 197->198' for MAE (encoder, decoder).
      ', '.join(sorted({plan.summary() for _, plan in attention_plans})))
  for _ in range(args.warmup):
    _timed_step(ready)
  return ready


def _timed_step(ready: _ReadyStep) -> tuple[float, dict]:
  start = time.perf_counter()
  ready.state, metrics = ready.compiled(ready.state, ready.batch, ready.base_rng)
  jax.block_until_ready((ready.state, metrics))
  return time.perf_counter() - start, metrics


def run_rows_interleaved(named_configs: list[tuple[str, object]], args) -> list[Row]:
  """Rows whose timed steps alternate (a b a b ...), so a shared machine's drift falls on
  all of them alike: compare them as ratios. Each is compiled and warmed up first."""
  ready = [_ready_step(name, config, args) for name, config in named_configs]
  device = jax.devices()[0]
  dtype = ready[0].config.model.dtype
  # Without a known peak, a matmul measured just before and just after the timed
  # steps, the faster of the two: on a shared machine the speed drifts.
  known_peak = mfu_lib.peak_flops_per_device(device, dtype)
  peak_before = known_peak or measured_peak(device, dtype)
  times = {r.name: [] for r in ready}
  metrics = {}
  for _ in range(args.steps):
    for r in ready:
      seconds, metrics[r.name] = _timed_step(r)
      times[r.name].append(seconds)
  peak = known_peak or max(peak_before, measured_peak(device, dtype))
  rows = []
  profiled = [o for o in getattr(args, 'profile_objectives', '').split(',') if o]
  for r in ready:
    profile = None
    if args.profile and (not profiled or r.name in profiled):
      r.state, metrics[r.name], profile = profile_steps(r.name, r.compiled, r.state, r.batch,
                                                        r.base_rng, args.profile)
    loss = float(metrics[r.name]['loss'])
    if not np.isfinite(loss):
      raise RuntimeError(f'{r.name}: the loss is {loss}.')
    row = Row(r.name, r.config, statistics.median(times[r.name]), r.compile_seconds,
              r.memory_mib, mfu_lib.model_flops_breakdown(r.config), peak, loss, r.attention,
              profile)
    print(f'  {r.name}: {row.seconds * 1e3:.1f} ms/step, compile {r.compile_seconds:.1f} s, '
          f'MFU {row.mfu:.1%}', flush=True)
    rows.append(row)
  return rows


def mae_all_tokens_table(args, workdir: str) -> list[Row]:
  print('\nMAE: the encoder on visible tokens vs on all tokens with mask tokens (r = 0.75)')
  rows = []
  for all_tokens in (False, True):
    config = stage_for('mae', args, workdir)
    config.objective.update(mask_ratio=0.75, encoder_on_all_tokens=all_tokens)
    rows.append(run_row('mae' + (' (all tokens)' if all_tokens else ''), config, args))
  print(f'\n{describe_setup(args)}; ViT-{rows[0].config.model.variant}, decoder '
        f'{rows[0].config.objective.decoder_width}x{rows[0].config.objective.decoder_depth}')
  print(describe_peaks(args, rows) + '\n')
  base = rows[0]
  # 'at equal peak': each row's time scaled by the matmul peak measured around
  # it, which cancels the machine's drift between rows (a shared box).
  print_table(
      ['encoder on', 'encoder tokens', 'ms/step', 'images/s', 'model TFLOP/step',
       'step time vs visible', 'at equal peak', 'FLOPs vs visible', 'device peak TFLOP/s',
       'MFU', 'compile s', 'peak mem MiB/device'],
      [[name, str(mfu_lib.encoder_num_tokens(row.config)), f'{row.seconds * 1e3:.1f}',
        f'{row.images_per_second:.1f}', fmt_tflop(row.flops.train_step / 1e12),
        f'{row.seconds / base.seconds:.2f}x',
        f'{row.seconds * row.peak / (base.seconds * base.peak):.2f}x',
        f'{row.flops.train_step / base.flops.train_step:.2f}x',
        fmt_tflop(row.peak / 1e12), f'{row.mfu:.1%}', f'{row.compile_seconds:.1f}',
        f'{row.memory_mib:.0f}']
       for name, row in zip(('visible patches', 'all + mask tokens'), rows)])
  return rows


def time_patch_embedding(args, implementation: str, kept: int | None, repeats: int) -> list[float]:
  """Seconds of the patch embedding's forward + backward (kernel and bias gradients) on a
  batch of --image_size images, embedding `kept` random patches per image (None: all)."""
  size = vit_lib.parse_variant(variant_name(args))
  embed = vit_lib.PatchEmbedding(size.width, size.patch_size, vit_lib.compute_dtype(args.dtype),
                                 implementation)
  rng = np.random.default_rng(0)
  images = jax.numpy.asarray(rng.normal(size=(args.batch_size, args.image_size,
                                              args.image_size, 3)), np.float32)
  num_patches = (args.image_size // size.patch_size) ** 2
  keep = None if kept is None else jax.numpy.asarray(np.argsort(
      rng.random((args.batch_size, num_patches)), axis=1)[:, :kept], np.int32)
  params = embed.init(jax.random.key(0), images)['params']
  # Images and indices are arguments: as constants XLA would fold the whole embedding.
  grad = jax.jit(jax.grad(lambda p, x, kept: embed.apply({'params': p}, x, kept).astype(
      np.float32).sum()))
  jax.block_until_ready(grad(params, images, keep))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(grad(params, images, keep))
    times.append(time.perf_counter() - start)
  return times


def patch_embed_table(args, workdir: str) -> list[Row]:
  """model.patch_embed_impl 'matmul' vs 'conv', alone and in the train steps that use it."""
  num_patches = (args.image_size // vit_lib.parse_variant(variant_name(args)).patch_size) ** 2
  kept = max(1, int(num_patches * 0.25))  # MAE's r = 0.75
  print(f'\nPatch embedding: matmul of the kept patches vs conv over all, then gather '
        f'({describe_setup(args)})\n')
  alone = {}
  # Interleaved repeats: on a shared machine the speed drifts between rows.
  for _ in range(3):
    for patches in (kept, None):
      for implementation in vit_lib.PATCH_EMBED_IMPLS:
        alone.setdefault((patches, implementation), []).extend(
            time_patch_embedding(args, implementation, patches, max(3, args.steps)))
  rows, step_rows = [], []
  for patches in (kept, None):
    matmul, conv = (statistics.median(alone[(patches, i)]) for i in ('matmul', 'conv'))
    rows.append([f'embedding alone, fwd + bwd, {patches or num_patches} of {num_patches} patches',
                 f'{matmul * 1e3:.2f}', f'{conv * 1e3:.2f}', f'{conv / matmul:.2f}x', '-'])
  for objective in [o for o in args.patch_embed.split(',') if o]:
    matmul, conv = run_rows_interleaved(
        [(f'{objective} patch_embed={implementation}',
          stage_for(objective, args, workdir, patch_embed_impl=implementation))
         for implementation in ('matmul', 'conv')], args)
    step_rows += [matmul, conv]
    what = 'kept patches' if objective in ('mae', 'flip') else 'all patches'
    # 'at equal peak' scales each row by the matmul peak measured around it (a shared box).
    rows.append([f'{objective} train step ({what})', f'{matmul.seconds * 1e3:.1f}',
                 f'{conv.seconds * 1e3:.1f}', f'{conv.seconds / matmul.seconds:.2f}x',
                 f'{conv.seconds * conv.peak / (matmul.seconds * matmul.peak):.2f}x'])
  print()
  print_table(['what', 'matmul ms', 'conv ms', 'conv / matmul', 'at equal peak'], rows)
  return step_rows


def compile_scan_table(args, objective: str, workdir: str) -> list[Row]:
  print(f'\n{objective}: scanned vs unrolled layers')
  rows = run_rows_interleaved([(f'{objective} scan={scan}',
                                stage_for(objective, args, workdir, scan=scan))
                               for scan in (False, True)], args)
  depth = vit_lib.parse_variant(rows[0].config.model.variant).depth
  print(f'\n{describe_setup(args)}; ViT-{rows[0].config.model.variant} (depth {depth})')
  print(describe_peaks(args, rows) + '\n')
  print_table(['layers', 'remat', 'compile s', 'ms/step', 'images/s', 'device peak TFLOP/s',
               'MFU', 'peak mem MiB/device'],
              [[describe_scan(row.config),
                describe_remat(args, row.config),
                f'{row.compile_seconds:.1f}', f'{row.seconds * 1e3:.1f}',
                f'{row.images_per_second:.1f}', fmt_tflop(row.peak / 1e12), f'{row.mfu:.1%}',
                f'{row.memory_mib:.0f}']
               for row in rows])
  return rows


def main(argv=None):
  args = parse_args(argv)
  if args.profile:
    add_xla_flag(PROFILE_WITH_COMMAND_BUFFERS)
  objectives = [name for name in args.objectives.split(',') if name]
  for name in objectives:
    if name not in objective_names():
      raise SystemExit(f'--objectives: unknown {name!r}; choose from {objective_names()}.')
  if args.devices > jax.device_count() or args.batch_size % args.devices:
    raise SystemExit(f'--devices={args.devices}: {jax.device_count()} available, and the batch '
                     f'({args.batch_size}) must divide evenly over them.')
  if jax.devices()[0].platform == 'cpu' and args.devices > 1:
    print(f'Note: the {args.devices} CPU devices share the same cores; MFU against one '
          "device's measured peak is understated. Use --devices=1 on a CPU.")
  with tempfile.TemporaryDirectory(prefix='step_benchmark_') as workdir:
    applied = set()
    for objective in objective_names():
      stage_for(objective, args, workdir, applied, validate=False)
    unused = [text for text in args.set if text not in applied]
    if unused:
      raise SystemExit(f'--set {unused}: no objective config has that key.')
    rows = []
    for objective in objectives:
      rows.append(run_row(objective, stage_for(objective, args, workdir), args))
    if rows:
      main_table(args, rows)
    if args.mae_all_tokens:
      rows += mae_all_tokens_table(args, workdir)
    if args.patch_embed:
      rows += patch_embed_table(args, workdir)
    if args.compile_scan:
      rows += compile_scan_table(args, args.compile_scan, workdir)
    if args.json:
      write_json(args, rows)


if __name__ == '__main__':
  main()
