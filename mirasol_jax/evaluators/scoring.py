"""Scoring given texts by the decoder's likelihood: the candidates of multiple choice and classification.

Each candidate (an answer option, a class name) is written after the example's prompt, as a target would be in
training (BOS, prompt, candidate, EOS), and scored by the log-probability the decoder gives its tokens and the EOS
after them, teacher-forced over the example's AV latents; with `length_normalize`, divided by their number, so
that long class names are not penalised for their length. Pure functions, meant to run inside an evaluator's
compiled step.
"""
from __future__ import annotations

from typing import Optional, Sequence

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


def token_log_probs(model, variables, latents: Array, tokens: Array, positions: Optional[Array] = None) -> Array:
  """latents [B, T, m, D] or [B, T*m, D]; tokens [B, K, L] (K texts per example) -> [B, K, L - 1] float32, the
  log-probability of each token after the first, teacher-forced over its example's latents. With `positions`
  [B, W] (each in 1..L-1): [B, K, W], the log-probability of the tokens at those positions only, whose logits alone
  are computed.

  Through TextDecoder.candidate_logits: the decoder's cross-attention projects each example's latents once for its
  K texts, rather than K times from latents repeated K times (the same numbers, to rounding)."""
  batch = tokens.shape[0]
  latents = latents.reshape(batch, -1, latents.shape[-1])
  if positions is None:
    logits = model.apply(variables, tokens, latents, method=mirasol.Model.candidate_logits)[:, :, :-1]
    targets = tokens[:, :, 1:]
  else:
    logits = model.apply(variables, tokens, latents, positions - 1, method=mirasol.Model.candidate_logits)
    targets = jnp.take_along_axis(tokens, jnp.broadcast_to(positions[:, None, :], logits.shape[:3]), axis=2)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def log_likelihoods(model, variables, latents: Array, tokens: Array, mask: Array, length_normalize: bool,
                    window: Optional[int] = None) -> Array:
  """latents [B, T, m, D] or [B, T*m, D]; tokens, mask [B, K, L] -> [B, K] log-probability of the masked tokens
  (their mean with length_normalize); -inf for a candidate with no tokens.

  `window`: at most this many consecutive positions of an example hold masked tokens, from the first of them on (the
  longest candidate and its EOS: candidate_tokens' candidates.shape[-1] + 1). Then only the logits there are made
  (TextDecoder.candidate_logits), the same scores; positions past the window are not read."""
  if window is None:
    picked = token_log_probs(model, variables, latents, tokens)
    weights = mask[:, :, 1:]
  else:
    length = tokens.shape[-1]
    first = jnp.where(jnp.any(mask, axis=-1), jnp.argmax(mask, axis=-1), length)  # [B, K]
    start = jnp.maximum(jnp.min(first, axis=1), 1)  # [B]: position 0 (BOS) is never scored
    wanted = start[:, None] + jnp.arange(window)[None, :]  # [B, W]
    positions = jnp.minimum(wanted, length - 1)  # past the buffer: read nothing (masked below)
    picked = token_log_probs(model, variables, latents, tokens, positions)
    weights = jnp.take_along_axis(mask, jnp.broadcast_to(positions[:, None, :], picked.shape), axis=2)
    weights = weights & (wanted < length)[:, None, :]
  weights = weights.astype(jnp.float32)
  total = jnp.sum(picked * weights, axis=-1)
  count = jnp.sum(weights, axis=-1)
  score = total / jnp.maximum(count, 1.0) if length_normalize else total
  return jnp.where(count > 0, score, -jnp.inf)
