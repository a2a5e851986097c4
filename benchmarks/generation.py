"""Generation cost: KV-cached against recompute-every-token greedy decoding, and the chunk-by-chunk step's cost as
a clip goes on.

  python benchmarks/generation.py [--size small] [--batch 4] [--new_tokens 32] [--prompt_len 16] [--repeats 5]
      [--no_stream]

1. Greedy decoding of `--new_tokens` tokens after a `--prompt_len`-token prompt (the text buffer made to fit), on
   the AV latents of random inputs with random parameters (EOS never chosen, so every token is generated):
   * cached: decoding.greedy_decode given the latents: the prompt prefilled into the KV cache, then one cached
     decoder step per token; split into the prefill with the first step (the same decoding of one token) and the
     cost of each further token;
   * recompute: decoding.greedy_decode_uncached, the whole teacher-forced decoder again for every token; it encodes
     the clip first, so the AV encoding's time (measured alone) is subtracted to compare decoding with decoding.
   `--new_tokens 48` makes the text buffer 64 positions, `base`'s max_text_len: the ratio users see grows with it,
   as recomputing costs a pass over the whole buffer per token and a cached step does not.
2. Model.stream_step (one chunk: encoders, a Combiner step, an AV Transformer step against the KV cache) at chunk 2
   and at chunk 32 of a 32-chunk clip (the size's chunk length, frames = 32 chunks' worth): the cost of the t-th
   chunk should not grow with t beyond the attention over the cache.

Every function is compiled before it is timed; the figures are medians over `--repeats` runs, the decoding ones
timed in alternate rounds so that the ratio compares runs made on the same machine state. Prints a table.
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
from mirasol_jax import decoding  # noqa: E402
from mirasol_jax.models import mirasol  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compiled and run once
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def random_batch(config, batch_size: int, prompt_len: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  batch = mirasol.example_batch(config, batch_size)
  batch['video'] = rng.integers(0, 256, batch['video'].shape, dtype=np.uint8)
  batch['audio'] = rng.normal(-40.0, 20.0, batch['audio'].shape).astype(np.float32)
  batch['text_tokens'] = rng.integers(3, config.model.vocab_size, batch['text_tokens'].shape, dtype=np.int32)
  batch['text_loss_mask'][:] = False
  batch['text_loss_mask'][:, prompt_len:] = True
  return batch


def model_and_params(config, batch):
  model = mirasol.Model(**config.model)
  params = jax.jit(model.init)({'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)}, batch)['params']
  return model, {'params': params}


def decoding_costs(size: str, batch_size: int, new_tokens: int, repeats: int,
                   prompt_len: int = 16) -> dict[str, float]:
  config = config_lib.base_config(size, 'ttm')
  config.model.dtype = 'float32'
  config.model.max_text_len = prompt_len + new_tokens  # room for every new token
  batch = random_batch(config, batch_size, prompt_len)
  model, variables = model_and_params(config, batch)
  no_eos = -1  # never generated: every example decodes all new_tokens
  encode = jax.jit(lambda v, b: model.apply(v, b, method=mirasol.Model.encode_av)[1])
  latents = encode(variables, batch)
  cached = jax.jit(lambda v, b, h: decoding.greedy_decode(model, v, b, new_tokens, no_eos, latents=h))
  first = jax.jit(lambda v, b, h: decoding.greedy_decode(model, v, b, 1, no_eos, latents=h))
  recompute = jax.jit(lambda v, b: decoding.greedy_decode_uncached(model, v, b, new_tokens, no_eos))
  same = np.array_equal(np.asarray(cached(variables, batch, latents)), np.asarray(recompute(variables, batch)))
  # Timed in alternate rounds (encode, cached, first token, recompute), so that all four see the same machine: on a
  # shared machine the speed drifts between runs timed one after the other. The ratio is the median of the rounds'.
  calls = {'encode_s': lambda: encode(variables, batch), 'cached_s': lambda: cached(variables, batch, latents),
           'first_s': lambda: first(variables, batch, latents), 'recompute_s': lambda: recompute(variables, batch)}
  for call in calls.values():
    jax.block_until_ready(call())  # compiled and run once
  rounds = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      rounds[name].append(time.perf_counter() - start)
  decoding_only = np.array(rounds['recompute_s']) - np.array(rounds['encode_s'])  # recompute encodes the clip first
  ratios = decoding_only / np.array(rounds['cached_s'])
  result = {name: float(np.median(times)) for name, times in rounds.items()}
  result.update(recompute_s=float(np.median(decoding_only)), ratio=float(np.median(ratios)),
                ratio_range=(float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))),
                same_tokens=same, prompt_len=prompt_len)
  return result


def stream_costs(size: str, batch_size: int, chunks: int, repeats: int, at=(2, 32)) -> dict[int, float]:
  base = config_lib.base_config(size, 'ttm')
  frames_per_chunk = base.model.num_frames // base.model.num_chunks
  config = config_lib.base_config(size, 'ttm', frames_per_chunk * chunks)
  config.model.dtype = 'float32'
  batch = random_batch(config, batch_size, config.model.max_text_len // 2)
  model, variables = model_and_params(config, batch)
  step = jax.jit(lambda v, video, audio, mask, state: model.apply(v, video, audio, mask, state,
                                                                  method=mirasol.Model.stream_step))
  state = model.apply(variables, batch_size, method=mirasol.Model.stream_init)
  video, audio, mask = jnp.asarray(batch['video']), jnp.asarray(batch['audio']), jnp.asarray(batch['audio_mask'])
  result = {}
  for t in range(1, max(at) + 1):
    if t in at:  # the t-th chunk, its state holding chunks 1..t-1
      result[t] = median_seconds(lambda: step(variables, video[:, t - 1], audio[:, t - 1], mask, state), repeats)
    _, state = step(variables, video[:, t - 1], audio[:, t - 1], mask, state)
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', default='small')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--new_tokens', type=int, default=32)
  parser.add_argument('--prompt_len', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=15)
  parser.add_argument('--no_stream', action='store_true', help='leave out the chunk-by-chunk part')
  args = parser.parse_args()
  print(f'{jax.devices()[0].device_kind} x{jax.device_count()}, size {args.size}, batch {args.batch}')
  d = decoding_costs(args.size, args.batch, args.new_tokens, args.repeats, args.prompt_len)
  n = args.new_tokens
  print(f'greedy decoding of {n} tokens after a {d["prompt_len"]}-token prompt, text buffer '
        f'{d["prompt_len"] + n} (AV encoding {1e3 * d["encode_s"]:.1f} ms, left out)')
  print(f'  cached     {1e3 * d["cached_s"]:8.1f} ms   (prefill + first token {1e3 * d["first_s"]:.2f} ms, then '
        f'{1e3 * (d["cached_s"] - d["first_s"]) / max(n - 1, 1):.3f} ms per token)')
  print(f'  recompute  {1e3 * d["recompute_s"]:8.1f} ms   ({1e3 * d["recompute_s"] / n:.2f} ms per token; '
        f'{d["ratio"]:.1f}x the cached, median of {args.repeats} alternate rounds, quartiles '
        f'{d["ratio_range"][0]:.1f} to {d["ratio_range"][1]:.1f}; same tokens: {d["same_tokens"]})')
  if args.no_stream:
    return
  s = stream_costs(args.size, args.batch, 32, args.repeats)
  print('chunk-by-chunk step of a 32-chunk clip')
  for t, seconds in s.items():
    print(f'  chunk {t:2d}   {1e3 * seconds:8.1f} ms')
  print(f'  chunk 32 / chunk 2: {s[32] / s[2]:.2f}x')


if __name__ == '__main__':
  main()
