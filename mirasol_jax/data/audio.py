"""Log-mel spectrograms in numpy, computed on the host by the input pipeline.

Matches librosa's `melspectrogram(power=2, center=True, pad_mode='constant', window='hann', htk=False,
norm='slaney')` followed by `power_to_db(ref=1.0, amin=1e-10, top_db=80)`, without importing librosa.
`chunk_log_mel` computes one spectrogram for a whole clip and reads each chunk's frames from it at the chunk's own
time span, resampled to a fixed number of frames, so that chunk t's audio covers exactly the time of its k frames.
"""
from __future__ import annotations

import functools
from typing import Sequence

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


def log_mel(waveform: np.ndarray, sample_rate: int = 16_000, window_ms: float = 25.0, hop_ms: float = 10.0,
            n_mels: int = 128, top_db: float = 80.0) -> np.ndarray:
  """[samples] float waveform -> [1 + samples // hop, n_mels] log-mel power in dB (librosa's conventions)."""
  n_fft = int(round(sample_rate * window_ms / 1000))
  hop = int(round(sample_rate * hop_ms / 1000))
  y = np.pad(np.asarray(waveform, np.float32), n_fft // 2)
  num_frames = 1 + (len(y) - n_fft) // hop
  frames = np.lib.stride_tricks.as_strided(y, (num_frames, n_fft), (y.strides[0] * hop, y.strides[0]))
  power = np.abs(np.fft.rfft(frames * _hann(n_fft), axis=-1)) ** 2
  mel = power.astype(np.float32) @ mel_filterbank(sample_rate, n_fft, n_mels).T
  db = 10.0 * np.log10(np.maximum(mel, 1e-10))
  return np.maximum(db, db.max() - top_db).astype(np.float32)


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
    times = start + (end - start) * np.arange(frames_per_chunk) / frames_per_chunk
    pos = np.clip(times / hop_s, 0, spec.shape[0] - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, spec.shape[0] - 1)
    frac = (pos - lo)[:, None].astype(np.float32)
    out[t] = spec[lo] * (1 - frac) + spec[hi] * frac
  return out
