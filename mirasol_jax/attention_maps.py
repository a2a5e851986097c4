"""Where the text decoder looks: the cross-attention weights of an answer over the AV latents, summed per chunk.

The decoder (models/text_decoder.py) cross-attends, in every layer and head, from each text position to all T*m AV
latents h [B, T, m, D] (chunk-major: latent s belongs to chunk s // m). For a generated answer, the weights of the
query that chose each answer token say which latents, hence which chunks of the clip, that choice read:

  answer_attention(model, params, batch, max_new_tokens) -> AnswerAttention
      .tokens    [N]                          the greedy answer (Model.encode_av, decoding.greedy_decode), EOS included
      .weights   [layers, heads, N, T*m]      each token's cross-attention weights over the latents
      .by_chunk  [layers, N, T]               summed over each chunk's m latents, averaged over heads (rows sum to 1)

The weights are the ones the model computes, not a re-implementation of the decoder: the answer is written after its
prompt and the sequence goes through the model's own teacher-forced path (Model.text_logits), with Flax capturing the
queries and keys that each layer's cross-attention projects (`capture_intermediates`). Their softmax is what
`layers.dot_product_attention` computes inside the layer: logits q.k in float32 (bfloat16 operands accumulate in
float32), times 1/sqrt(head_dim), softmax in float32, no mask (the decoder's cross-attention has none: every latent
is visible to every text position). The row of answer token j is that of the position before it, whose output chose
it: under causal self-attention the teacher-forced pass computes at that position what KV-cached decoding computed
when it generated the token. tests/test_notebooks.py checks the weights against each layer's own output
(out_projection(weights @ v) is the cross-attention output the model computed) and the rows against the tokens
(their logits' argmax is the generated token).

Flax drops intermediates inside `nn.scan`, so a model with scanned layers (`model.scan_layers`, the default of the
large configs) is applied here with its text decoder's layers unrolled: the same Block modules, each given its slice
of the stacked parameters (`unrolled`); the logits are the scanned model's (checked by the tests).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mirasol_jax import decoding
from mirasol_jax.data import tokenizer as tokenizer_lib
from mirasol_jax.models import layers as layers_lib
from mirasol_jax.models import mirasol

Array = jax.Array

_PROJECTIONS = ('query', 'key', 'value')


def unrolled(model: mirasol.Model, params: Mapping[str, Any]) -> tuple[mirasol.Model, dict[str, Any]]:
  """The model with unscanned, unrematerialised layers and its parameters with the text decoder's stacked layer
  parameters ('layers', a leading axis of depth) split into 'layers_0' .. 'layers_{depth-1}'; unchanged when the
  layers are not scanned. Only the text decoder's parameters are rearranged: apply it to the text decoder alone."""
  model = model.clone(scan_layers=False, remat_policy='none')
  decoder = dict(params['text_decoder'])
  stack = dict(decoder['stack'])
  if 'layers' in stack:
    scanned = stack.pop('layers')
    for i in range(int(model.text['depth'])):
      stack[f'layers_{i}'] = jax.tree.map(lambda leaf, i=i: leaf[i], scanned)
  decoder['stack'] = stack
  return model, {**params, 'text_decoder': decoder}


def _is_cross_projection(module, method_name: str) -> bool:
  path = module.path
  return (method_name == '__call__' and len(path) >= 3 and path[0] == 'text_decoder' and
          ((path[-2] == 'cross_attn' and path[-1] in _PROJECTIONS) or path[-1] == 'cross_attn'))


def attention_weights(queries: Array, keys: Array) -> Array:
  """Softmax attention weights [B, heads, L, S] of queries [B, L, heads, hd] over keys [B, S, heads, hd], as the
  decoder's cross-attention computes them (layers.attention_weights: no mask)."""
  return layers_lib.attention_weights(queries, keys)


@flax.struct.dataclass
class CrossAttention:
  """One teacher-forced pass of the decoder over tokens [B, L] and latents [B, S, D], per layer (leading axis of
  every array but `logits`): what its cross-attention projected and computed. A pytree: jit may return it."""
  logits: Array  # [B, L, vocab], Model.text_logits
  queries: Array  # [layers, B, L, heads, hd]
  keys: Array  # [layers, B, S, heads, hd]
  values: Array  # [layers, B, S, heads, hd]
  outputs: Array  # [layers, B, L, D]: the cross-attention's output (after its out projection), as the model computed it

  @property
  def weights(self) -> Array:
    """[layers, B, heads, L, S]."""
    return jax.vmap(attention_weights)(self.queries, self.keys)


def cross_attention(model: mirasol.Model, params: Mapping[str, Any], tokens: Array, latents: Array) -> CrossAttention:
  """The decoder's cross-attention in every layer for text tokens [B, L] over AV latents [B, T, m, D] (or
  [B, T*m, D]), captured from Model.text_logits."""
  latents = latents.reshape(tokens.shape[0], -1, latents.shape[-1])
  model, params = unrolled(model, params)
  logits, state = model.apply({'params': params}, tokens, latents, method=mirasol.Model.text_logits,
                              capture_intermediates=_is_cross_projection, mutable=['intermediates'])
  stack = state['intermediates']['text_decoder']['stack']
  layers = [stack[f'layers_{i}']['cross_attn'] for i in range(int(model.text['depth']))]
  q, k, v = (jnp.stack([layer[name]['__call__'][0] for layer in layers]) for name in _PROJECTIONS)
  outputs = jnp.stack([layer['__call__'][0] for layer in layers])
  return CrossAttention(logits, q, k, v, outputs)


def by_chunk(weights: Array, num_chunks: int) -> Array:
  """Weights [..., T*m] over chunk-major latents -> [..., T], each chunk's m latents summed."""
  return weights.reshape(*weights.shape[:-1], num_chunks, weights.shape[-1] // num_chunks).sum(-1)


@dataclasses.dataclass
class AnswerAttention:
  """The greedy answer to one example's prompt and the cross-attention of each of its tokens (see the module
  docstring); numpy arrays."""
  tokens: np.ndarray  # [N] generated ids, up to and including EOS when it came within max_new_tokens
  positions: np.ndarray  # [N] the text position of the query that chose each token (the position before it)
  weights: np.ndarray  # [layers, heads, N, T*m] float32
  num_chunks: int

  @property
  def by_chunk(self) -> np.ndarray:
    """[layers, N, T]: each token's weight on each chunk (its m latents summed), averaged over heads."""
    return np.asarray(by_chunk(self.weights, self.num_chunks)).mean(axis=1)


def _answer_attention(model, params, batch, max_new_tokens: int, eos_id: int):
  """jit body: (generated [B, N], counted [B, N], positions [B, N], weights [B, layers, heads, N, S])."""
  variables = {'params': params}
  _, latents = model.apply(variables, batch, method=mirasol.Model.encode_av)
  generated = decoding.greedy_decode(model, variables, batch, max_new_tokens, eos_id, latents=latents)
  size, length = batch['text_tokens'].shape
  prompt_len = decoding.prompt_lengths(batch['text_loss_mask'])
  positions = prompt_len[:, None] + jnp.arange(max_new_tokens)[None, :]
  is_eos = generated == eos_id
  counted = ((jnp.cumsum(is_eos, axis=1) - is_eos) == 0) & (positions < length)  # up to the first EOS, in the buffer
  rows = jnp.arange(size)[:, None]
  tokens = decoding.prompt_only(batch['text_tokens'], prompt_len).at[rows, positions].set(
      jnp.where(counted, generated, tokenizer_lib.PAD_ID), mode='drop')
  weights = cross_attention(model, params, tokens, latents).weights  # [layers, B, heads, L, S]
  before = jnp.clip(positions - 1, 0, length - 1)
  weights = jnp.moveaxis(weights, 0, 1)[rows, :, :, before]  # [B, N, layers, heads, S]
  return generated, counted, before, jnp.moveaxis(weights, 1, 3)


def answer_attention(model: mirasol.Model, params: Mapping[str, Any], batch: Mapping[str, Any], max_new_tokens: int,
                     example: int = 0, eos_id: int = tokenizer_lib.EOS_ID) -> AnswerAttention:
  """The greedy answer (at most max_new_tokens) to the prompt of `batch`'s example `example` (its text_tokens and
  text_loss_mask: BOS and the prompt, as the evaluators and `answer` read them) and the decoder's cross-attention
  weights of each answer token over the example's AV latents. `batch` has the model's keys (mirasol.batch_shapes).
  Compiled once per model, batch shape and max_new_tokens."""
  generated, counted, positions, weights = _program(model, max_new_tokens, eos_id)(params, dict(batch))
  n = int(np.sum(np.asarray(counted[example])))
  weights = np.asarray(weights[example], np.float32)[:, :, :n]
  return AnswerAttention(np.asarray(generated[example, :n]), np.asarray(positions[example, :n]), weights,
                         int(model.num_chunks))


# jitted programs by (model, max_new_tokens, eos_id); a Model holds dicts, so it is not hashable: keyed by identity.
_PROGRAMS: dict[tuple[int, int, int], tuple[mirasol.Model, Any]] = {}


def _program(model: mirasol.Model, max_new_tokens: int, eos_id: int):
  key = (id(model), max_new_tokens, eos_id)
  if key not in _PROGRAMS or _PROGRAMS[key][0] is not model:
    _PROGRAMS[key] = (model, jax.jit(functools.partial(_answer_attention, model, max_new_tokens=max_new_tokens,
                                                       eos_id=eos_id)))
  return _PROGRAMS[key][1]
