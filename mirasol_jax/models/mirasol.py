"""Mirasol3B: the whole model, from a batch (the keys of example_batch) to text logits, AV latents and losses.

Data flow (shapes for batch B, T chunks of k frames, m combiner tokens, width D):
  video [B, T, k, H, W, 3] --VideoEncoder per chunk--> [B, T, f, Dv] --proj--> [B, T, f, D]  \\
  audio [B, T, F, M]       --AudioEncoder per chunk--> [B, T, s, Da] --proj--> [B, T, s, D]  -> u [B, T, n, D]
  u --Combiner--> x [B, T, m, D] --AVTransformer (block-causal)--> h = av_latents [B, T, m, D]
  text_tokens [B, L] --TextDecoder (cross-attends to h)--> text_logits [B, L, vocab]
Losses: next-chunk latent prediction (head(h_t) vs stop_gradient(x_{t+1})), low-resolution next-chunk video
reconstruction, optional next-chunk audio reconstruction, and cross-entropy on the target text tokens.

`Model(**config.model)` is built from a config; `example_batch(config, B)` gives a batch of zeros of its shapes.
The chunk-by-chunk path (`stream_init`, `stream_step`) encodes one chunk, advances the combiner state and runs the
AV Transformer against a KV cache of the earlier chunks; its latents equal the full pass's.

`av_mode='flat'` is the baseline Mirasol is measured against (models/flat.py): the Combiner and the AV Transformer
give way to one full-attention Transformer over all T*n chunk tokens u, at the AV Transformer's width and depth, and
the text decoder cross-attends to all of its T*n outputs (h is then [B, T, n, D]). Same encoders, same decoder,
same train step; the next-chunk losses must be 0 (every token sees the next chunk) and there is no streaming.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mirasol_jax.models import av_transformer
from mirasol_jax.models import combiners
from mirasol_jax.models import encoders
from mirasol_jax.models import flat
from mirasol_jax.models import layers
from mirasol_jax.models import text_decoder

Array = jax.Array

LOSS_TERMS = ('text', 'latent', 'video_recon', 'audio_recon', 'av_contrastive')
LATENT_LOSSES = ('cosine', 'l2', 'contrastive')
NEXT_CHUNK_TERMS = ('latent', 'video_recon', 'audio_recon')  # losses that predict chunk t+1 from chunks <= t
COMBINER_ARGS = ('depth', 'num_heads', 'mlp_dim')
TTM_ARGS = ('memory_tokens', 'tokenlearner_hidden')
TOWER_ARGS = ('width', 'depth', 'num_heads', 'mlp_dim')
# chunked: Mirasol (Combiner to m tokens per chunk, block-causal AV Transformer over T*m); flat: the baseline, one
# Transformer over all T*n tokens (models/flat.py).
AV_MODES = ('chunked', 'flat')


def _error(field: str, message: str) -> ValueError:
  return ValueError(f'model.{field}: {message}')


def _require_keys(field: str, given: Mapping[str, Any], required: Sequence[str], optional: Sequence[str] = ()):
  missing = [k for k in required if k not in given]
  unknown = [k for k in given if k not in required and k not in optional]
  if missing or unknown:
    raise _error(field, f'missing keys {missing}, unknown keys {unknown}; expected {list(required) + list(optional)}')


def validate_model_config(model: 'Model') -> None:
  """Raises ValueError naming the field and values for any configuration that cannot work."""
  n_frames, n_chunks = model.num_frames, model.num_chunks
  if n_chunks < 1 or n_frames % n_chunks:
    raise _error('num_frames', f'num_frames={n_frames} does not divide into num_chunks={n_chunks} chunks')
  k = n_frames // n_chunks
  height, width = model.image_size
  _require_keys('video', model.video, TOWER_ARGS + ('tubes',))
  _require_keys('audio', model.audio, TOWER_ARGS, ('patch_size', 'input_mean', 'input_std'))
  _require_keys('av', model.av, COMBINER_ARGS, ('mask_ratio', 'block_causal', 'query_groups'))
  if model.av.get('query_groups', 8) < 1:
    raise _error('av.query_groups', f'{model.av["query_groups"]} must be at least 1')
  if model.attention_impl not in layers.ATTENTION_IMPLEMENTATIONS:
    raise _error('attention_impl', f'{model.attention_impl!r} is not one of None, xla, cudnn, auto')
  _require_keys('text', model.text, TOWER_ARGS, ('tie_embeddings', 'context_norm'))
  if model.text.get('context_norm', 'none') not in ('none', 'tokens'):
    raise _error('text.context_norm', f'{model.text["context_norm"]!r} is not none or tokens')
  _require_keys('combiner_args', model.combiner_args, COMBINER_ARGS, TTM_ARGS)
  if not model.video['tubes']:
    raise _error('video.tubes', 'needs at least one (kernel, stride, offset) tube')
  for i, tube in enumerate(model.video['tubes']):
    kernel, stride, offset = tube
    if min(stride) < 1 or min(kernel) < 1 or min(offset) < 0:
      raise _error(f'video.tubes[{i}]', f'kernel {tuple(kernel)}, stride {tuple(stride)} must be >= 1 and offset '
                   f'{tuple(offset)} >= 0')
    for axis, size, name in zip(range(3), (k, height, width), ('frames per chunk k', 'image height', 'image width')):
      if offset[axis] + kernel[axis] > size:
        raise _error(f'video.tubes[{i}]', f'kernel {tuple(kernel)} at offset {tuple(offset)} spans '
                     f'{offset[axis] + kernel[axis]} along axis {axis} but the {name} is {size} '
                     f'(num_frames={n_frames} / num_chunks={n_chunks}, image_size={tuple(model.image_size)})')
  pf, pm = model.audio.get('patch_size', (16, 16))
  for field, size, patch in (('audio_frames_per_chunk', model.audio_frames_per_chunk, pf),
                             ('mel_bins', model.mel_bins, pm)):
    if size < patch or size % patch:
      raise _error(field, f'{field}={size} is not a positive multiple of the audio patch size {patch} '
                   f'(model.audio.patch_size={tuple(model.audio.get("patch_size", (16, 16)))})')
  f = encoders.num_video_tokens(model.video['tubes'], (k, height, width))
  s = num_audio_tokens(model)
  if model.tokens_per_chunk < 1 or model.tokens_per_chunk > f + s:
    raise _error('tokens_per_chunk', f'm={model.tokens_per_chunk} must be between 1 and the chunk\'s token count '
                 f'n = {f} video + {s} audio = {f + s}')
  if model.combiner not in combiners.COMBINERS:
    raise _error('combiner', f'{model.combiner!r} is not one of {sorted(combiners.COMBINERS)}')
  if model.combiner != 'ttm' and any(key in model.combiner_args for key in TTM_ARGS):
    raise _error('combiner_args', f'{list(TTM_ARGS)} only apply to combiner="ttm", not {model.combiner!r}')
  unknown = sorted(set(model.loss_weights) - set(LOSS_TERMS))
  if unknown:
    raise _error('loss_weights', f'unknown terms {unknown}; known terms are {list(LOSS_TERMS)}')
  if model.latent_loss not in LATENT_LOSSES:
    raise _error('latent_loss', f'{model.latent_loss!r} is not one of {LATENT_LOSSES}')
  if model.contrastive_temperature <= 0:
    raise _error('contrastive_temperature', f'{model.contrastive_temperature} must be > 0')
  leaking = [t for t in NEXT_CHUNK_TERMS if model.loss_weights.get(t, 0.0)]
  if model.av_mode not in AV_MODES:
    raise _error('av_mode', f'{model.av_mode!r} is not one of {AV_MODES}')
  if model.av_mode == 'flat' and leaking:
    raise _error('av_mode', f"'flat' attends over every chunk at once, so each token sees the next chunk, whose "
                 f'latents and frames the next-chunk losses {leaking} predict: set their loss_weights to 0 '
                 f'(e.g. --config.loss_weights.latent=0 --config.loss_weights.video_recon=0)')
  if not model.av.get('block_causal', True) and leaking:
    raise _error('av.block_causal', f'False lets every chunk attend to the next one, whose latents and frames the '
                 f'next-chunk losses {leaking} predict: set their loss_weights to 0 with full attention')
  rh, rw = model.video_recon_size
  if height % rh or width % rw:
    raise _error('video_recon_size', f'{tuple(model.video_recon_size)} does not divide image_size '
                 f'{tuple(model.image_size)}')
  ph, pw = model.audio_recon_pool
  if model.audio_frames_per_chunk % ph or model.mel_bins % pw:
    raise _error('audio_recon_pool', f'{tuple(model.audio_recon_pool)} does not divide (audio_frames_per_chunk, '
                 f'mel_bins) = ({model.audio_frames_per_chunk}, {model.mel_bins})')
  for name, tower in (('video', model.video), ('audio', model.audio), ('text', model.text)):
    if tower['width'] % tower['num_heads']:
      raise _error(f'{name}.width', f'{tower["width"]} is not divisible by {name}.num_heads={tower["num_heads"]}')
  for name, heads in (('av.num_heads', model.av['num_heads']),
                      ('combiner_args.num_heads', model.combiner_args['num_heads'])):
    if model.width % heads:
      raise _error(name, f'width={model.width} is not divisible by {name}={heads}')


GEOMETRY_FIELDS = ('num_frames', 'num_chunks', 'image_size', 'audio_frames_per_chunk', 'mel_bins', 'max_text_len')


def batch_shapes(model_config: Mapping[str, Any], batch_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
  """key -> (shape, dtype) for a batch of `batch_size` examples of `config.model`'s geometry."""
  c = model_config
  t = c['num_chunks']
  return {
      'video': ((batch_size, t, c['num_frames'] // t, *c['image_size'], 3), np.uint8),
      'audio': ((batch_size, t, c['audio_frames_per_chunk'], c['mel_bins']), np.float32),
      'audio_mask': ((batch_size,), np.bool_),
      'text_tokens': ((batch_size, c['max_text_len']), np.int32),
      'text_loss_mask': ((batch_size, c['max_text_len']), np.bool_),
      'example_mask': ((batch_size,), np.bool_),
  }


def num_audio_tokens(model: 'Model') -> int:
  """Audio tokens of each chunk: the spectrogram patches of model.audio.patch_size (16x16 by default). A chunk's
  tokens u hold its video tokens first, then these."""
  return encoders.num_audio_tokens(model.audio_frames_per_chunk, model.mel_bins,
                                   tuple(model.audio.get('patch_size', (16, 16))))


def example_batch(config, batch_size: int) -> dict[str, np.ndarray]:
  """A batch of zeros (all examples valid, audio present) with the config's shapes."""
  batch = {k: np.zeros(shape, dtype) for k, (shape, dtype) in batch_shapes(config.model, batch_size).items()}
  batch['audio_mask'][:] = True
  batch['example_mask'][:] = True
  return batch


def _masked_mean(values: Array, weights: Array, denominator: Optional[Array] = None) -> Array:
  """sum(values * weights) / denominator, the denominator being sum(weights) unless given."""
  weights = jnp.broadcast_to(weights, values.shape).astype(jnp.float32)
  denominator = jnp.sum(weights) if denominator is None else denominator
  return jnp.sum(values.astype(jnp.float32) * weights) / jnp.maximum(denominator, 1.0)


def loss_denominators(batch: Mapping[str, Array], num_chunks: int, tokens_per_chunk: int) -> dict[str, Array]:
  """What each loss term is averaged over in `batch`: target tokens, (example, chunk, slot) triples, ...

  A gradient-accumulation step computes these once for the whole batch and passes them to every micro-batch, so
  that the sum of the micro-batch losses is exactly the loss of the whole batch, whatever the masks.
  """
  example_w = batch['example_mask'].astype(jnp.float32)
  pairs = max(num_chunks - 1, 0)
  return {
      'text': jnp.sum(batch['text_loss_mask'][:, 1:] * example_w[:, None]),
      'latent': jnp.sum(example_w) * pairs * tokens_per_chunk,
      'video_recon': jnp.sum(example_w) * pairs,
      'audio_recon': jnp.sum(example_w * batch['audio_mask']) * pairs,
      'av_contrastive': jnp.sum(example_w * batch['audio_mask']) * num_chunks,
  }


def _avg_pool(x: Array, factors: Sequence[int], first_axis: int) -> Array:
  """Average-pools consecutive axes starting at first_axis by integer factors (reshape + mean, fused by XLA)."""
  shape, axes = list(x.shape[:first_axis]), []
  for i, factor in enumerate(factors):
    size = x.shape[first_axis + i]
    shape += [size // factor, factor]
    axes.append(len(shape) - 1)
  shape += list(x.shape[first_axis + len(factors):])
  return x.reshape(shape).mean(axis=tuple(axes))


class Model(nn.Module):
  """Mirasol3B. Field meanings and defaults for every size: `mirasol_jax/models/sizes.py`."""
  num_frames: int
  num_chunks: int
  image_size: Sequence[int]
  audio_frames_per_chunk: int
  mel_bins: int
  max_text_len: int
  vocab_size: int
  tokens_per_chunk: int
  width: int
  video: Mapping[str, Any]
  audio: Mapping[str, Any]
  combiner: str
  combiner_args: Mapping[str, Any]
  av: Mapping[str, Any]
  text: Mapping[str, Any]
  loss_weights: Mapping[str, float]
  latent_loss: str = 'cosine'  # cosine | l2 (regression onto the stop-gradient target) | contrastive (InfoNCE)
  contrastive_temperature: float = 0.1  # the contrastive latent loss and the audio-video contrastive loss
  video_recon_size: Sequence[int] = (16, 16)
  audio_recon_pool: Sequence[int] = (4, 4)
  dtype: str = 'bfloat16'
  scan_layers: bool = True
  remat_policy: str = 'none'
  dropout_rate: float = 0.0
  attention_impl: Optional[str] = None
  av_mode: str = 'chunked'  # chunked (Mirasol) | flat (the baseline: one Transformer over all T*n tokens)

  def __post_init__(self):
    super().__post_init__()
    validate_model_config(self)

  @property
  def chunk_frames(self) -> int:
    return self.num_frames // self.num_chunks

  @property
  def flat(self) -> bool:
    return self.av_mode == 'flat'

  def setup(self):
    dtype = layers.canonical_dtype(self.dtype)
    stack_kw = dict(scan_layers=self.scan_layers, remat_policy=self.remat_policy, dropout_rate=self.dropout_rate,
                    attention_impl=self.attention_impl)
    video, audio = dict(self.video), dict(self.audio)
    tubes = tuple(tuple(tuple(int(v) for v in part) for part in tube) for tube in video.pop('tubes'))
    self.video_encoder = encoders.VideoEncoder(**video, tubes=tubes, dtype=dtype, stack_kw=stack_kw)
    self.audio_encoder = encoders.AudioEncoder(**audio, dtype=dtype, stack_kw=stack_kw)
    self.video_proj = layers.dense(self.width, ('embed', 'embed_out'), dtype, 'video_proj')
    self.audio_proj = layers.dense(self.width, ('embed', 'embed_out'), dtype, 'audio_proj')
    self.modality_embed = self.param(
        'modality_embed', layers.logical_init(nn.initializers.normal(0.02), (None, 'embed')), (2, self.width))
    self.text_decoder = text_decoder.TextDecoder(
        vocab_size=self.vocab_size, max_len=self.max_text_len, **self.text, dtype=dtype, stack_kw=stack_kw)
    if self.loss_weights.get('av_contrastive', 0.0):
      self.av_contrastive_video = layers.dense(self.width, ('embed', 'embed_out'), dtype, 'av_contrastive_video')
      self.av_contrastive_audio = layers.dense(self.width, ('embed', 'embed_out'), dtype, 'av_contrastive_audio')
    if self.flat:
      # Named av_transformer so that it is the AV Transformer's tower (TOWERS): lr_multipliers, frozen, the logs.
      self.av_transformer = flat.FlatTransformer(
          width=self.width, depth=self.av['depth'], num_heads=self.av['num_heads'], mlp_dim=self.av['mlp_dim'],
          dtype=dtype, stack_kw=stack_kw, name='av_transformer')
      return
    self.combiner_module = combiners.COMBINERS[self.combiner](
        tokens_per_chunk=self.tokens_per_chunk, width=self.width, **self.combiner_args, dtype=dtype,
        stack_kw=stack_kw, name='combiner')
    self.av_transformer = av_transformer.AVTransformer(
        tokens_per_chunk=self.tokens_per_chunk, width=self.width, **self.av, dtype=dtype, stack_kw=stack_kw)
    # Next-chunk prediction heads, read from the latents of chunk t.
    self.latent_head = layers.dense(self.width, ('embed', 'embed_out'), dtype, 'latent_head')
    rh, rw = self.video_recon_size
    self.video_recon_head = layers.dense(self.chunk_frames * rh * rw * 3, ('embed', 'recon'), dtype,
                                         'video_recon_head')
    if self.loss_weights.get('audio_recon', 0.0):
      ph, pw = self.audio_recon_pool
      self.audio_recon_head = layers.dense(
          (self.audio_frames_per_chunk // ph) * (self.mel_bins // pw), ('embed', 'recon'), dtype, 'audio_recon_head')

  # -------------------------------------------------------------------------------------------------------------
  # Encoding.

  def _check_batch(self, batch: Mapping[str, Any]) -> None:
    batch_size = batch['video'].shape[0] if 'video' in batch else None
    expected = batch_shapes({f: getattr(self, f) for f in GEOMETRY_FIELDS}, batch_size)
    for key, (shape, _) in expected.items():
      if key not in batch:
        raise ValueError(f'batch has no {key!r}; a batch needs keys {sorted(expected)}')
      if tuple(batch[key].shape) != shape:
        raise ValueError(
            f'batch[{key!r}] has shape {tuple(batch[key].shape)} but the config expects {shape} (model.num_frames='
            f'{self.num_frames}, num_chunks={self.num_chunks}, image_size={tuple(self.image_size)}, '
            f'audio_frames_per_chunk={self.audio_frames_per_chunk}, mel_bins={self.mel_bins}, '
            f'max_text_len={self.max_text_len})')

  def encode_chunk_tokens(self, video: Array, audio: Array, audio_mask: Array, deterministic: bool = True):
    """video [B, t, k, H, W, 3], audio [B, t, F, M], audio_mask [B] -> u [B, t, n, D] and validity [B, t, n]."""
    batch, chunks = video.shape[:2]
    v = self.video_encoder(video.reshape(batch * chunks, *video.shape[2:]), deterministic)
    a = self.audio_encoder(audio.reshape(batch * chunks, *audio.shape[2:]), deterministic)
    return self.chunk_tokens(v, a, audio_mask, chunks)

  def chunk_tokens(self, v: Array, a: Array, audio_mask: Array, chunks: int) -> tuple[Array, Array]:
    """The encoders' outputs v [B*t, f, Dv] and a [B*t, s, Da] -> u [B, t, n, D] and validity [B, t, n]: the
    projections and modality embeddings (parameters of the Combiner's tower)."""
    batch = v.shape[0] // chunks
    v = self.video_proj(v) + self.modality_embed[0]
    a = self.audio_proj(a) + self.modality_embed[1]
    u = jnp.concatenate([v, a], axis=1).astype(v.dtype)
    u = u.reshape(batch, chunks, u.shape[1], self.width)
    valid = jnp.concatenate([jnp.ones((batch, chunks, v.shape[1]), bool),
                             jnp.broadcast_to(audio_mask[:, None, None], (batch, chunks, a.shape[1]))], axis=2)
    return u, valid

  def encode_av(self, batch: Mapping[str, Array], train: bool = False) -> tuple[Array, Array]:
    """Combiner tokens x [B, T, m, D] and AV latents h [B, T, m, D] (flat: u and h, both [B, T, n, D])."""
    return self._encode(batch, train)[1:]

  def _encode(self, batch: Mapping[str, Array], train: bool) -> tuple[Array, Array, Array]:
    """Chunk tokens u [B, T, n, D] (video tokens first), combiner tokens x and AV latents h [B, T, m, D].

    Flat: nothing compresses the chunks, so x is u and h [B, T, n, D] the flat Transformer's output."""
    u, valid = self.encode_chunk_tokens(batch['video'], batch['audio'], batch['audio_mask'], not train)
    x = self.combine(u, valid, train)
    return u, x, self.contextualize(x, valid, train)

  def combine(self, u: Array, valid: Array, train: bool = False) -> Array:
    """The Combiner: u [B, T, n, D] (validity [B, T, n]) -> x [B, T, m, D]; flat: u itself."""
    return u if self.flat else self.combiner_module(u, valid, not train)

  def contextualize(self, x: Array, valid: Array, train: bool = False) -> Array:
    """The AV Transformer: x [B, T, m, D] -> h [B, T, m, D] (`valid` unused); flat: the flat Transformer over
    x = u [B, T, n, D] with the validity of its tokens."""
    if self.flat:
      return self.av_transformer(self.perturb('av_input', x), valid, not train)
    return self.av_transformer(self.perturb('av_input', x), deterministic=not train, mask_tokens=train)

  # -------------------------------------------------------------------------------------------------------------
  # Training forward pass.

  def __call__(self, batch: Mapping[str, Array], train: bool = False,
               denominators: Optional[Mapping[str, Array]] = None) -> dict[str, Any]:
    """-> text_logits [B, L, vocab], av_latents [B, T, m, D] ([B, T, n, D] flat), losses (each term and the
    weighted `total`) and stats (scalars that are not losses, e.g. `latent_target_spread`). `denominators` (see
    loss_denominators) replaces this batch's own, for micro-batches."""
    self._check_batch(batch)
    u, x, h = self._encode(batch, train)
    batch_size = x.shape[0]
    latents = h.reshape(batch_size, -1, self.width)
    text_logits = self.text_decoder(batch['text_tokens'], latents, not train)
    if denominators is None:
      denominators = loss_denominators(batch, self.num_chunks, self.tokens_per_chunk)
    losses, stats = self._losses(batch, u, x, h, text_logits, denominators)
    return {'text_logits': text_logits, 'av_latents': h, 'losses': losses, 'stats': stats}

  def _losses(self, batch, u, x, h, text_logits, denominators) -> tuple[dict[str, Array], dict[str, Array]]:
    """The loss terms (and their weighted `total`), and statistics that are not losses (see `spread`)."""
    example_w = batch['example_mask'].astype(jnp.float32)
    losses, stats = {}, {}
    # Text: the prediction at position i is scored against token i + 1 where that token is a target token.
    ce = optax.softmax_cross_entropy_with_integer_labels(text_logits[:, :-1], batch['text_tokens'][:, 1:])
    losses['text'] = _masked_mean(ce, batch['text_loss_mask'][:, 1:] * example_w[:, None], denominators['text'])
    if self.num_chunks > 1 and not self.flat:
      h_now = h[:, :-1].astype(jnp.float32)  # latents of chunks 0 .. T-2 predict chunks 1 .. T-1.
      w = example_w[:, None, None]
      pred = self.latent_head(h_now).astype(jnp.float32)
      target = jax.lax.stop_gradient(self.perturb('latent_target', x)[:, 1:].astype(jnp.float32))
      # A collapsing latent objective shows as targets (and predictions) that no longer differ between examples.
      stats['latent_target_spread'] = spread(target, example_w)
      stats['latent_pred_spread'] = spread(pred, example_w)
      if self.latent_loss == 'cosine':
        cos = jnp.sum(_unit(pred) * _unit(target), axis=-1)
        losses['latent'] = _masked_mean(1.0 - cos, w, denominators['latent'])
      elif self.latent_loss == 'l2':
        losses['latent'] = _masked_mean(jnp.mean(jnp.square(pred - target), -1), w, denominators['latent'])
      else:
        losses['latent'] = _masked_mean(
            _info_nce(pred, target, example_w, self.contrastive_temperature), w, denominators['latent'])
      pooled = h_now.mean(axis=2)  # [B, T-1, D]
      video_next = batch['video'][:, 1:].astype(jnp.float32) / 127.5 - 1.0
      video_target = _avg_pool(video_next, (self.image_size[0] // self.video_recon_size[0],
                                            self.image_size[1] // self.video_recon_size[1]), first_axis=3)
      video_pred = self.video_recon_head(pooled).astype(jnp.float32).reshape(video_target.shape)
      losses['video_recon'] = _masked_mean(jnp.mean(jnp.square(video_pred - video_target), axis=(2, 3, 4, 5)),
                                           example_w[:, None], denominators['video_recon'])
      if self.loss_weights.get('audio_recon', 0.0):
        audio = self.audio_encoder
        audio_next = (batch['audio'][:, 1:] - audio.input_mean) / audio.input_std
        audio_target = _avg_pool(audio_next, self.audio_recon_pool, first_axis=2)
        audio_pred = self.audio_recon_head(pooled).astype(jnp.float32).reshape(audio_target.shape)
        losses['audio_recon'] = _masked_mean(jnp.mean(jnp.square(audio_pred - audio_target), axis=(2, 3)),
                                             (example_w * batch['audio_mask'])[:, None], denominators['audio_recon'])
    if self.loss_weights.get('av_contrastive', 0.0):
      num_video = u.shape[2] - num_audio_tokens(self)
      video = self.av_contrastive_video(u[:, :, :num_video].mean(axis=2)).astype(jnp.float32)
      audio = self.av_contrastive_audio(u[:, :, num_video:].mean(axis=2)).astype(jnp.float32)
      with_audio = example_w * batch['audio_mask']
      losses['av_contrastive'] = _masked_mean(
          _audio_video_nce(video, audio, with_audio, self.contrastive_temperature), with_audio[:, None],
          denominators['av_contrastive'])
    losses['total'] = sum(self.loss_weights.get(name, 0.0) * value for name, value in losses.items())
    return losses, stats

  # -------------------------------------------------------------------------------------------------------------
  # Text generation with a KV cache (driven by mirasol_jax.decoding).

  def text_logits(self, tokens: Array, latents: Array) -> Array:
    """Teacher-forced logits [B, L, vocab] for tokens [B, L] given flat latents [B, T*m, D]."""
    return self.text_decoder(tokens, latents)

  def candidate_logits(self, tokens: Array, latents: Array) -> Array:
    """Teacher-forced logits [B, K, L, vocab] of K texts per example, tokens [B, K, L], over its flat latents
    [B, T*m, D] (TextDecoder.candidate_logits: the latents projected once for the K texts)."""
    return self.text_decoder.candidate_logits(tokens, latents)

  def prefix_candidate_logits(self, tokens: Array, prompt_len: Array, candidates: Array, latents: Array):
    """(logits after each prompt [B, vocab], after each candidate token [B, K, Lc, vocab]) of K candidates after
    each example's prompt, the prompt run once (TextDecoder.prefix_candidate_logits); latents flat [B, T*m, D]."""
    return self.text_decoder.prefix_candidate_logits(tokens, prompt_len, candidates, latents)

  def text_prefill(self, tokens: Array, latents: Array, cache_len: int):
    return self.text_decoder.prefill(tokens, latents, cache_len)

  def text_extend(self, tokens: Array, index: Array, cache):
    return self.text_decoder.extend(tokens, index, cache)

  # -------------------------------------------------------------------------------------------------------------
  # Chunk-by-chunk application.

  def _check_streamable(self) -> None:
    if self.flat:
      raise ValueError("model.av_mode='flat' attends over the whole clip at once: it has no chunk-by-chunk path")

  def stream_init(self, batch_size: int, num_chunks: Optional[int] = None) -> dict[str, Any]:
    """State before the first chunk: zero combiner memory and an empty AV cache for `num_chunks` chunks."""
    self._check_streamable()
    return {'combiner': self.combiner_module.init_state(batch_size),
            'av_cache': self.av_transformer.init_cache(batch_size, num_chunks or self.num_chunks),
            'chunk': jnp.zeros((), jnp.int32)}

  def stream_step(self, video_chunk: Array, audio_chunk: Array, audio_mask: Array, state: dict[str, Any]):
    """One chunk (video [B, k, H, W, 3], audio [B, F, M]) -> (its latents h_t [B, m, D], next state)."""
    self._check_streamable()
    u, valid = self.encode_chunk_tokens(video_chunk[:, None], audio_chunk[:, None], audio_mask)
    x_t, combiner_state = self.combiner_module.step(u[:, 0], valid[:, 0], state['combiner'])
    h_t, av_cache = self.av_transformer.step(x_t, state['chunk'], state['av_cache'])
    return h_t, {'combiner': combiner_state, 'av_cache': av_cache, 'chunk': state['chunk'] + 1}


def spread(values: Array, weights: Array) -> Array:
  """How much `values` [B, ...] differ between the examples weighted by `weights` [B], in [0, 1]: the standard
  deviation over examples, averaged over every other position, over the root mean square of the values. 0 when
  every example gives the same values (a collapsed representation)."""
  w = weights.astype(jnp.float32)
  w = (w / jnp.maximum(jnp.sum(w), 1.0)).reshape((-1,) + (1,) * (values.ndim - 1))
  mean = jnp.sum(w * values, axis=0)
  std = jnp.sqrt(jnp.maximum(jnp.sum(w * jnp.square(values - mean), axis=0), 0.0))
  rms = jnp.sqrt(jnp.mean(jnp.sum(w * jnp.square(values), axis=0)))
  return jnp.mean(std) / jnp.maximum(rms, 1e-12)


def _info_nce(pred: Array, target: Array, weights: Array, temperature: float) -> Array:
  """[B, T-1, m, D] predictions and targets -> [B, T-1, m] contrastive loss (CPC's InfoNCE).

  Each prediction must pick its own target, by cosine similarity / temperature, out of the targets of the same slot
  in every chunk of every example of the batch. Unlike a regression onto a stop-gradient target, this cannot be
  met by latents that are the same for every clip: a collapsed target is as close to its prediction as any other.
  Targets of masked examples (weights 0) are not candidates. Cost: m * (B * (T-1))^2 similarities.
  """
  batch, steps, slots, width = pred.shape
  p = jnp.moveaxis(_unit(pred), 2, 0).reshape(slots, batch * steps, width)
  t = jnp.moveaxis(_unit(target), 2, 0).reshape(slots, batch * steps, width)
  logits = jnp.einsum('snd,skd->snk', p, t) / temperature
  candidate = jnp.repeat(weights > 0, steps)
  logits = jnp.where(candidate[None, None, :], logits, -1e9)
  loss = -jnp.diagonal(jax.nn.log_softmax(logits, axis=-1), axis1=1, axis2=2)  # [m, B * (T-1)]
  return jnp.moveaxis(loss.reshape(slots, batch, steps), 0, 2)


def _audio_video_nce(video: Array, audio: Array, weights: Array, temperature: float) -> Array:
  """[B, T, D] pooled video and audio of each chunk -> [B, T] symmetric InfoNCE (VATT's audio-video loss).

  A chunk's audio must pick out that chunk's video among every chunk of every clip in the batch, and its video the
  audio. Other chunks of the same clip are candidates too, so what is constant over a clip (a backdrop, a noise
  floor) does not solve it: only what happens when, in both streams, does. Chunks of examples with weight 0 (no
  audio, or masked) are not candidates.
  """
  batch, chunks, width = video.shape
  v = _unit(video).reshape(-1, width)
  a = _unit(audio).reshape(-1, width)
  logits = (v @ a.T) / temperature
  candidate = jnp.repeat(weights > 0, chunks)
  v_to_a = jax.nn.log_softmax(jnp.where(candidate[None, :], logits, -1e9), axis=-1)
  a_to_v = jax.nn.log_softmax(jnp.where(candidate[:, None], logits, -1e9), axis=0)
  loss = -0.5 * (jnp.diagonal(v_to_a) + jnp.diagonal(a_to_v))
  return loss.reshape(batch, chunks)


def _unit(x: Array, eps: float = 1e-6) -> Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


TOWERS = {
    'video_encoder': ('video_encoder',),
    'audio_encoder': ('audio_encoder',),
    'combiner': ('combiner', 'video_proj', 'audio_proj', 'modality_embed'),
    'av_transformer': ('av_transformer',),
    'av_heads': ('latent_head', 'video_recon_head', 'audio_recon_head', 'av_contrastive_video',
                 'av_contrastive_audio'),
    'text_decoder': ('text_decoder',),
}
AV_TOWERS = ('video_encoder', 'audio_encoder', 'combiner', 'av_transformer', 'av_heads')
# The towers whose outputs each tower reads (the data flow: encoders -> combiner -> AV Transformer -> heads and text
# decoder; the heads also read the combiner's tokens u). A frozen tower still passes gradients back to these when
# one of them, or one further up, trains: flops.count charges it the backward through its inputs then.
TOWER_INPUTS = {
    'video_encoder': (),
    'audio_encoder': (),
    'combiner': ('video_encoder', 'audio_encoder'),
    'av_transformer': ('combiner',),
    'av_heads': ('av_transformer', 'combiner'),
    'text_decoder': ('av_transformer',),
}


def count_params_per_tower(params: Mapping[str, Any]) -> dict[str, int]:
  """Parameter count per tower (TOWERS) of a params tree of arrays or ShapeDtypeStructs, plus 'total'."""
  counts = {}
  assigned = set()
  for tower, names in TOWERS.items():
    counts[tower] = sum(int(np.prod(leaf.shape)) for name in names if name in params
                        for leaf in jax.tree.leaves(params[name]))
    assigned.update(names)
  unassigned = sorted(set(params) - assigned)
  if unassigned:
    raise ValueError(f'parameters {unassigned} belong to no tower in mirasol.TOWERS')
  counts['total'] = sum(counts.values())
  return counts
