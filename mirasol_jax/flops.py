"""Analytic FLOP count of a Mirasol config: forward and training FLOPs per example, per tower.

Conventions (MaxText's, for MFU): a matmul of [S, a] by [a, b] costs 2*S*a*b. Training costs the forward pass plus
the backward pass, which is 2x the forward for every matmul whose input needs a gradient (dX and dW) and 1x for the
first layer of a tower, whose input (pixels, log-mel) needs none. Attention scores and values are counted only over
the (query, key) pairs the mask allows: a causal mask counts about half, a block-causal one (T+1)/(2T).
Elementwise work (norms, softmax, activations) and rematerialisation are not counted: these are model FLOPs.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from mirasol_jax.models import encoders


class _Counter:
  """Accumulates forward and training FLOPs."""

  def __init__(self):
    self.forward = 0.0
    self.train = 0.0

  def matmul(self, rows: float, inner: float, cols: float, input_grad: bool = True):
    flops = 2.0 * rows * inner * cols
    self.forward += flops
    self.train += flops * (3.0 if input_grad else 2.0)

  def attention(self, pairs: float, width: int):
    """Scores (QK^T) and weighted values over `pairs` allowed (query, key) pairs; both operands need gradients."""
    self.matmul(pairs, width, 1)
    self.matmul(pairs, width, 1)

  def layer(self, seq: int, width: int, mlp_dim: int, pairs: Optional[float] = None,
            context: int = 0, context_width: Optional[int] = None):
    """One pre-LN Transformer layer over `seq` tokens, with cross-attention to `context` tokens if given."""
    pairs = seq * seq if pairs is None else pairs
    self.matmul(seq, width, 3 * width)  # q, k, v
    self.attention(pairs, width)
    self.matmul(seq, width, width)  # out
    if context:
      self.matmul(seq, width, width)  # cross q
      self.matmul(context, context_width or width, 2 * width)  # cross k, v
      self.attention(seq * context, width)
      self.matmul(seq, width, width)  # cross out
    self.matmul(seq, width, mlp_dim)
    self.matmul(seq, mlp_dim, width)

  def layers(self, depth: int, *args, **kwargs):
    for _ in range(depth):
      self.layer(*args, **kwargs)

  def token_learner(self, tokens: int, width: int, hidden: int, outputs: int):
    self.matmul(tokens, width, hidden)
    self.matmul(tokens, hidden, outputs)
    self.matmul(outputs, tokens, width)  # weighted sums


def _get(c: Mapping[str, Any], key: str, default=None):
  return c[key] if key in c else default


def count(model: Mapping[str, Any]) -> dict[str, dict[str, float]]:
  """{'forward'|'train': {tower: FLOPs per example, ..., 'total': ...}} for `config.model`."""
  t, m, d = model['num_chunks'], model['tokens_per_chunk'], model['width']
  k = model['num_frames'] // t
  chunk_shape = (k, *model['image_size'])
  towers: dict[str, _Counter] = {}

  video = towers['video_encoder'] = _Counter()
  vw = model['video']['width']
  for tube in model['video']['tubes']:
    kernel = tube[0]
    tokens = int(np.prod(encoders.tube_grid(tube, chunk_shape)))
    video.matmul(t * tokens, int(np.prod(kernel)) * 3, vw, input_grad=False)
  f = encoders.num_video_tokens(model['video']['tubes'], chunk_shape)
  for _ in range(t):
    video.layers(model['video']['depth'], f, vw, model['video']['mlp_dim'])

  audio = towers['audio_encoder'] = _Counter()
  aw = model['audio']['width']
  patch = tuple(_get(model['audio'], 'patch_size', (16, 16)))
  s = encoders.num_audio_tokens(model['audio_frames_per_chunk'], model['mel_bins'], patch)
  audio.matmul(t * s, patch[0] * patch[1], aw, input_grad=False)
  for _ in range(t):
    audio.layers(model['audio']['depth'], s, aw, model['audio']['mlp_dim'])

  comb = towers['combiner'] = _Counter()
  comb.matmul(t * f, vw, d)
  comb.matmul(t * s, aw, d)
  n = f + s
  args = model['combiner_args']
  for _ in range(t):
    if model['combiner'] == 'transformer':
      comb.layers(args['depth'], n + m, d, args['mlp_dim'])
    elif model['combiner'] == 'qformer':
      comb.layers(args['depth'], m, d, args['mlp_dim'], context=n)
    else:
      mem, hidden = args['memory_tokens'], args['tokenlearner_hidden']
      comb.token_learner(mem + n, d, hidden, m)
      comb.layers(args['depth'], m, d, args['mlp_dim'])
      comb.token_learner(mem + m + n, d, hidden, mem)

  av = towers['av_transformer'] = _Counter()
  pairs = m * m * t * (t + 1) / 2 if _get(model['av'], 'block_causal', True) else (t * m) ** 2
  av.layers(model['av']['depth'], t * m, d, model['av']['mlp_dim'], pairs=pairs)

  heads = towers['av_heads'] = _Counter()
  if t > 1:
    heads.matmul((t - 1) * m, d, d)
    rh, rw = model['video_recon_size']
    heads.matmul(t - 1, d, k * rh * rw * 3)
    if _get(model['loss_weights'], 'audio_recon', 0.0):
      ph, pw = model['audio_recon_pool']
      heads.matmul(t - 1, d, (model['audio_frames_per_chunk'] // ph) * (model['mel_bins'] // pw))

  if _get(model['loss_weights'], 'av_contrastive', 0.0):
    heads.matmul(2 * t, d, d)

  text = towers['text_decoder'] = _Counter()
  length, tw = model['max_text_len'], model['text']['width']
  text.layers(model['text']['depth'], length, tw, model['text']['mlp_dim'], pairs=length * (length + 1) / 2,
              context=t * m, context_width=d)
  text.matmul(length, tw, model['vocab_size'])

  result = {}
  for kind in ('forward', 'train'):
    per_tower = {name: getattr(counter, kind) for name, counter in towers.items()}
    per_tower['total'] = sum(per_tower.values())
    result[kind] = per_tower
  return result
