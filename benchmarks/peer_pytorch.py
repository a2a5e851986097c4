"""A full training step of mirasol_jax against mirasol-pytorch, the public PyTorch reimplementation of Mirasol3B.

mirasol-pytorch 0.0.16 on x-transformers 1.28.5, on the same machine, in the same invocation: step time, CPU time
and peak memory.

  python benchmarks/peer_pytorch.py [--steps 6] [--warmup 2] [--repeats 2] [--variants shipped,f32,...]
                                    [--set model.remat_policy=dots ...] [--cpus 0] [--venv DIR] [--quick]

The workload, one configuration as a user of either would write it: batch 4, 32 frames of 128x128 in 8 chunks of 4
frames, 64 video tokens per chunk (4x16x16 tubelets), 8 audio tokens per chunk (8 log-mel frames x 128 bins, in
patches of 8 frames x 16 bins), width 512 and 8 heads of 64 everywhere, video ViT 4 layers, audio ViT 2, Combiner 2
(a Transformer over the chunk's tokens keeping m = 4 of them), AV Transformer 6 (block-causal over 8 x 4 tokens),
text decoder 6 (cross-attention to the AV latents), 64 text tokens, a 32000-token vocabulary with separate input
and output embeddings (the peer's are never tied, so ours are untied here: `model.text.tie_embeddings=False`), the
next-chunk latent, video and audio losses on in both, AdamW with global-norm clipping. About 355 GFLOP a step.

Why 8 audio frames per chunk: the peer cuts the spectrogram's time axis as `(t tc)` with tc = the audio frames per
chunk and then treats tc as the number of chunks, so its audio tokens line up with its video chunks (an assertion
checks the shapes) only when the number of chunks equals the audio frames per chunk: 8 chunks, 8 frames each. Even
then its chunk j holds the frames j, j + 8, j + 16, ... of the clip rather than the j-th stretch of time; that
changes nothing in the timing, but it is not time-aligned audio.

Each side runs in its own child process: the peer with `benchmarks/_peer_torch_step.py` in its own virtual
environment (created on first use under --venv, default ~/.cache/mirasol_jax/peer_venv, with pip's configured
sources; --torch says which torch; only its CPU kernels run), ours with this script's interpreter, building the
train step exactly as `train` does (`mirasol_jax.train.build_train_step(config, mesh, rules).compile()`: jitted,
sharded, state donated, the per-tower metrics included) from the config of `ours_config`. Every round runs the
peer and then each of our variants, so that all of them see the same load; --repeats rounds. Per run: the median
wall time and CPU time (all threads) of --steps timed steps after --warmup steps, the minor page faults per step,
and the child's whole-life peak resident memory (ru_maxrss from wait4: compilation included). `--cpus 0` pins both
sides to one CPU (one thread each): on a machine shared with other jobs, CPU time per step on one CPU is the figure
that load disturbs least.

Our variants (`--set key=value` adds a config override to all of them):

  shipped                 the presets' settings: bf16 compute, scanned layers, no remat
  f32                     model.dtype=float32
  unrolled                model.scan_layers=False (bf16)
  f32_unrolled            float32 and unrolled: the CPU settings of configs/demo.py
  f32_remat / f32_unrolled_remat   ... with model.remat_policy=dots (keep matmul outputs, recompute the rest)
  f32_hugepages / f32_unrolled_hugepages   ... with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 in the environment:
                          glibc backs large allocations with transparent huge pages, so that XLA's step buffers
                          (allocated afresh every step) fault in 2 MiB at a time instead of 4 KiB
  ttm                     the shipped settings with the TTM Combiner (our default) in place of the Transformer one

--quick runs 2 timed steps after 1 warm-up, one round, the shipped variant only: a check that both sides run.
The table ends with both parameter counts, tower by tower, and what differs.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_STEP = os.path.join(REPO, 'benchmarks', '_peer_torch_step.py')
sys.path.insert(0, REPO)

# The peak-memory readers are the peer child's own (that file imports only the standard library at its top).
from _peer_torch_step import peak_rss_mib, reset_peak_rss  # noqa: E402

DEFAULT_VENV = os.path.join(os.path.expanduser('~'), '.cache', 'mirasol_jax', 'peer_venv')
# The peer and the one library it builds on, pinned; torch is --torch. numpy and packaging: x-transformers imports
# packaging without declaring it, and torch warns at import without numpy.
PEER_REQUIREMENTS = ('mirasol-pytorch==0.0.16', 'x-transformers==1.28.5', 'packaging', 'numpy')
DEFAULT_TORCH = 'torch==2.13.0'

WORKLOAD = dict(
    batch=4, frames=32, chunks=8, image=128, mel_bins=128, audio_frames_per_chunk=8,
    audio_patch=(16, 8),  # the peer's order: (mel bins, frames)
    video_patch=(16, 4),  # (pixels, frames): 4 frames x 16 x 16 tubelets, 8 x 8 = 64 tokens per chunk
    video_recon_patch=(16, 4),  # next-chunk video target: 4 x 16 x 16 x 3 = 3072 values per chunk in both
    width=512, heads=8, vocab=32000, text_len=64, video_depth=4, audio_depth=2, combiner_depth=2, av_depth=6,
    text_depth=6, tokens_per_chunk=4)

# Our variants: config overrides, and environment variables of our child process (runtime settings that are not
# config fields). `--set` adds overrides to every one of them.
HUGE_PAGES = {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
VARIANTS = {
    'shipped': dict(overrides={}),
    'f32': dict(overrides={'model.dtype': 'float32'}),
    'unrolled': dict(overrides={'model.scan_layers': False}),
    'f32_unrolled': dict(overrides={'model.dtype': 'float32', 'model.scan_layers': False}),
    'f32_remat': dict(overrides={'model.dtype': 'float32', 'model.remat_policy': 'dots'}),
    'f32_unrolled_remat': dict(overrides={'model.dtype': 'float32', 'model.scan_layers': False,
                                          'model.remat_policy': 'dots'}),
    'f32_hugepages': dict(overrides={'model.dtype': 'float32'}, env=HUGE_PAGES),
    'f32_unrolled_hugepages': dict(overrides={'model.dtype': 'float32', 'model.scan_layers': False}, env=HUGE_PAGES),
    'ttm': dict(overrides={'model.combiner': 'ttm'}),
}
DEFAULT_VARIANTS = 'shipped,f32,f32_unrolled,f32_unrolled_hugepages'


# ---------------------------------------------------------------------------------------------------------------
# Our side.


def parse_override(item: str) -> tuple[str, object]:
  """'model.dtype=float32' -> ('model.dtype', 'float32'); values are Python literals where they parse."""
  key, sep, value = item.partition('=')
  if not sep:
    raise ValueError(f'--set {item!r} is not key=value')
  try:
    return key.strip(), ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key.strip(), value


def ours_config(workload: dict, overrides: dict):
  """The training config of the workload: the `base` preset's training settings (AdamW, clipping, per-tower
  learning rates, mesh) with the workload's geometry and towers, then `overrides` ({'model.dtype': 'float32'})."""
  from mirasol_jax import config_lib
  w = workload
  overrides = dict(overrides)
  combiner = overrides.pop('model.combiner', 'transformer')
  config = config_lib.base_config('base', combiner)
  heads, width, mlp = w['heads'], w['width'], 4 * w['width']
  k = w['frames'] // w['chunks']
  spatial, frames = w['video_patch']
  mel_patch, time_patch = w['audio_patch']

  def tower(depth, **extra):
    return dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp, **extra)

  m = config.model
  m.num_frames, m.num_chunks, m.image_size = w['frames'], w['chunks'], (w['image'], w['image'])
  m.audio_frames_per_chunk, m.mel_bins = w['audio_frames_per_chunk'], w['mel_bins']
  m.max_text_len, m.vocab_size, m.tokens_per_chunk, m.width = w['text_len'], w['vocab'], w['tokens_per_chunk'], width
  tube = ((frames, spatial, spatial), (frames, spatial, spatial), (0, 0, 0))
  assert frames == k, 'one tubelet per chunk along time, as the peer'
  m.video = tower(w['video_depth'], tubes=(tube,))
  m.audio = tower(w['audio_depth'], patch_size=(time_patch, mel_patch), input_mean=-40.0, input_std=20.0)
  m.combiner_args.update(depth=w['combiner_depth'], num_heads=heads, mlp_dim=mlp)
  m.av = dict(depth=w['av_depth'], num_heads=heads, mlp_dim=mlp, mask_ratio=0.15, block_causal=True)
  m.text = tower(w['text_depth'], tie_embeddings=False, context_norm='none')
  recon_pixels = w['video_recon_patch'][0]
  m.video_recon_size = (recon_pixels, recon_pixels)
  m.audio_recon_pool = (1, 1)  # the whole next chunk's log-mel, as the peer
  config.loss_weights.audio_recon = 1.0
  config.batch_size = w['batch']
  for key, value in overrides.items():
    *parents, field = key.split('.')
    target = config
    for name in parents:
      target = target[name]
    target[field] = value
  return config


def run_ours(workload: dict, overrides: dict) -> dict:
  """In the child: builds, compiles and times our train step; returns the figures."""
  import jax
  import numpy as np
  from mirasol_jax import flops
  from mirasol_jax import sharding
  from mirasol_jax import train
  from mirasol_jax.models import mirasol

  config = ours_config(workload, overrides)
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(rule) for rule in config.axis_rules)
  start = time.perf_counter()
  parts = train.build_train_step(config, mesh, rules)
  compiled = parts.compile()
  compile_s = time.perf_counter() - start
  state = parts.init(config.seed)
  params = mirasol.count_params_per_tower(state['params'])

  rng = np.random.default_rng(0)
  batch = mirasol.example_batch(config, config.batch_size)
  batch['video'] = rng.integers(0, 256, batch['video'].shape, dtype=np.uint8)
  batch['audio'] = rng.normal(-40.0, 20.0, batch['audio'].shape).astype(np.float32)
  batch['text_tokens'] = rng.integers(3, config.model.vocab_size, batch['text_tokens'].shape, dtype=np.int32)
  batch['text_loss_mask'][:] = True
  batch = {k: jax.device_put(v, parts.batch_shapes[k].sharding) for k, v in batch.items()}

  start = time.perf_counter()
  state, metrics = jax.block_until_ready(compiled(state, batch))
  first_s = time.perf_counter() - start
  first_loss = float(metrics['train/loss'])
  for _ in range(workload['warmup'] - 1):
    state, metrics = jax.block_until_ready(compiled(state, batch))
  reset_peak_rss()
  times, cpu_times = [], []
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(workload['steps']):
    start, cpu_start = time.perf_counter(), time.process_time()
    state, metrics = jax.block_until_ready(compiled(state, batch))
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = flops.count(config.model)['train']['total'] * config.batch_size
  return {
      'side': 'ours', 'params': params['total'], 'param_groups': params, 'compile_s': compile_s,
      'first_step_s': first_s, 'step_s': statistics.median(times), 'times': times,
      'cpu_s': statistics.median(cpu_times),
      'page_faults': (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / len(times),
      'first_loss': first_loss, 'last_loss': float(metrics['train/loss']), 'step_peak_rss_mib': peak_rss_mib(),
      'xla_temp_mib': memory.temp_size_in_bytes / 2**20 if memory else None,
      'xla_argument_mib': memory.argument_size_in_bytes / 2**20 if memory else None,
      'xla_flops': (cost or {}).get('flops'), 'analytic_train_flops': analytic,
      'versions': {'jax': jax.__version__}}


# ---------------------------------------------------------------------------------------------------------------
# The peer's environment.


def venv_python(venv: str) -> str:
  return os.path.join(venv, 'bin', 'python')


def ensure_peer_venv(venv: str, torch_requirement: str) -> None:
  """Creates the peer's virtual environment once; a marker file records what it holds, so a change of --torch or of
  the pins installs again."""
  wanted = ' '.join((torch_requirement,) + PEER_REQUIREMENTS)
  marker = os.path.join(venv, 'mirasol_jax_peer.txt')
  if os.path.exists(marker) and open(marker).read() == wanted and os.path.exists(venv_python(venv)):
    return
  print(f'installing the peer into {venv}: {wanted} (once)', flush=True)
  if not os.path.exists(venv_python(venv)):
    subprocess.run([sys.executable, '-m', 'venv', venv], check=True)
  subprocess.run([venv_python(venv), '-m', 'pip', 'install', '--quiet', torch_requirement, *PEER_REQUIREMENTS],
                 check=True)
  with open(marker, 'w') as f:
    f.write(wanted)


# ---------------------------------------------------------------------------------------------------------------
# The parent: children, rounds, the table.


def spawn(command: list[str], env: dict, cpus: Optional[set[int]]) -> dict:
  """Runs one side to completion (on `cpus` only, when given) and returns its JSON (its last stdout line) with its
  wall time and whole-life peak RSS (ru_maxrss of this child alone: wait4 reaps it)."""
  start = time.perf_counter()
  pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO, text=True,
                          preexec_fn=pin)
  out_chunks, err_chunks = [], []
  # Read both pipes to the end without reaping the child (Popen.wait would reap it and lose its rusage).
  readers = [threading.Thread(target=lambda s=s, b=b: b.append(s.read())) for s, b in
             ((proc.stdout, out_chunks), (proc.stderr, err_chunks))]
  for r in readers:
    r.start()
  _, status, usage = os.wait4(proc.pid, 0)
  for r in readers:
    r.join()
  proc.returncode = os.waitstatus_to_exitcode(status)
  wall_s = time.perf_counter() - start
  out, err = ''.join(out_chunks), ''.join(err_chunks)
  lines = [line for line in out.splitlines() if line.startswith('{')]
  if proc.returncode or not lines:
    raise RuntimeError(f'{" ".join(command[:3])} failed (exit {proc.returncode}):\n{err[-3000:]}')
  result = json.loads(lines[-1])
  result['wall_s'] = wall_s
  result['peak_rss_mib'] = usage.ru_maxrss / 1024
  return result


def describe(name: str, common: dict) -> str:
  variant = VARIANTS[name]
  overrides = {**variant['overrides'], **common}
  parts = [f'{k.split(".")[-1]}={v}' for k, v in overrides.items()]
  parts += [f'{k}={v}' for k, v in variant.get('env', {}).items()]
  return ', '.join(parts) or 'as shipped: bf16, scan, remat none'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=6, help='timed steps per run (the median is reported)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps first (the first includes start-up)')
  parser.add_argument('--repeats', type=int, default=2, help='rounds: the peer, then each variant of ours')
  parser.add_argument('--variants', default=DEFAULT_VARIANTS, help=f'ours, of {", ".join(VARIANTS)}')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='a config override for every variant of ours, e.g. model.remat_policy=dots')
  parser.add_argument('--cpus', default='', help='run both sides on these CPUs only, e.g. 0 (one thread each)')
  parser.add_argument('--no_peer', action='store_true', help='ours only')
  parser.add_argument('--venv', default=DEFAULT_VENV, help='the peer\'s virtual environment (created once)')
  parser.add_argument('--torch', default=DEFAULT_TORCH, help='the torch requirement installed into --venv')
  parser.add_argument('--quick', action='store_true', help='1 warm-up, 2 steps, 1 round, shipped only')
  parser.add_argument('--child_ours', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.child_ours:
    request = json.loads(args.child_ours)
    print(json.dumps(run_ours(request['workload'], request['overrides'])), flush=True)
    return

  if args.quick:
    args.steps, args.warmup, args.repeats, args.variants = 2, 1, 1, 'shipped'
  variants = [v.strip() for v in args.variants.split(',') if v.strip()]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    parser.error(f'--variants {unknown} are not among {list(VARIANTS)}')
  common = dict(parse_override(item) for item in args.set)
  cpus = {int(c) for c in args.cpus.split(',') if c.strip()} or None
  workload = dict(WORKLOAD, steps=args.steps, warmup=max(args.warmup, 1))
  base_env = dict(os.environ, PYTHONWARNINGS='ignore', TF_CPP_MIN_LOG_LEVEL='3')
  if not args.no_peer:
    ensure_peer_venv(args.venv, args.torch)

  w = WORKLOAD
  print(f'workload: batch {w["batch"]}, {w["frames"]} frames {w["image"]}x{w["image"]} in {w["chunks"]} chunks, 64 '
        f'video + 8 audio tokens per chunk, m={w["tokens_per_chunk"]}, width {w["width"]}, {w["heads"]} heads, layers '
        f'video {w["video_depth"]} / audio {w["audio_depth"]} / combiner {w["combiner_depth"]} / AV {w["av_depth"]} / '
        f'text {w["text_depth"]}, {w["text_len"]} text tokens, vocabulary {w["vocab"]}')
  print(f'audio: {w["chunks"]} chunks of {w["audio_frames_per_chunk"]} log-mel frames: the peer cuts audio time as '
        '(t tc), tc = frames per chunk, which matches its video chunks only when chunks = audio frames per chunk')
  print(f'{len(cpus) if cpus else os.cpu_count()} CPU(s); {args.repeats} round(s), each: '
        f'{"" if args.no_peer else "the peer, then "}ours {", ".join(variants)}; median of {args.steps} steps after '
        f'{workload["warmup"]} warm-up', flush=True)

  runs: dict[str, list[dict]] = {}
  for round_index in range(args.repeats):
    for name in ([] if args.no_peer else ['peer']) + variants:
      if name == 'peer':
        result = spawn([venv_python(args.venv), PEER_STEP, json.dumps(workload)], base_env, cpus)
      else:
        variant = VARIANTS[name]
        request = json.dumps({'workload': workload, 'overrides': {**variant['overrides'], **common}})
        result = spawn([sys.executable, os.path.abspath(__file__), '--child_ours', request],
                       {**base_env, **variant.get('env', {})}, cpus)
      runs.setdefault(name, []).append(result)
      print(f'  round {round_index + 1}  {name:22s} step {result["step_s"]:7.3f} s  CPU {result["cpu_s"]:6.2f} s  '
            f'peak {result["peak_rss_mib"]:5.0f} MiB (steps alone {result["step_peak_rss_mib"]:5.0f})  '
            f'page faults/step {result["page_faults"]:7.0f}  '
            f'({result["wall_s"]:.0f} s)', flush=True)
  print_table(runs, variants, common)


def print_table(runs: dict[str, list[dict]], variants: list[str], common: dict) -> None:
  def med(name, key):
    return statistics.median(r[key] for r in runs[name])

  def per_round(name):
    return ', '.join(f'{r["step_s"]:.2f}' for r in runs[name])

  peer = 'peer' in runs
  rows = (['peer'] if peer else []) + variants
  print('\n| side | settings | step s (median of rounds; each round) | / peer | CPU s per step | / peer | peak RSS '
        'MiB | / peer | page faults per step | XLA temp MiB | compile s |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for name in rows:
    if name == 'peer':
      settings = f'torch {runs["peer"][0]["versions"]["torch"]}, f32, eager, {runs["peer"][0]["threads"]} thread(s)'
      extra = '- | -'
    else:
      settings = describe(name, common)
      extra = f'{med(name, "xla_temp_mib"):.0f} | {med(name, "compile_s"):.0f}'
    ratios = [f'{med(name, key) / med("peer", key):.2f}x' if peer else '-'
              for key in ('step_s', 'cpu_s', 'peak_rss_mib')]
    print(f'| {"peer" if name == "peer" else "ours " + name} | {settings} | {med(name, "step_s"):.3f} '
          f'({per_round(name)}) | {ratios[0]} | {med(name, "cpu_s"):.2f} | {ratios[1]} | '
          f'{med(name, "peak_rss_mib"):.0f} | {ratios[2]} | {med(name, "page_faults"):.0f} | {extra} |')
  print('(/ peer: ours over the peer, below 1 is better. CPU s: the process\'s CPU time per step, all threads. Peak '
        'RSS: the child\'s whole life, compilation included.)')
  first = runs[variants[0]][0]
  flops = first['analytic_train_flops']
  print(f'\nanalytic training FLOPs of a step (mirasol_jax.flops): {flops / 1e9:.0f} GFLOP; at the median step '
        'times: ' + ', '.join(f'{name} {flops / med(name, "step_s") / 1e9:.0f} GFLOP/s' for name in variants) +
        (f'; the peer, doing about the same work, {flops / med("peer", "step_s") / 1e9:.0f} GFLOP/s' if peer else ''))
  print(f'\nparameters: ours {first["params"]:,}' + (
      f', peer {runs["peer"][0]["params"]:,} (ours / peer {first["params"] / runs["peer"][0]["params"]:.3f})'
      if peer else ''))
  print('  ours: ' + ', '.join(f'{k} {v / 1e6:.2f}M' for k, v in first['param_groups'].items() if k != 'total'))
  if peer:
    print('  peer: ' + ', '.join(f'{k} {v / 1e6:.2f}M' for k, v in runs['peer'][0]['param_groups'].items()))
    print('  what differs: the peer\'s next-chunk heads read the m tokens of a chunk flattened (m*D = 2048 inputs: a '
          '2048x2048 latent predictor, 2048-input video and audio reconstructions: 12.6M) where ours read D = 512 '
          '(per token, and the chunk\'s mean token: 2.4M); its attention projections have no biases; it adds 8 '
          'register tokens to each encoder\'s input. Its num_mem_kv and flash_attn arguments are passed without the '
          'attn_ prefix x-transformers 1.28.5 reads, so they do nothing: no memory key/value, and its attention is '
          'the plain einsum-softmax path, not torch\'s fused kernel.')


if __name__ == '__main__':
  main()
