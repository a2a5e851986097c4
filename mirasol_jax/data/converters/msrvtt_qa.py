"""MSRVTT-QA (Xu et al., "Video Question Answering via Gradually Refined Attention over Appearance and Motion",
ACM MM 2017): open-ended questions on the 10,000 MSR-VTT clips.

Expects in the annotations folder the files of the official release (MSRVTT-QA.zip, linked from the README of the
GitHub repository xudejing/video-question-answering): `train_qa.json`, `val_qa.json`, `test_qa.json`. Each is a JSON
list of objects with `id` (int, unique question id), `video_id` (int), `question`, `answer` (str) and `category_id`
(int, the question category). The fields are those read by that repository's `preprocess_msrvttqa.py` and
`util/dataset.py` (which index MSR-VTT clip `video{video_id}`) and by yukw777/video-vlm-eval
(`video_vlm_eval/dataset/msrvtt_qa.py`, which maps `video_id` N to the file `videoN.*` and reads `category_id`).

Media: the MSR-VTT clips, `video{video_id}.mp4` (any extension, any folder under the media root). Whole clips: no
start / end.

Splits: train_qa.json -> train, val_qa.json -> validation, test_qa.json -> test. Lines: `id` (the question id),
`question`, `answer`, `kind` (str(category_id): the release names no categories, so the number is kept as it is).
"""
from __future__ import annotations

from mirasol_jax.data.converters import common

FILES = {'train': 'train_qa.json', 'validation': 'val_qa.json', 'test': 'test_qa.json'}


def _annotation(entry: common.Row) -> common.Annotation:
  fields = dict(question=entry.text('question'), answer=entry.text('answer'))
  if entry.get('category_id') is not None:
    fields['kind'] = entry.text('category_id')
  return common.Annotation(id=entry.text('id', empty=False),
                           candidates=[(f'video{entry.text("video_id", empty=False)}', {})], fields=fields)


def convert(annotations: str, media: str, output: str) -> dict:
  """Converts MSRVTT-QA; see the module docstring. Returns the report."""
  splits, notes = {}, []
  for split, path, result in common.present_splits(annotations, FILES, splits, notes):
    result.add(common.map_entries(path, _annotation))
  if not splits:
    raise FileNotFoundError(f'none of {sorted(FILES.values())} in {annotations!r} (the MSRVTT-QA release)')
  return common.write_dataset('msrvtt_qa', splits, media, output, notes=notes)
