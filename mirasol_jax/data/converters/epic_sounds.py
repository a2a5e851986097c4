"""EPIC-SOUNDS (Huh et al., "EPIC-SOUNDS: A Large-Scale Dataset of Actions that Sound", ICASSP 2023): labelled
segments of the audio of the EPIC-KITCHENS-100 videos, 44 classes.

Expects in the annotations folder the CSV files of the GitHub repository epic-kitchens/epic-sounds-annotations,
whose README documents their columns:

* `EPIC_Sounds_train.csv`, `EPIC_Sounds_validation.csv`: annotation_id, participant_id, video_id, start_timestamp,
  stop_timestamp, start_sample, stop_sample, description, class, class_id (older versions lack the two sample
  columns, which are not read). Timestamps are `HH:mm:ss.SSS` in the untrimmed video `video_id` (e.g. P01_11).
* `EPIC_Sounds_recognition_test_timestamps.csv`: the same without description / class / class_id: the test labels
  are not public, so the test lines have no label.

The class list (`CLASSES`, index = `class_id`) is the set of (class_id, class) pairs of EPIC_Sounds_validation.csv
in that repository, where all 44 occur; annotations whose pair disagrees with it stop the conversion (they would be
from another version of the dataset), and so does a train or validation row whose class_id is empty or not a whole
number, or a timestamp not of the form above (the error names the file and the line). A segment whose stop is not
after its start is skipped and counted.

Media: the EPIC-KITCHENS-100 videos, `{video_id}.*` in any folder under the media root (the download scripts write
`P01/videos/P01_11.MP4`; the extension's case does not matter). Each line is a segment: start / end in seconds.

Splits: train -> train, validation -> validation, recognition test -> test. Lines: `id` (the annotation_id),
`start`, `end`, `label` (the class), `label_index` (the class_id); `classes.txt` holds the 44 names.
"""
from __future__ import annotations

from typing import Union

from mirasol_jax.data.converters import common

CLASSES = (
    'metal-only collision', 'scrub / scrape / scour / wipe', 'cut / chop', 'open / close', 'rustle', 'water',
    'plastic-only collision', 'footstep', 'stir / mix / whisk', 'slide object', 'metal / wood collision',
    'metal / plastic collision', 'metal / ceramic collision', 'background', 'ceramic-only collision', 'beep', 'click',
    'metal / glass collision', 'paper-only collision', 'pour', 'glass-only collision', 'wood-only collision',
    'plastic / paper collision', 'metal / paper collision', 'human', 'metal / cloth collision',
    'plastic / ceramic collision', 'plastic / wood collision', 'metal / marble collision', 'sizzling / boiling',
    'ceramic / glass collision', 'plastic / marble collision', 'plastic / glass collision',
    'kettle / mixer / appliance', 'ceramic / wood collision', 'kneading', 'cloth-only collision',
    'ceramic / marble collision', 'glass / marble collision', 'wood / glass collision', 'hoover / fan', 'spray', 'zip',
    'drink / eat',
)
FILES = {'train': 'EPIC_Sounds_train.csv', 'validation': 'EPIC_Sounds_validation.csv',
         'test': 'EPIC_Sounds_recognition_test_timestamps.csv'}
COLUMNS = ('annotation_id', 'video_id', 'start_timestamp', 'stop_timestamp')  # those read
LABEL_COLUMNS = ('class', 'class_id')  # read too, in the train and validation files


def _annotation(row: common.Row) -> Union[common.Annotation, str]:
  """The annotation of a row, or why it is skipped."""
  annotation_id, video = row.text('annotation_id', empty=False), row.text('video_id', empty=False)
  start, end = row.timestamp('start_timestamp'), row.timestamp('stop_timestamp')
  fields = {}
  if 'class_id' in row:  # the train and validation files (required there); the test file has no labels
    label_index, label = row.integer('class_id'), row['class']
    if not 0 <= label_index < len(CLASSES) or CLASSES[label_index] != label:
      official = CLASSES[label_index] if 0 <= label_index < len(CLASSES) else 'no such id'
      raise ValueError(f'{annotation_id} has class_id {label_index} = {label!r}, the official list has {official!r}')
    fields = dict(label=label, label_index=label_index)
  if end <= start:
    return 'stop_timestamp not after start_timestamp'
  return common.Annotation(id=annotation_id, candidates=[(video, dict(start=start, end=end))], fields=fields)


def convert(annotations: str, media: str, output: str) -> dict:
  """Converts EPIC-SOUNDS (audio-based interaction recognition); see the module docstring. Returns the report."""
  splits, notes = {}, []
  for split, path, result in common.present_splits(annotations, FILES, splits, notes):
    required = COLUMNS + (LABEL_COLUMNS if split != 'test' else ())
    result.add(common.map_rows(path, _annotation, required=required))
  if not splits:
    raise FileNotFoundError(f'none of {sorted(FILES.values())} in {annotations!r} '
                            '(epic-kitchens/epic-sounds-annotations)')
  return common.write_dataset('epic_sounds', splits, media, output, classes=CLASSES, notes=notes)
