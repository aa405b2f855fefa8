"""Workdir files go through etils.epath, so a gs:// workdir stays a bucket URL."""

from big_pretrain.storage import files as storage
from big_pretrain.storage.checkpoints import Checkpointer
from helpers.tiny_config import tiny_mae_config


def test_bucket_urls_are_kept_and_local_paths_made_absolute(tmp_path, monkeypatch):
  assert storage.absolute('gs://bucket/run/mae') == 'gs://bucket/run/mae'
  monkeypatch.chdir(tmp_path)
  assert storage.absolute('runs/mae') == str(tmp_path / 'runs' / 'mae')


def test_checkpointer_keeps_a_bucket_directory_as_a_url(monkeypatch):
  # Only the name is checked: nothing is written (no bucket here).
  class NoManager:
    def __init__(self, *args, **kwargs):
      pass
  monkeypatch.setattr('orbax.checkpoint.CheckpointManager', NoManager)
  checkpointer = Checkpointer('gs://bucket/run/mae/checkpoints', tiny_mae_config().checkpoint)
  assert checkpointer.directory == 'gs://bucket/run/mae/checkpoints'


def test_write_and_read_back(tmp_path):
  path = str(tmp_path / 'new' / 'folder' / 'results.json')
  storage.write_text(path, '{"step": 3}')
  assert storage.read_json(path, if_damaged='') == {'step': 3}
  assert storage.read_json(str(tmp_path / 'missing.json'), if_damaged='') is None
  assert storage.list_dir(str(tmp_path / 'new')) == ['folder']
  assert storage.list_dir(str(tmp_path / 'missing')) == []
  assert storage.is_dir(str(tmp_path / 'new'))
