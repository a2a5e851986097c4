"""Leaf building blocks shared by every tower: masks, position embeddings, attention, MLP, Transformer stacks.

Everything upstream (encoders, combiners, AV Transformer, text decoder) is built from `Stack`, a pre-LayerNorm
Transformer stack that runs in one of two modes:

* full mode (`cache=None`): a whole sequence at once, with an explicit mask or `causal=True`; used in training.
* cached mode (`cache` given): `s` new positions written at `index` into per-layer key/value buffers; used by the
  KV-cached text decoder and by the chunk-by-chunk (streaming) AV Transformer.

Parameters are fp32 and carry logical axis names; compute runs in `dtype` (bf16 by default). Layers are stacked with
`nn.scan` (one compiled body, a leading `layers` axis on every parameter) and rematerialised with a named policy.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

# Names of `jax.checkpoint_policies` selectable as `config.model.remat_policy`.
REMAT_POLICIES = {
    'none': None,  # no rematerialisation: fastest, most memory.
    'full': jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward pass.
    'dots': jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute elementwise ops.
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # keep weight matmuls only.
}

BATCH_LENGTH_EMBED = ('activation_batch', 'activation_length', 'activation_embed')
BATCH_LENGTH_HEADS_KV = ('activation_batch', 'activation_length', 'activation_heads', 'activation_kv')
BATCH_LENGTH_MLP = ('activation_batch', 'activation_length', 'activation_mlp')


def canonical_dtype(dtype: Any) -> jnp.dtype:
  """Accepts 'bfloat16', 'float32', jnp.bfloat16, ... (configs hold strings)."""
  return jnp.dtype(dtype)


def logical_init(init: nn.initializers.Initializer, names: tuple[Optional[str], ...]):
  return nn.with_logical_partitioning(init, names)


def constrain(x: Array, names: tuple[Optional[str], ...]) -> Array:
  return nn.with_logical_constraint(x, names)


# ---------------------------------------------------------------------------------------------------------------
# Masks. Boolean, True where attention is allowed; shaped to broadcast against [B, heads, queries, keys].


def block_causal_mask(num_chunks: int, tokens_per_chunk: int) -> np.ndarray:
  """[T*m, T*m]: full attention inside a chunk, causal across chunks (chunk t sees chunks <= t)."""
  chunk_of = np.arange(num_chunks * tokens_per_chunk) // tokens_per_chunk
  return chunk_of[:, None] >= chunk_of[None, :]


def key_padding_mask(valid: Array) -> Array:
  """[B, S] -> [B, 1, 1, S]."""
  return valid[:, None, None, :]


def cached_attention_mask(index: Array, num_new: int, cache_len: int, causal: bool) -> Array:
  """Mask for `num_new` queries written at per-example position `index` [B] into a cache of `cache_len` keys.

  Causal: query i (at absolute position index + i) sees keys <= index + i. Block (causal=False): the new queries
  form one chunk and see every key before index + num_new, so a chunk attends fully to itself and to earlier chunks.
  Keys past that bound hold stale or zero entries and are never seen. Returns [B, 1, num_new, cache_len].
  """
  key_pos = jnp.arange(cache_len)[None, None, :]
  if causal:
    query_pos = index[:, None, None] + jnp.arange(num_new)[None, :, None]
    mask = key_pos <= query_pos
  else:
    mask = jnp.broadcast_to(key_pos < (index[:, None, None] + num_new), (index.shape[0], num_new, cache_len))
  return mask[:, None]


# ---------------------------------------------------------------------------------------------------------------
# Fixed sin-cos position embeddings.


def sincos_1d(positions, dim: int, max_period: float = 10_000.0) -> Array:
  """[...] positions (numpy or traced) -> [..., dim] (dim even): sin of dim/2 frequencies, then cos."""
  if dim % 2:
    raise ValueError(f'sin-cos embedding needs an even dimension, got {dim}')
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(dim // 2) / max(dim // 2, 1))
  angles = jnp.asarray(positions, jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def sincos_nd(coords, dim: int) -> Array:
  """[n, axes] coordinates -> [n, dim]: each axis gets an equal even share of dim, the remainder is zero."""
  num_axes = coords.shape[-1]
  per_axis = 2 * (dim // (2 * num_axes))
  parts = [sincos_1d(coords[:, a], per_axis) for a in range(num_axes)]
  parts.append(jnp.zeros((coords.shape[0], dim - per_axis * num_axes), jnp.float32))
  return jnp.concatenate(parts, axis=-1)


# ---------------------------------------------------------------------------------------------------------------
# Dense layers with logical axis names.


class Dense(nn.Dense):
  """`nn.Dense` (same parameters, same initialisation) applied to the input flattened to 2-D, [..., D] -> [N, D].

  On [B, S, D] activations nn.Dense's kernel gradient contracts over two axes (batch and length) at once, a 3-D
  dot_general that XLA:CPU runs far slower than the 2-D matmul [D, N] x [N, F] it becomes after the reshape. The
  reshape merges leading axes only, so a batch-sharded input stays sharded the same way.
  """

  def __call__(self, inputs: Array) -> Array:
    lead = inputs.shape[:-1]
    y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
    return y.reshape(*lead, y.shape[-1])


def dense(features: int, names: tuple[str, str], dtype: Dtype, name: str, use_bias: bool = True,
          kernel_init=nn.initializers.xavier_uniform()) -> Dense:
  return Dense(
      features, dtype=dtype, param_dtype=jnp.float32, use_bias=use_bias, name=name,
      kernel_init=logical_init(kernel_init, names),
      bias_init=logical_init(nn.initializers.zeros_init(), (names[1],)))


def layer_norm(dtype: Dtype, name: Optional[str] = None) -> nn.LayerNorm:
  return nn.LayerNorm(
      dtype=dtype, param_dtype=jnp.float32, name=name,
      scale_init=logical_init(nn.initializers.ones_init(), ('norm',)),
      bias_init=logical_init(nn.initializers.zeros_init(), ('norm',)))


class Mlp(nn.Module):
  """[B, S, D] -> [B, S, D]: Dense(mlp_dim), GELU, Dense(D)."""
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    width = x.shape[-1]
    h = dense(self.mlp_dim, ('embed', 'mlp'), self.dtype, 'fc1')(x)
    h = constrain(nn.gelu(h), BATCH_LENGTH_MLP)
    return dense(width, ('mlp', 'embed'), self.dtype, 'fc2')(h)


class HeadsProjection(nn.Module):
  """[B, S, D] -> [B, S, heads, head_dim] with a kernel [D, heads, head_dim] named (embed, heads, kv)."""
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
    kernel = self.param('kernel', logical_init(init, ('embed', 'heads', 'kv')),
                        (x.shape[-1], self.num_heads, self.head_dim), jnp.float32)
    bias = self.param('bias', logical_init(nn.initializers.zeros_init(), ('heads', 'kv')),
                      (self.num_heads, self.head_dim), jnp.float32)
    return jnp.einsum('bsd,dhk->bshk', x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class OutProjection(nn.Module):
  """[B, S, heads, head_dim] -> [B, S, D] with a kernel [heads, head_dim, D] named (heads, kv, embed)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y: Array) -> Array:
    init = nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
    kernel = self.param('kernel', logical_init(init, ('heads', 'kv', 'embed')), (*y.shape[-2:], self.features),
                        jnp.float32)
    bias = self.param('bias', logical_init(nn.initializers.zeros_init(), ('embed',)), (self.features,), jnp.float32)
    return jnp.einsum('bshk,hkd->bsd', y.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


ATTENTION_IMPLEMENTATIONS = (None, 'xla', 'cudnn', 'auto')


@functools.lru_cache(maxsize=None)
def _nvidia_gpu() -> bool:
  return jax.default_backend() == 'gpu' and 'nvidia' in jax.devices()[0].device_kind.lower()


def cudnn_supports(query_shape: tuple[int, ...], key_length: int, dtype, masked: bool,
                   nvidia_gpu: Optional[bool] = None) -> bool:
  """Whether `jax.nn.dot_product_attention`'s cuDNN kernel takes an attention, by the conditions jax checks before
  calling it when the kernel trains: an NVIDIA GPU, bfloat16 or float16, a head dim that is a multiple of 8 and at
  most 128 and, under a mask (which the kernel takes as a bias), even query and key lengths. Else that call raises
  NotImplementedError, at trace time or, inside a rematerialised scan, when the backward is built.

  Measured on one H100 (benchmarks/accelerator.py, `3b`, remat full, batch 28): every attention of the train step
  through cuDNN took 1.61 s a step against 2.06 s through the XLA computation, the loss equal to 3e-5."""
  nvidia_gpu = _nvidia_gpu() if nvidia_gpu is None else nvidia_gpu
  head_dim, query_length = query_shape[-1], query_shape[1]
  return (nvidia_gpu and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and
          head_dim % 8 == 0 and head_dim <= 128 and (not masked or (query_length % 2 == 0 and key_length % 2 == 0)))


def dot_product_attention(q: Array, k: Array, v: Array, mask: Optional[Array] = None, causal: bool = False,
                          implementation: Optional[str] = None, heads_major: bool = False) -> Array:
  """Softmax attention, q [B, Q, heads, hd], k and v [B, K, heads, hd] ([B, heads, K, hd] if `heads_major`) ->
  [B, Q, heads, hd]; mask a bool array broadcasting to [B, heads, Q, K] (True = attend) or `causal` (query i sees
  keys <= i).

  'cudnn' is `jax.nn.dot_product_attention`'s fused cuDNN kernel; 'auto' takes it where `cudnn_supports` the
  attention (on NVIDIA GPUs) and 'xla' elsewhere. Otherwise (None or 'xla') this writes out the
  same computation as `jax.nn.dot_product_attention`'s XLA implementation (scores and softmax in float32,
  probabilities cast to the values' dtype) without its full-size boolean mask: that one builds
  `ones_like(scores) & mask` at [B, heads, Q, K] and vmaps over query groups, and on XLA:CPU its forward and
  backward over the `small` preset's block-causal AV attention at 512 frames took 289 ms against 124 ms here.
  """
  if implementation == 'auto':
    key_length = k.shape[2] if heads_major else k.shape[1]
    implementation = 'cudnn' if cudnn_supports(q.shape, key_length, q.dtype, mask is not None) else 'xla'
  if implementation == 'cudnn':
    if heads_major:
      k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation='cudnn')
  if implementation not in (None, 'xla'):
    raise ValueError(f'attention implementation {implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}')
  probs = attention_weights(q, k, mask, causal, heads_major).astype(v.dtype)
  return jnp.einsum(f'bhqk,{"bhkd" if heads_major else "bkhd"}->bqhd', probs, v)


def attention_weights(q: Array, k: Array, mask: Optional[Array] = None, causal: bool = False,
                      heads_major: bool = False) -> Array:
  """The softmax weights [B, heads, Q, K] of `dot_product_attention` (its XLA computation), in float32: scores q.k
  in float32 times 1/sqrt(hd), masked, softmax in float32."""
  scores = jnp.einsum(f'bqhd,{"bhkd" if heads_major else "bkhd"}->bhqk', q, k,
                      preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
  if causal:  # from iotas, which XLA fuses into the select, rather than a constant array read from memory
    causal_mask = (jax.lax.broadcasted_iota(jnp.int32, scores.shape[-2:], 0) >=
                   jax.lax.broadcasted_iota(jnp.int32, scores.shape[-2:], 1))
    mask = causal_mask if mask is None else jnp.logical_and(mask, causal_mask)
  if mask is not None:
    scores = jnp.where(mask, scores, -0.7 * float(np.finfo(np.float32).max))
  return jax.nn.softmax(scores, axis=-1)


def block_causal_attention(q: Array, k: Array, v: Array, chunk_tokens: int, query_groups: int,
                           implementation: Optional[str] = None) -> Array:
  """`dot_product_attention` under `block_causal_mask` (chunks of `chunk_tokens` tokens), skipping keys that no
  query of a group may see.

  The queries are cut into `query_groups` runs of whole chunks; a run attends only to the keys up to its own last
  chunk, under the mask's rows for it. That computes (G+1)/(2G) of the (query, key) pairs of one dense masked
  attention (9/16 for G = 8), the block-causal mask itself allowing (T+1)/(2T). Same result, to rounding: the
  skipped pairs are masked anyway. G = 1 is the dense masked attention.
  """
  length = q.shape[1]
  if length % chunk_tokens:
    raise ValueError(f'{length} tokens are not whole chunks of {chunk_tokens}')
  chunks = length // chunk_tokens
  groups = max(1, min(query_groups, chunks))
  bounds = [chunk_tokens * (chunks * g // groups) for g in range(groups + 1)]
  chunk_of = np.arange(length) // chunk_tokens
  outputs = []
  for start, end in zip(bounds[:-1], bounds[1:]):
    mask = chunk_of[start:end, None] >= chunk_of[None, :end]
    outputs.append(dot_product_attention(q[:, start:end], k[:, :end], v[:, :end], mask, False, implementation))
  return outputs[0] if groups == 1 else jnp.concatenate(outputs, axis=1)


class Attention(nn.Module):
  """Multi-head attention through `dot_product_attention` ([B, S, heads, head_dim] layout).

  `__call__` attends queries of `x_q` to keys and values projected from `x_kv`; `project_kv` and `attend` are the
  same computation split in two, for callers that keep keys and values in a cache.
  """
  num_heads: int
  head_dim: int
  out_features: int
  dtype: Dtype = jnp.float32
  implementation: Optional[str] = None  # ATTENTION_IMPLEMENTATIONS (dot_product_attention)

  def setup(self):
    self.query, self.key, self.value = (HeadsProjection(self.num_heads, self.head_dim, self.dtype, name=name)
                                        for name in ('query', 'key', 'value'))
    self.out = OutProjection(self.out_features, self.dtype, name='out')

  def project_kv(self, x_kv: Array) -> tuple[Array, Array]:
    k = constrain(self.key(x_kv), BATCH_LENGTH_HEADS_KV)
    v = constrain(self.value(x_kv), BATCH_LENGTH_HEADS_KV)
    return k, v

  def attend(self, x_q: Array, k: Array, v: Array, mask: Optional[Array] = None, causal: bool = False,
             chunk_tokens: Optional[int] = None, query_groups: int = 1, heads_major: bool = False) -> Array:
    """`chunk_tokens`: the attention is block-causal over chunks of that many tokens (`mask` must be None), computed
    by `block_causal_attention` in `query_groups` groups. `heads_major`: k and v are [B, heads, K, hd] (a cache)."""
    q = constrain(self.query(x_q), BATCH_LENGTH_HEADS_KV)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if chunk_tokens is not None:
      y = block_causal_attention(q, k, v, chunk_tokens, query_groups, self.implementation)
    else:
      y = dot_product_attention(q, k, v, mask, causal, self.implementation, heads_major)
    return constrain(self.out(y), BATCH_LENGTH_EMBED)

  def __call__(self, x_q: Array, x_kv: Array, mask: Optional[Array] = None, causal: bool = False,
               chunk_tokens: Optional[int] = None, query_groups: int = 1) -> Array:
    k, v = self.project_kv(x_kv)
    return self.attend(x_q, k, v, mask, causal, chunk_tokens, query_groups)


def _write_at(buffer: Array, new: Array, index: Array) -> Array:
  """Writes new [B, s, heads, hd] into a heads-major cache buffer [B, heads, C, hd] at per-example offsets index
  [B] (index + s <= C): a scatter of whole rows, which XLA updates in place."""
  rows = jnp.arange(buffer.shape[0])[:, None]
  positions = index[:, None] + jnp.arange(new.shape[1])[None, :]
  return buffer.at[rows, :, positions].set(new.astype(buffer.dtype), indices_are_sorted=True, unique_indices=True,
                                           mode='promise_in_bounds')


class Block(nn.Module):
  """Pre-LayerNorm Transformer layer: self-attention, optional cross-attention to a context, MLP.

  Full mode (cache None): x [B, S, D] attends under `self_mask` ([B|1, 1, S, S] bool), causally (`causal`), or
  block-causally over chunks of `chunk_tokens` tokens (`block_causal_attention` in `query_groups` groups); a context
  of B / G rows is shared by G consecutive rows of x each.
  Cached mode: x [B, s, D] holds s new positions written at `index` [B] into `cache['k'|'v']` [B, heads, C, hd];
  cross-attention keys and values are computed from `context` when it is given and stored in `cache['ck'|'cv']`,
  otherwise read from there, so they are computed once per sequence. Returns (x, new cache or None).
  The cache is heads-major, the layout of the attention's batched matmuls (batch and heads leading): with
  [B, C, heads, hd] XLA:CPU transposed every layer's whole cache at every decoding step, a fifth of its time.
  """
  num_heads: int
  mlp_dim: int
  causal: bool = False
  cross_attention: bool = False
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None
  chunk_tokens: Optional[int] = None
  query_groups: int = 8

  @nn.compact
  def __call__(self, x, cache, self_mask, context, context_mask, index, deterministic: bool):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads {self.num_heads}')
    attn_kw = dict(num_heads=self.num_heads, head_dim=width // self.num_heads, out_features=width,
                   dtype=self.dtype, implementation=self.attention_impl)
    drop = (lambda y: y) if self.dropout_rate == 0.0 else (
        lambda y: nn.Dropout(self.dropout_rate)(y, deterministic=deterministic))
    x = constrain(x, BATCH_LENGTH_EMBED)
    new_cache = None if cache is None else dict(cache)

    y = layer_norm(self.dtype, 'ln_self')(x)
    self_attn = Attention(**attn_kw, name='self_attn')
    if cache is None:
      if self.chunk_tokens is not None and (self_mask is not None or self.causal):
        raise ValueError('a block-causal Block takes neither a self_mask nor causal=True')
      y = self_attn(y, y, self_mask, causal=self.causal and self_mask is None, chunk_tokens=self.chunk_tokens,
                    query_groups=self.query_groups)
    else:
      k, v = self_attn.project_kv(y)
      new_cache['k'] = _write_at(cache['k'], k, index)
      new_cache['v'] = _write_at(cache['v'], v, index)
      mask = cached_attention_mask(index, y.shape[1], cache['k'].shape[2], self.causal)
      y = self_attn.attend(y, new_cache['k'], new_cache['v'], mask, heads_major=True)
    x = x + drop(y)

    if self.cross_attention:
      y = layer_norm(self.dtype, 'ln_cross')(x)
      cross_attn = Attention(**attn_kw, name='cross_attn')
      if cache is None:
        # Rows b*G .. b*G + G - 1 of x share row b of the context (G = 1 in training; TextDecoder.candidate_logits:
        # G texts scored over one example's latents): their queries attend together, and the context's keys and
        # values are projected once per example, not once per row.
        groups = x.shape[0] // context.shape[0]
        if groups * context.shape[0] != x.shape[0] or (groups > 1 and context_mask is not None and
                                                        context_mask.shape[-2] != 1):
          raise ValueError(f'{x.shape[0]} rows cannot share a context of {context.shape[0]} rows'
                           + ('' if context_mask is None else f' under a context mask {context_mask.shape}'))
        y = cross_attn(y.reshape(context.shape[0], groups * x.shape[1], width), context, context_mask)
        y = y.reshape(x.shape)
      else:
        if context is not None:
          ck, cv = cross_attn.project_kv(context)
          new_cache['ck'], new_cache['cv'] = (jnp.swapaxes(a, 1, 2).astype(cache[name].dtype)
                                              for a, name in ((ck, 'ck'), (cv, 'cv')))
        y = cross_attn.attend(y, new_cache['ck'], new_cache['cv'], context_mask, heads_major=True)
      x = x + drop(y)

    y = Mlp(self.mlp_dim, self.dtype, name='mlp')(layer_norm(self.dtype, 'ln_mlp')(x))
    x = constrain(x + drop(y), BATCH_LENGTH_EMBED)
    return x, new_cache


_BLOCK_FIELDS = ('num_heads', 'mlp_dim', 'causal', 'cross_attention', 'dropout_rate', 'dtype', 'attention_impl',
                 'chunk_tokens', 'query_groups')


class Stack(nn.Module):
  """`num_layers` Blocks, scanned (`nn.scan`, parameters stacked on a leading `layers` axis) or unrolled.

  `cache`, when given, holds per-layer buffers stacked on a leading axis of size num_layers. Each layer is
  rematerialised under `remat_policy` (a key of REMAT_POLICIES). Ends with a final LayerNorm.
  """
  num_layers: int
  num_heads: int
  mlp_dim: int
  causal: bool = False
  cross_attention: bool = False
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None
  chunk_tokens: Optional[int] = None  # full-mode self-attention block-causal over chunks of this many tokens
  query_groups: int = 8  # ... computed in this many groups of queries (block_causal_attention)
  scan_layers: bool = True
  remat_policy: str = 'none'

  @nn.compact
  def __call__(self, x, cache=None, self_mask=None, context=None, context_mask=None, index=None,
               deterministic: bool = True):
    x = x.astype(self.dtype)
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'model.remat_policy={self.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}')
    block_cls = Block
    if self.remat_policy != 'none':
      # Argument 0 is the module itself, so `deterministic` is argument 7.
      block_cls = nn.remat(Block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan_layers,
                           static_argnums=(7,))
    block_kw = {name: getattr(self, name) for name in _BLOCK_FIELDS}
    if self.scan_layers:
      scanned = nn.scan(
          block_cls, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
          length=self.num_layers, metadata_params={nn.PARTITION_NAME: 'layers'})
      x, new_cache = scanned(**block_kw, name='layers')(
          x, cache, self_mask, context, context_mask, index, deterministic)
    else:
      caches = []
      for i in range(self.num_layers):
        layer_cache = None if cache is None else jax.tree.map(lambda c, i=i: c[i], cache)
        x, layer_cache = block_cls(**block_kw, name=f'layers_{i}')(
            x, layer_cache, self_mask, context, context_mask, index, deterministic)
        caches.append(layer_cache)
      new_cache = None if cache is None else jax.tree.map(lambda *c: jnp.stack(c), *caches)
    return layer_norm(self.dtype, 'ln_final')(x), new_cache


def init_stack_cache(num_layers: int, num_heads: int, width: int, batch_size: int, length: int,
                     context_length: Optional[int] = None, dtype: Dtype = jnp.float32) -> dict[str, Array]:
  """Empty cached-mode buffers for a Stack, heads-major: k, v [layers, B, heads, length, hd], and ck, cv
  [layers, B, heads, context_length, hd] for cross-attention."""
  shape = (num_layers, batch_size, num_heads, length, width // num_heads)
  cache = dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
  if context_length is not None:
    ctx_shape = (num_layers, batch_size, num_heads, context_length, width // num_heads)
    cache.update(ck=jnp.zeros(ctx_shape, dtype), cv=jnp.zeros(ctx_shape, dtype))
  return cache
