"""Input pipeline throughput: examples/s, examples/s per core and frames/s, per way of reading the clips, with 0, 1
and 2 grain workers.

  python benchmarks/input_pipeline.py [--batches 6] [--workers 0,1,2] [--settings demo,paper]
                                      [--paths decode-all,seek,h264,raw]

Two settings:
* demo:  configs/demo.py on the embedded dataset (4 s clips, 96x96 at 8 fps -> 16 frames of 64x64, T=4).
* paper: 128 frames of 224x224 in T=16 chunks with 128-bin log-mel, from 30 s 640x360 30 fps H.264 + AAC files
         generated here (a moving pattern over noise, so that the encoder has real work; encoded as a live encoder
         does: no B-frames, a key frame every 250 frames).
* paper-b (only when asked for): the same clips encoded as web video usually is: 3 B-frames to a P-frame, a key
         frame every 2 s. Paths decode-all and seek only.
Ways of reading (paths):
* decode-all: the decoder goes through every frame between the first and the last sampled time (what the pipeline
              did before DecodeOptions; config.data.decode_seek=False, decode_skip_unneeded=False, FFmpeg threads
              on every core).
* seek:       config.data.decode_seek=True: key frames sought past stretches no sampled time needs, unneeded
              non-reference frames skipped, one decoder thread per worker (media.DecodeOptions). Off by default:
              a container's key-frame flags can name frames a decoder cannot start from.
* h264, raw:  the clips converted to training's size and frame rate (`convert --format=resampled`,
              data/resample.py, one stored frame per segment) as H.264, or as decoded YUV frames; read by the same
              pipeline. The demo's converted set is its first 256 training clips.
Columns: `ex/s` examples per second of wall time; `ex/s/core` examples per CPU-second of the main process and its
workers together (the rate one core would give, whatever else the machine runs); `frames/s` frames delivered to
the model per second; `decoded/ex` video frames the decoder produced per example (the source's frames for
decode-all and seek); `MB/clip` the size of a clip's file (the first four clips).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mirasol_jax import config_lib  # noqa: E402
from mirasol_jax.data import demo_data  # noqa: E402
from mirasol_jax.data import media  # noqa: E402
from mirasol_jax.data import pipeline  # noqa: E402
from mirasol_jax.data import resample  # noqa: E402
from mirasol_jax.data import sources  # noqa: E402
from mirasol_jax.data import tokenizer  # noqa: E402

try:
  import psutil
except ImportError:  # then the CPU time of worker processes is not counted (workers=0 is still right)
  psutil = None

REAL_SECONDS, REAL_FPS, REAL_W, REAL_H = 30.0, 30, 640, 360
PATHS = ('decode-all', 'seek', 'h264', 'raw')
DEMO_CONVERTED_CLIPS = 256
MIN_SECONDS = 4.0  # each measurement runs at least this long (and at least --batches batches)


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


def reencode_dataset(source: str, folder: str, options: dict[str, str]) -> str:
  """The clips of the dataset folder `source` encoded again with x264 `options` (the sound copied as it is)."""
  import av  # pylint: disable=g-import-not-at-top
  if os.path.exists(os.path.join(folder, 'train.jsonl')):
    return folder
  os.makedirs(os.path.join(folder, 'videos'), exist_ok=True)
  with open(os.path.join(source, 'train.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  for line in lines:
    with av.open(os.path.join(source, line['video'])) as inp, \
         av.open(os.path.join(folder, line['video']), 'w') as out:
      video = out.add_stream('libx264', rate=REAL_FPS)
      video.width, video.height, video.pix_fmt, video.options = REAL_W, REAL_H, 'yuv420p', options
      sound = out.add_stream_from_template(inp.streams.audio[0])
      for packet in inp.demux():
        if packet.stream.type == 'audio' and packet.size:
          packet.stream = sound
          out.mux(packet)
        elif packet.stream.type == 'video':
          for frame in packet.decode():
            frame.pict_type = av.video.frame.PictureType.NONE  # the encoder chooses the frame types again
            out.mux(video.encode(frame))
      out.mux(video.encode(None))
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


def demo_subset(demo, folder: str, count: int) -> str:
  """A dataset folder of the demo's first `count` training records, reading the demo's media."""
  if not os.path.exists(os.path.join(folder, 'train.jsonl')):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(sources.dataset_folder(demo.data), 'train.jsonl')) as f:
      lines = f.readlines()[:count]
    with open(os.path.join(folder, 'train.jsonl'), 'w') as f:
      f.writelines(lines)
  return folder


def converted(config, folder: str, output: str, codec: str) -> tuple[str, float]:
  """(dataset folder, CPU seconds per clip of the conversion; 0 when it was already there)."""
  if os.path.exists(os.path.join(output, 'train.jsonl')):
    return output, 0.0
  source = config.copy_and_resolve_references()
  source.data.source, source.data.path = 'jsonl', folder
  if folder != sources.dataset_folder(config.data):
    source.data.media_root = sources.dataset_folder(config.data)
  settings = resample.ResampleSettings.from_config(config, video_codec=codec)
  start = cpu_seconds()
  report = resample.convert(source, output, settings=settings, workers=1)
  clips = max(1, report['splits']['train']['clips_converted'])
  return output, (sum(cpu_seconds().values()) - sum(start.values())) / clips


def cpu_seconds() -> dict[int, float]:
  """CPU seconds (user + system) so far of this process and of each of its live child processes, by pid."""
  if psutil is None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {os.getpid(): usage.ru_utime + usage.ru_stime}
  me = psutil.Process()
  times = {}
  for process in [me] + me.children(recursive=True):
    try:
      cpu = process.cpu_times()
      times[process.pid] = cpu.user + cpu.system
    except psutil.Error:  # ended meanwhile
      pass
  return times


def measure(config, workers: int, batches: int) -> tuple[float, float]:
  """(examples per second, examples per CPU-second) of the training iterator, start-up left out."""
  config.data.num_workers = workers
  iterator = pipeline.build(config, 'train')
  next(iterator)  # start-up (worker processes, first decode) is not counted
  before, start, done = cpu_seconds(), time.perf_counter(), 0
  while done < batches or time.perf_counter() - start < MIN_SECONDS:
    next(iterator)
    done += 1
  seconds = time.perf_counter() - start
  after = cpu_seconds()
  cpu = sum(t - before.get(pid, 0.0) for pid, t in after.items())
  del iterator
  examples = done * config.batch_size
  return examples / seconds, examples / max(cpu, 1e-9)


def decoded_per_example(config, count: int = 8) -> float:
  """Video frames the decoder produces per training example (in this process, the first `count` records)."""
  decode = pipeline.DecodeExample(config.model, config.data, train=True)
  source = sources.open_source(config.data, 'train')
  for i in range(count):
    record = dict(source[i % len(source)], _index=i)
    decode.decode(record, np.random.default_rng(i))
  return decode.frames_decoded / count


def clip_megabytes(config) -> float:
  source = sources.open_source(config.data, 'train')
  paths = [source[i].get('video_path') for i in range(min(4, len(source)))]
  return float(np.mean([os.path.getsize(p) for p in paths if p])) / 1e6


def path_config(config, path: str, folders: dict[str, str]):
  variant = config.copy_and_resolve_references()
  if path in ('decode-all', 'seek'):
    if path == 'decode-all':
      variant.data.decode_seek = variant.data.decode_skip_unneeded = False
      variant.data.decode_threads = media.available_cores()  # FFmpeg's own choice before
    else:
      variant.data.decode_seek = True
    return variant
  variant.data.source, variant.data.path, variant.data.media_root = 'jsonl', folders[path], ''
  return variant


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--batches', type=int, default=6)
  parser.add_argument('--workers', default='0,1,2')
  parser.add_argument('--settings', default='demo,paper')
  parser.add_argument('--paths', default=','.join(PATHS))
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()
  work = os.path.join(tempfile.gettempdir(), 'mirasol_bench')
  paths = args.paths.split(',')

  demo = config_lib.load_config(os.path.join(os.path.dirname(__file__), '..', 'configs', 'demo.py'))
  ensure_tokenizer(demo, sources.dataset_folder(demo.data))
  paper = config_lib.base_config('base')
  paper.data = config_lib.data_config(path=make_real_size_dataset(os.path.join(work, 'real')))
  paper.batch_size = 4
  ensure_tokenizer(paper, paper.data.path)
  subset = demo_subset(demo, os.path.join(work, 'demo_subset'), DEMO_CONVERTED_CLIPS)
  settings = [('demo', demo, subset, paths), ('paper', paper, paper.data.path, paths)]
  if 'paper-b' in args.settings.split(','):
    web = paper.copy_and_resolve_references()
    web.data.path = reencode_dataset(paper.data.path, os.path.join(work, 'real_bframes'),
                                     {'crf': '23', 'preset': 'veryfast', 'bf': '3', 'g': str(2 * REAL_FPS)})
    web.data.tokenizer = paper.data.tokenizer
    settings.append(('paper-b', web, web.data.path, [p for p in paths if p in ('decode-all', 'seek')]))

  print(f'{len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.1f} at start')
  for name, config, folder, setting_paths in settings:
    if name not in args.settings.split(','):
      continue
    folders = {}
    for codec in ('h264', 'raw'):
      if codec in setting_paths:
        folders[codec], seconds = converted(config, folder, os.path.join(work, f'{name}_{codec}'), codec)
        if seconds:
          print(f'{name}: converted to {codec} in {seconds:.2f} CPU-seconds a clip')
    print(f'{"setting":<8}{"path":<12}{"workers":>8}{"ex/s":>9}{"ex/s/core":>11}{"frames/s":>10}{"decoded/ex":>12}'
          f'{"MB/clip":>9}')
    for path in setting_paths:
      variant = path_config(config, path, folders)
      decoded, megabytes = decoded_per_example(variant), clip_megabytes(variant)
      for workers in (int(w) for w in args.workers.split(',')):
        batches = args.batches if name == 'demo' else max(2, args.batches // 3)  # paper: 4 examples a batch
        examples_per_s, per_core = measure(variant, workers, batches)
        print(f'{name:<8}{path:<12}{workers:>8}{examples_per_s:>9.2f}{per_core:>11.2f}'
              f'{examples_per_s * config.model.num_frames:>10.0f}{decoded:>12.0f}{megabytes:>9.2f}', flush=True)


if __name__ == '__main__':
  main()
