"""The `answer` command (mirasol_jax/answer.py) on a tiny run's workdir: its input and answer are the evaluation
path's for the same record, its score is the likelihood the evaluators compute, streaming encodes each chunk once and
ends with the whole clip's answer, it captions without a question, and the errors a user can make are named. The
live reader of --stream: each chunk decoded from the file when reached, once, with evaluation's frames, and its
log-mel from the audio heard so far (audio.LogMelStream against chunk_log_mel)."""
import json
import math
import os
import shutil
import subprocess
import sys

import av
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
from mirasol_jax.data import audio as audio_lib
from mirasol_jax.data import demo_data
from mirasol_jax.data import media
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
  assert all(' s  decode ' in line for line in chunks)  # the time reading the chunk from the file
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


# ---------------------------------------------------------------------------------------------------------------
# The live reader of --stream.

SR = demo_data.SAMPLE_RATE


def _tone(audio, start, seconds, amplitude, hz=880.0):
  lo, hi = int(start * SR), int((start + seconds) * SR)
  audio[lo:hi] += amplitude * np.sin(2 * np.pi * hz * np.arange(hi - lo) / SR)


def _write_clip(path, seconds=3.0, fps=12, bframes=0, keyint=250, loud_at=0.2, sound=True):
  """An H.264 + AAC (16 kHz mono) mp4 of 64x48 frames that all differ (a square moving over a gradient), its loudest
  tone at `loud_at` s and ever quieter ones every 0.7 s from 0.6 s after it; with `bframes`, B-frames (decoded out of
  presentation order) and a key frame every `keyint` frames; no audio track without `sound`. Returns the
  presentation times of its frames."""
  num = int(seconds * fps)
  yy, xx = np.mgrid[:48, :64]
  frames = np.repeat(((xx * 3 + yy * 2) % 200).astype(np.uint8)[None, ..., None], num, 0).repeat(3, -1)
  for i in range(num):
    x = 4 + (i * 5) % 52
    frames[i, 10:30, x:x + 8] = (255, 40 + 7 * i % 200, 90)
  audio = np.zeros(int(seconds * SR), np.float32)
  _tone(audio, loud_at, 0.3, 0.6)
  for k, start in enumerate(np.arange(loud_at + 0.6, seconds - 0.3, 0.7)):
    _tone(audio, start, 0.2, 0.3 / 3 ** k, hz=440.0)
  with av.open(path, 'w') as container:
    video = container.add_stream('libx264', rate=fps)
    video.width, video.height, video.pix_fmt = 64, 48, 'yuv420p'
    video.options = {'crf': '14', 'preset': 'veryfast',
                     'x264-params': f'keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes={bframes}'}
    track = container.add_stream('aac', rate=SR, layout='mono') if sound else None
    for i, array in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format='rgb24')
      frame.pts = i
      container.mux(video.encode(frame))
    container.mux(video.encode(None))
    for offset in range(0, len(audio) if sound else 0, 1024):
      frame = av.AudioFrame.from_ndarray(audio[None, offset:offset + 1024].copy(), format='fltp', layout='mono')
      frame.sample_rate, frame.pts = SR, offset
      container.mux(track.encode(frame))
    if sound:
      container.mux(track.encode(None))
  return np.arange(num) / fps


def _reordered(path):
  """Whether some video packet is presented after a later-decoded one (B-frames)."""
  with av.open(path) as container:
    pts = [p.pts for p in container.demux(video=0) if p.pts is not None]
  return pts != sorted(pts)


@pytest.mark.parametrize('bframes', [0, 2])
def test_the_live_reader_decodes_each_chunk_once_when_reached_with_evaluations_frames(answerer, tmp_path, bframes):
  config, task, processor, _ = answerer
  path = str(tmp_path / 'clip.mp4')
  frame_times = _write_clip(path, bframes=bframes, keyint=6 if bframes else 250)
  assert _reordered(path) == bool(bframes)  # the case is exercised: packets out of presentation order
  fps, num_chunks = 12, config.model.num_chunks
  for start, end in ((None, None), (0.9, 2.9)):  # the whole file; a clip whose first key frame is sought (1.0 s)
    whole = answer.read_clip(config, task, path, start, end, 'which way?', processor)
    live = answer.open_clip(config, task, path, start, end, 'which way?', processor)
    assert live.chunk_bounds == whole.chunk_bounds and live.has_audio and whole.has_audio
    np.testing.assert_array_equal(live.text[0], whole.example['text_tokens'])
    times = media.segment_times(whole.start, whole.end, config.model.num_frames).reshape(num_chunks, -1)
    decoded = []
    with live.reader() as reader:
      for t in range(num_chunks):
        video, audio, audio_mask = reader.read()
        # The frames are evaluation's: the whole clip's sample times restricted to the chunk, the same pixels.
        np.testing.assert_array_equal(video[0], whole.example['video'][0, t])
        # Each clip's loudest tone is in its chunk 1 (0.2 s; 0.8 s for the clip from 0.9 s), so the floors agree;
        # every spectrogram window this geometry reads lies inside its chunk.
        np.testing.assert_allclose(audio[0], whole.example['audio'][0, t], rtol=0, atol=1e-4)
        assert audio_mask.tolist() == [True]
        # Nothing later was decoded than the frame that ends the last sampled frame's display, and the audio frame
        # (1024 samples) that reaches past the chunk's end.
        after = frame_times[frame_times > times[t, -1]]
        assert reader.video_time <= (after[0] if len(after) else frame_times[-1]) + 1e-9
        assert reader.audio_time <= whole.chunk_bounds[t][1] + 1024 / SR + 1e-9
        assert reader.audio_tail_samples <= 400  # a window (25 ms) of earlier audio kept at most
        decoded.append(reader.video_frames_decoded - sum(decoded))
      with pytest.raises(ValueError, match='all read'):
        reader.read()
    # Each frame decoded once: from the key frame at or before the first sample time to the frame after the last
    # (or the file's end), whatever the chunk: constant work per chunk, no earlier chunk decoded again.
    first_key = 0.0 if start is None or not bframes else 1.0
    last = frame_times[frame_times > times[-1, -1]]
    expected = np.sum((frame_times >= first_key - 1e-9) & (frame_times <= (last[0] if len(last) else math.inf)))
    assert sum(decoded) == expected
    per_chunk = (whole.end - whole.start) / num_chunks * fps
    assert all(n <= per_chunk + 1 for n in decoded[1:]), decoded


def test_the_live_reader_of_a_file_without_sound(answerer, tmp_path):
  config, task, processor, _ = answerer
  path = str(tmp_path / 'silent.mp4')
  _write_clip(path, seconds=2.0, fps=10, sound=False)
  whole = answer.read_clip(config, task, path, question='which way?', processor=processor)
  live = answer.open_clip(config, task, path, question='which way?', processor=processor)
  assert not live.has_audio and not whole.has_audio
  with live.reader() as reader:
    chunks = [reader.read() for _ in range(config.model.num_chunks)]
    assert reader.audio_time == -math.inf  # nothing to decode
  for t, (video, audio, audio_mask) in enumerate(chunks):
    np.testing.assert_array_equal(video[0], whole.example['video'][0, t])
    np.testing.assert_array_equal(audio[0], whole.example['audio'][0, t])  # digital silence, as evaluation's
    assert audio_mask.tolist() == [False]


def _reference_log_mel(waveform, n_mels):
  """log_mel as first written (one function): the split into mel_power and power_to_db must give the same bits."""
  n_fft, hop = 400, 160
  y = np.pad(np.asarray(waveform, np.float32), n_fft // 2)
  num_frames = 1 + (len(y) - n_fft) // hop
  frames = np.lib.stride_tricks.as_strided(y, (num_frames, n_fft), (y.strides[0] * hop, y.strides[0]))
  power = np.abs(np.fft.rfft(frames * audio_lib._hann(n_fft), axis=-1)) ** 2  # pylint: disable=protected-access
  mel = power.astype(np.float32) @ audio_lib.mel_filterbank(SR, n_fft, n_mels).T
  db = 10.0 * np.log10(np.maximum(mel, 1e-10))
  return np.maximum(db, db.max() - 80.0).astype(np.float32)


def _streamed(waveform, bounds, frames_per_chunk):
  stream = audio_lib.LogMelStream(len(waveform), bounds, frames_per_chunk, SR, n_mels=32)
  out, heard, tails = [], [], []
  for t in range(len(bounds)):
    a, b = stream.chunk_samples(t)
    assert a == stream.heard
    out.append(stream.push(waveform[a:b]))
    heard.append(stream.heard)
    tails.append(stream.tail_samples)
  return np.stack(out), heard, tails, stream


def test_the_streamed_log_mel_is_the_whole_clips_of_the_audio_heard_so_far():
  rng = np.random.default_rng(0)
  waveform = (0.01 * rng.normal(size=2 * SR)).astype(np.float32)
  waveform[::997] = 0.0
  _tone(waveform, 0.1, 0.2, 0.8)  # the loudest sound, in chunk 1
  _tone(waveform, 1.2, 0.3, 0.1, hz=300.0)
  np.testing.assert_array_equal(audio_lib.log_mel(waveform, SR, n_mels=32), _reference_log_mel(waveform, 32))
  # Chunks of exactly frames_per_chunk hops: the last frame read of each chunk has its window half past its end.
  bounds = media.chunk_bounds(0.0, 2.0, 4)
  whole = audio_lib.chunk_log_mel(waveform, bounds, 50, SR, n_mels=32)
  streamed, heard, tails, stream = _streamed(waveform, bounds, 50)
  assert heard == [8000, 16000, 24000, 32000] and max(tails) <= 400
  for t in range(4):
    # What was heard, silence after: the whole clip's log-mel of that, chunk t of it (the floor agrees: the loudest
    # frame is in chunk 1). The mel projection sums in another order than the whole clip's: ~1e-6 dB apart.
    so_far = np.where(np.arange(len(waveform)) < heard[t], waveform, 0.0).astype(np.float32)
    np.testing.assert_allclose(streamed[t], audio_lib.chunk_log_mel(so_far, bounds, 50, SR, n_mels=32)[t],
                               rtol=0, atol=1e-4)
    # The whole clip's, except the last frame of chunks 1-3 (its window heard the next chunk's start).
    differs = np.abs(streamed[t] - whole[t]).max(axis=1) > 1e-4
    assert differs.tolist() == [False] * 49 + [t < 3]
  assert stream.loudest_db == pytest.approx(audio_lib.log_mel(waveform, SR, n_mels=32).max(), abs=1e-4)

  # The loudest sound in the last chunk: before it, the floor is the loudest heard so far, lower than the whole
  # clip's; bins above the whole clip's floor agree, quieter ones keep their value, and the last chunk agrees.
  late = waveform.copy()
  late[:int(0.5 * SR)] *= 0.01
  _tone(late, 1.6, 0.2, 0.9)
  bounds = media.chunk_bounds(0.0, 2.0, 5)  # 0.4 s chunks read at 20 frames, every other one: windows inside
  whole = audio_lib.chunk_log_mel(late, bounds, 20, SR, n_mels=32)
  streamed, *_ = _streamed(late, bounds, 20)
  floor = whole.min()
  above = whole > floor + 1e-3
  np.testing.assert_allclose(streamed[above], whole[above], rtol=0, atol=1e-4)
  assert streamed[0].min() < floor - 10.0  # quiet bins of the first chunk, under the whole clip's floor
  np.testing.assert_allclose(streamed[-1], whole[-1], rtol=0, atol=1e-4)


def test_streaming_from_the_file_encodes_each_chunk_once_and_ends_with_the_whole_clips_answer(
    answerer, encoded_chunks, tmp_path):
  config, task, processor, answerer = answerer
  path = str(tmp_path / 'clip.mp4')
  _write_clip(path, seconds=4.0)  # its loudest sound in chunk 1: the streamed features are the whole clip's
  whole_clip = answer.read_clip(config, task, path, question='which way?', processor=processor)
  live = answer.open_clip(config, task, path, question='which way?', processor=processor)
  answerer.prepare(live, stream=True)
  whole = answerer.answer(whole_clip)
  encoded_chunks.clear()
  played = list(answerer.play(live))
  assert [t for t, *_ in played] == list(range(1, config.model.num_chunks + 1))
  assert encoded_chunks == [1] * config.model.num_chunks
  # The same replies as feeding the model the whole clip's decoded chunks one by one.
  streamed = list(answerer.stream(whole_clip))
  for (_, live_reply, *_), (_, reply, *_) in zip(played, streamed):
    assert live_reply.text == reply.text and live_reply.tokens == reply.tokens
    assert live_reply.log_prob == pytest.approx(reply.log_prob, rel=1e-4, abs=1e-4)
  last = played[-1][1]
  assert last.text == whole.text and last.log_prob == pytest.approx(whole.log_prob, rel=1e-4, abs=1e-4)
  assert all(decode_s > 0 and step_s > 0 and reply_s > 0 for _, _, decode_s, step_s, reply_s in played)
