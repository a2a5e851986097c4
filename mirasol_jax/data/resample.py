"""Storing a dataset's clips as training reads them: at its frame size and frame rate, so that a host feeds an
accelerator.

Training decodes, for every example, the whole stretch of the source between the frames it samples (H.264 predicts
each frame from the ones before), then resizes the frames it keeps and converts them to RGB. At the paper's setting
(30 s of 640x360 at 30 fps, 128 frames) that is about 900 frames decoded and 128 resized for 128 kept, and seeking
cannot help when every frame is a reference frame and key frames are 250 frames apart. `convert` does that work
once: it writes a dataset folder of the same records whose media hold only the frames the pipeline samples, at
training's size, with the audio at training's sample rate. The pipeline reads it as it reads any dataset
(config.data.path=OUTPUT), with the same shapes and sample times.

A clip [start, end] of a record is cut into the pipeline's num_frames equal segments (media.segment_times), each
into `frames_per_segment` (K, odd) equal parts; the stored frame of a part is the source frame shown at the part's
middle, stored with the part's start as its timestamp, and the stored record is the clip [0, end - start]. The
pipeline's time t inside a part therefore reads the source frame at the middle of that part:

* evaluation samples the middle of each segment, the middle of its middle part: exactly the frame it reads from the
  source, up to the re-encoding error.
* training's jitter (a random time in each segment) reads the source frame within half a part of its time: with K=1
  every draw of a segment reads the segment's middle frame (crops and flips still vary); K=3 or 5 keep a jitter in
  steps of a third or a fifth of a segment. In H.264 only the middle part of a segment is a reference frame (P, or
  I every `key_segments` segments); the others are B-frames nothing is predicted from, which the pipeline's decoder
  skips unless a time shows them (media.DecodeOptions.skip_unneeded): a larger K costs storage more than decoding.
  Matroska stores timestamps in milliseconds: a time within a millisecond of a part's start may read the part next
  to it.

Frames are stored at the short side training resizes to (max(image_size) x train_resize_ratio), each side rounded
up to an even number (4:2:0 chroma needs it), so that training only converts them to RGB and crops them;
evaluation, which reads a smaller short side, still resizes them. They go from the source's decoder to the encoder
in YUV: a round trip through RGB would darken them (FFmpeg's RGB to YUV conversion rounds down). Two ways of storing
them (`video_codec`), measured by benchmarks/input_pipeline.py at the paper's setting on its generated sources (a
pattern over fixed noise, the worst case for a video codec) on a 2-core machine, in examples per CPU-second:

* `h264` (the default): x264 at crf 18 without CABAC (CABAC saves ~6% of the size and costs ~2.5x the decoding),
  4.8 MB of video a clip there (less on natural video, whose decoding is also cheaper); about 4 examples/s a core,
  3x the source's 1.4, the decoding of the 128 frames taking most of it.
* `raw`: the frames decoded, 180 KB a frame of 460x258 (24 MB a clip at 128 frames, whatever the content): 12 to 17
  examples/s a core. At that rate a core reads 300 MB/s: for local disks, not for a network file system.

The audio is the clip's mono track at config.data.sample_rate as 16-bit PCM in packets of one second (Matroska keeps
packets as written; per-packet work was most of the audio's cost with mp4's 1024-sample packets), or FLAC (lossless,
smaller, ~5 ms more a clip) or AAC. A clip without audio stays without.

Records whose media cannot be read (missing, undecodable, over a limit of config.data, clip bounds outside the file)
are left out and counted by reason in `{output}/resample_report.json`, as the converters do for missing media.
Records of the same file and clip share one converted file; files converted by an earlier run with the same
settings are kept, so an interrupted conversion resumes.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import fractions
import hashlib
import json
import math
import multiprocessing
import os
import shutil
from typing import Any, Mapping, Optional

import av
import numpy as np

from mirasol_jax.data import media
from mirasol_jax.data import sources

SPLITS = ('train', 'validation', 'test')
VIDEO_CODECS = {'h264': 'libx264', 'raw': 'rawvideo'}  # video_codec -> FFmpeg's encoder (frames in YUV 4:2:0)
AUDIO_CODECS = ('pcm_s16le', 'flac', 'aac')
CONTAINER, EXTENSION = 'matroska', '.mkv'  # keeps audio packets as written (mp4 cuts PCM into 1024 samples)
MEDIA_FOLDER = 'media'
REPORT_FILE = 'resample_report.json'
COPIED_FILES = ('classes.txt',)  # files of the dataset folder that evaluators read beside the splits
TIME_BASE = fractions.Fraction(1, 90_000)  # of the stored video: 11 us steps
_BATCH_FRAMES = 64  # frames decoded and encoded at a time: bounds the memory of long clips or large K
NUM_EXAMPLES = 5  # record ids kept in the report per skip reason


@dataclasses.dataclass(frozen=True)
class ResampleSettings:
  """What a converted clip holds. from_config gives training's sizes; the rest are storage choices."""
  short_side: int  # of the stored frames (before rounding each side up to even)
  num_frames: int  # the pipeline's frames per clip (config.model.num_frames)
  frames_per_segment: int = 1  # K: stored frames per sampled segment (odd)
  sample_rate: int = 16_000
  video_codec: str = 'h264'  # h264 | raw (see VIDEO_CODECS)
  crf: int = 18  # h264: x264's constant quality (lower: closer to the source, larger files)
  preset: str = 'fast'  # h264: x264's speed of encoding (not of decoding)
  cabac: bool = False  # h264: CABAC saves about 6% of the size and costs about 2.5 times the decoding
  key_segments: int = 16  # h264: a key frame every this many segments (where a seek can land)
  audio_codec: str = 'pcm_s16le'  # pcm_s16le (fastest to read: 32 KB a second) | flac (lossless, smaller) | aac

  def __post_init__(self):
    if self.frames_per_segment < 1 or self.frames_per_segment % 2 == 0:
      raise ValueError(f'frames_per_segment={self.frames_per_segment}: must be odd (1, 3, 5...), so that the middle '
                       'of a segment, where evaluation samples, is the middle of a stored frame')
    if self.video_codec not in VIDEO_CODECS:
      raise ValueError(f'video_codec={self.video_codec!r}: one of {", ".join(VIDEO_CODECS)}')
    if self.audio_codec not in AUDIO_CODECS:
      raise ValueError(f'audio_codec={self.audio_codec!r}: one of {", ".join(AUDIO_CODECS)}')

  @classmethod
  def from_config(cls, config, **overrides) -> 'ResampleSettings':
    """Training's short side (the pipeline's: max(image_size) x train_resize_ratio), frames and sample rate."""
    model, data = config.model, config.data
    short_side = int(round(max(model.image_size) * data.get('train_resize_ratio', 1.15)))
    values = dict(short_side=short_side, num_frames=int(model.num_frames),
                  sample_rate=int(data.get('sample_rate', 16_000)))
    values.update(overrides)
    return cls(**values)

  def key(self) -> str:
    """Names the settings in converted file names: other settings, other files."""
    return hashlib.sha1(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:8]


def stored_size(width: int, height: int, short_side: int) -> tuple[int, int]:
  """(width, height) of stored frames: the pipeline's resize of width x height, each side rounded up to even."""
  w, h = media.resize_shape(width, height, short_side)
  return w + (w & 1), h + (h & 1)


def clip_span(info: media.MediaInfo, start: Optional[float], end: Optional[float], limits: media.MediaLimits,
              name: str) -> tuple[float, float]:
  """The clip [start, end] the pipeline reads of a file (DecodeExample._decode_media's bounds and checks)."""
  start = start or 0.0
  end = min(end if end is not None else info.duration, info.duration)
  if start < 0 or start >= info.duration or end <= start:
    raise media.MediaError(f'{name}: no clip [{start:.2f}, {end:.2f}] s in a file of {info.duration:.2f} s',
                           'clip_bounds')
  if limits.max_clip_seconds and end - start > limits.max_clip_seconds:
    raise media.MediaError(f'{name}: a clip of {end - start:.1f}s, over config.data.max_clip_seconds='
                           f'{limits.max_clip_seconds}', 'too_long')
  return start, end


def part_times(start: float, end: float, settings: ResampleSettings) -> tuple[np.ndarray, np.ndarray]:
  """(source times, stored timestamps) of the stored frames of clip [start, end]: the middle of each of the
  num_frames x K equal parts in the source, the part's start (in TIME_BASE steps, from 0) in the stored clip."""
  parts = settings.num_frames * settings.frames_per_segment
  edges = np.arange(parts + 1) * (end - start) / parts
  middles = start + (edges[:-1] + edges[1:]) / 2
  steps = np.floor(edges[:-1] / TIME_BASE).astype(np.int64)
  steps = np.maximum(steps, np.arange(parts))  # strictly increasing even for absurdly short clips
  return middles, steps


def _picture_type(index: int, settings: ResampleSettings):
  """h264: I at the middle part of every key_segments-th segment, P at the middle of the others, B elsewhere
  (None for the other codecs, whose every frame stands alone)."""
  if settings.video_codec != 'h264':
    return None
  k = settings.frames_per_segment
  segment, part = divmod(index, k)
  if part != k // 2:
    return av.video.frame.PictureType.B
  return av.video.frame.PictureType.I if segment % settings.key_segments == 0 else av.video.frame.PictureType.P


def resample_clip(source: media.Source, output: str, settings: ResampleSettings, start: Optional[float] = None,
                  end: Optional[float] = None, limits: Optional[media.MediaLimits] = None) -> float:
  """Writes the clip [start, end] of `source` (the pipeline's bounds: the whole file by default) as a Matroska file at
  `output` (atomically); returns its length in seconds, the `end` of the stored record (whose `start` is 0)."""
  limits = limits or media.MediaLimits()
  name = source if isinstance(source, str) else f'<{len(source)} bytes>'
  temporary = f'{output}.tmp-{os.getpid()}'
  encoder = VIDEO_CODECS[settings.video_codec]
  try:
    with media.MediaFile(source, limits) as clip, av.open(temporary, 'w', format=CONTAINER) as container:
      start, end = clip_span(clip.info, start, end, limits, name)
      span = end - start
      middles, steps = part_times(start, end, settings)
      width, height = stored_size(clip.info.width, clip.info.height, settings.short_side)
      video = container.add_stream(encoder, rate=fractions.Fraction(len(middles) / span).limit_denominator(90_000))
      video.width, video.height, video.pix_fmt = width, height, 'yuv420p'
      video.time_base = video.codec_context.time_base = TIME_BASE
      video.options = _video_options(settings)
      audio = clip.audio(start, end, settings.sample_rate) if clip.info.has_audio else None
      audio_stream = None
      if audio is not None:
        audio_stream = container.add_stream(settings.audio_codec, rate=settings.sample_rate, layout='mono')
      last = None
      for first in range(0, len(middles), _BATCH_FRAMES):
        times = middles[first:first + _BATCH_FRAMES]
        # Frames stay in YUV from the source's decoder to the encoder: a round trip through RGB would darken
        # them (FFmpeg's conversion to YUV rounds down).
        frames = clip.frames_of_size(times, (width, height), pixel_format='yuv420p')
        for offset, array in enumerate(frames):
          index = first + offset
          last = _encode(container, video, array, int(steps[index]), _picture_type(index, settings))
      # One more copy of the last frame a millisecond after the clip's end (Matroska rounds to milliseconds), so
      # that the file lasts longer than `span` (the pipeline clamps a clip to the file's duration); no time of the
      # clip reads it.
      _encode(container, video, last, max(int(math.ceil((span + 1e-3) / TIME_BASE)), int(steps[-1]) + 1),
              _picture_type(settings.frames_per_segment // 2 + settings.frames_per_segment, settings))
      for packet in video.encode(None):
        container.mux(packet)
      if audio_stream is not None:
        _write_audio(container, audio_stream, audio, settings)
    os.replace(temporary, output)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise
  return span


def _video_options(settings: ResampleSettings) -> dict[str, str]:
  if settings.video_codec != 'h264':
    return {}
  k = settings.frames_per_segment
  # Frame types come from _picture_type alone: no B-frame pyramid (B-frames stay unreferenced), no scene cuts or
  # automatic key frames, closed GOPs (a seek to a key frame needs nothing before it).
  return {'crf': str(settings.crf), 'preset': settings.preset, 'bf': str(k - 1), 'forced-idr': '1',
          'x264-params': f'b-pyramid=none:b-adapt=0:scenecut=0:keyint={10 * settings.key_segments * k}:'
                         f'open-gop=0:bframes={k - 1}:cabac={int(settings.cabac)}'}


def _encode(container, stream, array: np.ndarray, pts: int, picture_type) -> np.ndarray:
  frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format='yuv420p')
  frame.pts, frame.time_base = pts, TIME_BASE
  if picture_type is not None:
    frame.pict_type = picture_type
  for packet in stream.encode(frame):
    container.mux(packet)
  return array


def _write_audio(container, stream, samples: np.ndarray, settings: ResampleSettings) -> None:
  block = {'aac': 1024, 'flac': 4096}.get(settings.audio_codec, settings.sample_rate)
  planar = settings.audio_codec == 'aac'
  for offset in range(0, len(samples), block):
    chunk = samples[offset:offset + block]
    if planar:
      frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk[None]), format='fltp', layout='mono')
    else:
      pcm = np.clip(np.round(chunk * 32768.0), -32768, 32767).astype(np.int16)
      frame = av.AudioFrame.from_ndarray(pcm[None], format='s16', layout='mono')
    frame.sample_rate, frame.pts = settings.sample_rate, offset
    for packet in stream.encode(frame):
      container.mux(packet)
  for packet in stream.encode(None):
    container.mux(packet)


def _media_identity(record: Mapping[str, Any]) -> str:
  if 'video_bytes' in record:
    return 'bytes:' + hashlib.sha1(record['video_bytes']).hexdigest()
  return 'path:' + os.path.realpath(record['video_path'])


def _file_name(record: Mapping[str, Any], settings: ResampleSettings) -> str:
  """The converted file of a record's clip: the same for every record of the same media, clip and settings."""
  identity = json.dumps([_media_identity(record), record.get('start'), record.get('end'), settings.key()])
  stem = os.path.splitext(os.path.basename(record.get('video_path') or str(record.get('id', 'clip'))))[0]
  stem = ''.join(c if c.isalnum() or c in '-_' else '_' for c in stem)[:60] or 'clip'
  return f'{stem}-{hashlib.sha1(identity.encode()).hexdigest()[:16]}{EXTENSION}'


def _convert_one(job: tuple[Mapping[str, Any], str, ResampleSettings, media.MediaLimits]
                 ) -> tuple[Optional[float], Optional[str], str]:
  """(span, None, '') of a converted clip, or (None, reason, message); never raises for the record."""
  record, path, settings, limits = job
  source = record['video_bytes'] if 'video_bytes' in record else record['video_path']
  try:
    span = resample_clip(source, path, settings, record.get('start'), record.get('end'), limits)
  except media.MediaError as e:
    return None, e.reason, str(e)
  except (av.FFmpegError, ValueError, ArithmeticError, OSError) as e:
    return None, 'undecodable', f'{type(e).__name__}: {e}'
  return span, None, ''


def _existing_span(path: str) -> Optional[float]:
  """The span of a clip converted by an earlier run (written beside it last), or None to convert it again."""
  try:
    with open(path + '.json') as f:
      return float(json.load(f)['span'])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def convert(config, output: str, frames_per_segment: int = 1, video_codec: str = 'h264',
            workers: Optional[int] = None, settings: Optional[ResampleSettings] = None) -> dict[str, Any]:
  """Writes every split of config.data's dataset as a jsonl dataset folder at `output` whose media hold each clip
  at training's resolution and frame rate (see the module docstring); returns the report (also written to
  `{output}/resample_report.json`).

  `workers` processes convert clips in parallel (default: one per core). The splits' jsonl files are written last,
  atomically: an interrupted conversion leaves the earlier ones (or none) and the clips done so far.
  """
  settings = settings or ResampleSettings.from_config(config, frames_per_segment=frames_per_segment,
                                                      video_codec=video_codec)
  limits = media.MediaLimits.from_config(config.data)
  folder = sources.dataset_folder(config.data)
  os.makedirs(os.path.join(output, MEDIA_FOLDER), exist_ok=True)
  workers = media.available_cores() if workers is None else workers
  report: dict[str, Any] = {'settings': dataclasses.asdict(settings), 'splits': {}}
  for split in SPLITS:
    try:
      source = sources.open_source(config.data, split)
    except (FileNotFoundError, ValueError):
      continue
    report['splits'][split] = _convert_split(source, split, output, settings, limits, workers)
  for name in COPIED_FILES:
    if os.path.isfile(os.path.join(folder, name)):
      shutil.copyfile(os.path.join(folder, name), os.path.join(output, name))
  _write_atomically(os.path.join(output, REPORT_FILE), json.dumps(report, indent=2) + '\n')
  return report


def _convert_split(source, split: str, output: str, settings: ResampleSettings, limits: media.MediaLimits,
                   workers: int) -> dict[str, Any]:
  records = [source[i] for i in range(len(source))]
  names: list[Optional[str]] = [None] * len(records)
  skipped: dict[str, list[str]] = collections.defaultdict(list)
  jobs: dict[str, tuple] = {}
  for i, record in enumerate(records):
    if 'error' in record:
      skipped[str(record.get('error_kind') or 'bad_record')].append(str(record.get('id')))
      continue
    if 'video_bytes' not in record and 'video_path' not in record:
      skipped['bad_record'].append(str(record.get('id')))
      continue
    names[i] = _file_name(record, settings)
    path = os.path.join(output, MEDIA_FOLDER, names[i])
    if names[i] not in jobs and not (os.path.exists(path) and _existing_span(path) is not None):
      jobs[names[i]] = (record, path, settings, limits)
  results: dict[str, tuple] = {}
  if workers > 1 and len(jobs) > 1:
    # Spawned, not forked: the caller may hold threads (JAX's, grain's) that a fork would copy mid-lock.
    context = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
      for name, result in zip(jobs, pool.map(_convert_one, jobs.values(), chunksize=1)):
        results[name] = result
  else:
    results = {name: _convert_one(job) for name, job in jobs.items()}
  for name, (span, _, _) in results.items():
    if span is not None:
      _write_atomically(os.path.join(output, MEDIA_FOLDER, name) + '.json', json.dumps({'span': span}) + '\n')
  lines, messages = [], {}
  for record, name in zip(records, names):
    if name is None:
      continue
    span, reason, message = results.get(name) or (None, None, '')
    if span is None and reason is None:
      span = _existing_span(os.path.join(output, MEDIA_FOLDER, name))
    if span is None:
      skipped[reason or 'undecodable'].append(str(record.get('id')))
      messages.setdefault(reason, message)
      continue
    line = {k: v for k, v in record.items() if k not in ('video_path', 'video_bytes', 'video_name', 'start', 'end')}
    line.update(video=f'{MEDIA_FOLDER}/{name}', start=0.0, end=span)
    try:
      lines.append(json.dumps(line, ensure_ascii=False) + '\n')
    except (TypeError, ValueError):  # a field jsonl cannot hold (bytes, from a shard)
      skipped['bad_record'].append(str(record.get('id')))
  _write_atomically(os.path.join(output, f'{split}.jsonl'), ''.join(lines))
  summary = {'records': len(records), 'written': len(lines), 'clips_converted': sum(
      r[0] is not None for r in results.values()), 'skipped': {
          reason: {'count': len(ids), 'examples': ids[:NUM_EXAMPLES], 'message': messages.get(reason, '')[:300]}
          for reason, ids in sorted(skipped.items())}}
  print(f'{split}: {len(lines)} of {len(records)} records written, {summary["clips_converted"]} clips converted'
        + ''.join(f', {reason}: {len(ids)} skipped' for reason, ids in sorted(skipped.items())))
  return summary


def _write_atomically(path: str, text: str) -> None:
  temporary = f'{path}.tmp-{os.getpid()}'
  with open(temporary, 'w') as f:
    f.write(text)
  os.replace(temporary, path)
