"""Scoring K candidate texts per example (evaluators/scoring.py) through TextDecoder.candidate_logits, which projects
each example's latents once for its K texts, against the computation it replaced: the latents repeated K times and
the teacher-forced logits of Model.text_logits on the B*K rows. Same scores for several K, candidates of different
lengths (padding, an absent candidate), length normalisation on and off, scanned and unrolled layers, remat, the
context norm and bfloat16; and answer.generated_log_probs, which now scores through it, against its former code.
Then scoring.prefix_log_likelihoods, which runs each prompt once for all its candidates in one masked sequence,
against the same scores: prompts at the buffer's end, absent candidates, bfloat16, under the mesh."""
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, tiny_config
from mirasol_jax import answer
from mirasol_jax import decoding
from mirasol_jax import sharding
from mirasol_jax.data import tokenizer as tokenizer_lib
from mirasol_jax.evaluators import scoring
from mirasol_jax.models import mirasol

# benchmarks/scoring.py keeps the former computation (the latents repeated K times) to time against.
_spec = importlib.util.spec_from_file_location('scoring_benchmark', os.path.join(REPO, 'benchmarks', 'scoring.py'))
scoring_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scoring_benchmark)
BATCH = 2


def _model(**overrides):
  config = tiny_config(**overrides)
  model = mirasol.Model(**config.model)
  rng = np.random.default_rng(1)
  num_latents = config.model.num_chunks * config.model.tokens_per_chunk
  latents = jnp.asarray(rng.normal(size=(BATCH, num_latents, config.model.width)), jnp.float32)
  # The text decoder's parameters alone (what scoring reads), as Model.init would make them.
  tokens = jnp.ones((BATCH, config.model.max_text_len), jnp.int32)
  variables = jax.jit(lambda: model.init(jax.random.key(0), tokens, latents, method=mirasol.Model.text_logits))()
  return config, model, variables, latents


def _candidates(config, k, seed=0):
  """Prompts of lengths 3 and 6 in a full text buffer, and K candidates of 1 to 4 tokens each (the last one of the
  first example absent) -> candidate_tokens' (tokens, mask) [B, K, L]."""
  rng = np.random.default_rng(seed)
  length, vocab = config.model.max_text_len, config.model.vocab_size
  text = rng.integers(3, vocab, (BATCH, length)).astype(np.int32)
  text[:, 0] = tokenizer_lib.BOS_ID
  prompt_len = jnp.array([3, 6], jnp.int32)
  ids = rng.integers(3, vocab, (BATCH, k, 4)).astype(np.int32)
  lengths = rng.integers(1, 5, (BATCH, k)).astype(np.int32)
  lengths[0, -1] = 0
  return scoring.candidate_tokens(jnp.asarray(text), prompt_len, jnp.asarray(ids), jnp.asarray(lengths))


@pytest.mark.parametrize('overrides', [dict(scan_layers=True), dict(scan_layers=False),
                                       dict(scan_layers=True, remat_policy='full'),
                                       dict(scan_layers=False, remat_policy='dots')])
def test_candidates_scored_over_shared_latents_equal_the_repeated_latents_path(overrides):
  config, model, variables, latents = _model(**overrides)

  @jax.jit
  def both(variables, tokens, mask):
    """Sums and means of the new path, then of the former one."""
    return tuple(fn(model, variables, latents, tokens, mask, normalize)
                 for fn in (scoring.log_likelihoods, scoring_benchmark.repeated_log_likelihoods) for normalize in (False, True))

  for k in (1, 3, 7):
    tokens, mask = _candidates(config, k, seed=k)
    new_sum, new_mean, old_sum, old_mean = both(variables, tokens, mask)
    for new, old in ((new_sum, old_sum), (new_mean, old_mean)):
      np.testing.assert_array_equal(np.isinf(new), np.isinf(old))
      np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-5)
    assert np.isneginf(new_sum[0, -1]) and np.all(np.isfinite(new_sum[1]))
    # A mean differs from its sum where the candidate scores more than one token (it always scores its EOS too).
    assert not np.allclose(new_mean[1], new_sum[1])
  new = new_mean
  # The candidates' scores differ, and each example's candidates are scored over that example's own latents: the
  # same candidates over the other example's latents score otherwise.
  assert np.ptp(np.asarray(new[1])) > 1e-3
  swapped = scoring.log_likelihoods(model, variables, latents[::-1], tokens, mask, True)
  assert not np.allclose(swapped[1], new[1], atol=1e-4)


def test_candidate_logits_equal_text_logits_with_the_context_norm_and_under_the_mesh():
  config, model, variables, latents = _model(text={**tiny_config().model.text, 'context_norm': 'tokens'})
  tokens, _ = _candidates(config, 5)
  batch, k, length = tokens.shape
  expected = model.apply(variables, tokens.reshape(batch * k, length), jnp.repeat(latents, k, axis=0),
                         method=mirasol.Model.text_logits).reshape(batch, k, length, -1)
  # Under a mesh and the logical axis rules, as the evaluators run it: the sharding constraints fit the shapes.
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  with jax.set_mesh(mesh), nn.logical_axis_rules([tuple(rule) for rule in sharding.DEFAULT_AXIS_RULES]):
    logits = jax.jit(lambda v: model.apply(v, tokens, latents, method=mirasol.Model.candidate_logits))(variables)
  assert logits.shape == expected.shape
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_scores_equal_the_repeated_latents_path_to_bfloat16_rounding():
  config, model, variables, latents = _model(dtype='bfloat16')
  tokens, mask = _candidates(config, 4)
  new, old = jax.jit(lambda v: (scoring.log_likelihoods(model, v, latents, tokens, mask, True),
                                 scoring_benchmark.repeated_log_likelihoods(model, v, latents, tokens, mask, True)))(variables)
  finite = np.isfinite(np.asarray(old))
  np.testing.assert_array_equal(np.isfinite(np.asarray(new)), finite)
  np.testing.assert_allclose(np.asarray(new)[finite], np.asarray(old)[finite], atol=0.05)


def _former_generated_log_probs(model, variables, latents, text_tokens, text_loss_mask, generated):
  """answer.generated_log_probs as it was before it scored through scoring.token_log_probs."""
  batch, length = text_tokens.shape
  prompt_len = decoding.prompt_lengths(text_loss_mask)
  is_eos = generated == tokenizer_lib.EOS_ID
  emitted = ((jnp.cumsum(is_eos, axis=1) - is_eos) == 0) & (prompt_len[:, None] + jnp.arange(generated.shape[1])
                                                             < length)
  positions = prompt_len[:, None] + jnp.arange(generated.shape[1])[None, :]
  rows = jnp.arange(batch)[:, None]
  tokens = decoding.prompt_only(text_tokens, prompt_len).at[rows, positions].set(
      jnp.where(emitted, generated, tokenizer_lib.PAD_ID), mode='drop')
  logits = model.apply(variables, tokens, latents, method=mirasol.Model.text_logits)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  before = jnp.clip(positions - 1, 0, length - 1)
  picked = jnp.take_along_axis(log_probs[rows, before], generated[..., None], axis=-1)[..., 0]
  return jnp.where(emitted, picked, 0.0), emitted


def test_answers_score_is_what_it_was():
  config, model, variables, latents = _model()
  length = config.model.max_text_len
  rng = np.random.default_rng(2)
  text_tokens = jnp.asarray(rng.integers(3, config.model.vocab_size, (BATCH, length)), jnp.int32)
  # Prompts of 4 and length - 2 tokens: the second example's answer runs past the buffer's end.
  text_loss_mask = jnp.arange(length)[None, :] >= jnp.array([[4], [length - 2]])
  generated = jnp.array([[7, 9, tokenizer_lib.EOS_ID, 0, 0], [5, 6, 8, 10, 11]], jnp.int32)
  (log_probs, counted), (expected, expected_counted) = jax.jit(lambda v: tuple(
      fn(model, v, latents, text_tokens, text_loss_mask, generated)
      for fn in (answer.generated_log_probs, _former_generated_log_probs)))(variables)
  np.testing.assert_array_equal(counted, [[True, True, True, False, False], [True, True, False, False, False]])
  np.testing.assert_array_equal(counted, expected_counted)
  np.testing.assert_allclose(log_probs, expected, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(log_probs)[np.asarray(counted)] < 0)


@pytest.mark.parametrize('overrides', [dict(scan_layers=True), dict(scan_layers=False, remat_policy='dots'),
                                       dict(text={**tiny_config().model.text, 'context_norm': 'tokens'}),
                                       dict(dtype='bfloat16')])
def test_the_prompt_run_once_for_all_candidates_gives_the_same_scores(overrides):
  config, model, variables, latents = _model(**overrides)
  tolerance = 0.05 if overrides.get('dtype') == 'bfloat16' else 1e-5
  length = config.model.max_text_len
  rng = np.random.default_rng(3)
  text = jnp.asarray(rng.integers(3, config.model.vocab_size, (BATCH, length)), jnp.int32)
  ids = jnp.asarray(rng.integers(3, config.model.vocab_size, (BATCH, 5, 4)), jnp.int32)
  lengths = np.array([[1, 4, 2, 3, 0], [4, 4, 1, 2, 3]], np.int32)

  def both(variables, prompt_len, lengths):
    tokens, mask = scoring.candidate_tokens(text, prompt_len, ids, lengths)
    return tuple((scoring.log_likelihoods(model, variables, latents, tokens, mask, normalize),
                  scoring.prefix_log_likelihoods(model, variables, latents, text, prompt_len, ids, lengths, normalize))
                 for normalize in (False, True))

  # As the evaluators run it: under a mesh and the logical axis rules, whose sharding constraints must fit.
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  with jax.set_mesh(mesh), nn.logical_axis_rules([tuple(rule) for rule in sharding.DEFAULT_AXIS_RULES]):
    both = jax.jit(both)
    # Prompts of 3 and 6 tokens; a prompt ending 2 positions before the buffer's end, so that the longer candidates
    # are cut (their EOS lost); a prompt filling all but the last position; an example with no candidate at all;
    # a prompt filling the whole buffer (nothing scored: what prompt_lengths gives a row without a target); a
    # prompt of 0 tokens (position 0 is never scored).
    no_first = lengths * np.array([[0], [1]], np.int32)
    for prompt_len, lens in (([3, 6], lengths), ([3, length - 2], lengths), ([length - 1, 2], lengths),
                             ([5, 4], no_first), ([length, 3], no_first), ([0, 3], lengths)):
      for full, prefix in both(variables, jnp.array(prompt_len, jnp.int32), jnp.asarray(lens)):
        np.testing.assert_array_equal(np.isneginf(full), np.isneginf(prefix))
        finite = np.isfinite(np.asarray(full))
        np.testing.assert_allclose(np.asarray(full)[finite], np.asarray(prefix)[finite], rtol=tolerance,
                                   atol=tolerance)
        assert np.isneginf(full[0, -1]) and np.all(np.isfinite(full[1]))
        assert np.ptp(np.asarray(prefix[1])) > 1e-3
  # The candidates see their own example's prompt and latents: another prompt, or the other example's latents,
  # score them otherwise.
  prompt_len = jnp.array([3, 6], jnp.int32)
  base = scoring.prefix_log_likelihoods(model, variables, latents, text, prompt_len, ids, jnp.asarray(lengths), True)
  for other_text, other_latents in ((text.at[:, 1].add(1), latents), (text, latents[::-1])):
    moved = scoring.prefix_log_likelihoods(model, variables, other_latents, other_text, prompt_len, ids,
                                           jnp.asarray(lengths), True)
    assert not np.allclose(moved[1], base[1], atol=1e-4)
