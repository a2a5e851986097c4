"""Evaluators as plug-ins (evaluators/base.py and one module per type), tasks and mixtures: the scoring functions
against the model's own loss, average precision by hand, task prompts and targets, the mixture's schedule, resume
and process-count independence, and one tiny run with every evaluator type and the `eval` command on other data."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import pytest

from conftest import random_batch, tiny_config
from mirasol_jax import config_lib
from mirasol_jax.data import pipeline
from mirasol_jax.data import tasks
from mirasol_jax.decoding import prompt_lengths
from mirasol_jax.evaluators import base
from mirasol_jax.evaluators import classification
from mirasol_jax.evaluators import multiple_choice
from mirasol_jax.evaluators import scoring
from mirasol_jax.models import mirasol
from test_train import _env


def test_candidate_tokens_write_each_candidate_after_the_prompt():
  tokens = jnp.array([[1, 7, 8, 20, 21, 2, 0, 0]])  # BOS, prompt 7 8, target 20 21, EOS
  mask = jnp.array([[0, 0, 0, 1, 1, 1, 0, 0]], bool)
  candidates = jnp.array([[[30, 31, 32], [40, 0, 0], [0, 0, 0]]])
  out, target = scoring.candidate_tokens(tokens, prompt_lengths(mask), candidates, jnp.array([[3, 1, 0]]))
  np.testing.assert_array_equal(out[0], [[1, 7, 8, 30, 31, 32, 2, 0], [1, 7, 8, 40, 2, 0, 0, 0],
                                         [1, 7, 8, 2, 0, 0, 0, 0]])
  np.testing.assert_array_equal(target[0].astype(int), [[0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0, 0, 0],
                                                        [0] * 8])


def test_the_likelihood_of_an_examples_own_target_is_its_text_loss():
  config = tiny_config()
  model = mirasol.Model(**config.model)
  batch = random_batch(config, batch_size=2)
  batch['text_loss_mask'][:] = False
  batch['text_loss_mask'][:, 5:9] = True  # target tokens 5..7, EOS at 8
  batch['text_tokens'][:, 8] = 2
  batch['text_tokens'][:, 9:] = 0
  variables = model.init(jax.random.key(0), batch)
  out = model.apply(variables, batch)
  own = batch['text_tokens'][:, None, 5:8]
  other = np.full_like(own, 9)
  tokens, mask = scoring.candidate_tokens(batch['text_tokens'], prompt_lengths(batch['text_loss_mask']),
                                          np.concatenate([own, other], 1), np.full((2, 2), 3, np.int32))
  np.testing.assert_array_equal(tokens[:, 0], batch['text_tokens'])
  sums = scoring.log_likelihoods(model, variables, out['av_latents'], tokens, mask, length_normalize=False)
  # The model's text loss is the mean cross-entropy over both examples' 4 target tokens (3 tokens and EOS).
  np.testing.assert_allclose(-jnp.sum(sums[:, 0]) / 8, out['losses']['text'], rtol=1e-5)
  means = scoring.log_likelihoods(model, variables, out['av_latents'], tokens, mask, length_normalize=True)
  np.testing.assert_allclose(means, sums / 4, rtol=1e-6)


def test_average_precision_by_hand():
  scores = np.array([0.9, 0.8, 0.7, 0.6])
  # Positives ranked 1st and 3rd: precisions 1/1 and 2/3.
  assert classification.average_precision(scores, np.array([1, 0, 1, 0], bool)) == pytest.approx((1 + 2 / 3) / 2)
  assert np.isnan(classification.average_precision(scores, np.zeros(4, bool)))
  # Class 0 ranks its positive (example 0) first, class 1 its positive (example 1) second: AP 1 and 1/2.
  assert classification.mean_average_precision(np.array([[0.9, 0.8], [0.1, 0.2]]), np.array([0, 1])) == 0.75


def test_answer_index_of_multiple_choice_records():
  assert multiple_choice.answer_index({'options': ['a cat', 'a dog'], 'answer': 'The dog'}) == 1
  assert multiple_choice.answer_index({'options': ['x', 'y', 'z'], 'answer_index': 2}) == 2
  for bad in ({'options': ['x'], 'answer': 'y'}, {'options': ['x'], 'answer_index': 3}, {'answer': 'x'}):
    with pytest.raises(ValueError):
      multiple_choice.answer_index(bad)


def test_task_prompts_targets_and_references():
  record = {'question': 'what?', 'title': 'a title', 'options': ['a', 'b'], 'answer': 'a',
            'captions': ['one caption', 'another'], 'label': 'cat'}
  assert tasks.prompt(record) == 'a title\nwhat?\noptions: a | b'
  assert tasks.prompt(record, '{question}') == 'what?'
  assert tasks.prompt(record, '{title}\n{missing}\n{question} ({options})') == 'a title\nwhat? (a | b)'
  assert tasks.prompt(record, 'what happens?') == 'what happens?'
  assert tasks.target(record) == 'a' and tasks.target(record, 'label') == 'cat'
  assert tasks.references(record, 'captions') == ['one caption', 'another']
  assert tasks.target(record, 'captions') == 'one caption'  # evaluation: the first reference
  drawn = {tasks.target(record, 'captions', np.random.default_rng(seed)) for seed in range(20)}
  assert drawn == {'one caption', 'another'}  # training: any reference
  first = {tasks.target(record, 'captions', np.random.default_rng(seed), 'first') for seed in range(20)}
  assert first == {'one caption'}  # training on the first reference only
  with pytest.raises(ValueError, match='reference'):
    tasks.target(record, 'captions', np.random.default_rng(0), 'longest')
  assert tasks.target(record, 'caption') is None
  with pytest.raises(ValueError, match='prompt template'):
    tasks.prompt(record, '{question')


def test_task_schedule_keeps_the_weights():
  assert pipeline.task_counts([3.0, 1.0]) == [3, 1]
  assert pipeline.task_counts([0.7, 0.3]) == [7, 3]
  assert pipeline.task_counts([1 / 3, 2 / 3]) == [1, 2]
  assert pipeline._smooth_round_robin([3, 1]) == [0, 0, 1, 0]
  order = pipeline._smooth_round_robin([2, 3, 5])
  assert [order.count(t) for t in range(3)] == [2, 3, 5]


def _mixture_config(data, per_step=False, batch_size=4):
  config = tiny_config()
  config.model.vocab_size, config.model.max_text_len = 512, 32  # room for a whole caption after its prompt
  config.data = config_lib.data_config(source='jsonl', path=data, task_per_step=per_step)
  config.data.tasks = {'qa': dict(weight=3.0, prompt='{question}', target='answer'),
                       'caption': dict(weight=1.0, prompt='what happens?', target='captions')}
  config.batch_size = batch_size
  return config


@pytest.fixture(scope='module')
def tokenized(small_demo, tmp_path_factory):
  """The small demo with a tokenizer trained on every text of it."""
  from mirasol_jax.data import sources
  from mirasol_jax.data import tokenizer
  path = str(tmp_path_factory.mktemp('tok') / 'tokenizer.model')
  tokenizer.train_on_source(sources.JsonlSource(small_demo, 'train'), 512, path)
  return small_demo, path


def _batches(config, count, process_index=0, process_count=1, state=None):
  iterator = pipeline.build(config, 'train', process_index, process_count)
  if state is not None:
    iterator.set_state(state)
  return [next(iterator) for _ in range(count)], iterator.get_state()


def _prompts(batch, processor):
  from mirasol_jax.data import tokenizer
  return [tokenizer.decode(processor, t[1:p]) for t, p in zip(batch['text_tokens'],
                                                              np.asarray(prompt_lengths(batch['text_loss_mask'])))]


@pytest.mark.parametrize('per_step', [False, True])
def test_a_mixture_keeps_its_weights_resumes_exactly_and_ignores_the_process_count(tokenized, per_step):
  from mirasol_jax.data import tokenizer
  data, path = tokenized
  config = _mixture_config(data, per_step)
  config.data.tokenizer = path
  processor = tokenizer.load(path)
  batches, _ = _batches(config, 8)
  prompts = [_prompts(b, processor) for b in batches]
  captions = [sum(p == 'what happens?' for p in batch) for batch in prompts]
  assert sum(captions) == 8  # one example in four over 8 batches of 4
  if per_step:  # each batch is one task's, the caption task's once in every 4 steps
    assert set(captions) == {0, 4} and captions[:4] == captions[4:]
  assert all(p in ('what happens?',) or p.endswith('?') for batch in prompts for p in batch)
  # Stopped after 3 batches and resumed from the iterator state: the same 5 batches follow.
  first, state = _batches(config, 3)
  rest, _ = _batches(config, 5, state=state)
  for a, b in zip(batches, first + rest):
    np.testing.assert_array_equal(a['index'], b['index'])
    np.testing.assert_array_equal(a['text_tokens'], b['text_tokens'])
  # Two processes read halves of the same global batches.
  halves = [_batches(config, 3, p, 2)[0] for p in range(2)]
  for i in range(3):
    np.testing.assert_array_equal(np.concatenate([halves[0][i]['index'], halves[1][i]['index']]),
                                  batches[i]['index'])
    np.testing.assert_array_equal(np.concatenate([halves[0][i]['text_tokens'], halves[1][i]['text_tokens']]),
                                  batches[i]['text_tokens'])


def test_evaluator_configs_name_their_fields():
  cfg = base.config('classification', top_k=3)
  assert cfg.type == 'classification' and cfg.top_k == 3 and cfg.every_steps == 0
  with pytest.raises(ValueError, match="no field 'beam_size'"):
    base.config('classification', beam_size=3)
  with pytest.raises(ValueError, match='not one of'):
    base.config('bleu')



def test_evaluators_that_need_text_refuse_a_run_without_any():
  config = tiny_config()
  config.data = config_lib.data_config(source='jsonl', path='/data/clips_without_text')
  config.evals = ml_collections.ConfigDict({'validation': base.config('vqa'), 'loss': base.config('loss')})
  evals = base.build(base.Context(config, None, None, (), None, None, '', processor=None))
  evals['loss'].check_text()  # the audio-video losses need no text
  with pytest.raises(ValueError, match=r'config.evals.validation \(vqa\) reads and writes text.*/data/clips_without_'
                     r'text.*every_steps=-1'):
    evals['validation'].check_text()
  with pytest.raises(ValueError, match=r'config.data.tasks.qa.prompt: prompt template'):
    tasks.task_data(config_lib.data_config(tasks={'qa': dict(prompt='{question')}), 'qa')


CONFIG = '''
import ml_collections
from mirasol_jax import config_lib
from mirasol_jax.evaluators import base


def get_config(arg=None):
  config = config_lib.base_config('tiny')
  config.model.vocab_size = 512
  config.model.dtype = 'float32'
  config.data = config_lib.data_config(source='jsonl')
  config.data.tasks = ml_collections.ConfigDict({
      'qa': dict(weight=1.0, prompt='{question}', target='answer'),
      'caption': dict(weight=1.0, prompt='what happens?', target='captions'),
  })
  config.batch_size = 4
  config.total_steps = 2
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.peak_tflops = 1.0
  config.evals = ml_collections.ConfigDict({
      'validation': base.config('vqa', task='qa', group_by='kind', max_new_tokens=2),
      'beam': base.config('vqa', task='qa', max_new_tokens=2, beam_size=2, diagnostics=False),
      'captions': base.config('caption', task='caption', max_new_tokens=4, beam_size=2),
      'choice': base.config('multiple_choice', task='qa', group_by='kind'),
      'choice_generated': base.config('multiple_choice', task='qa', mode='generate', max_new_tokens=2),
      'answers': base.config('classification', task='qa', top_k=2, class_batch=4, mean_ap=True),
      'loss': base.config('loss', task='qa'),
      'later': base.config('loss', task='qa', every_steps=-1),
  })
  return config
'''


def test_every_evaluator_in_one_run_and_the_eval_command_on_other_data(repo, small_demo, tmp_path):
  data = str(tmp_path / 'data')
  shutil.copytree(small_demo, data)
  with open(os.path.join(data, 'validation.jsonl'), 'a') as f:  # an unreadable example: in no metric, counted
    f.write(json.dumps(dict(id='lost', video='videos/lost.mp4', question='what?', answer='red', options=['red'],
                            captions=['gone'], kind='colour')) + '\n')
  config_path = tmp_path / 'evals.py'
  config_path.write_text(CONFIG)
  workdir = str(tmp_path / 'run')
  command = [sys.executable, '-m', 'mirasol_jax.main', 'train', f'--config={config_path}', f'--workdir={workdir}',
             f'--config.data.path={data}']
  result = subprocess.run(command, cwd=repo, env=_env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    evaluation = [json.loads(line) for line in f][-1]
  assert evaluation['step'] == 2
  for name in ('validation', 'beam', 'captions', 'choice', 'choice_generated', 'answers', 'loss'):
    assert evaluation[f'eval/{name}/examples'] == 4 and evaluation[f'eval/{name}/skipped'] == 1, name
    assert os.path.exists(os.path.join(workdir, 'predictions', f'{name}_2.jsonl')) or name == 'loss'
  assert not any(k.startswith('eval/later/') for k in evaluation)  # every_steps < 0: only the eval command
  for key in ('validation/accuracy', 'beam/accuracy', 'choice/accuracy', 'choice_generated/accuracy',
              'answers/top1', 'answers/top2', 'answers/mean_ap', 'captions/bleu4', 'captions/rouge_l'):
    assert 0.0 <= evaluation[f'eval/{key}'] <= 1.0, key
  assert evaluation['eval/answers/top1'] <= evaluation['eval/answers/top2']
  assert evaluation['eval/captions/cider'] >= 0.0
  # The same batch, the same parameters: the loss evaluator's text loss is the vqa evaluator's.
  assert evaluation['eval/loss/loss_text'] == pytest.approx(evaluation['eval/validation/loss_text'], rel=1e-5)
  with open(os.path.join(workdir, 'predictions', 'choice_2.jsonl')) as f:
    choices = [json.loads(line) for line in f]
  assert len(choices) == 4 and all(len(c['scores']) == len(c['options']) for c in choices)
  for name in ('validation', 'captions', 'choice'):
    assert f'{name} (' in result.stdout, name
  # `eval` on other data (two of its examples): parameters only, config.json untouched, metrics appended.
  other = str(tmp_path / 'other')
  shutil.copytree(data, other)
  with open(os.path.join(other, 'validation.jsonl')) as f:
    lines = f.readlines()[:2]
  with open(os.path.join(other, 'validation.jsonl'), 'w') as f:
    f.writelines(lines)
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = f.read()
  command = [sys.executable, '-m', 'mirasol_jax.main', 'eval', f'--config={config_path}', f'--workdir={workdir}',
             f'--config.data.path={other}']
  result = subprocess.run(command, cwd=repo, env=_env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'evaluating' in result.stdout and 'checkpoints/2' in result.stdout
  with open(os.path.join(workdir, 'config.json')) as f:
    assert f.read() == saved
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    last = [json.loads(line) for line in f][-1]
  assert last['step'] == 2 and last['eval/later/examples'] == 2 and last['eval/validation/examples'] == 2
