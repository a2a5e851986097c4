"""Configurations and batches that cannot work fail at once, naming the field and the values."""
import jax
import numpy as np
import pytest

from conftest import random_batch, tiny_config
from mirasol_jax.models import mirasol


def _model(**overrides):
  config = tiny_config('ttm')
  config.model.update(overrides)
  return mirasol.Model(**config.model)


def test_frames_that_do_not_divide_into_chunks():
  with pytest.raises(ValueError, match=r'model\.num_frames.*num_frames=10.*num_chunks=4'):
    _model(num_frames=10)


def test_tube_longer_than_a_chunk():
  tubes = (((4, 8, 8), (2, 8, 8), (0, 0, 0)),)  # k = 8 frames / 4 chunks = 2 < 4
  config = tiny_config('ttm')
  config.model.video.tubes = tubes
  with pytest.raises(ValueError, match=r'model\.video\.tubes\[0\].*\(4, 8, 8\).*spans 4.*frames per chunk k is 2'):
    mirasol.Model(**config.model)


def test_more_combiner_tokens_than_the_chunk_has():
  # tiny: 16 + 1 video tokens (the 16x16 tube fits once at offset 8) and 2 x 4 audio tokens per chunk.
  with pytest.raises(ValueError, match=r'model\.tokens_per_chunk.*m=26.*n = 17 video \+ 8 audio = 25'):
    _model(tokens_per_chunk=26)


def test_unknown_combiner_and_unknown_loss_term():
  with pytest.raises(ValueError, match=r"model\.combiner.*'lstm'"):
    _model(combiner='lstm')
  config = tiny_config('ttm')
  config.model.loss_weights = dict(text=1.0, captions=1.0)
  with pytest.raises(ValueError, match=r"model\.loss_weights.*\['captions'\]"):
    mirasol.Model(**config.model)


def test_attention_settings_are_checked():
  with pytest.raises(ValueError, match=r"model\.attention_impl.*'flash'"):
    _model(attention_impl='flash')
  config = tiny_config('ttm')
  config.model.av.query_groups = 0
  with pytest.raises(ValueError, match=r'model\.av\.query_groups.*0 must be at least 1'):
    mirasol.Model(**config.model)


def test_audio_patches_must_tile_the_spectrogram():
  with pytest.raises(ValueError, match=r'model\.mel_bins.*mel_bins=30.*patch size 8'):
    _model(mel_bins=30)


def test_batch_that_disagrees_with_the_config():
  config = tiny_config('ttm')
  model = mirasol.Model(**config.model)
  batch = random_batch(config)
  bad = dict(batch, video=np.zeros((2, 4, 2, 16, 16, 3), np.uint8))
  with pytest.raises(ValueError, match=r"batch\['video'\] has shape \(2, 4, 2, 16, 16, 3\).*\(2, 4, 2, 32, 32, 3\)"):
    jax.eval_shape(model.init, jax.random.key(0), bad)
  missing = {k: v for k, v in batch.items() if k != 'audio_mask'}
  with pytest.raises(ValueError, match=r"batch has no 'audio_mask'"):
    jax.eval_shape(model.init, jax.random.key(0), missing)


def test_full_attention_with_next_chunk_losses_and_other_new_model_fields():
  config = tiny_config('ttm')
  config.model.av.block_causal = False  # tiny config: latent and video_recon weights are on
  with pytest.raises(ValueError, match=r"model\.av\.block_causal.*\['latent', 'video_recon'\]"):
    mirasol.Model(**config.model)
  config.loss_weights.latent = config.loss_weights.video_recon = 0.0
  mirasol.Model(**config.model)  # full attention without next-chunk prediction is a valid ablation
  with pytest.raises(ValueError, match=r"model\.latent_loss.*'mse'"):
    _model(latent_loss='mse')
  with pytest.raises(ValueError, match=r'model\.contrastive_temperature.*0\.0 must be > 0'):
    _model(contrastive_temperature=0.0)
