"""Validation loss per term, each averaged over what training averages it over (target tokens, chunk pairs, ...:
mirasol.loss_denominators) across the whole split rather than per batch, and the weighted total."""
from __future__ import annotations

from typing import Iterator


from mirasol_jax.evaluators import base
from mirasol_jax.models import mirasol


class Evaluator(base.Evaluator):
  DEFAULTS = {}
  NEEDS_TEXT = False  # the losses of data without text are the audio-video ones

  def step(self, params, batch):
    """-> each term's sum over the batch (its mean times its denominator) and the denominator."""
    model = self.ctx.model
    denominators = mirasol.loss_denominators(batch, model.num_chunks, model.tokens_per_chunk)
    out = model.apply({'params': params}, batch, denominators=denominators)
    sums = {}
    for term, value in out['losses'].items():
      if term != 'total':
        sums[f'sum/{term}'] = value * denominators[term]
        sums[f'count/{term}'] = denominators[term]
    return sums, {'example_mask': batch['example_mask']}

  def run(self, params, step: int) -> Iterator[tuple[str, float]]:
    out = self.run_batches(params, self.step)
    weights = self.ctx.config.loss_weights
    total = 0.0
    for key, value in out.sums.items():
      if key.startswith('sum/'):
        term = key[len('sum/'):]
        mean = value / max(out.sums[f'count/{term}'], 1.0)
        total += weights.get(term, 0.0) * mean
        yield f'loss_{term}', mean
    yield 'loss', total
    yield 'examples', float(len(out.indices))
    yield 'skipped', float(out.skipped)
