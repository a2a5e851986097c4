"""The `answer` command (mirasol_jax/answer.py) on a tiny run's workdir: its input and answer are the evaluation
path's for the same record, its score is the likelihood the evaluators compute, streaming encodes each chunk once and
ends with the whole clip's answer, it captions without a question, and the errors a user can make are named."""
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import tiny_config
from mirasol_jax import answer
from mirasol_jax import checkpoint
from mirasol_jax import config_lib
from mirasol_jax import decoding
from mirasol_jax import train
from mirasol_jax.data import pipeline
from mirasol_jax.data import sources
from mirasol_jax.data import tokenizer as tokenizer_lib
from mirasol_jax.evaluators import scoring
from mirasol_jax.models import mirasol
from test_train import _env


@pytest.fixture(scope='module')
def run(small_demo, tmp_path_factory):
  """A workdir as the trainer writes it: config.json, tokenizer.model trained on the small demo dataset's text
  (train.ensure_tokenizer) and checkpoints/1 saved by checkpoint.save with the data iterator's state, holding the
  tiny config's parameters at their initialisation. `answer` reads the parameters alone, so the optimizer state and
  how far training went make no difference to it; compiling a train step would cost most of this file's minute."""
  config = tiny_config()
  config.model.vocab_size = 512
  config.data.source, config.data.path = 'jsonl', small_demo
  config.data.prompt, config.data.target = '{question}', 'answer'
  config.batch_size = 4
  config.evals.validation.max_new_tokens = 4
  workdir = str(tmp_path_factory.mktemp('answer') / 'run')
  os.makedirs(workdir)
  train.ensure_tokenizer(config, workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=1))
  model = mirasol.Model(**config.model)
  init = jax.jit(lambda rng: train.init_params(model, rng, mirasol.example_batch(config, 1))[0])
  params = nn.unbox(init(jax.random.PRNGKey(config.seed)))
  mngr = checkpoint.manager(workdir, keep=1, asynchronous=False)
  checkpoint.save(mngr, 1, {'params': params, 'step': 1}, pipeline.build(config, 'train'), config)
  mngr.wait_until_finished()
  mngr.close()
  return workdir


@pytest.fixture(scope='module')
def encoded_chunks():
  """Chunks encoded, counted at run time: Model.encode_chunk_tokens appends the number of chunks it encodes each time
  a compiled program runs it (every program compiled in this module has the count in it)."""
  counts = []
  original = mirasol.Model.encode_chunk_tokens

  def counted(self, video, audio, audio_mask, deterministic=True):
    jax.debug.callback(lambda: counts.append(video.shape[1]))
    return original(self, video, audio, audio_mask, deterministic)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(mirasol.Model, 'encode_chunk_tokens', counted)
    patch.setattr(answer, '_PROGRAMS', {})  # programs compiled with the count stay in this module
    yield counts


@pytest.fixture(scope='module')
def answerer(run, encoded_chunks):
  """(config, task, tokenizer, the run's Answerer for questions: greedy, 4 new tokens), shared so that its programs
  compile once."""
  config = answer.load_config(run)
  task = answer.choose_task(config.data, 'which way?')
  processor = pipeline.load_tokenizer(config.data, config.model)
  _, params = answer.restore_params(config, run)
  return config, task, processor, answer.Answerer(config, params, processor,
                                                  answer.decode_settings(config, task, None, None))


def test_the_answer_is_the_evaluation_paths_answer_to_the_same_record(answerer):
  config, task, processor, answerer = answerer
  # The evaluation path: the evaluators' batch of the validation split, its latents, greedy_decode.
  batch = pipeline.model_inputs(next(pipeline.build(config, 'validation', train=False)))
  variables = {'params': answerer.params}

  def evaluate(variables, batch):
    _, latents = answerer.model.apply(variables, batch, method=mirasol.Model.encode_av)
    return latents, decoding.greedy_decode(answerer.model, variables, batch, 4, tokenizer_lib.EOS_ID, latents=latents)

  latents, tokens = jax.jit(evaluate)(variables, batch)
  source = sources.open_source(task.data, 'validation')
  for i in range(len(source)):
    record = source[i]
    clip = answer.read_clip(config, task, record['video_path'], record['start'], record['end'], record['question'],
                            processor)
    np.testing.assert_array_equal(clip.example['video'][0], batch['video'][i])
    np.testing.assert_array_equal(clip.example['audio'][0], batch['audio'][i])
    prompt_len = int(decoding.prompt_lengths(batch['text_loss_mask'][i:i + 1])[0])
    assert int(decoding.prompt_lengths(clip.example['text_loss_mask'])[0]) == prompt_len
    np.testing.assert_array_equal(clip.example['text_tokens'][0, :prompt_len], batch['text_tokens'][i, :prompt_len])
    np.testing.assert_allclose(answerer.encode(clip)[0], latents[i], rtol=1e-5, atol=1e-5)
    reply = answerer.answer(clip)
    assert reply.text == tokenizer_lib.decode(processor, tokens[i])
    assert reply.log_prob <= 0.0 and 1 <= reply.tokens <= 4
  # The score counts the generated tokens up to their EOS: the likelihood the multiple-choice evaluator gives the
  # same text as a candidate answer (its tokens and an EOS after them).
  generated = np.array([[7, 9, tokenizer_lib.EOS_ID, 0]], np.int32)
  text = {k: batch[k][:1] for k in ('text_tokens', 'text_loss_mask')}
  log_probs, counted = answer.generated_log_probs(answerer.model, variables, latents[:1], text['text_tokens'],
                                                  text['text_loss_mask'], generated)
  candidates, mask = scoring.candidate_tokens(text['text_tokens'], decoding.prompt_lengths(text['text_loss_mask']),
                                              generated[:, None, :2], np.array([[2]], np.int32))
  expected = scoring.log_likelihoods(answerer.model, variables, latents[:1], candidates, mask, False)
  np.testing.assert_array_equal(counted, [[True, True, True, False]])
  np.testing.assert_allclose(np.sum(log_probs), expected[0, 0], rtol=1e-5)


def test_streaming_encodes_each_chunk_once_and_ends_with_the_whole_clips_answer(answerer, encoded_chunks):
  config, task, processor, answerer = answerer
  record = sources.open_source(task.data, 'validation')[2]
  clip = answer.read_clip(config, task, record['video_path'], question=record['question'], processor=processor)
  answerer.prepare(clip, stream=True)
  whole = answerer.answer(clip)
  assert encoded_chunks[-1] == config.model.num_chunks  # the whole clip at once
  encoded_chunks.clear()
  streamed = list(answerer.stream(clip))
  num_chunks = config.model.num_chunks
  assert [t for t, *_ in streamed] == list(range(1, num_chunks + 1))
  # One chunk encoded per step, T in all: no earlier chunk is encoded again (that would be T * (T + 1) / 2 = 10).
  assert encoded_chunks == [1] * num_chunks
  last = streamed[-1][1]
  assert last.text == whole.text and last.tokens == whole.tokens
  assert last.log_prob == pytest.approx(whole.log_prob, rel=1e-4, abs=1e-5)
  assert all(reply.log_prob <= 0.0 and step_s > 0 and reply_s > 0 for _, reply, step_s, reply_s in streamed)


def test_the_command_prints_the_answer_its_score_and_each_chunk(run, small_demo, answerer):
  del answerer  # its programs (same model, same settings) are the command's: nothing to compile again
  with open(os.path.join(small_demo, 'validation.jsonl')) as f:
    record = json.loads(f.readline())
  video = os.path.join(small_demo, record['video'])
  lines = []
  replies = answer.run(run, video, record['question'], start=0.5, end=3.5, out=lines.append)
  assert len(replies) == 1
  assert lines[-2] == (f'answer: {replies[0].text}  (log-prob {replies[0].mean_log_prob:.3f} per token, '
                       f'p={replies[0].probability:.2f})')
  assert 'checkpoints/1' in lines[0] and 'greedy' in lines[0] and '0.50-3.50 s' in lines[1]
  assert record['question'] in lines[2] and ' ms: encode ' in lines[-1]
  lines.clear()
  streamed = answer.run(run, video, record['question'], start=0.5, end=3.5, stream=True, out=lines.append)
  chunks = [line for line in lines if line.startswith('chunk ')]
  assert len(streamed) == len(chunks) == 4 and streamed[-1].text == replies[0].text
  assert chunks[0].startswith('chunk 1/4  0.50-1.25 s') and chunks[-1].startswith('chunk 4/4  0.50-3.50 s')
  assert all(' ms (step ' in line and ' + answer ' in line and 'answer: ' in line and 'log-prob' in line
             for line in chunks)
  lines.clear()
  answer.run(run, video, record['question'], beam=2, out=lines.append)
  assert 'beam search (2 beams)' in lines[0] and lines[-2].startswith('answer: ')


def test_captions_without_a_question_when_the_run_trained_them(run, tmp_path, repo):
  # The main job's mixture: a question goes to its QA task, no question to its captioning task.
  demo_tasks = config_lib.load_config(os.path.join(repo, 'configs/demo_tasks.py'))
  assert answer.choose_task(demo_tasks.data, 'which way?').name == 'qa'
  caption = answer.choose_task(demo_tasks.data, None)
  assert (caption.name, caption.kind, caption.prompt) == ('caption', 'caption', 'what happens in the clip?')
  assert answer.decode_settings(demo_tasks, caption, None, None)['max_new_tokens'] == 20  # its caption evaluator's
  assert answer.decode_settings(demo_tasks, caption, 3, 5) == dict(max_new_tokens=5, beam_size=3, length_penalty=0.0)
  # The tiny run's parameters, its config made a captioning task's.
  workdir = _with_config(run, tmp_path, prompt='describe the clip', target='captions')
  with pytest.raises(answer.AnswerError, match='not trained to answer questions.*Leave --question out'):
    answer.run(workdir, _video(run), 'which way?')
  lines = []
  replies = answer.run(workdir, _video(run), out=lines.append)
  assert len(replies) == 1 and lines[-2].startswith('caption: ') and "prompt: 'describe the clip'" in lines


def _video(workdir):
  config = answer.load_config(workdir)
  return sources.open_source(config.data, 'validation')[0]['video_path']


def _with_config(workdir, tmp_path, **data):
  """A copy of the workdir whose config.json has the given data fields."""
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  with open(os.path.join(copy, 'config.json')) as f:
    config = json.load(f)
  config['data'].update(data)
  with open(os.path.join(copy, 'config.json'), 'w') as f:
    json.dump(config, f)
  return copy


def test_errors_name_what_to_fix(run, small_demo, tmp_path, repo):
  video = _video(run)
  with pytest.raises(answer.AnswerError, match='not to caption.*Give --question'):
    answer.run(run, video)  # the run answers questions only
  with pytest.raises(answer.AnswerError, match='no such file'):
    answer.run(run, str(tmp_path / 'missing.mp4'), 'where?')
  not_media = tmp_path / 'notes.mp4'
  not_media.write_text('not a video')
  with pytest.raises(answer.AnswerError, match='cannot open'):
    answer.run(run, str(not_media), 'where?')
  with pytest.raises(answer.AnswerError, match=r'no clip \[5.00, 3.00\]'):
    answer.run(run, video, 'where?', start=5.0, end=3.0)
  with pytest.raises(answer.AnswerError, match='has no checkpoint of step 7'):
    answer.run(run, video, 'where?', step=7)
  with pytest.raises(answer.AnswerError, match='--task=caption'):
    answer.run(run, video, 'where?', task='caption')
  empty = tmp_path / 'untrained'
  empty.mkdir()
  with pytest.raises(answer.AnswerError, match='no config.json'):
    answer.run(str(empty), video, 'where?')
  for name in ('config.json', 'tokenizer.model'):
    shutil.copy(os.path.join(run, name), empty / name)
  with pytest.raises(answer.AnswerError, match='holds no checkpoint.*train it first'):
    answer.run(str(empty), video, 'where?')
  # The command line: the same message, exit status 1, no traceback.
  result = subprocess.run([sys.executable, '-m', 'mirasol_jax.main', 'answer', f'--workdir={run}',
                           f'--video={tmp_path / "missing.mp4"}', '--question=where?'], cwd=repo, env=_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and 'answer: ' in result.stderr and 'no such file' in result.stderr
  assert 'Traceback' not in result.stderr
