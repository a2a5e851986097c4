"""ActivityNet-QA (Yu et al., "ActivityNet-QA: A Dataset for Understanding Complex Web Videos via Question
Answering", AAAI 2019): open-ended questions on ActivityNet videos.

Expects in the annotations folder the files of the GitHub repository MILVLG/activitynet-qa (folder `dataset/`):
`{split}_q.json` and `{split}_a.json` for split train / val / test. The format is documented in that repository's
`dataset/README.md` (and read the same way by its `evaluation/eval.py`):

* `*_q.json`: a JSON list of {"video_name": str, "question": str, "question_id": str}; `video_name` is the YouTube
  id of the ActivityNet video.
* `*_a.json`: a JSON list of {"answer": str, "type": int, "question_id": str}; `type` is 0 motion, 1 spatial
  relationship, 2 temporal relationship, or, for the "free" questions, the answer type: 3 yes/no, 4 color, 5 object,
  6 location, 7 number, 8 other.

Questions and answers are joined by `question_id`. A split whose `_a.json` is absent (the test answers were held
back at first) is written without answers.

Media: ActivityNet videos, found as `v_{video_name}.*` (the name the ActivityNet downloads use) or `{video_name}.*`,
in any folder under the media root. Whole videos: no start / end.

Splits: train -> train, val -> validation, test -> test. Lines: `id` (the question id), `question`, `answer`,
`kind` (the type's name: motion, spatial, temporal, yes_no, color, object, location, number, other).
"""
from __future__ import annotations

import os
from typing import Union

from mirasol_jax.data.converters import common

FILES = {'train': 'train_q.json', 'validation': 'val_q.json', 'test': 'test_q.json'}
KINDS = ('motion', 'spatial', 'temporal', 'yes_no', 'color', 'object', 'location', 'number', 'other')


def _answer(entry: common.Row) -> tuple[str, dict]:
  """(question id, the fields it gives: answer, kind) of an entry of `*_a.json`."""
  kind = entry.integer('type')
  return entry.text('question_id', empty=False), dict(
      answer=entry.text('answer'), kind=KINDS[kind] if 0 <= kind < len(KINDS) else str(kind))


def _annotation(entry: common.Row, answers: dict) -> Union[common.Annotation, str]:
  """The annotation of an entry of `*_q.json`, or why it is skipped."""
  question_id, video = entry.text('question_id', empty=False), entry.text('video_name', empty=False)
  fields = dict(question=entry.text('question'))
  if question_id in answers:
    fields.update(answers[question_id])
  elif answers:
    return 'no answer for the question id'
  return common.Annotation(id=question_id, candidates=[(f'v_{video}', {}), (video, {})], fields=fields)


def convert(annotations: str, media: str, output: str) -> dict:
  """Converts ActivityNet-QA; see the module docstring. Returns the report."""
  splits, notes = {}, []
  for split, questions_path, result in common.present_splits(annotations, FILES, splits, notes):
    name = os.path.basename(questions_path)[:-len('_q.json')]
    answers_path = os.path.join(annotations, f'{name}_a.json')
    answers = {}
    if os.path.exists(answers_path):
      answers = dict(common.map_entries(answers_path, _answer))
    else:
      notes.append(f'{name}_a.json not found: {split} written without answers')
    result.add(common.map_entries(questions_path, lambda entry: _annotation(entry, answers)))
  if not splits:
    raise FileNotFoundError(f'no {{train,val,test}}_q.json in {annotations!r} (MILVLG/activitynet-qa dataset/)')
  return common.write_dataset('activitynet_qa', splits, media, output, notes=notes)
