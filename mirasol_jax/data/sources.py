"""Random-access sources of raw examples (one dict a jsonl line): a jsonl folder, ArrayRecord shards, a TFDS dataset.

Every source yields the same record for the same example: a dict with `id`, the media as `video_path` (a file) or
`video_bytes` (the encoded file), optional `start` / `end`, the text fields, any other fields of the line (a question
type, say, for per-group accuracies), and `error` when the line itself is unusable (bad JSON, no `video` field): such
a record keeps its place, so skipping it never shifts the others. A record without a target text (answer, caption,
label) is valid here: video with sound and no text is what pretraining reads; the pipeline decides whether a target
is required (config.data.require_target).
"""
from __future__ import annotations

import glob
import json
import os
import importlib
from typing import Any, Callable, Mapping, Optional

import grain
import msgpack

MEDIA_FIELDS = ('video_path', 'video_bytes')
TARGET_FIELDS = ('answer', 'caption', 'label')


def parse_line(line: str, folder: str, line_number: int, split: str, media_root: Optional[str] = None
               ) -> dict[str, Any]:
  """One jsonl line -> a record; problems become `error` instead of exceptions. `video` is relative to media_root
  (default: the dataset folder)."""
  where = f'{split}.jsonl:{line_number + 1}'
  try:
    raw = json.loads(line)
  except json.JSONDecodeError as e:
    return {'id': where, 'error': f'{where}: not valid JSON ({e.msg})'}
  if not isinstance(raw, dict):
    return {'id': where, 'error': f'{where}: a line must be a JSON object'}
  # Fields a record gets from elsewhere never come from the line.
  record = {k: v for k, v in raw.items() if k not in ('video', 'error', '_index') + MEDIA_FIELDS}
  record.setdefault('id', where)
  if 'video' not in raw:
    record['error'] = f'{where}: missing field "video"'
  else:
    record['video_path'] = os.path.join(media_root or folder, raw['video'])
  return record


class JsonlSource(grain.sources.RandomAccessDataSource):
  """`{folder}/{split}.jsonl` with media files relative to `media_root` (default: the folder)."""

  def __init__(self, folder: str, split: str, media_root: Optional[str] = None):
    path = os.path.join(folder, f'{split}.jsonl')
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} does not exist (config.data.path={folder!r}, split={split!r})')
    with open(path) as f:
      self._records = [parse_line(line, folder, i, split, media_root) for i, line in enumerate(f) if line.strip()]
    self._path = path

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return dict(self._records[index])

  def __repr__(self) -> str:
    return f'JsonlSource({self._path!r}, {len(self)} records)'


def encode_record(record: Mapping[str, Any]) -> bytes:
  """A record with its media read into `video_bytes`, as stored in ArrayRecord shards."""
  stored = {k: v for k, v in record.items() if k != 'video_path'}
  path = record.get('video_path')
  if path is not None and 'error' not in record:
    try:
      with open(path, 'rb') as f:
        stored['video_bytes'] = f.read()
    except OSError as e:
      stored['error'] = f'{path}: {e.strerror or e}'
  stored.setdefault('video_name', os.path.basename(path) if path else None)
  return msgpack.packb(stored, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
  return msgpack.unpackb(data, raw=False)


def shard_paths(folder: str, split: str) -> list[str]:
  return sorted(glob.glob(os.path.join(folder, f'{split}.array_record-*-of-*')))


def write_array_record(source_folder: str, output_folder: str, split: str, num_shards: int = 4,
                       media_root: Optional[str] = None) -> list[str]:
  """Converts `{source_folder}/{split}.jsonl` and its media into `num_shards` ArrayRecord shards, in order."""
  from array_record.python import array_record_module

  source = JsonlSource(source_folder, split, media_root)
  os.makedirs(output_folder, exist_ok=True)
  per_shard = -(-len(source) // num_shards)
  paths = []
  for shard in range(num_shards):
    path = os.path.join(output_folder, f'{split}.array_record-{shard:05d}-of-{num_shards:05d}')
    writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
    for index in range(shard * per_shard, min((shard + 1) * per_shard, len(source))):
      writer.write(encode_record(source[index]))
    writer.close()
    paths.append(path)
  return paths


class ArrayRecordSource(grain.sources.RandomAccessDataSource):
  """ArrayRecord shards written by `write_array_record`, read with grain's ArrayRecordDataSource."""

  def __init__(self, folder: str, split: str):
    paths = shard_paths(folder, split)
    if not paths:
      raise FileNotFoundError(f'no ArrayRecord shards {split}.array_record-*-of-* in {folder!r}')
    self._source = grain.sources.ArrayRecordDataSource(paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return decode_record(self._source[index])

  def __repr__(self) -> str:
    return f'ArrayRecordSource({self._source!r})'


def dataset_folder(data_config: Mapping[str, Any]) -> str:
  """The folder of config.data: for source 'demo' ('demo_unlabelled'), the embedded dataset (its unlabelled set),
  generated on first use."""
  if data_config.get('source', 'jsonl') in ('demo', 'demo_unlabelled'):
    from mirasol_jax.data import demo_data
    return demo_data.ensure(data_config.get('path') or None, labelled=data_config['source'] == 'demo')
  if not data_config.get('path'):
    raise ValueError('config.data.path is empty: set it to your dataset folder (--config.data.path=DIR) or use '
                     'config.data.source=demo')
  return data_config['path']


def _jsonl(data_config: Mapping[str, Any], split: str) -> JsonlSource:
  return JsonlSource(dataset_folder(data_config), split, data_config.get('media_root') or None)


def _array_record(data_config: Mapping[str, Any], split: str) -> ArrayRecordSource:
  return ArrayRecordSource(dataset_folder(data_config), split)


# config.data.source -> a function (config.data, split) -> source. A module named instead of a function is imported
# on first use and registers its sources itself (so that this module imports none of them).
_REGISTRY: dict[str, Any] = {
    'jsonl': _jsonl, 'demo': _jsonl, 'demo_unlabelled': _jsonl, 'array_record': _array_record,
    'tfds': 'mirasol_jax.data.tfds_source',
}


def register(name: str, open_fn: Callable[[Mapping[str, Any], str], Any]) -> None:
  """Makes config.data.source=`name` open its splits with open_fn(config.data, split)."""
  _REGISTRY[name] = open_fn


def open_source(data_config: Mapping[str, Any], split: str):
  """The source named by config.data.source (see _REGISTRY), for `split`."""
  kind = data_config.get('source', 'jsonl')
  if kind not in _REGISTRY:
    raise ValueError(f'config.data.source={kind!r} is not one of {", ".join(sorted(_REGISTRY))}')
  if isinstance(_REGISTRY[kind], str):
    importlib.import_module(_REGISTRY[kind])
  return _REGISTRY[kind](data_config, split)
