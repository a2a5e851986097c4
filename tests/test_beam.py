"""Beam search (decoding.beam_decode) on a tiny random model: greedy at beam 1, exact against brute force when the
beam holds every prefix, scores that the teacher-forced decoder agrees with, padding after EOS and at the end of
the text buffer, and no worse than greedy with a larger beam."""
import functools
import itertools

import flax.linen as nn
import jax
import numpy as np

from conftest import random_batch, tiny_config
from mirasol_jax import decoding
from mirasol_jax.models import mirasol

PAD = -1  # not a token of the vocabulary, so that padding cannot be mistaken for an answer token.
VOCAB = 8
NEW = 6  # more than the 2 and 1 text positions left after the prompts of examples 1 and 2.
EOS_IDS = (-1,) + tuple(range(VOCAB))  # never, then each token in turn: EOS cuts answers at many places.


@functools.lru_cache(maxsize=None)
def _setup():
  """The text decoder of a tiny random model with VOCAB tokens, random AV latents in place of encoded clips, and
  four examples whose prompts end at 8, 14, 15 and 4 of their 16 text positions.

  Its output head is untied from the token embeddings: at initialisation, tied embeddings mostly repeat the last
  token, an untied head gives answers that change along the text and depend on the earlier tokens.
  """
  config = tiny_config('ttm', vocab_size=VOCAB)
  config.model.text = dict(config.model.text, tie_embeddings=False)
  model = mirasol.Model(**config.model)
  batch = random_batch(config, 4)
  for b, prompt_len in enumerate((8, 14, 15, 4)):
    batch['text_loss_mask'][b] = np.arange(batch['text_loss_mask'].shape[1]) >= prompt_len
  latents = jax.random.normal(jax.random.key(1), (4, model.num_chunks * model.tokens_per_chunk, model.width))
  init = jax.jit(lambda key, tokens, latents: model.init(key, tokens, latents, method=mirasol.Model.text_logits))
  params = nn.meta.unbox(init(jax.random.key(0), batch['text_tokens'], latents)['params'])
  return model, {'params': params}, batch, latents


@functools.lru_cache(maxsize=None)
def _beam(beam_size, max_new_tokens=NEW):
  """Jitted beam_decode(params, batch, latents, eos_id, length_penalty) of _setup()'s model, padding with PAD."""
  model = _setup()[0]
  return jax.jit(lambda p, b, latents, eos, lp: decoding.beam_decode(
      model, p, b, max_new_tokens, eos, beam_size, lp, PAD, latents=latents))


@functools.lru_cache(maxsize=None)
def _text_log_probs():
  model = _setup()[0]
  return jax.jit(lambda p, t, l: jax.nn.log_softmax(model.apply(p, t, l, method=mirasol.Model.text_logits)))


def _prompts():
  """-> prompts [B, L] (the target tokens blanked), prompt lengths [B], text positions left after them [B]."""
  batch = _setup()[2]
  prompt_len = np.asarray(decoding.prompt_lengths(batch['text_loss_mask']))
  prompts = np.asarray(decoding.prompt_only(batch['text_tokens'], prompt_len))
  return prompts, prompt_len, prompts.shape[1] - prompt_len


def _teacher_forced(examples, answers):
  """Log-probabilities [n, N] that the teacher-forced decoder (Model.text_logits) gives the tokens of answers
  [n, N] written after the prompts of examples [n] (0 where they do not fit in the text buffer)."""
  _, params, _, latents = _setup()
  prompts, starts, _ = (a[examples] for a in _prompts())
  tokens, length = prompts.copy(), prompts.shape[1]
  positions = starts[:, None] + np.arange(answers.shape[1])
  fits = positions < length
  answers = np.where(answers == PAD, 0, answers)
  row, column = np.nonzero(fits)
  tokens[row, positions[row, column]] = answers[row, column]
  log_probs = np.asarray(_text_log_probs()(params, tokens, latents[examples]))
  rows = np.arange(len(examples))[:, None]
  return np.where(fits, log_probs[rows, np.minimum(positions, length) - 1, answers], 0.0)


def _lengths(answers, eos_id, room):
  """Tokens of each answer [n, N] up to its first EOS (included) and at most room [n]."""
  is_eos = answers == eos_id
  lengths = np.where(is_eos.any(1), np.argmax(is_eos, 1) + 1, answers.shape[1])
  return np.minimum(lengths, room)


def _normalised(log_probs, lengths, length_penalty):
  kept = np.arange(log_probs.shape[1]) < lengths[:, None]
  return np.sum(np.where(kept, log_probs, 0.0), 1) / ((5.0 + lengths) / 6.0) ** length_penalty


def test_beam_of_one_is_greedy_decode_token_for_token():
  model, params, batch, latents = _setup()
  greedy = jax.jit(lambda p, b, latents, eos: decoding.greedy_decode(model, p, b, NEW, eos, PAD, latents))
  cut_short = 0
  for eos_id in EOS_IDS:
    expected = np.asarray(greedy(params, batch, latents, eos_id))
    tokens, scores = _beam(1)(params, batch, latents, eos_id, 0.0)
    np.testing.assert_array_equal(tokens, expected)
    assert np.all(np.isfinite(scores)) and np.all(np.asarray(scores) < 0)
    if eos_id < 0:
      assert len(set(expected[0]) | set(expected[3])) > 3, expected  # not one repeated token.
    cut_short += np.sum(expected[[0, 3], -1] == PAD)
  assert cut_short >= 4, cut_short  # EOS cuts some answers short.


def test_a_beam_holding_every_prefix_finds_the_brute_force_best_answer_and_score():
  new = 3
  _, params, batch, latents = _setup()
  continuations = np.array(list(itertools.product(range(VOCAB), repeat=new)), np.int32)
  examples = np.arange(len(batch['text_tokens']))
  log_probs = [_teacher_forced(np.full(len(continuations), b), continuations) for b in examples]
  room = _prompts()[2]
  exact = _beam(VOCAB ** (new - 1), new)  # room for every prefix of new - 1 tokens: beam search is exact.
  cut_short = better_than_greedy = 0
  for eos_id, length_penalty in itertools.product(range(VOCAB), (0.0, 1.0)):
    tokens, scores = map(np.asarray, exact(params, batch, latents, eos_id, length_penalty))
    greedy = np.asarray(_beam(1, new)(params, batch, latents, eos_id, length_penalty)[0])
    for b in examples:
      # Every answer: a continuation cut after its first EOS or at the end of the text buffer, padded.
      lengths = _lengths(continuations, eos_id, np.full(len(continuations), room[b]))
      answers = np.where(np.arange(new) < lengths[:, None], continuations, PAD)
      answer_scores = _normalised(log_probs[b], lengths, length_penalty)
      best = np.argmax(answer_scores)
      runner_up = np.max(np.where(np.all(answers == answers[best], 1), -np.inf, answer_scores))
      assert answer_scores[best] - runner_up > 1e-4  # a unique best answer, whatever the rounding.
      np.testing.assert_array_equal(tokens[b], answers[best])
      np.testing.assert_allclose(scores[b], answer_scores[best], rtol=1e-5, atol=1e-5)
      cut_short += b in (0, 3) and answers[best, -1] == PAD
      better_than_greedy += np.any(tokens[b] != greedy[b])
  # Among the 64 cases checked: answers that end at an EOS before max_new_tokens, and answers greedy misses.
  assert cut_short >= 16 and better_than_greedy >= 12, (cut_short, better_than_greedy)


def test_scores_are_the_teacher_forced_scores_of_the_answers():
  _, params, batch, latents = _setup()
  examples = np.arange(len(batch['text_tokens']))
  for eos_id, length_penalty in itertools.product(EOS_IDS, (0.0, 1.0)):
    tokens, scores = map(np.asarray, _beam(4)(params, batch, latents, eos_id, length_penalty))
    lengths = _lengths(tokens, eos_id, _prompts()[2])
    expected = _normalised(_teacher_forced(examples, tokens), lengths, length_penalty)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


def test_finished_beams_pad_after_eos_and_at_the_end_of_the_text_buffer():
  _, params, batch, latents = _setup()
  for eos_id in EOS_IDS:
    tokens, _ = map(np.asarray, _beam(4)(params, batch, latents, eos_id, 0.5))
    lengths = _lengths(tokens, eos_id, _prompts()[2])
    np.testing.assert_array_equal(tokens == PAD, np.arange(NEW) >= lengths[:, None])


def test_a_larger_beam_scores_at_least_as_high_as_greedy():
  """A theorem for a beam that holds every prefix (it finds the best answer, see the brute-force test); checked on
  these examples for smaller beams, which can in general prune the prefix of the greedy answer."""
  _, params, batch, latents = _setup()
  for eos_id in EOS_IDS:
    scores = [np.asarray(_beam(size)(params, batch, latents, eos_id, 0.0)[1]) for size in (1, 4, 16)]
    for smaller, larger in zip(scores, scores[1:]):
      assert np.all(larger >= smaller - 1e-5), (eos_id, scores)
