"""Captioning: a caption generated for each clip (greedy, or beam search with `beam_size`), scored against every
reference of the record's target field (e.g. `captions`, a list) with the COCO caption metrics, corpus-level:
CIDEr-D, BLEU-4 and ROUGE-L (evaluators/caption_metrics.py).
"""
from __future__ import annotations

from typing import Iterator

from mirasol_jax.data import tasks as tasks_lib
from mirasol_jax.data import tokenizer as tokenizer_lib
from mirasol_jax.evaluators import base
from mirasol_jax.evaluators import caption_metrics
from mirasol_jax.evaluators import vqa
from mirasol_jax.models import mirasol


class Evaluator(base.Evaluator):
  DEFAULTS = dict(max_new_tokens=24, beam_size=1, length_penalty=0.0)

  def step(self, params, batch):
    model, variables = self.ctx.model, {'params': params}
    _, latents = model.apply(variables, batch, method=mirasol.Model.encode_av)
    return {}, {'captions': vqa.generate(model, variables, batch, self.cfg, latents)}

  def run(self, params, step: int) -> Iterator[tuple[str, float]]:
    out = self.run_batches(params, self.step)
    predictions, references, rows = {}, {}, []
    unusable = 0
    for index, tokens in zip(out.indices, out.arrays['captions']):
      record = self.record(index)
      key = str(index)  # positions are unique; ids may not be
      text = tokenizer_lib.decode(self.ctx.processor, tokens)
      refs = tasks_lib.references(record, self.data.get('target', ''))
      rows.append({'id': record.get('id'), 'prediction': text, 'references': refs})
      if not any(caption_metrics.tokenize(r) for r in refs):  # nothing to compare with: counted, not scored
        unusable += 1
        continue
      predictions[key], references[key] = text, refs
    self.write_predictions(step, rows)
    if predictions:
      yield from caption_metrics.score(predictions, references).items()
    yield 'examples', float(len(predictions))
    yield 'skipped', float(out.skipped + unusable)

  def headline(self, result) -> str:
    prefix = f'eval/{self.name}/'
    return (f'CIDEr-D {result.get(prefix + "cider", 0.0):.3f}, BLEU-4 {result.get(prefix + "bleu4", 0.0):.3f}, '
            f'ROUGE-L {result.get(prefix + "rouge_l", 0.0):.3f} on {int(result[prefix + "examples"])} clips')
