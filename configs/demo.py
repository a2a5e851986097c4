"""The main job's data and model: the `small` Mirasol model on the embedded default dataset.

  python -m mirasol_jax.main tokenizer --config=configs/demo.py --workdir=/tmp/mirasol_demo
  python -m mirasol_jax.main forward --config=configs/demo.py

The dataset (mirasol_jax/data/demo_data.py: 1200 training and 120 validation clips of 4 s with sound) is generated
on first use (about 30 s on 2 cores) into ~/.cache/mirasol_jax (or $MIRASOL_CACHE). Always answering the most common
training answer scores 14.2% on validation, the most common answer per question kind 36.7%. Argument: the combiner
(ttm | transformer | qformer), ttm by default.

What trains here, and why: the text decoder, over the audio-video towers frozen at their random initialisation,
with its context standardised over the latent tokens (model.text.context_norm='tokens'). Measured on this dataset
(600 steps of 8, CPU): training every tower from scratch, the decoder settles on each question kind's answer prior
within 100 steps and the towers' updates wash out what tells the clips apart (the validation accuracy stays at the
per-kind prior, with or without the next-chunk losses, also over 1500 steps); the same towers left at their random
initialisation already separate the clips (a linear probe on their latents reads the direction of motion perfectly),
and the decoder learns to read them. Pretraining the towers is what the pretrain configs are for; drop `frozen` to
train everything.
"""
from mirasol_jax import config_lib


def get_config(arg=None):
  config = config_lib.base_config('small', arg or 'ttm')
  config.data = config_lib.data_config(source='demo')
  config.batch_size = 8
  config.total_steps = 600
  config.lr = 1e-3
  config.warmup_steps = 50
  config.log_every_steps = 25
  config.eval_every_steps = 300
  config.checkpoint_every_steps = 200
  config.frozen = '^(?!text_decoder/)'  # every parameter outside the text decoder keeps its initial value
  config.model.text.context_norm = 'tokens'
  config.model.dtype = 'float32'  # this CPU has no bfloat16 matmul units: float32 steps are faster here
  config.loss_weights.text = 10.0  # the paper weighs the text loss x10 when fine-tuning
  # With the towers frozen, the next-chunk losses would train only their heads: off, so they cost nothing.
  config.loss_weights.latent = 0.0
  config.loss_weights.video_recon = 0.0
  config.model.av.mask_ratio = 0.0
  return config
