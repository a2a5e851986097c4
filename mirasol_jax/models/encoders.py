"""Per-chunk encoders of the time-aligned modalities: a sparse-tube ViT for video and a spectrogram ViT for audio.

Both run on one chunk at a time ([B*T, ...] with chunks folded into the batch), so their parameters do not depend on
the number of chunks. Tube and patch geometry live in small pure functions that the config validation and the
analytic FLOP count reuse.

Tubes and audio patches are embedded by `PatchEmbed`, whose parameters are those of a strided `nn.Conv` (`kernel`
[*window, in, D], `bias` [D]). Where the stride is at least the window along every axis (patches that tile the
input, or TubeViT's sparse tubes with gaps between positions: every preset's tubes) it cuts the input into patches
and applies one 2-D matmul [tokens, window*in] x [window*in, D] instead of the convolution: the same tokens in the
same raster order, but on CPU the convolution's weight gradient is many times slower than the matmul's, which is
the fast path of XLA:CPU. Only overlapping tubes keep the convolution.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

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


def patch_tokens(x: Array, window: Sequence[int], stride: Optional[Sequence[int]] = None) -> Array:
  """[B, *spatial, C] -> [B, n, prod(window) * C]: the windows of a VALID convolution with `stride` (default: the
  window; at least the window along every axis, so that windows do not overlap), in raster order over the grid of
  positions, each flattened in (window axes..., C) order. Pixels no window covers (gaps, a remainder) are dropped.

  Each axis of size L becomes (n, stride) after cropping (or zero-padding: only pixels no window reads) to
  n * stride, and the first `window` of each stride are kept; a transpose brings the grid axes before the window's.
  """
  stride = tuple(window) if stride is None else tuple(stride)
  if any(s < w for w, s in zip(window, stride)):
    raise ValueError(f'patch_tokens needs stride >= window along every axis, got window {window}, stride {stride}')
  batch, spatial, channels = x.shape[0], x.shape[1:-1], x.shape[-1]
  grid = [max(0, (size - w) // s + 1) for size, w, s in zip(spatial, window, stride)]
  x = x[(slice(None), *(slice(0, g * s) for g, s in zip(grid, stride)))]
  pad = [g * s - size for g, s, size in zip(grid, stride, x.shape[1:-1])]
  if any(pad):
    x = jnp.pad(x, [(0, 0), *((0, p) for p in pad), (0, 0)])
  x = x.reshape(batch, *(d for g, s in zip(grid, stride) for d in (g, s)), channels)
  x = x[(slice(None), *(i for w in window for i in (slice(None), slice(0, w))))]
  rank = len(window)
  x = x.transpose(0, *range(1, 2 * rank, 2), *range(2, 2 * rank + 1, 2), 2 * rank + 1)  # grid axes, window axes, C
  return x.reshape(batch, int(np.prod(grid)), int(np.prod(window)) * channels)


class PatchEmbed(nn.Module):
  """A strided VALID convolution [B, *spatial, C] -> [B, n, features] over an input cropped at `offset`, tokens in
  raster order, with the parameters of `nn.Conv` (`kernel` [*window, C, features] under `kernel_names`, `bias`).

  Windows that do not overlap (stride >= window along every axis: tiles, or tubes with gaps between them) go through
  `patch_tokens` and one 2-D matmul (`matmul=False` forces the convolution, for comparison); overlapping ones
  through `lax.conv_general_dilated`.
  """
  features: int
  window: Sequence[int]
  stride: Sequence[int]
  kernel_names: tuple[Optional[str], ...]
  offset: Optional[Sequence[int]] = None
  dtype: Any = jnp.float32
  matmul: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    window, stride = tuple(int(w) for w in self.window), tuple(int(s) for s in self.stride)
    channels = x.shape[-1]
    # Created in nn.Conv's order (kernel, then bias), so that the same rng gives the same values.
    kernel = self.param('kernel', layers.logical_init(nn.initializers.lecun_normal(), self.kernel_names),
                        (*window, channels, self.features), jnp.float32)
    bias = self.param('bias', layers.logical_init(nn.initializers.zeros_init(), ('embed',)), (self.features,),
                      jnp.float32)
    if self.offset is not None:
      x = x[(slice(None), *(slice(int(o), None) for o in self.offset))]
    x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
    if self.matmul and all(s >= w for w, s in zip(window, stride)):
      patches = patch_tokens(x, window, stride)
      batch, num = patches.shape[:2]
      y = patches.reshape(batch * num, -1) @ kernel.reshape(-1, self.features)
      return y.reshape(batch, num, self.features) + bias
    rank = len(window)
    dims = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ('N' + 'HWD'[:rank] + 'C', 'HWD'[:rank] + 'IO',
                                                                  'N' + 'HWD'[:rank] + 'C'))
    y = jax.lax.conv_general_dilated(x, kernel, stride, 'VALID', dimension_numbers=dims)
    return y.reshape(y.shape[0], -1, self.features) + bias


class VideoEncoder(nn.Module):
  """TubeViT-style encoder of one chunk: [B, k, H, W, 3] uint8 -> [B, f, width].

  Each tube (kernel, stride, offset) is a strided 3D convolution over the chunk shifted by its offset (`PatchEmbed`:
  a matmul on patches unless the tube overlaps itself); a tube with kernel length 1 is a 2D patch on a few frames.
  Its tokens get a fixed sin-cos embedding of their centre in (t, y, x), and the tokens of all tubes go through one
  ViT.
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
    chunk_shape = video.shape[1:4]
    x = video.astype(self.dtype) / 127.5 - 1.0
    tokens = []
    for i, tube in enumerate(self.tubes):
      kernel, stride, offset = (tuple(int(v) for v in part) for part in tube)
      y = PatchEmbed(self.width, kernel, stride, ('conv_t', 'conv_h', 'conv_w', 'conv_in', 'embed'), offset,
                     dtype=self.dtype, name=f'tube_{i}')(x)
      pos = layers.sincos_nd(tube_centres((kernel, stride, offset), chunk_shape), self.width)
      tokens.append(y + pos.astype(self.dtype))
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
    frames, bins = spectrogram.shape[1:]
    pf, pm = (int(p) for p in self.patch_size)
    x = ((spectrogram - self.input_mean) / self.input_std).astype(self.dtype)[..., None]
    x = PatchEmbed(self.width, (pf, pm), (pf, pm), ('conv_h', 'conv_w', 'conv_in', 'embed'), dtype=self.dtype,
                   name='patch_embed')(x)
    grid = np.stack(np.meshgrid(np.arange(frames // pf), np.arange(bins // pm), indexing='ij'), -1).reshape(-1, 2)
    x = x + layers.sincos_nd(grid.astype(np.float32), self.width).astype(self.dtype)
    x, _ = layers.Stack(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype, **(self.stack_kw or {}),
                        name='vit')(x, deterministic=deterministic)
    return x
