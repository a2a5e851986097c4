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


class Attention(nn.Module):
  """Multi-head attention through `jax.nn.dot_product_attention` ([B, S, heads, head_dim] layout).

  `__call__` attends queries of `x_q` to keys and values projected from `x_kv`; `project_kv` and `attend` are the
  same computation split in two, for callers that keep keys and values in a cache.
  """
  num_heads: int
  head_dim: int
  out_features: int
  dtype: Dtype = jnp.float32
  implementation: Optional[str] = None  # None (XLA picks), 'xla' or 'cudnn'.

  def setup(self):
    self.query, self.key, self.value = (HeadsProjection(self.num_heads, self.head_dim, self.dtype, name=name)
                                        for name in ('query', 'key', 'value'))
    self.out = OutProjection(self.out_features, self.dtype, name='out')

  def project_kv(self, x_kv: Array) -> tuple[Array, Array]:
    k = constrain(self.key(x_kv), BATCH_LENGTH_HEADS_KV)
    v = constrain(self.value(x_kv), BATCH_LENGTH_HEADS_KV)
    return k, v

  def attend(self, x_q: Array, k: Array, v: Array, mask: Optional[Array] = None, causal: bool = False) -> Array:
    q = constrain(self.query(x_q), BATCH_LENGTH_HEADS_KV)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    y = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=self.implementation)
    return constrain(self.out(y), BATCH_LENGTH_EMBED)

  def __call__(self, x_q: Array, x_kv: Array, mask: Optional[Array] = None, causal: bool = False) -> Array:
    k, v = self.project_kv(x_kv)
    return self.attend(x_q, k, v, mask, causal)


def _write_at(buffer: Array, new: Array, index: Array) -> Array:
  """Writes new [B, s, ...] into buffer [B, C, ...] at per-example offsets index [B]."""
  def one(b, n, i):
    return jax.lax.dynamic_update_slice_in_dim(b, n.astype(b.dtype), i, axis=0)
  return jax.vmap(one)(buffer, new, index)


class Block(nn.Module):
  """Pre-LayerNorm Transformer layer: self-attention, optional cross-attention to a context, MLP.

  Full mode (cache None): x [B, S, D] attends under `self_mask` ([B|1, 1, S, S] bool) or causally (`causal`).
  Cached mode: x [B, s, D] holds s new positions written at `index` [B] into `cache['k'|'v']` [B, C, heads, hd];
  cross-attention keys and values are computed from `context` when it is given and stored in `cache['ck'|'cv']`,
  otherwise read from there, so they are computed once per sequence. Returns (x, new cache or None).
  """
  num_heads: int
  mlp_dim: int
  causal: bool = False
  cross_attention: bool = False
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None

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
      y = self_attn(y, y, self_mask, causal=self.causal and self_mask is None)
    else:
      k, v = self_attn.project_kv(y)
      new_cache['k'] = _write_at(cache['k'], k, index)
      new_cache['v'] = _write_at(cache['v'], v, index)
      mask = cached_attention_mask(index, y.shape[1], cache['k'].shape[1], self.causal)
      y = self_attn.attend(y, new_cache['k'], new_cache['v'], mask)
    x = x + drop(y)

    if self.cross_attention:
      y = layer_norm(self.dtype, 'ln_cross')(x)
      cross_attn = Attention(**attn_kw, name='cross_attn')
      if cache is None:
        y = cross_attn(y, context, context_mask)
      else:
        if context is not None:
          ck, cv = cross_attn.project_kv(context)
          new_cache['ck'], new_cache['cv'] = ck.astype(cache['ck'].dtype), cv.astype(cache['cv'].dtype)
        y = cross_attn.attend(y, new_cache['ck'], new_cache['cv'], context_mask)
      x = x + drop(y)

    y = Mlp(self.mlp_dim, self.dtype, name='mlp')(layer_norm(self.dtype, 'ln_mlp')(x))
    x = constrain(x + drop(y), BATCH_LENGTH_EMBED)
    return x, new_cache


_BLOCK_FIELDS = ('num_heads', 'mlp_dim', 'causal', 'cross_attention', 'dropout_rate', 'dtype', 'attention_impl')


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
  """Empty cached-mode buffers for a Stack: k, v [layers, B, length, heads, hd], and ck, cv for cross-attention."""
  shape = (num_layers, batch_size, length, num_heads, width // num_heads)
  cache = dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
  if context_length is not None:
    ctx_shape = (num_layers, batch_size, context_length, num_heads, width // num_heads)
    cache.update(ck=jnp.zeros(ctx_shape, dtype), cv=jnp.zeros(ctx_shape, dtype))
  return cache
