"""Where a run's files live: workdir files (local or in a bucket), the run lock, checkpoints,
each stage's folder and the files in it (stage_dir.py), and the config its checkpoints were
trained with (resume_identity.py)."""
