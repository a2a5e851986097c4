"""Linear probes: what the output of each audio-video tower knows about the answer, read without the text decoder.

A model that answers from the question alone either has towers whose outputs hold nothing about the answer, or a
text decoder that does not read what they hold. A linear probe tells the two apart: fitted on the training split
and scored on the evaluation split, it reaches above the answer prior only where the answer is linearly decodable
from the representation. Representations of an example (`representations`), each the mean over the tokens of every
chunk, concatenated over the T chunks so that when things happen stays visible: [T*D] features.

  video_tokens  the video part of the chunk tokens u (video encoder, projected to the model width)
  audio_tokens  the audio part of u (audio encoder, projected)
  combiner      the combiner tokens x
  av_latents    the AV latents h: what the text decoder cross-attends to

For each representation and each group of questions (a value of `group_by` of the first evaluator of config.evals
that has one, e.g. the demo's question kind; one group of all examples when there is none), a ridge regression from
standardised features to the one-hot answer (the normalised target text; the classes are the answers of the group's
training examples) predicts the answer with the largest output. Its strength is chosen by cross-validation on the
training features only. `python -m mirasol_jax.main probe` runs it on a workdir's latest checkpoint.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from mirasol_jax.evaluators import grounding
from mirasol_jax.evaluators import vqa
from mirasol_jax.models import mirasol

REPRESENTATIONS = ('video_tokens', 'audio_tokens', 'combiner', 'av_latents')
# Ridge strengths tried by cross-validation, in units of the number of features (see `ridge_fit`).
STRENGTHS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
FOLDS = 5


def chunk_means(tokens):
  """[B, T, n, D] tokens (numpy or jax) -> [B, T*D]: the mean over each chunk's tokens, chunks concatenated."""
  return tokens.mean(axis=2).reshape(tokens.shape[0], -1)


def representations(model: mirasol.Model, params: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
  """The features of a batch (video [B, T, k, H, W, 3], audio [B, T, F, M], audio_mask [B]) in evaluation mode:
  representation -> [B, T*D] float32. Pooled in float32: a mean in bfloat16 loses the small differences between
  clips that a probe looks for."""
  u, x, h = model.apply({'params': params}, batch, False, method=mirasol.Model._encode)
  num_video = u.shape[2] - mirasol.num_audio_tokens(model)  # u holds each chunk's video tokens first
  tokens = {'video_tokens': u[:, :, :num_video], 'audio_tokens': u[:, :, num_video:], 'combiner': x, 'av_latents': h}
  return {name: chunk_means(value.astype(jnp.float32)) for name, value in tokens.items()}


def extract(encode: Callable, params: Any, batches: Iterable[Mapping[str, np.ndarray]],
            limit: Optional[int] = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Features of the valid examples (example_mask) of pipeline batches, in order, up to `limit` of them.

  encode: `representations` of one model, jitted (compiled once: every batch has the same shapes). Returns
  representation -> [N, T*D] float32 and the examples' record indices [N]; no batch is read once `limit` examples
  are in.
  """
  features: dict[str, list[np.ndarray]] = {}
  indices, count = [], 0
  for batch in batches:
    if limit is not None and count >= limit:
      break
    out = encode(params, {k: batch[k] for k in ('video', 'audio', 'audio_mask')})
    keep = np.asarray(batch['example_mask'], bool)
    for name, value in out.items():
      features.setdefault(name, []).append(np.asarray(value, np.float32)[keep])
    indices.append(np.asarray(batch['index'])[keep])
    count += int(keep.sum())
  if not count:
    raise ValueError('no readable example to take features of')
  return {name: np.concatenate(parts)[:limit] for name, parts in features.items()}, np.concatenate(indices)[:limit]


class Probe(NamedTuple):
  """A fitted probe: standardisation (mean, scale [F]) and ridge weights [F, C] and bias [C]."""
  mean: np.ndarray
  scale: np.ndarray
  weights: np.ndarray
  bias: np.ndarray


def standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and scale [F] that standardise features x [N, F]: each feature weighs the same in the ridge penalty,
  whatever the scale of its tower. A constant feature keeps scale 1 (it is only centred)."""
  x = np.asarray(x, np.float64)
  mean, std = x.mean(0), x.std(0)
  return mean, np.where(std > 1e-6 * np.abs(mean), std, 1.0)


def ridge_fit(x: np.ndarray, y: np.ndarray, strength: float) -> tuple[np.ndarray, np.ndarray]:
  """Weights [F, C] and bias [C] minimising |x w + b - y|^2 + strength * F * |w|^2 for features x [N, F] and
  targets y [N, C]; the bias is not penalised.

  The penalty is in units of F: a standardised example's squared norm is about F, so a strength means the same for
  a representation of any width T*D. Solved in the primal (an F x F system) when the examples are at least as many
  as the features, else in the dual, kernel form (w = x^T a with (x x^T + penalty) a = y, an N x N system): the same
  weights from the smaller system, since a wide model's T*D features outnumber the examples of a group.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  count, width = x.shape
  x_mean, y_mean = x.mean(0), y.mean(0)
  xc, yc = x - x_mean, y - y_mean
  penalty = strength * width
  if width <= count:
    weights = np.linalg.solve(xc.T @ xc + penalty * np.eye(width), xc.T @ yc)
  else:
    weights = xc.T @ np.linalg.solve(xc @ xc.T + penalty * np.eye(count), yc)
  return weights, y_mean - x_mean @ weights


def fit(x: np.ndarray, labels: np.ndarray, num_classes: int, strength: float) -> Probe:
  """A probe from features x [N, F] to class labels [N] (in [0, num_classes))."""
  mean, scale = standardize(x)
  weights, bias = ridge_fit((x - mean) / scale, np.eye(num_classes)[labels], strength)
  return Probe(mean, scale, weights, bias)


def scores(probe: Probe, x: np.ndarray) -> np.ndarray:
  """[N, C] outputs of the probe for features x [N, F]; the predicted class is the largest."""
  return ((np.asarray(x, np.float64) - probe.mean) / probe.scale) @ probe.weights + probe.bias


def cross_validate(x: np.ndarray, labels: np.ndarray, num_classes: int, strengths: Sequence[float] = STRENGTHS,
                   folds: int = FOLDS, seed: int = 0) -> tuple[float, np.ndarray]:
  """The strength with the smallest held-out squared error of the one-hot answer over `folds` folds of the
  training features (random, seeded), and that error for every strength [S].

  Squared error rather than accuracy: it changes smoothly with the strength and varies less across small folds,
  where accuracies tie; and it is what the ridge fits. Each fold's probe standardises with its own training part.
  """
  labels = np.asarray(labels)
  folds = min(folds, len(labels))
  if folds < 2:
    raise ValueError(f'cross-validation needs at least 2 examples, got {len(labels)}')
  fold = np.random.default_rng(seed).permutation(len(labels)) % folds
  targets = np.eye(num_classes)[labels]
  errors = np.zeros(len(strengths))
  for i in range(folds):
    held = fold == i
    for j, strength in enumerate(strengths):
      probe = fit(x[~held], labels[~held], num_classes, strength)
      errors[j] += np.sum(np.square(scores(probe, x[held]) - targets[held]))
  errors /= len(labels)
  return float(strengths[int(np.argmin(errors))]), errors


def probe_accuracy(train_x: np.ndarray, train_labels: np.ndarray, eval_x: np.ndarray, eval_labels: np.ndarray,
                   num_classes: int, strengths: Sequence[float] = STRENGTHS) -> tuple[float, float]:
  """Accuracy on the evaluation features of the probe fitted on all training features at the cross-validated
  strength, and that strength. An evaluation label of -1 (an answer never seen in training) is always wrong."""
  strength, _ = cross_validate(train_x, train_labels, num_classes, strengths)
  predicted = np.argmax(scores(fit(train_x, train_labels, num_classes, strength), eval_x), axis=1)
  return float(np.mean(predicted == np.asarray(eval_labels))), strength


def run(train_features: Mapping[str, np.ndarray], train_answers: Sequence[str], train_groups: Sequence[Any],
        eval_features: Mapping[str, np.ndarray], eval_answers: Sequence[str], eval_groups: Sequence[Any],
        strengths: Sequence[float] = STRENGTHS) -> dict[str, Any]:
  """Probes of every representation in every group; answers are normalised (vqa.normalize) here.

  Groups are the examples' values of `group_by` (of the first evaluator of config.evals that has one); None is no
  value (every example's when there is none), a group of its own named 'none' beside named ones. Returns
  'metrics': `probe/<representation>/accuracy` over all evaluation examples and, when there are named groups,
  `probe/<representation>/accuracy/<group>`, with the same for `majority` (the most common training answer of each
  group: the floor of a probe that reads nothing);
  'strengths': representation -> group -> the chosen strength; 'groups': group -> its examples and classes;
  'train_examples' and 'eval_examples'.
  """
  train_answers = [vqa.normalize(a) for a in train_answers]
  eval_answers = [vqa.normalize(a) for a in eval_answers]
  values = sorted(set(train_groups) | set(eval_groups), key=lambda g: (g is not None, str(g)))
  grouped = values != [None]
  correct = dict.fromkeys((*REPRESENTATIONS, 'majority'), 0.0)
  metrics, chosen, groups = {}, {key: {} for key in REPRESENTATIONS}, {}
  for value in values:
    train_rows = [i for i, g in enumerate(train_groups) if g == value]
    eval_rows = [i for i, g in enumerate(eval_groups) if g == value]
    if not eval_rows:
      continue
    name = 'none' if value is None else grounding.metric_name(value)
    classes = sorted({train_answers[i] for i in train_rows})
    train_labels = np.array([classes.index(train_answers[i]) for i in train_rows], int)
    eval_labels = np.array([classes.index(eval_answers[i]) if eval_answers[i] in classes else -1
                            for i in eval_rows], int)
    groups[name if grouped else 'all'] = {'train_examples': len(train_rows), 'eval_examples': len(eval_rows),
                                          'classes': classes}
    accuracy = {'majority': vqa.majority_baseline([train_answers[i] for i in train_rows],
                                                  [eval_answers[i] for i in eval_rows])['accuracy']}
    for key in REPRESENTATIONS:
      if len(classes) < 2:  # one answer (or none) to give: the probe is the majority answer
        accuracy[key] = accuracy['majority']
        continue
      accuracy[key], chosen[key][name if grouped else 'all'] = probe_accuracy(
          train_features[key][train_rows], train_labels, eval_features[key][eval_rows], eval_labels, len(classes),
          strengths)
    for key, value_accuracy in accuracy.items():
      correct[key] += value_accuracy * len(eval_rows)
      if grouped:
        metrics[f'probe/{key}/accuracy/{name}'] = value_accuracy
  for key, total in correct.items():
    metrics[f'probe/{key}/accuracy'] = total / max(len(eval_answers), 1)
  return {'metrics': metrics, 'strengths': chosen, 'groups': groups, 'train_examples': len(train_answers),
          'eval_examples': len(eval_answers)}


def table(result: Mapping[str, Any], split: str) -> list[str]:
  """The table of `run`'s result: one row per representation and the majority floor, one column for all
  evaluation examples and one per group (accuracy %)."""
  metrics = result['metrics']
  names = [g for g in result['groups'] if f'probe/majority/accuracy/{g}' in metrics]
  width = max([9] + [len(g) + 2 for g in names])
  lines = [f'linear probes on {split} (accuracy %), fitted on {result["train_examples"]} training examples',
           f'  {"representation":<16}{"all":>{width}}' + ''.join(f'{g:>{width}}' for g in names),
           f'  {"examples":<16}{result["eval_examples"]:>{width}}' +
           ''.join(f'{result["groups"][g]["eval_examples"]:>{width}}' for g in names)]
  for key in (*REPRESENTATIONS, 'majority'):
    lines.append(f'  {key:<16}{100 * metrics[f"probe/{key}/accuracy"]:>{width}.1f}' +
                 ''.join(f'{100 * metrics[f"probe/{key}/accuracy/{g}"]:>{width}.1f}' for g in names))
  return lines
