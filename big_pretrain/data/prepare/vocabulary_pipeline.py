"""The vocabulary jobs (vocabulary_job.py) as Apache Beam pipelines.

labels, tokenizer:

    ranges --Reshuffle--> count_range --> CombinePerKey(sum) --> CombineGlobally(totals)
                            | statistics --> CombinePerKey(sum)                  |
    ranges --> count_unlabelled_range(totals: side input) --> sum                |
    Create([None]) --> finish(totals, statistics, unlabelled: side inputs)  <----'

captions:

    ranges --Reshuffle--> sample_range --> Top.Smallest(sample_size) --.
                            | statistics --> CombinePerKey(sum) --------+--> finish

Each transform calls a job's step function and nothing else: the pipeline decides where and
when the steps run, not what they compute. A range's counts are summed before they leave
its worker (count_range's Counter, then the combiner lifted into each worker); the totals
fold into at most about 2 * max_size tokens per worker (vocabulary_job.Totals), so no step
holds every token, and none holds every example. The finish step runs once, after every
count, writes the file and reports the statistics as Beam counters (namespace
'build_vocabulary'), which `run` returns.
"""

from __future__ import annotations

from big_pretrain.data.prepare import beam_options
from big_pretrain.data.prepare import vocabulary_job
from big_pretrain.data.sources import source_texts

METRICS_NAMESPACE = 'build_vocabulary'
_STATISTICS = 'statistics'  # the tag of the statistics each range's step emits


class PipelineFailed(RuntimeError):
  """A step of the pipeline raised: the message is the step's error, in one line."""


def run(job: vocabulary_job.VocabularyJob | vocabulary_job.CaptionSample,
        reader: source_texts.TextReader, output: str, options) -> dict[str, int]:
  """Runs `job` on the runner `options` name and waits for it; returns the statistics its
  finish step reported. Raises PipelineFailed, naming the step's error, if a step fails."""
  import apache_beam as beam  # pylint: disable=g-import-not-at-top

  pipeline = beam.Pipeline(options=options)
  ranges = (pipeline
            | 'Ranges' >> beam.Create(source_texts.text_ranges(reader.num_selected()))
            | 'SpreadRanges' >> beam.Reshuffle())
  if isinstance(job, vocabulary_job.CaptionSample):
    inputs = _caption_sample(beam, job, reader, ranges)
  else:
    inputs = _vocabulary(beam, job, reader, ranges)
  _ = (pipeline
       | 'Once' >> beam.Create([None])
       | 'Finish' >> beam.Map(_finish, job, output, *map(beam.pvalue.AsSingleton, inputs)))
  try:
    outcome = pipeline.run()
    outcome.wait_until_finish()
  except Exception as error:  # noqa: BLE001  (a worker's error, wrapped by the runner)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    raise PipelineFailed(lines[-1] if lines else type(error).__name__) from error
  return beam_options.counters(outcome, METRICS_NAMESPACE)


def _vocabulary(beam, job: vocabulary_job.VocabularyJob, reader, ranges) -> list:
  """The finish step's inputs: the totals, the statistics, the unlabelled examples."""
  counted = ranges | 'Count' >> beam.FlatMap(_count_range, job, reader).with_outputs(
      _STATISTICS, main='counts')
  totals = (counted.counts
            | 'SumCounts' >> beam.CombinePerKey(sum)
            | 'Totals' >> beam.CombineGlobally(_totals_combine_fn(beam, job)))
  unlabelled = (ranges
                | 'CountUnlabelled' >> beam.FlatMap(_count_unlabelled_range, job, reader,
                                                    beam.pvalue.AsSingleton(totals))
                | 'SumUnlabelled' >> beam.CombineGlobally(sum))
  return [totals, _statistics(beam, counted), unlabelled]


def _caption_sample(beam, job: vocabulary_job.CaptionSample, reader, ranges) -> list:
  """The finish step's inputs: the chosen captions, the statistics."""
  sampled = ranges | 'Sample' >> beam.FlatMap(_sample_range, job, reader).with_outputs(
      _STATISTICS, main='captions')
  chosen = sampled.captions | 'Smallest' >> beam.combiners.Top.Smallest(job.size)
  return [chosen, _statistics(beam, sampled)]


def _statistics(beam, outputs):
  """The sums of the statistics the ranges emitted, as one dict."""
  return (outputs[_STATISTICS]
          | 'SumStatistics' >> beam.CombinePerKey(sum)
          | 'Statistics' >> beam.combiners.ToDict())


# The steps: module functions, so they pickle by reference to the workers.

def _count_range(text_range, job, reader):
  from apache_beam import pvalue  # pylint: disable=g-import-not-at-top

  counts, statistics = job.count_range(reader, text_range)
  yield from counts.items()
  for item in statistics.items():
    yield pvalue.TaggedOutput(_STATISTICS, item)


def _count_unlabelled_range(text_range, job, reader, totals):
  unlabelled = job.count_unlabelled_range(reader, text_range, totals)
  if unlabelled is not None:
    yield unlabelled


def _sample_range(text_range, job, reader):
  from apache_beam import pvalue  # pylint: disable=g-import-not-at-top

  chosen, statistics = job.sample_range(reader, text_range)
  yield from chosen
  for item in statistics.items():
    yield pvalue.TaggedOutput(_STATISTICS, item)


def _finish(_, job, output: str, *inputs) -> None:
  from apache_beam.metrics import Metrics  # pylint: disable=g-import-not-at-top

  for name, value in job.finish(*inputs, output).items():
    Metrics.counter(METRICS_NAMESPACE, name).inc(value)


def _totals_combine_fn(beam, job: vocabulary_job.VocabularyJob):
  """A CombineFn folding (token, total count) pairs with the job's add_total and merge_totals."""

  class TotalsCombineFn(beam.CombineFn):

    def create_accumulator(self):
      return vocabulary_job.Totals()

    def add_input(self, totals, token_count):
      return job.add_total(totals, *token_count)

    def merge_accumulators(self, accumulators):
      return job.merge_totals(accumulators)

    def extract_output(self, totals):
      return job.merge_totals([totals])

  return TotalsCombineFn()
