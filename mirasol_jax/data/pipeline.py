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
from typing import Any, Iterator, Mapping, Optional

import grain
import jax
import numpy as np

from mirasol_jax.data import audio as audio_lib
from mirasol_jax.data import media
from mirasol_jax.data import sources
from mirasol_jax.data import tokenizer as tokenizer_lib

# Keys of a pipeline batch beyond the model's (mirasol.example_batch): the record's position in its source, and
# whether it was skipped.
EXTRA_KEYS = ('index', 'skipped')


class DecodeExample(grain.transforms.RandomMap):
  """Record -> one example of a model batch (no batch axis). Random crop, frame jitter (and flip) in training."""

  def __init__(self, model_config: Mapping[str, Any], data_config: Mapping[str, Any], train: bool):
    self._model = dict(model_config)
    self._data = dict(data_config)
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
    target = tokenizer_lib.target_text(record)
    if target is not None:
      example['text_tokens'], example['text_loss_mask'] = tokenizer_lib.encode_example(
          self._get_tokenizer(), tokenizer_lib.prefix_text(record), target, m['max_text_len'])
    elif d.get('require_target', True):
      raise ValueError(f'{record.get("id")}: no target text (one of {", ".join(sources.TARGET_FIELDS)}); '
                       'config.data.require_target=False trains on such examples without text')
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


class GlobalBatchSlices:
  """A grain sampler giving this process its slice of every global batch.

  All processes compute the same global order (grain's IndexSampler: seeded shuffle, a new order each epoch);
  global batch i holds positions [i*B, (i+1)*B) of it, and process p reads positions p*b .. p*b + b - 1 of each,
  b = B / process_count. Batches are therefore the same whatever the number of processes (a run can move to more
  or fewer hosts), each process decodes only its share, and one epoch's slices are disjoint and cover every
  record once. Random augmentation draws come from the global position, so they do not depend on the split either.
  """

  def __init__(self, num_records: int, global_batch: int, process_index: int, process_count: int, shuffle: bool,
               num_epochs: Optional[int], seed: int):
    self._inner = grain.samplers.IndexSampler(num_records, shuffle=shuffle, num_epochs=num_epochs, seed=seed)
    self._num_records, self._num_epochs = num_records, num_epochs
    self._global, self._local = global_batch, global_batch // process_count
    self._process_index = process_index

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    batch, offset = divmod(index, self._local)
    position = batch * self._global + self._process_index * self._local + offset
    if self._num_epochs is not None and position >= self._num_records * self._num_epochs:
      raise IndexError(index)
    inner = self._inner[position]
    return grain.RecordMetadata(index=index, record_key=inner.record_key, rng=inner.rng)

  def __repr__(self) -> str:  # part of the iterator state grain checks on restore: no addresses
    return (f'GlobalBatchSlices({self._inner!r}, global_batch={self._global}, local_batch={self._local}, '
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
          num_epochs: Optional[int] = None) -> BatchIterator:
  """An iterator of this process's slice of every global batch (numpy arrays with the model's keys), with get_state /
  set_state.

  `train` defaults to split == 'train': shuffled with a new order every epoch, repeated forever, random crops,
  frame jitter (and flips if config.data.random_flip). Otherwise one ordered pass, the last batch padded with masked examples.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, process_count={process_count})')
  train = (split == 'train') if train is None else train
  data = config.data
  source = _WithIndex(sources.open_source(data, split))
  batch_size = per_process_batch_size(config, process_count)
  epochs = num_epochs if num_epochs is not None else (None if train else 1)
  sampler = GlobalBatchSlices(len(source), config.batch_size, process_index, process_count, shuffle=train,
                              num_epochs=epochs, seed=config.seed)
  loader = grain.DataLoader(
      data_source=source, sampler=sampler, operations=[DecodeExample(config.model, data, train)],
      worker_count=int(data.get('num_workers', 0)), worker_buffer_size=2, shard_options=grain.sharding.NoSharding(),
      read_options=grain.ReadOptions(num_threads=1, prefetch_buffer_size=2 * batch_size))
  return BatchIterator(loader, batch_size, drop_remainder=train)


def num_eval_batches(config, split: str) -> int:
  """Evaluation steps on `split`: the same for every process, whatever their number."""
  return -(-len(sources.open_source(config.data, split)) // config.batch_size)


def eval_batches(config, split: str, process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """Exactly num_eval_batches batches; a process whose slice of the last global batch is empty gets a fully masked
  batch."""
  iterator = build(config, split, process_index, process_count, train=False)
  blank = None
  for _ in range(num_eval_batches(config, split)):
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
