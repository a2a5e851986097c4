"""What every converter shares: finding media files by id, writing the dataset folder, and the conversion report.

A converter reads the official annotation files of its benchmark into `Annotation`s, one list per split of this
project (train / validation / test), and hands them to `write_dataset`, which

* looks each annotation's media up under the media root by file name without extension (`MediaIndex`: any of the
  usual video extensions, in any letter case, at any depth), trying the annotation's candidate names in order;
* writes `{output}/{split}.jsonl`, one JSON object a line: `id`, `video` (the media file relative to the media
  root), `start` / `end` where the candidate that matched gives them, then the task fields; annotations whose media
  is not found are counted as missing and left out, never fatal;
* writes `{output}/classes.txt` (one class name a line, in label-index order) for classification sets;
* writes the report (per split: annotations read, lines written, media missing with a few example ids, annotations
  skipped and why) to `{output}/conversion_report.json` and returns it.

Every file is written atomically (a temporary file renamed into place), so an interrupted run never leaves a
half-written split behind.

Reading the annotation files. Converters read every row through `map_rows` / `map_entries`: these hand each CSV
row or JSON entry to the converter's function and turn whatever goes wrong there (a KeyError, ValueError, TypeError
or IndexError) into one `AnnotationError` that names the file, the row's line as an editor numbers it (the header
is line 1) or the entry (its index in a JSON list, its key in a JSON object) and what is wrong, e.g. "train.csv,
line 17: class_id 'abc' is not a whole number". On a file of 200,000 lines that is the difference between fixing
the line and guessing. Rows are `Row`s: a missing column names the columns there are,
and `text`, `integer`, `number` and `timestamp` read a value with a message naming the column and the value. Every
file is read before anything is written, so a conversion stopped by a bad row leaves the output folder as it was.

What stops a conversion and what does not: a file that is not the expected one (a required column missing from the
header, JSON of another shape, text that is not UTF-8 or not CSV), a row with fewer fields than the header (or more
that are not empty), an identifier that is empty, a value the converter reads that is not of its form (a timestamp,
a number, a class index, JSON text that is null or a list) stop it with an `AnnotationError`: each means a damaged
file or another version of the dataset, and writing the rest would silently change the benchmark. Rows the official
files legitimately hold and the converter does not take (another class, no label, an answer that is not an option
index, a segment that ends before it starts, a duplicate id) are skipped and counted in the report, as before;
missing media is counted too, never fatal.
"""
from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, TypeVar, Union

T = TypeVar('T')

SPLITS = ('train', 'validation', 'test')
# Extensions looked for, in order of preference when one name has several files (compared in lower case).
VIDEO_EXTENSIONS = ('.mp4', '.mkv', '.webm', '.mov', '.m4v', '.avi', '.flv', '.mpg', '.mpeg', '.wmv', '.3gp', '.ts')
NUM_EXAMPLES = 5  # missing ids kept in the report per split
REPORT_FILE = 'conversion_report.json'
CLASSES_FILE = 'classes.txt'
SHOWN_CHARACTERS = 60  # of a bad value, in a message


class AnnotationError(ValueError):
  """A row or entry of an annotation file that cannot be converted.

  The message is `FILE, line N: reason` (CSV: the line as an editor numbers it, the header being line 1), `FILE,
  entry [I]: reason` (the index in a JSON list, from 0), `FILE, entry 'KEY': reason` (a JSON object's key) or
  `FILE: reason` (the whole file). `path` is the file's full path, `location` the `line N` / `entry ...` part (None
  for the whole file) and `reason` what is wrong.
  """

  def __init__(self, path: str, location: Optional[str], reason: str):
    self.path, self.location, self.reason = path, location, reason
    super().__init__(f'{os.path.basename(path)}{f", {location}" if location else ""}: {reason}')

  def __reduce__(self):  # picklable although __init__ takes three arguments
    return type(self), (self.path, self.location, self.reason)


class MissingKey(KeyError):
  """A column or field a row lacks; its message lists those the row has."""

  def __str__(self) -> str:
    return self.args[0]


def show(value: Any) -> str:
  """A value read from an annotation file, short, as it is written there (JSON's null, true, [...] for JSON)."""
  text = repr(value) if isinstance(value, str) else json.dumps(value, default=repr)
  return text if len(text) <= SHOWN_CHARACTERS else text[:SHOWN_CHARACTERS - 3] + '...'


def parse_integer(value: Any, name: str) -> int:
  """A whole number from CSV text or a JSON number; ValueError naming `name` and the value otherwise."""
  if isinstance(value, int) and not isinstance(value, bool):
    return value
  if isinstance(value, float) and value.is_integer():
    return int(value)
  if isinstance(value, str):
    try:
      return int(value.strip())
    except ValueError:
      pass
  raise ValueError(f'{name} {show(value)} is not a whole number')


def parse_number(value: Any, name: str) -> float:
  """A finite number from CSV text or a JSON number; ValueError naming `name` and the value otherwise."""
  number = None
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    number = float(value)
  elif isinstance(value, str):
    try:
      number = float(value.strip())
    except ValueError:
      pass
  if number is None or not math.isfinite(number):
    raise ValueError(f'{name} {show(value)} is not a number')
  return number


def parse_timestamp(text: Any, name: str = 'timestamp') -> float:
  """'HH:MM:SS.fff' (or 'MM:SS.fff', or seconds) -> seconds; ValueError naming `name` and the text otherwise."""
  parts = text.strip().split(':') if isinstance(text, str) else []
  if not (1 <= len(parts) <= 3 and all(re.fullmatch(r'\d+', part) for part in parts[:-1])
          and re.fullmatch(r'\d+(\.\d*)?', parts[-1])):
    raise ValueError(f'{name} {show(text)} is not HH:MM:SS.fff')
  seconds = 0.0
  for part in parts:
    seconds = seconds * 60 + float(part)
  return round(seconds, 3)


@dataclasses.dataclass
class Annotation:
  """One example before its media is looked up.

  Attributes:
    id: the unique id written as the line's `id`.
    candidates: (file name without extension, fields that name implies) pairs, tried in order; the first name with a
      media file wins and its fields (`start` / `end`, typically) go into the line. A name with a `/` is a path
      relative to the media root; a name without one matches a file of that name in any folder.
    fields: the task fields (question, answer, label...), written after `id`, `video`, `start`, `end`.
  """
  id: str
  candidates: Sequence[tuple[str, Mapping[str, Any]]]
  fields: Mapping[str, Any]


@dataclasses.dataclass
class Split:
  """The annotations of one split, and how many official annotations were not taken, by reason."""
  annotations: list[Annotation] = dataclasses.field(default_factory=list)
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def add(self, items: Iterable[Union[Annotation, str]]) -> None:
    """Takes the annotations of `items`; a string is the reason an official annotation was not taken, counted."""
    for item in items:
      if isinstance(item, str):
        self.skipped[item] += 1
      else:
        self.annotations.append(item)


class Row(dict):
  """One CSV row by column name, or one JSON object by field name, that knows where it was read (`location`).

  A key it lacks raises `MissingKey` naming the key and those it has ("no column 'video' (columns: ...)"); the
  accessors below read a value of a given form, or raise a ValueError naming the key and the value.
  """

  def __init__(self, values: Mapping[str, Any], location: str, noun: str = 'column'):
    super().__init__(values)
    self.location, self.noun = location, noun  # noun: 'column' (CSV) or 'field' (JSON)

  def __missing__(self, key):
    raise MissingKey(f'no {self.noun} {key!r} ({self.noun}s: {", ".join(map(str, self)) or "none"})')

  def text(self, key: str, empty: bool = True) -> str:
    """The value as text: a string, or a JSON number (ids are numbers in some releases). `empty=False` refuses an
    empty or blank one (for ids and media names)."""
    value = self[key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
      raise ValueError(f'{key} is {show(value)}, not text')
    value = str(value)
    if not empty and not value.strip():
      raise ValueError(f'{key} is empty')
    return value

  def integer(self, key: str) -> int:
    return parse_integer(self[key], key)

  def number(self, key: str) -> float:
    return parse_number(self[key], key)

  def timestamp(self, key: str) -> float:
    return parse_timestamp(self[key], key)


class Fields(list):
  """The fields of one row of a CSV file without a header, and where it was read (`location`)."""

  def __init__(self, values: Iterable[str], location: str):
    super().__init__(values)
    self.location = location


class MediaIndex:
  """The media files under a root, by file name without extension (and by path without extension)."""

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise FileNotFoundError(f'media root {root!r} is not a folder')
    self.root = os.path.abspath(root)
    by_name, by_path = collections.defaultdict(list), {}
    rank = {ext: i for i, ext in enumerate(VIDEO_EXTENSIONS)}
    seen_dirs = set()
    for folder, dirs, files in os.walk(self.root, followlinks=True):
      real = os.path.realpath(folder)
      if real in seen_dirs:  # reached again through a link
        dirs[:] = []
        continue
      seen_dirs.add(real)
      dirs.sort()
      for name in files:
        stem, ext = os.path.splitext(name)
        if ext.lower() not in rank:
          continue
        relative = os.path.relpath(os.path.join(folder, name), self.root).replace(os.sep, '/')
        by_name[stem].append((rank[ext.lower()], relative))
        key = relative[:-len(ext)]
        if key not in by_path or rank[ext.lower()] < by_path[key][0]:
          by_path[key] = (rank[ext.lower()], relative)
    self._by_name = {stem: min(paths)[1] for stem, paths in by_name.items()}
    self._by_path = {key: value[1] for key, value in by_path.items()}

  def __len__(self) -> int:
    return len(self._by_path)

  def find(self, name: str) -> Optional[str]:
    """The media file (relative to the root) named `name` without extension, or None."""
    if '/' in name:
      return self._by_path.get(name.strip('/'))
    return self._by_name.get(name)


def present_splits(annotations: str, files: Mapping[str, Union[str, Sequence[str]]], splits: dict, notes: list):
  """(split, path of its annotation file, its new Split in `splits`) for each split of `files` (split -> file name,
  or the names it may have, the first present taken) whose file is in the annotations folder; a missing file adds a
  note instead."""
  for split, names in files.items():
    names = (names,) if isinstance(names, str) else tuple(names)
    path = first_existing(annotations, names)
    if path is None:
      notes.append(f'{" / ".join(names)} not found: no {split} split')
      continue
    splits[split] = Split()
    yield split, path, splits[split]


def _map_located(path: str, items: Iterable[tuple[str, tuple]], handle: Callable[..., T]) -> list[T]:
  """handle(*args) for each (location, args) of `items`; a KeyError, ValueError, TypeError or IndexError it raises
  becomes an `AnnotationError` naming `path` and the location (one that is already one passes unchanged)."""
  results = []
  for location, args in items:
    try:
      results.append(handle(*args))
    except AnnotationError:
      raise
    except (KeyError, ValueError, TypeError, IndexError) as e:
      reason = str(e) if isinstance(e, (ValueError, MissingKey)) else f'{type(e).__name__}: {e}'
      raise AnnotationError(path, location, reason) from e
  return results


def map_rows(path: str, handle: Callable[[Any], T], header: bool = True, required: Sequence[str] = ()) -> list[T]:
  """`handle` applied to each row of a CSV file, in order; what goes wrong names the file and the row's line.

  Args:
    path: the CSV file (UTF-8, with or without a byte-order mark).
    handle: takes a `Row` by column name (`header`) or the row's `Fields` (no header); blank lines are passed over.
    header: whether the first line names the columns. A row with fewer fields than the header, or more that are
      not empty, is an error.
    required: columns the header must have (else an error on line 1, before any row is read: the wrong file or
      version); a file without a header line is then an error too.
  """
  return _map_located(path, ((row.location, (row,)) for row in _csv_rows(path, header, required)), handle)


def map_entries(path: str, handle: Callable[..., T], container: type = list) -> list[T]:
  """`handle` applied to each entry of a JSON file, in order; what goes wrong names the file and the entry.

  `container` list: the file must hold a list of objects; `handle(entry)` gets each as a `Row` by field name.
  `container` dict: the file must hold an object; `handle(key, value)` gets each member, an object value as a `Row`.
  """
  data = read_json(path)
  if not isinstance(data, container):
    raise AnnotationError(path, None, f'a JSON {"list" if container is list else "object"} expected, the file holds '
                                      f'{show(data)}')
  return _map_located(path, _list_entries(path, data) if container is list else _members(data), handle)


def _list_entries(path: str, data: list) -> Iterator[tuple[str, tuple[Row]]]:
  for i, entry in enumerate(data):
    location = f'entry [{i}]'
    if not isinstance(entry, dict):
      raise AnnotationError(path, location, f'a JSON object expected, found {show(entry)}')
    yield location, (Row(entry, location, 'field'),)


def _members(data: dict) -> Iterator[tuple[str, tuple[str, Any]]]:
  for key, value in data.items():
    location = f'entry {key!r}'
    yield location, (key, Row(value, location, 'field') if isinstance(value, dict) else value)


def _csv_rows(path: str, header: bool, required: Sequence[str]) -> Iterator[Union[Row, Fields]]:
  try:
    with open(path, newline='', encoding='utf-8-sig') as f:
      reader, columns, header_location = csv.reader(f), None, None
      while True:
        location = f'line {reader.line_num + 1}'  # where the next row starts (the reader counts lines consumed)
        try:
          fields = next(reader)
        except StopIteration:
          break
        except csv.Error as e:
          raise AnnotationError(path, location, f'not CSV ({e})') from None
        if not fields:
          continue
        if not header:
          yield Fields(fields, location)
        elif columns is None:
          columns, header_location = fields, location
          missing = [name for name in required if name not in columns]
          if missing:
            raise AnnotationError(path, location, f'no column{"s" * (len(missing) > 1)} '
                                                  f'{", ".join(map(repr, missing))} (columns: {", ".join(columns)})')
        elif len(fields) != len(columns) and (len(fields) < len(columns) or
                                              any(value.strip() for value in fields[len(columns):])):
          raise AnnotationError(path, location, f'{len(fields)} fields, the header ({header_location}) has '
                                                f'{len(columns)}')
        else:
          yield Row(zip(columns, fields), location)
  except UnicodeDecodeError:
    raise AnnotationError(path, _undecodable(path), 'not UTF-8 text') from None
  if header and required and columns is None:
    raise AnnotationError(path, None, f'no header line (expected the columns {", ".join(required)})')


def _undecodable(path: str) -> Optional[str]:
  """The line of the first byte of `path` that is not UTF-8."""
  with open(path, 'rb') as f:
    data = f.read()
  try:
    data.decode('utf-8')
  except UnicodeDecodeError as e:
    lines_before = data.count(b'\n', 0, e.start)
    return f'line {lines_before + 1}'
  return None


def read_json(path: str) -> Any:
  """The content of a JSON file; an `AnnotationError` naming the line and column where it is not JSON."""
  try:
    with open(path, encoding='utf-8-sig') as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise AnnotationError(path, f'line {e.lineno} column {e.colno}', f'not JSON ({e.msg})') from None
  except UnicodeDecodeError:
    raise AnnotationError(path, _undecodable(path), 'not UTF-8 text') from None


def first_existing(folder: str, names: Iterable[str]) -> Optional[str]:
  """The path of the first of `names` that exists in `folder`, or None."""
  for name in names:
    if os.path.exists(os.path.join(folder, name)):
      return os.path.join(folder, name)
  return None


def atomic_write(path: str, text: str) -> None:
  """Writes `path` whole or not at all (a failed write, a full disk, removes its temporary file)."""
  temporary = f'{path}.tmp-{os.getpid()}'
  try:
    with open(temporary, 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(temporary)
    raise


def write_dataset(benchmark: str, splits: Mapping[str, Split], media_root: str, output: str,
                  classes: Optional[Sequence[str]] = None, notes: Sequence[str] = ()) -> dict[str, Any]:
  """Looks the media up, writes the split files, `classes.txt` and the report; returns the report.

  Args:
    benchmark: the converter's name, for the report.
    splits: project split name (train / validation / test) -> its annotations. Splits left out get no file (one
      left from an earlier run in `output` is removed).
    media_root: the folder the `video` paths are relative to.
    output: the dataset folder to write (created if needed).
    classes: the class names in label-index order, for classification sets.
    notes: lines for the report (which files were read, what was assumed).
  """
  unknown = set(splits) - set(SPLITS)
  if unknown:
    raise ValueError(f'unknown split names {sorted(unknown)}; expected some of {SPLITS}')
  index = MediaIndex(media_root)
  os.makedirs(output, exist_ok=True)
  report = dict(benchmark=benchmark, output=os.path.abspath(output), media_root=index.root, media_files=len(index),
                splits={}, notes=list(notes))
  seen = set()
  for name in SPLITS:
    path = os.path.join(output, f'{name}.jsonl')
    if name not in splits:
      if os.path.exists(path):
        os.remove(path)
      continue
    split = splits[name]
    lines, missing, skipped = [], [], collections.Counter(split.skipped)
    for annotation in split.annotations:
      if annotation.id in seen:
        skipped['duplicate id'] += 1
        continue
      seen.add(annotation.id)
      for candidate, implied in annotation.candidates:
        video = index.find(candidate)
        if video is not None:
          lines.append(json.dumps(dict(id=annotation.id, video=video, **implied, **annotation.fields)) + '\n')
          break
      else:
        missing.append(annotation.id)
    atomic_write(path, ''.join(lines))
    report['splits'][name] = dict(annotations=len(split.annotations) + sum(split.skipped.values()),
                                  written=len(lines), missing=len(missing), missing_examples=missing[:NUM_EXAMPLES],
                                  skipped=dict(sorted(skipped.items())))
  if classes is not None:
    atomic_write(os.path.join(output, CLASSES_FILE), ''.join(f'{c}\n' for c in classes))
    report['num_classes'] = len(classes)
  atomic_write(os.path.join(output, REPORT_FILE), json.dumps(report, indent=1) + '\n')
  return report


def format_report(report: Mapping[str, Any]) -> str:
  """The report as a few lines of text."""
  lines = [f'{report["benchmark"]} -> {report["output"]}',
           f'media root {report["media_root"]} ({report["media_files"]} media files)',
           f'{"split":<11} {"annotations":>11} {"written":>8} {"missing":>8} {"skipped":>8}']
  for name, split in report['splits'].items():
    line = (f'{name:<11} {split["annotations"]:>11} {split["written"]:>8} {split["missing"]:>8} '
            f'{sum(split["skipped"].values()):>8}')
    if split['missing_examples']:
      line += '   missing e.g. ' + ', '.join(split['missing_examples'])
    lines.append(line)
    for reason, count in split['skipped'].items():
      lines.append(f'{"":<11} skipped {count}: {reason}')
  if 'num_classes' in report:
    lines.append(f'{report["num_classes"]} classes in {CLASSES_FILE}')
  lines += [f'note: {note}' for note in report['notes']]
  return '\n'.join(lines)
