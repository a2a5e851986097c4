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
