"""One stage's folder, and every file a stage keeps in it, named once.

  WORKDIR/<stage>/                (a single-stage config: WORKDIR itself)
    checkpoints/<step>/            Orbax: the train state and the input position
    config.json                    the config the checkpoints are trained with
    config_history.jsonl           one line per start: its step and what changed
    eval_results.json              the evaluators' latest scores, {'step': s, name: scalars}
    eval_results_at_start.json     `at_start` evaluators' scores of the starting parameters
    events.out.tfevents.*          TensorBoard (train/metric_writer.py)
    goodput.jsonl                  one line per start: where its wall time went (train/goodput.py)
    <evaluator>.png                reconstruction grids
    tokenizer.{txt,model}          the tokenizer the text embeddings index (data/text/
                                   tokenizer_files.py)
    run.lock                       the run holding the folder (storage/run_lock.py)
    <file>.damaged                 a damaged file set aside to be rebuilt, kept for the user
  A pseudo-label stage instead holds job.json (its settings), shards and metadata.json.

The folder may be local or in a bucket (gs://...): paths are joined for both.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax

from big_pretrain.storage import files as storage

CHECKPOINTS = 'checkpoints'
CONFIG_FILE = 'config.json'
HISTORY_FILE = 'config_history.jsonl'
EVAL_RESULTS_FILE = 'eval_results.json'
AT_START_RESULTS_FILE = 'eval_results_at_start.json'
JOB_FILE = 'job.json'
# The tokenizer the stage's text embeddings index, copied in by kind (data/text/tokenizer_files.py).
WORD_TOKENIZER_FILE = 'tokenizer.txt'
SENTENCEPIECE_TOKENIZER_FILE = 'tokenizer.model'


@dataclasses.dataclass(frozen=True)
class StageDir:
  """The paths of one stage's files (see the module doc)."""
  path: str

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  checkpoints = property(lambda self: self.file(CHECKPOINTS))
  config_file = property(lambda self: self.file(CONFIG_FILE))
  history_file = property(lambda self: self.file(HISTORY_FILE))
  eval_results_file = property(lambda self: self.file(EVAL_RESULTS_FILE))
  at_start_results_file = property(lambda self: self.file(AT_START_RESULTS_FILE))
  job_file = property(lambda self: self.file(JOB_FILE))
  word_tokenizer_file = property(lambda self: self.file(WORD_TOKENIZER_FILE))
  sentencepiece_tokenizer_file = property(lambda self: self.file(SENTENCEPIECE_TOKENIZER_FILE))

  def evaluator_image(self, evaluator: str) -> str:
    """The image an evaluator draws (MAE's reconstruction grid): '<evaluator>.png'."""
    return self.file(f'{evaluator}.png')

  def write_results(self, path: str, step: int, results: dict) -> None:
    """{'step': step, evaluator name: scalars} to `path` (one of the results files), by
    process 0 only."""
    if jax.process_index() == 0:
      storage.write_text(path, json.dumps({'step': step, **results}, indent=2))


def final_evaluations_recorded(stage_dir: StageDir, has_evaluators: bool,
                               final_step: int) -> bool:
  """Whether eval_results.json holds the scores of the stage's checkpoint at `final_step`
  (always so for a stage without evaluators)."""
  if not has_evaluators:
    return True
  recorded = read_results(stage_dir.eval_results_file,
                          'The final evaluations run again from the final checkpoint.')
  return recorded is not None and recorded.get('step', -1) >= final_step


def read_results(path: str, rebuilt: str) -> dict | None:
  """A results file (eval_results*.json), or None if there is none. A damaged one is set
  aside (process 0 renames it to *.damaged; nothing is deleted) with a warning that ends
  with `rebuilt`, and reads as None."""
  return storage.read_json_or_set_aside(path, rebuilt, rename=jax.process_index() == 0)
