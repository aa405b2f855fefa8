"""Every config key and its default, in one place.

Config files start from these (`stage_config(objective)`, `pseudo_label_config()`,
`chain_config(...)`), so every key exists and can be overridden on the command
line (--config.stages.mae.total_steps=20); `validation.py` refuses any key they
do not hold. Objectives and evaluators declare their own keys
(`objective_defaults`, `evaluator_config`).
"""

from __future__ import annotations

import ml_collections

from big_pretrain.data.corrupt_images import DEFAULT_MAX_CONSECUTIVE_UNREADABLE
from big_pretrain.data.sources import synthetic
from big_pretrain.models import vit as vit_lib
from big_pretrain.objectives import objective_defaults

# The schema's version, recorded in every stage's config.json: 2 added this key (a config
# recorded without it is version 1). Adding a key whose default is not what its absence
# meant, or renaming one, is a new version with a step in config/upgrade.py.
SCHEMA_VERSION = 2

def model_defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      variant='B/16',
      use_cls_token=True,
      pool='cls',              # 'cls' | 'gap'
      posemb='sincos',         # 'sincos' (fixed) | 'learned'
      dtype='float32',         # compute dtype; parameters stay float32
      # nn.scan over layers (faster compiles for deep models): True | False | 'auto'
      # (unrolled up to vit.UNROLLED_MAX_DEPTH layers, scanned deeper; the stage
      # records the choice, the checkpoints' layout)
      scan=ml_collections.FieldReference(vit_lib.SCAN_AUTO, field_type=object),
      # 'auto' (the least remat whose compiled step fits the device, measured when
      # the stage starts; none on a CPU) | 'none' | 'dots' | 'dots_no_batch' | 'full'
      remat='auto',
      # 'auto' (cuDNN flash attention on a GPU with a 16-bit dtype where cuDNN
      # supports the shapes, else XLA's) | 'xla' | 'cudnn'; None (older configs): 'xla'
      attention_impl=ml_collections.FieldReference('auto', field_type=str),
      # Stochastic depth in training, rising linearly over the layers to this rate
      # (fine-tuning: 0.1 B, 0.2 L, 0.3 H); 0: off.
      drop_path=0.0,
      # How pixels become patch tokens: 'matmul' (patchify, keep the visible patches,
      # one matmul: MAE and FLIP embed only those) | 'conv' (a strided convolution over
      # every patch, then the visible ones kept). Same parameters, same math.
      patch_embed_impl='matmul',
  ))


def optim_defaults() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name='adamw',
      lr_per_256=1.5e-4,       # peak lr = lr_per_256 * batch_size / 256
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.05,
      warmup_steps=1000,
      end_lr_fraction=0.0,
      clip_grad_norm=ml_collections.FieldReference(None, field_type=float),  # None: no clipping
      # A NaN/Inf gradient stops the run (0), or up to this many in a row are
      # skipped (the parameters are left as they were) before it does.
      skip_nonfinite_updates=0,
      # Regexes of parameter paths never decayed, beside biases and norms (fine-tuning:
      # ('cls_token', 'pos_embedding'), as MAE's no_weight_decay list).
      no_weight_decay=(),
      # Layer-wise lr decay (MAE fine-tuning: 0.65 B, 0.75 L/H): the update at encoder
      # layer l is scaled by layer_decay^(depth + 1 - l); None: off.
      layer_decay=ml_collections.FieldReference(None, field_type=float),
      # A moving average of the parameters kept beside them (e.g. 0.9999); evaluators
      # with `also_ema=True` score it too. None: off.
      ema_decay=ml_collections.FieldReference(None, field_type=float),
  ))


def use_embedded_demo_data(config) -> None:
  """Points a stage at the embedded synthetic data at the CPU demo size (`:demo` configs)."""
  config.data.update(source='synthetic', num_examples=20_000, source_image_size=64,
                     image_size=32)


def stage_config(objective: str) -> ml_collections.ConfigDict:
  """A complete stage config for `objective`, every key at its default."""
  config = ml_collections.ConfigDict()
  config.schema_version = SCHEMA_VERSION
  config.seed = 0
  config.total_steps = 1000
  config.batch_size = 256             # global, over all processes and devices
  # Resuming a workdir whose checkpoints were trained with other model, objective,
  # optimiser, batch, seed or data settings is refused unless this is True
  # (big_pretrain/storage/resume_identity.py lists the keys that may change freely).
  config.resume_with_changes = False
  config.model = model_defaults()
  config.objective = objective_defaults(objective)
  config.data = default_data_config()
  config.optim = optim_defaults()
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding_rules = ml_collections.ConfigDict()  # logical name -> mesh axes overrides
  config.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, async_save=True))
  config.log = ml_collections.ConfigDict(dict(every_steps=50))
  config.evals = ml_collections.ConfigDict()  # name -> evaluator config with a `kind`
  # Start from an earlier stage's (or any) checkpoint: only the `take` subtrees
  # of params are read; the rest is initialised fresh.
  config.init_from = ml_collections.ConfigDict(dict(
      stage=ml_collections.config_dict.placeholder(str),       # an earlier stage of config.stages
      checkpoint=ml_collections.config_dict.placeholder(str),  # or a checkpoint path
      take=('encoder',),
  ))
  return config


PSEUDO_LABEL_KINDS = ('hard', 'soft')


def pseudo_label_config() -> ml_collections.ConfigDict:
  """A pseudo-label stage (self-training): a teacher labels unlabelled images
  (big_pretrain/stages/pseudo_label_job.py). Every key at its default."""
  config = ml_collections.ConfigDict()
  config.schema_version = SCHEMA_VERSION
  config.job = 'pseudo_label'   # what marks a stage as this job, not a training stage
  # The teacher: an earlier stage of config.stages with a classification head
  # (finetune, self_training, wsp), or the folder of such a stage (config.json + checkpoints/).
  config.teacher = ml_collections.ConfigDict(dict(
      stage=ml_collections.config_dict.placeholder(str),
      workdir=ml_collections.config_dict.placeholder(str),
  ))
  # The unlabelled images (their labels are never read). Image size and eval crop are
  # the teacher's; of the rest only the keys naming the source matter.
  config.data = default_data_config()
  config.labels = ml_collections.ConfigDict(dict(
      # 'hard': the teacher's top class. 'soft': its top_k classes with their
      # probabilities renormalised to sum to 1 (Noisy Student's soft labels).
      kind='hard',
      # Only images whose top probability is at least this are labelled (Noisy Student: 0.3).
      threshold=0.0,
      top_k=5,             # 'soft' only
      temperature=1.0,     # softmax(logits / temperature)
  ))
  config.batch_size = 256            # global, over all processes and devices
  config.examples_per_shard = 50_000  # the unit of resumption: a killed job redoes at most one
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding_rules = ml_collections.ConfigDict()
  return config


def default_data_config() -> ml_collections.ConfigDict:
  """The schema and defaults of ``config.data``."""
  config = ml_collections.ConfigDict()
  config.source = 'synthetic'  # One of data.sources.SOURCE_NAMES.
  # image_folder: a folder of class subfolders. array_record: a folder of shards
  # written by `python -m big_pretrain.data.convert` (or a glob of shards).
  config.path = ml_collections.config_dict.placeholder(str)
  # Held-out images for evaluators (image_folder and array_record, as `path`;
  # synthetic data draws a disjoint 'test' stream from the same generator; tfds
  # reads tfds_test_split).
  config.test_path = ml_collections.config_dict.placeholder(str)
  # tfds only: a TFDS dataset prepared with file_format='array_record' (random access).
  config.tfds_name = ml_collections.config_dict.placeholder(str)  # e.g. 'imagenet2012'.
  config.tfds_data_dir = ml_collections.config_dict.placeholder(str)  # None: TFDS's default.
  config.tfds_train_split = 'train'  # Any TFDS split spec, e.g. 'train[:90%]'.
  config.tfds_test_split = 'validation'  # What evaluators read as the held-out split.
  config.tfds_image_key = 'image'  # The image feature (encoded or decoded).
  # The integer label feature (a ClassLabel names the classes); None or absent: -1.
  config.tfds_label_key = ml_collections.FieldReference('label', field_type=str)
  config.tfds_caption_key = ml_collections.config_dict.placeholder(str)  # A text feature, or None.
  config.split = 'train'  # 'train' | 'test': which of the two a pipeline reads.
  # Only a fixed random part of the training split: `fraction` of its examples (drawn
  # from `seed`), or with complement=True all the others. Self-training's labelled
  # subset and its unlabelled rest are the two parts of one source.
  config.subset = ml_collections.ConfigDict(dict(fraction=1.0, complement=False))
  # Self-training's student: training batches mix these examples with the teacher's
  # pseudo-labels (a pseudo-label stage's folder) into the human-labelled ones above.
  config.pseudo_labels = ml_collections.ConfigDict(dict(
      stage=ml_collections.config_dict.placeholder(str),  # an earlier pseudo-label stage
      path=ml_collections.config_dict.placeholder(str),   # or its folder
      fraction=0.5,  # of every batch (exactly: batch_size * fraction must be whole); 1:1
  ))
  config.num_examples = synthetic.DEFAULT_NUM_EXAMPLES  # synthetic only.
  config.source_image_size = 64  # synthetic only: size of the generated images.
  config.synthetic_label = 'shape'  # synthetic only: the class label, 'shape' or 'colour'.
  config.seed = 0  # Dataset seed: synthetic content, shuffle order, augmentation.
  config.image_size = 224  # Model input size after crop + resize.
  config.crop_scale = (0.2, 1.0)  # RandomResizedCrop area fraction range.
  # Training augmentations, '+'-joined names applied left to right (eval: centre
  # crop only): crop (random resized crop to image_size, area in crop_scale), flip
  # (horizontal, p=0.5), randaugment, erasing, scale_jitter; see big_pretrain.data.augment.
  # Without crop or scale_jitter, images are centre-cropped to image_size first.
  # MAE fine-tuning: 'crop+flip+randaugment+erasing'.
  config.augment = 'crop+flip'
  # With 'crop' first: a JPEG whose crop window is 2, 4 or 8 times image_size is decoded
  # at 1/2, 1/4 or 1/8 of its size (PIL's draft mode; the same crop, of a slightly
  # differently low-passed image): 2.4x less work per 1600x1200 photo (benchmarks/
  # README.md, input_speed.py). Crops smaller than that, and other formats, are decoded whole,
  # exactly as with False. See transforms.decode_random_resized_crop.
  config.decode_at_crop_scale = True
  # RandAugment, timm's 'rand-m9-mstd0.5-inc1' (MAE fine-tuning): ops per image,
  # each applied with p=0.5 at a magnitude ~ N(magnitude, magnitude_std) clipped to [0, 10].
  config.randaugment_ops = 2
  config.randaugment_magnitude = 9.0
  config.randaugment_magnitude_std = 0.5  # 0: fixed magnitude; inf: uniform in [0, magnitude].
  config.erasing_prob = 0.25  # Random erasing: chance of erasing one box (MAE fine-tuning: 0.25).
  # Large scale jitter: the longer side is resized to image_size * U(min, max).
  config.scale_jitter = (0.5, 2.0)
  # Evaluation: a centred square of this fraction of the shorter side, resized to
  # image_size (0.875: ImageNet's "resize 256, crop 224", MAE fine-tuning's eval).
  config.eval_crop_fraction = 1.0
  # Grain threads decoding and augmenting images; None: one per CPU core this
  # process may use, at most MAX_AUTO_THREADS (more threads than cores slow the
  # step on a CPU: benchmarks/README.md, loop_speed.py).
  config.num_threads = ml_collections.config_dict.placeholder(int)
  # Unreadable images are skipped; this many in a row (on one process) stop the run with
  # an error naming some of them, instead of skipping forever (a folder of no images).
  config.max_consecutive_unreadable = DEFAULT_MAX_CONSECUTIVE_UNREADABLE
  config.prefetch_buffer_size = 64  # Examples prepared ahead, per process.
  # Training batches batched and copied to the devices ahead of the step, in a
  # background thread (big_pretrain.data.device_prefetch); 0: in the loop.
  config.device_prefetch = 2
  # WSP labels: hashtags mapped to a fixed vocabulary (see big_pretrain.data.text.labels).
  config.labels = ml_collections.ConfigDict(dict(
      # A vocabulary file; None: no WSP labels (no 'label_ids' in batches).
      vocabulary=ml_collections.config_dict.placeholder(str),
      # Width of the 'label_ids' rows; an example with more labels keeps the lowest ids.
      max_labels_per_example=16,
      use_caption_words=False,  # Also map every caption word, not only hashtags.
  ))
  # Captions for image-text objectives (FLIP), see big_pretrain.data.text.tokenizer.
  config.text = ml_collections.ConfigDict(dict(
      # A word vocabulary file or a SentencePiece .model; None: no text (no 'text_tokens').
      tokenizer=ml_collections.config_dict.placeholder(str),
      # Width of the 'text_tokens' rows: <bos> + caption + <eos>, padded or truncated.
      max_length=32,
  ))
  return config


def is_pseudo_label_config(config) -> bool:
  return config.get('job') == 'pseudo_label'


def chain_config(**stages: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A config whose `stages` run in the order given (a plain ConfigDict iterates its keys
  sorted by name, which would run 'finetune' before 'mae')."""
  config = ml_collections.ConfigDict()
  config.stages = ml_collections.ConfigDict(sort_keys=False)
  for name, stage in stages.items():
    config.stages[name] = stage
  return config
