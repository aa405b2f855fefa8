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

  python benchmarks/step.py --variant=Ti/16 --batch_size=8 --image_size=64      # CPU, 2-3 min
  python benchmarks/step.py --variant=B/16 --batch_size=256 --dtype=bfloat16
      # one GPU: --attention=auto (the default) picks cuDNN's fused attention there
  python benchmarks/step.py --objectives= --mae_all_tokens --variant=B/16 --batch_size=4 --steps=3
      # MAE's encoder on the visible tokens vs on all tokens with mask tokens (CPU, ~2.5 min)
  python benchmarks/step.py --objectives= --compile_scan=wsp --variant=L/16 --batch_size=2 \\
      --image_size=64                       # scanned vs unrolled layers (CPU, ~1.5 min)
  python benchmarks/step.py --set=aim.objective.head_depth=2 --set=objective.text_depth=4 ...

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
from big_pretrain.config_schema import stage_config, validate_stage_config  # noqa: E402
from big_pretrain.data import pipeline as pipeline_lib  # noqa: E402
from big_pretrain.data.labels import LabelVocabulary  # noqa: E402
from big_pretrain.data.tokenizer import load_tokenizer, synthetic_tokenizer_path  # noqa: E402
from big_pretrain.models import vit as vit_lib  # noqa: E402
from big_pretrain.objectives import objective_names  # noqa: E402
from big_pretrain.train import mfu as mfu_lib  # noqa: E402
from big_pretrain.train import remat_choice  # noqa: E402
from big_pretrain.train.optim import make_optimizer, make_schedule  # noqa: E402

MIB = 2 ** 20


def parse_bool(text: str) -> bool:
  if text.lower() in ('true', '1', 'yes'):
    return True
  if text.lower() in ('false', '0', 'no'):
    return False
  raise argparse.ArgumentTypeError(f'expected true or false, got {text!r}')


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
  parser.add_argument('--scan', type=parse_bool, default=False, help='config.model.scan')
  parser.add_argument('--remat', default=vit_lib.REMAT_AUTO,
                      choices=[vit_lib.REMAT_AUTO, *vit_lib.REMAT_POLICIES],
                      help="config.model.remat ('auto': the least remat whose step fits the "
                           'device, measured as the training loop does)')
  parser.add_argument('--attention', default='auto', choices=vit_lib.ATTENTION_IMPLS,
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
  parser.add_argument('--mae_all_tokens', action='store_true',
                      help="MAE's encoder on visible tokens vs on all tokens with mask tokens")
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
              **model_overrides):
  """The stage config of one row: the objective's defaults (paper heads) + the options."""
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
  validate_stage_config(config)
  return config


# --- One row -----------------------------------------------------------------

def synthetic_batch(config, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """What the input pipeline gives the step: the features, shapes and dtypes it would."""
  batch, size = config.batch_size, config.data.image_size
  features = {'image': rng.integers(0, 256, (batch, size, size, 3), np.uint8),
              'label': rng.integers(0, 10, (batch,), np.int32)}
  names = pipeline_lib.device_feature_names(config.data)
  if pipeline_lib.LABEL_IDS_FEATURE in names:
    width = config.data.labels.max_labels_per_example
    labels = np.full((batch, width), -1, np.int32)
    for row in labels:
      count = min(width, 4)
      row[:count] = np.sort(rng.choice(config_num_labels(config), count, replace=False))
    features['label_ids'] = labels
  if pipeline_lib.TEXT_TOKENS_FEATURE in names:
    tokenizer = load_tokenizer(config.data.text.tokenizer)
    max_length = config.data.text.max_length
    special = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}
    words = np.array([i for i in range(tokenizer.vocab_size) if i not in special], np.int32)
    rows = np.full((batch, max_length), tokenizer.pad_id, np.int32)
    for row in rows:
      ids = [tokenizer.bos_id, *rng.choice(words, rng.integers(4, max_length - 1)),
             tokenizer.eos_id]
      ids = [i for i in ids if i is not None]
      row[:len(ids)] = ids
    features['text_tokens'] = rows
  return {name: features[name] for name in names}


def config_num_labels(config) -> int:
  return len(LabelVocabulary.from_file(config.data.labels.vocabulary))


@dataclasses.dataclass
class Row:
  objective: str
  config: object
  seconds: float
  compile_seconds: float
  memory_mib: float
  flops: mfu_lib.StepFlops
  peak: float
  loss: float

  @property
  def images_per_second(self) -> float:
    return self.config.batch_size / self.seconds

  @property
  def tflops_per_device(self) -> float:
    return mfu_lib.achieved_flops_per_device(
        self.flops.train_step, self.seconds, self.config.mesh.data) / 1e12

  @property
  def mfu(self) -> float:
    return mfu_lib.mfu(self.flops.train_step, self.seconds, self.config.mesh.data, self.peak)


def measured_peak(device, dtype: str) -> float:
  """A dense matmul of this dtype on `device`, measured now (median of 5)."""
  return mfu_lib.measure_matmul_peak_flops(dtype, repeats=5, device=device)


def run_row(objective: str, config, args) -> Row:
  devices = jax.devices()[:args.devices]
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  schedule = make_schedule(config.optim, config.batch_size, config.total_steps)
  host_batch = synthetic_batch(config, np.random.default_rng(0))
  batch_shapes = {name: jax.ShapeDtypeStruct(value.shape, value.dtype)
                  for name, value in host_batch.items()}
  start = time.perf_counter()
  # As the training loop builds it: remat 'auto' is chosen by compiling the step.
  built = remat_choice.build_with_remat_choice(
      config, mesh, sharding_lib.logical_axis_rules(config),
      make_optimizer(config.optim, schedule), schedule, batch_shapes)
  config, trainer = built.config, built.trainer
  compiled = (trainer.compile_step(batch_shapes) if trainer.compiled_step is None
              else trainer.compiled_step)
  compile_seconds = time.perf_counter() - start
  memory_mib = remat_choice.step_bytes_per_device(compiled) / MIB

  batch = jax.device_put(host_batch, sharding_lib.batch_sharding(mesh))
  base_rng = jax.device_put(jax.random.key(1), sharding_lib.replicated(mesh))
  state = trainer.init_state(jax.random.key(0))
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch, base_rng)
    jax.block_until_ready((state, metrics))
  # Without a known peak, a matmul measured just before and just after the timed
  # steps, the faster of the two: on a shared machine the speed drifts.
  known_peak = mfu_lib.peak_flops_per_device(devices[0], config.model.dtype)
  peak_before = known_peak or measured_peak(devices[0], config.model.dtype)
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, base_rng)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  peak = known_peak or max(peak_before, measured_peak(devices[0], config.model.dtype))
  loss = float(metrics['loss'])
  if not np.isfinite(loss):
    raise RuntimeError(f'{objective}: the loss is {loss}.')
  row = Row(objective, config, statistics.median(times), compile_seconds, memory_mib,
            mfu_lib.model_flops_breakdown(config), peak, loss)
  print(f'  {objective}: {row.seconds * 1e3:.1f} ms/step, compile {compile_seconds:.1f} s, '
        f'MFU {row.mfu:.1%}', flush=True)
  return row


# --- Tables ------------------------------------------------------------------

def print_table(header: list[str], rows: list[list[str]]) -> None:
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
  print('| ' + ' | '.join(h.rjust(w) for h, w in zip(header, widths)) + ' |')
  print('|' + '|'.join('-' * (w + 1) + ':' for w in widths) + '|')
  for row in rows:
    print('| ' + ' | '.join(c.rjust(w) for c, w in zip(row, widths)) + ' |')
  print()


def describe_setup(args) -> str:
  device = jax.devices()[0]
  return (f'{device.platform} "{device.device_kind}" x{args.devices}, global batch '
          f'{args.batch_size}, {args.image_size} px, median of {args.steps} steps after '
          f'{args.warmup} warm-up')


def describe_peaks(args, rows: list[Row]) -> str:
  device = jax.devices()[0]
  if mfu_lib.peak_flops_per_device(device, args.dtype):
    return 'MFU vs ' + mfu_lib.describe_peak(device, args.dtype)
  size = 2048 if device.platform == 'cpu' else 8192
  return (f'MFU vs a {args.dtype} {size}x{size} matmul on {device}, measured just before and '
          'after each row\'s timed steps (the faster; column "device peak"); model FLOPs analytic, '
          '3 x forward, remat not counted')


def describe_remat(args, config) -> str:
  """The policy the row ran with; 'auto: dots' when --remat=auto chose it."""
  if args.remat == vit_lib.REMAT_AUTO:
    return f'{vit_lib.REMAT_AUTO}: {config.model.remat}'
  return config.model.remat


def fmt_tflop(value: float) -> str:
  return f'{value:.4g}'


def main_table(args, rows: list[Row]) -> None:
  print(f'\nTrain step per objective: {describe_setup(args)}')
  print(describe_peaks(args, rows) + '\n')
  header = ['objective', 'variant', 'dtype', 'scan', 'remat', 'attention', 'batch', 'ms/step',
            'images/s', 'model TFLOP/step', 'TFLOP/s/device', 'device peak TFLOP/s', 'MFU',
            'compile s', 'peak mem MiB/device']
  print_table(header, [[
      row.objective, row.config.model.variant, row.config.model.dtype,
      str(row.config.model.scan), describe_remat(args, row.config), args.attention,
      str(row.config.batch_size), f'{row.seconds * 1e3:.1f}', f'{row.images_per_second:.1f}',
      fmt_tflop(row.flops.train_step / 1e12), fmt_tflop(row.tflops_per_device),
      fmt_tflop(row.peak / 1e12), f'{row.mfu:.1%}', f'{row.compile_seconds:.1f}',
      f'{row.memory_mib:.0f}'] for row in rows])
  if args.breakdown:
    for row in rows:
      print(f'{row.objective}: model FLOPs per part\n{row.flops.format_table()}\n')


def mae_all_tokens_table(args, workdir: str) -> None:
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


def compile_scan_table(args, objective: str, workdir: str) -> None:
  print(f'\n{objective}: scanned vs unrolled layers')
  rows = []
  for scan in (False, True):
    config = stage_for(objective, args, workdir, scan=scan)
    rows.append(run_row(f'{objective} scan={scan}', config, args))
  depth = vit_lib.parse_variant(rows[0].config.model.variant).depth
  print(f'\n{describe_setup(args)}; ViT-{rows[0].config.model.variant} (depth {depth})')
  print(describe_peaks(args, rows) + '\n')
  print_table(['layers', 'remat', 'compile s', 'ms/step', 'images/s', 'device peak TFLOP/s',
               'MFU', 'peak mem MiB/device'],
              [[('scanned' if row.config.model.scan else 'unrolled'),
                describe_remat(args, row.config),
                f'{row.compile_seconds:.1f}', f'{row.seconds * 1e3:.1f}',
                f'{row.images_per_second:.1f}', fmt_tflop(row.peak / 1e12), f'{row.mfu:.1%}',
                f'{row.memory_mib:.0f}']
               for row in rows])


def main(argv=None):
  args = parse_args(argv)
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
      stage_for(objective, args, workdir, applied)
    unused = [text for text in args.set if text not in applied]
    if unused:
      raise SystemExit(f'--set {unused}: no objective config has that key.')
    rows = []
    for objective in objectives:
      rows.append(run_row(objective, stage_for(objective, args, workdir), args))
    if rows:
      main_table(args, rows)
    if args.mae_all_tokens:
      mae_all_tokens_table(args, workdir)
    if args.compile_scan:
      compile_scan_table(args, args.compile_scan, workdir)


if __name__ == '__main__':
  main()
