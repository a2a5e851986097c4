"""VQA scoring: normalisation, exact match and the majority-answer baseline; the optimizer's masks."""
import numpy as np
import optax

from mirasol_jax import optimizer
from mirasol_jax.evaluators import vqa


def test_normalisation_ignores_case_punctuation_articles_and_spacing():
  assert vqa.normalize('  The Red   Square! ') == 'red square'
  assert vqa.exact_match('an apple', 'Apple.')
  assert not vqa.exact_match('red', 'green')
  assert not vqa.exact_match('theatre', 'atre')  # articles only as whole words


def test_majority_baseline_overall_and_per_group():
  result = vqa.majority_baseline(['left', 'Left', 'right'], ['left', 'right', 'right', 'left'])
  assert result == {'answer': 'left', 'accuracy': 0.5}
  result = vqa.majority_baseline(['left', 'left', 'red', 'blue', 'blue'], ['right', 'left', 'blue', 'red'],
                                 ['dir', 'dir', 'col', 'col', 'col'], ['dir', 'dir', 'col', 'col'])
  assert result['answer'] == 'left' and result['accuracy'] == 0.25
  assert result['accuracy/dir'] == 0.5 and result['accuracy/col'] == 0.5 and result['per_group'] == 0.5


def _tree():
  ones = lambda *shape: np.ones(shape, np.float32)
  return {'encoder': {'dense': {'kernel': ones(2, 3), 'bias': ones(3)}, 'ln': {'scale': ones(3)}},
          'head': {'kernel': ones(3, 2)}}


def test_weight_decay_mask_and_frozen_parameters():
  params = _tree()
  mask = optimizer.decay_mask(params)
  assert mask['encoder']['dense']['kernel'] and not mask['encoder']['dense']['bias']
  assert not mask['encoder']['ln']['scale'] and mask['head']['kernel']

  class Config(dict):
    __getattr__ = dict.__getitem__

  config = Config(optimizer='adamw', lr=0.1, total_steps=10, warmup_steps=0, grad_clip=1.0, weight_decay=0.1,
                  frozen='^encoder/')
  tx = optimizer.make(config)
  grads = _tree()
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new['encoder']['dense']['kernel'], params['encoder']['dense']['kernel'])
  assert np.all(new['head']['kernel'] < 1.0)


def test_frozen_gradients_are_dropped_before_the_optimizer_sees_them():
  grads = optimizer.drop_frozen(_tree(), '^encoder/')
  assert not np.any(grads['encoder']['dense']['kernel']) and not np.any(grads['encoder']['ln']['scale'])
  np.testing.assert_array_equal(grads['head']['kernel'], _tree()['head']['kernel'])
  assert optimizer.drop_frozen(_tree(), '')['encoder']['dense']['bias'].sum() == 3
