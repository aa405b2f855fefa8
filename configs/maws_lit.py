"""MAE pre-pretraining -> WSP -> LiT: how MAWS reports zero-shot (Singh et al., 2023).

  python main.py --config=configs/maws_lit.py --workdir=DIR \
      --config.stages.mae.data.path=/data/ig/train \
      --config.stages.wsp.data.path=/data/ig/train \
      --config.stages.wsp.data.labels.vocabulary=/data/ig/vocab.txt \
      --config.stages.lit.data.path=/data/image_text/train \
      --config.stages.lit.data.text.tokenizer=/data/image_text/tokenizer.model
  python main.py --config=configs/maws_lit.py:demo --workdir=DIR   # CPU, embedded data

configs/mae_then_wsp.py, then configs/lit.py locking the WSP encoder: a text
tower (and both projections) learn the contrastive loss against it; the
encoder is not changed. The lit stage reports zero-shot accuracy beside
chance, and image-text retrieval. Each stage trains in DIR/<stage>; run the
same command again to resume.
"""

from configs import lit, mae_then_wsp


# The arguments get_config takes (--config=configs/maws_lit.py:ARG; None: no argument), each
# validated by tests/test_shipped_configs.py.
VARIANTS = (None, 'demo')


def get_config(arg: str | None = None):
  config = mae_then_wsp.chain(arg)
  if arg == 'demo':
    mae_then_wsp.use_colour_as_demo_class(config)
  config.stages.lit = lit.stage_after('wsp', config.stages.wsp, arg)
  return config
