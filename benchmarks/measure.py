"""What the benchmarks that time the train step share: random batches of a config's shapes, the timed loop, the
parameter count, the machine's memory and load, and one measurement per child process.

A child is the same script run again with `--child JSON`: it prints its result as its last line after MARKER, and
`spawn` reads it back. Each measurement in a fresh process has its own peak memory (ru_maxrss, or a device's
peak_bytes_in_use, which only grow within a process) and its own jax device count.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np

MARKER = 'RESULT '


def parameter_count(config) -> int:
  """Parameters of config.model, from jax.eval_shape (no memory)."""
  import jax
  from mirasol_jax.models import mirasol
  batch = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in mirasol.batch_shapes(config.model, 1).items()}
  shapes = jax.eval_shape(mirasol.Model(**config.model).init, jax.random.key(0), batch)['params']
  return mirasol.count_params_per_tower(shapes)['total']


def random_batch(config, batch_size: int) -> dict[str, np.ndarray]:
  """Random pixels, log-mel and tokens with the config's shapes; the second half of the text is the target."""
  from mirasol_jax.models import mirasol
  rng = np.random.default_rng(config.seed)
  batch = mirasol.example_batch(config, batch_size)
  batch['video'] = rng.integers(0, 256, batch['video'].shape, dtype=np.uint8)
  batch['audio'] = rng.normal(-40.0, 20.0, batch['audio'].shape).astype(np.float32)
  batch['text_tokens'] = rng.integers(3, config.model.vocab_size, batch['text_tokens'].shape, dtype=np.int32)
  batch['text_loss_mask'][:, batch['text_tokens'].shape[1] // 2:] = True
  return batch


def compile_step(config, devices=None):
  """The repository's own train step (train.build_train_step: what `train` compiles) over a mesh of `devices` (all by
  default), compiled. -> (parts, compiled, compile seconds, XLA's peak estimate in bytes or None): arguments +
  outputs + temporaries + generated code - what the donated state's buffers save."""
  from mirasol_jax import sharding
  from mirasol_jax import train
  mesh = sharding.make_mesh(config.mesh, devices)
  parts = train.build_train_step(config, mesh, tuple(tuple(rule) for rule in config.axis_rules))
  start = time.perf_counter()
  compiled = parts.compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  estimate = None
  if memory is not None:
    estimate = float(memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes +
                     memory.generated_code_size_in_bytes - memory.alias_size_in_bytes)
  return parts, compiled, seconds, estimate


def run_steps(parts, compiled, config, warmup: int, steps: int):
  """-> wall seconds and CPU seconds (all threads of the process) of each timed step, and the last metrics."""
  import jax
  state = parts.init(config.seed)
  batch = {k: jax.device_put(v, parts.batch_shapes[k].sharding)
           for k, v in random_batch(config, config.batch_size).items()}
  times, cpu_times, metrics = [], [], {}
  for i in range(warmup + steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, batch)
    metrics = jax.device_get(metrics)  # waits for the step
    if i >= warmup:
      times.append(time.perf_counter() - start)
      cpu_times.append(time.process_time() - cpu_start)
  return times, cpu_times, {k: float(v) for k, v in metrics.items()}


def peak_rss_mib() -> float:
  """This process's peak resident memory so far."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def available_bytes() -> float:
  """MemAvailable of /proc/meminfo: what this machine can still give without swapping or killing (inf elsewhere)."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return float(line.split()[1]) * 1024
  except OSError:
    pass
  return float('inf')


def load() -> str:
  """The load averages over 1, 5 and 15 minutes."""
  return ' '.join(f'{x:.1f}' for x in os.getloadavg())


def spawn(script: str, kind: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
  """Runs `script --child SPEC` (one measurement of kind `kind`) in a fresh process, so that its memory, its device
  statistics and jax's device count are its own; -> the dict the child printed last after MARKER, or {'error': ...}
  with the end of its output. The environment (XLA_FLAGS, XLA_PYTHON_CLIENT_*) is passed through, with huge pages
  for malloc added where the host has them, as `python -m mirasol_jax.main` runs (main.huge_pages_environment)."""
  from mirasol_jax import main
  command = [sys.executable, os.path.abspath(script), '--child', json.dumps(dict(spec, kind=kind))]
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env=main.host_huge_pages_environment())
  except subprocess.TimeoutExpired:
    return {'error': f'over {timeout:.0f} s (--timeout)'}
  lines = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
  if done.returncode or not lines:
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {'error': f'exit {done.returncode}: ' + ' | '.join(tail)}
  return json.loads(lines[-1][len(MARKER):])
