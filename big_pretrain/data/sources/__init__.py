"""Random-access data sources (one module each from the next commit)."""

from big_pretrain.data.sources.synthetic import *  # noqa: F401,F403  # Until the split.
