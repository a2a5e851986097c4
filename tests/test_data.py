"""Input pipeline: exact frames, aligned audio, log-mel, tokens, sources, sharding, resume, bad input."""
import json
import os

import numpy as np
import pytest
from absl import flags

from conftest import tiny_config
from mirasol_jax.data import audio as audio_lib
from mirasol_jax.data import demo_data
from mirasol_jax.data import media
from mirasol_jax.data import pipeline
from mirasol_jax.data import sources
from mirasol_jax.data import tokenizer

flags.FLAGS.mark_as_parsed()  # grain workers read absl flags

FPS, SIZE, BITS = 10, 64, 8
SR = 16_000


def stripe_frames(num_frames: int) -> np.ndarray:
  """Frame i shows i in binary: 8 vertical bands of 8 pixels, white for a 1 bit (most significant first)."""
  frames = np.zeros((num_frames, SIZE, SIZE, 3), np.uint8)
  for i in range(num_frames):
    for bit in range(BITS):
      if (i >> (BITS - 1 - bit)) & 1:
        frames[i, :, bit * 8:(bit + 1) * 8] = 255
  return frames


def read_stripes(frames: np.ndarray) -> np.ndarray:
  """Inverse of stripe_frames on decoded (lossy) frames [N, 64, 64, 3]."""
  bands = frames[:, :, :, :].astype(np.float32).mean(axis=(1, 3)).reshape(len(frames), BITS, 8)[:, :, 2:6].mean(-1)
  bits = bands > 128
  return (bits * (1 << np.arange(BITS - 1, -1, -1))).sum(-1)


def tone(seconds: float, start: float, end: float, hz: float, channels: int = 1) -> np.ndarray:
  samples = np.zeros((channels, int(seconds * SR)), np.float32)
  lo, hi = int(start * SR), int(end * SR)
  samples[:, lo:hi] = 0.5 * np.sin(2 * np.pi * hz * np.arange(hi - lo) / SR)
  return samples


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """A dataset folder (jsonl + media) with one good video and each kind of bad input."""
  folder = str(tmp_path_factory.mktemp('dataset'))
  os.makedirs(os.path.join(folder, 'videos'))
  path = lambda name: os.path.join(folder, 'videos', name)
  # 4 s at 10 fps (40 frames carrying their index), a 2 kHz tone during [2, 3) s.
  demo_data.write_mp4(path('stripes.mp4'), stripe_frames(40), FPS, tone(4.0, 2.0, 3.0, 2000.0))
  demo_data.write_mp4(path('silent.mp4'), stripe_frames(40), FPS, audio=None)
  demo_data.write_mp4(path('surround.mp4'), stripe_frames(40), FPS, tone(4.0, 0.0, 1.0, 1000.0, channels=6),
                      layout='5.1')
  demo_data.write_mp4(path('short.mp4'), stripe_frames(5), FPS, tone(0.5, 0.0, 0.5, 500.0))
  with open(path('stripes.mp4'), 'rb') as f:
    data = f.read()
  with open(path('truncated.mp4'), 'wb') as f:
    f.write(data[:len(data) // 3])
  lines = [
      dict(id='good', video='videos/stripes.mp4', question='what number?', answer='seven'),
      dict(id='missing', video='videos/nowhere.mp4', question='q', answer='a'),
      dict(id='silent', video='videos/silent.mp4', question='is it quiet?', answer='yes'),
      dict(id='truncated', video='videos/truncated.mp4', question='q', answer='a'),
      dict(id='surround', video='videos/surround.mp4', question='how many channels?', answer='six'),
      dict(id='short', video='videos/short.mp4', question='how long?', answer='half a second'),
      dict(id='late', video='videos/stripes.mp4', start=50.0, end=60.0, question='q', answer='a'),
      dict(id='no_video_field', question='q', answer='a'),
      dict(id='clip', video='videos/stripes.mp4', start=1.0, end=3.0, question='what part?', answer='middle'),
  ]
  with open(os.path.join(folder, 'train.jsonl'), 'w') as f:
    for line in lines:
      f.write(json.dumps(line) + '\n')
    f.write('{"id": "broken json", \n')
  tok = os.path.join(folder, 'tokenizer.model')
  src = sources.JsonlSource(folder, 'train')
  tokenizer.train((t for i in range(len(src)) for t in tokenizer.text_fields(src[i])), 300, tok)
  return folder


def _config(folder, batch_size=2, **data):
  config = tiny_config('ttm')
  config.model.num_frames, config.model.num_chunks, config.model.image_size = 8, 4, (64, 64)
  config.model.video.tubes = (((2, 16, 16), (2, 16, 16), (0, 0, 0)),)
  config.model.video_recon_size = (8, 8)
  config.model.vocab_size = 512
  config.data.path, config.data.tokenizer = folder, os.path.join(folder, 'tokenizer.model')
  config.data.update(data)
  config.batch_size = batch_size
  return config


def test_decoded_frames_are_exactly_the_requested_ones(dataset):
  source = os.path.join(dataset, 'videos', 'stripes.mp4')
  assert np.array_equal(read_stripes(stripe_frames(40)), np.arange(40))
  for start, end, n in ((0.0, 4.0, 16), (1.0, 3.0, 8), (0.35, 3.85, 7)):
    times = media.segment_times(start, end, n)
    frames = media.decode_frames(source, times, SIZE)
    np.testing.assert_array_equal(read_stripes(frames), np.floor(times * FPS + 1e-9).astype(int))
  jittered = media.segment_times(0.0, 4.0, 16, np.random.default_rng(0))
  np.testing.assert_array_equal(read_stripes(media.decode_frames(source, jittered, SIZE)),
                                np.floor(jittered * FPS).astype(int))


def test_a_short_clip_repeats_its_frames(dataset):
  times = media.segment_times(0, 2.0, 8)  # the file holds 5 frames (0.5 s)
  frames = media.decode_frames(os.path.join(dataset, 'videos', 'short.mp4'), times, SIZE)
  expected = np.minimum(np.floor(times * FPS), 4)  # past its end the last frame stays on screen
  np.testing.assert_array_equal(read_stripes(frames), expected)
  assert list(expected[2:]) == [4] * 6


def test_a_tone_lands_in_the_audio_chunk_of_its_time_window(dataset):
  waveform = media.decode_audio(os.path.join(dataset, 'videos', 'stripes.mp4'), 0.0, 4.0)
  assert waveform.shape == (4 * SR,)
  spec = audio_lib.chunk_log_mel(waveform, media.chunk_bounds(0.0, 4.0, 4), 32, n_mels=64)
  # Median over time of each frame's loudest mel bin: a pure tone fills few bins, and a chunk's edge frame
  # (a 25 ms window centred on the boundary) may catch the end of its neighbour's tone.
  loudness = np.median(spec.max(axis=2), axis=1)
  assert np.argmax(loudness) == 2
  assert loudness[2] > loudness[[0, 1, 3]].max() + 20.0  # dB

  clip = media.decode_audio(os.path.join(dataset, 'videos', 'stripes.mp4'), 1.0, 3.0)  # clip [1, 3): tone in 2nd half
  spec = audio_lib.chunk_log_mel(clip, media.chunk_bounds(0.0, 2.0, 4), 16, n_mels=64)
  loudness = np.median(spec.max(axis=2), axis=1)
  assert loudness[2:].min() > loudness[:2].max() + 20.0


def test_surround_audio_is_downmixed_to_mono(dataset):
  waveform = media.decode_audio(os.path.join(dataset, 'videos', 'surround.mp4'), 0.0, 4.0)
  assert waveform.ndim == 1 and waveform.shape == (4 * SR,)
  assert np.abs(waveform[:SR - 2000]).max() > 0.05 and np.abs(waveform[SR + 2000:]).max() < 0.02


def test_log_mel_matches_librosa():
  librosa = pytest.importorskip('librosa')
  rng = np.random.default_rng(0)
  y = (0.3 * np.sin(2 * np.pi * 440 * np.arange(SR) / SR) + 0.05 * rng.normal(size=SR)).astype(np.float32)
  y[4000:6000] = 0.0
  ours = audio_lib.log_mel(y, SR, window_ms=25.0, hop_ms=10.0, n_mels=128)
  power = librosa.feature.melspectrogram(y=y, sr=SR, n_fft=400, hop_length=160, win_length=400, n_mels=128,
                                         center=True, pad_mode='constant', power=2.0)
  reference = librosa.power_to_db(power, ref=1.0, amin=1e-10, top_db=80.0).T
  assert ours.shape == reference.shape
  assert np.abs(ours - reference).max() < 1e-3


def test_text_encoding_keeps_the_target_when_truncating(dataset):
  proc = tokenizer.load(os.path.join(dataset, 'tokenizer.model'))
  tokens, mask = tokenizer.encode_example(proc, 'what number? ' * 20, 'half a second', 12)
  target = proc.encode('half a second')
  assert tokens[0] == tokenizer.BOS_ID and tokens[-1] == tokenizer.EOS_ID
  np.testing.assert_array_equal(tokens[-1 - len(target):-1], target)
  assert mask.sum() == len(target) + 1 and mask[-1] and not mask[:-1 - len(target)].any()
  short, short_mask = tokenizer.encode_example(proc, 'how long is it?', 'half a second', 32)
  start = int(short_mask.argmax())
  np.testing.assert_array_equal(short[1:start], proc.encode('how long is it?'))  # a prefix that fits stays whole
  assert tokenizer.decode(proc, short[start:]) == 'half a second' and tokenizer.PAD_ID in short
  assert tokenizer.decode(proc, proc.encode('naïve 🎵') + [tokenizer.EOS_ID, 17]) == 'naïve 🎵'  # byte fallback
  assert tokenizer.decode(proc, [proc.vocab_size() + 5]) == proc.id_to_piece(tokenizer.UNK_ID).replace('<unk>', ' ⁇ ')


def _all_batches(iterator):
  return list(iterator)


def test_bad_inputs_are_skipped_in_place_and_everything_else_is_read(dataset, caplog):
  config = _config(dataset, batch_size=2)
  batches = _all_batches(pipeline.build(config, 'train', train=False))
  index = np.concatenate([b['index'] for b in batches])
  skipped = np.concatenate([b['skipped'] for b in batches])
  valid = np.concatenate([b['example_mask'] for b in batches])
  audio_mask = np.concatenate([b['audio_mask'] for b in batches])
  ids = [json.loads(l).get('id') if l.startswith('{"id": "') and l.strip().endswith('}') else 'broken'
         for l in open(os.path.join(dataset, 'train.jsonl'))]
  assert len(ids) == 10 and index.tolist() == list(range(10))  # in order, padded to 5 full batches
  expected_skipped = {'missing', 'truncated', 'late', 'no_video_field', 'broken'}
  assert {ids[i] for i in np.flatnonzero(skipped)} == expected_skipped
  assert not valid[skipped].any() and valid[~skipped].all()
  assert {ids[i] for i in np.flatnonzero(valid & ~audio_mask)} == {'silent'}  # no audio track: silence + mask
  silent = np.concatenate([b['audio'] for b in batches])[ids.index('silent')]
  assert np.all(silent == audio_lib.SILENCE_DB)
  messages = caplog.text
  for reason in ('nowhere.mp4: file does not exist', 'start 50.00s is beyond the end of the file',
                 'missing field "video"', 'not valid JSON', 'truncated.mp4'):
    assert reason in messages, reason


def test_a_restored_iterator_yields_the_same_batches(dataset):
  config = _config(dataset, batch_size=2)
  reference = pipeline.build(config, 'train')
  for _ in range(3):
    next(reference)
  state = reference.get_state()
  expected = [next(reference) for _ in range(4)]  # crosses into the second epoch
  restored = pipeline.build(config, 'train')
  restored.set_state(state)
  for want, got in zip(expected, [next(restored) for _ in range(4)]):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_worker_processes_give_the_same_batches(dataset):
  config = _config(dataset, batch_size=2)
  in_process = pipeline.build(config, 'train')
  expected = [next(in_process) for _ in range(3)]
  config.data.num_workers = 2
  workers = pipeline.build(config, 'train')
  for want, got in zip(expected, [next(workers) for _ in range(3)]):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize('process_count', [2, 3])
def test_process_shards_are_disjoint_and_complete(dataset, process_count):
  config = _config(dataset, batch_size=process_count * 2)
  seen = []
  steps = set()
  for process in range(process_count):
    batches = list(pipeline.eval_batches(config, 'train', process, process_count))
    steps.add(len(batches))
    for b in batches:
      seen += b['index'][b['index'] >= 0].tolist()
  assert len(steps) == 1  # every process runs the same number of evaluation steps
  assert sorted(seen) == list(range(10))  # each record exactly once

  # Training: one epoch of slices is disjoint and complete, and the slices of each global batch, put together,
  # are exactly the batch one process reads.
  single = [b for b in pipeline.build(config, 'train', num_epochs=2)]
  slices = [list(pipeline.build(config, 'train', p, process_count, num_epochs=2)) for p in range(process_count)]
  for step, whole in enumerate(single):
    parts = [slices[p][step] for p in range(process_count)]
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), whole[key], err_msg=key)
  first_epoch = np.concatenate([b['index'] for b in single])[:10]
  assert sorted(first_epoch.tolist()) == list(range(10))


def test_array_record_and_tfds_sources_yield_the_same_examples(dataset, tmp_path):
  from mirasol_jax.data import tfds_source
  paths = sources.write_array_record(dataset, str(tmp_path / 'shards'), 'train', num_shards=3)
  assert len(paths) == 3
  tfds_source.prepare(dataset, str(tmp_path / 'tfds'))
  jsonl_source = sources.open_source(_config(dataset).data, 'train')
  for kind, path in (('array_record', tmp_path / 'shards'), ('tfds', tmp_path / 'tfds')):
    source = sources.open_source(_config(dataset, source=kind, path=str(path)).data, 'train')
    assert len(source) == len(jsonl_source)
    for i in range(len(source)):
      want, got = jsonl_source[i], source[i]
      # A missing file cannot be embedded: the converted record carries the error the jsonl one meets on decoding.
      unreadable = 'video_path' in want and not os.path.exists(want['video_path'])
      assert ('error' in got) == ('error' in want or unreadable)
      ignored = ('video_bytes', 'video_name', 'video_path', 'error', 'error_kind')
      assert {k: v for k, v in got.items() if k not in ignored} == \
             {k: v for k, v in want.items() if k not in ignored}, (kind, i)
  jsonl = _all_batches(pipeline.build(_config(dataset), 'train', train=False))
  for kind, path in (('array_record', tmp_path / 'shards'), ('tfds', tmp_path / 'tfds')):
    batches = _all_batches(pipeline.build(_config(dataset, source=kind, path=str(path)), 'train', train=False))
    assert len(batches) == len(jsonl)
    for a, b in zip(jsonl, batches):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f'{kind}: {key}')


def test_demo_data_is_deterministic_and_needs_both_modalities(tmp_path):
  for name in ('a', 'b'):
    demo_data.generate(str(tmp_path / name), num_train=6, num_validation=3)
  lines = [open(tmp_path / name / 'train.jsonl').read() for name in ('a', 'b')]
  assert lines[0] == lines[1]
  examples = [json.loads(l) for l in lines[0].splitlines()]
  assert {e['kind'] for e in examples} == set(demo_data.KINDS)
  for example in examples[:3]:
    a = media.decode_frames(str(tmp_path / 'a' / example['video']), media.segment_times(0, 4, 8), 96)
    b = media.decode_frames(str(tmp_path / 'b' / example['video']), media.segment_times(0, 4, 8), 96)
    np.testing.assert_array_equal(a, b)
  # The colour question: the high tone's second is in the audio only, the colours are in the video only.
  frames, sound, question, answer, captions = demo_data.make_clip('colour', np.random.default_rng(3))
  assert len(captions) == 3 and all(answer in c for c in captions)
  seconds = sound[0].reshape(4, demo_data.SAMPLE_RATE)
  high_second = int(np.argmax(np.abs(np.fft.rfft(seconds, axis=1))[:, int(demo_data.HIGH_HZ)]))
  pixels = frames[high_second * demo_data.FPS + 2].reshape(-1, 3)
  shown = {name: int(np.all(pixels == rgb, axis=1).sum()) for name, rgb in demo_data.COLOURS.items()}
  assert max(shown, key=shown.get) == answer and shown[answer] > 500, (shown, answer)
  baselines = demo_data.majority_baselines(str(tmp_path / 'a'))
  assert 0.0 <= baselines['overall'] <= baselines['per_kind'] <= 1.0


def test_training_jitter_changes_every_epoch_and_evaluation_is_fixed(dataset):
  config = _config(dataset, batch_size=10)  # one batch = one epoch of the 10 records
  iterator = pipeline.build(config, 'train')
  first, second = next(iterator), next(iterator)
  good = int(np.flatnonzero(first['index'] == 0)[0]), int(np.flatnonzero(second['index'] == 0)[0])
  assert not np.array_equal(first['video'][good[0]], second['video'][good[1]])  # new crop and frame times
  evaluation = [next(pipeline.build(config, 'train', train=False))['video'] for _ in range(2)]
  np.testing.assert_array_equal(evaluation[0], evaluation[1])


def test_training_crops_mirror_clips_only_when_asked():
  # Pixel values grow from left to right: a mirrored crop is the only way to get them decreasing.
  frames = np.broadcast_to(np.arange(40, dtype=np.uint8)[None, None, :, None], (2, 30, 40, 3))
  rng = np.random.default_rng(0)

  def mirrored(flip):
    crop = pipeline._crop(frames, 24, 24, rng, flip=flip)
    assert crop.shape == (2, 24, 24, 3)
    return bool(crop[0, 0, 0, 0] > crop[0, 0, -1, 0])
  assert not any(mirrored(False) for _ in range(20))  # the default: 'left' and 'right' in the text stay true
  assert 0 < sum(mirrored(True) for _ in range(20)) < 20


def test_to_global_makes_sharded_arrays_of_a_process_batch(dataset):
  import jax
  from mirasol_jax import sharding
  config = _config(dataset, batch_size=4)
  batch = pipeline.model_inputs(next(pipeline.build(config, 'train', train=False)))
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=1), jax.devices()[:4])
  arrays = pipeline.to_global(batch, sharding.batch_sharding(mesh))
  assert set(arrays) == {'video', 'audio', 'audio_mask', 'text_tokens', 'text_loss_mask', 'example_mask'}
  for key, value in arrays.items():
    assert value.shape == batch[key].shape and len(value.sharding.device_set) == 4
    assert value.addressable_shards[0].data.shape[0] == 1  # 4 examples over 2 x 2 devices
    np.testing.assert_array_equal(np.asarray(value), batch[key])


def test_tokenizer_and_convert_commands(dataset, tmp_path, repo):
  import subprocess
  import sys
  common = ['--config=configs/pretrain.py:size=small', f'--config.data.path={dataset}']
  run = lambda *args: subprocess.run([sys.executable, '-m', 'mirasol_jax.main', *args, *common], cwd=repo,
                                     capture_output=True, text=True, timeout=300)
  result = run('tokenizer', f'--workdir={tmp_path}')
  assert result.returncode == 0, result.stderr
  processor = tokenizer.load(str(tmp_path / 'tokenizer.model'))
  assert processor.decode(processor.encode('how many channels?')) == 'how many channels?'
  result = run('convert', f'--output={tmp_path / "shards"}', '--num_shards=2')
  assert result.returncode == 0, result.stderr
  assert len(sources.shard_paths(str(tmp_path / 'shards'), 'train')) == 2
  result = subprocess.run([sys.executable, '-m', 'mirasol_jax.main', 'tokenizer', f'--workdir={tmp_path}',
                           '--config=configs/pretrain.py:size=small'], cwd=repo, capture_output=True, text=True)
  assert result.returncode != 0 and 'config.data.path is empty' in result.stderr
