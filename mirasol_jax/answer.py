"""Answering a question about one media file (or captioning it) with a trained run, whole or chunk by chunk.

  python -m mirasol_jax.main answer --workdir=W --video=FILE [--start=S --end=E] [--question="..."] [--stream]

Where it sits: beside the `vqa` and `caption` evaluators, for one file a user names instead of a dataset's records.
  FILE [start, end] -> pipeline.DecodeExample(train=False) -> video [1, T, k, H, W, 3], audio [1, T, F, M]
  {'question': ...} -> the run's task's prompt template (data/tasks.py) -> BOS prompt, as evaluation tokenises it
  whole clip: Model.encode_av -> AV latents [1, T, m, D] -> greedy_decode (or beam_decode) -> answer
  --stream:   for t = 1..T: ChunkReader.read() decodes chunk t from the file -> Model.stream_step(chunk t, carried
              state) -> h_t; latents h_1..h_t -> decoder -> answer
The input is what evaluation sees of the same record (centre crop, a frame in the middle of each of N segments,
log-mel per chunk), so the answer is the `eval` command's answer to that record.

The score of an answer is the log-probability the decoder gives its tokens and the EOS that ends it, teacher-forced
over the same latents after generation (one more decoder pass): its mean per token, and its total, whose exponential
is the probability of the whole answer.

Streaming reads the file as if it were playing. Nothing is decoded up front: chunk t's frames and audio are decoded
when the stream reaches chunk t (ChunkReader), each decoder going forward from where the previous chunk left it, so
each chunk costs the decoding of its own span, whatever its position, and nothing is decoded twice (the first chunk
starts at the key frame at or before the clip's first sample time, as evaluation's decoding does).
  * Frames: the whole clip's sample times (media.segment_times over [start, end]) restricted to chunk t, resized
    and centre-cropped as evaluation does: the same arrays as the whole clip's chunk t. A frame's display ends
    when the next frame's starts, so the one frame after the chunk's last sample time is decoded with it (in the
    demo's 8 fps files, the frame shown from the chunk's end on) and kept, unused, for the next chunk.
  * Audio: the chunk's samples, decoded on (at most one audio frame past the chunk's end is read), and its log-mel
    (audio.LogMelStream) from the audio heard so far: the chunk's samples, the tail of earlier audio its first
    windows reach back into (half a window, 200 samples at 16 kHz), and silence past the last sample heard; the
    80 dB floor is under the loudest spectrogram frame heard so far. Evaluation's whole-clip log-mel (what the
    whole clip's answer reads) takes its floor under the clip's loudest frame and reads a little of the next chunk
    where a chunk's last windows reach past its end. The two agree (to 1e-5 dB) from the chunk holding the clip's
    loudest sound on, and in every bin above the whole clip's floor; before that sound, bins under that floor keep
    the lower values they have (tens of dB lower in silence). The answer after the last chunk can therefore differ
    slightly from the whole clip's.
Each chunk then costs one encoder pass over that chunk, one Combiner step against the carried state (the TTM
memory) and one AV Transformer step against the KV cache of the earlier chunks (Model.stream_step): nothing of an
earlier chunk is computed again, and block-causal attention makes h_t equal to the full pass's latents of chunk t
given the same inputs. The decoder then cross-attends to exactly the latents h_1..h_t, as it would for a clip of t
chunks: no parameter depends on the number of chunks (the AV Transformer's chunk positions are sin-cos, the
decoder's cross-attention takes any length, and `text.context_norm='tokens'` standardises over the latents it is
given). Masking the later chunks instead would need a context mask the decoder does not have, and its
standardisation would still count them. So the answer after chunk t costs a decoding over t*m latents: it grows
with the latents attended. The model was trained on clips of T chunks only: its answers from fewer are what it
makes of a clip cut short. `Answerer.stream` feeds a clip decoded whole (read_clip) the same way, chunk by chunk.

Shapes are static: the chunk step is compiled once, the answer once per number of chunks seen, and each is compiled
and run once before the first chunk, so that the per-chunk times printed are those of programs already warm. The
programs are kept for the process (answering another file with the same run compiles nothing).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import av
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mirasol_jax import checkpoint
from mirasol_jax import config_lib
from mirasol_jax import decoding
from mirasol_jax import host_memory
from mirasol_jax import paths
from mirasol_jax import sharding
from mirasol_jax.data import audio as audio_lib
from mirasol_jax.data import media
from mirasol_jax.data import pipeline
from mirasol_jax.data import tasks as tasks_lib
from mirasol_jax.data import tokenizer as tokenizer_lib
from mirasol_jax.evaluators import scoring
from mirasol_jax.models import mirasol

Array = jax.Array

CAPTION_TARGETS = ('caption', 'captions')
# Decoding settings when the run has no evaluator for the chosen task: those of the vqa and caption evaluators.
DEFAULT_MAX_NEW_TOKENS = {'answer': 8, 'caption': 24}


class AnswerError(Exception):
  """Something the user can fix: a missing file or workdir, a question for a model that only captions, ..."""


# ---------------------------------------------------------------------------------------------------------------
# The run: its config, the task to prompt with, its parameters.


def load_config(workdir: str, override: Optional[ml_collections.ConfigDict] = None) -> ml_collections.ConfigDict:
  """The run's config: `override` (from --config) or WORKDIR/config.json, which the trainer writes.

  A config.json of an older version lacks the data fields added since (decoding limits, say): they take the
  defaults of config_lib.data_config, as a run started now would have them.
  """
  if override is not None:
    config = ml_collections.ConfigDict(override.to_dict())
  else:
    path = paths.join(workdir, 'config.json')
    if not paths.exists(path):
      raise AnswerError(f'{workdir} has no config.json (the trainer writes it); pass --config=FILE to name the run\'s '
                        'config')
    try:
      config = ml_collections.ConfigDict(json.loads(paths.read_text(path)))
    except (OSError, ValueError) as e:
      raise AnswerError(f'{path}: cannot read the run\'s config ({e}); pass --config=FILE to name it') from e
  defaults = config_lib.data_config()
  for key in defaults:
    if key not in config.data:
      config.data[key] = defaults[key]
  # The user names the file: the dataset folder's containment of media does not apply.
  config.data.allow_outside_media = True
  tokenizer = paths.join(workdir, 'tokenizer.model')
  if paths.exists(tokenizer):  # the run's own, wherever the workdir has moved since config.json was written
    config.data.tokenizer = tokenizer
  elif not config.data.tokenizer or not paths.exists(config.data.tokenizer):
    raise AnswerError(f'{workdir} has no tokenizer.model and config.data.tokenizer={config.data.tokenizer!r} does not '
                      'exist: which tokenizer did the model train with?')
  return config


@dataclasses.dataclass(frozen=True)
class Task:
  """The task whose prompt the model is given: its name in config.data.tasks ('' for config.data itself), its
  config.data as it sees it, and what it produces ('answer' or 'caption')."""
  name: str
  data: ml_collections.ConfigDict
  kind: str

  @property
  def prompt(self) -> str:
    return self.data.get('prompt', '')


def _reads_question(data) -> bool:
  """An empty template is the title, the question and the options (data/tasks.py)."""
  template = data.get('prompt', '')
  return not template or '{question}' in template


def _describe(name: str, data) -> str:
  return f'{name or "config.data"} (prompt {data.get("prompt", "")!r}, target {data.get("target", "") or "any"!r})'


def choose_task(data: ml_collections.ConfigDict, question: Optional[str], name: Optional[str] = None) -> Task:
  """The run's task to prompt with: with a question, one whose prompt reads it (the first, or the one named);
  without one, one that captions (target caption or captions) or whose prompt reads no question.

  Raises AnswerError when the run has no such task: a question for a model trained only to caption, or no question
  for a model trained only to answer.
  """
  names = tasks_lib.task_names(data) or ['']
  if name:
    if name not in names:
      listed = ', '.join(n for n in names if n) or 'config.data alone'
      raise AnswerError(f'--task={name}: the run\'s tasks are {listed}')
    names = [name]
  candidates = [(n, tasks_lib.task_data(data, n)) for n in names]
  if question:
    chosen = [(n, d) for n, d in candidates if _reads_question(d) and d.get('target', '') not in CAPTION_TARGETS]
    if not chosen:
      raise AnswerError('the model was not trained to answer questions: ' +
                        '; '.join(_describe(n, d) for n, d in candidates) + ' reads no question. Leave --question '
                        'out to caption the clip')
    return Task(*chosen[0], 'answer')
  chosen = ([(n, d) for n, d in candidates if d.get('target', '') in CAPTION_TARGETS] or
            [(n, d) for n, d in candidates if not _reads_question(d)])
  if not chosen:
    raise AnswerError('the model was trained to answer questions, not to caption: ' +
                      '; '.join(_describe(n, d) for n, d in candidates) + '. Give --question="..."')
  return Task(*chosen[0], 'caption')


def decode_settings(config, task: Task, beam: Optional[int], max_new_tokens: Optional[int]) -> dict[str, Any]:
  """max_new_tokens, beam_size, length_penalty: the flags' where given, else those of the run's first vqa or
  caption evaluator of this task (so that the answer is the one `eval` gives), else the evaluators' defaults."""
  settings = {'max_new_tokens': DEFAULT_MAX_NEW_TOKENS[task.kind], 'beam_size': 1, 'length_penalty': 0.0}
  for cfg in (config.get('evals') or {}).values():
    if cfg.get('type') in ('vqa', 'caption') and cfg.get('task', '') == task.name:
      settings.update({k: cfg[k] for k in settings if k in cfg})
      break
  if beam is not None:
    settings['beam_size'] = beam
  if max_new_tokens is not None:
    settings['max_new_tokens'] = max_new_tokens
  if settings['beam_size'] < 1 or settings['max_new_tokens'] < 1:
    raise AnswerError(f'--beam and --max_new_tokens must be at least 1 (beam {settings["beam_size"]}, '
                      f'max_new_tokens {settings["max_new_tokens"]})')
  return settings


def restore_params(config, workdir: str, step: Optional[int] = None) -> tuple[int, Any]:
  """The parameters alone of the workdir's checkpoint of `step` (default: the newest that reads), as the `eval`
  command reads them, on one device."""
  folder = checkpoint.checkpoints_folder(workdir)
  if not checkpoint.saved_steps(folder):
    raise AnswerError(f'{workdir} holds no checkpoint ({folder}/<step>): train it first')
  model = mirasol.Model(**config.model)
  batch = mirasol.example_batch(config, 1)
  rng = jax.random.PRNGKey(0)
  boxed = jax.eval_shape(lambda r: model.init({'params': r, 'dropout': r}, batch)['params'], rng)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          sharding.box_values(boxed))
  try:
    return checkpoint.params_at(workdir, step, abstract)
  except (FileNotFoundError, checkpoint.MismatchError) as e:
    raise AnswerError(str(e)) from None


# ---------------------------------------------------------------------------------------------------------------
# The input: the clip as evaluation decodes it, the prompt as evaluation tokenises it.


@dataclasses.dataclass
class Clip:
  """One example (numpy, batch axis of 1) and where its chunks lie in the file."""
  example: dict[str, np.ndarray]  # the model's keys (mirasol.batch_shapes) with B = 1
  record: dict[str, Any]
  prompt: str
  chunk_bounds: list[tuple[float, float]]  # seconds in the file, one per chunk

  @property
  def start(self) -> float:
    return self.chunk_bounds[0][0]

  @property
  def end(self) -> float:
    return self.chunk_bounds[-1][1]

  @property
  def text(self) -> tuple[np.ndarray, np.ndarray]:
    """(text_tokens [1, L], text_loss_mask [1, L]): the prompt as the decoder reads it."""
    return self.example['text_tokens'], self.example['text_loss_mask']

  @property
  def has_audio(self) -> bool:
    return bool(self.example['audio_mask'][0])


def _request(task: Task, path: str, start: Optional[float], end: Optional[float],
             question: Optional[str]) -> tuple[dict[str, Any], ml_collections.ConfigDict, media.MediaInfo]:
  """(the record {'id', 'video_path', 'start', 'end'[, 'question']}, the task's config.data as the decoder reads
  it, the file's header), the clip bounds checked against the file and config.data.max_clip_seconds."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise AnswerError(f'{path}: no such file')
  data = ml_collections.ConfigDict(task.data.to_dict())
  data.require_target = False  # the record has no answer: the text is tokenised by _prompt_tokens
  limits = media.MediaLimits.from_config(data)
  try:
    info = media.probe(path, limits)
  except media.MediaError as e:
    raise AnswerError(str(e)) from None
  start = 0.0 if start is None else float(start)
  end = info.duration if end is None else min(float(end), info.duration)
  if not 0.0 <= start < end:
    raise AnswerError(f'{path}: no clip [{start:.2f}, {end:.2f}] s in a file of {info.duration:.2f} s')
  if limits.max_clip_seconds and end - start > limits.max_clip_seconds:
    raise AnswerError(f'{path}: a clip of {end - start:.1f} s, over config.data.max_clip_seconds='
                      f'{limits.max_clip_seconds:g}: choose a part with --start and --end')
  record = {'id': os.path.basename(path), 'video_path': path, 'start': start, 'end': end}
  if question:
    record['question'] = question
  return record, data, info


def _prompt_tokens(config, task: Task, record: Mapping[str, Any], processor) -> tuple[str, np.ndarray, np.ndarray]:
  """(the prompt, its tokens, their loss mask), as evaluation tokenises the record with an empty target (what
  `decoding` reads of the text is the prompt: BOS and the prompt's tokens, cut as encode_example cuts them)."""
  prompt = tasks_lib.prompt(record, task.prompt)
  processor = processor or pipeline.load_tokenizer(config.data, config.model)
  tokens, loss_mask = tokenizer_lib.encode_example(processor, prompt, '', config.model.max_text_len)
  return prompt, tokens, loss_mask


def read_clip(config, task: Task, path: str, start: Optional[float] = None, end: Optional[float] = None,
              question: Optional[str] = None, processor=None) -> Clip:
  """The record {'video_path', 'start', 'end', 'question'} decoded whole by the evaluation pipeline's DecodeExample
  (train=False) and prompted by the task's template, its target left empty."""
  record, data, _ = _request(task, path, start, end, question)
  decoder = pipeline.DecodeExample(config.model, data, train=False)
  example = decoder.decode(record, None)
  if example['skipped']:
    reason = list(pipeline.SKIP_REASONS)[int(example['skip_reason']) - 1]
    raise AnswerError(f'{record["video_path"]}: {pipeline.SKIP_REASONS[reason]} (see the warning above)')
  prompt, example['text_tokens'], example['text_loss_mask'] = _prompt_tokens(config, task, record, processor)
  example = {k: v[None] for k, v in pipeline.model_inputs(example).items()}
  bounds = media.chunk_bounds(record['start'], record['end'], config.model.num_chunks)
  return Clip(example, record, prompt, bounds)


# The live reader. Two open files, one per stream, each read forward from where evaluation's decoding of the whole
# clip starts it (MediaFile.frames_of_size, MediaFile.audio): each decoder sees the packets that decoding sees, in
# the same order, so the frames and samples are the same; only the reading stops at the end of each chunk and goes
# on from there for the next.


class _FramePlayer(media.MediaFile):
  """The frames shown at ascending times, decoded forward from the key frame at or before the first time, never
  going back: what MediaFile.frames_of_size(times, size, crop) gives, time by time, as a player shows them.

  The frame shown at time s is the last frame whose timestamp is <= s (the first frame for times before it), which
  is known once the first frame after s has been decoded: that frame is held for the next times, so each frame of
  the file is decoded once and at most one frame past the last time asked for has been decoded. Decoder threads
  are slice threads (frame threads would hold frames back and read packets ahead). config.data.decode_timeout_s
  bounds each call (each chunk), not the whole stream.
  """

  def __init__(self, source: str, limits: media.MediaLimits, options: media.DecodeOptions, first: float,
               short_side: int, crop_size: tuple[int, int]):
    super().__init__(source, limits, options)
    try:
      self._stream = self._container.streams.video[0]
      self._codec = self._stream.codec_context
      self._stream.thread_type = 'SLICE' if options.thread_count != 1 else 'NONE'
      self._codec.thread_count = options.thread_count
      if limits.max_frame_pixels:  # the decoder refuses larger frames, however late they come
        self._codec.options = {'max_pixels': str(limits.max_frame_pixels)}
      self._size = media.resize_shape(self.info.width, self.info.height, short_side)
      height, width = crop_size
      self._crop = ((self._size[1] - height) // 2, (self._size[0] - width) // 2, height, width)  # evaluation's centre
      base = self._stream.time_base
      self._num, self._den = base.numerator, base.denominator
      self._first = max(float(first), 0.0)
      self._frames: Optional[Iterator] = None  # decoded frames in presentation order, from the first seek on
      self._shown = self._shown_rgb = None  # the frame on screen at the last time asked for, its pixels
      self._upcoming: Optional[tuple[Any, float]] = None  # the first frame decoded after it, and its time
      self._ended = False
      self.last_time = -np.inf  # the timestamp of the last frame decoded (seconds)
    except BaseException:
      self.close()
      raise

  def _seconds(self, timestamp: Optional[int]) -> float:
    # As media.py times frames (PyAV's frame.time), so that comparisons with the sample times agree.
    return 0.0 if timestamp is None else float(timestamp) * self._num / self._den

  def _packets(self) -> Iterator:
    """The stream's packets from the demuxer's position, empty ones left out (one would end the decoder's stream)."""
    for packet in self._container.demux(self._stream):
      if packet.size == 0:
        if packet.pts is None and packet.dts is None:
          return  # the end of the stream
        continue
      yield packet

  def _position(self) -> Iterator:
    """The packets from the key frame at or before the first time: seek there, and to earlier key frames while the
    index lands after it (as media.py positions the decoding of the whole clip)."""
    target = int(self._first / self._stream.time_base)
    entries = self._stream.index_entries
    packets = iter(())
    for _ in range(4):
      self._container.seek(target, stream=self._stream, backward=True, any_frame=False)
      packets = self._packets()
      head = next(packets, None)
      if head is None:
        return iter(())
      packets = itertools.chain([head], packets)
      where = head.dts if head.dts is not None else head.pts
      at_start = where is not None and len(entries) > 0 and where <= entries[0].timestamp
      if (not head.is_keyframe or head.pts is None or self._seconds(head.pts) <= self._first or at_start):
        return packets
      target = where - 1  # the key frame before this one
    return packets

  def _decoded(self) -> Iterator:
    for packet in self._position():
      self._check_time()
      yield from self._codec.decode(packet)
    if self._codec.is_open:
      yield from self._codec.decode(None)  # the frames still in the decoder

  def _next_frame(self) -> Optional[tuple[Any, float]]:
    if self._frames is None:
      self._frames = self._decoded()
    frame = next(self._frames, None)
    self._check_time()
    if frame is None:
      self._ended = True
      return None
    self.frames_decoded += 1
    seconds = self._seconds(frame.pts)
    self.last_time = max(self.last_time, seconds)
    return frame, seconds

  def next_frames(self, times: np.ndarray) -> np.ndarray:
    """uint8 [n, height, width, 3]: the frames shown at `times` (ascending, after those of the calls before)."""
    timeout = self._limits.decode_timeout_s
    self._deadline = None if timeout is None else time.monotonic() + timeout
    top, left, height, width = self._crop
    out = np.empty((len(times), height, width, 3), np.uint8)
    try:
      for i, seconds in enumerate(np.asarray(times, np.float64).tolist()):
        while True:  # bring on screen every frame due by `seconds`
          if self._upcoming is None and not self._ended:
            self._upcoming = self._next_frame()
          if self._upcoming is None:
            break  # past the last frame: the last frame stays on screen
          frame, shown_from = self._upcoming
          if self._shown is not None and shown_from > seconds:
            break
          self._shown, self._shown_rgb, self._upcoming = frame, None, None
        if self._shown is None:
          raise media.MediaError(f'{self._source}: no decodable video frame after {self._first:.3f}s')
        if self._shown_rgb is None:
          rgb = media._to_rgb(self._reformatter, self._shown, self._size)  # pylint: disable=protected-access
          self._shown_rgb = rgb[top:top + height, left:left + width]
        out[i] = self._shown_rgb
    except (av.FFmpegError, ArithmeticError, ValueError) as e:  # damaged timestamps and sizes included
      raise self._failed('video decoding', e) from e
    return out


class _AudioPlayer(media.MediaFile):
  """The samples of [start, end] resampled to `sample_rate` mono, delivered in order up to a given sample: what
  MediaFile.audio(start, end, sample_rate) gives, decoded forward from the same point (0.5 s before start) and
  stopped as soon as the samples asked for are placed; the rest of the last frame decoded is held for the next
  call. Time without audio is silence; the deadline of decode_timeout_s bounds each call."""

  def __init__(self, source: str, limits: media.MediaLimits, start: float, end: float, sample_rate: int):
    super().__init__(source, limits)
    try:
      self._check_span(start, end)
      stream = self._container.streams.audio[0]
      if not stream.time_base or stream.codec_context is None:
        raise media.MediaError(f'{source}: the audio stream has no time base or no decoder')
      self._start, self._rate = start, sample_rate
      self.num_samples = int(round((end - start) * sample_rate))
      self._resampler = av.AudioResampler(format='flt', layout='mono', rate=sample_rate)
      self._container.seek(int(max(start - 0.5, 0.0) / stream.time_base), stream=stream, backward=True)
      self._frames = self._container.decode(stream)
      self._held: list[tuple[int, np.ndarray]] = []  # (first sample, samples) of frames past what was delivered
      self.delivered = 0  # samples delivered so far
      self._reach = 0  # the end of the furthest frame placed
      self._done = False  # the whole clip's decoding stops here: a frame reached the clip's end, or the stream ended
      self.last_time = -np.inf  # the end of the last frame decoded, in seconds of the file
    except (av.FFmpegError, ArithmeticError, ValueError, TypeError) as e:
      self.close()
      raise self._failed('audio decoding', e) from e
    except BaseException:
      self.close()
      raise

  def _place(self, out: np.ndarray, first: int, samples: np.ndarray, until: int) -> None:
    lo, hi = max(first, self.delivered), min(first + len(samples), until)
    if hi > lo:
      out[lo - self.delivered:hi - self.delivered] = samples[lo - first:hi - first]
    if first + len(samples) > until:
      self._held.append((first, samples))

  def next_samples(self, until: int) -> np.ndarray:
    """float32 [until - delivered]: the samples after those delivered, up to `until` (at most num_samples)."""
    until = min(until, self.num_samples)
    timeout = self._limits.decode_timeout_s
    self._deadline = None if timeout is None else time.monotonic() + timeout
    out = np.zeros(max(until - self.delivered, 0), np.float32)
    held, self._held = self._held, []
    for first, samples in held:
      self._place(out, first, samples, until)
    try:
      while not self._done and self._reach < until:
        frame = next(self._frames, None)
        self._check_time()
        if frame is None:
          self._done = True
          break
        done = False
        for resampled in self._resampler.resample(frame):
          samples = resampled.to_ndarray().reshape(-1)
          first = int(round(((resampled.time or 0.0) - self._start) * self._rate))
          self._place(out, first, samples, until)
          self._reach = max(self._reach, first + len(samples))
          self.last_time = max(self.last_time, self._start + (first + len(samples)) / self._rate)
          done = first + len(samples) >= self.num_samples
        self._done = done
    except (av.FFmpegError, ArithmeticError, ValueError, TypeError) as e:
      raise self._failed('audio decoding', e) from e
    self.delivered = max(until, self.delivered)
    return out


class ChunkReader:
  """A clip read from its file chunk by chunk, as a player reaches each chunk: `read()` decodes the next chunk's
  frames and audio and returns its model inputs, those of evaluation's decoding of the whole clip.

  Frames: the whole clip's sample times (media.segment_times over [start, end]) restricted to the chunk, with
  evaluation's resize and centre crop: the same arrays as read_clip's chunk. Each frame of the file is decoded
  once; nothing past the first frame after the chunk's last sample time (whose timestamp ends the display of the
  one before) has been decoded when the chunk is returned. Audio: the chunk's samples, decoded forward (at most
  one audio frame past the chunk's end), and its log-mel from what has been heard so far (audio.LogMelStream): the
  whole clip's wherever the chunk's spectrogram windows were wholly heard and the loudest frame so far is the
  clip's loudest.
  Each chunk costs its own span: constant work per chunk, whatever its position in the clip.
  """

  def __init__(self, config, data: Mapping[str, Any], path: str, start: float, end: float, has_audio: bool):
    m = config.model
    self.num_chunks, num_frames = int(m.num_chunks), int(m.num_frames)
    self.chunk_bounds = media.chunk_bounds(start, end, self.num_chunks)
    self._times = media.segment_times(start, end, num_frames).reshape(self.num_chunks, -1)
    limits = media.MediaLimits.from_config(data)
    height, width = m.image_size
    sample_rate = data.get('sample_rate', 16_000)
    self._mel_bins, self._audio_frames = int(m.mel_bins), int(m.audio_frames_per_chunk)
    self.chunk = 0  # chunks read so far
    self._audio = self._mel = None
    self._video = _FramePlayer(path, limits, media.DecodeOptions.from_config(data), self._times[0, 0],
                               max(height, width), (height, width))
    try:
      if has_audio:
        self._audio = _AudioPlayer(path, limits, start, end, sample_rate)
        bounds = [(a - start, b - start) for a, b in self.chunk_bounds]  # as the pipeline gives chunk_log_mel
        self._mel = audio_lib.LogMelStream(self._audio.num_samples, bounds, self._audio_frames, sample_rate,
                                           data.get('window_ms', 25.0), data.get('hop_ms', 10.0), self._mel_bins)
    except BaseException:
      self.close()
      raise

  def __enter__(self) -> 'ChunkReader':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    for player in (self._video, self._audio):
      if player is not None:
        player.close()

  @property
  def video_frames_decoded(self) -> int:
    return self._video.frames_decoded

  @property
  def video_time(self) -> float:
    """The timestamp of the last video frame decoded, in seconds of the file."""
    return self._video.last_time

  @property
  def audio_time(self) -> float:
    """The end of the last audio decoded, in seconds of the file (-inf without audio)."""
    return -np.inf if self._audio is None else self._audio.last_time

  @property
  def audio_tail_samples(self) -> int:
    """Samples of earlier chunks kept for the next chunk's first spectrogram windows."""
    return 0 if self._mel is None else self._mel.tail_samples

  def read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The next chunk's (video [1, k, H, W, 3] uint8, audio [1, F, M] float32 log-mel, audio_mask [1] bool)."""
    t = self.chunk
    if t >= self.num_chunks:
      raise ValueError(f'the clip has {self.num_chunks} chunks, all read')
    video = self._video.next_frames(self._times[t])
    if self._mel is None:
      audio = np.full((self._audio_frames, self._mel_bins), audio_lib.SILENCE_DB, np.float32)
    else:
      _, until = self._mel.chunk_samples(t)
      audio = self._mel.push(self._audio.next_samples(until))
    self.chunk += 1
    return video[None], audio[None], np.array([self._mel is not None])


@dataclasses.dataclass
class LiveClip:
  """A clip to stream from its file: its prompt and bounds, and `reader()` for its chunks, decoded as they come."""
  record: dict[str, Any]
  prompt: str
  chunk_bounds: list[tuple[float, float]]
  text: tuple[np.ndarray, np.ndarray]  # (text_tokens [1, L], text_loss_mask [1, L])
  has_audio: bool
  reader: Callable[[], ChunkReader]

  @property
  def start(self) -> float:
    return self.chunk_bounds[0][0]

  @property
  def end(self) -> float:
    return self.chunk_bounds[-1][1]


def open_clip(config, task: Task, path: str, start: Optional[float] = None, end: Optional[float] = None,
              question: Optional[str] = None, processor=None) -> LiveClip:
  """The record of read_clip, checked against the file's header and prompted alike, with nothing decoded yet: its
  reader() decodes the chunks one at a time."""
  record, data, info = _request(task, path, start, end, question)
  prompt, tokens, loss_mask = _prompt_tokens(config, task, record, processor)
  bounds = media.chunk_bounds(record['start'], record['end'], config.model.num_chunks)

  def reader() -> ChunkReader:
    try:
      return ChunkReader(config, data, record['video_path'], record['start'], record['end'], info.has_audio)
    except media.MediaError as e:
      raise AnswerError(str(e)) from None

  return LiveClip(record, prompt, bounds, (tokens[None], loss_mask[None]), info.has_audio, reader)


# ---------------------------------------------------------------------------------------------------------------
# Generation and its score.


@dataclasses.dataclass(frozen=True)
class Reply:
  text: str
  log_prob: float  # the total over its tokens and its EOS
  tokens: int  # how many were scored: the answer's tokens and its EOS (when it ended within max_new_tokens)

  @property
  def mean_log_prob(self) -> float:
    return self.log_prob / max(self.tokens, 1)

  @property
  def probability(self) -> float:
    return float(np.exp(self.log_prob))


def generated_log_probs(model, variables, latents: Array, text_tokens: Array, text_loss_mask: Array,
                        generated: Array, eos_id: int = tokenizer_lib.EOS_ID) -> tuple[Array, Array]:
  """Teacher-forced log-probabilities [B, N] of generated tokens [B, N] written after each prompt, and the mask
  [B, N] of those that count: up to and including the first EOS, inside the text buffer (decoding emits padding
  after them)."""
  batch, length = text_tokens.shape
  prompt_len = decoding.prompt_lengths(text_loss_mask)
  is_eos = generated == eos_id
  emitted = (jnp.cumsum(is_eos, axis=1) - is_eos) == 0
  positions = prompt_len[:, None] + jnp.arange(generated.shape[1])[None, :]
  emitted &= positions < length
  rows = jnp.arange(batch)[:, None]
  tokens = decoding.prompt_only(text_tokens, prompt_len).at[rows, positions].set(
      jnp.where(emitted, generated, tokenizer_lib.PAD_ID), mode='drop')
  # [B, L - 1]: entry p - 1 is the log-probability of the token at p (the candidates' scoring, K = 1 text each).
  log_probs = scoring.token_log_probs(model, variables, latents, tokens[:, None])[:, 0]
  picked = jnp.take_along_axis(log_probs, jnp.clip(positions - 1, 0, length - 2), axis=1)
  return jnp.where(emitted, picked, 0.0), emitted


def respond(model, settings: Mapping[str, Any], params, text_tokens: Array, text_loss_mask: Array,
            latents: Array, chunks: Optional[int] = None) -> tuple[Array, Array, Array]:
  """Generation (greedy_decode, or beam_decode with settings['beam_size'] > 1) over the latents of the first
  `chunks` chunks (all by default) -> (tokens [B, N], their log-probabilities [B, N], mask [B, N])."""
  variables = {'params': params}
  latents = latents if chunks is None else latents[:, :chunks]
  text = {'text_tokens': text_tokens, 'text_loss_mask': text_loss_mask}
  n, eos = settings['max_new_tokens'], tokenizer_lib.EOS_ID
  if settings['beam_size'] > 1:
    tokens = decoding.beam_decode(model, variables, text, n, eos, beam_size=settings['beam_size'],
                                  length_penalty=settings['length_penalty'], latents=latents)[0]
  else:
    tokens = decoding.greedy_decode(model, variables, text, n, eos, latents=latents)
  log_probs, mask = generated_log_probs(model, variables, latents, text_tokens, text_loss_mask, tokens, eos)
  return tokens, log_probs, mask


# Compiled programs, kept for the life of the process under what they depend on (the model's config, the decoding
# settings, the program): answering another file, or with another checkpoint of the same run, compiles nothing.
_PROGRAMS: dict[tuple, Callable] = {}


class Answerer:
  """A run's model and parameters with programs compiled for one example (B = 1) of its geometry: encode the whole
  clip, step one chunk, respond over the latents of the first t chunks."""

  def __init__(self, config, params, processor, settings: Mapping[str, Any]):
    self.config, self.params, self.processor = config, params, processor
    self.settings = dict(settings)
    self.model = mirasol.Model(**config.model)
    self.num_chunks = int(config.model.num_chunks)
    self._shapes = {k: jax.ShapeDtypeStruct(shape, dtype)
                    for k, (shape, dtype) in mirasol.batch_shapes(config.model, 1).items()}
    self._key = (json.dumps(config.model.to_dict(), sort_keys=True, default=str),
                 tuple(sorted(self.settings.items())))

  # -- compiling ahead of time, so that the timed calls run compiled code ---------------------------------------

  def _program(self, build: Callable[[], Callable], *name) -> Callable:
    key = (*self._key, *name)
    if key not in _PROGRAMS:
      _PROGRAMS[key] = build()
      host_memory.release()  # what the compiler freed (host_memory)
    return _PROGRAMS[key]

  def _latent_shape(self) -> jax.ShapeDtypeStruct:
    m = self.model
    return jax.ShapeDtypeStruct((1, m.num_chunks, m.tokens_per_chunk, m.width), jnp.dtype(m.dtype))

  def respond_program(self, chunks: int) -> Callable:
    """(params, text_tokens, text_loss_mask, latents [1, T, m, D]) -> respond over the first `chunks` chunks."""
    def build():
      fn = jax.jit(functools.partial(respond, self.model, self.settings), static_argnames=('chunks',))
      return fn.lower(self.params, self._shapes['text_tokens'], self._shapes['text_loss_mask'], self._latent_shape(),
                      chunks=chunks).compile()
    return self._program(build, 'respond', chunks)

  def encode_program(self) -> Callable:
    """(params, batch) -> the AV latents [1, T, m, D] of the whole clip."""
    def build():
      encode = lambda params, batch: self.model.apply({'params': params}, batch, method=mirasol.Model.encode_av)[1]
      return jax.jit(encode).lower(self.params, self._shapes).compile()
    return self._program(build, 'encode')

  def step_program(self) -> Callable:
    """(params, video chunk [1, k, H, W, 3], audio chunk [1, F, M], audio_mask [1], state, latents [1, T, m, D])
    -> (state, latents with this chunk's written at its index)."""
    if not self.model.av.get('block_causal', True):
      raise AnswerError('--stream needs a block-causal AV Transformer: this run has model.av.block_causal=False, so '
                        'every chunk\'s latents depend on later chunks')
    model = self.model

    def step(params, video_chunk, audio_chunk, audio_mask, state, latents):
      h_t, new_state = model.apply({'params': params}, video_chunk, audio_chunk, audio_mask, state,
                                   method=mirasol.Model.stream_step)
      latents = jax.lax.dynamic_update_slice_in_dim(latents, h_t[:, None].astype(latents.dtype), state['chunk'],
                                                    axis=1)
      return new_state, latents

    def build():
      video, audio = self._shapes['video'], self._shapes['audio']
      state = jax.eval_shape(lambda: model.apply({'params': self.params}, 1, method=mirasol.Model.stream_init))
      chunk = (jax.ShapeDtypeStruct(video.shape[:1] + video.shape[2:], video.dtype),
               jax.ShapeDtypeStruct(audio.shape[:1] + audio.shape[2:], audio.dtype), self._shapes['audio_mask'])
      return jax.jit(step).lower(self.params, *chunk, state, self._latent_shape()).compile()
    return self._program(build, 'step')

  def prepare(self, clip, stream: bool) -> float:
    """Compiles what answering `clip` (a Clip, or with `stream` a LiveClip) runs (with `stream`, the chunk step and
    the answer over each number of chunks) and runs each program once, on a blank chunk or the whole clip: the
    first run of a compiled program costs more than the next (about 100 ms on CPU), and the times printed are of
    the next. Nothing of the file is read. Returns the seconds it took."""
    start = time.perf_counter()
    text = (self.params, *clip.text)
    if stream:
      state, latents = self._stream_start()
      state, latents = self.step_program()(self.params, *self._blank_chunk(), state, latents)
      for t in range(1, self.num_chunks + 1):
        jax.block_until_ready(self.respond_program(t)(*text, latents))
    else:
      latents = self.encode_program()(self.params, clip.example)
      jax.block_until_ready(self.respond_program(self.num_chunks)(*text, latents))
    return time.perf_counter() - start

  def _blank_chunk(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A chunk of the model's shapes (black frames, no audio), to run the chunk step once before a clip's."""
    video, audio = self._shapes['video'], self._shapes['audio']
    return (np.zeros(video.shape[:1] + video.shape[2:], video.dtype),
            np.full(audio.shape[:1] + audio.shape[2:], audio_lib.SILENCE_DB, audio.dtype),
            np.zeros(self._shapes['audio_mask'].shape, self._shapes['audio_mask'].dtype))

  # -- running --------------------------------------------------------------------------------------------------

  def _reply(self, outputs) -> Reply:
    tokens, log_probs, mask = jax.device_get(outputs)
    return Reply(tokenizer_lib.decode(self.processor, tokens[0]), float(np.sum(log_probs[0])), int(np.sum(mask[0])))

  def encode(self, clip: Clip) -> Array:
    """The whole clip's AV latents [1, T, m, D] (Model.encode_av, as evaluation computes them)."""
    return self.encode_program()(self.params, clip.example)

  def answer(self, clip: Clip, latents: Optional[Array] = None, chunks: Optional[int] = None) -> Reply:
    """The reply to the clip's prompt from `latents` (default: the whole clip's) of its first `chunks` chunks."""
    latents = self.encode(clip) if latents is None else latents
    chunks = chunks or self.num_chunks
    example = clip.example
    return self._reply(self.respond_program(chunks)(self.params, example['text_tokens'], example['text_loss_mask'],
                                                    latents))

  def _stream_start(self) -> tuple[Any, Array]:
    """The state before the first chunk, and the latents buffer [1, T, m, D] the chunk steps fill."""
    state = self.model.apply({'params': self.params}, 1, method=mirasol.Model.stream_init)
    shape = self._latent_shape()
    return state, jnp.zeros(shape.shape, shape.dtype)

  @staticmethod
  def _chunk(clip: Clip, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    example = clip.example
    return example['video'][:, t], example['audio'][:, t], example['audio_mask']

  def _steps(self, text: tuple[np.ndarray, np.ndarray], next_chunk: Callable[[int], tuple[np.ndarray, ...]]
             ) -> Iterator[tuple[int, Reply, float, float, float]]:
    """For t = 1..T: next_chunk(t - 1) -> the chunk step -> the reply given chunks 1..t; yields (t, reply, seconds
    of next_chunk, of the chunk step, of the reply)."""
    step = self.step_program()
    text = (self.params, *text)
    state, latents = self._stream_start()
    for t in range(self.num_chunks):
      started = time.perf_counter()
      chunk = next_chunk(t)
      read = time.perf_counter()
      state, latents = step(self.params, *chunk, state, latents)
      jax.block_until_ready(latents)
      encoded = time.perf_counter()
      reply = self._reply(self.respond_program(t + 1)(*text, latents))
      yield t + 1, reply, read - started, encoded - read, time.perf_counter() - encoded

  def stream(self, clip: Clip) -> Iterator[tuple[int, Reply, float, float]]:
    """Feeds a decoded clip's chunks one at a time; yields after each (t, the reply given chunks 1..t, seconds of
    the chunk step, seconds of the reply)."""
    for t, reply, _, step_s, reply_s in self._steps(clip.text, lambda t: self._chunk(clip, t)):
      yield t, reply, step_s, reply_s

  def play(self, clip: LiveClip) -> Iterator[tuple[int, Reply, float, float, float]]:
    """Reads the clip from its file chunk by chunk (ChunkReader: chunk t is decoded when the stream reaches it) and
    feeds each chunk to the model as it comes; yields after each (t, the reply given chunks 1..t, seconds of
    decoding the chunk, of the chunk step, of the reply)."""
    with clip.reader() as reader:
      def next_chunk(t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        try:
          return reader.read()
        except media.MediaError as e:
          raise AnswerError(f'chunk {t + 1}: {e}') from None
      yield from self._steps(clip.text, next_chunk)


# ---------------------------------------------------------------------------------------------------------------
# The command.


def format_reply(reply: Reply) -> str:
  """'left  (log-prob -0.031 per token, p=0.94)'; p is the probability of the whole answer, its EOS included."""
  return f'{reply.text}  (log-prob {reply.mean_log_prob:.3f} per token, p={reply.probability:.2f})'


def run(workdir: str, video: str, question: Optional[str] = None, start: Optional[float] = None,
        end: Optional[float] = None, stream: bool = False, step: Optional[int] = None, beam: Optional[int] = None,
        max_new_tokens: Optional[int] = None, task: Optional[str] = None,
        config: Optional[ml_collections.ConfigDict] = None, out: Callable[[str], None] = print
        ) -> list[Reply]:
  """The `answer` command: prints the reply to `question` about `video` [start, end] (a caption without a
  question), or with `stream` the reply after each chunk with its time; returns the replies (one, or one a chunk).
  """
  if not paths.isdir(workdir):
    raise AnswerError(f'{workdir}: no such workdir')
  config = load_config(workdir, config)
  chosen = choose_task(config.data, question, task)
  settings = decode_settings(config, chosen, beam, max_new_tokens)
  processor = pipeline.load_tokenizer(config.data, config.model)
  if stream:
    clip = open_clip(config, chosen, video, start, end, question, processor)
  else:
    clip = read_clip(config, chosen, video, start, end, question, processor)
  step, params = restore_params(config, workdir, step)
  answerer = Answerer(config, params, processor, settings)
  m = config.model
  how = 'greedy' if settings['beam_size'] == 1 else f'beam search ({settings["beam_size"]} beams)'
  out(f'{workdir}/checkpoints/{step}, task {_describe(chosen.name, chosen.data)}, {how}')
  out(f'clip {clip.record["id"]} {clip.start:.2f}-{clip.end:.2f} s: {m.num_chunks} chunks of '
      f'{(clip.end - clip.start) / m.num_chunks:.2f} s, {m.num_frames // m.num_chunks} frames each, '
      f'{"with" if clip.has_audio else "without"} audio')
  if clip.prompt:
    out(f'prompt: {clip.prompt!r}')
  label = chosen.kind
  compile_s = answerer.prepare(clip, stream)
  if not stream:
    started = time.perf_counter()
    latents = jax.block_until_ready(answerer.encode(clip))
    encoded = time.perf_counter()
    reply = answerer.answer(clip, latents)
    done = time.perf_counter()
    out(f'{label}: {format_reply(reply)}')
    out(f'{1e3 * (done - started):.1f} ms: encode {1e3 * (encoded - started):.1f} + {label} '
        f'{1e3 * (done - encoded):.1f} (compiled and run once before, in {compile_s:.1f} s)')
    return [reply]
  out(f'streaming from the file: the chunk step and the {label} over 1 to {m.num_chunks} chunks compiled and run '
      f'once, in {compile_s:.1f} s; per chunk, the time decoding it, then the model\'s (step + {label})')
  replies = []
  for t, reply, decode_s, step_s, reply_s in answerer.play(clip):
    replies.append(reply)
    out(f'chunk {t}/{m.num_chunks}  {clip.start:.2f}-{clip.chunk_bounds[t - 1][1]:.2f} s  decode '
        f'{1e3 * decode_s:5.1f} ms  {1e3 * (step_s + reply_s):5.1f} ms (step {1e3 * step_s:.1f} + {label} '
        f'{1e3 * reply_s:.1f})  {label}: {format_reply(reply)}')
  return replies
