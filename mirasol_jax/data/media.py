"""Decoding media with PyAV: frames at chosen timestamps, and audio resampled to 16 kHz mono.

A media source is a path or the encoded bytes of a file (as ArrayRecord shards hold them). Any failure to read
raises `MediaError` with the file, the reason and its kind; the pipeline turns that into a skipped, counted, logged
example.

Hostile files cost bounded work (`MediaLimits`, from config.data): only regular files are opened (a FIFO would block
the reader forever, a device never end), media are read through that one open file only (a playlist cannot pull in
other files), the frame size and aspect ratio and the clip length are checked against the container's header before
anything is decoded, decoders refuse larger frames met later, and a deadline is checked while probing and after
every packet and frame. PyAV cannot be interrupted inside one call to FFmpeg, so the timeout is checked between
packets: its granularity is one packet's decoding, itself bounded by the frame size.

Frame sampling: the clip [start, end] is cut into N equal segments and one time is taken in each: the middle in
evaluation, a uniformly random point in training (the jitter). The frame shown at time t is the last frame whose
timestamp is <= t. A clip with fewer frames than asked for therefore repeats frames; that is intended.
"""
from __future__ import annotations

import io
import math
import os
import stat
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import av
from av.video.reformatter import VideoReformatter
import numpy as np

Source = Union[str, bytes]


class MediaError(Exception):
  """A media file that cannot give what was asked: missing, undecodable, too short for the clip bounds, or over a
  limit. `reason` is its kind, one of pipeline.SKIP_REASONS, for the counts of skipped examples."""

  def __init__(self, message: str, reason: str = 'undecodable'):
    super().__init__(message)
    self.reason = reason


@dataclass(frozen=True)
class MediaLimits:
  """Bounds on the work of one example (config.data.max_clip_seconds, max_frame_pixels, max_aspect_ratio,
  decode_timeout_s); None (or 0 in the config) is no bound."""
  max_clip_seconds: Optional[float] = None
  max_frame_pixels: Optional[int] = None
  max_aspect_ratio: Optional[float] = None
  decode_timeout_s: Optional[float] = None

  @classmethod
  def from_config(cls, data_config: Mapping[str, Any]) -> 'MediaLimits':
    return cls(**{name: data_config.get(name) or None for name in cls.__dataclass_fields__})


# Only the opened file is read: 'none' names no protocol, so demuxers that open other files named inside the data
# (an HLS playlist's segments, say) cannot reach any.
_CONTAINER_OPTIONS = {'protocol_whitelist': 'none'}


def _describe(source: Source) -> str:
  return source if isinstance(source, str) else f'<{len(source)} bytes>'


def _file_kind(mode: int) -> str:
  for test, name in ((stat.S_ISDIR, 'a folder'), (stat.S_ISFIFO, 'a named pipe'), (stat.S_ISCHR, 'a device'),
                     (stat.S_ISBLK, 'a device'), (stat.S_ISSOCK, 'a socket')):
    if test(mode):
      return name
  return 'not a regular file'


def open_regular(path: str):
  """The file at `path` (links followed) opened for binary reading, if it is a regular file; MediaError otherwise.

  Nothing that is not a regular file is ever opened: the path is checked before opening (opening a FIFO blocks
  until a writer comes; opening some devices acts on them), and the opened file again (the path may have changed
  in between; it is opened non-blocking, so that a FIFO put there meanwhile cannot block).
  """
  try:
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
      fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
      try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
          return os.fdopen(fd, 'rb')
      except BaseException:
        os.close(fd)
        raise
      os.close(fd)
  except (FileNotFoundError, NotADirectoryError):
    raise MediaError(f'{path}: file does not exist', 'missing_file') from None
  except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
    raise MediaError(f'{path}: cannot open ({getattr(e, "strerror", None) or e})', 'unreadable_file') from None
  raise MediaError(f'{path}: {_file_kind(mode)}, not a regular file', 'not_regular_file')


def _open(source: Source, timeout: Optional[float]):
  """(container, the file it reads) of a path or bytes; the caller closes both."""
  file = io.BytesIO(source) if isinstance(source, bytes) else open_regular(source)
  try:
    # timeout: PyAV's interrupt callback bounds the probing of the file, and each wait for a packet.
    container = av.open(file, 'r', container_options=_CONTAINER_OPTIONS, metadata_errors='replace',
                        timeout=timeout)
  except Exception as e:  # FFmpeg's errors, and whatever a damaged header makes PyAV raise
    file.close()
    reason = 'timeout' if isinstance(e, av.ExitError) else 'undecodable'
    # FFmpeg's errors name the file by PyAV's name for it (the descriptor's number): give the reason alone.
    raise MediaError(f'{_describe(source)}: cannot open ({getattr(e, "strerror", None) or e})', reason) from e
  return container, file


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
  if not stream.time_base or stream.codec_context is None:
    raise MediaError(f'{_describe(source)}: the video stream has no time base or no decoder')
  if container.duration is not None:
    duration = container.duration / av.time_base
  elif stream.duration is not None:
    duration = float(stream.duration * stream.time_base)
  else:
    raise MediaError(f'{_describe(source)}: unknown duration')
  if not math.isfinite(duration):
    raise MediaError(f'{_describe(source)}: unknown duration')
  fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
  width, height = stream.codec_context.width, stream.codec_context.height
  if width <= 0 or height <= 0:
    raise MediaError(f'{_describe(source)}: unknown frame size {width}x{height}')
  return MediaInfo(duration, fps, bool(container.streams.audio), width, height)


class MediaFile:
  """One open media file: its info, frames at timestamps, audio of a time span. Use as a context manager.

  `limits` bound its work (MediaLimits); the deadline of decode_timeout_s starts when the file is opened.
  """

  def __init__(self, source: Source, limits: Optional[MediaLimits] = None):
    self._source = source
    self._limits = limits or MediaLimits()
    timeout = self._limits.decode_timeout_s
    self._deadline = None if timeout is None else time.monotonic() + timeout
    self._reformatter = VideoReformatter()
    self._container, self._file = _open(source, timeout)
    try:
      self.info = _info(self._container, source)
      self._check_frame_size(self.info.width, self.info.height)
    except BaseException:
      self.close()
      raise

  def __enter__(self) -> 'MediaFile':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self._container.close()
    self._file.close()

  def _check_frame_size(self, width: int, height: int) -> None:
    """Frames are decoded whole and resized by their short side: both the area and the long side cost."""
    limits = self._limits
    if limits.max_frame_pixels and width * height > limits.max_frame_pixels:
      raise MediaError(f'{_describe(self._source)}: {width}x{height} frames, over config.data.max_frame_pixels='
                       f'{limits.max_frame_pixels}', 'too_large')
    if limits.max_aspect_ratio and max(width, height) > limits.max_aspect_ratio * min(width, height):
      raise MediaError(f'{_describe(self._source)}: {width}x{height} frames, an aspect ratio over '
                       f'config.data.max_aspect_ratio={limits.max_aspect_ratio}', 'too_large')

  def _check_span(self, start: float, end: float) -> None:
    if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end < start:
      raise MediaError(f'{_describe(self._source)}: no clip [{start}, {end}] s', 'clip_bounds')
    limit = self._limits.max_clip_seconds
    if limit and end - start > limit:
      raise MediaError(f'{_describe(self._source)}: a clip of {end - start:.1f}s, over config.data.max_clip_seconds='
                       f'{limit}', 'too_long')

  def _check_time(self) -> None:
    if self._deadline is not None and time.monotonic() > self._deadline:
      raise MediaError(f'{_describe(self._source)}: decoding took over config.data.decode_timeout_s='
                       f'{self._limits.decode_timeout_s}s', 'timeout')

  def _failed(self, what: str, error: Exception) -> MediaError:
    """A decoding error as a MediaError: a timeout if the deadline passed (PyAV's interrupt gives an ExitError)."""
    try:
      self._check_time()
    except MediaError as late:
      return late
    return MediaError(f'{_describe(self._source)}: {what} failed ({type(error).__name__}: {error})')

  def frames(self, times: Sequence[float], short_side: int) -> np.ndarray:
    """uint8 [N, h, w, 3]: the frame shown at each of `times` (ascending), resized so that min(h, w) = short_side."""
    times = np.asarray(times, np.float64)
    self._check_span(float(times[0]), float(times[-1]))
    container, source = self._container, self._source
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'
    if self._limits.max_frame_pixels:  # the decoder refuses larger frames, however late they come
      stream.codec_context.options = {'max_pixels': str(self._limits.max_frame_pixels)}
    size = _resize_shape(self.info.width, self.info.height, short_side)
    out: list[Optional[np.ndarray]] = [None] * len(times)
    try:
      first = max(float(times[0]), 0.0)
      container.seek(int(first / stream.time_base), stream=stream, backward=True, any_frame=False)
      # `shown` is the frame on screen until the next one; it is converted to RGB only if some time selects it.
      shown, shown_rgb, i = None, None, 0
      for frame in container.decode(stream):
        self._check_time()
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
    except (av.FFmpegError, ArithmeticError, ValueError) as e:  # damaged timestamps and sizes included
      raise self._failed('video decoding', e) from e
    return np.stack(out)

  def audio(self, start: float, end: float, sample_rate: int = 16_000) -> Optional[np.ndarray]:
    """float32 [round((end - start) * sample_rate)] mono samples of [start, end], or None without an audio track.

    Any channel layout (5.1 included) is downmixed by the resampler. Time before the first audio sample or after
    the last one is silence.
    """
    self._check_span(start, end)
    container = self._container
    if not container.streams.audio:
      return None
    stream = container.streams.audio[0]
    if not stream.time_base or stream.codec_context is None:
      raise MediaError(f'{_describe(self._source)}: the audio stream has no time base or no decoder')
    out = np.zeros(int(round((end - start) * sample_rate)), np.float32)
    try:
      resampler = av.AudioResampler(format='flt', layout='mono', rate=sample_rate)
      container.seek(int(max(start - 0.5, 0.0) / stream.time_base), stream=stream, backward=True)
      for frame in container.decode(stream):
        self._check_time()
        done = False
        for resampled in resampler.resample(frame):
          done = _place(out, resampled, start, sample_rate)
        if done:
          break
    except (av.FFmpegError, ArithmeticError, ValueError, TypeError) as e:  # a stream without time base: TypeError
      raise self._failed('audio decoding', e) from e
    return out


def probe(source: Source, limits: Optional[MediaLimits] = None) -> MediaInfo:
  with MediaFile(source, limits) as f:
    return f.info


def decode_frames(source: Source, times: Sequence[float], short_side: int,
                  limits: Optional[MediaLimits] = None) -> np.ndarray:
  """MediaFile.frames of a path or bytes."""
  with MediaFile(source, limits) as f:
    return f.frames(times, short_side)


def decode_audio(source: Source, start: float, end: float, sample_rate: int = 16_000,
                 limits: Optional[MediaLimits] = None) -> Optional[np.ndarray]:
  """MediaFile.audio of a path or bytes."""
  with MediaFile(source, limits) as f:
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
