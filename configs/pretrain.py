"""Pretraining Mirasol3B on video with sound and text, all losses at equal weight.

  python -m mirasol_jax.main params --config=configs/pretrain.py:size=3b
  python -m mirasol_jax.main forward --config=configs/pretrain.py:size=small,combiner=ttm

Arguments (after the colon, comma separated): size = tiny | small | base | 3b | 10b; combiner = ttm | transformer |
qformer; frames = number of frames (0 keeps the size's default; chunks keep their length, so 512 frames at k=8 make
T=64 chunks with the same parameters).
"""
from mirasol_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size='tiny', combiner='ttm', frames=0)
  return config_lib.base_config(arg.size, arg.combiner, arg.frames)
