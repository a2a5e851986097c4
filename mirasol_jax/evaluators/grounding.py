"""Grounding diagnostics: do the answers depend on the picture and the sound?

Every evaluation (mirasol_jax/train.py) also answers each question in three variants of its example:

  shuffled  the text decoder reads another valid example's AV latents h (a derangement within the batch, see
            `derangement`): the question stays, the clip is someone else's;
  no_audio  audio_mask all False, so every combiner ignores the audio tokens;
  no_video  every frame a constant mid-grey (uint8 128, which the video encoder's x / 127.5 - 1 maps to 0.004):
            a clip with no picture, rather than zeros (black, -1), a picture of its own that is far from the
            training frames.

A model that reads its inputs loses accuracy (and gains text loss) in each variant; one that answers from the
question alone scores the same. Accuracies are also split by a field of the evaluation records (the evaluator's
`group_by`, e.g. the demo's question `kind`).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

VARIANTS = ('shuffled', 'no_audio', 'no_video')
LABELS = {'plain': 'plain', 'shuffled': 'shuffled', 'no_audio': 'no audio', 'no_video': 'no video'}
GREY = 128


def derangement(example_mask: Array) -> Array:
  """[B] source example of each example: every valid example reads the next valid one (cyclically, in batch order),
  so none reads its own unless it is the only valid one; padding examples read themselves and are read by none."""
  valid = example_mask.astype(bool)
  count = jnp.maximum(jnp.sum(valid), 1)
  rank = jnp.cumsum(valid) - 1  # rank of each valid example among the valid ones
  valid_in_order = jnp.argsort(~valid, stable=True)  # indices of the valid examples first, in batch order
  source = valid_in_order[(rank + 1) % count]
  return jnp.where(valid, source, jnp.arange(valid.shape[0])).astype(jnp.int32)


def without_audio(batch: Mapping[str, Array]) -> dict[str, Array]:
  return {**batch, 'audio_mask': jnp.zeros_like(batch['audio_mask'])}


def without_video(batch: Mapping[str, Array]) -> dict[str, Array]:
  return {**batch, 'video': jnp.full_like(batch['video'], GREY)}


def interleave(trees: Sequence[Any]) -> Any:
  """k trees of [B, ...] arrays -> one tree of [B * k, ...], example b's k versions at rows b * k .. b * k + k - 1.

  Interleaved rather than concatenated: each device keeps the k versions of its own examples, so a batch sharded
  over the data axes stays sharded the same way.
  """
  return jax.tree.map(lambda *xs: jnp.stack(xs, axis=1).reshape(-1, *xs[0].shape[1:]), *trees)


def deinterleave(x: Array, k: int) -> Array:
  """[B * k, ...] from `interleave` -> [B, k, ...]."""
  return x.reshape(-1, k, *x.shape[1:])


def text_losses(logits: Array, tokens: Array, loss_mask: Array, example_mask: Array) -> Array:
  """The model's text loss for k versions of each example at once: logits [B, k, L, vocab] of tokens [B, L] ->
  [k], the cross-entropy of each target token (loss_mask[:, 1:]) of the valid examples, averaged per version."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :, :-1], tokens[:, None, 1:])
  weights = (loss_mask[:, 1:] & example_mask[:, None]).astype(jnp.float32)[:, None]
  return jnp.sum(ce * weights, axis=(0, 2)) / jnp.maximum(jnp.sum(weights), 1.0)


def metric_name(value: Any) -> str:
  """A group value as a part of a metric key (TensorBoard tags allow letters, digits, _ . -)."""
  return re.sub(r'[^\w.-]', '_', str(value))


def accuracies(correct: Mapping[str, Sequence[bool]], groups: Sequence[Optional[Any]]) -> dict[str, float]:
  """Exact-match accuracy of each variant ('plain' and VARIANTS), overall and per group value.

  correct: variant -> one flag per example; groups: the example's value of the evaluator's group_by, None to leave it
  out of every group. Keys: 'accuracy', 'accuracy/<value>', '<variant>/accuracy[/<value>]' and 'examples/<value>'.
  """
  from mirasol_jax.evaluators import base  # base imports this module's metric_name
  return base.grouped_means({('accuracy' if variant == 'plain' else f'{variant}/accuracy'): flags
                             for variant, flags in correct.items()}, list(groups))


def table(result: Mapping[str, float], split: str) -> list[str]:
  """The grounding table of an evaluation's metrics (eval/<split>/...): one row per group, one column per variant,
  and the text loss of each variant; no lines when the evaluation had neither variants nor groups."""
  prefix = f'eval/{split}/'
  variants = ['plain'] + [v for v in VARIANTS if f'{prefix}{v}/accuracy' in result]
  groups = sorted(k[len(f'{prefix}examples/'):] for k in result if k.startswith(f'{prefix}examples/'))
  if len(variants) == 1 and not groups:
    return []
  key = lambda variant, metric: prefix + ('' if variant == 'plain' else f'{variant}/') + metric
  lines = [f'grounding on {split} (accuracy %; shuffled: another example\'s clip; no video: grey frames)',
           f'  {"group":<24}{"examples":>9}' + ''.join(f'{LABELS[v]:>11}' for v in variants)]
  for group, count in [('all', result.get(f'{prefix}examples', 0.0))] + [
      (g, result[f'{prefix}examples/{g}']) for g in groups]:
    metric = 'accuracy' if group == 'all' else f'accuracy/{group}'
    lines.append(f'  {group[:23]:<24}{int(count):>9}' +
                 ''.join(f'{100 * result[key(v, metric)]:>11.1f}' for v in variants))
  if all(key(v, 'loss_text') in result for v in variants):
    lines.append(f'  {"text loss":<24}{"":>9}' + ''.join(f'{result[key(v, "loss_text")]:>11.4f}' for v in variants))
  return lines
