"""AIM pretraining, then WSP initialized from the AIM trunk: the MAE chain's machinery.

  python main.py --config=configs/aim_then_wsp.py:demo --workdir=DIR
"""

from big_pretrain.config.defaults import chain_config
from configs import aim, wsp


# The arguments get_config takes (--config=configs/aim_then_wsp.py:ARG; None: no argument), each
# validated by tests/test_shipped_configs.py.
VARIANTS = (None, 'demo')


def get_config(arg: str | None = None):
  config = chain_config(aim=aim.get_config(arg), wsp=wsp.get_config(arg))
  # WSP's encoder must have AIM's shape: the same trunk, no cls token.
  config.stages.wsp.model.update(variant=config.stages.aim.model.variant,
                                 use_cls_token=False, pool='gap')
  config.stages.wsp.init_from.stage = 'aim'
  config.stages.wsp.init_from.take = ('encoder',)
  return config
