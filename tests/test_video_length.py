"""The flat baseline (model.av_mode='flat') against Mirasol as clips get longer: it trains through the same step, its
shapes, its refusals, parameters that do not depend on the number of frames, and FLOPs that grow quadratically
in frames where Mirasol's grow linearly. (Measured costs: benchmarks/video_length.py.)"""
import jax
import numpy as np
import pytest

from conftest import random_batch, tiny_config
from mirasol_jax import config_lib
from mirasol_jax import flops
from mirasol_jax import sharding
from mirasol_jax import train
from mirasol_jax.models import encoders
from mirasol_jax.models import mirasol


def _flat(config):
  config.model.av_mode = 'flat'
  for term in mirasol.NEXT_CHUNK_TERMS:
    config.loss_weights[term] = 0.0
  return config


def _tokens_per_chunk(model_config) -> int:
  c = model_config
  k = c.num_frames // c.num_chunks
  return encoders.num_video_tokens(c.video.tubes, (k, *c.image_size)) + mirasol.num_audio_tokens(mirasol.Model(**c))


def test_flat_baseline_trains_through_the_train_step_with_all_tokens():
  config = _flat(tiny_config())
  config.batch_size = 4  # over the 4 virtual devices
  config.lr, config.warmup_steps = 1e-2, 0
  c = config.model
  n = _tokens_per_chunk(c)
  assert n > c.tokens_per_chunk  # the flat model reads every token the Combiner would have compressed

  model = mirasol.Model(**c)
  batch = random_batch(config, batch_size=2)
  params = jax.jit(model.init)(jax.random.key(0), batch)['params']
  out = jax.jit(lambda p, b: model.apply({'params': p}, b, train=True, rngs={'dropout': jax.random.key(1)}))(
      params, batch)
  assert out['av_latents'].shape == (2, c.num_chunks, n, c.width)
  assert out['text_logits'].shape == (2, c.max_text_len, c.vocab_size)
  assert set(out['losses']) == {'text', 'total'}  # no next-chunk term
  assert 'combiner' not in params and 'latent_head' not in params
  counts = mirasol.count_params_per_tower(params)
  mirasol_counts = mirasol.count_params_per_tower(
      jax.eval_shape(mirasol.Model(**tiny_config().model).init, jax.random.key(0), batch)['params'])
  # Same encoders and decoder; the AV Transformer's layers at the same width and depth (less Mirasol's slot and
  # mask embeddings, m + 1 vectors).
  for tower in ('video_encoder', 'audio_encoder', 'text_decoder'):
    assert counts[tower] == mirasol_counts[tower]
  assert mirasol_counts['av_transformer'] - counts['av_transformer'] == (c.tokens_per_chunk + 1) * c.width

  mesh = sharding.make_mesh(config.mesh)
  parts = train.build_train_step(config, mesh, tuple(tuple(rule) for rule in config.axis_rules))
  state = parts.init(0)
  before = jax.device_get(state['params'])
  state, metrics = parts.lower().compile()(state, {k: jax.device_put(v, parts.batch_shapes[k].sharding)
                                                   for k, v in random_batch(config, 4).items()})
  metrics, after = jax.device_get((metrics, state['params']))
  assert np.isfinite(metrics['train/loss']) and metrics['train/loss'] == metrics['train/loss_text']
  for name in before:
    changed = any(np.any(a != b) for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])))
    assert changed, name
  assert metrics['train/grad_norm/av_transformer'] > 0.0


def test_flat_refuses_next_chunk_losses_and_streaming():
  config = tiny_config()
  config.model.av_mode = 'flat'
  with pytest.raises(ValueError, match=r"av_mode: 'flat' .* next-chunk losses \['latent', 'video_recon'\]"):
    mirasol.Model(**config.model)
  config.model.av_mode = 'strided'
  with pytest.raises(ValueError, match=r'av_mode'):
    mirasol.Model(**config.model)
  model = mirasol.Model(**_flat(tiny_config()).model)
  batch = random_batch(tiny_config())
  params = jax.eval_shape(model.init, jax.random.key(0), batch)
  with pytest.raises(ValueError, match='no chunk-by-chunk path'):
    jax.eval_shape(lambda p: model.apply(p, 1, method=mirasol.Model.stream_init), params)


@pytest.mark.parametrize('mode', ['chunked', 'flat'])
def test_parameters_do_not_depend_on_the_number_of_frames(mode):
  counts = []
  for frames in (64, 512):
    config = config_lib.base_config('small', frames=frames)
    if mode == 'flat':
      _flat(config)
    shapes = jax.eval_shape(mirasol.Model(**config.model).init, jax.random.key(0),
                            mirasol.example_batch(config, 1))['params']
    counts.append(mirasol.count_params_per_tower(shapes)['total'])
  assert counts[0] == counts[1]


def test_flat_flops_grow_quadratically_in_frames_and_mirasols_linearly():
  frames = (16, 32, 64, 128)  # tiny: 2 frames a chunk, T = 8 .. 64
  totals = {}
  for mode in ('chunked', 'flat'):
    totals[mode] = []
    for f in frames:
      config = tiny_config()
      config.model.num_frames, config.model.num_chunks = f, f // 2
      if mode == 'flat':
        _flat(config)
      totals[mode].append(flops.count(config.model)['train']['total'])
  # What each doubling of the frames adds: twice the previous doubling's for a linear cost, four times for a
  # quadratic one.
  growth = {mode: [(c - b) / (b - a) for a, b, c in zip(v, v[1:], v[2:])] for mode, v in totals.items()}
  assert all(1.9 < g < 2.2 for g in growth['chunked']), growth
  assert growth['flat'][0] > 2.5 and growth['flat'][-1] > 3.3, growth
  assert totals['flat'][-1] / totals['chunked'][-1] > 2 * totals['flat'][0] / totals['chunked'][0]

  # The flat model's decoder cross-attends to n tokens a chunk where Mirasol's reads m: per layer, keys and values
  # of T*(n - m) more tokens (2 * tokens * D * 2w) and L queries' scores and values over them (2 * 2 * L * tokens * w).
  c = tiny_config().model
  extra = c.num_chunks * (_tokens_per_chunk(c) - c.tokens_per_chunk)
  w, length = c.text.width, c.max_text_len
  decoder = [flops.count(config.model)['forward']['text_decoder'] for config in (tiny_config(), _flat(tiny_config()))]
  np.testing.assert_allclose(decoder[1] - decoder[0],
                             c.text.depth * (4 * extra * c.width * w + 4 * length * extra * w), rtol=1e-9)
