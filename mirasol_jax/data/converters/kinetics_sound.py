"""Kinetics-Sound: the Kinetics clips of the action classes that can be both seen and heard.

The class list. Arandjelović & Zisserman, "Look, Listen and Learn" (ICCV 2017, appendix A1 of arXiv:1705.08168)
define Kinetics-Sounds as 34 Kinetics classes, named as in the Kinetics version they used:

  blowing nose, bowling, chopping wood, ripping paper, shuffling cards, singing, tapping pen, typing, blowing out,
  dribbling ball, laughing, mowing the lawn by pushing lawnmower, shoveling snow, stomping, tap dancing, tapping
  guitar, tickling, fingerpicking, patting, playing accordion, playing bagpipes, playing bass guitar, playing
  clarinet, playing drums, playing guitar, playing harmonica, playing keyboard, playing organ, playing piano,
  playing saxophone, playing trombone, playing trumpet, playing violin, playing xylophone

Three of them (typing, fingerpicking, patting) have no class in the released Kinetics-400, and four carry other
names there (blowing out -> blowing out candles, dribbling ball -> dribbling basketball, mowing the lawn by pushing
lawnmower -> mowing lawn, stomping -> stomping grapes). A Kinetics-Sound built from the released Kinetics-400, as
later audio-visual classification work builds it, can therefore only hold the remaining 31 classes under their
Kinetics-400 names: the 31-class variant, which this converter takes, in the order of the paper's list (`CLASSES`
below; the position is `label_index`).

Expects in the annotations folder the Kinetics-400 annotation CSVs: `train.csv`, `validate.csv` (the DeepMind
release's name) or `val.csv` (the CVDF mirror's, see the GitHub repository cvdfoundation/kinetics-dataset), and
`test.csv`, with the header `label,youtube_id,time_start,time_end,split` (some releases add `is_cc`), as read by
the downloader in the GitHub repository activitynet/ActivityNet (`Crawler/Kinetics/download.py`). Rows of other
classes are skipped (counted in the report); so are rows without a label (the first test.csv had none).

Media, looked up in this order under the media root (any folder, any video extension):
  `{youtube_id}_{time_start:06d}_{time_end:06d}.*` the clip as that downloader and the CVDF mirror name it, already
                                                   cut: written without start / end;
  `{youtube_id}.*`                                 the whole YouTube video: written with start = time_start and
                                                   end = time_end.

Splits: train.csv -> train, validate.csv / val.csv -> validation, test.csv -> test. Lines: `id`
(`{youtube_id}_{time_start:06d}_{time_end:06d}`), `label` (the Kinetics-400 name), `label_index`; `classes.txt`
holds the 31 names in index order.
"""
from __future__ import annotations

from typing import Union

from mirasol_jax.data.converters import common

CLASSES = (
    'blowing nose', 'bowling', 'chopping wood', 'ripping paper', 'shuffling cards', 'singing', 'tapping pen',
    'blowing out candles', 'dribbling basketball', 'laughing', 'mowing lawn', 'shoveling snow', 'stomping grapes',
    'tap dancing', 'tapping guitar', 'tickling', 'playing accordion', 'playing bagpipes', 'playing bass guitar',
    'playing clarinet', 'playing drums', 'playing guitar', 'playing harmonica', 'playing keyboard', 'playing organ',
    'playing piano', 'playing saxophone', 'playing trombone', 'playing trumpet', 'playing violin', 'playing xylophone',
)
FILES = {'train': ('train.csv',), 'validation': ('validate.csv', 'val.csv'), 'test': ('test.csv',)}
COLUMNS = ('youtube_id', 'time_start', 'time_end')  # required; `label` may be absent (the first test.csv)


def _annotation(row: common.Row, index: dict) -> Union[common.Annotation, str]:
  """The annotation of a row, or why it is skipped."""
  label = (row.get('label') or '').strip().strip('"')
  youtube_id = row.text('youtube_id', empty=False)
  start, end = row.number('time_start'), row.number('time_end')
  if not label:
    return 'no label'
  if label not in index:
    return 'not a Kinetics-Sound class'
  clip = f'{youtube_id}_{int(start):06d}_{int(end):06d}'
  return common.Annotation(id=clip, candidates=[(clip, {}), (youtube_id, dict(start=start, end=end))],
                           fields=dict(label=label, label_index=index[label]))


def convert(annotations: str, media: str, output: str) -> dict:
  """Converts the Kinetics-Sound subset of Kinetics-400; see the module docstring. Returns the report."""
  index = {name: i for i, name in enumerate(CLASSES)}
  splits, notes = {}, [f'{len(CLASSES)} Kinetics-400 classes (Look, Listen and Learn, without typing, fingerpicking, '
                       'patting)']
  for split, path, result in common.present_splits(annotations, FILES, splits, notes):
    result.add(common.map_rows(path, lambda row: _annotation(row, index), required=COLUMNS))
  if not splits:
    raise FileNotFoundError(f'no train.csv / validate.csv / val.csv / test.csv in {annotations!r} (Kinetics-400 '
                            'annotations)')
  return common.write_dataset('kinetics_sound', splits, media, output, classes=CLASSES, notes=notes)
