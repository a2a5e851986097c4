"""Autoregressive text decoder: causal self-attention, cross-attention to all AV latents, MLP.

Three entry points over the same parameters:
* `__call__(tokens [B, L], latents [B, S, D_av])`: teacher-forced logits [B, L, vocab] (training, scoring);
* `prefill(tokens, latents, cache_len)`: logits of a prompt plus a KV cache; cross-attention keys and values of the
  latents are computed here, once, and kept in the cache;
* `extend(tokens [B, s], index [B], cache)`: logits of s new tokens written at per-example positions `index`.

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
    logits = self.embed.attend(y) if self.tie_embeddings else self.head(y)
    return layers.constrain(logits.astype(jnp.float32), ('activation_batch', 'activation_length', 'activation_vocab'))

  def __call__(self, tokens: Array, latents: Array, deterministic: bool = True) -> Array:
    x = self._embed(tokens, jnp.arange(tokens.shape[1]))
    y, _ = self.stack(x, context=self._context(latents), deterministic=deterministic)
    return self._logits(y)

  def init_cache(self, batch_size: int, cache_len: int, context_len: int) -> dict[str, Array]:
    return layers.init_stack_cache(self.depth, self.num_heads, self.width, batch_size, cache_len, context_len,
                                   self.dtype)

  def prefill(self, tokens: Array, latents: Array, cache_len: int) -> tuple[Array, dict[str, Array]]:
    if cache_len > self.max_len:
      raise ValueError(f'decoding needs {cache_len} text positions but model.max_text_len is {self.max_len}')
    cache = self.init_cache(tokens.shape[0], cache_len, latents.shape[1])
    x = self._embed(tokens, jnp.arange(tokens.shape[1]))
    index = jnp.zeros((tokens.shape[0],), jnp.int32)
    y, cache = self.stack(x, cache=cache, context=self._context(latents), index=index)
    return self._logits(y), cache

  def extend(self, tokens: Array, index: Array, cache: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
    positions = index[:, None] + jnp.arange(tokens.shape[1])[None, :]
    y, cache = self.stack(self._embed(tokens, positions), cache=cache, index=index)
    return self._logits(y), cache
