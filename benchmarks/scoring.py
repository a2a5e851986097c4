"""Scoring K candidate texts per example: the latents repeated K times (the former evaluators/scoring.py) against
TextDecoder.candidate_logits, which projects each example's latents once for its K texts, and against
TextDecoder.prefix_candidate_logits, which also runs each example's prompt once for its K texts.

  python benchmarks/scoring.py [--size small] [--batch 2] [--candidates 44] [--candidate_len 6] [--prompt_len 8]
      [--latents 0,512] [--dtype float32] [--repeats 5]

For each number of latents S in `--latents` (0: the size's own T*m), random latents [B, S, width] and random
parameters, `--candidates` K candidates of `--candidate_len` tokens after a `--prompt_len`-token prompt in the
size's text buffer (max_text_len positions), scored by log-likelihood (scoring.log_likelihoods, length-normalised):
* repeated: the latents repeated K times, Model.text_logits over B*K rows (what scoring did before);
* shared: scoring.log_likelihoods, over the shared latents (what multiple choice runs);
* prefix: scoring.prefix_log_likelihoods, the prompt run once and the K candidates after it in one sequence under
  a mask (what classification runs).
All are compiled before they are timed and timed in alternate rounds (median of `--repeats`); the table gives
their times, the temporary memory XLA's memory analysis reports for each compiled program, and the largest
difference of their scores from the repeated path's. K = 44 is EPIC-SOUNDS' classes; 512 latents are base's and
3b's T*m.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mirasol_jax import config_lib  # noqa: E402
from mirasol_jax.evaluators import scoring  # noqa: E402
from mirasol_jax.models import mirasol  # noqa: E402


def repeated_log_likelihoods(model, variables, latents, tokens, mask, length_normalize: bool):
  """The former scoring.log_likelihoods: the latents repeated K times, text_logits over B*K rows."""
  batch, k, length = tokens.shape
  repeated = jnp.repeat(latents, k, axis=0)
  logits = model.apply(variables, tokens.reshape(batch * k, length), repeated, method=mirasol.Model.text_logits)
  log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, tokens.reshape(batch * k, length)[:, 1:, None], axis=-1)[..., 0]
  weights = mask.reshape(batch * k, length)[:, 1:].astype(jnp.float32)
  total, count = jnp.sum(picked * weights, axis=-1), jnp.sum(weights, axis=-1)
  score = total / jnp.maximum(count, 1.0) if length_normalize else total
  return jnp.where(count > 0, score, -jnp.inf).reshape(batch, k)


def inputs(config, batch_size: int, num_latents: int, candidates: int, candidate_len: int, prompt_len: int):
  """-> latents, then the texts as candidate_tokens writes them (tokens, mask [B, K, L]), then as they come
  (text [B, L], prompt_len [B], ids [B, K, Lc], lengths [B, K])."""
  rng = np.random.default_rng(0)
  length, vocab = config.model.max_text_len, config.model.vocab_size
  if prompt_len + candidate_len + 1 > length:
    raise ValueError(f'a prompt of {prompt_len} and candidates of {candidate_len} tokens do not fit in {length}')
  text = jnp.asarray(rng.integers(3, vocab, (batch_size, length)), jnp.int32)
  ids = jnp.asarray(rng.integers(3, vocab, (batch_size, candidates, candidate_len)), jnp.int32)
  lengths = jnp.full((batch_size, candidates), candidate_len, jnp.int32)
  prompt = jnp.full((batch_size,), prompt_len, jnp.int32)
  tokens, mask = scoring.candidate_tokens(text, prompt, ids, lengths)
  latents = jnp.asarray(rng.normal(size=(batch_size, num_latents, config.model.width)), config.model.dtype)
  return latents, (tokens, mask), (text, prompt, ids, lengths)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', default='small')
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--candidates', type=int, default=44)
  parser.add_argument('--candidate_len', type=int, default=6)
  parser.add_argument('--prompt_len', type=int, default=8)
  parser.add_argument('--latents', default='0,512', help='numbers of latents, comma-separated (0: the size\'s T*m)')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()

  config = config_lib.base_config(args.size, 'ttm')
  config.model.dtype = args.dtype
  model = mirasol.Model(**config.model)
  own = config.model.num_chunks * config.model.tokens_per_chunk
  print(f'{args.size}: text decoder width {config.model.text.width}, depth {config.model.text.depth}, '
        f'{config.model.max_text_len} text positions, vocab {config.model.vocab_size}; batch {args.batch}, '
        f'K={args.candidates} candidates of {args.candidate_len} tokens after {args.prompt_len}; {args.dtype}; '
        f'{jax.devices()[0].platform}')
  names = ('repeated', 'shared', 'prefix')
  print(f'{"latents":>8} ' + ' '.join(f'{n + " ms":>12}' for n in names) + ' ' +
        ' '.join(f'{n + " MiB":>13}' for n in names) + f' {"max |diff|":>11}')
  for num_latents in (int(s) or own for s in args.latents.split(',')):
    latents, written, raw = inputs(config, args.batch, num_latents, args.candidates, args.candidate_len,
                                   args.prompt_len)
    variables = jax.jit(lambda: model.init(jax.random.key(0), written[0][:, 0], latents,
                                           method=mirasol.Model.text_logits))()
    programs, scores, memory, arguments = {}, {}, {}, {}
    functions = (repeated_log_likelihoods, scoring.log_likelihoods, scoring.prefix_log_likelihoods)
    for name, fn, texts in zip(names, functions, (written, written, raw)):
      arguments[name] = (variables, latents) + texts
      compiled = jax.jit(lambda *a, fn=fn: fn(model, *a, True)).lower(*arguments[name]).compile()
      analysis = compiled.memory_analysis()
      memory[name] = analysis.temp_size_in_bytes / 2**20 if analysis is not None else float('nan')
      programs[name] = compiled
      scores[name] = np.asarray(jax.block_until_ready(compiled(*arguments[name])))
    times = {name: [] for name in programs}
    for _ in range(args.repeats):  # alternate rounds: all measured on the same machine state
      for name, compiled in programs.items():
        start = time.perf_counter()
        jax.block_until_ready(compiled(*arguments[name]))
        times[name].append(time.perf_counter() - start)
    ms = {name: 1000 * float(np.median(t)) for name, t in times.items()}
    diff = max(float(np.max(np.abs(scores['repeated'] - scores[name]))) for name in names[1:])
    print(f'{num_latents:>8} ' + ' '.join(f'{ms[n]:>12.1f}' for n in names) + ' ' +
          ' '.join(f'{memory[n]:>13.1f}' for n in names) + f' {diff:>11.2e}')
    print(f'{"":>8} speed-up over repeated: shared {ms["repeated"] / ms["shared"]:.2f}x, prefix '
          f'{ms["repeated"] / ms["prefix"]:.2f}x (prefix over shared {ms["shared"] / ms["prefix"]:.2f}x)')


if __name__ == '__main__':
  main()
