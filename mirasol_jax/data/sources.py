"""Random-access sources of raw examples (one dict a jsonl line): a jsonl folder, ArrayRecord shards, a TFDS dataset.

Every source yields the same record for the same example: a dict with `id`, the media as `video_path` (a file) or
`video_bytes` (the encoded file), optional `start` / `end`, the text fields, any other fields of the line (a question
type, say, for per-group accuracies), and `error` (with its kind, `error_kind`) when the record itself is unusable:
bad JSON or bytes, no `video` field, a field of the wrong type, media that resolve outside the dataset folder. Such a
record keeps its place, so skipping it never shifts the others, and its wrongly typed fields are dropped, so that
nothing that reads records (the pipeline, the evaluators, the tokenizer and convert commands) meets them. A source
never raises for one bad record. A record without a target text (answer, caption, label) is valid here: video with
sound and no text is what pretraining reads; the pipeline decides whether a target is required
(config.data.require_target).
"""
from __future__ import annotations

import glob
import json
import math
import numbers
import os
import importlib
import re
from typing import Any, Callable, Mapping, Optional

import grain
import msgpack

from mirasol_jax.data import media

MEDIA_FIELDS = ('video_path', 'video_bytes')
# Fields a record gets from its source or the pipeline, never from the data itself.
RESERVED_FIELDS = ('video', 'error', 'error_kind', '_index', '_task') + MEDIA_FIELDS
# Nesting of a record's values: none of its fields needs more than a few levels, and msgpack (ArrayRecord shards)
# refuses deep structures, so a deeper record is refused when it is read rather than when it is converted.
MAX_NESTING = 32
# Integers msgpack can store (int64 and uint64): a larger one would stop `convert`.
_INT_RANGE = (-2**63, 2**64 - 1)
# Fields with a fixed type: a scalar is a str, a number or a bool; `texts` a list of them; `number` a finite real
# number (not a bool); `index` an int (not a bool).
_SCALAR_FIELDS = ('id', 'title', 'question', 'kind', 'video_name')
_TEXTS_FIELDS = ('answer', 'caption', 'captions', 'label')  # one reference or a list of them
_NUMBER_FIELDS = ('start', 'end')
_INDEX_FIELDS = ('answer_index', 'label_index')


def _error(record: dict[str, Any], kind: str, message: str) -> dict[str, Any]:
  """Marks a record unusable (the first problem found stays)."""
  if 'error' not in record:
    record['error'], record['error_kind'] = message, kind
  return record


def _is_scalar(value: Any) -> bool:
  return isinstance(value, (str, int, float))  # bool is an int


def _is_number(value: Any) -> bool:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    return False
  try:
    return math.isfinite(float(value))
  except OverflowError:  # an int beyond the float range
    return False


def _is_unicode(text: str) -> bool:
  try:
    text.encode('utf-8')
  except UnicodeEncodeError:
    return False
  return True


def _value_problem(value: Any, depth: int = 0) -> Optional[str]:
  """Why a value cannot travel through every source, format and grain (which walks records as JAX trees), or None:
  a type other than JSON's and bytes (msgpack's extension types, say), a map with keys other than texts, nested too
  deep, an integer out of range, a text that is not Unicode (JSON's "\\ud800" escapes give lone surrogates, which no
  UTF-8 writer takes)."""
  if depth > MAX_NESTING:
    return f'nested more than {MAX_NESTING} levels'
  if value is None or isinstance(value, (bool, float, bytes)):
    return None
  if isinstance(value, int):
    return None if _INT_RANGE[0] <= value <= _INT_RANGE[1] else 'an integer out of the 64-bit range'
  if isinstance(value, str):
    return None if _is_unicode(value) else 'a text with a lone surrogate (not Unicode)'
  if type(value) is dict:  # pylint: disable=unidiomatic-typecheck
    if not all(isinstance(k, str) and _is_unicode(k) for k in value):
      return 'a map with keys that are not texts'
    value = list(value.values())
  if type(value) not in (list, tuple):  # pylint: disable=unidiomatic-typecheck  (no namedtuple: JAX rebuilds them)
    return f'a value of type {type(value).__name__}'
  for item in value:
    problem = _value_problem(item, depth + 1)
    if problem:
      return problem
  return None


def _field_problem(name: str, value: Any) -> Optional[str]:
  """Why a field's value has the wrong type for what reads it, or None."""
  if value is None:
    return None
  if name in _SCALAR_FIELDS and not _is_scalar(value):
    return f'"{name}" must be a text or a number, not {type(value).__name__}'
  if name in _TEXTS_FIELDS and not (_is_scalar(value) or (
      isinstance(value, (list, tuple)) and all(_is_scalar(v) for v in value))):
    return f'"{name}" must be a text or a list of texts'
  if name == 'options' and not (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
    return '"options" must be a list of texts'
  if name in _NUMBER_FIELDS and not _is_number(value):
    return f'"{name}" must be a finite number of seconds, not {value!r:.40}'
  if name in _INDEX_FIELDS and (isinstance(value, bool) or not isinstance(value, int)):
    return f'"{name}" must be an integer, not {value!r:.40}'
  if name == 'video_bytes' and not isinstance(value, bytes):
    return f'"video_bytes" must be bytes, not {type(value).__name__}'
  if name == 'video_path' and not isinstance(value, str):
    return f'"video_path" must be a path, not {type(value).__name__}'
  return _value_problem(value)


def check_record(record: Any, where: str) -> dict[str, Any]:
  """A record of any source with its types checked: a wrongly typed field is dropped and marks the record as an
  error (kind 'bad_record'); a record that is not a map becomes an error record. `where` names it in messages."""
  if not isinstance(record, Mapping):
    return {'id': where, 'error': f'{where}: a record must be a map, not {type(record).__name__}',
            'error_kind': 'bad_record'}
  checked = {}
  problems = []
  for key, value in record.items():
    if not isinstance(key, str):
      problems.append(f'a field name must be a text, not {type(key).__name__}')
      continue
    if key == 'error_kind':
      continue  # set below, with the error it names
    if key == 'error':
      problem = None  # made a text below
    elif key in ('_index', '_task'):
      problem = None if type(value) is int else f'"{key}" must be an integer'  # pylint: disable=unidiomatic-typecheck
    else:
      problem = _field_problem(key, value)
    if problem:
      problems.append(problem)
    else:
      checked[key] = value
  if 'error' in checked:
    kind = record.get('error_kind')
    checked['error'] = str(checked['error'])[:1000].encode('utf-8', 'replace').decode('utf-8')
    checked['error_kind'] = kind if isinstance(kind, str) and kind else 'bad_record'
  if problems:
    _error(checked, 'bad_record', f'{checked.get("id", where)}: {"; ".join(problems)}')
  checked.setdefault('id', where)
  return checked


def parse_line(line: str | bytes, folder: str, line_number: int, split: str, media_root: Optional[str] = None
               ) -> dict[str, Any]:
  """One jsonl line -> a record; problems become `error` instead of exceptions. `video` is relative to media_root
  (default: the dataset folder); whether it stays inside is checked when the record is read (JsonlSource)."""
  where = f'{split}.jsonl:{line_number + 1}'
  try:
    # Strictly UTF-8 (a byte-order mark allowed): json.loads would guess UTF-16 or let invalid bytes through.
    raw = json.loads(line.decode('utf-8-sig') if isinstance(line, bytes) else line)
  except json.JSONDecodeError as e:
    return {'id': where, 'error': f'{where}: not valid JSON ({e.msg})', 'error_kind': 'bad_record'}
  except UnicodeDecodeError as e:
    return {'id': where, 'error': f'{where}: not valid UTF-8 ({e.reason} at byte {e.start})',
            'error_kind': 'bad_record'}
  except RecursionError:
    return {'id': where, 'error': f'{where}: nested too deeply to parse', 'error_kind': 'bad_record'}
  except ValueError as e:  # e.g. an integer of more digits than Python converts (sys.get_int_max_str_digits)
    return {'id': where, 'error': f'{where}: not a usable JSON value ({e})', 'error_kind': 'bad_record'}
  if not isinstance(raw, dict):
    return {'id': where, 'error': f'{where}: a line must be a JSON object', 'error_kind': 'bad_record'}
  # Fields a record gets from elsewhere never come from the line.
  record = check_record({k: v for k, v in raw.items() if k not in RESERVED_FIELDS}, where)
  video = raw.get('video')
  if 'video' not in raw:
    _error(record, 'bad_record', f'{where}: missing field "video"')
  elif not isinstance(video, str) or not video or '\0' in video:
    _error(record, 'bad_record', f'{where}: "video" must be a path, not {video!r:.40}')
  else:
    record['video_path'] = os.path.join(media_root or folder, video)
  return record


def read_lines(path: str, max_line_bytes: int = 0):
  """(line number, bytes) of each non-blank line of a file; a line longer than max_line_bytes (0: any length) is
  given as None and never held whole."""
  with open(path, 'rb') as f:
    number = 0
    while True:
      line = f.readline(max_line_bytes + 1) if max_line_bytes else f.readline()
      if not line:
        return
      if max_line_bytes and len(line) > max_line_bytes and not line.endswith(b'\n'):
        while line and not line.endswith(b'\n'):  # the rest of the long line, in pieces
          line = f.readline(max_line_bytes + 1)
        yield number, None
      elif line.strip():
        yield number, line
      number += 1


class JsonlSource(grain.sources.RandomAccessDataSource):
  """`{folder}/{split}.jsonl` with media files relative to `media_root` (default: the folder).

  Lines are read as bytes and parsed one by one, so an invalid byte, a line nested too deeply or longer than
  `max_line_bytes` costs that line only. Unless `allow_outside_media`, a record whose media resolve (symlinks
  followed, `..` and absolute paths included) outside the media root is an error record (kind 'outside_dataset'),
  checked each time the record is read: a link may change after the source is opened.
  """

  def __init__(self, folder: str, split: str, media_root: Optional[str] = None, allow_outside_media: bool = False,
               max_line_bytes: int = 0):
    path = os.path.join(folder, f'{split}.jsonl')
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} does not exist (config.data.path={folder!r}, split={split!r})')
    self._records = []
    for number, line in read_lines(path, max_line_bytes):
      if line is None:
        where = f'{split}.jsonl:{number + 1}'
        self._records.append({'id': where, 'error_kind': 'bad_record',
                              'error': f'{where}: longer than {max_line_bytes} bytes (config.data.max_line_bytes)'})
      else:
        self._records.append(parse_line(line, folder, number, split, media_root))
    self._path = path
    self._root = os.path.realpath(media_root or folder)
    self._allow_outside = allow_outside_media

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = dict(self._records[index])
    if 'video_path' in record and 'error' not in record and not self._allow_outside:
      problem = outside_problem(record['video_path'], self._root)
      if problem:
        _error(record, 'outside_dataset', f'{record["id"]}: {problem}')
    return record

  def __repr__(self) -> str:
    return f'JsonlSource({self._path!r}, {len(self)} records)'


def outside_problem(path: str, root: str) -> Optional[str]:
  """Why `path` may not be read as media of the folder `root` (already resolved), or None: it resolves, links
  followed, outside the folder."""
  try:
    real = os.path.realpath(path)
    inside = os.path.commonpath([real, root]) == root
  except (OSError, ValueError) as e:
    return f'{path}: cannot resolve the path ({e})'
  if inside:
    return None
  return (f'{path} resolves to {real}, outside the media folder {root}: set config.data.media_root to the folder '
          'that holds the media, or config.data.allow_outside_media=True to read media anywhere')


def encode_record(record: Mapping[str, Any], max_media_bytes: int = 0) -> bytes:
  """A record with its media read into `video_bytes`, as stored in ArrayRecord shards. Only a regular file of at
  most max_media_bytes (0: any size) is read: anything else leaves the record an error record."""
  stored = {k: v for k, v in record.items() if k != 'video_path'}
  path = record.get('video_path')
  if path is not None and 'error' not in record:
    try:
      with media.open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if max_media_bytes and size > max_media_bytes:
          raise media.MediaError(f'{path}: {size} bytes, over config.data.max_media_bytes={max_media_bytes}',
                                 'too_large')
        stored['video_bytes'] = f.read()
    except media.MediaError as e:
      stored['error'], stored['error_kind'] = str(e), e.reason
    except OSError as e:
      stored['error'], stored['error_kind'] = f'{path}: {e.strerror or e}', 'unreadable_file'
  stored.setdefault('video_name', os.path.basename(path) if path else None)
  return msgpack.packb(stored, use_bin_type=True)


def decode_record(data: bytes, where: str = 'record') -> dict[str, Any]:
  """A stored record, checked (check_record); bytes that are no record give an error record."""
  try:
    record = msgpack.unpackb(data, raw=False)
  except Exception as e:  # msgpack raises ValueError, FormatError, StackError, UnicodeDecodeError, ...
    return {'id': where, 'error': f'{where}: not a stored record ({type(e).__name__}: {e})'[:500],
            'error_kind': 'bad_record'}
  if isinstance(record, dict):
    # Media travel as bytes in shards: a path there would let a shard name any file of the reading machine.
    record = {k: v for k, v in record.items() if k not in ('video_path', '_index', '_task')}
  return check_record(record, where)


_SHARD = re.compile(r'\.array_record-(\d{5,})-of-(\d{5,})$')


def shard_paths(folder: str, split: str) -> list[str]:
  return sorted(glob.glob(os.path.join(glob.escape(folder), f'{glob.escape(split)}.array_record-*-of-*')))


def write_array_record(source_folder: str, output_folder: str, split: str, num_shards: int = 4,
                       media_root: Optional[str] = None, allow_outside_media: bool = False,
                       max_media_bytes: int = 0) -> list[str]:
  """Converts `{source_folder}/{split}.jsonl` and its media into `num_shards` ArrayRecord shards, in order.

  The shards replace those of an earlier conversion of the split in the output folder, whatever their number: the
  new ones are written under temporary names first, so a conversion that fails leaves the earlier shards whole,
  and only then renamed into place and the earlier ones deleted (a glob of both sets would read every record twice).
  """
  from array_record.python import array_record_module

  if num_shards < 1:
    raise ValueError(f'num_shards={num_shards}: need at least one shard')
  source = JsonlSource(source_folder, split, media_root, allow_outside_media)
  os.makedirs(output_folder, exist_ok=True)
  per_shard = -(-len(source) // num_shards)
  names = [f'{split}.array_record-{shard:05d}-of-{num_shards:05d}' for shard in range(num_shards)]
  paths = [os.path.join(output_folder, name) for name in names]
  # A leading dot keeps the temporary files out of shard_paths' glob.
  temporary = [os.path.join(output_folder, f'.{name}.tmp-{os.getpid()}') for name in names]
  earlier = shard_paths(output_folder, split)
  try:
    for shard, path in enumerate(temporary):
      writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
      for index in range(shard * per_shard, min((shard + 1) * per_shard, len(source))):
        writer.write(encode_record(source[index], max_media_bytes))
      writer.close()
    for path, final in zip(temporary, paths):
      os.replace(path, final)
  finally:
    for path in temporary:
      if os.path.exists(path):
        os.remove(path)
  for path in set(earlier) - set(paths):
    os.remove(path)
  return paths


def check_shards(paths: list[str], folder: str, split: str) -> None:
  """Refuses a set of shards that is not one conversion's: mixed `-of-N` counts, missing or doubled shards."""
  numbers = [_SHARD.search(os.path.basename(p)) for p in paths]
  if any(m is None for m in numbers):
    raise ValueError(f'{folder!r}: shard names not of the form {split}.array_record-NNNNN-of-NNNNN: '
                     f'{[os.path.basename(p) for p, m in zip(paths, numbers) if m is None]}')
  counts = {int(m.group(2)) for m in numbers}
  indices = sorted(int(m.group(1)) for m in numbers)
  if len(counts) != 1 or indices != list(range(next(iter(counts)))):
    raise ValueError(f'{folder!r} holds {len(paths)} {split} shards that are not one conversion (shard counts '
                     f'{sorted(counts)}, indices {indices}): reading them all would repeat or miss records; convert '
                     'the split again (it replaces the earlier shards) or delete the stale ones')


class ArrayRecordSource(grain.sources.RandomAccessDataSource):
  """ArrayRecord shards written by `write_array_record`, read with grain's ArrayRecordDataSource."""

  def __init__(self, folder: str, split: str):
    paths = shard_paths(folder, split)
    if not paths:
      raise FileNotFoundError(f'no ArrayRecord shards {split}.array_record-*-of-* in {folder!r}')
    check_shards(paths, folder, split)
    self._source = grain.sources.ArrayRecordDataSource(paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    where = f'record {index}'
    try:
      data = self._source[index]
    except Exception as e:  # a damaged shard: the reader's own error, whatever its type
      return {'id': where, 'error': f'{where}: cannot be read ({type(e).__name__}: {e})'[:500],
              'error_kind': 'bad_record'}
    return decode_record(data, where)

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
  return JsonlSource(dataset_folder(data_config), split, data_config.get('media_root') or None,
                     bool(data_config.get('allow_outside_media', False)), int(data_config.get('max_line_bytes', 0)))


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
