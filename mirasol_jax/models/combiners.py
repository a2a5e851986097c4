"""Combiners: fuse one chunk's video and audio tokens u_t [B, n, D] into m compact tokens x_t [B, m, D].

All three share one interface, so the Model and the streaming path never branch on the kind:

* `__call__(tokens [B, T, n, D], mask [B, T, n], deterministic) -> [B, T, m, D]` over all chunks;
* `init_state(batch_size)` and `step(tokens_t, mask_t, state, deterministic) -> (x_t, state)` for one chunk.

`mask` is False on tokens that carry nothing (the audio tokens of a video without sound); they are never attended to
and never read. Only the TTM combiner has state (its memory); it is zero at the start of every video and each example
of a batch keeps its own.
"""
from __future__ import annotations

from typing import Any

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
  """
  num_tokens: int
  hidden_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, valid: Array) -> Array:
    logits = layers.layer_norm(self.dtype, 'ln')(x)
    logits = nn.gelu(layers.dense(self.hidden_dim, ('embed', 'mlp'), self.dtype, 'fc1')(logits))
    logits = layers.dense(self.num_tokens, ('mlp', None), self.dtype, 'fc2')(logits).astype(jnp.float32)
    logits = jnp.where(valid[..., None], logits, _BIG_NEG)
    weights = jax.nn.softmax(logits, axis=1)  # [B, n, K]
    return jnp.einsum('bnk,bnd->bkd', weights.astype(self.dtype), x.astype(self.dtype))


class TTMCell(nn.Module):
  """One Token Turing Machine step: read m tokens from [memory; u_t], process them, write a new memory.

  read:    z   = TokenLearner_m([M + P; u_t])
  process: x_t = Transformer(z)
  write:   M'  = TokenLearner_M([M + P; x_t; u_t])
  P is a learned embedding that marks each memory slot, so reads can tell memory from input.
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

  @nn.compact
  def __call__(self, memory, tokens, mask, deterministic=True):
    batch = tokens.shape[0]
    memory_pos = _learned_tokens(self, 'memory_pos', self.memory_tokens, self.width)
    memory = (memory + memory_pos).astype(self.dtype)
    tokens = tokens.astype(self.dtype)
    memory_valid = jnp.ones((batch, self.memory_tokens), bool)
    z = TokenLearner(self.tokens_per_chunk, self.tokenlearner_hidden, self.dtype, name='read')(
        jnp.concatenate([memory, tokens], 1), jnp.concatenate([memory_valid, mask], 1))
    x, _ = layers.Stack(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype, **(self.stack_kw or {}),
                        name='process')(z, deterministic=deterministic)
    new_memory = TokenLearner(self.memory_tokens, self.tokenlearner_hidden, self.dtype, name='write')(
        jnp.concatenate([memory, x, tokens], 1),
        jnp.concatenate([memory_valid, jnp.ones((batch, self.tokens_per_chunk), bool), mask], 1))
    return new_memory.astype(self.dtype), x


class TTMCombiner(nn.Module):
  """Token Turing Machine combiner: a token memory carried across the chunks of a video (Ryoo et al., CVPR 2023)."""
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
    new_memory, x = self.cell(state, tokens, mask, deterministic)
    return x, new_memory

  def __call__(self, tokens: Array, mask: Array, deterministic: bool = True) -> Array:
    def body(cell, memory, chunk):
      return cell(memory, chunk[0], chunk[1], deterministic)

    # scan_layers=False unrolls this loop too, so that XLA's cost analysis (which counts a loop body once) sees it.
    unroll = not (self.stack_kw or {}).get('scan_layers', True)
    scan = nn.scan(body, variable_broadcast='params', split_rngs={'params': False, 'dropout': True},
                   in_axes=1, out_axes=1, unroll=unroll)
    _, x = scan(self.cell, self.init_state(tokens.shape[0]), (tokens, mask))
    return x


COMBINERS = {'transformer': TransformerCombiner, 'ttm': TTMCombiner, 'qformer': QFormerCombiner}
