"""The grain input pipeline: raw records -> decoded, chunked, tokenised batches for the model, per process.

  source (jsonl | array_record | tfds) -> GlobalBatchSlices (seeded shuffle, repeat, this process's slice of
    every global batch)
    -> DecodeExample in `config.data.num_workers` worker processes (PyAV frames + log-mel + SentencePiece)
    -> Batch (config.batch_size / process_count examples)

`build(config, split, process_index, process_count)` returns a grain iterator with `get_state()` / `set_state()`
that resumes exactly. Training repeats forever with a reshuffle every epoch; evaluation reads each example once,
in order, and pads the last batch with `example_mask=False`.

An example that cannot be read (missing or corrupt file, `start` past the end, a bad jsonl line) is logged with its
file and reason and kept in place as a masked example (`example_mask=False`, `skipped=True`): it adds nothing to any
loss or metric, nothing else moves, and the run goes on. `batch['skipped']` lets the trainer count them.
"""
from __future__ import annotations

import logging
import bisect
import fractions
import math
from typing import Any, Iterator, Mapping, Optional, Sequence

import grain
import jax
import numpy as np

from mirasol_jax.data import audio as audio_lib
from mirasol_jax.data import media
from mirasol_jax.data import sources
from mirasol_jax.data import tasks as tasks_lib
from mirasol_jax.data import tokenizer as tokenizer_lib

# Keys of a pipeline batch beyond the model's (mirasol.example_batch): the record's position in its source, and
# whether it was skipped.
EXTRA_KEYS = ('index', 'skipped')


class DecodeExample(grain.transforms.RandomMap):
  """Record -> one example of a model batch (no batch axis). Random crop, frame jitter (and flip) in training."""

  def __init__(self, model_config: Mapping[str, Any], data_config: Mapping[str, Any], train: bool,
               task_configs: Optional[Sequence[Mapping[str, Any]]] = None):
    """task_configs: the prompt and target of each task of a mixture (a record's `_task` indexes them); by default
    data_config's."""
    self._model = dict(model_config)
    self._data = dict(data_config)
    self._tasks = [{'prompt': t.get('prompt', ''), 'target': t.get('target', '')}
                   for t in (task_configs or [data_config])]
    self._train = train
    self._tokenizer = None  # loaded lazily, in the worker process

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
    }

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    return self.decode(record, rng if self._train else None)

  def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    return self.decode(record, None)

  def decode(self, record: Mapping[str, Any], rng: Optional[np.random.Generator]) -> dict[str, np.ndarray]:
    index = int(record.get('_index', -1))
    try:
      example = self._decode(record, rng)
    except (media.MediaError, KeyError, ValueError) as e:
      logging.warning('skipping example %s (record %d): %s', record.get('id'), index, e)
      example = self._blank()
      example['skipped'] = np.array(True)
    example['index'] = np.array(index, np.int64)
    return example

  def _decode(self, record: Mapping[str, Any], rng: Optional[np.random.Generator]) -> dict[str, np.ndarray]:
    if 'error' in record:
      raise ValueError(record['error'])
    source = record['video_bytes'] if 'video_bytes' in record else record['video_path']
    with media.MediaFile(source) as media_file:
      return self._decode_media(record, media_file, rng)

  def _decode_media(self, record, media_file: media.MediaFile, rng) -> dict[str, np.ndarray]:
    m, d = self._model, self._data
    info = media_file.info
    start = float(record.get('start') or 0.0)
    end = min(float(record['end']) if record.get('end') is not None else info.duration, info.duration)
    if start >= info.duration:
      raise media.MediaError(f'{record.get("video_path", record.get("id"))}: start {start:.2f}s is beyond the end '
                             f'of the file ({info.duration:.2f}s)')
    if end <= start:
      raise media.MediaError(f'{record.get("video_path", record.get("id"))}: end {end:.2f}s <= start {start:.2f}s')
    t, n = m['num_chunks'], m['num_frames']
    height, width = m['image_size']
    short_side = max(height, width)
    if rng is not None:
      short_side = int(round(short_side * d.get('train_resize_ratio', 1.15)))
    frames = media_file.frames(media.segment_times(start, end, n, rng), short_side)
    frames = _crop(frames, height, width, rng, flip=bool(d.get('random_flip', False)))
    example = self._blank()
    example['video'] = frames.reshape(t, n // t, height, width, 3)
    waveform = media_file.audio(start, end, d.get('sample_rate', 16_000))
    if waveform is not None:
      bounds = [(a - start, b - start) for a, b in media.chunk_bounds(start, end, t)]
      example['audio'] = audio_lib.chunk_log_mel(
          waveform, bounds, m['audio_frames_per_chunk'], d.get('sample_rate', 16_000), d.get('window_ms', 25.0),
          d.get('hop_ms', 10.0), m['mel_bins'])
      example['audio_mask'] = np.array(True)
    task = self._tasks[int(record.get('_task', 0))]
    target = tasks_lib.target(record, task['target'], rng)
    if target is not None:
      example['text_tokens'], example['text_loss_mask'] = tokenizer_lib.encode_example(
          self._get_tokenizer(), tasks_lib.prompt(record, task['prompt']), target, m['max_text_len'])
    elif d.get('require_target', True):
      fields = task['target'] or ', '.join(tasks_lib.TARGET_FIELDS)
      raise ValueError(f'{record.get("id")}: no target text ({fields}); config.data.require_target=False trains '
                       'on such examples without text')
    else:  # pretraining on video with sound: no text, nothing for the text loss
      example['text_tokens'][0] = tokenizer_lib.BOS_ID
    example['example_mask'] = np.array(True)
    return example

  def _get_tokenizer(self):
    if self._tokenizer is None:
      self._tokenizer = load_tokenizer(self._data, self._model)
    return self._tokenizer

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_tokenizer'] = None
    return state


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
  h, w = frames.shape[1:3]
  if rng is None:
    top, left = (h - height) // 2, (w - width) // 2
  else:
    top, left = int(rng.integers(0, h - height + 1)), int(rng.integers(0, w - width + 1))
  frames = frames[:, top:top + height, left:left + width]
  if rng is not None and flip and rng.uniform() < 0.5:
    frames = frames[:, :, ::-1]
  return np.ascontiguousarray(frames)


class _WithIndex(grain.sources.RandomAccessDataSource):
  """Tags each record with its position in the source, so that a batch can name its examples."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    record = self._source[index]
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


class BatchIterator:
  """Batches of a grain DataLoader's examples, formed in this process.

  Batching here rather than in grain's workers keeps the batches the same whatever `num_workers` is, so a run may
  resume with another worker count. Its state is the loader's, always taken between two batches.
  """

  def __init__(self, loader: grain.DataLoader, batch_size: int, drop_remainder: bool):
    self._iterator = iter(loader)
    self._batch_size, self._drop_remainder = batch_size, drop_remainder

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
    return _collate(examples, self._batch_size)

  def get_state(self) -> bytes:
    return self._iterator.get_state()

  def set_state(self, state: bytes) -> None:
    self._iterator.set_state(state)

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
      data_source=source, sampler=sampler, operations=[DecodeExample(config.model, data, train, task_configs)],
      worker_count=int(data.get('num_workers', 0)), worker_buffer_size=2, shard_options=grain.sharding.NoSharding(),
      read_options=grain.ReadOptions(num_threads=1, prefetch_buffer_size=2 * batch_size))
  return BatchIterator(loader, batch_size, drop_remainder=train)


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
  """The model's keys of a pipeline batch (drops `index` and `skipped`)."""
  return {k: v for k, v in batch.items() if k not in EXTRA_KEYS}


def to_global(batch: Mapping[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """This process's batch -> global jax.Arrays split over the batch axes of the mesh (multi-host ready)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
