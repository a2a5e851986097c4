"""One accelerator, one model size: how fast the train step runs, how much of the chip it uses, how big a batch fits.

  python benchmarks/accelerator.py                                  # base and 3b, every remat policy
  python benchmarks/accelerator.py --sizes 3b --remat dots_no_batch,full --frames 512
  python benchmarks/accelerator.py --sizes tiny --remat none --batch 1 --max_batch 1 --steps 1 --warmup 0  # CPU

What runs is what `train` runs: the repository's own step (`train.build_train_step(config, mesh, rules)`: forward,
backward, clipping, AdamW, metrics; the state donated), for `configs/pretrain.py:size=SIZE,frames=FRAMES` as it is
(bfloat16 compute, float32 master weights and Adam moments, layers scanned), on ONE device: a mesh of the first
device alone, so a host with eight GPUs measures one of them. For each size and each rematerialisation policy
(`config.model.remat_policy`) it prints:

* the median time of a step after `--warmup` untimed steps (the first call is compiled beforehand, not timed),
  examples/s, TFLOP/s and MFU: the analytic training FLOPs per example (mirasol_jax/flops.py: model FLOPs, so a
  policy that recomputes does not get credit for recomputing) against the device's dense bfloat16 peak, from
  metrics.PEAK_TFLOPS by `device_kind` or `--peak_tflops` (without either, a bfloat16 matmul measured on the
  device, or a float32 one on a CPU: metrics.device_peak_flops, a floor rather than the peak);
* the peak device memory: `peak_bytes_in_use` of the device's memory statistics where the runtime keeps them (GPU,
  TPU), else XLA's estimate for the compiled step (arguments + outputs + temporaries + code - donated), marked `*`;
  XLA's estimate is printed beside it in any case;
* the largest per-device batch that fits, found without running anything out of memory: the step is compiled (not
  run) at batches 1, 2, 4, ... up to `--max_batch` until XLA's estimate exceeds `--headroom` of the device's
  memory (`bytes_limit` of its memory statistics, what the runtime lets the process allocate; on a CPU the
  machine's available memory), then the gap between the last batch that fits and the first that does not is
  closed, each try at the batch that a straight line through the estimates of those two predicts (the step's
  memory grows about linearly with the batch), its neighbour, and the midpoint. The batch found is then run once:
  `ok`, or the error if the runtime disagrees with XLA.

The timed batch is `--batch` (comma-separated per-device batches), by default the largest that fits, per policy
(and a tenth less when that one runs out of memory after all).
Then, at the policy with the most examples/s, the attention of every layer through `jax.nn.dot_product_attention`
with implementation='xla' and with 'cudnn' (`config.model.attention_impl`), timed the same way. The policy rows run
the presets' 'auto': cuDNN's fused kernel for the attentions it takes on an NVIDIA GPU, XLA's computation for the
others and on any other device. cuDNN's fused attention exists on NVIDIA GPUs only; elsewhere that line says so.

Every policy runs in a process of its own, as does each side of the attention comparison: the device's peak memory
statistic only ever grows within a process, and a process that ran out of memory leaves nothing behind for the next.
The parent process never touches the accelerator. A step that compiles but fails to run (out of memory despite XLA's
estimate, a cuDNN kernel that does not support a shape) is reported, not fatal.

The last line compares the best MFU at `3b` with the target: at least 40% on one H100 or H200. `--json OUT` writes
everything measured.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import measure  # noqa: E402  (random batches, the timed loop, the machine's memory and load, child processes)
REMAT_POLICIES = ('none', 'dots_no_batch', 'dots', 'full')  # layers.REMAT_POLICIES, fastest to leanest
TARGET = {'size': '3b', 'mfu': 0.40, 'devices': ('H100', 'H200')}
GIB = 2**30


def load_config(size: str, frames: int, policy: str, batch: int, attention_impl: Optional[str] = None):
  """configs/pretrain.py for `size` (0 frames: the preset's), one device, `batch` examples, the remat policy, and
  the attention implementation (None: the preset's 'auto')."""
  from mirasol_jax import config_lib
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_lib.load_config(os.path.join(repo, f'configs/pretrain.py:size={size},frames={frames}'))
  config.batch_size = batch
  config.model.remat_policy = policy
  if attention_impl is not None:
    config.model.attention_impl = attention_impl
  return config


def train_flops_per_example(config) -> float:
  """Analytic training FLOPs of one example, for the towers this config trains (what `train` counts for MFU)."""
  from mirasol_jax import flops
  from mirasol_jax import optimizer
  return flops.count(config.model, optimizer.frozen_towers(config))['train']['total']


def largest_fitting(fits: Callable[[int], bool], max_batch: int, estimate: Callable[[int], Optional[float]],
                    target: float) -> int:
  """The largest batch in [1, max_batch] for which `fits` holds (0 if none), `fits` being monotone: doubling from 1,
  then closing the gap between the last batch that fits and the first that does not. Each round tries the batch
  that a line through the `estimate`s (bytes) of the gap's two ends predicts for `target` bytes (through the two
  largest batches that fit when none failed), then its neighbour on the other side, then the midpoint: with memory
  linear in the batch the first one or two end it, otherwise the gap still halves every round."""
  tried = set()

  def check(batch: int) -> bool:
    tried.add(batch)
    return fits(batch)

  lo, hi, batch = 0, max_batch + 1, 1
  while batch <= max_batch:
    if not check(batch):
      hi = batch
      break
    lo, batch = batch, 2 * batch

  def update(batch: int) -> None:
    nonlocal lo, hi
    if lo < batch < hi:
      if check(batch):
        lo = batch
      else:
        hi = batch

  while hi - lo > 1:
    guess = (lo + hi) // 2
    below = [b for b in tried if b < lo]
    a, b = (lo, hi) if hi in tried else ((max(below), lo) if below else (None, None))
    ends = (estimate(a), estimate(b)) if a else (None, None)
    if None not in ends and ends[1] > ends[0]:
      guess = a + int((target - ends[0]) / ((ends[1] - ends[0]) / (b - a)))
    guess = min(max(guess, lo + 1), hi - 1)
    update(guess)
    update(guess + 1 if lo == guess else guess - 1)
    update((lo + hi) // 2)
  return lo


# -----------------------------------------------------------------------------------------------------------------
# Children: one process per policy (and one for the attention comparison); the last stdout line is MARKER + json.


class _Device:
  """The first device, its memory limit and statistics, and the train step compiled on a mesh of it alone."""

  def __init__(self, spec: dict[str, Any]):
    import jax
    self.spec = spec
    self.device = jax.devices()[0]
    stats = self.device.memory_stats() or {}
    if spec.get('memory_gb'):
      self.limit, self.limit_source = spec['memory_gb'] * GIB, '--memory_gb'
    elif stats.get('bytes_limit'):
      self.limit, self.limit_source = float(stats['bytes_limit']), 'bytes_limit of memory_stats'
    else:
      self.limit, self.limit_source = measure.available_bytes(), 'available memory of the machine'
    self.compiled: dict[tuple[int, Optional[str]], Any] = {}
    self.estimates: dict[int, Optional[float]] = {}
    self.errors: dict[int, str] = {}

  def info(self) -> dict[str, Any]:
    import jax
    return {'device_kind': self.device.device_kind, 'platform': self.device.platform,
            'device_count': jax.device_count(), 'jax': jax.__version__, 'limit_bytes': self.limit,
            'limit_source': self.limit_source}

  def compile(self, batch: int, attention_impl: Optional[str] = None):
    """(parts, compiled step, config, compile seconds, XLA's estimate in bytes) of this policy at `batch`, compiled
    once; the estimates of the preset's attention kept per batch for the search."""
    key = (batch, attention_impl)
    if key not in self.compiled:
      spec = self.spec
      config = load_config(spec['size'], spec['frames'], spec['policy'], batch, attention_impl)
      parts, compiled, seconds, estimate = measure.compile_step(config, [self.device])
      if attention_impl is None:
        self.estimates[batch] = estimate
      self.compiled[key] = (parts, compiled, config, seconds, estimate)
    return self.compiled[key]

  def fits(self, batch: int) -> bool:
    """Whether XLA's estimate of the step at `batch` is within the headroom of the device's memory (compiled only;
    a batch that does not compile does not fit)."""
    try:
      _, _, _, _, estimate = self.compile(batch)
    except Exception as error:  # noqa: BLE001  (a compiler that refuses a batch: it does not fit)
      self.errors[batch] = _first_line(error)
      self.estimates[batch] = None
      return False
    fit = estimate is None or estimate <= self.spec['headroom'] * self.limit
    if not fit:
      self.compiled.pop((batch, None))  # its executable is not needed again
    return fit

  def peak_bytes(self) -> Optional[float]:
    stats = self.device.memory_stats() or {}
    return float(stats['peak_bytes_in_use']) if 'peak_bytes_in_use' in stats else None

  def time_step(self, batch: int, attention_impl: Optional[str] = None, warmup: Optional[int] = None,
                steps: Optional[int] = None) -> dict[str, Any]:
    """Compiles (if not yet) and runs the step: median wall and CPU seconds of the timed steps, the last loss, the
    device's peak memory so far; or the error that stopped it."""
    warmup = self.spec['warmup'] if warmup is None else warmup
    steps = self.spec['steps'] if steps is None else steps
    row: dict[str, Any] = {'batch': batch}
    try:
      parts, compiled, config, seconds, estimate = self.compile(batch, attention_impl)
      row.update(compile_s=seconds, xla_bytes=estimate)
      times, cpu_times, metrics = measure.run_steps(parts, compiled, config, warmup, steps)
    except Exception as error:  # noqa: BLE001  (out of memory, an unsupported kernel: reported, not fatal)
      row['error'] = _first_line(error)
      return row
    row.update(step_s=float(np.median(times)), cpu_s=float(np.median(cpu_times)), times=times,
               loss=metrics['train/loss'], peak_bytes=self.peak_bytes())
    return row


def _first_line(error: BaseException) -> str:
  text = f'{type(error).__name__}: {error}'.strip()
  return text.splitlines()[0][:300] if text else type(error).__name__


def child_policy(spec: dict[str, Any]) -> dict[str, Any]:
  """One remat policy: the largest batch that fits, the timed batches, and a run of the largest batch."""
  device = _Device(spec)
  result = device.info()
  result['params'] = measure.parameter_count(load_config(spec['size'], spec['frames'], spec['policy'], 1))
  largest = None
  if spec['max_batch'] > 0:
    largest = largest_fitting(device.fits, spec['max_batch'], lambda b: device.estimates.get(b),
                              spec['headroom'] * device.limit)
  batches = sorted(spec['batches'] or ([largest] if largest else []))
  # Smallest first: the device's peak statistic only grows, so each row's peak is its own when memory grows with
  # the batch.
  rows = []
  for batch in batches:
    if largest is not None and batch > largest:
      rows.append({'batch': batch, 'error': 'does not fit (XLA estimate over the headroom)'})
      continue
    rows.append(device.time_step(batch))
  if not spec['batches'] and largest and 'error' in rows[0] and largest > 1:
    # The runtime disagrees with XLA's estimate (fragmentation, its own buffers): time a tenth less instead.
    rows.append(device.time_step(min(int(0.9 * largest), largest - 1)))
  result['rows'] = rows
  if largest is not None:
    ran = [r for r in rows if r['batch'] == largest]
    confirm = ran[0] if ran else (device.time_step(largest, warmup=0, steps=1) if largest else
                                  {'error': 'batch 1 does not fit'})
    result['largest'] = {'batch': largest, 'xla_bytes': device.estimates.get(largest),
                         'confirmed': 'error' not in confirm, 'error': confirm.get('error'),
                         'searched': {str(b): e for b, e in sorted(device.estimates.items())},
                         'compile_errors': {str(b): e for b, e in device.errors.items()}}
  return result


def child_attention(spec: dict[str, Any]) -> dict[str, Any]:
  """The step with every attention through one implementation (spec['impl']: 'xla', XLA's computation, or 'cudnn',
  cuDNN's fused kernel): one process each, so that each peak memory is its own."""
  device = _Device(spec)
  return dict(device.info(), **device.time_step(spec['batch'], attention_impl=spec['impl']))


CHILDREN = {'policy': child_policy, 'attention': child_attention}


# -----------------------------------------------------------------------------------------------------------------
# The parent: runs the children, prints the tables.


def peak_flops(info: dict[str, Any], override_tflops: float) -> tuple[float, str]:
  """The device's peak FLOP/s and where it comes from: --peak_tflops, PEAK_TFLOPS, or a matmul measured in a child."""
  if override_tflops:
    return override_tflops * 1e12, '--peak_tflops'
  from mirasol_jax import metrics
  listed = metrics.table_peak_flops(info['device_kind'])
  if listed:
    return listed, 'dense bf16, PEAK_TFLOPS'
  return info['measured_peak_flops'], info['measured_peak_source']


def child_measure_peak(spec: dict[str, Any]) -> dict[str, Any]:
  """A device metrics.PEAK_TFLOPS does not list: the FLOP/s of a large matmul (metrics.device_peak_flops)."""
  from mirasol_jax import metrics
  flops, source = metrics.device_peak_flops()
  return {'measured_peak_flops': flops, 'measured_peak_source': source}


CHILDREN['peak'] = child_measure_peak


def _gib(x: Optional[float]) -> str:
  return f'{x / GIB:.2f}' if x is not None else '-'


def run_size(size: str, args) -> dict[str, Any]:
  from mirasol_jax import metrics
  first = load_config(size, args.frames, 'none', 1)
  flops_per_example = train_flops_per_example(first)
  c = first.model
  spec = dict(size=size, frames=args.frames, steps=args.steps, warmup=args.warmup, max_batch=args.max_batch,
              batches=args.batch, headroom=args.headroom, memory_gb=args.memory_gb)
  policies = {}
  for policy in args.remat:
    print(f'  [{size}] remat {policy} ...', flush=True)
    policies[policy] = measure.spawn(__file__, 'policy', dict(spec, policy=policy), args.timeout)
  infos = [p for p in policies.values() if 'device_kind' in p]
  result: dict[str, Any] = {'size': size, 'frames': c.num_frames, 'chunks': c.num_chunks,
                            'train_flops_per_example': flops_per_example, 'policies': policies}
  if not infos:
    print(f'\n== {size}: no policy ran ==')
    for policy, p in policies.items():
      print(f'{policy:<15}{p.get("error", "")}')
    return result
  info = infos[0]
  if not args.peak_tflops and not metrics.table_peak_flops(info['device_kind']):
    info.update(measure.spawn(__file__, 'peak', {}, args.timeout))
  peak, peak_source = peak_flops(info, args.peak_tflops)
  result.update(device_kind=info['device_kind'], platform=info['platform'], peak_flops=peak,
                peak_source=peak_source, limit_bytes=info['limit_bytes'], params=info.get('params'))

  print(f'\n== {size}: {c.num_frames} frames (T={c.num_chunks} chunks of {c.num_frames // c.num_chunks}), '
        f'{info.get("params", 0):,} parameters, {flops_per_example / 1e12:.4g} TFLOP per example (analytic '
        f'training FLOPs); {c.dtype} compute, float32 weights ==')
  print(f'{info["device_kind"]} ({info["platform"]}, 1 of {info["device_count"]} devices), jax {info["jax"]}; peak '
        f'{peak / 1e12:.4g} TFLOP/s ({peak_source}); memory {info["limit_bytes"] / GIB:.2f} GiB '
        f'({info["limit_source"]}), a batch fits when XLA\'s estimate is within {100 * args.headroom:.0f}% of it; '
        f'{args.warmup} warm-up + {args.steps} timed steps')
  print(f'{"remat":<15}{"batch":>6}{"step s":>10}{"ex/s":>10}{"TFLOP/s":>10}{"MFU":>8}{"peak GiB":>10}'
        f'{"XLA GiB":>9}{"compile s":>11}  {"largest batch (XLA GiB, run)":<30}')
  for policy, p in policies.items():
    if 'error' in p:
      print(f'{policy:<15}  {p["error"]}')
      continue
    largest = p.get('largest')
    fit = '-'
    if largest is not None:
      fit = (f'{largest["batch"]} ({_gib(largest["xla_bytes"])}, '
             f'{"ok" if largest["confirmed"] else largest["error"]})')
      if largest['batch'] == args.max_batch:
        fit += ' (= --max_batch)'
    if not p['rows']:
      print(f'{policy:<15}{"":>6}{"":>10}{"":>10}{"":>10}{"":>8}{"":>10}{"":>9}{"":>11}  {fit}')
    for row in p['rows']:
      if 'step_s' not in row:
        print(f'{policy:<15}{row["batch"]:>6}  {row["error"]}' + (f'   largest: {fit}' if fit != '-' else ''))
        continue
      examples = row['batch'] / row['step_s']
      tflops = examples * flops_per_example / 1e12
      row.update(examples_per_s=examples, tflops=tflops, mfu=tflops * 1e12 / peak)
      measured = row['peak_bytes'] is not None
      peak_mem = _gib(row['peak_bytes'] if measured else row['xla_bytes']) + ('' if measured else '*')
      print(f'{policy:<15}{row["batch"]:>6}{row["step_s"]:>10.4f}{examples:>10.2f}{tflops:>10.4g}'
            f'{100 * row["mfu"]:>7.2f}%{peak_mem:>10}{_gib(row["xla_bytes"]):>9}{row["compile_s"]:>11.1f}  {fit}')
  if any(r.get('peak_bytes') is None for p in policies.values() for r in p.get('rows', []) if 'step_s' in r):
    print('* XLA\'s estimate for the compiled step: this device keeps no memory statistics')

  best = max(((policy, row) for policy, p in policies.items() for row in p.get('rows', []) if 'mfu' in row),
             key=lambda pr: pr[1]['examples_per_s'], default=None)
  result['best'] = {'policy': best[0], **best[1]} if best else None
  if best and args.attention:
    policy, row = best
    if info['platform'] != 'gpu':
      result['attention'] = {'xla': row, 'cudnn': {'error': f'not available on {info["platform"]}'}}
    else:
      print(f'  [{size}] attention xla / cudnn at remat {policy}, batch {row["batch"]} ...', flush=True)
      result['attention'] = {impl: measure.spawn(__file__, 'attention', dict(spec, policy=policy, batch=row['batch'],
                                                                             impl=impl), args.timeout)
                             for impl in ('xla', 'cudnn')}
    print(f'attention at the fastest policy ({policy}, batch {row["batch"]}):', end='')
    for impl in ('xla', 'cudnn'):
      r = result['attention'][impl]
      if 'step_s' in r:
        mfu = r['batch'] / r['step_s'] * flops_per_example / peak
        print(f'  {impl}: {r["step_s"]:.4f} s a step, MFU {100 * mfu:.2f}%, peak {_gib(r.get("peak_bytes"))} GiB',
              end='')
        r['mfu'] = mfu
      else:
        print(f'  {impl}: {r["error"]}', end='')
      print(';' if impl == 'xla' else '', end='')
    print(' (the preset\'s attention_impl \'auto\' is XLA\'s here)' if info['platform'] != 'gpu' else '')
  return result


def summary(results: dict[str, dict[str, Any]]) -> str:
  """One line: the best MFU of every size measured, and the target's verdict."""
  bests = []
  for size, r in results.items():
    best = r.get('best')
    if best:
      bests.append(f'{size} {100 * best["mfu"]:.2f}% (remat {best["policy"]}, batch {best["batch"]})')
  line = 'best MFU: ' + ('; '.join(bests) if bests else 'none measured')
  target = f'target MFU >= {100 * TARGET["mfu"]:.0f}% at {TARGET["size"]} on an H100 or H200'
  r = results.get(TARGET['size'])
  if r is None:
    verdict = f'not measured ({TARGET["size"]} not in --sizes)'
  elif not r.get('best'):
    verdict = f'not measured ({TARGET["size"]} did not run)'
  elif not any(d in r['device_kind'] for d in TARGET['devices']):
    verdict = f'not applicable on {r["device_kind"]}'
  else:
    verdict = 'MET' if r['best']['mfu'] >= TARGET['mfu'] else 'MISSED'
    if r['peak_source'] == '--peak_tflops':
      verdict += ' (against --peak_tflops)'
  return f'{line}. {target}: {verdict}'


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--child', default='', help=argparse.SUPPRESS)
  parser.add_argument('--sizes', default='base,3b', help='comma-separated presets (mirasol_jax/models/sizes.py)')
  parser.add_argument('--remat', default=','.join(REMAT_POLICIES), help='comma-separated remat policies')
  parser.add_argument('--frames', type=int, default=0,
                      help='frames per clip, a multiple of the chunk length; 0 keeps the preset\'s (base and 3b: '
                      '128, the paper\'s; 512 for long clips)')
  parser.add_argument('--batch', default='', help='comma-separated per-device batches to time; by default the '
                      'largest that fits, per policy')
  parser.add_argument('--max_batch', type=int, default=256, help='the largest batch searched; 0: no search')
  parser.add_argument('--steps', type=int, default=5, help='timed steps (their median is reported)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps after compiling')
  parser.add_argument('--peak_tflops', type=float, default=0.0,
                      help='the device\'s peak TFLOP/s for MFU; 0 looks its device_kind up in metrics.PEAK_TFLOPS')
  parser.add_argument('--headroom', type=float, default=0.9,
                      help='the fraction of the device\'s memory XLA\'s estimate of a step may take')
  parser.add_argument('--memory_gb', type=float, default=0.0,
                      help='the device\'s memory in GiB; 0 reads bytes_limit (on a CPU, the available memory)')
  parser.add_argument('--attention', default='True', help='compare the xla and cudnn attention at the best policy')
  parser.add_argument('--timeout', type=float, default=7200.0, help='seconds per subprocess')
  parser.add_argument('--json', default='', help='write every figure to this file')
  args = parser.parse_args(argv)
  if args.child:
    spec = json.loads(args.child)
    print(measure.MARKER + json.dumps(CHILDREN[spec.pop('kind')](spec)), flush=True)
    return {}
  args.sizes = [s for s in args.sizes.split(',') if s]
  args.remat = [p for p in args.remat.split(',') if p]
  unknown = sorted(set(args.remat) - set(REMAT_POLICIES))
  if unknown:
    parser.error(f'--remat: {unknown} are not among {REMAT_POLICIES}')
  args.batch = [int(b) for b in args.batch.split(',') if b]
  if not args.batch and args.max_batch <= 0:
    parser.error('--max_batch 0 (no search) needs --batch')
  args.attention = args.attention.lower() in ('true', '1')
  for size in args.sizes:
    load_config(size, args.frames, 'none', 1)  # an unknown size or a frame count that is not whole chunks: now

  start = time.perf_counter()
  print(f'{os.cpu_count()} CPUs; load average at start {measure.load()}', flush=True)
  results = {size: run_size(size, args) for size in args.sizes}
  line = summary(results)
  print(f'\n{line}')
  print(f'load average at end {measure.load()}; {time.perf_counter() - start:.0f} s in all')
  report = {'sizes': results, 'summary': line, 'args': {k: v for k, v in vars(args).items() if k != 'child'}}
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(report, f, indent=1, default=float)
  return report


if __name__ == '__main__':
  main()
