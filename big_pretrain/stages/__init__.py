"""A run's stages: the chain in order (chain.py), init_from (init_from.py), what a trained stage's
folder tells (trained_stage.py), and the pseudo-label job (pseudo_label_job.py)."""
