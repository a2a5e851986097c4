"""The flat baseline of the AV part: one Transformer over every video and audio token of the clip.

`config.model.av_mode='flat'` puts this module where Mirasol has its Combiner and block-causal AV Transformer:
u [B, T, n, D] (each chunk's projected video and audio tokens, exactly Mirasol's Combiner input) -> full attention
over all T*n tokens -> h [B, T, n, D], which the same text decoder cross-attends to, all T*n of them. Width, depth,
heads and MLP size are the AV Transformer's (`model.width`, `model.av`), so the two models differ only in what the
paper changes: no compression of a chunk's n tokens to m, and no partition of the attention into chunks. It is the
design to measure Mirasol against: its attention costs (T*n)^2 pairs, against Mirasol's m^2 T(T+1)/2, so its cost
and memory grow quadratically with the number of frames where Mirasol's grow about linearly
(`benchmarks/video_length.py`).

Positions: each token keeps the position its encoder gave it inside its chunk (tube centres, spectrogram patches)
and the modality embedding; this module adds the fixed sin-cos embedding of the chunk index, as the AV Transformer
does. No parameter depends on T, so the parameter count is the same at any number of frames. Audio tokens of a clip
without sound are masked out as keys, as in the Combiner. Every chunk sees every other, so the next-chunk losses
would see their targets: the Model refuses them with this mode, and there is no chunk-by-chunk path.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mirasol_jax.models import layers

Array = jax.Array


class FlatTransformer(nn.Module):
  """[B, T, n, D] chunk tokens and their validity [B, T, n] -> [B, T, n, D], full attention over all T*n."""
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  stack_kw: Any = None

  @nn.compact
  def __call__(self, tokens: Array, valid: Array, deterministic: bool = True) -> Array:
    batch, chunks, n, width = tokens.shape
    chunk_pos = layers.sincos_1d(jnp.arange(chunks), width)
    x = (tokens + chunk_pos[None, :, None, :]).reshape(batch, chunks * n, width).astype(self.dtype)
    mask = layers.key_padding_mask(valid.reshape(batch, chunks * n))
    h, _ = layers.Stack(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype, **(self.stack_kw or {}),
                        name='stack')(x, self_mask=mask, deterministic=deterministic)
    return h.reshape(batch, chunks, n, width)
