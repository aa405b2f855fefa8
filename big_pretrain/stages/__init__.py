"""A run's stages: the chain in order (chain.py), each stage's folder (stage_dir.py), the config
its checkpoints were trained with (resume_identity.py), init_from (transfer.py), and the
pseudo-label job (pseudo_label_job.py)."""
