"""Where a run's files live: workdir files (local or in a bucket), the run lock, checkpoints."""
