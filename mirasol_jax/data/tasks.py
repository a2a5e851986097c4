"""Tasks: what the text decoder reads of a record (the prompt) and what it must write (the target).

A task is a source (config.data's `source`, `path`, `media_root`, splits) plus a prompt template and a target field:

  open-ended QA      prompt '{question}'            target 'answer'
  captioning         prompt '' or '{title}'         target 'captions' (several references) or 'caption'
  classification     prompt 'what is happening?'    target 'label' (a class name)
  multiple choice    prompt '{question}'            target 'answer' (the right option's text); the options are
                                                    scored by the evaluator (evaluators/multiple_choice.py)

The template is Python's str.format over the record's fields; a field the record lacks reads as empty, `{options}`
reads as the options joined by ' | ', and lines left empty are dropped. An empty template (the default) is the
title, the question and 'options: a | b | c', each on its own line when present. An empty target field (the
default) is the first of answer, caption, captions and label that the record has.

A target field may hold several references (a list, e.g. a clip's captions): training draws one at random every
time the example is read (the task's `reference='random'`, the default) or always reads the first
(`reference='first'`), evaluation reads the first, and the caption metrics read them all (`references`).

config.data.tasks names several tasks mixed in training (data/pipeline.py): each entry overrides fields of
config.data (source, path, media_root, train_split, eval_split, prompt, target, reference) and has a `weight`.
"""
from __future__ import annotations

import string
from typing import Any, Mapping, Optional

import ml_collections
import numpy as np

from mirasol_jax.data import tokenizer as tokenizer_lib

TARGET_FIELDS = ('answer', 'caption', 'captions', 'label')
# The fields of config.data that a task of config.data.tasks may set; the rest (decoding, tokenizer) are shared.
TASK_FIELDS = ('source', 'path', 'media_root', 'train_split', 'eval_split', 'prompt', 'target', 'reference')
REFERENCE_CHOICES = ('random', 'first')


class _Fields(dict):
  """A record's fields as text, each converted only when the template names it (a record may hold its whole media
  file in `video_bytes`); a field the record lacks reads as empty."""

  def __init__(self, record: Mapping[str, Any]):
    super().__init__()
    self._record = record

  def __missing__(self, key):
    return _as_text(self._record.get(key))


def _as_text(value: Any) -> str:
  if value is None:
    return ''
  if isinstance(value, (list, tuple)):
    return ' | '.join(str(v) for v in value)
  return str(value)


def prompt(record: Mapping[str, Any], template: str = '') -> str:
  """The decoder's context of a record under `template` (see the module docstring)."""
  if not template:
    return tokenizer_lib.prefix_text(record)
  try:
    text = string.Formatter().vformat(template, (), _Fields(record))
  except (ValueError, IndexError) as e:
    raise ValueError(f'prompt template {template!r}: {e}') from None
  return '\n'.join(line for line in text.split('\n') if line.strip())


def references(record: Mapping[str, Any], field: str = '') -> list[str]:
  """Every acceptable target of a record: the list a target field holds, or its single value; [] if it has none."""
  fields = (field,) if field else TARGET_FIELDS
  for name in fields:
    value = record.get(name)
    if value is None:
      continue
    values = value if isinstance(value, (list, tuple)) else [value]
    return [str(v) for v in values if v is not None and str(v).strip()]
  return []


def target(record: Mapping[str, Any], field: str = '', rng: Optional[np.random.Generator] = None,
           reference: str = 'random') -> Optional[str]:
  """The target text of a record: one of its references, drawn with `rng` (training, reference='random') or the
  first; None if none."""
  if reference not in REFERENCE_CHOICES:
    raise ValueError(f'reference={reference!r}: a task reads its references {" or ".join(REFERENCE_CHOICES)}')
  return choose(references(record, field), rng, reference)


def choose(options: list[str], rng: Optional[np.random.Generator] = None, reference: str = 'random'
           ) -> Optional[str]:
  """One of a record's references (see `target`); None if there is none."""
  if not options:
    return None
  if rng is not None and reference == 'random' and len(options) > 1:
    return options[int(rng.integers(len(options)))]
  return options[0]


def task_names(data: Mapping[str, Any]) -> list[str]:
  """The tasks of config.data.tasks, in order; [] for a config of one task (config.data itself)."""
  return list((data.get('tasks') or {}).keys())


def task_data(data: ml_collections.ConfigDict, name: str = '') -> ml_collections.ConfigDict:
  """config.data as task `name` of config.data.tasks sees it (its fields over config.data's); '' is config.data.

  The result has no `tasks`: it describes one task.
  """
  result = ml_collections.ConfigDict({k: v for k, v in data.to_dict().items() if k != 'tasks'})
  where = 'config.data'
  if name:
    tasks = data.get('tasks') or {}
    if name not in tasks:
      raise ValueError(f'task {name!r} is not one of config.data.tasks ({", ".join(tasks) or "none"})')
    where = f'config.data.tasks.{name}'
    for key, value in tasks[name].items():
      if key == 'weight':
        continue
      if key not in TASK_FIELDS:
        raise ValueError(f'{where}.{key}: a task sets only weight and {", ".join(TASK_FIELDS)}')
      result[key] = value
  try:  # a template that cannot format is the config's error: say so now, not once per example
    prompt({}, result.get('prompt', ''))
  except ValueError as e:
    raise ValueError(f'{where}.prompt: {e}') from None
  if result.get('reference', 'random') not in REFERENCE_CHOICES:
    raise ValueError(f'{where}.reference={result.reference!r}: a task reads its references '
                     f'{" or ".join(REFERENCE_CHOICES)}')
  return result


def task_weights(data: Mapping[str, Any]) -> list[float]:
  weights = [float((data['tasks'][name]).get('weight', 1.0)) for name in task_names(data)]
  for name, weight in zip(task_names(data), weights):
    if not weight > 0:
      raise ValueError(f'config.data.tasks.{name}.weight={weight}: weights must be positive')
  return weights
