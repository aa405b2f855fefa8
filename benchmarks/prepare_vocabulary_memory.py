"""Peak memory and speed of `build_vocabulary labels` over 1 and 4 million captions.

The captions are the synthetic source's (--source=synthetic --num_examples=N): the same 35
hashtags at every N, read without drawing the images (SyntheticShapes.texts, ~35 us per
example), so the counts, not the data, decide the memory. Each row is one fresh command:

  in process          no --runner (no Beam)
  Beam, 1 worker      --runner=DirectRunner --direct_num_workers=1
  Beam, 2 workers     --runner=DirectRunner --direct_num_workers=2
                      --direct_running_mode=multi_processing

Memory, two ways: "largest process" is the peak RSS of the largest process of the command's
tree (ru_maxrss of RUSAGE_CHILDREN in a fresh wrapper process, which waits for the command;
the command's waited-for descendants count); "whole tree" is the largest sum of the RSS of
every process of the tree at once, sampled every 0.2 s from /proc (Beam's worker processes
included, whoever waits for them). Neither should grow from 1 to 4 million captions: the
texts stream, and only the distinct tags are held. examples/s is over the command's wall
time, start-up included (Beam's is a few seconds).

  python benchmarks/prepare_vocabulary_memory.py                    # ~10 min on 2 cores
  python benchmarks/prepare_vocabulary_memory.py --counts=100000,400000   # ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

ROWS = (
    ('in process', ()),
    ('Beam, 1 worker', ('--runner=DirectRunner', '--direct_num_workers=1')),
    ('Beam, 2 workers', ('--runner=DirectRunner', '--direct_num_workers=2',
                         '--direct_running_mode=multi_processing')),
)
# Runs the command given after it and prints the peak RSS of its largest process, in KiB.
_WRAPPER = ('import resource, subprocess, sys; '
            'code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; '
            'print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)')
_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vocabulary_memory_rows(counts=(1_000_000, 4_000_000), max_size: int = 1000) -> list[dict]:
  """One row per caption count and way of running: seconds, examples/s, peak MiB."""
  rows = []
  with tempfile.TemporaryDirectory() as scratch:
    for count in counts:
      for name, flags in ROWS:
        output = os.path.join(scratch, f'{count}-{len(rows)}.txt')
        command = [sys.executable, '-m', 'big_pretrain.data.text.build_vocabulary', 'labels',
                   '--source=synthetic', f'--num_examples={count}', '--min_count=1',
                   f'--max_size={max_size}', f'--output={output}', *flags]
        seconds, largest, tree = measure(command)
        rows.append({'captions': count, 'run': name, 'seconds': round(seconds, 1),
                     'examples_per_s': round(count / seconds),
                     'largest_process_mib': round(largest), 'whole_tree_mib': round(tree),
                     'vocabulary': open(output, encoding='utf-8').read().count('\n')})
  return rows


def measure(command: list[str]) -> tuple[float, float, float]:
  """Wall seconds, the largest process's peak RSS and the whole tree's sampled peak (MiB)."""
  start = time.perf_counter()
  wrapper = subprocess.Popen([sys.executable, '-c', _WRAPPER, *command], cwd=_REPOSITORY,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  tree_peak = [0]
  done = threading.Event()
  sampler = threading.Thread(target=_sample_tree, args=(wrapper.pid, tree_peak, done))
  sampler.start()
  stdout, stderr = wrapper.communicate()
  done.set()
  sampler.join()
  seconds = time.perf_counter() - start
  if wrapper.returncode:
    raise RuntimeError(f'{" ".join(command)} failed:\n{stderr[-3000:]}')
  return seconds, int(stdout.split()[-1]) / 1024, tree_peak[0] / 1024


def _sample_tree(root: int, peak: list[int], done: threading.Event) -> None:
  """Keeps in peak[0] the largest sum of VmRSS (KiB) of `root` and its descendants."""
  while not done.wait(0.2):
    children: dict[int, list[int]] = {}
    for entry in os.listdir('/proc'):
      if entry.isdigit():
        try:
          with open(f'/proc/{entry}/stat', encoding='utf-8') as stat:
            parent = int(stat.read().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
          continue
        children.setdefault(parent, []).append(int(entry))
    total, pending = 0, [root]
    while pending:
      pid = pending.pop()
      pending.extend(children.get(pid, ()))
      total += _rss_kib(pid)
    peak[0] = max(peak[0], total)


def _rss_kib(pid: int) -> int:
  try:
    with open(f'/proc/{pid}/status', encoding='utf-8') as status:
      for line in status:
        if line.startswith('VmRSS:'):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def print_table(rows: list[dict]) -> None:
  print('| captions | run | seconds | examples/s | largest process MiB | whole tree MiB |')
  print('|---:|---|---:|---:|---:|---:|')
  for row in rows:
    print(f'| {row["captions"]:,} | {row["run"]} | {row["seconds"]} | '
          f'{row["examples_per_s"]:,} | {row["largest_process_mib"]} | '
          f'{row["whole_tree_mib"]} |')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--counts', default='1000000,4000000',
                      help='Comma-separated numbers of captions.')
  parser.add_argument('--max_size', type=int, default=1000,
                      help='--max_size of the build (below 35, the labels are read twice).')
  parser.add_argument('--json', help='Also write the rows to this file.')
  args = parser.parse_args(argv)
  rows = vocabulary_memory_rows(tuple(int(count) for count in args.counts.split(',')),
                                args.max_size)
  print_table(rows)
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as file:
      json.dump(rows, file, indent=1)


if __name__ == '__main__':
  main()
