"""This process's share of every global batch, and the threads that read it.

Each process reads only its own rows (`ProcessShare`), so concatenating the processes'
rows gives the batch a single process would read. Evaluation reads this way; training
reads the same layout column by column (batch_columns.py), which also keeps a skipped
image's replacement in its own row.
"""

from __future__ import annotations

import os

import grain
import jax
import ml_collections

# The most Grain threads config.data.num_threads=None picks (Grain's own default).
MAX_AUTO_THREADS = 16


def num_reader_threads(data_config: ml_collections.ConfigDict) -> int:
  """config.num_threads, or for None one per CPU core available, at most MAX_AUTO_THREADS."""
  if data_config.num_threads is not None:
    return data_config.num_threads
  if hasattr(os, 'sched_getaffinity'):  # Linux: the cores this process may run on
    cores = len(os.sched_getaffinity(0))
  else:
    cores = os.cpu_count() or 1
  return max(1, min(MAX_AUTO_THREADS, cores))


def read_process_share(dataset: grain.MapDataset, data_config: ml_collections.ConfigDict,
                       rows_per_batch: int) -> grain.IterDataset:
  """This process's `rows_per_batch` rows of every global batch of `dataset`, decoded in
  num_reader_threads threads with config.data.prefetch_buffer_size elements read ahead."""
  share = ProcessShare(dataset, rows_per_batch, jax.process_index(), jax.process_count())
  return share.to_iter_dataset(grain.ReadOptions(
      num_threads=num_reader_threads(data_config),
      prefetch_buffer_size=data_config.prefetch_buffer_size))


class ProcessShare(grain.MapDataset):
  """One process's rows of every global batch, in order.

  Global batch b holds elements [b*G, (b+1)*G) of the parent, G = count * L;
  process i reads rows [i*L, (i+1)*L) of each. Concatenating the processes'
  batches therefore gives exactly the global batch a single process would read.
  """

  def __init__(self, parent: grain.MapDataset, rows_per_batch: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    self._rows = rows_per_batch
    self._process_index = process_index
    self._process_count = process_count

  def __len__(self) -> int:
    return len(self._parent) // self._process_count

  def parent_index(self, index: int) -> int:
    batch, row = divmod(int(index), self._rows)
    return (batch * self._process_count + self._process_index) * self._rows + row

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self.parent_index(index)]

  def __str__(self) -> str:
    return (f'ProcessShare(process {self._process_index} of {self._process_count},'
            f' {self._rows} rows per batch)')
