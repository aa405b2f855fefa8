"""The conversion (convert_job.py) as an Apache Beam pipeline.

    held-out work items --Reshuffle--> hash_held_out_item --> ToList --> HeldOutHashes
                                                                            | (side input)
    work items --Reshuffle--> convert_shard(item, held_out) --> ToList --> finish_conversion

Each transform calls convert_job's step function and nothing else: the pipeline decides
where and when the steps run, not what they compute. Reshuffle spreads the work items over
the workers (a Create of a list would otherwise stay in one bundle). convert_shard's counts
are also Beam metrics (namespace 'convert'), visible on the runner's monitoring page while
the job runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from big_pretrain.data import records
from big_pretrain.data.prepare import beam_options
from big_pretrain.data.prepare import convert_job
from big_pretrain.storage import files as storage

METRICS_NAMESPACE = 'convert'
# ShardResult fields that are counts, reported as Beam counters as each shard finishes.
_COUNTERS = ('num_examples', 'groups_without_image', 'undecodable_images', 'bad_labels',
             'bad_json')


def run(plan: convert_job.ConversionPlan, options) -> tuple[dict[str, Any], dict[str, int]]:
  """Runs the conversion on the runner `options` name and waits for it. Returns the metadata
  (read back from the output: the finish step may have run on another machine) and the
  Beam counters (beam_options.counters: a retried shard counts once)."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top
  from apache_beam.metrics import Metrics  # pylint: disable=g-import-not-at-top

  class ConvertShard(beam.DoFn):
    """convert_job.convert_shard, counting what it read and wrote."""

    def __init__(self):
      super().__init__()
      self._counters = {name: Metrics.counter(METRICS_NAMESPACE, name) for name in _COUNTERS}
      self._near_duplicates = Metrics.counter(METRICS_NAMESPACE, 'near_duplicates')
      self._truncated = Metrics.counter(METRICS_NAMESPACE, 'truncated_tars')
      self._shards = Metrics.counter(METRICS_NAMESPACE, 'shards_written')

    def process(self, item, held_out):
      result = convert_job.convert_shard(plan, item, held_out)
      for name, counter in self._counters.items():
        counter.inc(getattr(result, name))
      self._near_duplicates.inc(len(result.near_duplicates))
      self._truncated.inc(int(result.truncated_tar))
      self._shards.inc(int(result.file is not None))
      yield dataclasses.asdict(result)

  pipeline = beam.Pipeline(options=options)
  if plan.held_out_items:
    held_out = (pipeline
                | 'HeldOutInputs' >> beam.Create(list(plan.held_out_items))
                | 'SpreadHeldOut' >> beam.Reshuffle()
                | 'HashHeldOut' >> beam.FlatMap(convert_job.hash_held_out_item)
                | 'AllHashes' >> beam.combiners.ToList()
                | 'SortHashes' >> beam.Map(convert_job.HeldOutHashes.from_pairs))
    held_out = beam.pvalue.AsSingleton(held_out)
  else:
    held_out = None
  _ = (pipeline
       | 'Shards' >> beam.Create(list(plan.items))
       | 'SpreadShards' >> beam.Reshuffle()
       | 'ConvertShard' >> beam.ParDo(ConvertShard(), held_out)
       | 'AllShards' >> beam.combiners.ToList()
       | 'Finish' >> beam.Map(
           lambda results: convert_job.finish_conversion(
               plan, [convert_job.ShardResult(**result) for result in results])))
  outcome = pipeline.run()
  outcome.wait_until_finish()
  metadata = storage.read_json(f'{plan.output.rstrip("/")}/{records.METADATA_FILE}',
                               if_damaged='Convert again.')
  if metadata is None:
    raise RuntimeError(f'The Beam pipeline finished without writing {plan.output}/metadata.json.')
  return metadata, beam_options.counters(outcome, METRICS_NAMESPACE)
