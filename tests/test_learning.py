"""What makes the towers learn: learning-rate multipliers per tower, collapse statistics, the non-collapsing latent
and audio-video objectives, and text-free examples for pretraining."""
import flax.linen as nn
import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest

from conftest import random_batch, tiny_config
from mirasol_jax import config_lib
from mirasol_jax import optimizer
from mirasol_jax.models import mirasol


def _params():
  ones = lambda *shape: np.ones(shape, np.float32)
  return {'video_encoder': {'w': ones(2, 3)}, 'combiner': {'w': ones(3, 3)}, 'video_proj': {'w': ones(3, 2)},
          'text_decoder': {'w': ones(3, 2), 'b': ones(2)}}


def _config(**overrides):
  config = config_lib.base_config('tiny')
  config.lr, config.warmup_steps, config.total_steps, config.weight_decay = 0.1, 0, 10, 0.0
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def _updates(config, params=None):
  params = params or _params()
  tx = optimizer.make(config)
  grads = jax.tree.map(lambda p: np.full_like(p, 0.5), params)
  return tx.update(grads, tx.init(params), params)[0]


def test_lr_multipliers_scale_each_towers_updates():
  plain = _updates(_config(lr_multipliers={t: 1.0 for t in mirasol.TOWERS}))
  config = _config()
  config.lr_multipliers.video_encoder = 0.1
  config.lr_multipliers.combiner = 0.0
  config.lr_multipliers.text_decoder = 2.0
  scaled = _updates(config)
  np.testing.assert_allclose(scaled['video_encoder']['w'], 0.1 * plain['video_encoder']['w'], rtol=1e-6)
  # video_proj belongs to the combiner tower (mirasol.TOWERS): both stop.
  assert not np.any(scaled['combiner']['w']) and not np.any(scaled['video_proj']['w'])
  np.testing.assert_allclose(scaled['text_decoder']['b'], 2.0 * plain['text_decoder']['b'], rtol=1e-6)


def test_lr_multipliers_compose_with_frozen_parameters():
  config = _config(frozen='^text_decoder/')
  config.lr_multipliers.video_encoder = 0.5
  updates = _updates(config)
  assert not np.any(updates['text_decoder']['w'])
  assert np.all(updates['video_encoder']['w'] < 0)


@pytest.mark.parametrize('multipliers, message', [({'vision': 0.1}, 'not towers'), ({'combiner': -1.0}, '>= 0')])
def test_bad_lr_multipliers_are_config_errors(multipliers, message):
  with pytest.raises(ValueError, match=message):
    optimizer.make(_config(lr_multipliers=multipliers))


def test_spread_is_zero_for_identical_examples_and_ignores_masked_ones():
  same = jnp.ones((4, 3, 5)) * jnp.arange(5.0)
  assert float(mirasol.spread(same, jnp.ones(4))) == 0.0
  different = same.at[3].set(-same[3])
  assert float(mirasol.spread(different, jnp.ones(4))) > 0.5
  assert float(mirasol.spread(different, jnp.array([1.0, 1.0, 1.0, 0.0]))) == 0.0


def test_contrastive_latent_loss_rewards_the_right_next_chunk_and_cannot_be_met_by_collapse():
  rng = np.random.default_rng(0)
  target = jnp.asarray(rng.normal(size=(3, 2, 4, 16)), jnp.float32)
  weights = jnp.ones(3)
  matched = mirasol._info_nce(target, target, weights, 0.1)
  shuffled = mirasol._info_nce(jnp.roll(target, 1, axis=0), target, weights, 0.1)
  assert float(matched.mean()) < 0.1 < 1.0 < float(shuffled.mean())
  # Constant targets: every candidate is as good as the right one, the loss is log(candidates) = log(B * (T - 1)).
  collapsed = jnp.ones_like(target)
  np.testing.assert_allclose(mirasol._info_nce(collapsed, collapsed, weights, 0.1), np.log(6), rtol=1e-5)
  # A masked example's targets are not candidates (its own rows get weight 0 in the loss, and stay finite).
  masked = mirasol._info_nce(collapsed, collapsed, jnp.array([1.0, 1.0, 0.0]), 0.1)
  np.testing.assert_allclose(masked[:2], np.log(4), rtol=1e-5)
  assert np.all(np.isfinite(masked))


def test_audio_video_contrastive_loss_needs_each_chunks_own_pair():
  rng = np.random.default_rng(1)
  video = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
  weights = jnp.ones(2)
  assert float(mirasol._audio_video_nce(video, video, weights, 0.1).mean()) < 0.1
  swapped_chunks = jnp.roll(video, 1, axis=1)  # the right clip, the wrong second
  assert float(mirasol._audio_video_nce(video, swapped_chunks, weights, 0.1).mean()) > 1.0


def test_model_reports_the_new_loss_terms_and_statistics():
  config = tiny_config()
  config.loss_weights.av_contrastive = 1.0
  config.model.latent_loss = 'contrastive'
  model = mirasol.Model(**config.model)
  batch = random_batch(config, batch_size=3)
  variables = model.init(jax.random.key(0), batch)
  out = model.apply(variables, batch)
  assert {'latent', 'video_recon', 'av_contrastive', 'text', 'total'} <= set(out['losses'])
  assert 0.0 < float(out['stats']['latent_target_spread']) <= 1.0
  grads = jax.grad(lambda p: model.apply({'params': p}, batch)['losses']['av_contrastive'])(variables['params'])
  assert optax.global_norm(grads['audio_encoder']) > 0 and optax.global_norm(grads['video_encoder']) > 0
  assert optax.global_norm(grads['text_decoder']) == 0


def _generated_task(config, batch_size, rng):
  """A batch of a task only the clip answers: 'which colour?' (the frames' colour) or 'which pitch?' (the mel band
  that sounds); token 10 or 11 is the question, 20..23 the answer."""
  batch = mirasol.example_batch(config, batch_size)
  colours = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30]], np.uint8)
  colour = rng.integers(4, size=batch_size)
  band = rng.integers(4, size=batch_size)
  batch['video'][:] = colours[colour][:, None, None, None, None, :]
  bins = config.model.mel_bins // 4
  audio = np.full(batch['audio'].shape, -80.0, np.float32)
  for i, b in enumerate(band):
    audio[i, :, :, b * bins:(b + 1) * bins] = -10.0
  batch['audio'] = audio
  asks_colour = rng.integers(2, size=batch_size).astype(bool)
  answer = np.where(asks_colour, colour, band)
  batch['text_tokens'][:, :4] = np.stack([np.ones(batch_size), np.where(asks_colour, 10, 11), 20 + answer,
                                          np.full(batch_size, 2)], axis=1)
  batch['text_loss_mask'][:, 2:4] = True
  return batch


def test_trained_end_to_end_with_nothing_frozen_the_answers_depend_on_the_clip():
  """The default recipe (towers at config.lr_multipliers of the decoder's rate, context_norm='tokens') learns a
  task that needs picture and sound: the text loss with each example's own latents ends far below the loss with
  another example's (grounding.derangement), and every tower moved."""
  from mirasol_jax.evaluators import grounding
  config = tiny_config()
  config.model.text.context_norm = 'tokens'
  config.loss_weights.latent = config.loss_weights.video_recon = 0.0
  config.model.av.mask_ratio = 0.0
  config.lr, config.warmup_steps, config.total_steps = 3e-3, 10, 150
  assert not config.frozen
  model = mirasol.Model(**config.model)
  tx = optimizer.make(config)
  rng = np.random.default_rng(0)
  params = nn.unbox(model.init(jax.random.key(0), _generated_task(config, 2, rng))['params'])
  initial, opt_state = params, tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    grads = jax.grad(lambda p: model.apply({'params': p}, batch)['losses']['total'])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(config.total_steps):
    params, opt_state = step(params, opt_state, _generated_task(config, 16, rng))

  @jax.jit
  def text_losses(params, batch):
    _, h = model.apply({'params': params}, batch, method=mirasol.Model.encode_av)
    shuffled = jnp.take(h, grounding.derangement(batch['example_mask']), axis=0)
    losses = []
    for latents in (h, shuffled):
      logits = model.apply({'params': params}, batch['text_tokens'], latents.reshape(h.shape[0], -1, h.shape[-1]),
                           method=mirasol.Model.text_logits)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch['text_tokens'][:, 1:])
      losses.append(jnp.sum(ce * batch['text_loss_mask'][:, 1:]) / jnp.sum(batch['text_loss_mask'][:, 1:]))
    return losses

  plain, shuffled = text_losses(params, _generated_task(config, 64, np.random.default_rng(1)))
  assert float(plain) < 0.5 and float(shuffled) - float(plain) > 0.5, (float(plain), float(shuffled))
  for tower in ('video_encoder', 'audio_encoder', 'combiner', 'av_transformer', 'text_decoder'):
    moved = optax.global_norm(jax.tree.map(jnp.subtract, params[tower], initial[tower]))
    assert float(moved) > 0, tower
