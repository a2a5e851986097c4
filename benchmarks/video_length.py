"""Cost against video length: the Mirasol model beside the flat baseline, from 64 to 512 frames.

  python benchmarks/video_length.py                  # full: about 10 minutes on a quiet 2-core CPU
  python benchmarks/video_length.py --quick          # 16 and 32 frames, batch 2: does it run (a few minutes)
  python benchmarks/video_length.py --frames 64,512 --models mirasol --towers=False

At a fixed chunk length (the preset's: `small` reads 16 frames in 4 chunks, so k = 4 frames a chunk and 64, 128,
256, 512 frames make T = 16, 32, 64, 128 chunks) it measures, for the Mirasol model (`av_mode='chunked'`) and for
the flat baseline at the same width and depth (`av_mode='flat'`: one full-attention Transformer over all T*n chunk
tokens, the next-chunk losses off; mirasol_jax/models/flat.py):

* the median time of a full train step after warm-up: the repository's own step (`train.build_train_step`, what
  `train` compiles: forward, backward, clipping, AdamW, metrics), on a random batch of its `batch_shapes`;
* the peak resident memory of the process (each setting runs in a subprocess of its own, so that one setting's
  memory is not another's) and XLA's own estimate from the compiled step's memory analysis (arguments + outputs +
  temporaries + code - donated). A setting whose predicted peak (the process's memory after compiling plus that
  estimate) exceeds `--memory_budget_gb` is not run: that is where the model no longer fits (the first length is
  reported, longer ones are not compiled). Nor is one whose estimate exceeds what the machine has available at the time;
* the analytic training FLOPs per example (mirasol_jax/flops.py) and the parameter count, which must not depend on
  the number of frames.
* the ratio that the target is about, the longest Mirasol step over the shortest, from the two steps compiled in one
  process and timed alternately (`--pair_rounds`): on a shared machine the speed drifts over the minutes of a
  sweep, and steps timed minutes apart in separate processes compare the drift as much as the model.

Then, with `--towers`, each tower's forward and forward + backward of the Mirasol model timed on its own at the
shortest and the longest length (the inputs are the towers' real intermediate activations; the backward is what
the train step does for it: weight gradients, and input gradients where a tower upstream trains), with TFLOP/s
and MFU per tower against `metrics.device_peak_flops()` and each tower's growth over the range: what grows faster
than the frames. And the analytic split of the AV Transformer's attention, the one term that is quadratic in T at a
fixed m (block-causal: m^2 T(T+1)/2 pairs counted; computed in `model.av.query_groups` runs of query chunks,
each against the keys up to its own last chunk, it computes (G+1)/(2G) of the (T*m)^2 of a dense masked attention).

With `--frozen`, the compiled train step's own FLOP count (XLA's cost analysis, layers unrolled so that it counts
every one) with every tower training, with the audio-video towers frozen by config.frozen and with them at a
learning-rate multiplier of 0, beside flops.count with optimizer.frozen_towers: a tower that does not train must
cost its forward pass only, and the step time must fall with it.

On a CPU the model computes in float32 (`--dtype auto`; `--dtype preset` keeps the presets' bfloat16), as
configs/demo.py does: XLA:CPU does not update the stacked bfloat16 residuals of a loop in place (it fuses the update
with a conversion), so each chunk of the TTM Combiner's loop rewrites all the bfloat16 residuals it saves for the
backward pass, and the Combiner's backward grows with T^2: per chunk 9.2 ms at T = 16 and 23.5 ms at T = 128 on the
`small` preset, against a constant 6.5 to 7.5 ms in float32; per-operation profiles show the bfloat16
dynamic-update-slice fusions growing 16 to 30x for 4x the chunks. Accelerators compute in bfloat16 natively; this
was not measured on one.

Prints tables; figures are medians over `--steps` timed steps after `--warmup`. Beside the wall time of a step,
its CPU time (all threads of the process): on a machine shared with other jobs the wall time measures the
neighbours as much as the model, the CPU time much less so. The load average at start and end is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from measure import MARKER, available_bytes, load, parameter_count, peak_rss_mib  # noqa: E402
from measure import compile_step, random_batch, run_steps, spawn  # noqa: E402

MODELS = ('mirasol', 'flat')
AV = ('video_encoder', 'audio_encoder', 'combiner', 'av_transformer', 'av_heads')


# -----------------------------------------------------------------------------------------------------------------
# Configs, shared by the parent (FLOPs, parameters) and the children (measurements).


def make_config(size: str, frames: int, model: str, batch: int, unrolled: bool = False, dtype: str = ''):
  from mirasol_jax import config_lib
  config = config_lib.base_config(size, 'ttm', frames)
  config.batch_size = batch
  if dtype:
    config.model.dtype = dtype
  config.model.av_mode = 'chunked' if model == 'mirasol' else 'flat'
  if model == 'flat':
    for term in ('latent', 'video_recon', 'audio_recon'):  # every token sees the next chunk: these would leak
      config.loss_weights[term] = 0.0
  if unrolled:
    config.model.scan_layers = False  # XLA's cost analysis counts a loop's body once
  return config


# -----------------------------------------------------------------------------------------------------------------
# Children: one measurement each, in a fresh process; the last stdout line is MARKER + json.


def child_step(spec: dict[str, Any]) -> dict[str, Any]:
  """One train-step measurement: compile, check XLA's memory estimate against the budget, run, time.

  The process's peak so far (the runtime and the compiler) plus XLA's estimate of the step's buffers predicts its
  peak while running; the step is not run when that exceeds the budget, or when XLA's estimate exceeds what the
  machine has available now (other jobs' memory)."""
  config = make_config(spec['size'], spec['frames'], spec['model'], spec['batch'], dtype=spec['dtype'])
  parts, compiled, compile_s, estimate = compile_step(config)
  result = {'compile_s': compile_s, 'xla_bytes': estimate}
  if estimate is not None:
    predicted = peak_rss_mib() * 2**20 + estimate
    available = available_bytes()
    if predicted > spec['budget_bytes'] or estimate > available - 2**30:
      result.update(skipped='budget' if predicted > spec['budget_bytes'] else 'available',
                    predicted_bytes=predicted, available_bytes=available, peak_rss_mib=peak_rss_mib())
      return result
  times, cpu_times, metrics = run_steps(parts, compiled, config, spec['warmup'], spec['steps'])
  result.update(step_s=float(np.median(times)), cpu_s=float(np.median(cpu_times)), times=times,
                loss=metrics['train/loss'], peak_rss_mib=peak_rss_mib())
  return result


def child_pair(spec: dict[str, Any]) -> dict[str, Any]:
  """The Mirasol train step at two lengths compiled in one process and timed in alternate rounds, so that both see
  the same machine: on a machine shared with other jobs the speed drifts by tens of percent over the minutes a
  sweep takes, and the ratio of two steps timed minutes apart measures the drift as much as the model. -> per
  round the long step's time over the short steps' of the same round."""
  import jax
  runs = []
  for frames in spec['frames']:
    config = make_config(spec['size'], frames, 'mirasol', spec['batch'], dtype=spec['dtype'])
    parts, compiled, _, _ = compile_step(config)
    state = parts.init(config.seed)
    batch = {k: jax.device_put(v, parts.batch_shapes[k].sharding)
             for k, v in random_batch(config, config.batch_size).items()}
    runs.append([compiled, state, batch])

  def step(run) -> tuple[float, float]:
    start, cpu_start = time.perf_counter(), time.process_time()
    run[1], metrics = run[0](run[1], run[2])
    jax.device_get(metrics)
    return time.perf_counter() - start, time.process_time() - cpu_start

  # Each round: the short step 3 times, then the long one twice; the first of each kind untimed, since a step
  # right after the other length runs slower (its memory was handed back, caches hold the other's data).
  ratios, cpu_ratios, short, long = [], [], [], []
  for _ in range(spec['rounds']):
    shorts = [step(runs[0]) for _ in range(3)][1:]
    longs = [step(runs[1]) for _ in range(2)][1:]
    short += shorts
    long += longs
    ratios.append(longs[0][0] / np.mean([t[0] for t in shorts]))
    cpu_ratios.append(longs[0][1] / np.mean([t[1] for t in shorts]))
  return {'ratio': float(np.median(ratios)), 'cpu_ratio': float(np.median(cpu_ratios)), 'ratios': ratios,
          'short_s': float(np.median([t[0] for t in short])), 'long_s': float(np.median([t[0] for t in long]))}


def child_frozen(spec: dict[str, Any]) -> dict[str, Any]:
  """XLA's FLOPs of the compiled, unrolled train step and its time, for one way of (not) training the AV towers."""
  from mirasol_jax import flops
  from mirasol_jax import optimizer
  config = make_config(spec['size'], spec['frames'], 'mirasol', spec['batch'], unrolled=True,
                       dtype=spec['dtype'])
  if spec['variant'] == 'frozen':
    config.frozen = '^(?!text_decoder/)'
  elif spec['variant'] == 'zero_rate':
    for tower in AV:
      config.lr_multipliers[tower] = 0.0
  parts, compiled, compile_s, _ = compile_step(config)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  times, _, metrics = run_steps(parts, compiled, config, spec['warmup'], spec['steps'])
  frozen = optimizer.frozen_towers(config)
  return {'xla_flops_per_example': cost['flops'] / config.batch_size, 'frozen': list(frozen),
          'analytic': flops.count(config.model, frozen)['train']['total'], 'step_s': float(np.median(times)),
          'compile_s': compile_s, 'grad_norm_video': metrics['train/grad_norm/video_encoder']}


def child_towers(spec: dict[str, Any]) -> dict[str, Any]:
  """Each tower's forward and forward + backward, timed alone on its real inputs, with every tower training."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from mirasol_jax import metrics as metrics_lib
  from mirasol_jax.models import mirasol

  config = make_config(spec['size'], spec['frames'], spec['model'], spec['batch'], dtype=spec['dtype'])
  model = mirasol.Model(**config.model)
  np_batch = random_batch(config, config.batch_size)
  batch = {k: jnp.asarray(v) for k, v in np_batch.items()}
  params = jax.jit(model.init)({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, batch)['params']
  params = nn.unbox(params)
  rngs = {'dropout': jax.random.key(2)}
  b, t = config.batch_size, config.model.num_chunks
  video = batch['video'].reshape(b * t, *batch['video'].shape[2:])
  audio = batch['audio'].reshape(b * t, *batch['audio'].shape[2:])
  denominators = mirasol.loss_denominators(batch, t, config.model.tokens_per_chunk)

  def run(fn, *args):
    return jax.jit(lambda p, *a: model.apply({'params': p}, *a, method=fn, rngs=rngs))(params, *args)

  # The towers' real inputs, in training mode.
  v = run(lambda m, x: m.video_encoder(x, False), video)
  a = run(lambda m, x: m.audio_encoder(x, False), audio)
  u, valid = run(lambda m, v, a, mask: m.chunk_tokens(v, a, mask, t), v, a, batch['audio_mask'])
  x = run(lambda m, u, valid: m.combine(u, valid, True), u, valid)
  h = run(lambda m, x, valid: m.contextualize(x, valid, True), x, valid)
  logits = run(lambda m, h: m.text_decoder(batch['text_tokens'], h.reshape(b, -1, h.shape[-1]), False), h)

  # tower -> (fn(module, *differentiable inputs), differentiable inputs). Inputs from data are closed over.
  towers = {
      'video_encoder': (lambda m: m.video_encoder(video, False), ()),
      'audio_encoder': (lambda m: m.audio_encoder(audio, False), ()),
      'combiner': (lambda m, v, a: m.combine(m.chunk_tokens(v, a, batch['audio_mask'], t)[0], valid, True), (v, a)),
      'av_transformer': (lambda m, x: m.contextualize(x, valid, True), (x,)),
      'av_heads': (lambda m, u, h: m._losses(batch, u, x, h, logits, denominators)[0]['total'], (u, h)),
      'text_decoder': (lambda m, h: m.text_decoder(batch['text_tokens'], h.reshape(b, -1, h.shape[-1]), False),
                       (h,)),
  }
  result = {}
  for tower, (fn, inputs) in towers.items():
    names = [n for n in mirasol.TOWERS[tower] if n in params]
    if not names:
      continue
    own = {n: params[n] for n in names}
    rest = {n: p for n, p in params.items() if n not in names}

    def forward(own, inputs, fn=fn, rest=rest):
      return model.apply({'params': {**rest, **own}}, *inputs, method=fn, rngs=rngs)

    def forward_backward(own, inputs, forward=forward):
      out, vjp = jax.vjp(forward, own, inputs)
      return out, vjp(jax.tree.map(jnp.ones_like, out))

    result[tower] = dict(zip(('forward_s', 'forward_cpu_s'),
                             _median_call(jax.jit(forward), own, inputs, repeats=spec['steps'])))
    result[tower].update(zip(('train_s', 'train_cpu_s'),
                             _median_call(jax.jit(forward_backward), own, inputs, repeats=spec['steps'])))
  result['peak_flops'], result['peak_source'] = metrics_lib.device_peak_flops()
  return result


def _median_call(fn, *args, repeats: int) -> tuple[float, float]:
  """Median wall and CPU seconds of `fn(*args)` after a first (compiling) call."""
  import jax
  jax.block_until_ready(fn(*args))
  times, cpu_times = [], []
  for _ in range(repeats):
    start, cpu_start = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  return float(np.median(times)), float(np.median(cpu_times))


CHILDREN = {'step': child_step, 'towers': child_towers, 'frozen': child_frozen, 'pair': child_pair}


# -----------------------------------------------------------------------------------------------------------------
# The parent: the tables.


def attention_split(config) -> dict[str, float]:
  """Training FLOPs per example of the AV Transformer's attention (scores and values over the pairs the mask
  allows, forward and backward: 3 x 2 matmuls of 2*pairs*width), of the pairs layers.block_causal_attention
  computes (each run of query chunks against the keys up to its last chunk) and of a dense masked attention."""
  model = config.model
  t, m, width, depth = model.num_chunks, model.tokens_per_chunk, model.width, model.av.depth
  per_pair = depth * 3 * 2 * 2 * width
  groups = max(1, min(model.av.get('query_groups', 8), t))
  bounds = [m * (t * g // groups) for g in range(groups + 1)]
  computed = sum((end - start) * end for start, end in zip(bounds[:-1], bounds[1:]))
  return {'counted': per_pair * m * m * t * (t + 1) / 2, 'computed': per_pair * computed,
          'dense': per_pair * (t * m) ** 2}


def length_table(args, budget_bytes: float) -> dict[tuple[str, int], dict[str, Any]]:
  from mirasol_jax import flops
  rows = {}
  print(f'\n== train step against video length (size {args.size}, batch {args.batch}, {args.warmup} warm-up + '
        f'{args.steps} timed steps; memory budget {args.memory_budget_gb:g} GiB) ==')
  header = (f'{"model":<8}{"frames":>7}{"T":>5}{"tokens":>8}{"params":>11}{"GFLOP/ex":>10}{"x":>7}{"step s":>9}'
            f'{"x":>7}{"CPU s":>8}{"x":>7}{"peak RSS MiB":>14}{"XLA est MiB":>13}{"compile s":>11}')
  print(header)
  for model in args.models:
    too_big = None
    for frames in args.frames:
      config = make_config(args.size, frames, model, args.batch, dtype=args.dtype)
      c = config.model
      tokens = c.num_chunks * (c.tokens_per_chunk if model == 'mirasol' else _chunk_tokens(config))
      row = {'frames': frames, 'chunks': c.num_chunks, 'tokens': tokens, 'params': parameter_count(config),
             'train_flops': flops.count(c)['train']['total']}
      if too_big is not None:
        row['error'] = f'not run: {too_big} frames did not fit'
      else:
        row.update(spawn(__file__, 'step', dict(size=args.size, frames=frames, model=model, batch=args.batch,
                                                dtype=args.dtype, warmup=args.warmup, steps=args.steps,
                                                budget_bytes=budget_bytes),
                         args.timeout))
        if row.get('skipped') == 'budget':
          too_big = frames
      rows[model, frames] = row
      first = rows[model, args.frames[0]]
      flop_x = row['train_flops'] / first['train_flops']
      line = (f'{model:<8}{frames:>7}{c.num_chunks:>5}{tokens:>8}{row["params"]:>11,}'
              f'{row["train_flops"] / 1e9:>10.2f}{flop_x:>7.2f}')
      if 'step_s' in row:
        step_x = row['step_s'] / first['step_s'] if 'step_s' in first else float('nan')
        cpu_x = row['cpu_s'] / first['cpu_s'] if 'cpu_s' in first else float('nan')
        line += f'{row["step_s"]:>9.3f}{step_x:>7.2f}{row["cpu_s"]:>8.2f}{cpu_x:>7.2f}{row["peak_rss_mib"]:>14.0f}'
      elif row.get('skipped'):
        line += f'{"over budget" if row["skipped"] == "budget" else "no memory now":>16}{"":>29}'
      else:
        line += f'  {row["error"]}'
        print(line, flush=True)
        continue
      estimate = row.get('xla_bytes')
      line += f'{estimate / 2**20 if estimate is not None else float("nan"):>13.0f}{row["compile_s"]:>11.1f}'
      print(line, flush=True)
  return rows


def _chunk_tokens(config) -> int:
  from mirasol_jax.models import encoders
  from mirasol_jax.models import mirasol
  c = config.model
  k = c.num_frames // c.num_chunks
  return encoders.num_video_tokens(c.video.tubes, (k, *c.image_size)) + mirasol.num_audio_tokens(
      mirasol.Model(**c))


def summary(args, rows) -> None:
  first, last = args.frames[0], args.frames[-1]
  linear = last / first
  print()
  mirasol_rows = [rows.get(('mirasol', f), {}) for f in (first, last)]
  if all('step_s' in r for r in mirasol_rows):
    ratio = mirasol_rows[1]['step_s'] / mirasol_rows[0]['step_s']
    verdict = 'met' if ratio <= 1.1 * linear else 'missed'
    flop_ratio = mirasol_rows[1]['train_flops'] / mirasol_rows[0]['train_flops']
    cpu_ratio = mirasol_rows[1]['cpu_s'] / mirasol_rows[0]['cpu_s']
    print(f'mirasol: {last} frames cost {ratio:.2f}x the {first}-frame step (linear {linear:.0f}x; target <= '
          f'{1.1 * linear:.1f}x: {verdict}); CPU time {cpu_ratio:.2f}x; analytic FLOPs {flop_ratio:.2f}x')
  if 'mirasol' in args.models and args.pair_rounds > 0 and len(args.frames) > 1:
    pair = spawn(__file__, 'pair', dict(size=args.size, frames=[first, last], batch=args.batch, dtype=args.dtype,
                                        rounds=args.pair_rounds), args.timeout)
    if 'ratio' in pair:
      verdict = 'met' if pair['ratio'] <= 1.1 * linear else 'missed'
      print(f'mirasol, the two steps timed alternately in one process ({args.pair_rounds} rounds, each the {last}-frame '
            f'step over the {first}-frame steps just before it): {pair["ratio"]:.2f}x (rounds '
            f'{min(pair["ratios"]):.2f} to {max(pair["ratios"]):.2f}; target <= {1.1 * linear:.1f}x: {verdict}); CPU '
            f'time {pair["cpu_ratio"]:.2f}x; steps {pair["short_s"]:.3f} s and {pair["long_s"]:.3f} s')
    else:
      print(f'mirasol, the two steps timed alternately: failed ({pair.get("error", pair)})')
  for model in args.models:
    counts = [rows[model, f]['params'] for f in args.frames]
    print(f'{model}: parameters at {", ".join(str(f) for f in args.frames)} frames: '
          f'{", ".join(format(n, ",") for n in counts)} ({"identical" if len(set(counts)) == 1 else "DIFFERENT"})')
  flat = [(f, rows[('flat', f)]) for f in args.frames if ('flat', f) in rows]
  unfit = [(f, r) for f, r in flat if r.get('skipped') == 'budget']
  for model, f, r in [(m, f, rows[m, f]) for m in args.models for f in args.frames
                      if rows.get((m, f), {}).get('skipped') == 'available']:
    print(f'{model} at {f} frames: not run, its step needs {r["xla_bytes"] / 2**30:.1f} GiB and this machine had '
          f'{r["available_bytes"] / 2**30:.1f} GiB available (other jobs): run it again on a quieter machine')
  if unfit:
    f, r = unfit[0]
    print(f'flat: no longer fits at {f} frames: XLA estimates {r["xla_bytes"] / 2**30:.1f} GiB for its step, '
          f'{r["predicted_bytes"] / 2**30:.1f} GiB for the process, over the {args.memory_budget_gb:g} GiB budget')
  elif flat:
    print(f'flat: fits at every length up to {flat[-1][0]} frames within {args.memory_budget_gb:g} GiB')
  both = [f for f in args.frames if 'step_s' in rows.get(('flat', f), {}) and 'step_s' in rows.get(('mirasol', f), {})]
  if both:
    print('flat / mirasol step time: ' + ', '.join(
        f'{f} frames {rows["flat", f]["step_s"] / rows["mirasol", f]["step_s"]:.1f}x' for f in both))


def attention_table(args) -> None:
  from mirasol_jax import flops
  print(f'\n== what grows faster than linear: analytic training GFLOP per example, mirasol ({args.size}) ==')
  counts = {f: flops.count(make_config(args.size, f, 'mirasol', args.batch).model)['train'] for f in args.frames}
  splits = {f: attention_split(make_config(args.size, f, 'mirasol', args.batch)) for f in args.frames}
  first, last = args.frames[0], args.frames[-1]
  print(f'{"part":<32}' + ''.join(f'{f:>10}' for f in args.frames) + f'{"growth":>9}')
  parts = {tower: {f: counts[f][tower] for f in args.frames} for tower in counts[first] if tower != 'total'}
  parts['  of which AV attention'] = {f: splits[f]['counted'] for f in args.frames}
  parts['  AV attention as computed'] = {f: splits[f]['computed'] for f in args.frames}
  parts['  ... if computed densely'] = {f: splits[f]['dense'] for f in args.frames}
  parts['total'] = {f: counts[f]['total'] for f in args.frames}
  for name, values in parts.items():
    growth = values[last] / values[first] if values[first] else float('nan')
    print(f'{name:<32}' + ''.join(f'{values[f] / 1e9:>10.3f}' for f in args.frames) + f'{growth:>8.1f}x')
  share = [splits[f]['computed'] / counts[f]['total'] for f in (first, last)]
  print(f'the AV attention as computed is {100 * share[0]:.1f}% of the step\'s counted FLOPs at {first} frames and '
        f'{100 * share[1]:.1f}% at {last} (linear growth: {last // first}x)')


def towers_table(args, rows) -> None:
  from mirasol_jax import flops
  # Only lengths whose whole step ran (within the memory budget): each tower alone needs less. Without the sweep,
  # every length asked for.
  ran = [f for f in args.frames if 'step_s' in rows.get(('mirasol', f), {})] if args.sweep else args.frames
  lengths = sorted({ran[0], ran[-1]})[:1 if args.quick else 2] if ran else []
  print(f'\n== each tower alone, mirasol ({args.size}, batch {args.batch}): forward and forward + backward ==')
  if not lengths:
    print('(no length of the mirasol model ran)')
    return
  measured = {}
  for frames in lengths:
    measured[frames] = spawn(__file__, 'towers', dict(size=args.size, frames=frames, model='mirasol', dtype=args.dtype,
                                                      batch=args.batch, steps=args.steps), args.timeout)
  print(f'{"frames":>6} {"tower":<16}{"fwd ms":>9}{"fwd TFLOP/s":>13}{"fwd MFU":>9}{"train ms":>10}'
        f'{"train TFLOP/s":>15}{"train MFU":>11}{"train share":>13}')
  for frames in lengths:
    result = measured[frames]
    if 'error' in result:
      print(f'{frames:>6} {result["error"]}')
      continue
    count = flops.count(make_config(args.size, frames, 'mirasol', args.batch).model)
    towers = [t for t in count['train'] if t in result]
    fwd = flops.utilization({t: count['forward'][t] for t in towers}, {t: result[t]['forward_s'] for t in towers},
                            result['peak_flops'], args.batch)
    train = flops.utilization({t: count['train'][t] for t in towers}, {t: result[t]['train_s'] for t in towers},
                              result['peak_flops'], args.batch)
    for tower in towers + ['total']:
      seconds = (sum(result[t]['forward_s'] for t in towers), sum(result[t]['train_s'] for t in towers)) \
          if tower == 'total' else (result[tower]['forward_s'], result[tower]['train_s'])
      time_share = seconds[1] / sum(result[t]['train_s'] for t in towers)
      print(f'{frames:>6} {tower:<16}{1e3 * seconds[0]:>9.1f}{fwd[tower]["tflops"]:>13.4f}'
            f'{100 * fwd[tower]["mfu"]:>8.1f}%{1e3 * seconds[1]:>10.1f}{train[tower]["tflops"]:>15.4f}'
            f'{100 * train[tower]["mfu"]:>10.1f}%{100 * time_share:>12.1f}%')
    step = rows.get(('mirasol', frames), {}).get('step_s')
    if step:
      towers_s = sum(result[t]['train_s'] for t in towers)
      print(f'{frames:>6} the whole train step: {1e3 * step:.1f} ms; its towers alone {1e3 * towers_s:.1f} ms; the '
            f'rest (optimizer, clipping, metrics, losses\' glue) {1e3 * (step - towers_s):.1f} ms')
    print(f'{frames:>6} peak: {result["peak_flops"] / 1e12:.4f} TFLOP/s ({result["peak_source"]}; the model '
          f'computes in {args.dtype or "the preset dtype"})')
  if all('error' not in measured[f] for f in lengths) and len(lengths) == 2:
    a, b = lengths
    for key, name in (('train_s', 'time'), ('train_cpu_s', 'CPU time')):
      print(f'growth of each tower\'s forward + backward {name} from {a} to {b} frames (linear: {b / a:.0f}x): ' +
            ', '.join(f'{t} {measured[b][t][key] / measured[a][t][key]:.2f}x'
                      for t in measured[a] if not t.startswith('peak_')))


def frozen_table(args) -> None:
  frames = args.frozen_frames
  print(f'\n== towers that do not train: the compiled step\'s FLOPs (XLA cost analysis, layers unrolled) and time, '
        f'mirasol {args.size} at {frames} frames, batch {args.batch} ==')
  print(f'{"AV towers":<34}{"XLA MFLOP/ex":>14}{"analytic":>11}{"XLA/analytic":>14}{"step ms":>9}'
        f'{"grad_norm/video_encoder":>25}')
  for variant, name in (('none', 'all train'), ('frozen', 'frozen (config.frozen)'),
                        ('zero_rate', 'lr_multipliers 0')):
    r = spawn(__file__, 'frozen', dict(size=args.size, frames=frames, batch=args.batch, variant=variant,
                                       dtype=args.dtype, warmup=args.warmup, steps=args.steps), args.timeout)
    if 'error' in r:
      print(f'{name:<34}{r["error"]}')
      continue
    print(f'{name:<34}{r["xla_flops_per_example"] / 1e6:>14.1f}{r["analytic"] / 1e6:>11.1f}'
          f'{r["xla_flops_per_example"] / r["analytic"]:>14.3f}{1e3 * r["step_s"]:>9.1f}{r["grad_norm_video"]:>25.4g}')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--child', default='', help=argparse.SUPPRESS)
  parser.add_argument('--size', default='small', help='model preset (its chunk length is kept)')
  parser.add_argument('--frames', default='64,128,256,512', help='comma-separated frame counts')
  parser.add_argument('--models', default='mirasol,flat', help='mirasol, flat or both')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--dtype', default='auto',
                      help="compute dtype: 'auto' is float32 on a CPU (see the module docstring) and the preset's "
                           'elsewhere; float32 | bfloat16 | preset')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps after the compiled first call')
  parser.add_argument('--steps', type=int, default=3, help='timed steps (their median is reported)')
  parser.add_argument('--pair_rounds', type=int, default=5,
                      help='rounds of the shortest and longest Mirasol steps timed alternately in one process (0: not)')
  parser.add_argument('--memory_budget_gb', type=float, default=8.0,
                      help='a setting whose predicted peak memory (runtime + XLA estimate) exceeds this is not run')
  parser.add_argument('--sweep', default='True', help='the train step at every length, both models')
  parser.add_argument('--towers', default='True', help='time each tower alone at the shortest and longest length')
  parser.add_argument('--frozen', default='False', help='XLA FLOPs and time of the step with the AV towers frozen')
  parser.add_argument('--frozen_frames', type=int, default=16)
  parser.add_argument('--timeout', type=float, default=900.0, help='seconds per subprocess')
  parser.add_argument('--quick', action='store_true',
                      help='16 and 32 frames, batch 2, one timed step, towers at 16 frames only')
  args = parser.parse_args()
  if args.dtype == 'auto':
    import jax
    args.dtype = 'float32' if jax.default_backend() == 'cpu' else ''
  elif args.dtype == 'preset':
    args.dtype = ''
  if args.child:
    spec = json.loads(args.child)
    print(MARKER + json.dumps(CHILDREN[spec.pop('kind')](spec)), flush=True)
    return
  if args.quick:
    args.frames, args.batch, args.warmup, args.steps, args.pair_rounds = '16,32', 2, 0, 1, 1
  args.frames = [int(f) for f in args.frames.split(',')]
  args.models = [m for m in args.models.split(',') if m]
  unknown = sorted(set(args.models) - set(MODELS))
  if unknown:
    parser.error(f'--models: {unknown} are not among {MODELS}')
  args.sweep, args.towers, args.frozen = (value.lower() in ('true', '1')
                                          for value in (args.sweep, args.towers, args.frozen))
  import jax
  start = time.perf_counter()
  print(f'{jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} CPUs, jax {jax.__version__}; '
        f'load average at start {load()}')
  from mirasol_jax import main as entry_point
  child_env = entry_point.host_huge_pages_environment() or {}
  print('each measurement in a process of its own, ' + (
      f'with GLIBC_TUNABLES={child_env["GLIBC_TUNABLES"]} as `python -m mirasol_jax.main` runs'
      if child_env else 'with the environment as it is'))
  budget = args.memory_budget_gb * 2**30
  rows = {}
  if args.sweep:
    rows = length_table(args, budget)
    summary(args, rows)
    attention_table(args)
  if args.towers:
    towers_table(args, rows)
  if args.frozen:
    frozen_table(args)
  print(f'\nload average at end {load()}; {time.perf_counter() - start:.0f} s in all')


if __name__ == '__main__':
  main()
