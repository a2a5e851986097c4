"""SentencePiece tokenizer and the text part of a batch: BOS, prefix, target, EOS, padding, and the loss mask.

Ids 0..3 are fixed for every vocabulary this project trains: pad 0, BOS 1, EOS 2, unknown 3 (byte fallback makes
unknown pieces rare). The prefix is the context the decoder conditions on (question, title, answer options); the
target is what it must produce (answer, caption, class name). Only target tokens and the final EOS are scored.
"""
from __future__ import annotations

import io
from typing import Iterable, Mapping, Optional

import numpy as np
import sentencepiece as spm

from mirasol_jax import paths

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
PREFIX_FIELDS = ('title', 'question')
TARGET_FIELDS = ('answer', 'caption', 'label')


def train(sentences: Iterable[str], vocab_size: int, path: str, model_type: str = 'bpe') -> None:
  """Trains a SentencePiece model on `sentences` and writes it to `path` atomically.

  BPE by default: on small corpora (a demo, a fine-tuning set) unigram degenerates to near-characters (33 pieces
  for a 10-word demo question, against 11 with BPE). `hard_vocab_limit=False` lets a small corpus give fewer pieces
  than vocab_size.
  """
  buffer = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=buffer, vocab_size=vocab_size, model_type=model_type,
      byte_fallback=True, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID, character_coverage=1.0,
      hard_vocab_limit=False, minloglevel=2, num_threads=1)
  paths.write_bytes(path, buffer.getvalue())


class NoTextError(ValueError):
  """A source without any text to train a tokenizer on."""


def train_on_source(source, vocab_size: int, path: str, model_type: str = 'bpe') -> int:
  """Trains on every text of the records of a source, or of a list of sources (see text_fields); returns the
  number of texts."""
  sources = source if isinstance(source, (list, tuple)) else [source]
  texts = [text for s in sources for i in range(len(s)) for text in text_fields(s[i])]
  if not texts:
    raise NoTextError(f'{source!r} has no text to train a tokenizer on')
  train(texts, vocab_size, path, model_type)
  return len(texts)


def load(path: str) -> spm.SentencePieceProcessor:
  """The SentencePiece model at `path`, a local or a cloud path (read as bytes through mirasol_jax.paths)."""
  if not paths.exists(path):
    raise FileNotFoundError(f'tokenizer model {path!r} does not exist; train one with '
                            f'`python -m mirasol_jax.main tokenizer --config=...`')
  processor = spm.SentencePieceProcessor(model_proto=paths.read_bytes(path))
  for name, expected in (('pad', PAD_ID), ('bos', BOS_ID), ('eos', EOS_ID), ('unk', UNK_ID)):
    actual = getattr(processor, f'{name}_id')()
    if actual != expected:
      raise ValueError(f'tokenizer {path!r}: {name} id is {actual}, mirasol_jax needs {expected}')
  return processor


def prefix_text(example: Mapping[str, object]) -> str:
  """The decoder's context: title, question and answer options, each on its own line."""
  parts = [str(example[f]) for f in PREFIX_FIELDS if example.get(f)]
  options = example.get('options')
  if options:
    parts.append('options: ' + ' | '.join(str(o) for o in options))
  return '\n'.join(parts)


def target_text(example: Mapping[str, object]) -> Optional[str]:
  for field in TARGET_FIELDS:
    if example.get(field) is not None:
      return str(example[field])
  return None


def text_fields(example: Mapping[str, object]) -> list[str]:
  """Every text of an example (its default prefix, every value of its target fields, several references
  included), for training a tokenizer."""
  texts = [prefix_text(example)]
  for field in TARGET_FIELDS + ('captions',):
    value = example.get(field)
    texts += [str(v) for v in value] if isinstance(value, (list, tuple)) else [] if value is None else [str(value)]
  return [t for t in texts if t]


def encode_example(processor: spm.SentencePieceProcessor, prefix: str, target: str, max_len: int):
  """-> (tokens [max_len] int32, loss_mask [max_len] bool): BOS prefix target EOS pad...

  When too long, the prefix loses tokens from its start (the end of a question is nearest to the answer); if the
  target alone does not fit, it keeps its first tokens. BOS and EOS always stay.
  """
  if max_len < 3:
    raise ValueError(f'max_text_len={max_len} leaves no room for BOS, a target token and EOS')
  prefix_ids = processor.encode(prefix) if prefix else []
  target_ids = processor.encode(target)[:max_len - 2]
  room = max_len - 2 - len(target_ids)
  prefix_ids = prefix_ids[max(0, len(prefix_ids) - room):] if room > 0 else []
  ids = [BOS_ID] + prefix_ids + target_ids + [EOS_ID]
  tokens = np.full(max_len, PAD_ID, np.int32)
  tokens[:len(ids)] = ids
  mask = np.zeros(max_len, bool)
  mask[1 + len(prefix_ids):len(ids)] = True  # the target and EOS
  return tokens, mask


def decode(processor: spm.SentencePieceProcessor, ids) -> str:
  """Text of generated ids, up to the first EOS, without padding. Ids past the vocabulary (a model may have more
  outputs than the tokenizer has pieces) read as unknown."""
  ids = [int(i) for i in ids]
  if EOS_ID in ids:
    ids = ids[:ids.index(EOS_ID)]
  size = processor.vocab_size()
  return processor.decode([i if i < size else UNK_ID for i in ids if i not in (PAD_ID, BOS_ID)])
