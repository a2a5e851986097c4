"""Fuzzing the input pipeline: mutated mp4 files, jsonl lines and ArrayRecord records through the real grain pipeline.

  python benchmarks/fuzz.py [--cases 2000] [--seed 0] [--workers 0] [--chunk 100] [--json]

Each case is one record. A case mutates one of: the bytes of a real mp4 file (written by PyAV: H.264 with and
without AAC), read by path from a jsonl dataset; the bytes of a valid jsonl line, or one of its fields replaced by a
hostile value (wrong types, NaN, huge or negative numbers, deep nesting, paths leaving the folder, a FIFO); the
bytes of a stored ArrayRecord record, or the mp4 bytes inside it. Cases go in chunks through `pipeline.build` (the
grain DataLoader, DecodeExample, the jsonl and ArrayRecord sources), alternating evaluation and training passes
(random crops and jitter).

Printed: cases tried, escapes (exceptions out of the pipeline: each is a bug), examples read and skipped by reason,
peak memory (RSS high-water mark of this process, and its growth over the clean warm-up pass; with workers, that of
the largest worker process too), and time. A chunk
that hangs ends the process with the stacks of every thread (faulthandler) instead of waiting forever.
tests/test_fuzz.py runs a few hundred cases and checks that nothing escapes and memory stays bounded.
"""
from __future__ import annotations

import argparse
import collections
import faulthandler
import json
import os
import resource
import sys
import tempfile
import time
import traceback

import msgpack
import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mirasol_jax import config_lib  # noqa: E402
from mirasol_jax.data import demo_data  # noqa: E402
from mirasol_jax.data import pipeline  # noqa: E402
from mirasol_jax.data import sources  # noqa: E402
from mirasol_jax.data import tokenizer  # noqa: E402

GOOD = dict(question='what is it?', answer='a clip', options=['a clip', 'a song'])
# Values a field may be replaced by: wrong types, numbers out of any sense, paths out of the folder. Raw JSON text,
# so that what json.dumps cannot write (NaN, 1e999, 5000 digits, deep nesting, lone surrogates) is there too.
HOSTILE_JSON = [
    'null', 'true', 'false', '0', '-1', '-1e9', '1e308', '1e999', '-1e999', 'NaN', 'Infinity', '9' * 5000,
    '1' + '0' * 400, '-' + '9' * 30, '""', '"x"', '"\\ud800"', '"\\u0000"', '[]', '[1, 2]', '["a", 3]', '{}',
    '{"a": {"b": 1}}', '[' * 50 + ']' * 50, '[' * 5000 + ']' * 5000, '"' + 'x' * 100_000 + '"', '"../../etc/passwd"',
    '"/dev/zero"', '"/"', '"videos"', '"videos/pipe.mp4"', '"videos/../../outside.mp4"', '"videos/seed_0.mp4"',
]
FIELDS = ['video', 'start', 'end', 'question', 'answer', 'options', 'captions', 'label', 'id', 'kind', 'title',
          'answer_index', '_task', '_index', 'error', 'error_kind', 'video_path', 'video_bytes']
# Values msgpack can carry into a stored record beside the JSON ones.
HOSTILE_MSGPACK = [None, True, -1, -1e9, float('nan'), float('inf'), 2**63, -2**63, 'x', b'bytes', [], [1, 'a'],
                   {'a': 1}, {1: 2}, msgpack.ExtType(5, b'ext'), '/etc/passwd', 'videos/seed_0.mp4']
# Four-byte values that mp4 box fields (sizes, durations, timescales, dimensions, counts) find hardest.
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFFE]
BOXES = [b'moov', b'mvhd', b'trak', b'tkhd', b'mdhd', b'hdlr', b'stsd', b'avc1', b'avcC', b'mp4a', b'esds', b'stts',
         b'stsc', b'stsz', b'stco', b'ctts', b'stss', b'mdat', b'ftyp', b'edts', b'elst']


def model_config() -> dict:
  """The smallest shapes DecodeExample needs: 4 frames of 32x32 in 2 chunks."""
  return dict(num_chunks=2, num_frames=4, image_size=(32, 32), audio_frames_per_chunk=16, mel_bins=32,
              max_text_len=16, vocab_size=512)


def make_seeds(folder: str) -> list[bytes]:
  """Real mp4 files written by PyAV: 1 s of 32x32 H.264 with AAC sound, and 0.8 s without sound."""
  rng = np.random.default_rng(0)
  seeds = []
  for i, audio in enumerate((True, False)):
    path = os.path.join(folder, 'videos', f'seed_{i}.mp4')
    frames = rng.integers(0, 255, (10 - 2 * i, 32, 32, 3), dtype=np.uint8)
    sound = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16_000) / 16_000))[None].astype(np.float32)
    demo_data.write_mp4(path, frames, 10, sound if audio else None)
    with open(path, 'rb') as f:
      seeds.append(f.read())
  return seeds


def mutate_bytes(data: bytes, rng: np.random.Generator) -> bytes:
  """One to four random mutations: bit flips, interesting 4-byte values (near a box name, or anywhere), inserted,
  deleted or repeated ranges, truncation. A third of the time, only bit flips inside the media data (`mdat`), which
  leave the file's header whole and give the decoders damaged bitstreams to decode."""
  data = bytearray(data)
  payload = data.find(b'mdat')
  if payload >= 0 and rng.uniform() < 1 / 3:
    end = min(len(data), payload + 4 + int.from_bytes(data[payload - 4:payload], 'big'))
    for _ in range(int(rng.integers(1, 33))):
      i = int(rng.integers(payload + 4, end))
      data[i] ^= 1 << int(rng.integers(8))
    return bytes(data)
  for _ in range(int(rng.integers(1, 5))):
    if not data:
      break
    kind = int(rng.integers(7))
    at = int(rng.integers(len(data)))
    if kind == 0:
      for _ in range(int(rng.integers(1, 9))):
        i = int(rng.integers(len(data)))
        data[i] ^= 1 << int(rng.integers(8))
    elif kind in (1, 2):
      if kind == 1:  # a field of a box
        box = BOXES[int(rng.integers(len(BOXES)))]
        found = data.find(box)
        at = found + 4 + 4 * int(rng.integers(8)) if found >= 0 else at
      value = INTERESTING[int(rng.integers(len(INTERESTING)))]
      data[at:at + 4] = value.to_bytes(4, 'big')
    elif kind == 3:
      data[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    elif kind == 4:
      del data[at:at + int(rng.integers(1, 256))]
    elif kind == 5:
      length = int(rng.integers(1, 512))
      data[at:at] = data[at:at + length] * int(rng.integers(1, 4))
    else:
      data = data[:at]
  return bytes(data)


def mutate_line(line: dict, rng: np.random.Generator) -> bytes:
  """A jsonl line: a field replaced by a hostile value (as raw JSON text), or its bytes mutated."""
  if rng.uniform() < 0.5:
    field = FIELDS[int(rng.integers(len(FIELDS)))]
    value = HOSTILE_JSON[int(rng.integers(len(HOSTILE_JSON)))]
    rest = json.dumps({k: v for k, v in line.items() if k != field})
    return (rest[:-1] + (', ' if len(rest) > 2 else '') + f'{json.dumps(field)}: {value}}}').encode()
  return mutate_bytes(json.dumps(line).encode(), rng).replace(b'\n', b' ')


def mutate_record(record: dict, rng: np.random.Generator) -> bytes:
  """A stored record: a field replaced by a hostile value, its bytes mutated, or its mp4 bytes mutated."""
  kind = int(rng.integers(4))
  if kind == 0:
    field = FIELDS[int(rng.integers(len(FIELDS)))]
    return msgpack.packb({**record, field: HOSTILE_MSGPACK[int(rng.integers(len(HOSTILE_MSGPACK)))]})
  if kind == 1:  # the header and field names, where a flip changes the structure
    data = bytearray(msgpack.packb(record))
    for _ in range(int(rng.integers(1, 4))):
      i = int(rng.integers(min(len(data), 200)))
      data[i] = int(rng.integers(256))
    return bytes(data)
  if kind == 2:
    return mutate_bytes(msgpack.packb(record), rng)
  return msgpack.packb({**record, 'video_bytes': mutate_bytes(record['video_bytes'], rng)})


class Stats:
  def __init__(self):
    self.cases = 0
    self.read = 0
    self.reasons: collections.Counter = collections.Counter()
    self.escapes: list[str] = []
    self.slowest_chunk_s = 0.0

  def count(self, batch) -> None:
    keep = batch['index'] >= 0
    for code in batch['skip_reason'][keep].tolist():
      if code:
        self.reasons[list(pipeline.SKIP_REASONS)[code - 1]] += 1
      else:
        self.read += 1


def run_chunk(config, split: str, train: bool, expected: int, stats: Stats, timeout_s: float) -> None:
  """Reads one pass over the split; an exception out of the pipeline is an escape."""
  started = time.perf_counter()
  faulthandler.dump_traceback_later(timeout_s, exit=True)
  seen = 0
  try:
    for batch in pipeline.build(config, split, train=train, num_epochs=1 if train else None):
      stats.count(batch)
      seen += int((batch['index'] >= 0).sum())
  except Exception as e:  # pylint: disable=broad-except
    stats.escapes.append(f'{split}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}')
  finally:
    faulthandler.cancel_dump_traceback_later()
  if train:  # training drops the last partial batch
    expected -= expected % config.batch_size
  if seen != expected and not stats.escapes:
    stats.escapes.append(f'{split}: {seen} examples for {expected} records')
  stats.slowest_chunk_s = max(stats.slowest_chunk_s, time.perf_counter() - started)


def _status_kib(field: str) -> int:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  raise KeyError(field)


def rss_kib() -> int:
  """The resident memory of this process now."""
  return _status_kib('VmRSS')


def peak_kib() -> int:
  """The high-water mark of this process's resident memory, since reset_peak. Not getrusage's ru_maxrss: that one
  survives exec, so a process started by a large one (pytest) would report its parent's size."""
  return _status_kib('VmHWM')


def reset_peak() -> None:
  """Starts the high-water mark again from the current resident memory (Linux 4.0+; else it counts from exec)."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
  except OSError:
    pass


def fuzz(cases: int, seed: int = 0, workers: int = 0, chunk: int = 100, decode_timeout_s: float = 10.0) -> dict:
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  started = time.perf_counter()
  rng = np.random.default_rng(seed)
  stats = Stats()
  with tempfile.TemporaryDirectory() as root:
    folder = os.path.join(root, 'data')
    os.makedirs(os.path.join(folder, 'videos'))
    seeds = make_seeds(folder)
    os.mkfifo(os.path.join(folder, 'videos', 'pipe.mp4'))
    with open(os.path.join(root, 'outside.mp4'), 'wb') as f:
      f.write(seeds[0])
    token_path = os.path.join(root, 'tokenizer.model')
    tokenizer.train(['what is it?', 'a clip', 'a song', 'options: a clip | a song'] * 20, 300, token_path)

    def config_for(path, **data):
      import ml_collections
      config = ml_collections.ConfigDict()
      config.model = model_config()
      config.data = config_lib.data_config(path=path, tokenizer=token_path, num_workers=workers,
                                           max_skipped_fraction=1.0, decode_timeout_s=decode_timeout_s, **data)
      config.batch_size, config.seed = 8, seed
      return config

    good_lines = [dict(id=f'seed_{i}', video=f'videos/seed_{i}.mp4', **GOOD) for i in range(len(seeds))]
    good_records = [dict(id=f'seed_{i}', video_bytes=data, **GOOD) for i, data in enumerate(seeds)]
    # Warm-up: the clean seeds, read once, so that what the libraries keep (codecs, tokenizer) is in the baseline.
    with open(os.path.join(folder, 'warmup.jsonl'), 'w') as f:
      f.writelines(json.dumps(line) + '\n' for line in good_lines * 8)
    for train in (False, True):
      run_chunk(config_for(folder), 'warmup', train, len(good_lines) * 8, stats, 120)
    stats.reasons.clear()
    stats.read = 0
    reset_peak()
    baseline_rss = rss_kib()

    chunk_index = 0
    while stats.cases < cases:
      count = min(chunk, cases - stats.cases)
      train = chunk_index % 2 == 1
      kind = ('jsonl', 'array_record')[(chunk_index // 2) % 2]
      split = f'chunk{chunk_index}'
      if kind == 'jsonl':
        lines = []
        for i in range(count):
          choice = int(rng.integers(len(seeds)))
          if rng.uniform() < 0.5:  # a mutated mp4 behind a good line
            name = f'videos/{split}_{i}.mp4'
            with open(os.path.join(folder, name), 'wb') as f:
              f.write(mutate_bytes(seeds[choice], rng))
            lines.append(json.dumps(dict(good_lines[choice], id=f'{split}_{i}', video=name)).encode())
          else:
            lines.append(mutate_line(good_lines[choice], rng))
        with open(os.path.join(folder, f'{split}.jsonl'), 'wb') as f:
          f.writelines(line + b'\n' for line in lines)
        # Blank lines are no records: count what the source holds.
        expected = len(sources.JsonlSource(folder, split))
        run_chunk(config_for(folder), split, train, expected, stats, 60 + 2 * decode_timeout_s * count)
      else:
        from array_record.python import array_record_module
        shards = os.path.join(root, split)
        os.makedirs(shards)
        writer = array_record_module.ArrayRecordWriter(os.path.join(shards, f'{split}.array_record-00000-of-00001'),
                                                       'group_size:1')
        for _ in range(count):
          writer.write(mutate_record(good_records[int(rng.integers(len(seeds)))], rng))
        writer.close()
        expected = count
        run_chunk(config_for(shards, source='array_record'), split, train, expected, stats,
                  60 + 2 * decode_timeout_s * count)
      stats.cases += count
      chunk_index += 1
    end_rss, end_peak = rss_kib(), peak_kib()
  return dict(cases=stats.cases, escapes=len(stats.escapes), escape_messages=stats.escapes[:5], read=stats.read,
              skipped=dict(stats.reasons.most_common()), skipped_total=sum(stats.reasons.values()),
              baseline_rss_mib=baseline_rss / 1024, peak_rss_mib=end_peak / 1024,
              peak_over_baseline_mib=(end_peak - baseline_rss) / 1024,
              rss_growth_mib=(end_rss - baseline_rss) / 1024,
              # getrusage's children's figure survives exec: at least this process's size when they started.
              peak_worker_rss_mib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if workers else 0.0,
              slowest_chunk_s=stats.slowest_chunk_s,
              chunk=chunk, seconds=time.perf_counter() - started, workers=workers, seed=seed)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cases', type=int, default=2000)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--workers', type=int, default=0, help='grain worker processes (config.data.num_workers)')
  parser.add_argument('--chunk', type=int, default=100, help='cases per pipeline pass')
  parser.add_argument('--json', action='store_true', help='print the result as one JSON line')
  args = parser.parse_args()
  import logging
  logging.getLogger().setLevel(logging.ERROR)  # every skipped example logs a warning
  result = fuzz(args.cases, args.seed, args.workers, args.chunk)
  if args.json:
    print(json.dumps(result))
    return
  print(f'cases tried: {result["cases"]} (seed {result["seed"]}, {result["workers"]} workers, chunks of '
        f'{result["chunk"]})')
  print(f'escapes: {result["escapes"]}')
  for message in result['escape_messages']:
    print('  ' + message.replace('\n', '\n  '))
  print(f'read: {result["read"]}, skipped: {result["skipped_total"]}')
  for reason, count in result['skipped'].items():
    print(f'  {reason:<17} {count}')
  print(f'memory: peak RSS {result["peak_rss_mib"]:.0f} MiB, {result["peak_over_baseline_mib"]:.0f} MiB over the RSS '
        f'after the warm-up ({result["baseline_rss_mib"]:.0f} MiB); RSS at the end {result["rss_growth_mib"]:+.0f} MiB'
        + (f'; largest worker process peak {result["peak_worker_rss_mib"]:.0f} MiB' if result['workers'] else ''))
  print(f'time: {result["seconds"]:.1f} s ({1000 * result["seconds"] / max(result["cases"], 1):.1f} ms a case), '
        f'slowest chunk {result["slowest_chunk_s"]:.1f} s')


if __name__ == '__main__':
  main()
