"""The text decoder's cached decoding on a tiny random decoder: the prompts prefilled chunk by chunk
(TextDecoder.prefill_prompt) give the teacher-forced logits after each prompt and the cache of the full prefill, with
prompts of different lengths over several chunks (the last one overlapping); one cached step gives the same logits
with the stacked layer parameters and with the per-layer ones of decoding.step_variables."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mirasol_jax import decoding
from mirasol_jax import sharding
from mirasol_jax.models import text_decoder

LENGTH = 14  # text positions: chunks of 4 start at 0, 4, 8 and 10 (the last one overlapping).
PROMPTS = (1, 5, 13, 14)  # prompt lengths: one, two, four and four chunks.


def _decoder_and_inputs():
  decoder = text_decoder.TextDecoder(vocab_size=40, max_len=LENGTH, width=32, depth=2, num_heads=2, mlp_dim=64)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, 40, (len(PROMPTS), LENGTH)), jnp.int32)
  latents = jnp.asarray(rng.normal(size=(len(PROMPTS), 6, 32)), jnp.float32)
  params = nn.unbox(decoder.init(jax.random.PRNGKey(0), tokens, latents))
  return decoder, params, tokens, latents


def test_prompts_prefilled_in_chunks_give_the_logits_after_each_prompt_and_the_full_prefills_cache():
  decoder, params, tokens, latents = _decoder_and_inputs()
  prompt_len = jnp.asarray(PROMPTS, jnp.int32)
  teacher_forced = decoder.apply(params, tokens, latents)
  # Under a mesh and the logical axis rules, as evaluation runs it: the sharding constraints must fit every shape.
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  with jax.set_mesh(mesh), nn.logical_axis_rules([tuple(rule) for rule in sharding.DEFAULT_AXIS_RULES]):
    logits, cache = jax.jit(lambda p: decoder.apply(p, tokens, latents, prompt_len, 4,
                                                    method=text_decoder.TextDecoder.prefill_prompt))(params)
  rows = np.arange(len(PROMPTS))
  np.testing.assert_allclose(logits, teacher_forced[rows, prompt_len - 1], atol=1e-4)
  # A wrong position would give other logits: the check above can fail.
  assert not np.allclose(logits, teacher_forced[rows, prompt_len - 2 + (prompt_len == 1)], atol=1e-2)
  _, full = decoder.apply(params, tokens, latents, LENGTH, method=text_decoder.TextDecoder.prefill)
  assert len(cache) == len(full) == 2
  for layer, full_layer in zip(cache, full):
    np.testing.assert_allclose(layer['ck'], full_layer['ck'], atol=1e-5)
    np.testing.assert_allclose(layer['cv'], full_layer['cv'], atol=1e-5)
    for b, n in enumerate(PROMPTS):  # the prompt's positions; the rest is overwritten by the decoding steps.
      np.testing.assert_allclose(layer['k'][b, :, :n], full_layer['k'][b, :, :n], atol=1e-4)
      np.testing.assert_allclose(layer['v'][b, :, :n], full_layer['v'][b, :, :n], atol=1e-4)


def test_a_cached_step_is_the_same_with_stacked_and_per_layer_parameters():
  decoder, params, tokens, latents = _decoder_and_inputs()
  prompt_len = jnp.asarray(PROMPTS[:3], jnp.int32)  # the fourth prompt fills the buffer: no step after it.
  tokens, latents = tokens[:3], latents[:3]
  _, cache = decoder.apply(params, tokens, latents, prompt_len, method=text_decoder.TextDecoder.prefill_prompt)
  model_like = {'params': {'text_decoder': params['params']}}  # step_variables reads a Model's text_decoder.
  split = decoding.step_variables(model_like)['params']['text_decoder']
  assert 'layers' not in split['stack'] and set(split['stack']) == {'layers_0', 'layers_1', 'ln_final'}
  for whole, layer_1 in zip(jax.tree.leaves(params['params']['stack']['layers']),
                            jax.tree.leaves(split['stack']['layers_1'])):
    np.testing.assert_array_equal(layer_1, whole[1])
  step = lambda p: decoder.apply(p, tokens[:, :1], prompt_len, cache, method=text_decoder.TextDecoder.extend)
  stacked_logits, stacked_cache = step(params)
  split_logits, split_cache = step({'params': split})
  np.testing.assert_array_equal(split_logits, stacked_logits)
  np.testing.assert_allclose(stacked_logits[:, 0], decoder.apply(
      params, tokens.at[jnp.arange(3), prompt_len].set(tokens[:, 0]), latents)[jnp.arange(3), prompt_len], atol=1e-4)
  for a, b in zip(jax.tree.leaves(stacked_cache), jax.tree.leaves(split_cache)):
    np.testing.assert_array_equal(a, b)


def test_split_matrices_in_the_compute_dtype_give_the_same_bfloat16_step():
  decoder, params, tokens, latents = _decoder_and_inputs()
  decoder = decoder.clone(dtype=jnp.bfloat16)
  prompt_len = jnp.asarray(PROMPTS[:3], jnp.int32)
  tokens, latents = tokens[:3], latents[:3]
  _, cache = decoder.apply(params, tokens, latents, prompt_len, method=text_decoder.TextDecoder.prefill_prompt)
  split = decoding.step_variables({'params': {'text_decoder': params['params']}},
                                  jnp.bfloat16)['params']['text_decoder']
  layer = split['stack']['layers_0']
  # Matrices in bfloat16 (half the copy), vectors as they were.
  assert {leaf.dtype for leaf in jax.tree.leaves(layer) if leaf.ndim >= 2} == {jnp.dtype(jnp.bfloat16)}
  assert {leaf.dtype for leaf in jax.tree.leaves(layer) if leaf.ndim < 2} == {jnp.dtype(jnp.float32)}
  step = lambda p: decoder.apply(p, tokens[:, :1], prompt_len, cache, method=text_decoder.TextDecoder.extend)
  for a, b in zip(jax.tree.leaves(step(params)), jax.tree.leaves(step({'params': split}))):
    np.testing.assert_array_equal(a, b)
