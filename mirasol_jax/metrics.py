"""Metric writers (TensorBoard events and metrics.jsonl in the workdir), throughput and MFU, norms per tower."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mirasol_jax import host_memory
from mirasol_jax import paths
from mirasol_jax.models import mirasol


def step_of(line: str | bytes) -> Optional[int]:
  """The step of a metrics.jsonl line; None for a blank line, the torn last line of a killed run, or garbage a crash
  left (bytes that need not even be UTF-8: read the file as bytes)."""
  try:
    return int(json.loads(line)['step'])
  except (ValueError, KeyError, TypeError, OverflowError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    return None


class Writer:
  """Writes scalars to workdir/metrics.jsonl (one flat JSON object a line) and TensorBoard event files.

  Only process 0 writes. A resumed run appends, first dropping lines of steps after the restored step, so that the
  file never holds two values for one step, and any line that is not a whole JSON object with a step (the last line
  of a killed run, torn; garbage from a crash), with a warning.
  """

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    self._enabled = enabled
    self._jsonl = paths.join(workdir, 'metrics.jsonl')
    self._tb = None
    if not enabled:
      return
    if paths.exists(self._jsonl):
      lines = paths.read_bytes(self._jsonl).split(b'\n')
      steps = [step_of(line) for line in lines]
      kept = [line + b'\n' for line, step in zip(lines, steps) if step is not None and step <= resume_step]
      unreadable = [i + 1 for i, (line, step) in enumerate(zip(lines, steps)) if step is None and line.strip()]
      if unreadable:
        logging.warning('%s: dropped line(s) %s, which are not whole metrics (torn by a kill, or damaged)', self._jsonl,
                        ', '.join(map(str, unreadable)))
      # Replaced whole: a run killed here keeps the old file or the new one, never half of either.
      paths.write_bytes(self._jsonl, b''.join(kept))
    self._appender = paths.Appender(self._jsonl)
    self._tb = paths.summary_writer(workdir, flush_secs=10)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._appender.append((json.dumps({'step': int(step), **scalars}) + '\n').encode())
    for key, value in scalars.items():
      self._tb.add_scalar(key, value, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def append(workdir: str, step: int, scalars: Mapping[str, float]) -> None:
  """Appends one line of scalars at `step` to workdir/metrics.jsonl: values computed outside a training run (the
  `probe` command). Unlike Writer it never rewrites the file, so it is safe beside a trainer that writes the same
  file; scalars appended again for the same step (a checkpoint probed twice) make a later line, which holds the
  newer values. A torn last line (a killed run's) is ended first, so that this line stays whole. (On an object store
  a file is rewritten whole, so a line appended while a trainer writes the same file may be lost.)"""
  path = paths.join(workdir, 'metrics.jsonl')
  torn = False
  if paths.object_store(path):
    data = paths.read_bytes(path) if paths.exists(path) else b''
    torn = bool(data) and not data.endswith(b'\n')
  elif os.path.exists(path) and os.path.getsize(path):
    with open(path, 'rb') as f:
      f.seek(-1, os.SEEK_END)
      torn = f.read(1) != b'\n'
  line = json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}}) + '\n'
  paths.Appender(path).append((('\n' if torn else '') + line).encode())


# Dense (no sparsity) bfloat16 peak per device, TFLOP/s, matched as a substring of `device.device_kind`: the first
# match wins, so the more specific names come first.
PEAK_TFLOPS = (
    ('H100 PCIe', 756.0),
    ('H100', 989.0),  # SXM: 'NVIDIA H100 80GB HBM3'
    ('H200', 989.0),  # and GH200
    ('A100', 312.0),
    ('TPU v5p', 459.0),
    ('TPU v5 lite', 197.0),  # v5e
    ('TPU v4', 275.0),
    ('TPU v6 lite', 918.0),  # v6e
)


def table_peak_flops(device_kind: str) -> Optional[float]:
  """The dense bfloat16 peak FLOP/s of a device kind from PEAK_TFLOPS, None when it is not listed."""
  for name, tflops in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops * 1e12
  return None


def device_peak_flops(device: Optional[jax.Device] = None) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from), the denominator of MFU: the dense bfloat16 peak of a
  device PEAK_TFLOPS lists; otherwise a matmul measured on it, in bfloat16 on an accelerator and float32 on a CPU
  (whose bfloat16 matmuls are emulated and slower), a floor rather than the peak."""
  device = device or jax.devices()[0]
  listed = table_peak_flops(device.device_kind)
  if listed:
    return listed, f'dense bf16 peak of {device.device_kind}'
  cpu = device.platform == 'cpu'
  dtype, size = (jnp.float32, 1024) if cpu else (jnp.bfloat16, 8192)
  return (matmul_peak_flops(device, size=size, dtype=dtype),
          f'measured {jnp.dtype(dtype).name} {size}x{size} matmul on {device.device_kind}, not a peak')


def matmul_peak_flops(device: Optional[jax.Device] = None, size: int = 1024, dtype=jnp.float32,
                      repeats: int = 5) -> float:
  """FLOP/s of a square matmul on one device (`device_peak_flops` for a device with no listed peak)."""
  device = device or jax.devices()[0]
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    out = f(a)
  out.block_until_ready()
  return repeats * 2 * size ** 3 / (time.perf_counter() - start)


class Throughput:
  """Examples/s, TFLOP/s per device and MFU over the steps since the last report, and this process's resident host
  memory when it reports (perf/host_memory_mib: a data pipeline or a host buffer that grows shows there)."""

  def __init__(self, flops_per_example: float, num_devices: int, peak_flops_per_device: float):
    self._flops, self._devices, self._peak = flops_per_example, num_devices, peak_flops_per_device
    self._start, self._examples = time.perf_counter(), 0

  def add(self, examples: int) -> None:
    self._examples += examples

  def report(self) -> dict[str, float]:
    seconds = max(time.perf_counter() - self._start, 1e-9)
    examples_per_sec = self._examples / seconds
    tflops = examples_per_sec * self._flops / self._devices / 1e12
    self._start, self._examples = time.perf_counter(), 0
    report = {'perf/examples_per_sec': examples_per_sec, 'perf/tflops_per_device': tflops,
              'perf/mfu': tflops * 1e12 / self._peak}
    resident = host_memory.resident_mib()
    if resident is not None:
      report['perf/host_memory_mib'] = resident
    return report


def tower_norms(tree: Mapping[str, Any]) -> dict[str, jax.Array]:
  """The global norm of each tower's part (mirasol.TOWERS) of a tree shaped like the parameters (parameters,
  gradients, updates); a tower none of whose parameters are in the tree is left out."""
  return {tower: optax.global_norm([tree[name] for name in names if name in tree])
          for tower, names in mirasol.TOWERS.items() if any(name in tree for name in names)}


def finite(scalars: Mapping[str, float]) -> bool:
  return all(np.isfinite(v) for v in scalars.values())
