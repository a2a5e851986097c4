"""NExT-QA, multiple choice (Xiao et al., "NExT-QA: Next Phase of Question-Answering to Explaining Temporal Actions",
CVPR 2021): five answer options per question on VidOR videos.

Expects in the annotations folder the files of `nextqa.zip` from the GitHub repository doc-doc/NExT-QA (which keeps
`dataset/nextqa/val.csv`, `test.csv` and `map_vid_vidorID.json` in the repository itself): `train.csv`, `val.csv`,
`test.csv`, and optionally `map_vid_vidorID.json`. The CSV columns, as in those files and as read by the
repository's `dataloader/sample_loader.py`:

  video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4

`video` is the video id, `qid` the question's number within the video (so `{video}_{qid}` is unique, the key the
loader uses), `answer` the index (0-4) of the correct option among `a0`..`a4`, `type` the question type, one of CW,
CH, TN, TC, TP, DC, DL, DO: the first letter is the group (causal, temporal, descriptive), e.g. TC = temporal,
co-occurring (the repository's issue #11). `map_vid_vidorID.json` maps a video id to its VidOR path without
extension, e.g. "2909445186": "0101/2909445186".

Media: the VidOR videos (NExTVideo), found at the mapped path (relative to the media root) or else as `{video}.*` in
any folder under it. Whole videos: no start / end.

Splits: train.csv -> train, val.csv -> validation, test.csv -> test. Lines: `id` (`{video}_{qid}`), `question`,
`options` (a0..a4 in order), `answer` (the correct option's text), `answer_index`, `kind` (the type).
"""
from __future__ import annotations

import os
from typing import Union

from mirasol_jax.data.converters import common

FILES = {'train': 'train.csv', 'validation': 'val.csv', 'test': 'test.csv'}
MAP_FILE = 'map_vid_vidorID.json'
COLUMNS = ('video', 'question', 'answer', 'qid', 'type', 'a0', 'a1', 'a2', 'a3', 'a4')  # those read


def _option_columns(row: dict) -> list[str]:
  """a0, a1, ... in numeric order."""
  return sorted((c for c in row if c and c[0] == 'a' and c[1:].isdigit()), key=lambda c: int(c[1:]))


def _vidor_path(video: str, path: object) -> tuple[str, str]:
  """A member of map_vid_vidorID.json: video id -> VidOR path without extension."""
  if not isinstance(path, str) or not path.strip():
    raise ValueError(f'the VidOR path is {common.show(path)}, not a path')
  return video, path


def _annotation(row: common.Row, vidor: dict) -> Union[common.Annotation, str]:
  """The annotation of a row, or why it is skipped."""
  video, options = row.text('video', empty=False), [row[c] for c in _option_columns(row)]
  qid = row.text('qid', empty=False)
  try:
    index = int(row['answer'])
  except ValueError:
    index = -1
  if not 0 <= index < len(options):
    return 'answer is not an option index'
  candidates = [(vidor[video], {})] if video in vidor else []
  return common.Annotation(
      id=f'{video}_{qid}', candidates=candidates + [(video, {})],
      fields=dict(question=row['question'], options=options, answer=options[index], answer_index=index,
                  kind=row['type']))


def convert(annotations: str, media: str, output: str) -> dict:
  """Converts NExT-QA (multiple choice); see the module docstring. Returns the report."""
  map_path = os.path.join(annotations, MAP_FILE)
  vidor = dict(common.map_entries(map_path, _vidor_path, container=dict)) if os.path.exists(map_path) else {}
  splits, notes = {}, [] if vidor else [f'{MAP_FILE} not found: videos found by id alone']
  for split, path, result in common.present_splits(annotations, FILES, splits, notes):
    result.add(common.map_rows(path, lambda row: _annotation(row, vidor), required=COLUMNS))
  if not splits:
    raise FileNotFoundError(f'none of {sorted(FILES.values())} in {annotations!r} (doc-doc/NExT-QA nextqa.zip)')
  return common.write_dataset('next_qa', splits, media, output, notes=notes)
