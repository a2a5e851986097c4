"""Scoring given texts by the decoder's likelihood: the candidates of multiple choice and classification.

Each candidate (an answer option, a class name) is written after the example's prompt, as a target would be in
training (BOS, prompt, candidate, EOS), and scored by the log-probability the decoder gives its tokens and the EOS
after them, teacher-forced over the example's AV latents; with `length_normalize`, divided by their number, so
that long class names are not penalised for their length. Pure functions, meant to run inside an evaluator's
compiled step.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mirasol_jax.data import tokenizer as tokenizer_lib
from mirasol_jax.models import mirasol

Array = jax.Array


def encode_candidates(processor, texts: Sequence[Sequence[str]], max_candidates: int, max_len: int
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Token ids of each example's candidates -> (ids [B, max_candidates, max_len] int32, lengths [B, K] int32);
  absent candidates have length 0 (never chosen), ids past max_len are cut."""
  ids = np.zeros((len(texts), max_candidates, max_len), np.int32)
  lengths = np.zeros((len(texts), max_candidates), np.int32)
  for b, candidates in enumerate(texts):
    if len(candidates) > max_candidates:
      raise ValueError(f'{len(candidates)} candidates but the evaluator takes at most {max_candidates}')
    for k, text in enumerate(candidates):
      pieces = processor.encode(str(text))[:max_len] or [tokenizer_lib.UNK_ID]
      ids[b, k, :len(pieces)] = pieces
      lengths[b, k] = len(pieces)
  return ids, lengths


def candidate_tokens(tokens: Array, prompt_len: Array, candidates: Array, lengths: Array
                     ) -> tuple[Array, Array]:
  """Each example's prompt followed by each of its candidates and EOS.

  tokens [B, L] (the example's text; its first prompt_len [B] tokens are the prompt), candidates [B, K, Lc] with
  lengths [B, K] -> (tokens [B, K, L], target mask [B, K, L] marking the candidate's tokens and its EOS). A
  candidate that does not fit in L is cut, its EOS lost.
  """
  batch, length = tokens.shape
  positions = jnp.arange(length)[None, None, :]  # [1, 1, L]
  start = prompt_len[:, None, None]  # [B, 1, 1]
  offset = positions - start
  in_candidate = (offset >= 0) & (offset < lengths[:, :, None])
  candidate_ids = jnp.take_along_axis(candidates, jnp.clip(offset, 0, candidates.shape[-1] - 1), axis=2)
  prompt = jnp.broadcast_to(tokens[:, None, :], (batch, candidates.shape[1], length))
  out = jnp.where(positions < start, prompt, tokenizer_lib.PAD_ID)
  out = jnp.where(in_candidate, candidate_ids, out)
  is_eos = offset == lengths[:, :, None]
  out = jnp.where(is_eos, tokenizer_lib.EOS_ID, out)
  mask = (in_candidate | is_eos) & (lengths[:, :, None] > 0)
  return out.astype(jnp.int32), mask


def token_log_probs(model, variables, latents: Array, tokens: Array) -> Array:
  """latents [B, T, m, D] or [B, T*m, D]; tokens [B, K, L] (K texts per example) -> [B, K, L - 1] float32, the
  log-probability of each token after the first, teacher-forced over its example's latents.

  Through TextDecoder.candidate_logits: the decoder's cross-attention projects each example's latents once for its
  K texts, rather than K times from latents repeated K times (the same numbers, to rounding)."""
  batch = tokens.shape[0]
  latents = latents.reshape(batch, -1, latents.shape[-1])
  logits = model.apply(variables, tokens, latents, method=mirasol.Model.candidate_logits)
  return _picked_log_probs(logits[:, :, :-1], tokens[:, :, 1:])


def log_likelihoods(model, variables, latents: Array, tokens: Array, mask: Array, length_normalize: bool) -> Array:
  """latents [B, T, m, D] or [B, T*m, D]; tokens, mask [B, K, L] -> [B, K] log-probability of the masked tokens
  (their mean with length_normalize); -inf for a candidate with no tokens."""
  picked = token_log_probs(model, variables, latents, tokens)
  return _combine(picked, mask[:, :, 1:], length_normalize)


def prefix_log_likelihoods(model, variables, latents: Array, tokens: Array, prompt_len: Array, candidates: Array,
                           lengths: Array, length_normalize: bool) -> Array:
  """The scores of log_likelihoods on candidate_tokens(tokens, prompt_len, candidates, lengths), with each
  example's prompt run once for its K candidates rather than once per candidate
  (TextDecoder.prefix_candidate_logits): the decoder runs L + K*Lc positions instead of K*L, the vocabulary
  projection 1 + K*Lc. For K class names of a few tokens that is several times less work than log_likelihoods;
  when the candidates are as long as the text buffer (Lc = L) it is more.

  latents [B, T, m, D] or [B, T*m, D]; tokens [B, L]; prompt_len [B]; candidates [B, K, Lc] with lengths [B, K] ->
  [B, K]: the log-probability of each candidate's tokens and its EOS after the prompt (their mean with
  length_normalize), those past the text buffer left out as candidate_tokens cuts them; -inf for a candidate
  with no tokens."""
  batch, length = tokens.shape
  latents = latents.reshape(batch, -1, latents.shape[-1])
  first, rest = model.apply(variables, tokens, prompt_len, candidates, latents,
                            method=mirasol.Model.prefix_candidate_logits)
  lc = candidates.shape[-1]
  j = jnp.arange(lc + 1)[None, None, :]
  # The token scored at each candidate's place j: its token j, then EOS at j = its length.
  targets = jnp.where(j < lengths[:, :, None], jnp.pad(candidates, ((0, 0), (0, 0), (0, 1))), tokenizer_lib.EOS_ID)
  picked = jnp.concatenate([_picked_log_probs(first[:, None, None], targets[:, :, :1]),  # [B, K, 1]
                            _picked_log_probs(rest, targets[:, :, 1:])], axis=-1)  # [B, K, Lc]
  # Scored: the candidate's tokens and its EOS, where they fit in the buffer; never position 0 (log_likelihoods
  # scores from position 1: a prompt_len of 0 has no logits before its first token).
  at = prompt_len[:, None, None] + j
  weights = (j <= lengths[:, :, None]) & (at < length) & (at >= 1) & (lengths[:, :, None] > 0)
  return _combine(picked, weights, length_normalize)


def _picked_log_probs(logits: Array, targets: Array) -> Array:
  """logits [..., vocab] (broadcasting against targets' leading axes), targets [...] -> float32 log-probability of
  each target."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def _combine(picked: Array, weights: Array, length_normalize: bool) -> Array:
  """Log-probabilities [B, K, N] of the scored tokens where weights (bool) -> their sum or mean [B, K]; -inf where
  none is scored."""
  weights = weights.astype(jnp.float32)
  total = jnp.sum(picked * weights, axis=-1)
  count = jnp.sum(weights, axis=-1)
  score = total / jnp.maximum(count, 1.0) if length_normalize else total
  return jnp.where(count > 0, score, -jnp.inf)
