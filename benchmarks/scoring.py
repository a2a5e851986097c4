"""Scoring K candidate texts per example: the latents repeated K times (the former evaluators/scoring.py) against
TextDecoder.candidate_logits, which projects each example's latents once for its K texts, with the vocabulary
projection at every position or only in the candidates' window.

  python benchmarks/scoring.py [--size small] [--batch 2] [--candidates 44] [--candidate_len 6] [--prompt_len 8]
      [--latents 0,512] [--dtype float32] [--repeats 5]

For each number of latents S in `--latents` (0: the size's own T*m), random latents [B, S, width] and random
parameters, `--candidates` K candidates of `--candidate_len` tokens after a `--prompt_len`-token prompt in the
size's text buffer (max_text_len positions), scored by log-likelihood (scoring.log_likelihoods, length-normalised):
* repeated: the latents repeated K times, Model.text_logits over B*K rows (what scoring did before);
* shared: scoring.log_likelihoods over the shared latents, logits at every position;
* window: the same with `window` = candidate_len + 1, logits only where a candidate or its EOS can be (what the
  classification evaluator runs).
All are compiled before they are timed and timed in alternate rounds (median of `--repeats`); the table gives
their times, the temporary memory XLA's memory analysis reports for each compiled program, and the largest
difference of their scores from the repeated path's. K = 44 is EPIC-SOUNDS' classes; 512 latents are base's and
3b's T*m.
"""
from __future__ import annotations

import argparse
import functools
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
  rng = np.random.default_rng(0)
  length, vocab = config.model.max_text_len, config.model.vocab_size
  if prompt_len + candidate_len + 1 > length:
    raise ValueError(f'a prompt of {prompt_len} and candidates of {candidate_len} tokens do not fit in {length}')
  text = rng.integers(3, vocab, (batch_size, length)).astype(np.int32)
  ids = rng.integers(3, vocab, (batch_size, candidates, candidate_len)).astype(np.int32)
  lengths = np.full((batch_size, candidates), candidate_len, np.int32)
  tokens, mask = scoring.candidate_tokens(jnp.asarray(text), jnp.full((batch_size,), prompt_len, jnp.int32),
                                          jnp.asarray(ids), jnp.asarray(lengths))
  latents = jnp.asarray(rng.normal(size=(batch_size, num_latents, config.model.width)), config.model.dtype)
  return latents, tokens, mask


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
  names = ('repeated', 'shared', 'window')
  print(f'{"latents":>8} ' + ' '.join(f'{n + " ms":>12}' for n in names) + ' ' +
        ' '.join(f'{n + " MiB":>13}' for n in names) + f' {"max |diff|":>11}')
  for num_latents in (int(s) or own for s in args.latents.split(',')):
    latents, tokens, mask = inputs(config, args.batch, num_latents, args.candidates, args.candidate_len,
                                   args.prompt_len)
    variables = jax.jit(lambda: model.init(jax.random.key(0), tokens[:, 0], latents,
                                           method=mirasol.Model.text_logits))()
    window = functools.partial(scoring.log_likelihoods, window=args.candidate_len + 1)
    programs, scores, memory = {}, {}, {}
    for name, fn in zip(names, (repeated_log_likelihoods, scoring.log_likelihoods, window)):
      compiled = jax.jit(lambda v, h, t, m, fn=fn: fn(model, v, h, t, m, True)).lower(
          variables, latents, tokens, mask).compile()
      analysis = compiled.memory_analysis()
      memory[name] = analysis.temp_size_in_bytes / 2**20 if analysis is not None else float('nan')
      programs[name] = compiled
      scores[name] = np.asarray(jax.block_until_ready(compiled(variables, latents, tokens, mask)))
    times = {name: [] for name in programs}
    for _ in range(args.repeats):  # alternate rounds: all measured on the same machine state
      for name, compiled in programs.items():
        start = time.perf_counter()
        jax.block_until_ready(compiled(variables, latents, tokens, mask))
        times[name].append(time.perf_counter() - start)
    ms = {name: 1000 * float(np.median(t)) for name, t in times.items()}
    diff = max(float(np.max(np.abs(scores['repeated'] - scores[name]))) for name in names[1:])
    print(f'{num_latents:>8} ' + ' '.join(f'{ms[n]:>12.1f}' for n in names) + ' ' +
          ' '.join(f'{memory[n]:>13.1f}' for n in names) + f' {diff:>11.2e}')
    print(f'{"":>8} speed-up over repeated: shared {ms["repeated"] / ms["shared"]:.2f}x, window '
          f'{ms["repeated"] / ms["window"]:.2f}x (window over shared {ms["shared"] / ms["window"]:.2f}x)')


if __name__ == '__main__':
  main()
