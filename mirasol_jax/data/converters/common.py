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
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

SPLITS = ('train', 'validation', 'test')
# Extensions looked for, in order of preference when one name has several files (compared in lower case).
VIDEO_EXTENSIONS = ('.mp4', '.mkv', '.webm', '.mov', '.m4v', '.avi', '.flv', '.mpg', '.mpeg', '.wmv', '.3gp', '.ts')
NUM_EXAMPLES = 5  # missing ids kept in the report per split
REPORT_FILE = 'conversion_report.json'
CLASSES_FILE = 'classes.txt'


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


def read_csv(path: str, header: bool = True) -> list:
  """Rows of a CSV file: dicts by column name (`header`) or lists."""
  with open(path, newline='', encoding='utf-8') as f:
    return list(csv.DictReader(f) if header else csv.reader(f))


def read_json(path: str) -> Any:
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def first_existing(folder: str, names: Iterable[str]) -> Optional[str]:
  """The path of the first of `names` that exists in `folder`, or None."""
  for name in names:
    if os.path.exists(os.path.join(folder, name)):
      return os.path.join(folder, name)
  return None


def atomic_write(path: str, text: str) -> None:
  temporary = f'{path}.tmp-{os.getpid()}'
  with open(temporary, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(temporary, path)


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


def parse_timestamp(text: str) -> float:
  """'HH:MM:SS.fff' (or 'MM:SS.fff', or seconds) -> seconds."""
  seconds = 0.0
  for part in text.strip().split(':'):
    seconds = seconds * 60 + float(part)
  return round(seconds, 3)
