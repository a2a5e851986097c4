"""VGG-Sound (Chen et al., "VGGSound: A Large-scale Audio-Visual Dataset", ICASSP 2020): 10 s YouTube clips, one of
about 300 sound classes each.

Expects in the annotations folder `vggsound.csv`, the file of the GitHub repository hche11/VGGSound (`data/`),
whose README documents its columns: a headerless CSV, one clip a line,

  YouTube ID, start seconds, label, train/test split      e.g.  ---g-f_I2yQ,1,people marching,test

(labels with a comma are quoted). Optionally `stat.csv` from the same folder (class name, clip count): the
repository's `datasets/dataloader.py` takes its class list from there, sorts it by name and uses the position in
that sorted list as the label index, dropping clips of other labels; with `stat.csv` present this converter does
the same, without it the class list is the sorted set of labels in `vggsound.csv`.

Media, looked up in this order under the media root (any folder, any video extension):
  `{youtube_id}_{start:06d}.*` a clip already cut to the 10 s (the name the repository's own `data/test.csv` and
                               `example_audio/` use): written without start / end;
  `{youtube_id}.*`             the whole YouTube video: written with start = start seconds, end = start + 10.

Splits: train -> train, test -> test. VGG-Sound has no validation split: train with
--config.data.eval_split=test (the command line prints it). Lines: `id` (`{youtube_id}_{start:06d}`), `label`,
`label_index`; `classes.txt` holds the class names in index order.
"""
from __future__ import annotations

import collections
import os
from typing import Union

from mirasol_jax.data.converters import common

ANNOTATION_FILE, CLASS_FILE = 'vggsound.csv', 'stat.csv'
CLIP_SECONDS = 10.0
SPLITS = {'train': 'train', 'test': 'test'}


def _clip(row: common.Fields) -> Union[tuple[str, float, str, str], common.Fields, None]:
  """(YouTube id, start seconds, label, split) of a line; the line itself when it has not the 4 fields (left out
  with a note); None for a comment."""
  if row[0].startswith('#'):
    return None
  if len(row) != 4:
    return row
  youtube_id, start, label, split = row
  if not youtube_id.strip():
    raise ValueError('the YouTube id (field 1) is empty')
  return youtube_id, common.parse_number(start, 'start seconds (field 2)'), label, split.strip()


def convert(annotations: str, media: str, output: str) -> dict:
  """Converts VGG-Sound; see the module docstring. Returns the report."""
  path = os.path.join(annotations, ANNOTATION_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{ANNOTATION_FILE} not in {annotations!r} (hche11/VGGSound data/vggsound.csv)')
  rows = [row for row in common.map_rows(path, _clip, header=False) if row is not None]
  clips = [row for row in rows if isinstance(row, tuple)]
  stat = os.path.join(annotations, CLASS_FILE)
  if os.path.exists(stat):
    classes = sorted(set(common.map_rows(stat, lambda row: row[0], header=False)))
    notes = [f'classes from {CLASS_FILE}, sorted by name']
  else:
    classes = sorted({label for _, _, label, _ in clips})
    notes = [f'{CLASS_FILE} not found: classes are the labels of {ANNOTATION_FILE}, sorted by name']
  index = {name: i for i, name in enumerate(classes)}
  splits, unknown = {}, collections.Counter()
  malformed = [row for row in rows if not isinstance(row, tuple)]
  if malformed:
    notes.append(f'{len(malformed)} lines of {ANNOTATION_FILE} without the 4 fields ytid,start,label,split left out '
                 f'(first: {malformed[0].location}, {list(malformed[0])!r})')
  for youtube_id, seconds, label, split in clips:
    if split not in SPLITS:
      unknown[split] += 1
      continue
    result = splits.setdefault(SPLITS[split], common.Split())
    if label not in index:
      result.skipped[f'label not in {CLASS_FILE}'] += 1
      continue
    clip = f'{youtube_id}_{int(seconds):06d}'
    result.annotations.append(common.Annotation(
        id=clip, candidates=[(clip, {}), (youtube_id, dict(start=seconds, end=seconds + CLIP_SECONDS))],
        fields=dict(label=label, label_index=index[label])))
  notes += [f'{count} rows of split {name!r} left out (neither train nor test)' for name, count in unknown.items()]
  return common.write_dataset('vggsound', splits, media, output, classes=classes, notes=notes)
