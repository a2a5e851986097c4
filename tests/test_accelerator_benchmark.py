"""benchmarks/accelerator.py, the one-accelerator benchmark, run on the CPU at the tiny size: a row per remat policy
with a finite step time, an MFU in (0, 1] and a largest batch at least the one it ran; and its batch search and peak
table on their own. (What it measures on a GPU is its output, not a test.)"""
import json
import math
import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import accelerator  # noqa: E402
from mirasol_jax import metrics  # noqa: E402


@pytest.mark.parametrize('kind, tflops', [('NVIDIA H100 80GB HBM3', 989.0), ('NVIDIA H100 PCIe', 756.0),
                                          ('NVIDIA H200', 989.0), ('NVIDIA A100-SXM4-40GB', 312.0),
                                          ('TPU v5p', 459.0), ('cpu', None)])
def test_peak_table_by_device_kind(kind, tflops):
  peak = metrics.table_peak_flops(kind)
  assert (peak is None) if tflops is None else peak == tflops * 1e12


def test_device_peak_is_the_table_or_a_measured_matmul():
  """The trainer's MFU denominator: a listed device's bf16 peak, else a matmul measured on it (float32 on a CPU),
  never the 1024x1024 float32 matmul on an accelerator, which put an H100's MFU at 700%."""
  import jax
  flops, source = metrics.device_peak_flops()
  device = jax.devices()[0]
  if metrics.table_peak_flops(device.device_kind):
    assert flops == metrics.table_peak_flops(device.device_kind) and 'dense bf16' in source
  else:
    assert math.isfinite(flops) and flops > 0
    assert ('float32 1024x1024' if device.platform == 'cpu' else 'bfloat16 8192x8192') in source


@pytest.mark.parametrize('threshold, max_batch', [(37, 256), (1, 256), (0, 256), (256, 256), (300, 100), (5, 6)])
@pytest.mark.parametrize('linear', [True, False])
def test_largest_batch_search_finds_the_threshold(threshold, max_batch, linear):
  """Memory linear in the batch (what XLA's estimates about follow) or not: the search returns the largest batch
  that fits, never asks beyond max_batch, and with linear memory needs few more tries than the doubling."""
  fixed, per_example = 1000.0, 10.0
  # Non-linear: a curve that is steeper than any line through two of its points predicts.
  memory = (lambda b: fixed + per_example * b) if linear else (lambda b: fixed + b ** 1.5)
  target = memory(threshold + 0.5)
  tried = []

  def fits(batch):
    assert 1 <= batch <= max_batch
    tried.append(batch)
    return memory(batch) <= target

  found = accelerator.largest_fitting(fits, max_batch, memory, target)
  assert found == min(threshold, max_batch)
  assert len(tried) == len(set(tried))  # no batch compiled twice
  if linear:
    doublings = math.floor(math.log2(max(found, 1))) + 2
    assert len(tried) <= doublings + 2


def test_tiny_run_on_cpu(tmp_path, monkeypatch, capsys):
  # The children compile at XLA's lowest optimisation level: the same step and shapes, about a third less compile
  # time on this CPU; the figures of a real run are not what this test checks.
  monkeypatch.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0')
  out = tmp_path / 'result.json'
  report = accelerator.main(['--sizes', 'tiny', '--remat', 'none', '--batch', '1', '--max_batch', '1', '--steps',
                             '1', '--warmup', '0', '--json', str(out)])
  printed = capsys.readouterr().out
  assert json.loads(out.read_text())['summary'] == report['summary']
  tiny = report['sizes']['tiny']
  assert list(tiny['policies']) == ['none']
  for policy, result in tiny['policies'].items():
    assert 'error' not in result, result
    (row,) = result['rows']
    assert row['batch'] == 1
    assert math.isfinite(row['step_s']) and row['step_s'] > 0
    assert math.isfinite(row['loss'])
    assert 0 < row['mfu'] <= 1
    assert row['xla_bytes'] > 0
    assert result['largest']['batch'] >= row['batch'] and result['largest']['confirmed']
    assert any(line.startswith(f'{policy:<15}{row["batch"]:>6}') for line in printed.splitlines())
  assert tiny['train_flops_per_example'] > 0 and tiny['params'] > 0
  assert 'cudnn: not available on cpu' in printed
  assert 'not measured (3b not in --sizes)' in printed
