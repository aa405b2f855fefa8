"""A run's stages: the chain in order, each stage's folder, the pseudo-label job, init_from."""
