"""Input data: sources, the record formats, image transforms, and the Grain inputs.

  sources/           random-access sources, one module each; the Source contract
  records.py         the image and pseudo-label record formats (tf.train.Example)
  convert.py         an image folder or webdataset tars -> ArrayRecord image records
  transforms.py      decoding and resizing; augment.py the named training transforms
  train_input.py     the training batches: InputPipeline
  eval_input.py      every example of a split once, in order (evaluators, pseudo-labels)
  example_maps.py    the per-example maps both inputs apply (decode, augment, labels, text)
  batch_features.py  what a batch holds: feature names, shapes, random batches like it
  batch_columns.py   the training reader: this process's columns of every global batch,
                     and the data position any number of processes resumes
  corrupt_images.py  counting and reporting unreadable images
  process_share.py   this process's rows of every global batch (evaluation)
  seeds.py           the inputs' random streams
  device_prefetch.py copies the next batches to the devices in a background thread
  text/              caption tokenizers (FLIP), the label vocabulary (WSP), their command
"""
