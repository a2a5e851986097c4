"""The grain input pipeline: raw records -> decoded, chunked, tokenised batches for the model, per process.

  source (jsonl | array_record | tfds) -> GlobalBatchSlices (seeded shuffle, repeat, this process's slice of
    every global batch)
    -> DecodeExample in `config.data.num_workers` worker processes (PyAV frames + log-mel + SentencePiece)
    -> Batch (config.batch_size / process_count examples)

`build(config, split, process_index, process_count)` returns a grain iterator with `get_state()` / `set_state()`
that resumes exactly. Training repeats forever with a reshuffle every epoch; evaluation reads each example once,
in order, and pads the last batch with `example_mask=False`.

An example that cannot be read (missing or corrupt file, `start` past the end, a bad jsonl line, a field of the wrong
type, media outside the dataset folder, a file over a limit of config.data) is logged with its file and reason and
kept in place as a masked example (`example_mask=False`, `skipped=True`, `skip_reason` its code in SKIP_REASONS): it
adds nothing to any loss or metric, nothing else moves, and the run goes on. No error of one record escapes
DecodeExample.decode; only errors of the config do (a tokenizer that cannot be loaded). The reason codes travel
in the batch, so the main process sees them whatever the number of grain workers; in training, BatchIterator stops
the run when too many recent examples were skipped (SkipBudget, config.data.max_skipped_fraction), naming the most
common reasons: a dataset whose files are all missing would otherwise train on masked batches with a loss of 0.
"""
from __future__ import annotations

import collections
import json
import logging
import bisect
import fractions
import math
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import grain
import jax
import numpy as np

from mirasol_jax import preemption
from mirasol_jax.data import audio as audio_lib
from mirasol_jax.data import media
from mirasol_jax.data import sources
from mirasol_jax.data import tasks as tasks_lib
from mirasol_jax.data import tokenizer as tokenizer_lib

# Keys of a pipeline batch beyond the model's (mirasol.example_batch): the record's position in its source, whether
# it was skipped, and why (a code of SKIP_REASONS; 0 for an example that was read).
EXTRA_KEYS = ('index', 'skipped', 'skip_reason')

# Why an example was skipped: the kinds of sources' error records (`error_kind`) and of media.MediaError (`reason`).
# An example's `skip_reason` is 1 + the position of its kind here.
SKIP_REASONS = {
    'bad_record': 'the record itself is unusable (bad JSON or bytes, a missing or wrongly typed field)',
    'outside_dataset': 'its media resolve outside the dataset folder (config.data.allow_outside_media)',
    'missing_file': 'its media file does not exist',
    'not_regular_file': 'its media path is a folder, a named pipe or a device',
    'unreadable_file': 'its media file cannot be opened',
    'undecodable': 'its media cannot be decoded (corrupt, truncated, no video stream)',
    'clip_bounds': 'start / end make no clip of the file (negative, past its end, end before start)',
    'too_long': 'the clip is longer than config.data.max_clip_seconds',
    'too_large': 'the frames are over config.data.max_frame_pixels or max_aspect_ratio (or the file over '
                 'max_media_bytes when converted)',
    'timeout': 'decoding took longer than config.data.decode_timeout_s',
    'no_target': 'no target text while config.data.require_target',
    'unexpected': 'an unexpected error (its traceback is logged)',
}
SKIP_CODES = {name: code for code, name in enumerate(SKIP_REASONS, start=1)}


class RecordError(ValueError):
  """A record that cannot become an example; `reason` is one of SKIP_REASONS."""

  def __init__(self, message: str, reason: str = 'bad_record'):
    super().__init__(message)
    self.reason = reason


def _number(record: Mapping[str, Any], name: str) -> Optional[float]:
  """A clip bound of a record in seconds, or None; sources check types, this checks again for any other caller."""
  value = record.get(name)
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise RecordError(f'{record.get("id")}: "{name}" must be a number of seconds, not {value!r:.40}')
  try:
    value = float(value)
  except OverflowError:
    value = math.inf
  if not math.isfinite(value):
    raise RecordError(f'{record.get("id")}: "{name}" must be a finite number of seconds, not {value}')
  return value


class _ConfigError(Exception):
  """Carries (as its cause) an error of the config met while decoding a record, past the per-record guard."""


class DecodeExample(grain.transforms.RandomMap):
  """Record -> one example of a model batch (no batch axis). Random crop, frame jitter (and flip) in training."""

  def __init__(self, model_config: Mapping[str, Any], data_config: Mapping[str, Any], train: bool,
               task_configs: Optional[Sequence[Mapping[str, Any]]] = None):
    """task_configs: the prompt and target of each task of a mixture (a record's `_task` indexes them); by default
    data_config's."""
    self._model = dict(model_config)
    self._data = dict(data_config)
    self._tasks = [{'prompt': t.get('prompt', ''), 'target': t.get('target', ''),
                    'reference': t.get('reference', 'random')} for t in (task_configs or [data_config])]
    self._train = train
    self._limits = media.MediaLimits.from_config(data_config)
    self._decode_options = media.DecodeOptions.from_config(data_config)
    self._tokenizer = None  # loaded lazily, in the worker process
    self.frames_decoded = 0  # video frames decoded by this copy (each worker process has its own)

  def blank_example(self) -> dict[str, np.ndarray]:
    """A masked example of the config's shapes: what a skipped example becomes."""
    example = self._blank()
    example['index'] = np.array(-1, np.int64)
    return example

  def _blank(self) -> dict[str, np.ndarray]:
    m = self._model
    t, k = m['num_chunks'], m['num_frames'] // m['num_chunks']
    return {
        'video': np.zeros((t, k, *m['image_size'], 3), np.uint8),
        'audio': np.full((t, m['audio_frames_per_chunk'], m['mel_bins']), audio_lib.SILENCE_DB, np.float32),
        'audio_mask': np.array(False),
        'text_tokens': np.zeros(m['max_text_len'], np.int32),
        'text_loss_mask': np.zeros(m['max_text_len'], bool),
        'example_mask': np.array(False),
        'skipped': np.array(False),
        'skip_reason': np.array(0, np.int8),
    }

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    return self.decode(record, rng if self._train else None)

  def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    return self.decode(record, None)

  def decode(self, record: Mapping[str, Any], rng: Optional[np.random.Generator]) -> dict[str, np.ndarray]:
    """The example of a record, or a blank one with its skip reason: no error of the record escapes (an unforeseen
    one is logged with its traceback as 'unexpected'), so one bad record costs one example, never the run."""
    index = record.get('_index', -1) if isinstance(record, Mapping) else -1
    index = index if isinstance(index, int) else -1
    try:
      example = self._decode(record, rng)
    except _ConfigError as e:
      raise e.__cause__ from None  # the config's error, not the record's: it ends the run
    except (media.MediaError, RecordError) as e:
      logging.warning('skipping example %s (record %d): %s', _name(record), index, e)
      example = self._skipped(e.reason)
    except Exception as e:  # pylint: disable=broad-except
      logging.exception('skipping example %s (record %d): unexpected %s: %s', _name(record), index,
                        type(e).__name__, e)
      example = self._skipped('unexpected')
    example['index'] = np.array(index, np.int64)
    return example

  def _skipped(self, reason: str) -> dict[str, np.ndarray]:
    example = self._blank()
    example['skipped'] = np.array(True)
    example['skip_reason'] = np.array(SKIP_CODES.get(reason, SKIP_CODES['unexpected']), np.int8)
    return example

  def _decode(self, record: Mapping[str, Any], rng: Optional[np.random.Generator]) -> dict[str, np.ndarray]:
    if not isinstance(record, Mapping):
      raise RecordError(f'a record must be a map, not {type(record).__name__}')
    if 'error' in record:
      raise RecordError(str(record['error']), str(record.get('error_kind') or 'bad_record'))
    source = record['video_bytes'] if 'video_bytes' in record else record.get('video_path')
    if not isinstance(source, (bytes, str)):
      raise RecordError(f'{record.get("id")}: no media (a video_path or video_bytes)')
    start, end = _number(record, 'start'), _number(record, 'end')
    start = start or 0.0
    if start < 0:
      raise RecordError(f'{_name(record)}: start {start:.2f}s is negative', 'clip_bounds')
    if end is not None and end <= start:
      raise RecordError(f'{_name(record)}: end {end:.2f}s <= start {start:.2f}s', 'clip_bounds')
    task = self._tasks[int(record.get('_task', 0))]
    references = tasks_lib.references(record, task['target'])
    if not references and self._data.get('require_target', True):
      fields = task['target'] or ', '.join(tasks_lib.TARGET_FIELDS)
      raise RecordError(f'{record.get("id")}: no target text ({fields}); config.data.require_target=False trains '
                        'on such examples without text', 'no_target')
    with media.MediaFile(source, self._limits, self._decode_options) as media_file:
      try:
        example = self._decode_media(record, media_file, start, end, rng)
      finally:
        self.frames_decoded += media_file.frames_decoded
    target = tasks_lib.choose(references, rng, task['reference'])
    if target is not None:
      example['text_tokens'], example['text_loss_mask'] = tokenizer_lib.encode_example(
          self._get_tokenizer(), tasks_lib.prompt(record, task['prompt']), target, self._model['max_text_len'])
    else:  # pretraining on video with sound (config.data.require_target=False): no text, nothing for the text loss
      example['text_tokens'][0] = tokenizer_lib.BOS_ID
    example['example_mask'] = np.array(True)
    return example

  def _decode_media(self, record, media_file: media.MediaFile, start: float, end: Optional[float],
                    rng) -> dict[str, np.ndarray]:
    """The video and audio of the clip [start, end] of a record's media, in a blank example."""
    m, d = self._model, self._data
    info = media_file.info
    end = min(end if end is not None else info.duration, info.duration)
    if start >= info.duration:
      raise RecordError(f'{_name(record)}: start {start:.2f}s is beyond the end of the file ({info.duration:.2f}s)',
                        'clip_bounds')
    if end <= start:
      raise RecordError(f'{_name(record)}: end {end:.2f}s <= start {start:.2f}s', 'clip_bounds')
    if self._limits.max_clip_seconds and end - start > self._limits.max_clip_seconds:
      raise RecordError(f'{_name(record)}: a clip of {end - start:.1f}s (the file claims {info.duration:.1f}s), over '
                        f'config.data.max_clip_seconds={self._limits.max_clip_seconds}', 'too_long')
    t, n = m['num_chunks'], m['num_frames']
    height, width = m['image_size']
    short_side = max(height, width)
    if rng is not None:
      short_side = int(round(short_side * d.get('train_resize_ratio', 1.15)))
    # The crop is drawn before decoding (the draws in _crop's order), so that only the crop of each frame is kept.
    times = media.segment_times(start, end, n, rng)
    size = media.resize_shape(info.width, info.height, short_side)
    top, left = _crop_window(size[1], size[0], height, width, rng)
    frames = media_file.frames_of_size(times, size, (top, left, height, width))
    frames = _maybe_flip(frames, rng, flip=bool(d.get('random_flip', False)))
    example = self._blank()
    example['video'] = frames.reshape(t, n // t, height, width, 3)
    waveform = media_file.audio(start, end, d.get('sample_rate', 16_000))
    if waveform is not None:
      bounds = [(a - start, b - start) for a, b in media.chunk_bounds(start, end, t)]
      example['audio'] = audio_lib.chunk_log_mel(
          waveform, bounds, m['audio_frames_per_chunk'], d.get('sample_rate', 16_000), d.get('window_ms', 25.0),
          d.get('hop_ms', 10.0), m['mel_bins'])
      example['audio_mask'] = np.array(True)
    return example

  def _get_tokenizer(self):
    if self._tokenizer is None:
      try:
        self._tokenizer = load_tokenizer(self._data, self._model)
      except Exception as e:
        raise _ConfigError() from e
    return self._tokenizer

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_tokenizer'] = None
    return state


def _name(record: Any) -> str:
  """The record's media path, else its id, for messages."""
  if not isinstance(record, Mapping):
    return repr(record)[:80]
  return str(record.get('video_path') or record.get('id'))[:300]


def load_tokenizer(data_config: Mapping[str, Any], model_config: Mapping[str, Any]):
  """config.data.tokenizer, checked against the model's vocabulary size."""
  processor = tokenizer_lib.load(data_config['tokenizer'])
  if processor.vocab_size() > model_config['vocab_size']:
    raise ValueError(f'tokenizer {data_config["tokenizer"]!r} has {processor.vocab_size()} pieces but '
                     f'config.model.vocab_size is {model_config["vocab_size"]}')
  return processor


def _crop(frames: np.ndarray, height: int, width: int, rng: Optional[np.random.Generator],
          flip: bool = False) -> np.ndarray:
  """Centre crop (evaluation) or one random crop, and a random mirror if `flip`, for the whole clip (training)."""
  top, left = _crop_window(frames.shape[1], frames.shape[2], height, width, rng)
  return _maybe_flip(np.ascontiguousarray(frames[:, top:top + height, left:left + width]), rng, flip)


def _crop_window(h: int, w: int, height: int, width: int, rng: Optional[np.random.Generator]) -> tuple[int, int]:
  """(top, left) of the crop of frames h x w: centred in evaluation, drawn in training."""
  if rng is None:
    return (h - height) // 2, (w - width) // 2
  return int(rng.integers(0, h - height + 1)), int(rng.integers(0, w - width + 1))


def _maybe_flip(frames: np.ndarray, rng: Optional[np.random.Generator], flip: bool) -> np.ndarray:
  """The clip mirrored with probability 1/2 in training if `flip` (one draw, after the crop's)."""
  if rng is not None and flip and rng.uniform() < 0.5:
    return np.ascontiguousarray(frames[:, :, ::-1])
  return frames


class _WithIndex(grain.sources.RandomAccessDataSource):
  """Tags each record with its position in the source, so that a batch can name its examples.

  It also makes any source safe to read: a record the source fails to give, or gives as something other than a
  map, becomes an error record, and every record's types are checked (sources.check_record). The source is read
  in grain's workers, before DecodeExample's guard, where an exception would end the run.
  """

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    where = f'record {index}'
    try:
      record = self._source[index]
    except Exception as e:  # pylint: disable=broad-except
      record = {'error': f'{where}: the source failed to read it ({type(e).__name__}: {e})'[:500],
                'error_kind': 'bad_record'}
    record = sources.check_record(record, where)
    record['_index'] = int(index)
    return record

  def __repr__(self):
    return f'_WithIndex({self._source!r})'


class _Mixture(grain.sources.RandomAccessDataSource):
  """The records of several tasks' sources, one after the other, each tagged with its task (`_task`)."""

  def __init__(self, task_sources: Sequence[Any]):
    self._sources = list(task_sources)
    self.offsets = [0]
    for source in self._sources:
      self.offsets.append(self.offsets[-1] + len(source))

  def __len__(self):
    return self.offsets[-1]

  def __getitem__(self, key):
    task = bisect.bisect_right(self.offsets, key) - 1
    record = self._sources[task][key - self.offsets[task]]
    record['_task'] = task
    return record

  def __repr__(self):
    return f'_Mixture({self._sources!r})'


def task_counts(weights: Sequence[float], max_period: int = 10_000) -> list[int]:
  """Weights -> the smallest integers in the same proportions (3.0, 1.0 -> 3, 1; 0.7, 0.3 -> 7, 3), to 1/1000."""
  total = sum(weights)
  shares = [fractions.Fraction(w / total).limit_denominator(1000) for w in weights]
  scale = math.lcm(*(f.denominator for f in shares))
  counts = [int(f * scale) for f in shares]
  divisor = math.gcd(*counts)
  counts = [max(c // divisor, 1) for c in counts]
  if sum(counts) > max_period:
    raise ValueError(f'task weights {list(weights)} need a period of {sum(counts)} draws; round them')
  return counts


def _smooth_round_robin(counts: Sequence[int]) -> list[int]:
  """One period of task ids, each task `counts[t]` times, spread as evenly as possible (3, 1 -> 0 0 1 0)."""
  period, current, order = sum(counts), [0] * len(counts), []
  for _ in range(period):
    current = [c + n for c, n in zip(current, counts)]
    task = current.index(max(current))
    current[task] -= period
    order.append(task)
  return order


class _Order:
  """The global order of training records: position -> grain.RecordMetadata, the same for every process.

  One task: grain's IndexSampler (a seeded shuffle, a new order every epoch). Several tasks (sizes of their
  sources, concatenated as in _Mixture): the tasks take turns by a fixed schedule in proportion to their weights
  (task_counts, _smooth_round_robin), and a task's n-th turn reads the n-th record of its own IndexSampler stream.
  With `batch_turns` (the global batch size) a turn is a whole global batch (one task per step), else one
  example. Every position is computed directly, so resuming, or changing the number of processes, gives the same
  records.
  """

  def __init__(self, sizes: Sequence[int], weights: Sequence[float], shuffle: bool, num_epochs: Optional[int],
               seed: int, batch_turns: int = 0):
    self._streams = [grain.samplers.IndexSampler(n, shuffle=shuffle, num_epochs=num_epochs, seed=seed + t)
                     for t, n in enumerate(sizes)]
    self._offsets = [sum(sizes[:t]) for t in range(len(sizes))]
    self._counts = task_counts(weights) if len(sizes) > 1 else [1]
    self._schedule = _smooth_round_robin(self._counts)
    self._turn = [self._schedule[:i].count(t) for i, t in enumerate(self._schedule)]
    self._batch_turns = batch_turns if len(sizes) > 1 else 0
    self.length = sizes[0] * num_epochs if num_epochs is not None and len(sizes) == 1 else None

  def __getitem__(self, position: int) -> grain.RecordMetadata:
    if self.length is not None and position >= self.length:
      raise IndexError(position)
    turn, within = divmod(position, self._batch_turns) if self._batch_turns else (position, 0)
    cycle, slot = divmod(turn, len(self._schedule))
    task = self._schedule[slot]
    draw = cycle * self._counts[task] + self._turn[slot]
    if self._batch_turns:
      draw = draw * self._batch_turns + within
    inner = self._streams[task][draw]
    return grain.RecordMetadata(index=position, record_key=self._offsets[task] + inner.record_key, rng=inner.rng)

  def __repr__(self) -> str:
    return f'_Order({self._streams!r}, counts={self._counts}, batch_turns={self._batch_turns})'


class GlobalBatchSlices:
  """A grain sampler giving this process its slice of every global batch.

  All processes compute the same global order (_Order); global batch i holds positions [i*B, (i+1)*B) of it, and
  process p reads positions p*b .. p*b + b - 1 of each, b = B / process_count. Batches are therefore the same
  whatever the number of processes (a run can move to more or fewer hosts), each process decodes only its share,
  and one epoch's slices are disjoint and cover every record once. Random augmentation draws come from the global
  position, so they do not depend on the split either.
  """

  def __init__(self, order: _Order, global_batch: int, process_index: int, process_count: int):
    self._order = order
    self._global, self._local = global_batch, global_batch // process_count
    self._process_index = process_index

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    batch, offset = divmod(index, self._local)
    inner = self._order[batch * self._global + self._process_index * self._local + offset]
    return grain.RecordMetadata(index=index, record_key=inner.record_key, rng=inner.rng)

  def __repr__(self) -> str:  # part of the iterator state grain checks on restore: no addresses
    return (f'GlobalBatchSlices({self._order!r}, global_batch={self._global}, local_batch={self._local}, '
            f'process_index={self._process_index})')


def _collate(examples, batch_size: int) -> dict[str, np.ndarray]:
  """Stacks examples; pads a short (final evaluation) batch with masked copies of the last example."""
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  missing = batch_size - len(examples)
  if missing > 0:
    for key, value in batch.items():
      batch[key] = np.concatenate([value, np.repeat(value[-1:], missing, axis=0)])
    batch['example_mask'][-missing:] = False
    batch['index'][-missing:] = -1
  return batch


def _budget_settings(data_config: Mapping[str, Any]) -> Optional[tuple[float, int, int]]:
  """(max fraction, window, min examples) of config.data's skip budget; None when it can never be exceeded."""
  fraction = float(data_config.get('max_skipped_fraction', 1.0))
  if fraction >= 1.0:
    return None
  return fraction, int(data_config.get('skip_window', 1000)), int(data_config.get('skip_window_min', 100))


class SkipBudgetExceeded(RuntimeError):
  """More of the recent training examples were skipped than config.data.max_skipped_fraction allows."""


class SkipBudget:
  """Counts the skipped examples among the last `window` read, and raises SkipBudgetExceeded when they are more
  than `max_fraction` of them (of those read so far before the window fills, from `min_examples` on, so that a few
  bad examples at the start do not stop a run). The message names the most common reasons with example records.
  """

  def __init__(self, max_fraction: float, window: int, min_examples: int, stop: bool = True):
    """stop=False only counts (report() names the reasons): a run of several processes decides on the count of
    every process's examples (GlobalSkipBudget), so that all of them stop at the same step."""
    self._max_fraction, self._min_examples = max_fraction, min(min_examples, window)
    self._stop = stop
    self._recent: collections.deque = collections.deque(maxlen=window)  # (skip reason code, record index)
    self._skipped = 0

  @classmethod
  def from_config(cls, data_config: Mapping[str, Any], stop: bool = True) -> Optional['SkipBudget']:
    settings = _budget_settings(data_config)
    return None if settings is None else cls(*settings, stop)

  def add(self, reasons: np.ndarray, indices: np.ndarray) -> None:
    for code, index in zip(reasons.tolist(), indices.tolist()):
      if len(self._recent) == self._recent.maxlen and self._recent[0][0]:
        self._skipped -= 1
      self._recent.append((code, index))
      self._skipped += bool(code)
    read = len(self._recent)
    if self._stop and read >= self._min_examples and self._skipped > self._max_fraction * read:
      raise SkipBudgetExceeded(self.report())

  def report(self) -> str:
    names = list(SKIP_REASONS)
    by_reason = collections.defaultdict(list)
    for code, index in self._recent:
      if code:
        by_reason[names[code - 1] if 0 < code <= len(names) else 'unexpected'].append(index)
    lines = [f'{self._skipped} of the last {len(self._recent)} training examples could not be read, more than '
             f'config.data.max_skipped_fraction={self._max_fraction} of them. Most common reasons:']
    for name, indices in sorted(by_reason.items(), key=lambda item: -len(item[1]))[:5]:
      examples = ', '.join(str(i) for i in list(dict.fromkeys(indices))[:5])
      lines.append(f'  {name} ({len(indices)}): {SKIP_REASONS[name]}; e.g. records {examples}')
    lines.append('Each skipped example was logged with its file and reason. Fix the data, or raise '
                 'config.data.max_skipped_fraction (1.0 never stops).')
    return '\n'.join(lines)


class GlobalSkipBudget:
  """The skip budget of a run of several processes, over the skipped examples of whole global batches.

  Each process sees only its slice of a batch; were each to apply SkipBudget to its own, one could stop while the
  others wait for it in the next step's collectives. The count of a global batch's skipped examples comes out of the
  train step (the same number on every process), so every process takes the same decision at the same step. The
  message adds this process's reasons (its SkipBudget, counting only).
  """

  def __init__(self, max_fraction: float, window: int, min_examples: int):
    self._max_fraction, self._window, self._min_examples = max_fraction, window, min(min_examples, window)
    self._recent: collections.deque = collections.deque()  # (skipped, read) per global batch
    self._skipped = self._read = 0

  @classmethod
  def from_config(cls, data_config: Mapping[str, Any]) -> Optional['GlobalSkipBudget']:
    settings = _budget_settings(data_config)
    return None if settings is None else cls(*settings)

  def add(self, skipped: int, read: int, local_report: Callable[[], str] = str) -> None:
    """Counts a global batch; local_report (called only to raise) gives this process's reasons."""
    self._recent.append((skipped, read))
    self._skipped, self._read = self._skipped + skipped, self._read + read
    while self._read - self._recent[0][1] >= self._window:  # keep about `window` examples
      old_skipped, old_read = self._recent.popleft()
      self._skipped, self._read = self._skipped - old_skipped, self._read - old_read
    if self._read >= self._min_examples and self._skipped > self._max_fraction * self._read:
      raise SkipBudgetExceeded(
          f'{self._skipped} of the last {self._read} training examples of all processes could not be read, more '
          f'than config.data.max_skipped_fraction={self._max_fraction} of them. This process\'s share:\n'
          f'{local_report()}')


def _state_for_workers(state: bytes, worker_count: int) -> bytes:
  """A grain DataLoader state saved with any number of workers, for a loader of `worker_count` workers.

  Grain's state holds, per worker, the last index it gave (workers take the sampler's indices in turn), and grain
  refuses a state of another worker count. Batches are formed in this process from the examples in sampler order,
  so the state is only a position: the number of examples read, the sum of what each worker gave. That position is
  written back as the state `worker_count` workers would have after reading as many. The loaders of `build` read one
  shard (NoSharding), which these formulas assume; the sampler and source that grain checks are kept.
  """
  saved = json.loads(state.decode())
  if int(saved['worker_count']) == worker_count:
    return state
  slots = max(int(saved['worker_count']), 1)
  last_seen = saved['last_seen_indices']
  position = sum((int(last_seen[str(i)]) + slots - i) // slots for i in range(slots))
  slots = max(worker_count, 1)
  given = [max(0, -(-(position - i) // slots)) for i in range(slots)]  # what worker i has given
  saved['worker_count'] = worker_count
  saved['last_seen_indices'] = {str(i): i + (given[i] - 1) * slots for i in range(slots)}
  saved['last_worker_index'] = position % slots - 1 if worker_count else -1
  return json.dumps(saved, indent=4).encode()


class BatchIterator:
  """Batches of a grain DataLoader's examples, formed in this process.

  Batching here rather than in grain's workers keeps the batches the same whatever `num_workers` is, so a run may
  resume with another worker count (set_state translates grain's per-worker state). Its state is the loader's,
  always taken between two batches. With a `skip_budget` (training), each batch's skip reasons are counted and
  too many stop the run (SkipBudget); the count restarts on resume.
  """

  def __init__(self, loader: grain.DataLoader, batch_size: int, drop_remainder: bool,
               skip_budget: Optional[SkipBudget] = None):
    self._iterator = iter(loader)
    self._worker_count = int(loader.multiprocessing_options.num_workers)
    self._batch_size, self._drop_remainder = batch_size, drop_remainder
    self._skip_budget = skip_budget

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    examples = []
    for example in self._iterator:
      examples.append(example)
      if len(examples) == self._batch_size:
        break
    if not examples or (self._drop_remainder and len(examples) < self._batch_size):
      raise StopIteration
    batch = _collate(examples, self._batch_size)
    if self._skip_budget is not None:
      self._skip_budget.add(batch['skip_reason'], batch['index'])
    return batch

  def skip_report(self) -> str:
    """The reasons of the recent skipped examples of this process ('' without a budget)."""
    return self._skip_budget.report() if self._skip_budget is not None else ''

  def get_state(self) -> bytes:
    return self._iterator.get_state()

  def set_state(self, state: bytes) -> None:
    self._iterator.set_state(_state_for_workers(state, self._worker_count))

  def start_prefetch(self) -> None:
    """Called by grain's checkpoint handler after a restore."""
    start = getattr(self._iterator, 'start_prefetch', None)
    if start is not None:
      start()


def per_process_batch_size(config, process_count: int) -> int:
  if config.batch_size % process_count:
    raise ValueError(f'config.batch_size={config.batch_size} does not divide over {process_count} processes')
  return config.batch_size // process_count


def build(config, split: str, process_index: int = 0, process_count: int = 1, train: Optional[bool] = None,
          num_epochs: Optional[int] = None, data=None) -> BatchIterator:
  """An iterator of this process's slice of every global batch (numpy arrays with the model's keys), with get_state /
  set_state.

  `train` defaults to split == 'train': shuffled with a new order every epoch, repeated forever, random crops,
  frame jitter (and flips if config.data.random_flip). Otherwise one ordered pass, the last batch padded with masked
  examples. `data` (default config.data) says what to read; a training pass over a config.data with `tasks` reads
  each task's own train_split, mixed (see _Order).
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, process_count={process_count})')
  train = (split == 'train') if train is None else train
  data = config.data if data is None else data
  names = tasks_lib.task_names(data) if train else []
  task_configs = [tasks_lib.task_data(data, name) for name in names] or [tasks_lib.task_data(data)]
  if names:
    task_sources = [sources.open_source(t, t.train_split) for t in task_configs]
    weights = tasks_lib.task_weights(data)
  else:
    task_sources, weights = [sources.open_source(task_configs[0], split)], [1.0]
  source = _WithIndex(_Mixture(task_sources) if names else task_sources[0])
  batch_size = per_process_batch_size(config, process_count)
  epochs = num_epochs if num_epochs is not None else (None if train else 1)
  turns = config.batch_size if data.get('task_per_step', False) else 0
  order = _Order([len(s) for s in task_sources], weights, shuffle=train, num_epochs=epochs, seed=config.seed,
                 batch_turns=turns)
  sampler = GlobalBatchSlices(order, config.batch_size, process_index, process_count)
  loader = grain.DataLoader(
      data_source=source, sampler=sampler,
      operations=[preemption.WorkersOutliveSigterm(), DecodeExample(config.model, data, train, task_configs)],
      worker_count=int(data.get('num_workers', 0)), worker_buffer_size=2, shard_options=grain.sharding.NoSharding(),
      read_options=grain.ReadOptions(num_threads=1, prefetch_buffer_size=2 * batch_size))
  # Several processes: the iterator only counts its reasons; the trainer decides on the global count
  # (GlobalSkipBudget), so that every process stops at the same step.
  budget = SkipBudget.from_config(data, stop=process_count == 1) if train else None
  return BatchIterator(loader, batch_size, drop_remainder=train, skip_budget=budget)


def num_eval_batches(config, split: str, data=None) -> int:
  """Evaluation steps on `split`: the same for every process, whatever their number."""
  data = tasks_lib.task_data(config.data if data is None else data)
  return -(-len(sources.open_source(data, split)) // config.batch_size)


def eval_batches(config, split: str, process_index: int = 0, process_count: int = 1, data=None) -> Iterator[dict]:
  """Exactly num_eval_batches batches of `data` (default config.data, one task); a process whose slice of the last
  global batch is empty gets a fully masked batch."""
  iterator = build(config, split, process_index, process_count, train=False, data=data)
  blank = None
  for _ in range(num_eval_batches(config, split, data)):
    batch = next(iterator, None)
    if batch is None:
      if blank is None:
        blank = _collate([DecodeExample(config.model, config.data, False).blank_example()],
                         per_process_batch_size(config, process_count))
        blank['example_mask'][:] = False
        blank['index'][:] = -1
      batch = blank
    yield batch


def model_inputs(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The model's keys of a pipeline batch (drops EXTRA_KEYS: `index`, `skipped`, `skip_reason`)."""
  return {k: v for k, v in batch.items() if k not in EXTRA_KEYS}


def to_global(batch: Mapping[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """This process's batch -> global jax.Arrays split over the batch axes of the mesh (multi-host ready)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
