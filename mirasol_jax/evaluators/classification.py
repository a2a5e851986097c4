"""Closed-set classification (Kinetics-Sound, VGG-Sound, EPIC-Sounds): every class name of the dataset scored by the
decoder's likelihood after the prompt (evaluators/scoring.py), the best `top_k` compared with the record's class.

The class list: `classes`, a file of one class name a line (its line order is the class index); '' reads
`classes.txt` in the dataset folder (the benchmark converters write it), else takes the sorted class names of the
task's training and evaluation splits. A record's class is its `label_index` when it has one, else its target text
(`label`) looked up in the list after normalisation; an example whose class is not in the list is left out of the
metrics and counted (`unknown_class`). Metrics: top-1 and top-k accuracy, overall and per value of
`group_by`, and with `mean_ap` the mean over classes of the average precision of the class scores (softmax over
classes), as reported for multi-label or imbalanced sets.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mirasol_jax.data import sources
from mirasol_jax.data import tasks as tasks_lib
from mirasol_jax.decoding import prompt_lengths
from mirasol_jax.evaluators import base
from mirasol_jax.evaluators import scoring
from mirasol_jax.evaluators import vqa
from mirasol_jax.models import mirasol


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
  """Area under the precision-recall curve of one class: the mean of the precision at each positive, ranked by
  score (ties broken by order); nan for a class with no positive."""
  if not positives.any():
    return float('nan')
  order = np.argsort(-scores, kind='stable')
  hits = positives[order].astype(np.float64)
  precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
  return float(np.sum(precision * hits) / hits.sum())


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
  """scores [N, C], labels [N] -> the mean AP over the classes that have a positive."""
  values = [average_precision(scores[:, c], labels == c) for c in range(scores.shape[1])]
  return float(np.nanmean(values)) if any(np.isfinite(values)) else 0.0


class Evaluator(base.Evaluator):
  DEFAULTS = dict(classes='', top_k=5, class_batch=64, length_normalize=True, mean_ap=False)

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.classes = self._class_names()
    self._lookup = {vqa.normalize(name): i for i, name in enumerate(self.classes)}
    self._class_ids = None

  def _class_names(self) -> list[str]:
    path = self.cfg.classes
    if not path and self.data.source in ('jsonl', 'demo'):
      candidate = os.path.join(sources.dataset_folder(self.data), 'classes.txt')
      path = candidate if os.path.exists(candidate) else ''
    if path:
      with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    else:
      names = set()
      for split in dict.fromkeys((self.data.train_split, self.split)):
        source = sources.open_source(self.data, split)
        names.update(t for i in range(len(source)) if (t := tasks_lib.target(source[i], self.data.target)))
      names = sorted(names)
    if len(names) < 2:
      raise ValueError(f'config.evals.{self.name}: {len(names)} class names ({path or "from the splits"}); a '
                       'classification needs at least two')
    return names

  def label(self, record: Mapping[str, Any]) -> int:
    """The record's class index, -1 when its class is not in the list."""
    if isinstance(record.get('label_index'), int) and not isinstance(record['label_index'], bool):
      return record['label_index'] if 0 <= record['label_index'] < len(self.classes) else -1
    return self._lookup.get(vqa.normalize(tasks_lib.target(record, self.data.target) or ''), -1)

  def _chunk_size(self) -> int:
    """Classes scored at a time: at most class_batch, as even as possible (31 classes at 64: one chunk of 31)."""
    chunks = -(-len(self.classes) // self.cfg.class_batch)
    return -(-len(self.classes) // chunks)

  def _candidates(self) -> tuple[np.ndarray, np.ndarray]:
    """The class names' token ids [C', Lc] and lengths [C'], C' a multiple of _chunk_size() (padded with empty
    candidates), Lc the longest name's tokens."""
    if self._class_ids is None:
      ids, lengths = scoring.encode_candidates(self.ctx.processor, [self.classes], len(self.classes),
                                               self.ctx.config.model.max_text_len)
      pad = -len(self.classes) % self._chunk_size()
      longest = int(lengths.max())
      self._class_ids = (np.pad(ids[0, :, :longest], ((0, pad), (0, 0))), np.pad(lengths[0], (0, pad)))
    return self._class_ids

  def step(self, params, batch, class_ids, class_lengths):
    """-> no scalars; the score of every class [B, C'] (classes _chunk_size() at a time under lax.map)."""
    model, variables = self.ctx.model, {'params': params}
    _, latents = model.apply(variables, batch, method=mirasol.Model.encode_av)
    prompt_len = prompt_lengths(batch['text_loss_mask'])
    size = batch['text_tokens'].shape[0]
    chunk_size = self._chunk_size()
    chunks = class_ids.shape[0] // chunk_size

    def score_chunk(chunk):
      # Each example's prompt is run once for the chunk's class names (scoring.prefix_log_likelihoods).
      ids, lengths = chunk
      candidates = jnp.broadcast_to(ids[None], (size,) + ids.shape)
      lengths = jnp.broadcast_to(lengths[None], (size,) + lengths.shape)
      return scoring.prefix_log_likelihoods(model, variables, latents, batch['text_tokens'], prompt_len, candidates,
                                            lengths, self.cfg.length_normalize)

    scores = jax.lax.map(score_chunk, (class_ids.reshape(chunks, chunk_size, -1),
                                       class_lengths.reshape(chunks, chunk_size)))
    return {}, {'scores': jnp.moveaxis(scores, 0, 1).reshape(size, -1)}

  def run(self, params, step: int) -> Iterator[tuple[str, float]]:
    class_ids, class_lengths = self._candidates()
    out = self.run_batches(params, self.step, extra_args=(class_ids, class_lengths))
    scores = out.arrays['scores'][:, :len(self.classes)]
    records = [self.record(i) for i in out.indices]
    labels = np.array([self.label(r) for r in records], np.int64)
    known = labels >= 0  # a class outside the list (or no label: a test split without public labels) is not scored
    if not known.all():
      logging.warning('%s: %d of %d examples have no class of the list (e.g. %r): left out of the metrics', self.name,
                      int(np.sum(~known)), len(labels), tasks_lib.target(records[int(np.argmin(known))],
                                                                          self.data.target))
    scores, labels = scores[known], labels[known]
    records = [r for r, k in zip(records, known) if k]
    k = min(self.cfg.top_k, len(self.classes))
    ranked = np.argsort(-scores, axis=1, kind='stable')[:, :k]
    top1 = ranked[:, 0] == labels
    topk = np.any(ranked == labels[:, None], axis=1)
    groups = [self.group(r) for r in records]
    self.check_groups(groups)
    yield from base.grouped_means({'top1': top1, f'top{k}': topk}, groups).items()
    if self.cfg.mean_ap and len(labels):
      probabilities = np.exp(scores - scores.max(axis=1, keepdims=True))
      yield 'mean_ap', mean_average_precision(probabilities / probabilities.sum(1, keepdims=True), labels)
    yield 'examples', float(len(labels))
    yield 'unknown_class', float(np.sum(~known))
    yield 'skipped', float(out.skipped)
    self.write_predictions(step, [
        {'id': r.get('id'), 'label': self.classes[l],
         'predictions': [self.classes[c] for c in ranked[row]], **({self.group_by: g} if self.group_by else {})}
        for row, (r, l, g) in enumerate(zip(records, labels, groups))])
