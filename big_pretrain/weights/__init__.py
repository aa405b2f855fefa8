"""Weights in and out: the ViT's parameters in the layouts other code reads.

  timm_layout.py    our encoder (and MAE decoder, classifier head) <-> timm's
                    VisionTransformer state dict, which is also the MAE reference's
  hf_layout.py      timm's names <-> Hugging Face transformers' ViT / ViTMAE names, and
                    the config.json each library builds its model from
  big_vision_layout.py  a big_vision ViT .npz -> our encoder
  weight_files.py   reading and writing the files: safetensors, a PyTorch .pth (tensors
                    only, never a full unpickle), a big_vision .npz; a file's bytes checked
                    against the format its name says, every value checked finite
  safetensors_format.py  the safetensors format, read here (bf16, f16, f8 too), its header
                    checked
  pytorch_pickle.py what a .pth holds besides tensors, found without running it
  public_checkpoints.py  a public checkpoint (timm / HF folder or file, MAE .pth, .npz)
                    -> our parameter subtrees, for init_from.checkpoint

Every conversion is a reshape, a transpose or a concatenation: float32 in, the same
float32 values out, so a round trip is bit-exact.
"""
