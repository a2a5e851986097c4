"""Open-ended question answering: answers generated with the KV cache (greedy, or beam search with `beam_size`),
scored by exact match after normalisation (lower case, no punctuation, no articles, single spaces), overall and per
value of `group_by`.

With `diagnostics` (the default), every evaluation also answers each question with another example's clip, without
audio and with grey frames (evaluators/grounding.py), in the same compiled step, and reports the accuracy and the
text loss of each variant.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Any, Iterator, Optional, Sequence

import jax.numpy as jnp

from mirasol_jax import decoding
from mirasol_jax.data import tasks as tasks_lib
from mirasol_jax.data import tokenizer as tokenizer_lib
from mirasol_jax.evaluators import base
from mirasol_jax.evaluators import grounding
from mirasol_jax.models import mirasol

_ARTICLES = re.compile(r'\b(a|an|the)\b')
_PUNCTUATION = str.maketrans('', '', string.punctuation)


def normalize(text: str) -> str:
  text = text.lower().translate(_PUNCTUATION)
  return ' '.join(_ARTICLES.sub(' ', text).split())


def exact_match(prediction: str, answer: str) -> bool:
  return normalize(prediction) == normalize(answer)


def majority_baseline(train_answers: Sequence[str], eval_answers: Sequence[str],
                      train_groups: Optional[Sequence[Any]] = None, eval_groups: Optional[Sequence[Any]] = None
                      ) -> dict[str, Any]:
  """What answering without looking reaches: the most common (normalised) training answer and its exact-match
  accuracy on the evaluation answers ('answer', 'accuracy'); with groups (e.g. question kinds), also the most
  common answer of each group, its accuracy in the group ('accuracy/<group>') and over all evaluation answers
  ('per_group')."""
  counts = collections.Counter(normalize(a) for a in train_answers)
  eval_answers = [normalize(a) for a in eval_answers]
  best = counts.most_common(1)[0][0] if counts else ''
  result = {'answer': best, 'accuracy': sum(a == best for a in eval_answers) / max(len(eval_answers), 1)}
  if train_groups is None or eval_groups is None:
    return result
  correct = 0
  for group in sorted({g for g in eval_groups if g is not None}, key=str):
    group_counts = collections.Counter(normalize(a) for a, g in zip(train_answers, train_groups) if g == group)
    group_best = group_counts.most_common(1)[0][0] if group_counts else ''
    hits = [a == group_best for a, g in zip(eval_answers, eval_groups) if g == group]
    result[f'accuracy/{group}'] = sum(hits) / len(hits)
    correct += sum(hits)
  result['per_group'] = correct / max(len(eval_answers), 1)
  return result


def generate(model, variables, text, decode_config, latents):
  """Answers [B, max_new_tokens] to the prompts of `text` (text_tokens, text_loss_mask) given the AV latents,
  greedy or by beam search (decode_config: max_new_tokens, beam_size, length_penalty)."""
  if decode_config['beam_size'] > 1:
    return decoding.beam_decode(model, variables, text, decode_config['max_new_tokens'], tokenizer_lib.EOS_ID,
                                beam_size=decode_config['beam_size'],
                                length_penalty=decode_config['length_penalty'], latents=latents)[0]
  return decoding.greedy_decode(model, variables, text, decode_config['max_new_tokens'], tokenizer_lib.EOS_ID,
                                latents=latents)


class Evaluator(base.Evaluator):
  DEFAULTS = dict(max_new_tokens=8, beam_size=1, length_penalty=0.0, diagnostics=True)

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.variants = ('plain',) + (grounding.VARIANTS if self.cfg.diagnostics else ())

  def step(self, params, batch):
    """-> summed scalars (the losses and statistics times the batch's valid examples) and answers
    [B, len(variants), max_new_tokens].

    The variants' examples are interleaved into one batch (B * 2 blanked clips through one encoding, B * 3 varied
    latents through one teacher-forced decoding, B * len(variants) through one decoding), so the variants add one
    encoder and one decoder pass to the compiled step, not one per variant.
    """
    model, variables, variants = self.ctx.model, {'params': params}, self.variants
    out = model.apply(variables, batch)
    scalars = {'loss': out['losses']['total'], 'loss_text': out['losses']['text'], **out['stats']}
    latents = [out['av_latents']]
    if len(variants) > 1:
      blanked = grounding.interleave([grounding.without_audio(batch), grounding.without_video(batch)])
      _, blanked_latents = model.apply(variables, blanked, method=mirasol.Model.encode_av)
      blanked_latents = grounding.deinterleave(blanked_latents, 2)
      latents += [jnp.take(out['av_latents'], grounding.derangement(batch['example_mask']), axis=0),
                  blanked_latents[:, 0], blanked_latents[:, 1]]
      varied = grounding.interleave(latents[1:])
      tokens = grounding.interleave([batch['text_tokens']] * (len(variants) - 1))
      logits = model.apply(variables, tokens, varied.reshape(tokens.shape[0], -1, varied.shape[-1]),
                           method=mirasol.Model.text_logits)
      losses = grounding.text_losses(grounding.deinterleave(logits, len(variants) - 1), batch['text_tokens'],
                                     batch['text_loss_mask'], batch['example_mask'])
      scalars.update({f'{variant}/loss_text': losses[i] for i, variant in enumerate(variants[1:])})
    weight = jnp.sum(batch['example_mask'])
    scalars = {k: v * weight for k, v in scalars.items()}
    scalars['_weight'] = weight.astype(jnp.float32)
    text = {k: grounding.interleave([batch[k]] * len(variants)) for k in ('text_tokens', 'text_loss_mask')}
    answers = generate(model, variables, text, self.cfg, grounding.interleave(latents))
    return scalars, {'answers': grounding.deinterleave(answers, len(variants))}

  def run(self, params, step: int) -> Iterator[tuple[str, float]]:
    out = self.run_batches(params, self.step)
    weight = max(out.sums.pop('_weight', 0.0), 1.0)
    processor = self.ctx.processor
    correct = {variant: [] for variant in self.variants}
    groups, predictions = [], []
    for index, answers in zip(out.indices, out.arrays['answers']):
      record = self.record(index)
      answer = tasks_lib.target(record, self.data.get('target', '')) or ''
      texts = {v: tokenizer_lib.decode(processor, answers[i]) for i, v in enumerate(self.variants)}
      for variant, text in texts.items():
        correct[variant].append(exact_match(text, answer))
      groups.append(self.group(record))
      prediction = {'id': record.get('id'), 'question': self.prompt(record), 'answer': answer,
                    'prediction': texts['plain']}
      if self.group_by:
        prediction[self.group_by] = groups[-1]
      # A shuffled answer is about another example's clip: not kept.
      prediction.update({f'prediction_{v}': texts[v] for v in self.variants if v not in ('plain', 'shuffled')})
      predictions.append(prediction)
    self.write_predictions(step, predictions)
    yield from ((k, v / weight) for k, v in out.sums.items())
    self.check_groups(groups)
    yield from grounding.accuracies(correct, groups).items()
    yield 'examples', float(len(out.indices))
    yield 'skipped', float(out.skipped)

  def headline(self, result) -> str:
    prefix = f'eval/{self.name}/'
    grounded = ', '.join(f'{grounding.LABELS[v]} {100 * result[f"{prefix}{v}/accuracy"]:.1f}%'
                         for v in self.variants[1:])
    return (f'accuracy {100 * result[prefix + "accuracy"]:.1f}% on {int(result[prefix + "examples"])} examples' +
            (f' ({grounded})' if grounded else '') + f', loss {result[prefix + "loss"]:.4f}' +
            (f', {int(result[prefix + "skipped"])} unreadable' if result[prefix + 'skipped'] else ''))
