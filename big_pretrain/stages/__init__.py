"""A run's stages: the chain in order (chain.py), init_from (transfer.py), and the
pseudo-label job (pseudo_label_job.py)."""
