"""The Mirasol model does what the paper says: shapes, causality, memory, stop-gradient, decoding, streaming."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import COMBINERS, random_batch, tiny_config
from mirasol_jax import decoding
from mirasol_jax.models import av_transformer
from mirasol_jax.models import mirasol


@functools.lru_cache(maxsize=None)
def _setup(combiner, dtype='float32'):
  config = tiny_config(combiner, dtype)
  model = mirasol.Model(**config.model)
  batch = random_batch(config)
  variables = jax.jit(model.init)(jax.random.key(0), batch)
  return config, model, {'params': variables['params']}, batch


@functools.lru_cache(maxsize=None)
def _encode(combiner):
  _, model, params, _ = _setup(combiner)
  return jax.jit(lambda p, b: model.apply(p, b, method=mirasol.Model.encode_av))


@functools.lru_cache(maxsize=None)
def _forward(combiner):
  _, model, params, _ = _setup(combiner)
  return jax.jit(lambda p, b: model.apply(p, b))


@pytest.mark.parametrize('combiner', COMBINERS)
def test_output_shapes_and_losses(combiner):
  config, _, params, batch = _setup(combiner)
  out = _forward(combiner)(params, batch)
  m = config.model
  assert out['text_logits'].shape == (2, m.max_text_len, m.vocab_size)
  assert out['av_latents'].shape == (2, m.num_chunks, m.tokens_per_chunk, m.width)
  assert set(out['losses']) == {'text', 'latent', 'video_recon', 'total'}
  for name, value in out['losses'].items():
    assert value.shape == () and np.isfinite(float(value)), name
  expected_total = sum(m.loss_weights[k] * out['losses'][k] for k in ('text', 'latent', 'video_recon'))
  np.testing.assert_allclose(out['losses']['total'], expected_total, rtol=1e-6)


def test_every_parameter_has_logical_axis_names_and_is_fp32_with_bf16_compute():
  config = tiny_config('ttm', dtype='bfloat16')
  model = mirasol.Model(**config.model)
  batch = random_batch(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), batch)
  boxed = jax.tree.leaves(shapes['params'], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert boxed and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in boxed)
  for leaf in boxed:
    assert len(leaf.names) == leaf.value.ndim, leaf
    assert leaf.value.dtype == jnp.float32
  out = jax.eval_shape(functools.partial(model.apply, train=False), nn.unbox(shapes), batch)
  assert out['av_latents'].dtype == jnp.bfloat16
  assert out['text_logits'].dtype == jnp.float32


@pytest.mark.parametrize('combiner', COMBINERS)
def test_av_latents_are_block_causal(combiner):
  config, _, params, batch = _setup(combiner)
  encode = _encode(combiner)
  _, h = encode(params, batch)
  t = 1
  later = dict(batch)
  later['video'] = batch['video'].copy()
  later['video'][:, t + 1:] = 255 - later['video'][:, t + 1:]
  later['audio'] = batch['audio'].copy()
  later['audio'][:, t + 1:] += 30.0
  _, h_later = encode(params, later)
  np.testing.assert_allclose(h_later[:, :t + 1], h[:, :t + 1], atol=1e-6)
  assert not np.allclose(h_later[:, t + 1:], h[:, t + 1:], atol=1e-3)

  # The last frame of chunk t changes every latent of chunk t, the first slot included.
  inside = dict(batch)
  inside['video'] = batch['video'].copy()
  inside['video'][:, t, -1] = 255 - inside['video'][:, t, -1]
  _, h_inside = encode(params, inside)
  np.testing.assert_allclose(h_inside[:, :t], h[:, :t], atol=1e-6)
  assert not np.allclose(h_inside[:, t, 0], h[:, t, 0], atol=1e-4)


def test_av_transformer_attends_fully_inside_a_chunk_and_causally_across():
  module = av_transformer.AVTransformer(tokens_per_chunk=3, width=32, depth=2, num_heads=2, mlp_dim=64)
  x = jax.random.normal(jax.random.key(0), (1, 4, 3, 32))
  params = module.init(jax.random.key(1), x)
  h = module.apply(params, x)
  x2 = x.at[0, 1, 2].set(jax.random.normal(jax.random.key(2), (32,)))  # the last slot of chunk 1
  h2 = module.apply(params, x2)
  np.testing.assert_allclose(h2[0, 0], h[0, 0], atol=1e-6)  # chunk 0 does not see chunk 1
  assert not np.allclose(h2[0, 1, 0], h[0, 1, 0], atol=1e-4)  # slot 0 of chunk 1 sees slot 2 of chunk 1
  assert not np.allclose(h2[0, 2], h[0, 2], atol=1e-4)  # later chunks see it too


def test_text_decoder_is_causal():
  _, model, params, batch = _setup('transformer')
  logits = _forward('transformer')(params, batch)['text_logits']
  i = 7
  changed = dict(batch)
  changed['text_tokens'] = batch['text_tokens'].copy()
  changed['text_tokens'][:, i] = (changed['text_tokens'][:, i] + 1) % 100 + 3
  logits2 = _forward('transformer')(params, changed)['text_logits']
  np.testing.assert_allclose(logits2[:, :i], logits[:, :i], atol=1e-5)
  assert not np.allclose(logits2[:, i], logits[:, i], atol=1e-4)


@pytest.mark.parametrize('combiner,carries', [('ttm', True), ('transformer', False)])
def test_ttm_memory_carries_information_across_chunks(combiner, carries):
  _, _, params, batch = _setup(combiner)
  encode = _encode(combiner)
  x, _ = encode(params, batch)
  previous = dict(batch)
  previous['video'] = batch['video'].copy()
  previous['video'][:, 1] = 255 - previous['video'][:, 1]  # chunk t-1 = 1
  x2, _ = encode(params, previous)
  np.testing.assert_allclose(x2[:, 0], x[:, 0], atol=1e-6)
  # Combiner outputs of chunk t = 2 see chunk 1 only through the TTM memory.
  assert (not np.allclose(x2[:, 2], x[:, 2], atol=1e-5)) == carries


@pytest.mark.parametrize('combiner', COMBINERS)
def test_no_leak_across_examples_of_a_batch(combiner):
  _, _, params, batch = _setup(combiner)
  out = _forward(combiner)(params, batch)
  other = dict(batch)
  other['video'] = batch['video'].copy()
  other['video'][1] = 255 - other['video'][1]
  out2 = _forward(combiner)(params, other)
  np.testing.assert_allclose(out2['av_latents'][0], out['av_latents'][0], atol=1e-6)
  np.testing.assert_allclose(out2['text_logits'][0], out['text_logits'][0], atol=1e-5)
  assert not np.allclose(out2['av_latents'][1], out['av_latents'][1], atol=1e-4)


def test_latent_target_gets_no_gradient():
  config, model, params, batch = _setup('ttm')
  perturbations = jax.jit(model.init)(jax.random.key(0), batch)['perturbations']  # zero, one per perturb()
  assert set(perturbations) == {'av_input', 'latent_target'}

  def latent_loss(perturbations):
    out = model.apply({'params': params['params'], 'perturbations': perturbations}, batch)
    return out['losses']['latent']

  grads = jax.jit(jax.grad(latent_loss))(perturbations)
  assert np.all(np.asarray(grads['latent_target']) == 0.0)  # stop-gradient on the target x_{t+1}
  assert np.any(np.abs(np.asarray(grads['av_input'])) > 0.0)  # the prediction path does get gradients


@pytest.mark.parametrize('size', ['tiny', 'base'])
def test_parameter_count_does_not_depend_on_the_number_of_frames(size, repo):
  from mirasol_jax import config_lib

  def count(frames):
    config = config_lib.load_config(f'{repo}/configs/pretrain.py:size={size},frames={frames}')
    model = mirasol.Model(**config.model)
    shapes = jax.eval_shape(model.init, jax.random.key(0), mirasol.example_batch(config, 1))
    return mirasol.count_params_per_tower(shapes['params'])['total'], config.model.num_chunks

  k = 2 if size == 'tiny' else 8
  (n_short, t_short), (n_long, t_long) = count(16 * k), count(64 * k)
  assert t_long == 4 * t_short
  assert n_short == n_long


@functools.lru_cache(maxsize=None)
def _memorised():
  """The tiny TTM model fitted to its batch until it knows each example's answer (the second half of its text)."""
  config, model, params, batch = _setup('ttm')
  tx = optax.adam(3e-3)

  @jax.jit
  def step(p, opt_state):
    loss, grads = jax.value_and_grad(lambda p: model.apply(p, batch)['losses']['text'])(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  opt_state = tx.init(params)
  for _ in range(150):
    params, opt_state, loss = step(params, opt_state)
  return model, params, batch, float(loss)


def test_kv_cached_greedy_decoding_returns_the_answers_and_matches_full_recomputation():
  model, params, batch, loss = _memorised()
  assert loss < 0.05, loss
  half = batch['text_tokens'].shape[1] // 2
  new = batch['text_tokens'].shape[1] - half
  cached = jax.jit(lambda p, b: decoding.greedy_decode(model, p, b, max_new_tokens=new, eos_id=2))(params, batch)
  uncached = jax.jit(lambda p, b: decoding.greedy_decode_uncached(model, p, b, max_new_tokens=new, eos_id=2))(
      params, batch)
  np.testing.assert_array_equal(cached, uncached)
  # The answers are reproduced from the prompt alone: the target tokens are blanked before decoding.
  np.testing.assert_array_equal(cached, batch['text_tokens'][:, half:])


def test_greedy_decoding_stops_at_eos_and_at_the_end_of_the_text_buffer():
  model, params, batch, _ = _memorised()
  length = batch['text_tokens'].shape[1]
  free = length - length // 2  # positions left after the prompt
  tokens = decoding.greedy_decode(model, params, batch, max_new_tokens=free + 3, eos_id=-1)
  assert np.all(np.asarray(tokens[:, free:]) == 0)  # nothing is written past max_text_len
  first = np.asarray(tokens[0])
  eos = int(first[1])  # pretend the second generated token is EOS: everything after it becomes padding
  stopped = np.asarray(decoding.greedy_decode(model, params, batch, max_new_tokens=free, eos_id=eos))[0]
  cut = int(np.argmax(first == eos))
  np.testing.assert_array_equal(stopped[:cut + 1], first[:cut + 1])
  assert np.all(stopped[cut + 1:] == 0)


@pytest.mark.parametrize('combiner', COMBINERS)
def test_chunk_by_chunk_latents_equal_the_full_pass(combiner):
  _, model, params, batch = _setup(combiner)
  _, h = _encode(combiner)(params, batch)
  streamed = jax.jit(lambda p, b: decoding.stream_latents(model, p, b))(params, batch)
  np.testing.assert_allclose(streamed, h, atol=2e-5, rtol=2e-5)


def test_missing_audio_is_masked_out():
  _, _, params, batch = _setup('transformer')
  no_audio = dict(batch)
  no_audio['audio_mask'] = np.array([False, True])
  h = _encode('transformer')(params, no_audio)[1]
  changed = dict(no_audio)
  changed['audio'] = batch['audio'] + 50.0
  h2 = _encode('transformer')(params, changed)[1]
  np.testing.assert_allclose(h2[0], h[0], atol=1e-6)  # example 0 has no audio track: its audio is never read
  assert not np.allclose(h2[1], h[1], atol=1e-4)


@pytest.mark.parametrize('remat_policy', ['full'])
def test_remat_policies_give_the_same_gradients(remat_policy):
  config, model, params, batch = _setup('qformer')
  remat_model = mirasol.Model(**dict(config.model, remat_policy=remat_policy))

  def grads(m):
    return jax.jit(jax.grad(lambda p: m.apply(p, batch)['losses']['total']))(params)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads(model), grads(remat_model))


def test_one_train_step_lowers_the_loss():
  config, model, params, batch = _setup('ttm')
  tx = optax.adam(1e-3)

  def loss_fn(p):
    return model.apply(p, batch, train=True, rngs={'dropout': jax.random.key(3)})['losses']['total']

  @jax.jit
  def step(p, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  new_params, _, loss_before = step(params, tx.init(params))
  loss_after = jax.jit(loss_fn)(new_params)
  assert float(loss_after) < float(loss_before) - 1e-3, (float(loss_before), float(loss_after))


def test_masking_and_dropout_are_random_in_training_only():
  config = tiny_config('transformer', dropout_rate=0.1)
  model = mirasol.Model(**config.model)
  batch = random_batch(config)
  variables = jax.jit(model.init)(jax.random.key(0), batch)
  train = jax.jit(lambda seed: model.apply(variables, batch, train=True, rngs={'dropout': jax.random.key(seed)}))
  assert not np.allclose(train(1)['av_latents'], train(2)['av_latents'])
  evaluate = jax.jit(lambda v: model.apply(v, batch)['av_latents'])
  np.testing.assert_array_equal(evaluate(variables), evaluate(variables))


def test_micro_batch_losses_with_global_denominators_add_up_to_the_whole_batch():
  config, model, params, batch = _setup('transformer')
  uneven = {k: v.copy() for k, v in batch.items()}
  uneven['example_mask'][1] = False  # an unreadable example: the two halves have different normalisers
  uneven['text_loss_mask'][0, 3:] = True
  whole = jax.jit(lambda p, b: model.apply(p, b)['losses'])(params, uneven)
  denominators = mirasol.loss_denominators(uneven, config.model.num_chunks, config.model.tokens_per_chunk)
  half = jax.jit(lambda p, b: model.apply(p, b, denominators=denominators)['losses'])
  parts = [half(params, {k: v[i:i + 1] for k, v in uneven.items()}) for i in range(2)]
  for key in whole:
    np.testing.assert_allclose(parts[0][key] + parts[1][key], whole[key], rtol=1e-5, err_msg=key)


def test_token_context_norm_ignores_each_examples_offset_and_scale_and_decodes_the_same_cached():
  from mirasol_jax.models import text_decoder
  decoder = text_decoder.TextDecoder(vocab_size=50, max_len=12, width=32, depth=2, num_heads=2, mlp_dim=64,
                                     context_norm='tokens')
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, 50, (2, 12)), jnp.int32)
  latents = jnp.asarray(rng.normal(size=(2, 6, 32)), jnp.float32)
  params = decoder.init(jax.random.PRNGKey(0), tokens, latents)
  logits = decoder.apply(params, tokens, latents)
  # Per example and feature: a shared offset and a positive scale say nothing about how the latent tokens differ.
  offset, scale = rng.normal(size=(2, 1, 32)) * 5, np.exp(rng.normal(size=(2, 1, 32)))
  np.testing.assert_allclose(decoder.apply(params, tokens, latents * scale + offset), logits, atol=2e-4)
  assert not np.allclose(decoder.apply(params, tokens, latents[:, ::-1] * latents), logits, atol=1e-3)
  plain = text_decoder.TextDecoder(vocab_size=50, max_len=12, width=32, depth=2, num_heads=2, mlp_dim=64)
  assert not np.allclose(plain.apply(params, tokens, latents + offset), plain.apply(params, tokens, latents),
                         atol=1e-3)
  # The KV cache (prefill, then one token at a time) sees the same standardised latents as the full pass.
  prompt_logits, cache = decoder.apply(params, tokens[:, :8], latents, 12, method=text_decoder.TextDecoder.prefill)
  np.testing.assert_allclose(prompt_logits, logits[:, :8], atol=1e-4)
  for i in range(8, 12):
    step_logits, cache = decoder.apply(params, tokens[:, i:i + 1], jnp.full((2,), i, jnp.int32), cache,
                                       method=text_decoder.TextDecoder.extend)
    np.testing.assert_allclose(step_logits[:, 0], logits[:, i], atol=1e-4)


def test_unknown_context_norm_is_a_config_error():
  config = tiny_config()
  config.model.text.context_norm = 'batch'
  with pytest.raises(ValueError, match='context_norm'):
    mirasol.Model(**config.model).init(jax.random.PRNGKey(0), random_batch(config))
