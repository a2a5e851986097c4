"""Inference drivers over a Model's parameters: KV-cached greedy text generation and chunk-by-chunk latents.

Both are pure functions of (variables, batch) meant to run under `jax.jit`; their loops are `lax` loops, so a
whole generation or stream compiles once.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from mirasol_jax.models.mirasol import Model

Array = jax.Array


def prompt_lengths(text_loss_mask: Array) -> Array:
  """[B, L] target mask -> [B] number of prompt tokens (BOS + prefix): the index of the first target token."""
  has_target = jnp.any(text_loss_mask, axis=1)
  return jnp.where(has_target, jnp.argmax(text_loss_mask, axis=1), text_loss_mask.shape[1]).astype(jnp.int32)


def prompt_only(tokens: Array, prompt_len: Array, pad_id: int = 0) -> Array:
  """Blanks every token from the first target token on, so that nothing of the answer reaches the decoder."""
  keep = jnp.arange(tokens.shape[1])[None, :] < prompt_len[:, None]
  return jnp.where(keep, tokens, pad_id)


def greedy_decode(model: Model, variables: Mapping[str, Any], batch: Mapping[str, Array], max_new_tokens: int,
                  eos_id: int, pad_id: int = 0, latents: Optional[Array] = None) -> Array:
  """Greedy answers [B, max_new_tokens] to the prompts of `batch` (BOS + prefix, see prompt_lengths).

  One prefill of the prompt fills the self-attention cache and the cross-attention keys and values of the AV
  latents; every further token costs one cached decoder step. After EOS, or when the text buffer
  (model.max_text_len) is full, an example emits pad_id. `latents` (AV latents h [B, T, m, D], or [B, T*m, D])
  replaces the encoding of the batch's video and audio: then only its text_tokens and text_loss_mask are read.
  """
  if latents is None:
    _, latents = model.apply(variables, batch, method=Model.encode_av)
  batch_size, max_len = batch['text_tokens'].shape
  latents = latents.reshape(batch_size, -1, latents.shape[-1])
  prompt_len = prompt_lengths(batch['text_loss_mask'])
  tokens = prompt_only(batch['text_tokens'], prompt_len, pad_id)
  logits, cache = model.apply(variables, tokens, latents, max_len, method=Model.text_prefill)
  next_token = jnp.argmax(jnp.take_along_axis(logits, (prompt_len - 1)[:, None, None], axis=1)[:, 0], -1)

  def body(i, carry):
    cache, next_token, done, out = carry
    position = prompt_len + i
    done = done | (position >= max_len)
    out = out.at[:, i].set(jnp.where(done, pad_id, next_token))
    done = done | (next_token == eos_id)
    step_logits, cache = model.apply(variables, next_token[:, None], jnp.minimum(position, max_len - 1), cache,
                                     method=Model.text_extend)
    return cache, jnp.argmax(step_logits[:, 0], -1), done, out

  out = jnp.full((batch_size, max_new_tokens), pad_id, jnp.int32)
  init = (cache, next_token.astype(jnp.int32), jnp.zeros((batch_size,), bool), out)
  return jax.lax.fori_loop(0, max_new_tokens, body, init)[3]


def greedy_decode_uncached(model: Model, variables: Mapping[str, Any], batch: Mapping[str, Array],
                           max_new_tokens: int, eos_id: int, pad_id: int = 0) -> Array:
  """Reference for greedy_decode: recomputes the whole teacher-forced decoder for every new token."""
  _, h = model.apply(variables, batch, method=Model.encode_av)
  batch_size, max_len = batch['text_tokens'].shape
  latents = h.reshape(batch_size, -1, h.shape[-1])
  prompt_len = prompt_lengths(batch['text_loss_mask'])
  tokens = prompt_only(batch['text_tokens'], prompt_len, pad_id)
  out = jnp.full((batch_size, max_new_tokens), pad_id, jnp.int32)
  done = jnp.zeros((batch_size,), bool)
  rows = jnp.arange(batch_size)
  for i in range(max_new_tokens):
    position = prompt_len + i
    logits = model.apply(variables, tokens, latents, method=Model.text_logits)
    token = jnp.argmax(logits[rows, position - 1], -1).astype(jnp.int32)
    done = done | (position >= max_len)
    out = out.at[:, i].set(jnp.where(done, pad_id, token))
    done = done | (token == eos_id)
    tokens = tokens.at[rows, jnp.minimum(position, max_len - 1)].set(
        jnp.where(position < max_len, token, tokens[rows, max_len - 1]))
  return out


def stream_latents(model: Model, variables: Mapping[str, Any], batch: Mapping[str, Array]) -> Array:
  """AV latents [B, T, m, D] computed one chunk at a time (encode, advance the combiner, cached AV step)."""
  batch_size = batch['video'].shape[0]
  state = model.apply(variables, batch_size, method=Model.stream_init)

  def body(state, chunk):
    video_chunk, audio_chunk = chunk
    h_t, state = model.apply(variables, video_chunk, audio_chunk, batch['audio_mask'], state,
                             method=Model.stream_step)
    return state, h_t

  chunks = (jnp.moveaxis(batch['video'], 1, 0), jnp.moveaxis(batch['audio'], 1, 0))
  _, h = jax.lax.scan(body, state, chunks)
  return jnp.moveaxis(h, 0, 1)
