"""Log-mel spectrograms in numpy, computed on the host by the input pipeline.

Matches librosa's `melspectrogram(power=2, center=True, pad_mode='constant', window='hann', htk=False,
norm='slaney')` followed by `power_to_db(ref=1.0, amin=1e-10, top_db=80)`, without importing librosa.
`chunk_log_mel` computes one spectrogram for a whole clip and reads each chunk's frames from it at the chunk's own
time span, resampled to a fixed number of frames, so that chunk t's audio covers exactly the time of its k frames.
`LogMelStream` computes the same chunk by chunk while the audio arrives (`answer --stream` reads a file as if it
were playing), from the audio heard so far: it differs from `chunk_log_mel` only where the whole clip's features
depend on later audio (the 80 dB floor under the clip's loudest frame, windows that reach into the next chunk).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import numpy as np

SILENCE_DB = -100.0  # 10 * log10(amin): the log-mel of digital silence; what a video without audio gets.


def hz_to_mel(hz):
  """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
  hz = np.asarray(hz, np.float64)
  f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
  mel = hz / f_sp
  return np.where(hz >= min_log_hz, min_log_hz / f_sp + np.log(np.maximum(hz, 1e-10) / min_log_hz) / logstep, mel)


def mel_to_hz(mel):
  mel = np.asarray(mel, np.float64)
  f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
  min_log_mel = min_log_hz / f_sp
  return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


@functools.lru_cache(maxsize=16)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None):
  """[n_mels, n_fft // 2 + 1] Slaney-normalised triangular filters."""
  fmax = sample_rate / 2 if fmax is None else fmax
  fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
  mel_freqs = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
  widths = np.diff(mel_freqs)
  ramps = mel_freqs[:, None] - fft_freqs[None, :]
  lower = -ramps[:-2] / widths[:-1, None]
  upper = ramps[2:] / widths[1:, None]
  weights = np.maximum(0.0, np.minimum(lower, upper))
  weights *= (2.0 / (mel_freqs[2:n_mels + 2] - mel_freqs[:n_mels]))[:, None]
  return weights.astype(np.float32)


@functools.lru_cache(maxsize=16)
def _hann(n: int) -> np.ndarray:
  return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)  # periodic, as scipy fftbins=True


def _fft_sizes(sample_rate: int, window_ms: float, hop_ms: float) -> tuple[int, int]:
  """(n_fft, hop) in samples."""
  return int(round(sample_rate * window_ms / 1000)), int(round(sample_rate * hop_ms / 1000))


def _frames_power(y: np.ndarray, num_frames: int, n_fft: int, hop: int) -> np.ndarray:
  """[num_frames, n_fft // 2 + 1] float32 power spectra of the Hann-windowed frames y[j * hop : j * hop + n_fft] of
  a float32 contiguous array y."""
  frames = np.lib.stride_tricks.as_strided(y, (num_frames, n_fft), (y.strides[0] * hop, y.strides[0]))
  power = np.abs(np.fft.rfft(frames * _hann(n_fft), axis=-1)) ** 2
  return power.astype(np.float32)


def _frames_mel_power(y: np.ndarray, num_frames: int, n_fft: int, hop: int, sample_rate: int,
                      n_mels: int) -> np.ndarray:
  """[num_frames, n_mels] float32 mel power of those frames."""
  return _frames_power(y, num_frames, n_fft, hop) @ mel_filterbank(sample_rate, n_fft, n_mels).T


def mel_power(waveform: np.ndarray, sample_rate: int = 16_000, window_ms: float = 25.0, hop_ms: float = 10.0,
              n_mels: int = 128) -> np.ndarray:
  """[samples] float waveform -> [1 + samples // hop, n_mels] float32 mel power: frame j is centred on sample
  j * hop, with half a window of zeros padded at both ends (librosa's center=True, pad_mode='constant')."""
  n_fft, hop = _fft_sizes(sample_rate, window_ms, hop_ms)
  y = np.pad(np.asarray(waveform, np.float32), n_fft // 2)
  return _frames_mel_power(y, 1 + (len(y) - n_fft) // hop, n_fft, hop, sample_rate, n_mels)


def _decibels(mel: np.ndarray) -> np.ndarray:
  return 10.0 * np.log10(np.maximum(mel, 1e-10))


def power_to_db(mel: np.ndarray, reference_db=None, top_db: float = 80.0) -> np.ndarray:
  """Mel power -> dB, floored at top_db under `reference_db` (float32; by default the loudest value of `mel` itself,
  as librosa's power_to_db(top_db=...)). A stream passes the loudest value heard so far."""
  db = _decibels(mel)
  reference = db.max() if reference_db is None else np.float32(reference_db)
  return np.maximum(db, reference - top_db).astype(np.float32)


def log_mel(waveform: np.ndarray, sample_rate: int = 16_000, window_ms: float = 25.0, hop_ms: float = 10.0,
            n_mels: int = 128, top_db: float = 80.0) -> np.ndarray:
  """[samples] float waveform -> [1 + samples // hop, n_mels] log-mel power in dB (librosa's conventions)."""
  return power_to_db(mel_power(waveform, sample_rate, window_ms, hop_ms, n_mels), top_db=top_db)


def chunk_positions(start: float, end: float, frames_per_chunk: int, hop_s: float,
                    num_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Where chunk_log_mel reads a chunk [start, end) (seconds) from a spectrogram of num_frames frames: its
  frames_per_chunk evenly spaced times as the frames (lo, hi) [F] on either side and the weight frac [F, 1] of hi."""
  times = start + (end - start) * np.arange(frames_per_chunk) / frames_per_chunk
  pos = np.clip(times / hop_s, 0, num_frames - 1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, num_frames - 1)
  return lo, hi, (pos - lo)[:, None].astype(np.float32)


def chunk_log_mel(waveform: np.ndarray, chunk_bounds: Sequence[tuple[float, float]], frames_per_chunk: int,
                  sample_rate: int = 16_000, window_ms: float = 25.0, hop_ms: float = 10.0, n_mels: int = 128,
                  top_db: float = 80.0) -> np.ndarray:
  """[T, frames_per_chunk, n_mels]: the log-mel of each chunk's span [start_s, end_s) (seconds from the waveform's
  first sample), read at frames_per_chunk evenly spaced times by linear interpolation between spectrogram frames.

  When a chunk lasts exactly frames_per_chunk hops and starts on a hop, this reads the spectrogram frames as they are.
  """
  spec = log_mel(waveform, sample_rate, window_ms, hop_ms, n_mels, top_db)
  hop_s = hop_ms / 1000.0
  out = np.empty((len(chunk_bounds), frames_per_chunk, n_mels), np.float32)
  for t, (start, end) in enumerate(chunk_bounds):
    lo, hi, frac = chunk_positions(start, end, frames_per_chunk, hop_s, spec.shape[0])
    out[t] = spec[lo] * (1 - frac) + spec[hi] * frac
  return out


class LogMelStream:
  """chunk_log_mel of a clip computed chunk by chunk as its audio arrives, from what has been heard so far.

    stream = LogMelStream(num_samples, chunk_bounds, frames_per_chunk, ...)
    for t in range(T):
      a, b = stream.chunk_samples(t)
      features = stream.push(waveform[a:b])  # [frames_per_chunk, n_mels]: chunk t's, knowing samples [0, b)

  Chunk t reads the same spectrogram frames at the same times as chunk_log_mel over the whole clip, each frame
  computed from the samples heard so far: the new chunk's, the tail of earlier audio that its first windows reach
  back into (kept from the previous push, at most about half a window and a hop), and zeros in place of what lies
  past the last sample heard (as for the centre padding before the clip's first sample). The floor is top_db under
  the loudest frame computed so far (`loudest_db`) instead of the whole clip's loudest frame: a live reader cannot
  know the future. So chunk t equals the whole clip's log-mel (up to float rounding of the mel projection, summed
  in another order: about 1e-6 dB) wherever
    * the frames read lie wholly inside what has been heard: not so for the last frames of a chunk whose windows
      reach past its end (half a window, 12.5 ms, when a chunk lasts exactly frames_per_chunk hops; the whole clip's
      read the next chunk's samples there, these hear zeros), except at the clip's end, padded alike, and
    * the floor agrees: the loudest frame heard so far is the clip's loudest (after the chunk that holds it), or
      nothing is under either floor. Before the loudest sound, quiet bins keep values the whole clip's floor raises.
  Each push costs the chunk's own frames (and the few frames of the tail): constant work per chunk.
  """

  def __init__(self, num_samples: int, chunk_bounds: Sequence[tuple[float, float]], frames_per_chunk: int,
               sample_rate: int = 16_000, window_ms: float = 25.0, hop_ms: float = 10.0, n_mels: int = 128,
               top_db: float = 80.0):
    """num_samples: the clip's length (that of the waveform chunk_log_mel would get); chunk_bounds in seconds from
    its first sample, as chunk_log_mel takes them."""
    self.num_samples = int(num_samples)
    self._bounds = [(float(a), float(b)) for a, b in chunk_bounds]
    self._frames_per_chunk, self._sample_rate, self._n_mels = frames_per_chunk, sample_rate, n_mels
    self._n_fft, self._hop = _fft_sizes(sample_rate, window_ms, hop_ms)
    self._hop_s, self._top_db = hop_ms / 1000.0, top_db
    pad = self._n_fft // 2
    self._num_frames = 1 + (self.num_samples + 2 * pad - self._n_fft) // self._hop  # log_mel's of the whole clip
    self._tail = np.zeros(0, np.float32)  # samples [tail_start, heard) kept for the next chunk's first windows
    self._tail_start = 0
    self.heard = 0  # samples pushed so far
    self.chunks = 0  # chunks computed so far
    self.loudest_db: Optional[np.float32] = None

  def _positions(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    start, end = self._bounds[t]
    return chunk_positions(start, end, self._frames_per_chunk, self._hop_s, self._num_frames)

  def _first_sample(self, frame: int) -> int:
    """The first sample (from the clip's first; negative in the centre padding) of spectrogram frame `frame`."""
    return frame * self._hop - self._n_fft // 2

  def chunk_samples(self, t: int) -> tuple[int, int]:
    """The samples [a, b) that chunk t brings: from the end of chunk t - 1 to the end of chunk t, the last chunk to
    the clip's end."""
    def end(i):
      if i < 0:
        return 0
      if i == len(self._bounds) - 1:
        return self.num_samples
      return min(max(int(round(self._bounds[i][1] * self._sample_rate)), 0), self.num_samples)
    return end(t - 1), max(end(t), end(t - 1))

  @property
  def tail_samples(self) -> int:
    """How many earlier samples are kept for the next chunk."""
    return len(self._tail)

  def push(self, samples: np.ndarray) -> np.ndarray:
    """The next chunk's log-mel [frames_per_chunk, n_mels], given its samples (those after the ones pushed
    before; chunk_samples says which)."""
    t = self.chunks
    if t >= len(self._bounds):
      raise ValueError(f'all {len(self._bounds)} chunks were computed')
    samples = np.asarray(samples, np.float32).reshape(-1)
    if self.heard + len(samples) > self.num_samples:
      raise ValueError(f'{self.heard + len(samples)} samples pushed, over the clip\'s {self.num_samples}')
    known = np.concatenate([self._tail, samples])
    self.heard += len(samples)
    lo, hi, frac = self._positions(t)
    first, last = int(lo.min()), int(hi.max())
    begin = self._first_sample(first)
    if begin < self._tail_start and self._tail_start > 0:
      raise ValueError(f'chunk {t} reads samples from {begin}, before the tail kept ({self._tail_start})')
    # Frames first..last over the heard samples, zeros elsewhere (before the clip, and past what has been heard).
    segment = np.zeros((last - first) * self._hop + self._n_fft, np.float32)
    a, b = max(begin, self._tail_start), min(begin + len(segment), self.heard)
    if b > a:
      segment[a - begin:b - begin] = known[a - self._tail_start:b - self._tail_start]
    # The mel projection as a plain loop (einsum), not BLAS: for a chunk's hundred frames BLAS hands the product to
    # its threads, and on cores the model's threads are using that handoff costs milliseconds (about 20 on 2
    # shared cores) against 0.2 ms in one thread.
    power = _frames_power(segment, last - first + 1, self._n_fft, self._hop)
    mel = np.einsum('fk,mk->fm', power, mel_filterbank(self._sample_rate, self._n_fft, self._n_mels))
    loudest = _decibels(mel).max()
    self.loudest_db = loudest if self.loudest_db is None else max(self.loudest_db, loudest)
    spec = power_to_db(mel, self.loudest_db, self._top_db)
    out = spec[lo - first] * (1 - frac) + spec[hi - first] * frac
    self.chunks += 1
    # Keep what the next chunk's first windows reach back into.
    if self.chunks < len(self._bounds):
      keep = max(self._first_sample(int(self._positions(self.chunks)[0].min())), 0)
      keep = min(max(keep, self._tail_start), self.heard)
      self._tail, self._tail_start = known[keep - self._tail_start:].copy(), keep
    else:
      self._tail, self._tail_start = np.zeros(0, np.float32), self.heard
    return out
