"""Where the repository and the test files that other processes run are."""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# main.py's --config for the tiny MAE stage, relative to REPO_ROOT (the tests run main.py there).
TINY_CONFIG_FILE = 'tests/helpers/tiny_config.py'
MULTIPROCESS_WORKER = os.path.join(REPO_ROOT, 'tests', 'multiprocess_worker.py')
