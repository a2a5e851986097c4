"""Grounding diagnostics and per-tower training scalars: the derangement, the accuracy tables, and a short run whose
metrics.jsonl and summary hold them."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirasol_jax.evaluators import grounding
from mirasol_jax.models import mirasol
from test_train import _run


def test_derangement_gives_every_valid_example_another_valid_examples_latents():
  mask = jnp.array([True, True, False, True, False, True])
  source = np.asarray(jax.jit(grounding.derangement)(mask))
  valid = np.flatnonzero(mask)
  assert sorted(source[valid]) == sorted(valid)  # the valid examples swap latents among themselves
  assert all(source[i] != i for i in valid)
  assert source[2] == 2 and source[4] == 4  # padding neither gives nor receives
  np.testing.assert_array_equal(source, grounding.derangement(mask))  # deterministic, jitted or not
  np.testing.assert_array_equal(source, [1, 3, 2, 5, 4, 0])
  h = jnp.arange(6.0)[:, None, None, None] * jnp.ones((6, 2, 3, 4))  # [B, T, m, D], example b holds b
  shuffled = jnp.take(h, source, axis=0)
  np.testing.assert_array_equal(shuffled[:, 0, 0, 0], [1, 3, 2, 5, 4, 0])


@pytest.mark.parametrize('mask, expected', [([False, True, False], [0, 1, 2]), ([False, False], [0, 1]),
                                            ([True, True], [1, 0])])
def test_derangement_of_few_valid_examples(mask, expected):
  np.testing.assert_array_equal(grounding.derangement(jnp.array(mask)), expected)


def test_accuracies_per_variant_and_group_and_their_table():
  correct = {'plain': [True, True, False, True], 'shuffled': [False, True, False, False]}
  result = grounding.accuracies(correct, ['colour', 'count', 'colour', None])
  assert result == {'accuracy': 0.75, 'accuracy/colour': 0.5, 'accuracy/count': 1.0, 'shuffled/accuracy': 0.25,
                    'shuffled/accuracy/colour': 0.0, 'shuffled/accuracy/count': 1.0, 'examples/colour': 2.0,
                    'examples/count': 1.0}
  assert grounding.metric_name('what is/it') == 'what_is_it'
  metrics = {f'eval/val/{k}': v for k, v in result.items()}
  metrics.update({'eval/val/examples': 4.0, 'eval/val/loss_text': 0.5, 'eval/val/shuffled/loss_text': 2.0})
  lines = grounding.table(metrics, 'val')
  assert lines[1].split() == ['group', 'examples', 'plain', 'shuffled']
  assert lines[2].split() == ['all', '4', '75.0', '25.0'] and lines[3].split() == ['colour', '2', '50.0', '0.0']
  assert lines[-1].split() == ['text', 'loss', '0.5000', '2.0000']
  assert max(map(len, lines)) <= 100
  assert grounding.table({'eval/val/accuracy': 0.5, 'eval/val/examples': 4.0}, 'val') == []


@pytest.fixture(scope='module')
def data(small_demo):
  return small_demo


def test_a_run_logs_grounding_update_ratios_and_statistics(repo, data, tmp_path):
  workdir = str(tmp_path)
  # The video encoder's learning rate is 0: it does not move, and the step drops its gradients unread.
  result = _run(repo, data, workdir, '--config.total_steps=2', '--config.checkpoint_every_steps=2',
                '--config.eval_every_steps=2', '--config.lr_multipliers.video_encoder=0.0')
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  assert all(math.isfinite(v) for line in lines for v in line.values())
  train, evaluation = lines[-2], lines[-1]  # step 2: the train scalars, then the evaluation
  assert train['step'] == evaluation['step'] == 2
  with open(os.path.join(data, 'validation.jsonl')) as f:
    kinds = {json.loads(line)['kind'] for line in f}
  split = 'eval/validation'
  for variant in ('', 'shuffled/', 'no_audio/', 'no_video/'):
    for key in [f'{split}/{variant}accuracy'] + [f'{split}/{variant}accuracy/{kind}' for kind in kinds]:
      assert 0.0 <= evaluation[key] <= 1.0, key
    assert evaluation[f'{split}/{variant}loss_text'] > 0.0
  assert sum(evaluation[f'{split}/examples/{kind}'] for kind in kinds) == evaluation[f'{split}/examples'] == 4
  for name in ('latent_target_spread', 'latent_pred_spread'):
    assert 0.0 < train[f'train/{name}'] <= 1.0 and 0.0 < evaluation[f'{split}/{name}'] <= 1.0
  for tower in mirasol.TOWERS:
    if tower == 'video_encoder':
      assert train[f'train/grad_norm/{tower}'] == train[f'train/update_ratio/{tower}'] == 0.0
    else:
      assert train[f'train/grad_norm/{tower}'] > 0.0, tower
      assert 0.0 < train[f'train/update_ratio/{tower}'] < 0.1, tower
  out = result.stdout
  assert 'grounding on validation' in out and 'shuffled' in out and 'no audio' in out and 'no video' in out
  table = out[out.index('grounding on validation'):].splitlines()
  assert table[2].split()[:2] == ['all', '4'] and any(line.split()[:2] == ['text', 'loss'] for line in table)
  assert 'train/update_ratio, step 2' in out and 'video_encoder=0' in out.split()
