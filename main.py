"""big_pretrain entry point.

  python main.py --config=configs/mae.py:demo --workdir=/tmp/mae_demo
  python main.py --config=configs/mae.py --workdir=gs://bucket/run --config.data.path=...

Any config key can be overridden on the command line (--config.total_steps=20).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from big_pretrain import pipeline
from big_pretrain.config_schema import ConfigError, validate_stage_config

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file; its get_config(arg) reads the part after ":".',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints, logs and results go.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  config = _CONFIG.value
  try:
    validate_stage_config(config)  # before any device is touched
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  pipeline.run(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
