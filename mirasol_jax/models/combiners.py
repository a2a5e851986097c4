"""Combiners: fuse one chunk's video and audio tokens u_t [B, n, D] into m compact tokens x_t [B, m, D].

All three share one interface, so the Model and the streaming path never branch on the kind:

* `__call__(tokens [B, T, n, D], mask [B, T, n], deterministic) -> [B, T, m, D]` over all chunks;
* `init_state(batch_size)` and `step(tokens_t, mask_t, state, deterministic) -> (x_t, state)` for one chunk.

`mask` is False on tokens that carry nothing (the audio tokens of a video without sound); they are never attended to
and never read. Only the TTM combiner has state (its memory); it is zero at the start of every video and each example
of a batch keeps its own.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mirasol_jax.models import layers

Array = jax.Array
_BIG_NEG = -1e9


def _learned_tokens(module: nn.Module, name: str, count: int, width: int) -> Array:
  return module.param(name, layers.logical_init(nn.initializers.normal(0.02), (None, 'embed')), (count, width))


class _PerChunkCombiner(nn.Module):
  """Shared plumbing of stateless combiners: all chunks are folded into the batch and combined at once."""
  tokens_per_chunk: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  stack_kw: Any = None

  def init_state(self, batch_size: int) -> dict:
    del batch_size
    return {}

  def __call__(self, tokens: Array, mask: Array, deterministic: bool = True) -> Array:
    batch, chunks, n, width = tokens.shape
    x, _ = self.step(tokens.reshape(batch * chunks, n, width), mask.reshape(batch * chunks, n), {}, deterministic)
    return x.reshape(batch, chunks, -1, width)


class TransformerCombiner(_PerChunkCombiner):
  """Appends m learned summary tokens to u_t, runs a Transformer over all n + m tokens, keeps the last m."""

  def setup(self):
    self.summary = _learned_tokens(self, 'summary_tokens', self.tokens_per_chunk, self.width)
    self.stack = layers.Stack(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype, **(self.stack_kw or {}))

  def step(self, tokens, mask, state, deterministic=True):
    batch, m = tokens.shape[0], self.tokens_per_chunk
    summary = jnp.broadcast_to(self.summary.astype(self.dtype), (batch, m, self.width))
    x = jnp.concatenate([tokens.astype(self.dtype), summary], axis=1)
    valid = jnp.concatenate([mask, jnp.ones((batch, m), bool)], axis=1)
    y, _ = self.stack(x, self_mask=layers.key_padding_mask(valid), deterministic=deterministic)
    return y[:, -m:], state


class QFormerCombiner(_PerChunkCombiner):
  """m learned queries; each layer: self-attention among the queries, cross-attention to u_t, MLP."""

  def setup(self):
    self.queries = _learned_tokens(self, 'queries', self.tokens_per_chunk, self.width)
    self.stack = layers.Stack(self.depth, self.num_heads, self.mlp_dim, cross_attention=True, dtype=self.dtype,
                              **(self.stack_kw or {}))

  def step(self, tokens, mask, state, deterministic=True):
    batch = tokens.shape[0]
    queries = jnp.broadcast_to(self.queries.astype(self.dtype), (batch, self.tokens_per_chunk, self.width))
    y, _ = self.stack(queries, context=tokens.astype(self.dtype), context_mask=layers.key_padding_mask(mask),
                      deterministic=deterministic)
    return y, state


class TokenLearner(nn.Module):
  """[B, n, D] tokens (+ [B, n] validity) -> [B, K, D]: K learned softmax-weighted sums over the tokens.

  LayerNorm, an MLP to K weight maps over the tokens, softmax over the token axis (invalid tokens get weight 0), and
  K weighted sums of the input tokens (TokenLearner, Ryoo et al. 2021, as used by Token Turing Machines).

  The softmax runs over the token axis, so a pool over [a; b] can be taken in two parts: `partial_pool(b)` (the
  running maximum of each map's logits, the sum of its exponentials and the weighted sum of b under them, as in
  online softmax) and then `__call__(a, prior=that)`, which merges them; the same result to rounding. The TTM
  Combiner pools every chunk's own tokens so, all chunks at once, outside its loop over chunks.
  """
  num_tokens: int
  hidden_dim: int
  dtype: Any = jnp.float32

  def setup(self):
    self.ln = layers.layer_norm(self.dtype)
    self.fc1 = layers.dense(self.hidden_dim, ('embed', 'mlp'), self.dtype, None)
    self.fc2 = layers.dense(self.num_tokens, ('mlp', None), self.dtype, None)

  def partial_pool(self, x: Array, valid: Array) -> tuple[Array, Array, Array]:
    """[..., n, D] tokens, [..., n] validity -> (max [..., K], sum of exp [..., K], weighted sum [..., K, D]) of the
    K maps' logits over the n tokens, the exponentials taken against the max (float32 but the weighted sum)."""
    logits = self.fc2(nn.gelu(self.fc1(self.ln(x)))).astype(jnp.float32)
    logits = jnp.where(valid[..., None], logits, _BIG_NEG)  # [..., n, K]
    top = jnp.max(logits, axis=-2)
    weights = jnp.exp(logits - top[..., None, :])
    pooled = jnp.einsum('...nk,...nd->...kd', weights.astype(self.dtype), x.astype(self.dtype))
    return top, jnp.sum(weights, axis=-2), pooled

  def __call__(self, x: Array, valid: Array, prior: Optional[tuple[Array, Array, Array]] = None) -> Array:
    """The K pooled tokens of x, or of [x; the tokens `prior` (partial_pool's output) was taken over]."""
    top, total, pooled = self.partial_pool(x, valid)
    if prior is not None:
      prior_top, prior_total, prior_pooled = prior
      new_top = jnp.maximum(top, prior_top)
      scale, prior_scale = jnp.exp(top - new_top), jnp.exp(prior_top - new_top)
      total = total * scale + prior_total * prior_scale
      pooled = (pooled.astype(jnp.float32) * scale[..., None] +
                prior_pooled.astype(jnp.float32) * prior_scale[..., None])
    return (pooled / total[..., None]).astype(self.dtype)


class TTMCell(nn.Module):
  """One Token Turing Machine step: read m tokens from [memory; u_t], process them, write a new memory.

  read:    z   = TokenLearner_m([M + P; u_t])
  process: x_t = Transformer(z)
  write:   M'  = TokenLearner_M([M + P; x_t; u_t])
  P is a learned embedding that marks each memory slot, so reads can tell memory from input.

  Both TokenLearners pool over the chunk's tokens u_t, whose part of the pools does not depend on the memory:
  `chunk_pools` takes it (for any number of chunks at once), and `__call__` adds the memory's and x_t's parts.
  """
  tokens_per_chunk: int
  memory_tokens: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  tokenlearner_hidden: int
  dtype: Any = jnp.float32
  stack_kw: Any = None

  def setup(self):
    self.memory_pos = _learned_tokens(self, 'memory_pos', self.memory_tokens, self.width)
    self.read = TokenLearner(self.tokens_per_chunk, self.tokenlearner_hidden, self.dtype)
    self.process = layers.Stack(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype, **(self.stack_kw or {}))
    self.write = TokenLearner(self.memory_tokens, self.tokenlearner_hidden, self.dtype)

  def chunk_pools(self, tokens: Array, mask: Array) -> tuple[Any, Any]:
    """tokens [..., n, D], mask [..., n] -> the read and write TokenLearners' partial pools over them."""
    tokens = tokens.astype(self.dtype)
    return self.read.partial_pool(tokens, mask), self.write.partial_pool(tokens, mask)

  def __call__(self, memory, pools, deterministic=True):
    """memory [B, M, D], `pools` the chunk's chunk_pools -> (new memory [B, M, D], x_t [B, m, D])."""
    read_pool, write_pool = pools
    batch = memory.shape[0]
    memory = (memory + self.memory_pos).astype(self.dtype)
    z = self.read(memory, jnp.ones((batch, self.memory_tokens), bool), prior=read_pool)
    x, _ = self.process(z, deterministic=deterministic)
    own = jnp.concatenate([memory, x], 1)
    new_memory = self.write(own, jnp.ones(own.shape[:2], bool), prior=write_pool)
    return new_memory.astype(self.dtype), x


class TTMCombiner(nn.Module):
  """Token Turing Machine combiner: a token memory carried across the chunks of a video (Ryoo et al., CVPR 2023).

  The TokenLearners' work on the chunks' own tokens (most of their tokens) runs for all chunks at once before the
  loop over chunks, which carries only what depends on the memory."""
  tokens_per_chunk: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  memory_tokens: int = 64
  tokenlearner_hidden: int = 256
  dtype: Any = jnp.float32
  stack_kw: Any = None

  def setup(self):
    self.cell = TTMCell(self.tokens_per_chunk, self.memory_tokens, self.width, self.depth, self.num_heads,
                        self.mlp_dim, self.tokenlearner_hidden, self.dtype, self.stack_kw)

  def init_state(self, batch_size: int) -> Array:
    return jnp.zeros((batch_size, self.memory_tokens, self.width), self.dtype)

  def step(self, tokens, mask, state, deterministic=True):
    new_memory, x = self.cell(state, self.cell.chunk_pools(tokens, mask), deterministic)
    return x, new_memory

  def __call__(self, tokens: Array, mask: Array, deterministic: bool = True) -> Array:
    def body(cell, memory, pools):
      return cell(memory, pools, deterministic)

    pools = self.cell.chunk_pools(tokens, mask)  # every leaf [B, T, ...]
    # scan_layers=False unrolls this loop too, so that XLA's cost analysis (which counts a loop body once) sees it.
    unroll = not (self.stack_kw or {}).get('scan_layers', True)
    scan = nn.scan(body, variable_broadcast='params', split_rngs={'params': False, 'dropout': True},
                   in_axes=1, out_axes=1, unroll=unroll)
    _, x = scan(self.cell, self.init_state(tokens.shape[0]), pools)
    return x


COMBINERS = {'transformer': TransformerCombiner, 'ttm': TTMCombiner, 'qformer': QFormerCombiner}
