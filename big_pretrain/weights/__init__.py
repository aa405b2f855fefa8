"""Weights in and out: the ViT's parameters in the formats other code reads, as a table.

FORMATS lists every weight format (the contract: weight_format.py). init_from.checkpoint
reads public weights through it (public_checkpoints.py), and the export writes through it
(export.py, whose --format takes the writable ones): adding a format is its module and one
line below.

  weight_format.py      the contract (WeightFormat), what a format is handed (WeightSource),
                        and the checks every format's read makes against the stage
  model_folder.py       config.json beside model.safetensors: the folder timm and Hugging
                        Face both read and write (ModelFolderFormat)
  timm_format.py        timm's VisionTransformer, and the MAE reference's .pth releases
  hf_format.py          Hugging Face transformers' ViT / ViTMAE: their names (renamed from
                        timm's), the config.json each model is built from
  big_vision_format.py  a big_vision ViT .npz (read only)
  timm_layout.py        our encoder (and MAE decoder, classifier head) <-> timm's
                        VisionTransformer state dict, which is also the MAE reference's
  weight_files.py       reading and writing the files: safetensors, a PyTorch .pth (tensors
                        only, never a full unpickle), a big_vision .npz; a file's bytes checked
                        against the format its name says, every value checked finite
  safetensors_format.py  the safetensors format, read here (bf16, f16, f8 too), its header
                        checked
  pytorch_pickle.py     what a .pth holds besides tensors, found without running it
  public_checkpoints.py  a public checkpoint -> our parameter subtrees, for
                        init_from.checkpoint, by the format that recognises it

Every conversion is a reshape, a transpose or a concatenation: float32 in, the same
float32 values out, so a round trip is bit-exact.
"""

from big_pretrain.registry import Registry
from big_pretrain.weights import big_vision_format, hf_format, timm_format

FORMATS = Registry('weight format', [
    timm_format.TimmFormat(),
    hf_format.HfFormat(),
    big_vision_format.BigVisionFormat(),
])

__all__ = ['FORMATS']
