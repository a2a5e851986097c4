"""Fuzzing the input pipeline (benchmarks/fuzz.py): mutated mp4 files, jsonl lines and ArrayRecord records.

Each run is a fresh process, so that its peak resident memory is its own: a hostile record that made the pipeline
allocate without bound (the audio of a negative start, a frame of a huge claimed size) shows there, even if the
allocation was freed. The seed is fixed: a failure reproduces with `python benchmarks/fuzz.py --cases N --seed 0`.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

# Peak resident memory over the resident memory after the clean warm-up pass: decoding tiny clips needs a few tens of
# MiB (codec buffers, glibc arenas of grain's threads); one unbounded allocation would need far more.
MAX_PEAK_GROWTH_MIB = 200


def fuzz(*args):
  result = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'fuzz.py'), '--json', *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('workers, cases', [(0, 500), (2, 100)])
def test_no_mutated_input_escapes_the_pipeline_and_memory_stays_bounded(workers, cases):
  result = fuzz('--cases', str(cases), '--seed', '0', '--workers', str(workers), '--chunk', '50')
  print(json.dumps(result, indent=1))
  assert result['cases'] == cases
  assert result['escapes'] == 0, result['escape_messages']
  # Every case reached the pipeline: each example was read or skipped with a reason, none unforeseen.
  assert result['read'] > 0 and {'bad_record', 'undecodable'} <= set(result['skipped'])
  assert 'unexpected' not in result['skipped']
  assert result['peak_over_baseline_mib'] < MAX_PEAK_GROWTH_MIB
  if workers:  # a worker imports what this process does: the same baseline, roughly
    assert result['peak_worker_rss_mib'] < result['baseline_rss_mib'] + MAX_PEAK_GROWTH_MIB
