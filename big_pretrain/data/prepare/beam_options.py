"""The --runner flag of the data-preparation commands, Beam's own options after it, and the
counters a finished pipeline reports.

  python -m big_pretrain.data.convert ... --runner=DirectRunner --direct_num_workers=2
  python -m big_pretrain.data.convert ... --runner=DataflowRunner --project=P \\
      --region=us-central1 --temp_location=gs://B/tmp --num_workers=50

Without --runner a command runs in this process and needs no Beam. With it, the
command builds its Beam pipeline and hands every flag it does not know itself to
Beam's PipelineOptions (--project, --region, --temp_location, --num_workers,
--direct_num_workers, --flink_master, ...). Mistakes are found here, before
anything is read or written: Beam not installed, a runner Beam does not have, a
flag no Beam option knows, Dataflow without the options it needs, and local
paths given to workers on other machines.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

from big_pretrain.errors import UsageError
from big_pretrain.storage import files as storage

INSTALL_HINT = 'pip install -r requirements-beam.txt (or: make install-beam)'

# Runners whose workers run on this machine: they read and write local paths.
LOCAL_RUNNERS = ('DirectRunner', 'BundleBasedDirectRunner', 'SwitchingDirectRunner',
                 'FnApiRunner', 'PrismRunner')
# Runners whose workers are other machines: they need the package and bucket paths.
REMOTE_RUNNERS = ('DataflowRunner', 'FlinkRunner', 'SparkRunner', 'PortableRunner')


def add_runner_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
      '--runner', default=None,
      help='Run the job as an Apache Beam pipeline on this runner: DirectRunner (this '
      'machine; --direct_num_workers=N --direct_running_mode=multi_processing for N '
      'processes), DataflowRunner, FlinkRunner, SparkRunner, PrismRunner. Every other flag '
      "is passed to Beam's pipeline options. Without --runner: in this process, no Beam.")


def beam_flags_allowed(args: argparse.Namespace, leftover: Sequence[str],
                       parser: argparse.ArgumentParser) -> list[str]:
  """The flags after the command's own, which go to Beam; an error if there is no --runner."""
  if leftover and not args.runner:
    parser.error(f'unrecognized arguments: {" ".join(leftover)} (Beam pipeline options need'
                 ' --runner=...)')
  return list(leftover)


def pipeline_options(runner: str, beam_flags: Sequence[str], *, paths: dict[str, Any]):
  """Beam's PipelineOptions for `runner` and `beam_flags`, checked.

  `paths` maps each of the command's path flags ('--input', '--output', ...) to its value or
  values: a runner whose workers are other machines cannot read or write local paths there.
  Raises UsageError with one line for each mistake a user can make.
  """
  try:
    from apache_beam.options import pipeline_options as beam_options  # pylint: disable=g-import-not-at-top
    from apache_beam.runners import runner as beam_runner  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise UsageError(f'--runner={runner} needs Apache Beam, which is not installed here: '
                     f'{INSTALL_HINT}. Without --runner the command runs in this process.'
                     ) from error
  try:
    runner_object = beam_runner.create_runner(runner)
  except ValueError as error:
    raise UsageError(f'--runner={runner}: Beam has no such runner; use DirectRunner, '
                     'PrismRunner, DataflowRunner, FlinkRunner or SparkRunner.') from error
  unknown = _unknown_flags(beam_options, beam_flags)
  if unknown:
    raise UsageError(f'{" ".join(unknown)}: neither this command nor any Beam pipeline option'
                     ' knows it (see --help, and Beam\'s pipeline options for the runner).')
  flags = [*beam_flags, f'--runner={runner}']
  remote = type(runner_object).__name__ in REMOTE_RUNNERS
  if remote and not any(flag.startswith(('--setup_file', '--sdk_container_image',
                                         '--requirements_file')) for flag in beam_flags):
    # The workers import big_pretrain: ship this checkout's package (with its pinned
    # requirements) and imagehash (requirements-beam.txt) to them.
    flags += [f'--setup_file={_repository_file("setup.py")}',
              f'--requirements_file={_repository_file("requirements-beam.txt")}']
  options = beam_options.PipelineOptions(flags)
  if type(runner_object).__name__ == 'DataflowRunner':
    _check_dataflow_options(options.view_as(beam_options.GoogleCloudOptions), runner)
  if remote:
    local = [f'{flag}={value}' for flag, values in paths.items()
             for value in ([values] if isinstance(values, str) else values or [])
             if value and not storage.is_bucket(value)]
    if local:
      raise UsageError(f'{", ".join(local)}: --runner={runner} runs on other machines, which '
                       'cannot see this one\'s files. Give gs:// (or another bucket) paths.')
  return options


def counters(outcome, namespace: str) -> dict[str, int]:
  """{name: value} of the Beam counters in `namespace` of a finished pipeline's `outcome`:
  the committed values (a retried bundle counts once), or the attempted ones on a runner
  that does not report committed values."""
  from apache_beam.metrics.metric import MetricsFilter  # pylint: disable=g-import-not-at-top
  found = outcome.metrics().query(MetricsFilter().with_namespace(namespace))['counters']
  return {counter.key.metric.name: (counter.committed if counter.committed is not None
                                    else counter.attempted) for counter in found}


def _check_dataflow_options(google, runner: str) -> None:
  """The options Dataflow cannot start a job without. (Beam's own validator looks buckets up
  over the network, so a missing one would be found minutes later, or never offline.)"""
  missing = [f'--{name}' for name in ('project', 'region', 'temp_location')
             if not getattr(google, name)]
  if missing:
    raise UsageError(f'--runner={runner} needs {", ".join(missing)} as well (for example '
                     '--project=my-project --region=us-central1 --temp_location=gs://BUCKET/tmp'
                     '): the Google Cloud project and region to run in, and a bucket folder '
                     'for its temporary files.')
  for name in ('temp_location', 'staging_location'):
    location = getattr(google, name)
    if location and not location.startswith('gs://'):
      raise UsageError(f'--{name}={location}: Dataflow needs a gs:// folder here.')


def _unknown_flags(beam_options, flags: Sequence[str]) -> list[str]:
  """The flags in `flags` that no PipelineOptions subclass declares."""
  parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, conflict_handler='resolve')
  seen: set[type] = set()
  pending = [beam_options.PipelineOptions]
  while pending:
    options_class = pending.pop()
    if options_class in seen:
      continue
    seen.add(options_class)
    pending.extend(options_class.__subclasses__())
    try:
      options_class._add_argparse_args(parser)  # pylint: disable=protected-access
    except argparse.ArgumentError:
      pass  # an option two classes declare (Beam's own parser tolerates it too)
  _, unknown = parser.parse_known_args(list(flags))
  return [flag for flag in unknown if flag.startswith('-')]


def _repository_file(name: str) -> str:
  return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))), name)
