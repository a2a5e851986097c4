"""Open-ended question answering: answers generated greedily with the KV cache, scored by exact match after
normalisation (lower case, no punctuation, no articles, single spaces)."""
from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r'\b(a|an|the)\b')
_PUNCTUATION = str.maketrans('', '', string.punctuation)


def normalize(text: str) -> str:
  text = text.lower().translate(_PUNCTUATION)
  return ' '.join(_ARTICLES.sub(' ', text).split())


def exact_match(prediction: str, answer: str) -> bool:
  return normalize(prediction) == normalize(answer)


def majority_baseline(train_answers, eval_answers) -> tuple[str, float]:
  """The most common (normalised) training answer and its exact-match accuracy on the evaluation answers."""
  import collections
  counts = collections.Counter(normalize(a) for a in train_answers)
  if not counts:
    return '', 0.0
  best = counts.most_common(1)[0][0]
  eval_answers = [normalize(a) for a in eval_answers]
  return best, sum(a == best for a in eval_answers) / max(len(eval_answers), 1)
