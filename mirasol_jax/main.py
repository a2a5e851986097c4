"""Command line of mirasol_jax (also installed as `mirasol`).

  python -m mirasol_jax.main params  --config=configs/pretrain.py:size=3b
  python -m mirasol_jax.main forward --config=configs/pretrain.py:size=small [--batch_size=2]

`params` prints the parameter count per tower from `jax.eval_shape` (no memory is allocated) and the analytic
training FLOPs per example. `forward` builds the model, runs a training-mode forward pass on a random batch, greedy
decoding with the KV cache, and the chunk-by-chunk path, and prints what each gives. Any config field can be
overridden: `--config.model.combiner=qformer`.
"""
from __future__ import annotations

import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, optionally with :arg.', lock_config=True)
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 2, '`forward`: examples in the random batch.')

COMMANDS = ('params', 'forward')


def _format_count(n: float) -> str:
  for unit, scale in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if n >= scale:
      return f'{n / scale:.2f}{unit}'
  return f'{n:.0f}'


def param_table(config) -> str:
  """Parameters per tower (from jax.eval_shape, no memory) and analytic training FLOPs per example."""
  import jax
  from mirasol_jax import flops
  from mirasol_jax.models import mirasol

  model = mirasol.Model(**config.model)
  batch = mirasol.example_batch(config, 1)
  shapes = jax.eval_shape(model.init, jax.random.key(0), batch)
  counts = mirasol.count_params_per_tower(shapes['params'])
  train_flops = flops.count(config.model)['train']
  av_total = sum(counts[t] for t in mirasol.AV_TOWERS)
  rows = [f'{"tower":<16}{"params":>12}{"share":>8}{"train GFLOP/ex":>16}']
  for tower, n in counts.items():
    if tower == 'total':
      continue
    rows.append(f'{tower:<16}{_format_count(n):>12}{100 * n / counts["total"]:>7.1f}%'
                f'{train_flops[tower] / 1e9:>16.2f}')
  rows.append('-' * 52)
  rows.append(f'{"audio-video":<16}{_format_count(av_total):>12}{100 * av_total / counts["total"]:>7.1f}%')
  rows.append(f'{"total":<16}{_format_count(counts["total"]):>12}{"100.0%":>8}'
              f'{train_flops["total"] / 1e9:>16.2f}')
  rows.append(f'total parameters: {counts["total"]:,}')
  return '\n'.join(rows)


def forward(config, batch_size: int) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mirasol_jax import decoding
  from mirasol_jax.models import mirasol

  model = mirasol.Model(**config.model)
  rng = np.random.default_rng(config.seed)
  batch = mirasol.example_batch(config, batch_size)
  batch['video'] = rng.integers(0, 256, batch['video'].shape, dtype=np.uint8)
  batch['audio'] = rng.normal(-40.0, 20.0, batch['audio'].shape).astype(np.float32)
  length = batch['text_tokens'].shape[1]
  batch['text_tokens'] = rng.integers(3, config.model.vocab_size, batch['text_tokens'].shape, dtype=np.int32)
  batch['text_loss_mask'][:, length // 2:] = True

  start = time.perf_counter()
  variables = jax.jit(model.init)(jax.random.key(config.seed), batch)
  params = {'params': variables['params']}
  print(f'init: {time.perf_counter() - start:.1f}s')
  apply = jax.jit(lambda p, b, r: model.apply(p, b, train=True, rngs={'dropout': r}))
  out = apply(params, batch, jax.random.key(1))
  jax.block_until_ready(out)
  start = time.perf_counter()
  out = jax.block_until_ready(apply(params, batch, jax.random.key(2)))
  print(f'forward (train mode, compiled): {1e3 * (time.perf_counter() - start):.1f} ms for {batch_size} examples')
  for key in ('text_logits', 'av_latents'):
    print(f'  {key}: {out[key].shape} {out[key].dtype}')
  print('  losses: ' + ', '.join(f'{k}={float(v):.4f}' for k, v in out['losses'].items()))
  tokens = jax.jit(lambda p, b: decoding.greedy_decode(model, p, b, max_new_tokens=8, eos_id=2))(params, batch)
  print(f'greedy decoding (KV cache), first example: {np.asarray(tokens[0]).tolist()}')
  full = model.apply(params, batch)['av_latents']
  streamed = jax.jit(lambda p, b: decoding.stream_latents(model, p, b))(params, batch)
  err = float(jnp.max(jnp.abs(full.astype(jnp.float32) - streamed.astype(jnp.float32))))
  print(f'chunk-by-chunk latents vs full pass: max |diff| = {err:.2e} ({config.model.dtype})')


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f'usage: python -m mirasol_jax.main {{{"|".join(COMMANDS)}}} --config=FILE[:ARG]; got '
                         f'{" ".join(argv[1:]) or "no command"}')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/pretrain.py:size=tiny')
  if argv[1] == 'params':
    print(param_table(config))
  elif argv[1] == 'forward':
    print(param_table(config))
    forward(config, _BATCH_SIZE.value)


def run():
  """Console-script entry point (`mirasol`)."""
  app.run(main, argv=sys.argv)


if __name__ == '__main__':
  run()
