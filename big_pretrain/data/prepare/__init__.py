"""Data preparation jobs at any scale: each is defined once, as steps that run in this process
or as an Apache Beam pipeline (DirectRunner here, Dataflow, Flink or Spark for billions of
examples).

  convert_job.py        image folders / webdataset tars -> ArrayRecord shards (the steps)
  convert_pipeline.py   those steps as a Beam pipeline
  near_duplicates.py    perceptual hashes, to drop training images close to held-out ones
  vocabulary_job.py     label and tokenizer vocabularies, caption samples (counts as a combine)
  beam_options.py       --runner and Beam's pipeline options, checked before anything runs
"""
