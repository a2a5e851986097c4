"""Decoding media with PyAV: frames at chosen timestamps, and audio resampled to 16 kHz mono.

A media source is a path or the encoded bytes of a file (as ArrayRecord shards hold them). Any failure to read
raises `MediaError` with the file and the reason; the pipeline turns that into a skipped, counted, logged example.

Frame sampling: the clip [start, end] is cut into N equal segments and one time is taken in each: the middle in
evaluation, a uniformly random point in training (the jitter). The frame shown at time t is the last frame whose
timestamp is <= t. A clip with fewer frames than asked for therefore repeats frames; that is intended.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import av
from av.video.reformatter import VideoReformatter
import numpy as np

Source = Union[str, bytes]


class MediaError(Exception):
  """A media file that cannot give what was asked: missing, undecodable, or too short for the clip bounds."""


def _describe(source: Source) -> str:
  return source if isinstance(source, str) else f'<{len(source)} bytes>'


def _open(source: Source):
  if isinstance(source, str) and not os.path.exists(source):
    raise MediaError(f'{source}: file does not exist')
  try:
    return av.open(io.BytesIO(source) if isinstance(source, bytes) else source)
  except (av.FFmpegError, OSError, ValueError) as e:
    raise MediaError(f'{_describe(source)}: cannot open ({e})') from e


@dataclass(frozen=True)
class MediaInfo:
  duration: float  # seconds
  fps: float
  has_audio: bool
  width: int
  height: int


def _info(container, source: Source) -> MediaInfo:
  if not container.streams.video:
    raise MediaError(f'{_describe(source)}: no video stream')
  stream = container.streams.video[0]
  if container.duration is not None:
    duration = container.duration / av.time_base
  elif stream.duration is not None:
    duration = float(stream.duration * stream.time_base)
  else:
    raise MediaError(f'{_describe(source)}: unknown duration')
  fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
  return MediaInfo(duration, fps, bool(container.streams.audio), stream.codec_context.width,
                   stream.codec_context.height)


class MediaFile:
  """One open media file: its info, frames at timestamps, audio of a time span. Use as a context manager."""

  def __init__(self, source: Source):
    self._source = source
    self._reformatter = VideoReformatter()
    self._container = _open(source)
    try:
      self.info = _info(self._container, source)
    except BaseException:
      self._container.close()
      raise

  def __enter__(self) -> 'MediaFile':
    return self

  def __exit__(self, *exc) -> None:
    self._container.close()

  def frames(self, times: Sequence[float], short_side: int) -> np.ndarray:
    """uint8 [N, h, w, 3]: the frame shown at each of `times` (ascending), resized so that min(h, w) = short_side."""
    times = np.asarray(times, np.float64)
    container, source = self._container, self._source
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'
    size = _resize_shape(self.info.width, self.info.height, short_side)
    out: list[Optional[np.ndarray]] = [None] * len(times)
    try:
      first = max(float(times[0]), 0.0)
      container.seek(int(first / stream.time_base), stream=stream, backward=True, any_frame=False)
      # `shown` is the frame on screen until the next one; it is converted to RGB only if some time selects it.
      shown, shown_rgb, i = None, None, 0
      for frame in container.decode(stream):
        t = frame.time if frame.time is not None else 0.0
        if shown is None:
          shown = frame  # times before the first decoded frame show that frame
        while i < len(times) and times[i] < t:
          if shown_rgb is None:
            shown_rgb = _to_rgb(self._reformatter, shown, size)
          out[i] = shown_rgb
          i += 1
        if i == len(times):
          break
        if frame is not shown:
          shown, shown_rgb = frame, None
      if shown is None:
        raise MediaError(f'{_describe(source)}: no decodable video frame after {first:.3f}s')
      if i < len(times):  # past the last frame: the last frame stays on screen
        last = shown_rgb if shown_rgb is not None else _to_rgb(self._reformatter, shown, size)
        out[i:] = [last] * (len(times) - i)
    except av.FFmpegError as e:
      raise MediaError(f'{_describe(source)}: video decoding failed ({e})') from e
    return np.stack(out)

  def audio(self, start: float, end: float, sample_rate: int = 16_000) -> Optional[np.ndarray]:
    """float32 [round((end - start) * sample_rate)] mono samples of [start, end], or None without an audio track.

    Any channel layout (5.1 included) is downmixed by the resampler. Time before the first audio sample or after
    the last one is silence.
    """
    container = self._container
    if not container.streams.audio:
      return None
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format='flt', layout='mono', rate=sample_rate)
    out = np.zeros(int(round((end - start) * sample_rate)), np.float32)
    try:
      container.seek(int(max(start - 0.5, 0.0) / stream.time_base), stream=stream, backward=True)
      for frame in container.decode(stream):
        done = False
        for resampled in resampler.resample(frame):
          done = _place(out, resampled, start, sample_rate)
        if done:
          break
    except av.FFmpegError as e:
      raise MediaError(f'{_describe(self._source)}: audio decoding failed ({e})') from e
    return out


def probe(source: Source) -> MediaInfo:
  with MediaFile(source) as f:
    return f.info


def decode_frames(source: Source, times: Sequence[float], short_side: int) -> np.ndarray:
  """MediaFile.frames of a path or bytes."""
  with MediaFile(source) as f:
    return f.frames(times, short_side)


def decode_audio(source: Source, start: float, end: float, sample_rate: int = 16_000) -> Optional[np.ndarray]:
  """MediaFile.audio of a path or bytes."""
  with MediaFile(source) as f:
    return f.audio(start, end, sample_rate)


def segment_times(start: float, end: float, num_frames: int, rng: Optional[np.random.Generator] = None):
  """[num_frames] sample times: one per equal segment of [start, end], random inside it if rng is given."""
  offsets = np.full(num_frames, 0.5) if rng is None else rng.uniform(0.0, 1.0, num_frames)
  return start + (np.arange(num_frames) + offsets) * (end - start) / num_frames


def chunk_bounds(start: float, end: float, num_chunks: int) -> list[tuple[float, float]]:
  """[(start_t, end_t)] of each of num_chunks equal chunks of [start, end]; chunk t holds frame segments t*k..."""
  edges = start + (end - start) * np.arange(num_chunks + 1) / num_chunks
  return [(float(a), float(b)) for a, b in zip(edges[:-1], edges[1:])]


def _resize_shape(width: int, height: int, short_side: int) -> tuple[int, int]:
  scale = short_side / min(width, height)
  return max(short_side, int(round(width * scale))), max(short_side, int(round(height * scale)))


def _to_rgb(reformatter: VideoReformatter, frame, size: tuple[int, int]) -> np.ndarray:
  # One scaler per file, single-threaded: PyAV's default (a new scaler with automatic threads for every frame)
  # cost about ten times the decoding itself on small frames. The pixels are the same.
  return reformatter.reformat(frame, width=size[0], height=size[1], format='rgb24', interpolation='BILINEAR',
                              threads=1).to_ndarray()


def _place(out: np.ndarray, frame, start: float, sample_rate: int) -> bool:
  """Copies a resampled frame into `out` at its timestamp; True once the frame reaches past the end of `out`."""
  samples = frame.to_ndarray().reshape(-1)
  first = int(round(((frame.time or 0.0) - start) * sample_rate))
  lo, hi = max(first, 0), min(first + len(samples), len(out))
  if hi > lo:
    out[lo:hi] = samples[lo - first:hi - first]
  return first + len(samples) >= len(out)
