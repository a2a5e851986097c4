"""Pretraining Mirasol3B on video with sound and text, all losses at equal weight.

  python -m mirasol_jax.main params --config=configs/pretrain.py:size=3b
  python -m mirasol_jax.main forward --config=configs/pretrain.py:size=small,combiner=ttm

Arguments (after the colon, comma separated): size = tiny | small | base | 3b; combiner = ttm | transformer |
qformer; frames = number of frames (0 keeps the size's default; chunks keep their length, so 512 frames at k=8 make
T=64 chunks with the same parameters).
"""
import ml_collections

from mirasol_jax import config_lib
from mirasol_jax import sharding
from mirasol_jax.models import sizes


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size='tiny', combiner='ttm', frames=0)
  config = ml_collections.ConfigDict()
  config.model = sizes.model_config(arg.size, arg.combiner)
  if arg.frames:
    k = config.model.num_frames // config.model.num_chunks
    if arg.frames % k:
      raise ValueError(f'frames={arg.frames} is not a multiple of the chunk length k={k} frames')
    config.model.num_frames, config.model.num_chunks = arg.frames, arg.frames // k
  # One object, seen as config.loss_weights and config.model.loss_weights: an override of either changes both.
  config.loss_weights = ml_collections.ConfigDict(dict(text=1.0, latent=1.0, video_recon=1.0, audio_recon=0.0))
  config.model.loss_weights = config.loss_weights

  config.data = ml_collections.ConfigDict(dict(path='', fps=None, sample_rate=16_000, num_workers=0))
  config.batch_size = 8
  config.total_steps = 10_000
  config.log_every_steps = 50
  config.eval_every_steps = 1_000
  config.checkpoint_every_steps = 1_000
  config.seed = 0
  config.optimizer = 'adamw'
  config.lr = 1e-4
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.axis_rules = sharding.DEFAULT_AXIS_RULES
  config.init_from = ''
  return config

