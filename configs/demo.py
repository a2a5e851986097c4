"""The questions of the main job alone: the `small` Mirasol model trained from scratch, every parameter, on the
embedded default dataset. The main job (configs/demo_tasks.py) adds a captioning task to this; the ablations and the
pretraining comparison in the README are measured on this one.

  python -m mirasol_jax.main train --config=configs/demo.py --workdir=/tmp/mirasol_qa
  python -m mirasol_jax.main forward --config=configs/demo.py --workdir=/tmp/mirasol_qa

The dataset (mirasol_jax/data/demo_data.py: 1200 training and 120 validation clips of 4 s with sound, three question
kinds that each need picture and sound over time) is generated on first use (about 30 s on 2 cores) into
~/.cache/mirasol_jax (or $MIRASOL_CACHE). Always answering the most common training answer scores 14.2% on
validation, the most common answer per question kind 36.7%. Argument: the combiner (ttm | transformer | qformer),
ttm by default.

What makes every tower learn here (each measured on this dataset; the README has the numbers):
  * the audio-video towers learn at a tenth of the text decoder's rate (config.lr_multipliers, the default of
    config_lib.base_config): at one rate, the text loss drives their latents to collapse before the decoder reads
    them, and the model answers from the question alone;
  * the decoder cross-attends to latents standardised over each example's tokens (model.text.context_norm), which
    removes the offset shared by every clip;
  * the small model's audio tokens are time strips of 125 ms (models/sizes.py), fine enough to count beeps.
The next-chunk losses train the audio-video part beside the text loss: the AV Transformer's output at chunk t
predicts chunk t+1's combiner tokens, contrastively (model.latent_loss='contrastive': regressing onto them,
'cosine', collapses to latents that no longer differ between clips), and chunk t+1's video at 16x16.
"""
import ml_collections

from mirasol_jax import config_lib
from mirasol_jax.evaluators import base as evaluators


def get_config(arg=None):
  config = config_lib.base_config('small', arg or 'ttm')
  config.data = config_lib.data_config(source='demo')
  # The questions (records also hold options and captions: the prompt is the question alone).
  config.data.prompt, config.data.target = '{question}', 'answer'
  config.evals = ml_collections.ConfigDict({
      'validation': evaluators.config('vqa', group_by='kind'),
      'choice': evaluators.config('multiple_choice', group_by='kind'),  # the answers of each kind as options
  })
  config.batch_size = 8
  config.total_steps = 1200
  config.lr = 1e-3
  config.warmup_steps = 50
  config.log_every_steps = 50
  config.eval_every_steps = 600
  config.checkpoint_every_steps = 300
  config.model.text.context_norm = 'tokens'
  # float32 steps are faster on a CPU: XLA:CPU converts around bfloat16 operations, and rewrites a loop's stacked
  # bfloat16 buffers whole (benchmarks/peer_pytorch.py: 0.76x the time of a bfloat16 step; benchmarks/video_length.py).
  config.model.dtype = 'float32'
  config.model.scan_layers = False  # on CPU, unrolled layers run about 20% faster and compile no slower
  config.loss_weights.text = 10.0  # the paper weighs the text loss x10 when fine-tuning
  config.loss_weights.latent = 1.0
  config.loss_weights.video_recon = 1.0
  config.model.latent_loss = 'contrastive'
  return config
