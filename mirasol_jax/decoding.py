"""Inference drivers over a Model's parameters: KV-cached greedy and beam-search text generation, and chunk-by-chunk
latents.

All are pure functions of (variables, batch) meant to run under `jax.jit`; their loops are `lax` loops, so a
whole generation or stream compiles once.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mirasol_jax.models import text_decoder
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


def step_variables(variables: Mapping[str, Any], dtype: Any = None) -> dict[str, Any]:
  """`variables` for the cached decoder steps (Model.text_extend): the text decoder's scanned layer parameters,
  stacked on a leading `layers` axis, split into one entry per layer (`layers_0`, ...) as an unscanned Stack stores
  them, and a tied embedding transposed (text_decoder.TRANSPOSED_EMBEDDING). Called outside the decoding loop, so
  that the per-layer slices are taken once per generation: XLA does not hoist them out of the loop, and copying every layer's weights out of the stack at each step cost more than the
  step itself (benchmarks/generation.py). Parameters are unboxed; nothing else changes. The price is a second copy
  of the decoder's layer weights while a generation runs (sharded as the stacked ones are). With `dtype` (the
  model's compute dtype) the copies of matrices are made in it, which the layers cast them to anyway: half the
  copy's memory in bfloat16, the same results; vectors (biases, norms) keep their dtype.
  """
  variables = nn.unbox(variables)
  decoder = dict(variables['params']['text_decoder'])

  def cast(p):
    return p.astype(dtype) if dtype is not None and p.ndim >= 2 else p

  stack = decoder['stack']
  if 'layers' in stack:  # else already one entry per layer
    depth = jax.tree.leaves(stack['layers'])[0].shape[0]
    split = {name: value for name, value in stack.items() if name != 'layers'}
    split.update({f'layers_{i}': jax.tree.map(lambda p, i=i: cast(p[i]), stack['layers']) for i in range(depth)})
    decoder['stack'] = split
  if 'head' not in decoder and text_decoder.TRANSPOSED_EMBEDDING not in decoder:  # tied embeddings: the vocabulary projection's matrix [width, vocab], transposed once
    decoder[text_decoder.TRANSPOSED_EMBEDDING] = cast(decoder['embed']['embedding'].T)
  return dict(variables, params=dict(variables['params'], text_decoder=decoder))


def _prefill(model: Model, step_vars: Mapping[str, Any], tokens: Array, latents: Array,
             prompt_len: Array) -> tuple[Array, Any]:
  """(logits [B, vocab] after each prompt, cache): TextDecoder.prefill_prompt, the prompts run through the cached
  layers in chunks (the cost grows with the longest prompt, not with the text buffer)."""
  return model.apply(step_vars, tokens, latents, prompt_len,
                     method=lambda m, *args: m.text_decoder.prefill_prompt(*args))


def greedy_decode(model: Model, variables: Mapping[str, Any], batch: Mapping[str, Array], max_new_tokens: int,
                  eos_id: int, pad_id: int = 0, latents: Optional[Array] = None) -> Array:
  """Greedy answers [B, max_new_tokens] to the prompts of `batch` (BOS + prefix, see prompt_lengths).

  The prompts are prefilled into the self-attention cache, chunk by chunk up to the longest prompt
  (TextDecoder.prefill_prompt), with the cross-attention keys and values of the AV latents computed once; every
  further token costs one cached decoder step. After EOS, or when the text buffer
  (model.max_text_len) is full, an example emits pad_id. `latents` (AV latents h [B, T, m, D], or [B, T*m, D])
  replaces the encoding of the batch's video and audio: then only its text_tokens and text_loss_mask are read.
  """
  if latents is None:
    _, latents = model.apply(variables, batch, method=Model.encode_av)
  batch_size, max_len = batch['text_tokens'].shape
  latents = latents.reshape(batch_size, -1, latents.shape[-1])
  prompt_len = prompt_lengths(batch['text_loss_mask'])
  tokens = prompt_only(batch['text_tokens'], prompt_len, pad_id)
  step_vars = step_variables(variables, model.dtype)
  logits, cache = _prefill(model, step_vars, tokens, latents, prompt_len)
  next_token = jnp.argmax(logits, -1)

  def body(i, carry):
    cache, next_token, done, out = carry
    position = prompt_len + i
    done = done | (position >= max_len)
    out = out.at[:, i].set(jnp.where(done, pad_id, next_token))
    done = done | (next_token == eos_id)
    step_logits, cache = model.apply(step_vars, next_token[:, None], jnp.minimum(position, max_len - 1), cache,
                                     method=Model.text_extend)
    return cache, jnp.argmax(step_logits[:, 0], -1), done, out

  out = jnp.full((batch_size, max_new_tokens), pad_id, jnp.int32)
  init = (cache, next_token.astype(jnp.int32), jnp.zeros((batch_size,), bool), out)
  return jax.lax.fori_loop(0, max_new_tokens, body, init)[3]


# The text decoder's cache (TextDecoder.prefill_prompt) holds one dict per layer of arrays [batch, ...]: self-attention keys
# and values 'k', 'v' of the text positions, and cross-attention keys and values 'ck', 'cv' of the AV latents. The
# latter are the same for every beam of an example, so reordering beams (always within an example) leaves them as
# they are.
_CACHE_BATCH_AXIS = 0
_SHARED_CACHE_KEYS = ('ck', 'cv')


def _length_normalised(score: Array, length: Array, length_penalty) -> Array:
  """score / ((5 + length) / 6) ** length_penalty; length_penalty 0 gives the raw sum of log-probabilities."""
  return score / ((5.0 + length.astype(jnp.float32)) / 6.0) ** length_penalty


def _reorder_beams(cache: Any, rows: Array) -> Any:
  """Row r of every per-beam cache leaf becomes row rows[r] (along the batch axis)."""
  def gather(path, leaf):
    if getattr(path[-1], 'key', None) in _SHARED_CACHE_KEYS:
      return leaf
    return jnp.take(leaf, rows, axis=_CACHE_BATCH_AXIS)
  return jax.tree_util.tree_map_with_path(gather, cache)


def beam_decode(model: Model, variables: Mapping[str, Any], batch: Mapping[str, Array], max_new_tokens: int,
                eos_id: int, beam_size: int = 4, length_penalty: float = 0.0, pad_id: int = 0,
                latents: Optional[Array] = None) -> tuple[Array, Array]:
  """Beam-search answers to the prompts of `batch`, with the prompt handling of greedy_decode.

  Returns (tokens [B, max_new_tokens] int32, scores [B] float32): the best beam of each example, pad_id after its
  EOS, and its score: the sum of the log-probabilities of its tokens (EOS included), divided by
  ((5 + length) / 6) ** length_penalty, length being its number of tokens counting the EOS. length_penalty 0 ranks
  by the raw sum, which favours short answers; a larger one favours longer answers.

  Each example keeps `beam_size` beams. At every step a live beam is offered every token of the vocabulary and a
  finished beam only itself, unchanged; the beam_size best candidates by normalised score are kept, so finished
  beams compete with live ones until the end. A beam is finished once it has emitted EOS (then it emits pad_id and
  its score stays fixed) or when the text buffer (model.max_text_len) is full. Beam search with a beam at least as
  large as the number of prefixes of max_new_tokens - 1 tokens is exact; with beam_size 1 it is greedy_decode.

  One prefill of the B prompts, then the cache is repeated to B * beam_size rows (beam j of example b is row
  b * beam_size + j), cross-attention keys and values of the latents included; each step is one cached decoder
  step over all beams, after which the self-attention cache is gathered to follow the surviving beams. The loop
  stops early once every beam is finished. length_penalty and eos_id may be traced; beam_size may not.
  """
  batch_size, max_len = batch['text_tokens'].shape
  if max_new_tokens < 1:
    return jnp.full((batch_size, 0), pad_id, jnp.int32), jnp.zeros((batch_size,), jnp.float32)
  if latents is None:
    _, latents = model.apply(variables, batch, method=Model.encode_av)
  latents = latents.reshape(batch_size, -1, latents.shape[-1])
  prompt_len = prompt_lengths(batch['text_loss_mask'])
  tokens = prompt_only(batch['text_tokens'], prompt_len, pad_id)
  step_vars = step_variables(variables, model.dtype)
  logits, cache = _prefill(model, step_vars, tokens, latents, prompt_len)
  k, vocab = beam_size, logits.shape[-1]
  cache = jax.tree.map(lambda leaf: jnp.repeat(leaf, k, axis=_CACHE_BATCH_AXIS), cache)
  first_row = jnp.arange(batch_size)[:, None] * k

  def select(i, beams, log_probs):
    """Step i: keeps the k best candidates of each example -> (beams, parent beam [B, k], token to feed [B, k])."""
    scores, lengths, finished, out = beams
    stop = finished | (prompt_len + i >= max_len)[:, None]
    stay = jnp.where(jnp.arange(vocab) == 0, scores[..., None], -jnp.inf)  # a stopped beam's only candidate.
    candidates = jnp.where(stop[..., None], stay, scores[..., None] + log_probs)
    ranked = _length_normalised(candidates, (lengths + ~stop)[..., None], length_penalty)
    _, best = jax.lax.top_k(ranked.reshape(batch_size, k * vocab), k)
    parent, token = best // vocab, best % vocab
    parent_stop = jnp.take_along_axis(stop, parent, axis=1)
    out = jnp.take_along_axis(out, parent[..., None], axis=1).at[:, :, i].set(jnp.where(parent_stop, pad_id, token))
    beams = (jnp.take_along_axis(candidates.reshape(batch_size, k * vocab), best, axis=1),
             jnp.take_along_axis(lengths, parent, axis=1) + ~parent_stop, parent_stop | (token == eos_id), out)
    return beams, parent, token

  def body(carry):
    i, beams, log_probs, cache = carry
    beams, parent, token = select(i, beams, log_probs)
    cache = _reorder_beams(cache, (first_row + parent).reshape(-1))
    index = jnp.repeat(jnp.minimum(prompt_len + i, max_len - 1), k)
    step_logits, cache = model.apply(step_vars, token.reshape(-1, 1), index, cache, method=Model.text_extend)
    return i + 1, beams, jax.nn.log_softmax(step_logits[:, 0]).reshape(batch_size, k, vocab), cache

  def running(carry):
    i, (_, _, finished, _), _, _ = carry
    return (i < max_new_tokens - 1) & ~jnp.all(finished)

  beams = (jnp.broadcast_to(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf), (batch_size, k)),  # one live beam.
           jnp.zeros((batch_size, k), jnp.int32), jnp.zeros((batch_size, k), bool),
           jnp.full((batch_size, k, max_new_tokens), pad_id, jnp.int32))
  log_probs = jnp.broadcast_to(jax.nn.log_softmax(logits)[:, None], (batch_size, k, vocab))
  i, beams, log_probs, _ = jax.lax.while_loop(running, body, (jnp.zeros((), jnp.int32), beams, log_probs, cache))
  scores, lengths, _, out = select(i, beams, log_probs)[0]  # the last step (or a no-op once all are finished).
  normalised = _length_normalised(scores, lengths, length_penalty)
  best = jnp.argmax(normalised, axis=1)
  rows = jnp.arange(batch_size)
  return out[rows, best], normalised[rows, best]


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
