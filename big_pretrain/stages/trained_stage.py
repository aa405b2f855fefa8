"""What a trained stage's folder tells about it: the config it recorded, and the names of the
classes its head scores. Read by the pseudo-label job (of its teacher) and by the weights
export."""

from __future__ import annotations

import ml_collections

from big_pretrain.config.upgrade import check_whole, upgrade
from big_pretrain.data import sources
from big_pretrain.data.text.labels import LabelVocabulary
from big_pretrain.errors import UsageError
from big_pretrain.storage import files as storage
from big_pretrain.storage import resume_identity
from big_pretrain.storage.stage_dir import StageDir


def read_stage_config(stage_dir: str, *, if_damaged: str,
                      if_missing: str) -> ml_collections.ConfigDict:
  """The stage config a stage recorded (its config.json, with what the data decided), in
  today's schema. `if_damaged` / `if_missing`: what to do, for the one-line errors."""
  path = StageDir(stage_dir).config_file
  recorded = storage.read_json(path, if_damaged=if_damaged)
  if recorded is None:
    raise UsageError(f'{stage_dir!r} has no {path.rsplit("/", 1)[-1]}: {if_missing}')
  return upgrade(recorded, where=path, written_by=resume_identity.history_schema_version(stage_dir))


def check_recorded_config(stage_dir: str) -> None:
  """Refuses (DamagedFileError, one line) a stage whose config.json lacks keys the version
  that wrote it had: before the stage resumes or is skipped as finished, since resume_identity
  would take a missing key for one added to the schema since."""
  path = StageDir(stage_dir).config_file
  recorded = storage.read_json(path, if_damaged=resume_identity.IF_RECORD_DAMAGED.format(
      workdir=stage_dir))
  if recorded is not None:
    check_whole(recorded, path, written_by=resume_identity.history_schema_version(stage_dir))


def class_names(stage_config, num_classes: int) -> list[str]:
  """The names of a classifier's `num_classes` outputs: its label vocabulary's, else its
  source's classes, else '0', '1', ... (when the data has moved: names are for people)."""
  if stage_config.data.labels.vocabulary:
    return list(LabelVocabulary.from_file(stage_config.data.labels.vocabulary).labels)
  try:
    names = sources.build_source(stage_config.data).class_names
  except (OSError, ValueError):
    names = []
  return list(names) if len(names) == num_classes else [str(c) for c in range(num_classes)]
