"""Multiple choice (NExT-QA and the like): the record's `options` (a list of texts) and the right one (`answer_index`,
or the option equal to `answer`).

mode 'likelihood' (default) scores every option by the decoder's likelihood after the prompt
(evaluators/scoring.py) and picks the best; mode 'generate' generates an answer (as the vqa evaluator does) and
picks the option it matches after normalisation, none if it matches none (counted wrong). Accuracy overall and per
value of `group_by` (NExT-QA: the question type).
"""
from __future__ import annotations

import logging
from typing import Any, Iterator, Mapping

import jax.numpy as jnp
import numpy as np

from mirasol_jax.data import tokenizer as tokenizer_lib
from mirasol_jax.decoding import prompt_lengths
from mirasol_jax.evaluators import base
from mirasol_jax.evaluators import scoring
from mirasol_jax.evaluators import vqa
from mirasol_jax.models import mirasol


def answer_index(record: Mapping[str, Any]) -> int:
  """The index of the right option: `answer_index`, else the option equal to `answer` (normalised)."""
  options = [str(o) for o in record.get('options') or []]
  if not options:
    raise ValueError(f'{record.get("id")}: no `options` to choose from')
  if record.get('answer_index') is not None:
    index = int(record['answer_index'])
  else:
    matches = [i for i, o in enumerate(options) if vqa.exact_match(o, str(record.get('answer', '')))]
    if not matches:
      raise ValueError(f'{record.get("id")}: the answer {record.get("answer")!r} is none of the options {options}')
    index = matches[0]
  if not 0 <= index < len(options):
    raise ValueError(f'{record.get("id")}: answer_index {index} is not an index of its {len(options)} options')
  return index


def _options(record: Mapping[str, Any]) -> list[str]:
  options = record.get('options')
  return [str(o) for o in options] if isinstance(options, (list, tuple)) else []


class Evaluator(base.Evaluator):
  DEFAULTS = dict(mode='likelihood', max_options=5, length_normalize=True, max_new_tokens=8, beam_size=1,
                  length_penalty=0.0)

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    if self.cfg.mode not in ('likelihood', 'generate'):
      raise ValueError(f'config.evals.{self.name}.mode={self.cfg.mode!r} is not likelihood or generate')
    self.option_len = self.ctx.config.model.max_text_len

  def _options(self, host_batch) -> dict[str, np.ndarray]:
    texts = [_options(self.record(i)) if i >= 0 else [] for i in host_batch['index']]
    texts = [t if len(t) <= self.cfg.max_options else [] for t in texts]  # too many: not scored (see run)
    ids, lengths = scoring.encode_candidates(self.ctx.processor, texts, self.cfg.max_options, self.option_len)
    return {'option_ids': ids, 'option_lengths': lengths}

  def step(self, params, batch):
    model, variables = self.ctx.model, {'params': params}
    _, latents = model.apply(variables, batch, method=mirasol.Model.encode_av)
    if self.cfg.mode == 'generate':
      return {}, {'answers': vqa.generate(model, variables, batch, self.cfg, latents)}
    tokens, mask = scoring.candidate_tokens(batch['text_tokens'], prompt_lengths(batch['text_loss_mask']),
                                            batch['option_ids'], batch['option_lengths'])
    scores = scoring.log_likelihoods(model, variables, latents, tokens, mask, self.cfg.length_normalize)
    return {}, {'scores': scores, 'choice': jnp.argmax(scores, axis=-1)}

  def run(self, params, step: int) -> Iterator[tuple[str, float]]:
    b, k, n = self.ctx.config.batch_size, self.cfg.max_options, self.option_len
    extra = {'option_ids': ((b, k, n), np.int32), 'option_lengths': ((b, k), np.int32)}
    if self.cfg.mode == 'generate':
      out = self.run_batches(params, self.step, key='generate')
    else:
      out = self.run_batches(params, self.step, extra_inputs=self._options, extra_shapes=extra)
    correct, groups, predictions = [], [], []
    unusable = 0
    for row, index in enumerate(out.indices):
      record = self.record(index)
      try:
        right = answer_index(record)
      except ValueError as e:  # no options, or no right one among them: counted, not scored
        logging.warning('%s: %s', self.name, e)
        unusable += 1
        continue
      options = _options(record)
      if len(options) > self.cfg.max_options:
        logging.warning('%s: %s has %d options, more than config.evals.%s.max_options=%d', self.name,
                        record.get('id'), len(options), self.name, self.cfg.max_options)
        unusable += 1
        continue
      if self.cfg.mode == 'generate':
        text = tokenizer_lib.decode(self.ctx.processor, out.arrays['answers'][row])
        chosen = next((i for i, o in enumerate(options) if vqa.exact_match(text, o)), -1)
      else:
        chosen = int(out.arrays['choice'][row])
      correct.append(chosen == right)
      groups.append(self.group(record))
      prediction = {'id': record.get('id'), 'question': self.prompt(record), 'options': options,
                    'answer_index': right, 'prediction_index': chosen}
      if self.cfg.mode == 'generate':
        prediction['prediction_text'] = text
      else:
        prediction['scores'] = [round(float(s), 4) for s in out.arrays['scores'][row][:len(options)]]
      if self.group_by:
        prediction[self.group_by] = groups[-1]
      predictions.append(prediction)
    self.write_predictions(step, predictions)
    self.check_groups(groups)
    yield from base.grouped_means({'accuracy': correct}, groups).items()
    yield 'examples', float(len(correct))
    yield 'skipped', float(out.skipped + unusable)
