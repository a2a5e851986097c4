"""Input pipeline throughput: examples/s and frames/s with 0, 1 and 2 grain workers.

  python benchmarks/input_pipeline.py [--batches 6] [--workers 0,1,2]

Two settings:
* demo:  configs/demo.py on the embedded dataset (4 s clips, 96x96 at 8 fps -> 16 frames of 64x64, T=4).
* paper: 128 frames of 224x224 in T=16 chunks with 128-bin log-mel, from 30 s 640x360 30 fps H.264 + AAC files
         generated here (a moving pattern over noise, so that the encoder has real work).
`frames/s` counts the frames delivered to the model; `source frames/s` the frames the decoder had to decode to
find them (the whole [start, end] span is decoded so that every sampled frame is exact).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mirasol_jax import config_lib  # noqa: E402
from mirasol_jax.data import demo_data  # noqa: E402
from mirasol_jax.data import pipeline  # noqa: E402
from mirasol_jax.data import sources  # noqa: E402
from mirasol_jax.data import tokenizer  # noqa: E402

REAL_SECONDS, REAL_FPS, REAL_W, REAL_H = 30.0, 30, 640, 360


def make_real_size_dataset(folder: str, count: int = 4) -> str:
  if os.path.exists(os.path.join(folder, 'train.jsonl')):
    return folder
  os.makedirs(os.path.join(folder, 'videos'), exist_ok=True)
  rng = np.random.default_rng(0)
  n = int(REAL_SECONDS * REAL_FPS)
  yy, xx = np.mgrid[:REAL_H, :REAL_W]
  lines = []
  for i in range(count):
    frames = np.empty((n, REAL_H, REAL_W, 3), np.uint8)
    noise = rng.integers(0, 60, (REAL_H, REAL_W, 3), dtype=np.uint8)
    for f in range(n):
      pattern = ((np.sin((xx + 4 * f) / 23.0) + np.cos((yy - 3 * f) / 17.0)) * 60 + 120).astype(np.uint8)
      frames[f] = noise + pattern[..., None] // 2
    t = np.arange(int(REAL_SECONDS * demo_data.SAMPLE_RATE)) / demo_data.SAMPLE_RATE
    sound = (0.2 * np.sin(2 * np.pi * (300 + 50 * i) * t) + 0.02 * rng.normal(size=t.shape)).astype(np.float32)
    name = f'videos/real_{i}.mp4'
    demo_data.write_mp4(os.path.join(folder, name), frames, REAL_FPS, np.stack([sound, sound]), layout='stereo',
                        crf=23)
    lines.append(dict(id=f'real_{i}', video=name, question='what is playing?', answer='a tone'))
  with open(os.path.join(folder, 'train.jsonl'), 'w') as f:
    f.writelines(json.dumps(line) + '\n' for line in lines)
  return folder


def ensure_tokenizer(config, folder: str) -> None:
  path = os.path.join(folder, 'tokenizer.model')
  if not os.path.exists(path):
    source = sources.open_source(config.data, 'train')
    tokenizer.train([t for i in range(len(source)) for t in tokenizer.text_fields(source[i])],
                    config.model.vocab_size, path)
  config.data.tokenizer = path


def measure(config, workers: int, batches: int) -> tuple[float, float]:
  config.data.num_workers = workers
  iterator = pipeline.build(config, 'train')
  next(iterator)  # start-up (worker processes, first decode) is not counted
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  seconds = time.perf_counter() - start
  examples = batches * config.batch_size
  return examples / seconds, examples * config.model.num_frames / seconds


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batches', type=int, default=6)
  parser.add_argument('--workers', default='0,1,2')
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()
  work = os.path.join(tempfile.gettempdir(), 'mirasol_bench')

  demo = config_lib.load_config(os.path.join(os.path.dirname(__file__), '..', 'configs', 'demo.py'))
  ensure_tokenizer(demo, sources.dataset_folder(demo.data))
  paper = config_lib.base_config('base')
  paper.data = config_lib.data_config(path=make_real_size_dataset(os.path.join(work, 'real')))
  paper.batch_size = 4
  ensure_tokenizer(paper, paper.data.path)

  print(f'{"setting":<8}{"workers":>8}{"examples/s":>12}{"frames/s":>10}{"source frames/s":>17}')
  for name, config, source_frames in (('demo', demo, demo_data.DURATION_S * demo_data.FPS),
                                      ('paper', paper, REAL_SECONDS * REAL_FPS)):
    for workers in (int(w) for w in args.workers.split(',')):
      batches = args.batches if name == 'demo' else max(2, args.batches // 3)
      examples_per_s, frames_per_s = measure(config, workers, batches)
      print(f'{name:<8}{workers:>8}{examples_per_s:>12.2f}{frames_per_s:>10.0f}'
            f'{examples_per_s * source_frames:>17.0f}', flush=True)


if __name__ == '__main__':
  main()
