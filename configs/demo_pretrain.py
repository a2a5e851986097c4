"""Pretraining the main job's audio-video towers on unlabelled clips (video with sound, no text), then fine-tuning.

  python -m mirasol_jax.main train --config=configs/demo_pretrain.py --workdir=/tmp/mirasol_pretrain
  python -m mirasol_jax.main train --config=configs/demo.py --workdir=/tmp/mirasol_finetune \\
      --config.init_from=/tmp/mirasol_pretrain --config.init_from_regex='^(?!text_decoder/)'

The model is configs/demo.py's (same geometry, so every audio-video parameter carries over). The data is the demo's
unlabelled set (mirasol_jax/data/demo_data.py: 3600 other clips made the same way, no questions), generated on first
use. Objectives, all on the audio-video part, none needing text:
  * next-chunk latents, contrastive (model.latent_loss='contrastive'): the AV Transformer's output at chunk t must
    pick chunk t+1's combiner tokens out of every chunk of the batch;
  * next-chunk video at low resolution (loss_weights.video_recon);
  * audio-video correspondence (loss_weights.av_contrastive): each chunk's sound must find that chunk's picture
    among all chunks of the batch, so only what happens when, in both streams, solves it.
The text decoder is not trained here (config.frozen). Argument: the combiner, as for configs/demo.py.
"""
import os

from mirasol_jax import config_lib


def get_config(arg=None):
  config = config_lib.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo.py') +
                                  (f':{arg}' if arg else ''))
  config.data.source = 'demo_unlabelled'
  config.data.require_target = False
  config.total_steps = 1200
  config.eval_every_steps = 0  # nothing to answer; the losses and latent spreads are logged every log step
  config.frozen = '^text_decoder/'
  for tower in config.lr_multipliers:
    config.lr_multipliers[tower] = 1.0  # no decoder to keep up with: every tower learns at config.lr
  config.loss_weights.text = 0.0
  config.loss_weights.latent = 1.0
  config.loss_weights.video_recon = 1.0
  config.loss_weights.av_contrastive = 1.0
  config.model.latent_loss = 'contrastive'
  config.model.av.mask_ratio = 0.15
  return config
