"""Per-chunk encoders of the time-aligned modalities: a sparse-tube ViT for video and a spectrogram ViT for audio.

Both run on one chunk at a time ([B*T, ...] with chunks folded into the batch), so their parameters do not depend on
the number of chunks. Tube and patch geometry live in small pure functions that the config validation and the
analytic FLOP count reuse.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mirasol_jax.models import layers

Array = jax.Array
Tube = tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]  # (kernel, stride, offset) in t, y, x.


def tube_grid(tube: Tube, chunk_shape: Sequence[int]) -> tuple[int, int, int]:
  """Number of tube positions along (t, y, x) in a chunk of shape (k, H, W); 0 along an axis the tube overruns."""
  kernel, stride, offset = tube
  return tuple(max(0, (size - o - kk) // s + 1) for size, kk, s, o in zip(chunk_shape, kernel, stride, offset))


def tube_centres(tube: Tube, chunk_shape: Sequence[int]) -> np.ndarray:
  """[n, 3] (t, y, x) centres of every position of the tube, in frames and pixels, in raster order."""
  kernel, stride, offset = tube
  axes = [o + s * np.arange(n) + (kk - 1) / 2
          for n, kk, s, o in zip(tube_grid(tube, chunk_shape), kernel, stride, offset)]
  return np.stack(np.meshgrid(*axes, indexing='ij'), axis=-1).reshape(-1, 3)


def num_video_tokens(tubes: Sequence[Tube], chunk_shape: Sequence[int]) -> int:
  return int(sum(np.prod(tube_grid(t, chunk_shape)) for t in tubes))


def num_audio_tokens(frames_per_chunk: int, mel_bins: int, patch_size: Sequence[int]) -> int:
  return (frames_per_chunk // patch_size[0]) * (mel_bins // patch_size[1])


class VideoEncoder(nn.Module):
  """TubeViT-style encoder of one chunk: [B, k, H, W, 3] uint8 -> [B, f, width].

  Each tube (kernel, stride, offset) is a strided 3D convolution over the chunk shifted by its offset; a tube with
  kernel length 1 is a 2D patch on a few frames. Its tokens get a fixed sin-cos embedding of their centre in
  (t, y, x), and the tokens of all tubes go through one ViT.
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  tubes: Sequence[Tube]
  dtype: Any = jnp.float32
  stack_kw: Any = None  # scan_layers, remat_policy, dropout_rate, attention_impl

  @nn.compact
  def __call__(self, video: Array, deterministic: bool = True) -> Array:
    batch, chunk_shape = video.shape[0], video.shape[1:4]
    x = video.astype(self.dtype) / 127.5 - 1.0
    tokens = []
    for i, tube in enumerate(self.tubes):
      kernel, stride, offset = (tuple(int(v) for v in part) for part in tube)
      y = nn.Conv(
          self.width, kernel, strides=stride, padding='VALID', dtype=self.dtype, param_dtype=jnp.float32,
          name=f'tube_{i}',
          kernel_init=layers.logical_init(nn.initializers.lecun_normal(),
                                          ('conv_t', 'conv_h', 'conv_w', 'conv_in', 'embed')),
          bias_init=layers.logical_init(nn.initializers.zeros_init(), ('embed',)),
      )(x[:, offset[0]:, offset[1]:, offset[2]:])
      pos = layers.sincos_nd(tube_centres((kernel, stride, offset), chunk_shape), self.width)
      tokens.append(y.reshape(batch, -1, self.width) + pos.astype(self.dtype))
    x = jnp.concatenate(tokens, axis=1)
    x, _ = layers.Stack(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype, **(self.stack_kw or {}),
                        name='vit')(x, deterministic=deterministic)
    return x


class AudioEncoder(nn.Module):
  """Spectrogram ViT over one chunk: [B, frames, mel_bins] log-mel -> [B, s, width].

  The log-mel is standardised with fixed statistics from config, cut into non-overlapping patches (time x mel),
  embedded linearly, given a 2D sin-cos position embedding, and encoded by a ViT.
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: Sequence[int] = (16, 16)
  input_mean: float = 0.0
  input_std: float = 1.0
  dtype: Any = jnp.float32
  stack_kw: Any = None

  @nn.compact
  def __call__(self, spectrogram: Array, deterministic: bool = True) -> Array:
    batch, frames, bins = spectrogram.shape
    pf, pm = (int(p) for p in self.patch_size)
    x = ((spectrogram - self.input_mean) / self.input_std).astype(self.dtype)[..., None]
    x = nn.Conv(
        self.width, (pf, pm), strides=(pf, pm), padding='VALID', dtype=self.dtype, param_dtype=jnp.float32,
        name='patch_embed',
        kernel_init=layers.logical_init(nn.initializers.lecun_normal(), ('conv_h', 'conv_w', 'conv_in', 'embed')),
        bias_init=layers.logical_init(nn.initializers.zeros_init(), ('embed',)),
    )(x)
    grid = np.stack(np.meshgrid(np.arange(frames // pf), np.arange(bins // pm), indexing='ij'), -1).reshape(-1, 2)
    x = x.reshape(batch, -1, self.width) + layers.sincos_nd(grid.astype(np.float32), self.width).astype(self.dtype)
    x, _ = layers.Stack(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype, **(self.stack_kw or {}),
                        name='vit')(x, deterministic=deterministic)
    return x
