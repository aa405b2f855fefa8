"""Helpers shared by the test files, each defined once (conftest.py holds the shared fixtures).

tiny_config: the tiny stage configs the tests train, and their trainers (also main.py's
    --config for the tiny MAE stage).
batches: small input pipelines (data config, mesh, reading and comparing batches).
images: random pixels, encoded and broken images, an image folder with broken files.
hashes: image and file digests that a test compares with its worker processes'.
jax_workers: a multi-process JAX run on 127.0.0.1 (tests/multiprocess_worker.py) and free ports.
paths: the repository root and the files that other processes run.
events: what TensorBoard's reader finds in a run's event files.
trees: parameter trees by name, and exact equality.
numerics: comparing float32 results of two computation orders.
probe_data: features with known classes, for the probe evaluators.
eval_counting: what an evaluator reads of a held-out split.
checkpoint_damage: a saved step's bytes altered, its digests record deleted or emptied.
near_duplicate_images: distinct generated images and their re-encoded, resized, cropped copies.
"""
