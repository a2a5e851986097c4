"""The autoregressive AV Transformer over the combiner tokens of all chunks: [B, T, m, D] -> [B, T, m, D].

Block-causal: a token of chunk t attends to every token of chunks <= t, so latents of chunk t never depend on later
chunks. Positions are a fixed sin-cos embedding of the chunk index plus a learned embedding of the slot inside the
chunk; neither has a parameter that depends on T, so a model trained on 128 frames runs on 512.
In training a random fraction `mask_ratio` of the combiner tokens is replaced by a learned mask token.
`step` runs one chunk against a KV cache of the earlier ones and gives the same latents as the full pass.
The block-causal attention runs in `query_groups` runs of chunks, each against the keys up to its own last chunk
(layers.block_causal_attention), which skips most of the pairs the mask forbids.
`block_causal=False` lets every chunk see every other (an ablation of the paper's design): latents then depend on
later chunks, so the next-chunk losses see their own targets and there is no chunk-by-chunk `step`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mirasol_jax.models import layers

Array = jax.Array


class AVTransformer(nn.Module):
  tokens_per_chunk: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  mask_ratio: float = 0.0
  block_causal: bool = True
  query_groups: int = 8
  dtype: Any = jnp.float32
  stack_kw: Any = None

  def setup(self):
    self.slot_embed = self.param('slot_embed', layers.logical_init(nn.initializers.normal(0.02), (None, 'embed')),
                                 (self.tokens_per_chunk, self.width))
    self.mask_token = self.param('mask_token', layers.logical_init(nn.initializers.normal(0.02), ('embed',)),
                                 (self.width,))
    self.stack = layers.Stack(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype,
                              chunk_tokens=self.tokens_per_chunk if self.block_causal else None,
                              query_groups=self.query_groups, **(self.stack_kw or {}))

  def _embed(self, x: Array, first_chunk) -> Array:
    """x [B, t, m, D] holding chunks first_chunk .. first_chunk + t - 1 -> [B, t*m, D] with positions added."""
    batch, chunks, m, width = x.shape
    chunk_pos = layers.sincos_1d(first_chunk + jnp.arange(chunks), width)
    x = x + chunk_pos[None, :, None, :] + self.slot_embed[None, None]
    return x.reshape(batch, chunks * m, width).astype(self.dtype)

  def __call__(self, x: Array, deterministic: bool = True, mask_tokens: bool = False) -> Array:
    batch, chunks, m, width = x.shape
    if mask_tokens and self.mask_ratio > 0.0:
      dropped = jax.random.bernoulli(self.make_rng('dropout'), self.mask_ratio, (batch, chunks, m))
      x = jnp.where(dropped[..., None], self.mask_token.astype(x.dtype), x)
    h, _ = self.stack(self._embed(x, 0), deterministic=deterministic)
    return h.reshape(batch, chunks, m, width)

  def init_cache(self, batch_size: int, num_chunks: int) -> dict[str, Array]:
    return layers.init_stack_cache(self.depth, self.num_heads, self.width, batch_size,
                                   num_chunks * self.tokens_per_chunk, dtype=self.dtype)

  def step(self, x_t: Array, chunk_index: Array, cache: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
    """x_t [B, m, D] of chunk `chunk_index` (scalar) -> (h_t [B, m, D], cache with this chunk appended)."""
    if not self.block_causal:
      raise ValueError('model.av.block_causal=False: every chunk attends to later chunks, so latents cannot be '
                       'computed chunk by chunk')
    batch = x_t.shape[0]
    index = jnp.full((batch,), chunk_index * self.tokens_per_chunk, jnp.int32)
    h, cache = self.stack(self._embed(x_t[:, None], chunk_index), cache=cache, index=index)
    return h, cache
