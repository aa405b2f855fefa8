"""Features with known classes, for the probe evaluators' tests."""


def gaussian_blobs(rng, num_examples, centres, spread=1.0):
  """(features, labels): each example its class centre (a row of `centres`) plus normal
  noise of std `spread`, the classes drawn uniformly."""
  labels = rng.integers(len(centres), size=num_examples)
  return centres[labels] + spread * rng.normal(size=(num_examples, centres.shape[1])), labels
