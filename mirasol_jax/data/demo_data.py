"""The embedded default dataset: short synthetic videos with sound whose questions need both, over time.

Generated on first use from a fixed seed into a cache folder (`$MIRASOL_CACHE`, default ~/.cache/mirasol_jax) as
real H.264 + AAC mp4 files and jsonl files (`train.jsonl`, `validation.jsonl`). Each 4-second clip shows
one coloured shape on a still backdrop (random tint, gradient and texture) and plays short tones over a hum and
noise of random level; one question per clip, of three kinds:

* colour:    the shape changes colour every second; one second has a high tone (the others low or none).
             "what colour is the shape while the high tone plays?" -> red | green | blue | yellow
* count:     beeps sound at random times; the shape turns white at some moment.
             "how many beeps before the shape turns white?" -> zero | one | two | three
* direction: the shape stands still until a single beep, then moves.
             "does the shape move left or right after the beep?" -> left | right

Each record also has the answers of its kind as `options` (with `answer_index`), for the multiple-choice task, and
three `captions`, descriptions of what happens in other words each ("a circle changes from red to green to blue to
yellow", "two beeps before the green square turns white", "a blue circle moves left after a beep"), for the
captioning task. Neither stream alone answers any question. `majority_baselines(folder)` gives the accuracy of always
answering the most common training answer, overall and per question kind.

The unlabelled set (`labelled=False`, config.data.source='demo_unlabelled') holds other clips made the same way,
with sound and no text: what pretraining the audio-video towers reads.

  python -m mirasol_jax.data.demo_data [--folder DIR] [--unlabelled]   # generates (if needed), prints baselines
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
from typing import Optional

import av
import numpy as np

VERSION = 4
SEED = 20241121
NUM_TRAIN, NUM_VALIDATION = 1200, 120
NUM_UNLABELLED = 3600  # training clips of the unlabelled set (its validation split has NUM_VALIDATION)
DURATION_S, FPS, SIZE = 4.0, 8, 96
SAMPLE_RATE = 16_000
COLOURS = {'red': (220, 40, 40), 'green': (40, 200, 60), 'blue': (50, 80, 230), 'yellow': (230, 210, 40)}
COUNT_WORDS = ('zero', 'one', 'two', 'three')
HIGH_HZ, LOW_HZ, BEEP_HZ = 1500.0, 300.0, 800.0
BEEP_S = 0.25
RADIUS = 22  # pixels of SIZE: the shape spans about half the frame


def default_folder(labelled: bool = True) -> str:
  cache = os.environ.get('MIRASOL_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'mirasol_jax'))
  return os.path.join(cache, f'demo_v{VERSION}' + ('' if labelled else '_unlabelled'))


def write_mp4(path: str, frames: np.ndarray, fps: int, audio: Optional[np.ndarray] = None,
              sample_rate: int = SAMPLE_RATE, layout: str = 'mono', crf: int = 12) -> None:
  """Writes uint8 frames [N, H, W, 3] as H.264 and float audio [channels, samples] as AAC into an mp4 file."""
  with av.open(path, 'w') as container:
    video = container.add_stream('libx264', rate=fps)
    video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], 'yuv420p'
    video.options = {'crf': str(crf), 'preset': 'veryfast', 'tune': 'zerolatency'}
    audio_stream = None
    if audio is not None:
      audio_stream = container.add_stream('aac', rate=sample_rate, layout=layout)
    for i, array in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format='rgb24')
      frame.pts = i
      container.mux(video.encode(frame))
    container.mux(video.encode(None))
    if audio_stream is not None:
      block = 1024
      audio = np.asarray(audio, np.float32)
      for offset in range(0, audio.shape[1], block):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[:, offset:offset + block]), format='fltp',
                                           layout=layout)
        frame.sample_rate, frame.pts = sample_rate, offset
        container.mux(audio_stream.encode(frame))
      container.mux(audio_stream.encode(None))


def _tone(samples: np.ndarray, start: float, length: float, hz: float, amplitude: float = 0.4) -> None:
  lo, hi = int(start * SAMPLE_RATE), min(int((start + length) * SAMPLE_RATE), len(samples))
  t = np.arange(hi - lo) / SAMPLE_RATE
  ramp = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01)  # 10 ms fades: no clicks
  samples[lo:hi] += amplitude * ramp * np.sin(2 * np.pi * hz * t)


def _draw(frame: np.ndarray, x: float, y: float, colour, circle: bool, radius: int = RADIUS) -> None:
  yy, xx = np.mgrid[:frame.shape[0], :frame.shape[1]]
  if circle:
    inside = (yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2
  else:
    inside = (np.abs(yy - y) <= radius) & (np.abs(xx - x) <= radius)
  frame[inside] = colour


def _background(rng: np.random.Generator) -> np.ndarray:
  """[SIZE, SIZE, 3] uint8: a still backdrop of random tint, brightness, gradient and texture, darker than any
  shape, so that only the shape moves or changes and no two clips look alike around it."""
  yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE - 0.5
  angle = rng.uniform(0, 2 * np.pi)
  ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None] * rng.uniform(0, 80)
  texture = rng.normal(0, rng.uniform(2, 10), (SIZE, SIZE, 1))
  return np.clip(rng.uniform(15, 130, 3) + ramp + texture, 0, 170).astype(np.uint8)


def _captions(kind: str, shape: str, colour: str, detail) -> list[str]:
  """Three descriptions of what happens in a clip, in other words each (the references of the captioning task)."""
  if kind == 'colour':
    a, b, c, d = detail
    return [f'a {shape} changes from {a} to {b} to {c} to {d}', f'the {shape} is {a}, then {b}, then {c}, then {d}',
            f'a {a} {shape} turns {b}, {c} and then {d} while tones play']
  if kind == 'count':
    beeps = 'no beep' if detail == 'zero' else f'{detail} beep' if detail == 'one' else f'{detail} beeps'
    return [f'a {colour} {shape} turns white after {beeps}', f'{beeps} before the {colour} {shape} turns white',
            f'the {colour} {shape} becomes white after {beeps}']
  return [f'a {colour} {shape} moves {detail} after a beep',
          f'after the beep the {colour} {shape} moves to the {detail}',
          f'the {colour} {shape} stays still, then moves {detail} when a beep sounds']


def make_clip(kind: str, rng: np.random.Generator):
  """-> (frames [N, SIZE, SIZE, 3] uint8, audio [1, samples] float32, question, answer, captions)."""
  num_frames = int(DURATION_S * FPS)
  frames = np.zeros((num_frames, SIZE, SIZE, 3), np.uint8)
  frames[:] = _background(rng)
  audio = np.zeros(int(DURATION_S * SAMPLE_RATE), np.float32)
  circle = bool(rng.integers(2))
  x0, y0 = rng.uniform(RADIUS, SIZE - RADIUS, 2)
  times = np.arange(num_frames) / FPS
  if kind == 'colour':
    segments = list(rng.permutation(list(COLOURS)))
    high = int(rng.integers(4))
    for i, t in enumerate(times):
      _draw(frames[i], x0, y0, COLOURS[segments[int(t)]], circle)
    for second in range(4):
      if second == high:
        _tone(audio, second + 0.2, 0.6, HIGH_HZ)
      elif rng.uniform() < 0.6:
        _tone(audio, second + 0.2, 0.6, LOW_HZ)
    question, answer = 'what colour is the shape while the high tone plays?', segments[high]
    colour_name, detail = '', segments
  elif kind == 'count':
    colour_name = list(COLOURS)[int(rng.integers(4))]
    colour = COLOURS[colour_name]
    turn = rng.uniform(1.5, 3.5)
    count = int(rng.integers(4))
    # Keep beeps apart, so that each one can be heard (and seen in the spectrogram) on its own.
    before = 0.1 + np.arange(count) * (turn - 0.2) / max(count, 1) + rng.uniform(0, 0.05, count)
    after = [t for t in (turn + 0.15 + 0.4 * i for i in range(int(rng.integers(3)))) if t + BEEP_S < DURATION_S]
    for t in list(before) + after:
      _tone(audio, t, BEEP_S, BEEP_HZ)
    for i, t in enumerate(times):
      _draw(frames[i], x0, y0, (235, 235, 235) if t >= turn else colour, circle)
    question, answer = 'how many beeps before the shape turns white?', COUNT_WORDS[count]
    detail = answer
  else:
    colour_name = list(COLOURS)[int(rng.integers(4))]
    colour = COLOURS[colour_name]
    beep = rng.uniform(1.0, 2.5)
    direction = 'left' if rng.integers(2) else 'right'
    x_start = rng.uniform(SIZE / 2 - 10, SIZE / 2 + 10)
    _tone(audio, beep, BEEP_S, BEEP_HZ)
    speed = (-1 if direction == 'left' else 1) * 24.0  # pixels per second
    for i, t in enumerate(times):
      x = x_start + speed * max(0.0, t - beep)
      _draw(frames[i], float(np.clip(x, RADIUS, SIZE - RADIUS)), y0, colour, circle)
    question, answer = 'does the shape move left or right after the beep?', direction
    detail = direction
  # A noise floor and a low hum, both of random level: no two clips sound alike between the tones.
  t = np.arange(len(audio)) / SAMPLE_RATE
  audio += rng.uniform(0.0, 0.08) * np.sin(2 * np.pi * rng.uniform(60, 120) * t).astype(np.float32)
  audio += rng.normal(0, rng.uniform(0.005, 0.04), audio.shape).astype(np.float32)
  captions = _captions(kind, 'circle' if circle else 'square', colour_name, detail)
  return frames, audio[None], question, answer, captions


KINDS = ('colour', 'count', 'direction')
# The answers of each question kind: the options of the multiple-choice task.
OPTIONS = {'colour': list(COLOURS), 'count': list(COUNT_WORDS), 'direction': ['left', 'right']}


def _write_clip(job) -> dict:
  """Writes one clip; its content depends only on (labelled, split, index), so clips can be made in any order."""
  staging, labelled, split, index = job
  kind = KINDS[index % len(KINDS)]
  stream = SPLITS.index(split) + (0 if labelled else len(SPLITS))  # unlabelled clips are other clips
  frames, audio, question, answer, captions = make_clip(kind, np.random.default_rng([SEED, stream, index]))
  name = f'videos/{split}_{index:04d}.mp4'
  write_mp4(os.path.join(staging, name), frames, FPS, audio)
  line = dict(id=f'{split}_{index:04d}', video=name, start=0.0, end=DURATION_S)
  if labelled:
    line.update(question=question, answer=answer, kind=kind, options=OPTIONS[kind],
                answer_index=OPTIONS[kind].index(answer), captions=captions)
  return line


SPLITS = ('train', 'validation')


def generate(folder: str, num_train: int = NUM_TRAIN, num_validation: int = NUM_VALIDATION,
             labelled: bool = True) -> None:
  """Writes the dataset into `folder` atomically (a temporary folder renamed at the end), one process per core."""
  parent = os.path.dirname(os.path.abspath(folder))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix='.demo_', dir=parent)
  try:
    os.makedirs(os.path.join(staging, 'videos'))
    jobs = {split: [(staging, labelled, split, i) for i in range(count)]
            for split, count in zip(SPLITS, (num_train, num_validation))}
    with multiprocessing.get_context('spawn').Pool(os.cpu_count() or 1) as pool:
      for split in SPLITS:
        lines = pool.map(_write_clip, jobs[split], chunksize=8)
        with open(os.path.join(staging, f'{split}.jsonl'), 'w') as f:
          f.writelines(json.dumps(line) + '\n' for line in lines)
    if os.path.exists(folder):  # another process finished first
      shutil.rmtree(staging)
    else:
      os.rename(staging, folder)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def ensure(folder: Optional[str] = None, labelled: bool = True) -> str:
  """The dataset folder (the labelled or the unlabelled set), generated first if it is not there yet."""
  folder = folder or default_folder(labelled)
  if not os.path.exists(os.path.join(folder, 'validation.jsonl')):
    generate(folder, NUM_TRAIN if labelled else NUM_UNLABELLED, labelled=labelled)
  return folder


def _read(folder: str, split: str) -> list[dict]:
  with open(os.path.join(folder, f'{split}.jsonl')) as f:
    return [json.loads(line) for line in f]


def majority_baselines(folder: str) -> dict[str, float]:
  """Validation accuracy of the most common training answer: overall, per question kind, and of the most common
  answer of each kind over all kinds."""
  from mirasol_jax.evaluators import vqa
  train, validation = _read(folder, 'train'), _read(folder, 'validation')
  result = vqa.majority_baseline([ex['answer'] for ex in train], [ex['answer'] for ex in validation],
                                 [ex['kind'] for ex in train], [ex['kind'] for ex in validation])
  return {'overall': result['accuracy'], **{k: result[f'accuracy/{k}'] for k in KINDS},
          'per_kind': result['per_group']}


if __name__ == '__main__':
  import argparse
  import time

  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--folder', default=None)
  parser.add_argument('--unlabelled', action='store_true', help='the unlabelled set (clips with sound, no text)')
  args = parser.parse_args()
  start = time.perf_counter()
  path = ensure(args.folder, labelled=not args.unlabelled)
  print(f'{path} ready in {time.perf_counter() - start:.1f}s')
  if not args.unlabelled:
    print(json.dumps(majority_baselines(path), indent=1))
