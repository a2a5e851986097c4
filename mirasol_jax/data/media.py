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

Only what those frames need is decoded (DecodeOptions, _FrameSampler): a stretch of the stream that no sampled time
shows is passed over up to the key frame that starts the next needed one (sought through the container's index when
long, read past when short), and the decoder skips the non-reference frames (most B-frames) that no time shows.
Either way the frames are exactly those of decoding everything from the start of the stream
(tests/test_input_speed.py checks it on streams with short and long key frame intervals, B-frames, variable frame
rates, open GOPs and Matroska). How much it saves depends on the files: nothing on a stream whose every frame is a
reference frame and whose key frames are further apart than the sampled times (a live encoder's 250-frame interval
at the paper's 128 frames of 30 s); most of the decoding for a few frames of long clips.
"""
from __future__ import annotations

import bisect
import collections
import io
import itertools
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


@dataclass(frozen=True)
class DecodeOptions:
  """How MediaFile.frames finds the frames it returns; never which frames: every setting gives the frames of the
  decode-everything path (config.data.decode_seek, decode_skip_unneeded, decode_threads).

  seek (off by default): pass over whole runs of packets that no sampled time needs, up to the key frame that
    starts the next needed stretch: by seeking there (through the container's index) when the run is at least seek_min_frames long, by
    reading past the packets without decoding them when it is shorter. A key frame before the decoder's position
    is never sought: decoding on from there costs less than decoding again from it. Off by default because a
    container may flag as key frames pictures a decoder cannot start from (x264's scene-cut I-frames in mp4: frames
    after such a jump come out wrong, tests/test_input_speed.py), and because on the paper's setting it saved
    nothing measurable (benchmarks/input_pipeline.py).
  skip_unneeded: the decoder skips the non-reference frames (frames nothing is predicted from: most B-frames) that
    no sampled time shows.
  thread_type, thread_count: FFmpeg's decoder threads ('NONE', 'SLICE', 'FRAME' or 'AUTO'; thread_count 0 lets
    FFmpeg take one per core). A data worker is one of several processes sharing the cores, where one thread each
    decodes the most frames per core; the trainer's own process (no workers) may take more.
  """
  seek: bool = False
  skip_unneeded: bool = True
  thread_type: str = 'AUTO'
  thread_count: int = 1
  seek_min_frames: int = 12

  @classmethod
  def from_config(cls, data_config: Mapping[str, Any]) -> 'DecodeOptions':
    """config.data's decode options; decode_threads 0 (or absent) is one thread per data worker, or two in the
    trainer's process when there are no workers (num_workers=0)."""
    threads = int(data_config.get('decode_threads', 0) or 0)
    if threads <= 0:
      threads = 1 if int(data_config.get('num_workers', 0) or 0) > 0 else min(2, available_cores())
    return cls(seek=bool(data_config.get('decode_seek', False)),
               skip_unneeded=bool(data_config.get('decode_skip_unneeded', True)),
               thread_type='NONE' if threads == 1 else 'AUTO', thread_count=threads)


def available_cores() -> int:
  """The cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


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
  `options` say how frames are found (DecodeOptions), never which. `frames_decoded` counts the video frames the
  decoder produced, skipped ones not included.
  """

  def __init__(self, source: Source, limits: Optional[MediaLimits] = None, options: Optional[DecodeOptions] = None):
    self._source = source
    self._limits = limits or MediaLimits()
    self.options = options or DecodeOptions()
    self.frames_decoded = 0
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
    return self.frames_of_size(times, resize_shape(self.info.width, self.info.height, short_side))

  def frames_of_size(self, times: Sequence[float], size: tuple[int, int],
                     crop: Optional[tuple[int, int, int, int]] = None, pixel_format: str = 'rgb24') -> np.ndarray:
    """uint8 [N, height, width, 3]: the frame shown at each of `times` (ascending), resized to size (width, height),
    then cut to crop = (top, left, height, width) if given (the same pixels as cropping the result, without
    holding the whole frames). pixel_format 'yuv420p' (even sizes, no crop) gives the frames as FFmpeg holds them
    before the conversion to RGB, [N, height * 3 / 2, width]: the luma rows, then the two chroma planes.

    Which frames are decoded follows self.options (DecodeOptions); which frames are returned does not.
    """
    times = np.asarray(times, np.float64)
    self._check_span(float(times[0]), float(times[-1]))
    stream = self._container.streams.video[0]
    codec = stream.codec_context
    if not codec.is_open:  # threads and options are fixed when the decoder opens (on the first packet)
      stream.thread_type = self.options.thread_type
      codec.thread_count = self.options.thread_count
      if self._limits.max_frame_pixels:  # the decoder refuses larger frames, however late they come
        codec.options = {'max_pixels': str(self._limits.max_frame_pixels)}
    top, left, height, width = crop if crop is not None else (0, 0, size[1], size[0])
    if not (0 <= top and top + height <= size[1] and 0 <= left and left + width <= size[0]):
      raise ValueError(f'crop {crop} is not inside frames of {size[0]}x{size[1]}')
    if pixel_format == 'yuv420p':
      if crop is not None or size[0] % 2 or size[1] % 2:
        raise ValueError(f'yuv420p frames are not cropped and have even sizes, not {size}')
      out = np.empty((len(times), size[1] * 3 // 2, size[0]), np.uint8)

      def to_rgb(frame) -> np.ndarray:
        return self._reformatter.reformat(frame, width=size[0], height=size[1], format='yuv420p',
                                          interpolation='BILINEAR', threads=1).to_ndarray()
    elif pixel_format == 'rgb24':
      out = np.empty((len(times), height, width, 3), np.uint8)

      def to_rgb(frame) -> np.ndarray:
        return _to_rgb(self._reformatter, frame, size)[top:top + height, left:left + width]
    else:
      raise ValueError(f'pixel_format={pixel_format!r}: rgb24 or yuv420p')

    sampler = _FrameSampler(self, stream, times, to_rgb, out)
    try:
      sampler.run()
    except (av.FFmpegError, ArithmeticError, ValueError, TypeError) as e:  # damaged timestamps and sizes included
      raise self._failed('video decoding', e) from e
    finally:
      self.frames_decoded += sampler.decoded
    return out

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


# Packets read ahead of the decoder at most: to learn a packet's successor in presentation order, or to reach a
# near key frame. Reordering in real streams spans a few packets; beyond this the packet is simply decoded.
_LOOKAHEAD = 48
_SEEK_TRIES = 4  # seeks to earlier key frames before giving up on one that shows no later than the time sought


class _FrameSampler:
  """The frames shown at ascending `times`, found with as little decoding as MediaFile.options allow.

  The frame shown at time t is the last frame whose timestamp is <= t (the first frame for times before it), as
  decoding everything from the start of the stream would show it. Two sides:

  * Output (`_emit`): decoded frames arrive in presentation order; a time is settled when the first frame after it
    arrives, with the frame on screen before it (converted to RGB once, and only if some time selects it).
  * Input (`run`): packets are read in decoding order into `pending`. A packet whose frame no time selects may be
    left out: a non-reference frame is skipped by the decoder (skip_unneeded), and the packets before a key frame K
    are passed over (seek) when K is shown no later than the first time whose frame has not been sent to the
    decoder: every later time shows K or a frame after it, and frames from K on (in presentation order) do not
    depend on anything before K. Which times a packet's frame shows is known from its timestamp and the next one in
    presentation order, which it reads ahead for: a packet not yet read is presented no earlier than it is decoded,
    and decoded no earlier than the last packet read. Streams whose timestamps do not behave so (missing, decoding
    order not increasing, presented before decoded) are decoded through, as are packets whose successor lies more
    than _LOOKAHEAD packets ahead.
  """

  def __init__(self, media_file: 'MediaFile', stream, times: np.ndarray, to_rgb, out: np.ndarray):
    self._file, self._stream, self._codec = media_file, stream, stream.codec_context
    self._container = media_file._container  # pylint: disable=protected-access
    self._name = _describe(media_file._source)  # pylint: disable=protected-access
    self._options = media_file.options
    self._to_rgb, self.out = to_rgb, out
    self._time_list = times.tolist()
    base = stream.time_base
    self._num, self._den = base.numerator, base.denominator
    self._fps = media_file.info.fps
    self.decoded = 0
    # Output side.
    self._shown, self._shown_rgb, self._settled = None, None, 0
    # Input side.
    self._plan = self._options.seek or self._options.skip_unneeded
    self._covered = np.zeros(len(times), bool)  # times whose frame has been sent to the decoder
    self._uncovered = 0  # the first time not covered
    self._pending: collections.deque = collections.deque()  # [packet, pts s, dts s, key, pts, dts]
    self._sent: collections.deque = collections.deque(maxlen=_LOOKAHEAD)  # presentation times of recent packets
    self._demux = None
    self._exhausted = False
    self._last_dts: Optional[int] = None
    self._max_dts = -math.inf  # seconds
    self._ordered = True  # timestamps allow leaving packets out
    self._at_start = False  # the next packet decided is the first of the stream
    self._key_delay = 0.0  # presentation minus decoding time of key frames (B-frame reordering)
    self._keys: Optional[tuple[np.ndarray, list[int]]] = None  # the index's key frames: seconds, timestamps
    self._sought = -1  # the last key frame of the index sought: never sought again, nor one before it
    self._skip_setting = None

  def _seconds(self, timestamp: int) -> float:
    return float(timestamp) * self._num / self._den  # as PyAV's frame.time, so that comparisons agree

  # Output side.

  def _emit(self, frame) -> None:
    self._file._check_time()  # pylint: disable=protected-access
    self.decoded += 1
    # The stream's time base, not the frame's: frames drained from the decoder carry none.
    t = self._seconds(frame.pts) if frame.pts is not None else 0.0
    if self._shown is None:
      self._shown = frame  # times before the first decoded frame show that frame
    times, n = self._time_list, len(self._time_list)
    while self._settled < n and times[self._settled] < t:
      if self._shown_rgb is None:
        self._shown_rgb = self._to_rgb(self._shown)
      self.out[self._settled] = self._shown_rgb
      self._settled += 1
    if frame is not self._shown:
      self._shown, self._shown_rgb = frame, None

  def _finish(self) -> None:
    for frame in self._codec.decode(None) if self._codec.is_open else ():  # the frames still in the decoder
      self._emit(frame)
    if self._shown is None:
      raise MediaError(f'{self._name}: no decodable video frame after {max(self._time_list[0], 0.0):.3f}s')
    if self._settled < len(self._time_list):  # past the last frame: the last frame stays on screen
      self.out[self._settled:] = self._shown_rgb if self._shown_rgb is not None else self._to_rgb(self._shown)
      self._settled = len(self._time_list)

  # Input side.

  def run(self) -> None:
    self._codec.skip_frame = self._skip_setting = 'DEFAULT'  # a decoder opened by an earlier call may hold another
    self._position(max(self._time_list[0], 0.0))
    n = len(self._time_list)
    while self._settled < n and self._uncovered < n:
      self._file._check_time()  # pylint: disable=protected-access
      if not self._pending:
        if self._exhausted:
          break
        self._pull()
        continue
      needed, lo, hi = True, 0, 0
      if self._plan and self._ordered:
        if self._options.seek and self._jump():
          continue
        decision = self._decide()
        if decision is None:  # the successor is not read yet
          if not self._exhausted and len(self._pending) < _LOOKAHEAD:
            self._pull()
            continue
        else:
          needed, lo, hi = decision
      self._send(self._pending.popleft(), needed, lo, hi)
    self._finish()

  def _position(self, first: float) -> None:
    """Seeks to the key frame before `first` (as decoding everything would start), checking that it is no later
    than `first`: an index that is off (B-frame delays, edit lists) would otherwise show a later frame."""
    stream, container = self._stream, self._container
    target = int(first / stream.time_base)
    for _ in range(_SEEK_TRIES):
      container.seek(target, stream=stream, backward=True, any_frame=False)
      self._restart()
      if not self._pending:
        return
      _, pts, _, key, raw_pts, raw_dts = self._pending[0]
      where = raw_dts if raw_dts is not None else raw_pts
      if not key:
        self._ordered = False  # a stream that does not start on a key frame here: decoded through, as it comes
        return
      if pts is None or pts <= first or self._is_stream_start(where):
        self._at_start = self._is_stream_start(where)
        return
      target = where - 1  # the key frame before this one
    self._ordered = False  # no earlier key frame reachable: decode on from here, as the decode-everything path would

  def _is_stream_start(self, timestamp: Optional[int]) -> bool:
    """Whether a packet at this timestamp (decoding, else presentation) is the first of the stream, by the index."""
    entries = self._stream.index_entries
    return timestamp is not None and len(entries) > 0 and timestamp <= entries[0].timestamp

  def _restart(self) -> None:
    self._demux = self._container.demux(self._stream)
    self._pending.clear()
    self._sent.clear()
    self._exhausted, self._last_dts, self._max_dts = False, None, -math.inf
    self._pull()

  def _pull(self) -> None:
    """Reads the next packet of the stream into `pending`."""
    for packet in self._demux:
      pts, dts = packet.pts, packet.dts
      if packet.size == 0:
        if pts is None and dts is None:
          break  # the end of the stream
        continue  # an empty packet would end the decoder's stream: never sent
      # A demuxer may leave a decoding timestamp out (Matroska does for the first packets): the stream's own is
      # still no later than what follows, so only the timestamps it gives are checked.
      if pts is None or (dts is not None and (pts < dts or (self._last_dts is not None and dts < self._last_dts))):
        self._ordered = False
      pts_s = None if pts is None else self._seconds(pts)
      dts_s = None if dts is None else self._seconds(dts)
      if dts is not None:
        self._last_dts = dts
        self._max_dts = max(self._max_dts, dts_s)
      key = bool(packet.is_keyframe)
      if key and pts_s is not None and dts_s is not None:
        self._key_delay = max(self._key_delay, pts_s - dts_s)
      self._pending.append((packet, pts_s, dts_s, key, pts, dts))
      return
    self._exhausted = True

  def _decide(self) -> Optional[tuple[bool, int, int]]:
    """(needed, lo, hi) of the first pending packet: whether a time shows its frame, and which times do
    (times[lo:hi]); None while its successor in presentation order may still be unread."""
    pts = self._pending[0][1]
    successor = math.inf
    for entry in itertools.islice(self._pending, 1, None):
      if entry[1] is not None and pts < entry[1] < successor:
        successor = entry[1]
    for sent in self._sent:
      if pts < sent < successor:
        successor = sent
    if not self._exhausted and (successor == math.inf or self._max_dts < successor):
      return None
    lo = 0 if self._at_start else bisect.bisect_left(self._time_list, pts)
    hi = bisect.bisect_left(self._time_list, successor)
    return hi > lo, lo, hi

  def _send(self, entry, needed: bool, lo: int, hi: int) -> None:
    packet, pts = entry[0], entry[1]
    if self._options.skip_unneeded:
      setting = 'DEFAULT' if needed else 'NONREF'
      if setting != self._skip_setting:
        self._codec.skip_frame = self._skip_setting = setting
    frames = self._codec.decode(packet)
    self._at_start = False
    if hi > lo:
      self._covered[lo:hi] = True
      while self._uncovered < len(self._covered) and self._covered[self._uncovered]:
        self._uncovered += 1
    if pts is not None:
      self._sent.append(pts)
    for frame in frames:
      self._emit(frame)

  def _jump(self) -> bool:
    """Passes over the packets before a key frame whose timestamp is at most the first time not covered, if there
    is one ahead: True if it moved (or read on towards one)."""
    earliest = self._time_list[self._uncovered]
    pending = self._pending
    for k in range(len(pending) - 1, 0, -1):
      _, pts, _, key, _, _ = pending[k]
      if key and pts is not None and pts <= earliest:
        for _ in range(k):
          pending.popleft()
        self._at_start = False
        return True
    seconds, timestamps = self._key_index()
    k = bisect.bisect_right(seconds, earliest - self._key_delay) - 1
    if k <= self._sought or seconds[k] <= self._max_dts:
      return False  # no key frame ahead of what is read
    if (seconds[k] - self._max_dts) * self._fps < self._options.seek_min_frames:
      if len(pending) < _LOOKAHEAD and not self._exhausted:
        self._pull()  # near: read on to it
        return True
      return False
    self._sought = k
    self._seek(timestamps, k, earliest)
    return True

  def _seek(self, timestamps: list[int], k: int, earliest: float) -> None:
    """Seeks to key frame k of the index (or an earlier one, if k shows after `earliest`)."""
    for frame in self._codec.decode(None) if self._codec.is_open else ():  # what was sent is shown first
      self._emit(frame)
    for _ in range(_SEEK_TRIES):
      self._container.seek(timestamps[k], stream=self._stream, backward=True, any_frame=False)
      self._restart()
      if not self._pending:
        return
      _, pts, _, key, raw_pts, raw_dts = self._pending[0]
      where = raw_dts if raw_dts is not None else raw_pts
      if key and pts is not None and pts <= earliest:
        return
      if self._is_stream_start(where) or k == 0:
        self._at_start = self._is_stream_start(where)
        self._ordered = self._ordered and key
        return
      k -= 1
    self._position(earliest)  # the index and the packets disagree: start over as the first seek would
    self._ordered = False

  def _key_index(self) -> tuple[np.ndarray, list[int]]:
    """The key frames of the container's index (empty without one), in seconds and in stream timestamps."""
    if self._keys is None:
      timestamps = [entry.timestamp for entry in self._stream.index_entries if entry.is_keyframe]
      timestamps.sort()
      self._keys = np.array([self._seconds(t) for t in timestamps], np.float64), timestamps
    return self._keys


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


def resize_shape(width: int, height: int, short_side: int) -> tuple[int, int]:
  """(width, height) of frames of width x height resized so that their short side is short_side."""
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
