"""Analytic FLOP count of a Mirasol config: forward and training FLOPs per example, per tower, for the towers a run
actually trains.

Conventions (MaxText's, for MFU): a matmul of [S, a] by [a, b] costs 2*S*a*b. Attention scores and values are
counted only over the (query, key) pairs the mask allows: a causal mask counts about half, a block-causal one
(T+1)/(2T), the flat baseline's full attention all (T*n)^2. Elementwise work (norms, softmax, activations) and
rematerialisation are not counted: these are model FLOPs.

The backward pass of a matmul is two matmuls of its size: the gradient of its weight (dW) and the gradient of its
input (dX). A training step only does the ones something needs, and so does this count:
* dW of a tower that trains. Frozen towers (config.frozen, a regex on parameter paths, matching all of a tower's
  parameters) and towers at a learning-rate multiplier of 0 do not train: the train step drops their gradients
  (optimizer.drop_untrained) and XLA does not compute them.
* dX inside a tower when the tower trains or a tower upstream of it does (the gradient has to pass through it on
  its way up: mirasol.TOWER_INPUTS); a frozen tower with nothing trainable upstream costs its forward pass only.
* dX of the matmuls that read another tower's output directly (the Combiner's projections of the encoder tokens,
  the decoder's cross-attention keys and values of the AV latents, the heads) only when a tower upstream trains,
  and never of the first layer of an encoder (pixels and log-mel need no gradient).
Attention has no weight: both of its backward matmuls are input gradients.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import numpy as np

from mirasol_jax.models import encoders
from mirasol_jax.models import mirasol

# What a matmul's input is, for its dX: an activation of the same tower, another tower's output, or data.
INTERNAL, UPSTREAM, DATA = 'internal', 'upstream', 'data'


class _Counter:
  """Accumulates one tower's forward FLOPs, weight gradients and input gradients (by what the input is)."""

  def __init__(self):
    self.forward = 0.0
    self.weight_grad = 0.0
    self.input_grad = {INTERNAL: 0.0, UPSTREAM: 0.0, DATA: 0.0}

  def matmul(self, rows: float, inner: float, cols: float, source: str = INTERNAL, weight: bool = True):
    flops = 2.0 * rows * inner * cols
    self.forward += flops
    if weight:
      self.weight_grad += flops
      self.input_grad[source] += flops
    else:  # two activations: a gradient for each
      self.input_grad[source] += 2.0 * flops

  def attention(self, pairs: float, width: int, source: str = INTERNAL):
    """Scores (QK^T) and weighted values over `pairs` allowed (query, key) pairs."""
    self.matmul(pairs, width, 1, source, weight=False)
    self.matmul(pairs, width, 1, source, weight=False)

  def layer(self, seq: int, width: int, mlp_dim: int, pairs: Optional[float] = None,
            context: int = 0, context_width: Optional[int] = None, source: str = INTERNAL,
            context_source: str = INTERNAL):
    """One pre-LN Transformer layer over `seq` tokens, with cross-attention to `context` tokens if given. `source`
    is what its input is (for the q, k, v projections' dX), `context_source` what the context is."""
    pairs = seq * seq if pairs is None else pairs
    self.matmul(seq, width, 3 * width, source)  # q, k, v
    self.attention(pairs, width)
    self.matmul(seq, width, width)  # out
    if context:
      self.matmul(seq, width, width)  # cross q
      self.matmul(context, context_width or width, 2 * width, context_source)  # cross k, v
      self.attention(seq * context, width)
      self.matmul(seq, width, width)  # cross out
    self.matmul(seq, width, mlp_dim)
    self.matmul(seq, mlp_dim, width)

  def layers(self, depth: int, *args, source: str = INTERNAL, **kwargs):
    """`depth` layers; `source` is the first one's input (the others read the layer before)."""
    for i in range(depth):
      self.layer(*args, source=source if i == 0 else INTERNAL, **kwargs)

  def token_learner(self, tokens: int, width: int, hidden: int, outputs: int):
    self.matmul(tokens, width, hidden)
    self.matmul(tokens, hidden, outputs)
    self.matmul(outputs, tokens, width, weight=False)  # weighted sums of the tokens

  def train(self, trains: bool, upstream_trains: bool) -> float:
    flops = self.forward
    if trains:
      flops += self.weight_grad
    if trains or upstream_trains:
      flops += self.input_grad[INTERNAL]
    if upstream_trains:
      flops += self.input_grad[UPSTREAM]
    return flops


def _get(c: Mapping[str, Any], key: str, default=None):
  return c[key] if key in c else default


def upstream_towers(tower: str) -> set[str]:
  """Every tower whose output reaches `tower`, directly or through others (mirasol.TOWER_INPUTS)."""
  result, todo = set(), list(mirasol.TOWER_INPUTS[tower])
  while todo:
    name = todo.pop()
    if name not in result:
      result.add(name)
      todo.extend(mirasol.TOWER_INPUTS[name])
  return result


def _counters(model: Mapping[str, Any]) -> dict[str, _Counter]:
  t, m, d = model['num_chunks'], model['tokens_per_chunk'], model['width']
  k = model['num_frames'] // t
  flat = _get(model, 'av_mode', 'chunked') == 'flat'
  chunk_shape = (k, *model['image_size'])
  towers: dict[str, _Counter] = {}

  video = towers['video_encoder'] = _Counter()
  vw = model['video']['width']
  for tube in model['video']['tubes']:
    kernel = tube[0]
    tokens = int(np.prod(encoders.tube_grid(tube, chunk_shape)))
    video.matmul(t * tokens, int(np.prod(kernel)) * 3, vw, DATA)
  f = encoders.num_video_tokens(model['video']['tubes'], chunk_shape)
  for _ in range(t):
    video.layers(model['video']['depth'], f, vw, model['video']['mlp_dim'])

  audio = towers['audio_encoder'] = _Counter()
  aw = model['audio']['width']
  patch = tuple(_get(model['audio'], 'patch_size', (16, 16)))
  s = encoders.num_audio_tokens(model['audio_frames_per_chunk'], model['mel_bins'], patch)
  audio.matmul(t * s, patch[0] * patch[1], aw, DATA)
  for _ in range(t):
    audio.layers(model['audio']['depth'], s, aw, model['audio']['mlp_dim'])

  comb = towers['combiner'] = _Counter()
  comb.matmul(t * f, vw, d, UPSTREAM)
  comb.matmul(t * s, aw, d, UPSTREAM)
  n = f + s
  args = model['combiner_args']
  for _ in range(0 if flat else t):
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
  if flat:  # models/flat.py: full attention over all T*n chunk tokens, which carry no parameter of this tower
    latents = t * n
    av.layers(model['av']['depth'], latents, d, model['av']['mlp_dim'], pairs=latents ** 2, source=UPSTREAM)
  else:
    latents = t * m
    pairs = m * m * t * (t + 1) / 2 if _get(model['av'], 'block_causal', True) else (t * m) ** 2
    av.layers(model['av']['depth'], latents, d, model['av']['mlp_dim'], pairs=pairs)

  heads = towers['av_heads'] = _Counter()
  if t > 1 and not flat:
    heads.matmul((t - 1) * m, d, d, UPSTREAM)
    rh, rw = model['video_recon_size']
    heads.matmul(t - 1, d, k * rh * rw * 3, UPSTREAM)
    if _get(model['loss_weights'], 'audio_recon', 0.0):
      ph, pw = model['audio_recon_pool']
      heads.matmul(t - 1, d, (model['audio_frames_per_chunk'] // ph) * (model['mel_bins'] // pw), UPSTREAM)
  if _get(model['loss_weights'], 'av_contrastive', 0.0):
    heads.matmul(2 * t, d, d, UPSTREAM)

  text = towers['text_decoder'] = _Counter()
  length, tw = model['max_text_len'], model['text']['width']
  text.layers(model['text']['depth'], length, tw, model['text']['mlp_dim'], pairs=length * (length + 1) / 2,
              context=latents, context_width=d, context_source=UPSTREAM)
  text.matmul(length, tw, model['vocab_size'])
  return towers


def count(model: Mapping[str, Any], frozen: Iterable[str] = ()) -> dict[str, dict[str, float]]:
  """{'forward'|'train': {tower: FLOPs per example, ..., 'total': ...}} for `config.model`.

  `frozen`: the towers (keys of mirasol.TOWERS) that do not train, `optimizer.frozen_towers(config)`: each costs
  its forward pass, plus the backward through it when a tower upstream trains (see the module docstring).
  """
  frozen = set(frozen)
  unknown = sorted(frozen - set(mirasol.TOWERS))
  if unknown:
    raise ValueError(f'frozen towers {unknown} are not towers; towers are {list(mirasol.TOWERS)}')
  towers = _counters(model)
  trains = {name: name not in frozen for name in towers}
  result = {'forward': {name: c.forward for name, c in towers.items()},
            'train': {name: c.train(trains[name], any(trains[u] for u in upstream_towers(name)))
                      for name, c in towers.items()}}
  for per_tower in result.values():
    per_tower['total'] = sum(per_tower.values())
  return result


def utilization(flops: Mapping[str, float], seconds: Mapping[str, float] | float, peak_flops: float,
                examples: int = 1) -> dict[str, dict[str, float]]:
  """Per tower (and 'total'): its share of the FLOPs, TFLOP/s and MFU.

  flops: FLOPs per example per tower (a `count(...)['train']` or `['forward']`, with or without 'total');
  seconds: each tower's own measured time for `examples` examples, or one step time for all of them (then every
  tower is charged its FLOP share of that time and gets the step's TFLOP/s and MFU: the share is what it tells).
  peak_flops: FLOP/s of the device (config.peak_tflops * 1e12, or metrics.device_peak_flops()).
  """
  towers = {k: v for k, v in flops.items() if k != 'total'}
  total = sum(towers.values())
  if isinstance(seconds, Mapping):
    times = dict(seconds)
    times.setdefault('total', sum(times[k] for k in towers if k in times))
  else:
    times = {k: seconds * (v / total if total else 0.0) for k, v in towers.items()}
    times['total'] = seconds
  result = {}
  for name, value in list(towers.items()) + [('total', total)]:
    if name not in times:
      continue
    rate = examples * value / times[name] if times[name] > 0 else 0.0
    result[name] = {'share': value / total if total else 0.0, 'tflops': rate / 1e12, 'mfu': rate / peak_flops}
  return result
