"""Linear probes (evaluators/probe.py): the ridge probe on synthetic features, cross-validation, the features of a
tiny model, and the `probe` command on a tiny trained workdir."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import random_batch
from conftest import tiny_config
from mirasol_jax.evaluators import probe
from mirasol_jax.evaluators import vqa
from mirasol_jax.models import encoders
from mirasol_jax.models import mirasol
from test_train import TINY
from test_train import _env
from test_train import _run


def _clusters(rng, count, width, classes, noise):
  """Features [count, width] around one random centre per class, and the labels [count]."""
  centres = rng.normal(size=(classes, width))
  labels = rng.integers(0, classes, count)
  return centres[labels] + noise * rng.normal(size=(count, width)), labels


@pytest.mark.parametrize('width', [20, 400])  # fewer features than examples (primal), more (dual)
def test_the_probe_reads_a_linear_label_and_not_a_random_one(width):
  rng = np.random.default_rng(0)
  x, labels = _clusters(rng, 400, width, 4, noise=0.5)
  x = x * rng.uniform(0.01, 100.0, width)  # standardisation makes the features' scales irrelevant
  accuracy, _ = probe.probe_accuracy(x[:200], labels[:200], x[200:], labels[200:], 4)
  assert accuracy == 1.0
  noise = rng.integers(0, 4, 400)
  accuracy, _ = probe.probe_accuracy(x[:200], noise[:200], x[200:], noise[200:], 4)
  assert 0.15 < accuracy < 0.35  # chance is 0.25


def test_the_dual_form_gives_the_primal_weights():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(30, 80)), np.eye(3)[rng.integers(0, 3, 30)]  # 80 features > 30 examples: dual form
  weights, bias = probe.ridge_fit(x, y, 0.1)
  xc = x - x.mean(0)
  primal = np.linalg.solve(xc.T @ xc + 0.1 * 80 * np.eye(80), xc.T @ (y - y.mean(0)))
  np.testing.assert_allclose(weights, primal, atol=1e-10)
  np.testing.assert_allclose(bias, y.mean(0) - x.mean(0) @ primal, atol=1e-10)


def test_cross_validation_regularises_noise_and_not_signal():
  rng = np.random.default_rng(2)
  x, labels = _clusters(rng, 200, 10, 3, noise=0.3)
  strength, errors = probe.cross_validate(x, labels, 3)
  assert strength <= 1.0 and errors.shape == (len(probe.STRENGTHS),)
  # A label that is independent of the features: the best probe predicts the class frequencies, the strongest.
  strength, errors = probe.cross_validate(x, rng.integers(0, 3, 200), 3)
  assert strength == max(probe.STRENGTHS) and errors[-1] < errors[0]


def test_features_are_chunk_means_of_each_representation():
  config = tiny_config()
  model = mirasol.Model(**config.model)
  batch = random_batch(config, 3)
  params = jax.jit(model.init)(jax.random.key(0), batch)['params']
  batch['example_mask'][1] = False  # a padding example: left out
  batch['index'] = np.array([7, -1, 9])

  def encode_both(params, batch):
    """The probe's features, and the tokens they pool from the model's own methods (one compilation)."""
    u, _ = model.apply({'params': params}, batch['video'], batch['audio'], batch['audio_mask'],
                       method=mirasol.Model.encode_chunk_tokens)
    x, h = model.apply({'params': params}, batch, method=mirasol.Model.encode_av)
    return probe.representations(model, params, batch), (u, x, h)
  encode_both = jax.jit(encode_both)
  features, indices = probe.extract(lambda p, b: encode_both(p, b)[0], params, [batch, batch], limit=3)
  np.testing.assert_array_equal(indices, [7, 9, 7])
  t, d = config.model.num_chunks, config.model.width
  assert {k: v.shape for k, v in features.items()} == {k: (3, t * d) for k in probe.REPRESENTATIONS}
  u, x, h = map(np.asarray, encode_both(params, {k: batch[k] for k in ('video', 'audio', 'audio_mask')})[1])
  m = config.model
  num_video = encoders.num_video_tokens(m.video.tubes, (m.num_frames // t, *m.image_size))
  expected = {'video_tokens': u[:, :, :num_video], 'audio_tokens': u[:, :, num_video:], 'combiner': x,
              'av_latents': h}
  for name, tokens in expected.items():
    np.testing.assert_allclose(features[name][:2], tokens[[0, 2]].mean(2).reshape(2, t * d), rtol=1e-5,
                               atol=1e-5, err_msg=name)


@pytest.fixture(scope='module')
def data(small_demo):
  return small_demo


def test_the_probe_command_on_a_trained_workdir(repo, data, tmp_path):
  workdir = str(tmp_path)
  _run(repo, data, workdir, '--config.total_steps=2', '--config.checkpoint_every_steps=2')
  result = subprocess.run([sys.executable, '-m', 'mirasol_jax.main', 'probe', f'--workdir={workdir}', *TINY,
                           f'--config.data.path={data}', '--probe_examples=9'], cwd=repo, env=_env(),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  with open(os.path.join(workdir, 'probe.json')) as f:
    report = json.load(f)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    last = json.loads(f.readlines()[-1])
  records = {}
  for split in ('train', 'validation'):
    with open(os.path.join(data, f'{split}.jsonl')) as f:
      records[split] = [json.loads(line) for line in f]
  kinds = sorted({r['kind'] for r in records['validation']})
  assert report['step'] == 2 and report['train_examples'] == 9 and report['eval_examples'] == 4
  assert last == {'step': 2, **report['metrics']}
  for key in (*probe.REPRESENTATIONS, 'majority'):
    for suffix in [''] + [f'/{kind}' for kind in kinds]:
      assert 0.0 <= report['metrics'][f'probe/{key}/accuracy{suffix}'] <= 1.0
  for kind in kinds:  # the floor: the most common answer of the kind's first training examples
    answers = {split: [r['answer'] for r in rows if r['kind'] == kind]
               for split, rows in (('train', records['train'][:9]), ('validation', records['validation']))}
    floor = vqa.majority_baseline(answers['train'], answers['validation'])['accuracy']
    assert report['metrics'][f'probe/majority/accuracy/{kind}'] == pytest.approx(floor)
  lines = result.stdout.splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith('linear probes on validation'))
  assert lines[header + 1].split() == ['representation', 'all', *kinds]
  assert lines[header + 2].split()[:2] == ['examples', '4']
  for row, key in zip(lines[header + 3:header + 8], (*probe.REPRESENTATIONS, 'majority')):
    cells = row.split()
    assert cells[0] == key and len(cells) == len(kinds) + 2
    assert float(cells[1]) == pytest.approx(100 * report['metrics'][f'probe/{key}/accuracy'], abs=0.05)
