"""Input data: random-access sources, image transforms and the Grain pipeline."""
