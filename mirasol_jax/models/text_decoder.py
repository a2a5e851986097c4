"""Autoregressive text decoder: causal self-attention, cross-attention to all AV latents, MLP.

Entry points over the same parameters:
* `__call__(tokens [B, L], latents [B, S, D_av])`: teacher-forced logits [B, L, vocab] (training);
* `candidate_logits(tokens [B, K, L], latents [B, S, D_av])`: the same logits for K texts per example over that
  example's latents (scoring candidates, mirasol_jax/evaluators/scoring.py), each layer's cross-attention keys and
  values computed once per example instead of once per text;
* `prefix_candidate_logits(tokens [B, L], prompt_len [B], candidates [B, K, Lc], latents)`: the logits after each
  prompt and after each candidate token, the prompt run once for all K candidates in one masked sequence (scoring
  class names);
* `prefill(tokens, latents, cache_len)`: logits of a prompt plus a KV cache, in one pass of the Stack over all of
  `tokens`; cross-attention keys and values of the latents are computed here, once, and kept in the cache;
* `prefill_prompt(tokens [B, L], latents, prompt_len [B])`: the same cache for prompts of different lengths in a text
  buffer, and the logits after each prompt, running chunks of PREFILL_CHUNK positions up to the longest prompt
  rather than the whole buffer (what mirasol_jax.decoding uses);
* `extend(tokens [B, s], index [B], cache)`: logits of s new tokens written at per-example positions `index`.

The cache is a tuple with one dict per layer (`k`, `v` [B, cache_len, heads, head_dim] of the text positions, `ck`,
`cv` [B, T*m, heads, head_dim] of the latents), and `extend` runs the layers one after the other, each with its own
slice of the stacked parameters. Decoding is one small step per token, and on top of its arithmetic a step costs what
it copies: through the scanned Stack, every step copied each layer's weights out of the stacked parameters and each
layer's cache in and out of the stacked cache, which cost as much as the rest of the step (benchmarks/generation.py
measures it). Per-layer buffers are updated in place, and given per-layer parameters
(decoding.step_variables, once per generation) a step copies no weights.

`context_norm='tokens'` standardises each feature of the latents over the example's T*m latent tokens before the
cross-attention. Early in training from scratch the latents are mostly an offset shared by every example (positions,
backgrounds, silence) with the example's content about a quarter of their size, and the decoder settles on the answer
prior of each question; standardised, what differs between chunks reaches it at unit scale. Stateless, the same in
training and decoding, for any number of chunks; 'none' (the default) feeds the latents as they are.
Greedy or sampled decoding (`mirasol_jax.decoding`) costs one `extend` per generated token.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mirasol_jax.models import layers

Array = jax.Array
# decoding.step_variables adds the tied embedding transposed under this name: the vocabulary projection of a decoding
# step is then a matmul by a [width, vocab] matrix rather than by the transpose of the [vocab, width] embedding, which
# XLA:CPU ran 1.5x slower at every step.
TRANSPOSED_EMBEDDING = 'embedding_transposed'

# One dict per layer: self-attention 'k', 'v' and cross-attention 'ck', 'cv' buffers [B, heads, length, head_dim].
Cache = tuple[dict[str, Array], ...]
# Positions per step of TextDecoder.prefill_prompt.
PREFILL_CHUNK = 16


class TextDecoder(nn.Module):
  vocab_size: int
  max_len: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  tie_embeddings: bool = True
  context_norm: str = 'none'  # none | tokens
  dtype: Any = jnp.float32
  stack_kw: Any = None

  def setup(self):
    self.embed = nn.Embed(
        self.vocab_size, self.width, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=layers.logical_init(nn.initializers.normal(0.02), ('vocab', 'embed')))
    self.pos_embed = self.param('pos_embed', layers.logical_init(nn.initializers.normal(0.02), (None, 'embed')),
                                (self.max_len, self.width))
    self.stack = layers.Stack(self.depth, self.num_heads, self.mlp_dim, causal=True, cross_attention=True,
                              dtype=self.dtype, **(self.stack_kw or {}))
    if not self.tie_embeddings:
      self.head = layers.dense(self.vocab_size, ('embed', 'vocab'), self.dtype, 'head', use_bias=False)

  def _embed(self, tokens: Array, positions: Array) -> Array:
    return (self.embed(tokens) + self.pos_embed[positions]).astype(self.dtype)

  def _context(self, latents: Array) -> Array:
    if self.context_norm == 'tokens':
      latents = latents.astype(jnp.float32)
      mean = jnp.mean(latents, axis=1, keepdims=True)
      latents = (latents - mean) * jax.lax.rsqrt(jnp.var(latents, axis=1, keepdims=True) + 1e-6)
    elif self.context_norm != 'none':
      raise ValueError(f'model.text.context_norm={self.context_norm!r} is not none or tokens')
    return latents.astype(self.dtype)

  def _logits(self, y: Array) -> Array:
    transposed = self.variables['params'].get(TRANSPOSED_EMBEDDING) if self.tie_embeddings else None
    if transposed is not None:  # decoding.step_variables: [width, vocab], a plain matmul (the same numbers)
      logits = jnp.dot(y.astype(self.dtype), transposed.astype(self.dtype))
    else:
      logits = self.embed.attend(y) if self.tie_embeddings else self.head(y)
    return layers.constrain(logits.astype(jnp.float32), ('activation_batch', 'activation_length', 'activation_vocab'))

  def __call__(self, tokens: Array, latents: Array, deterministic: bool = True) -> Array:
    x = self._embed(tokens, jnp.arange(tokens.shape[1]))
    y, _ = self.stack(x, context=self._context(latents), deterministic=deterministic)
    return self._logits(y)

  def candidate_logits(self, tokens: Array, latents: Array) -> Array:
    """Teacher-forced logits [B, K, L, vocab] of K texts per example, tokens [B, K, L], each over its example's
    latents [B, S, D_av]: the numbers of `__call__` on the B*K rows with each example's latents repeated K times.

    That repetition made every layer project keys and values of the same S latents K times, which for short texts
    (answer options, class names: a few tokens after the prompt) and S = T*m = 512 latents cost more than the rest
    of the decoder. Here the B*K rows go through the Stack with the B examples' latents as the context, and each
    layer's cross-attention takes an example's K rows of queries together against its keys and values, projected
    once (layers.Block). benchmarks/scoring.py measures it: `small`'s decoder, 2 examples, 44 candidates, 512
    latents, on a 2-core CPU, 5.5x faster than the repeated latents, with a quarter of the temporary memory.
    prefix_candidate_logits goes further for short candidates: the prompt is run once for all K.
    """
    batch, k, length = tokens.shape
    return self(tokens.reshape(batch * k, length), latents).reshape(batch, k, length, -1)

  def prefix_candidate_logits(self, tokens: Array, prompt_len: Array, candidates: Array,
                              latents: Array) -> tuple[Array, Array]:
    """Teacher-forced logits of K candidate texts after each example's prompt, the prompt run once for all K.

    tokens [B, L] (the first prompt_len [B] of them the prompt), candidates [B, K, Lc], latents [B, S, D_av] ->
    (first [B, vocab]: the logits after the prompt, which score every candidate's first token; rest [B, K, Lc,
    vocab]: after each candidate's token j, which score its token j + 1 or its EOS). The numbers of
    `candidate_logits` on the texts `prompt, candidate, EOS` (scoring.candidate_tokens), where the K rows repeat the
    prompt and run the whole buffer of L positions each: here one sequence per example holds the L positions of
    the buffer, then the K candidates' Lc tokens one after the other, each at the positions it would have after the
    prompt (prompt_len + j), under a mask by which a candidate's token sees the prompt (positions before
    prompt_len) and the candidate's own earlier tokens, nothing else. So the decoder runs L + K*Lc positions
    rather than K*L, and the vocabulary projection is made at 1 + K*Lc of them. Positions past the buffer (a
    candidate cut at its end) hold whatever the last position embedding gives: they score nothing.
    """
    batch, length = tokens.shape
    k, lc = candidates.shape[1:]
    slot = jnp.arange(lc)
    candidate_positions = jnp.minimum(prompt_len[:, None] + slot[None, :], self.max_len - 1)  # [B, Lc]
    positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(length), (batch, length)),
                                 jnp.tile(candidate_positions, (1, k))], axis=1)  # [B, L + K*Lc]
    x = self._embed(jnp.concatenate([tokens, candidates.reshape(batch, k * lc)], axis=1), positions)
    # Which text a position belongs to (-1 the prompt's buffer, else the candidate's index) and its place in it.
    owner = jnp.concatenate([jnp.full((length,), -1), jnp.repeat(jnp.arange(k), lc)])
    place = jnp.concatenate([jnp.arange(length), jnp.tile(slot, k)])
    own_past = (owner[:, None] == owner[None, :]) & (place[None, :] <= place[:, None])  # causal within a text
    sees_prompt = (owner[:, None] >= 0) & (owner[None, :] < 0)  # a candidate's token, a position of the buffer ...
    in_prompt = place[None, None, :] < prompt_len[:, None, None]  # ... before the example's prompt ends
    mask = (own_past[None] | (sees_prompt[None] & in_prompt))[:, None]  # [B, 1, N, N]
    y, _ = self.stack(x, self_mask=mask, context=self._context(latents), deterministic=True)
    last = jnp.take_along_axis(y, (prompt_len - 1)[:, None, None], axis=1)  # [B, 1, D]: the prompt's last position
    first = self._logits(last)[:, 0]
    rest = self._logits(y[:, length:]).reshape(batch, k, lc, -1)
    return first, rest

  def prefill(self, tokens: Array, latents: Array, cache_len: int) -> tuple[Array, Cache]:
    if cache_len > self.max_len:
      raise ValueError(f'decoding needs {cache_len} text positions but model.max_text_len is {self.max_len}')
    stacked = layers.init_stack_cache(self.depth, self.num_heads, self.width, tokens.shape[0], cache_len,
                                      latents.shape[1], self.dtype)
    x = self._embed(tokens, jnp.arange(tokens.shape[1]))
    index = jnp.zeros((tokens.shape[0],), jnp.int32)
    y, stacked = self.stack(x, cache=stacked, context=self._context(latents), index=index)
    cache = tuple({name: buffer[i] for name, buffer in stacked.items()} for i in range(self.depth))
    return self._logits(y), cache

  def _layer_steps(self):
    """(run, final_norm): run(x, cache, index, context=None) -> (x, cache) applies the layers one after the other,
    each in cached mode with its own buffers and its own slice of the Stack's parameters; final_norm(x) is the Stack's
    closing LayerNorm. Pure functions of arrays, so they may run inside lax loops."""
    # The Stack's parameters as they are stored: a leading `layers` axis when scanned, else one entry per layer
    # (decoding.step_variables splits them so, once, before its loop).
    params = nn.unbox(self.stack.variables['params'])
    stack_kw = self.stack_kw or {}
    # Unbound modules (parent=None) applied to those parameters: the Stack's Block and final LayerNorm.
    block = layers.Block(self.num_heads, self.mlp_dim, causal=True, cross_attention=True, dtype=self.dtype,
                         attention_impl=stack_kw.get('attention_impl'), parent=None)
    norm = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32, parent=None)  # as layers.layer_norm
    if 'layers' in params:
      per_layer = [jax.tree.map(lambda p, i=i: p[i], params['layers']) for i in range(self.depth)]
    else:
      per_layer = [params[f'layers_{i}'] for i in range(self.depth)]

    def run(x: Array, cache: Cache, index: Array, context=None) -> tuple[Array, Cache]:
      new_cache = []
      for layer_params, layer_cache in zip(per_layer, cache):
        x, layer_cache = block.apply({'params': layer_params}, x.astype(self.dtype), layer_cache, None, context,
                                     None, index, True)
        new_cache.append(layer_cache)
      return x, tuple(new_cache)

    return run, lambda x: norm.apply({'params': params['ln_final']}, x)

  def extend(self, tokens: Array, index: Array, cache: Cache) -> tuple[Array, Cache]:
    positions = index[:, None] + jnp.arange(tokens.shape[1])[None, :]
    run, final_norm = self._layer_steps()
    x, cache = run(self._embed(tokens, positions), cache, index)
    return self._logits(final_norm(x)), cache

  def prefill_prompt(self, tokens: Array, latents: Array, prompt_len: Array,
                     chunk: int = PREFILL_CHUNK) -> tuple[Array, Cache]:
    """Cache of the prompts tokens[b, :prompt_len[b]] and the logits [B, vocab] after each (at prompt_len - 1).

    Where `prefill` runs the whole text buffer [B, L], this runs the cached layers over chunks of `chunk` positions
    from position 0 until every prompt is in the cache (a chunk sees the cache before it, so the result is the
    same): a 16-token prompt in a 64-position buffer costs one chunk instead of a pass over 64 positions, and the
    vocabulary projection is made for one position instead of L. Cross-attention keys and values of the latents are
    computed in the first chunk, once. The cache holds L positions; those from prompt_len on hold whatever the
    buffer had there (masked out, then overwritten by `extend`).
    """
    batch_size, length = tokens.shape
    if length > self.max_len:
      raise ValueError(f'decoding needs {length} text positions but model.max_text_len is {self.max_len}')
    chunk = min(chunk, length)
    # One layer's buffers of layers.init_stack_cache, for each layer.
    cache = tuple(layers.init_stack_cache(1, self.num_heads, self.width, batch_size, length, latents.shape[1],
                                          self.dtype) for _ in range(self.depth))
    cache = tuple({name: buffer[0] for name, buffer in layer.items()} for layer in cache)
    x_all = self._embed(tokens, jnp.arange(length))
    last = (prompt_len - 1) % length  # the position whose logits pick the first new token
    run, final_norm = self._layer_steps()

    def one_chunk(start, cache, picked, context=None):
      """Runs positions start..start+chunk-1 and keeps each example's hidden state at `last` if it is among them."""
      x = jax.lax.dynamic_slice_in_dim(x_all, start, chunk, axis=1)
      x, cache = run(x, cache, jnp.full((batch_size,), start, jnp.int32), context)
      offset = last - start
      here = jnp.take_along_axis(x, jnp.clip(offset, 0, chunk - 1)[:, None, None], axis=1)[:, 0]
      return cache, jnp.where(((offset >= 0) & (offset < chunk))[:, None], here, picked)

    picked = jnp.zeros((batch_size, self.width), self.dtype)
    cache, picked = one_chunk(0, cache, picked, self._context(latents))

    def more(carry):
      return carry[0] * chunk <= jnp.max(last)

    def body(carry):
      j, cache, picked = carry
      # The last chunk ends at the buffer's end, overlapping the one before: positions written twice get the same
      # keys and values.
      cache, picked = one_chunk(jnp.minimum(j * chunk, length - chunk), cache, picked)
      return j + 1, cache, picked

    _, cache, picked = jax.lax.while_loop(more, body, (jnp.ones((), jnp.int32), cache, picked))
    # [B, 1, width] through the logits, whose sharding constraint names (batch, length, vocab).
    return self._logits(final_norm(picked[:, None]))[:, 0], cache
