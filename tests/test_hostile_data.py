"""Hostile data: one bad record costs one example (with its reason), never the run, and never hangs it.

One test (or two) per class of the issue: wrongly typed records, unbounded work, paths that leave the dataset
folder, a dataset that is mostly unreadable (the skip budget), resuming with another number of workers, and stale
shards of an earlier conversion. Media are tiny clips written with PyAV.
"""
import json
import os
import threading

import msgpack
import numpy as np
import pytest
from absl import flags

from conftest import tiny_config
from mirasol_jax.data import demo_data
from mirasol_jax.data import media
from mirasol_jax.data import pipeline
from mirasol_jax.data import sources
from mirasol_jax.data import tokenizer

flags.FLAGS.mark_as_parsed()  # grain workers read absl flags

REASONS = list(pipeline.SKIP_REASONS)
GOOD = dict(question='what is it?', answer='a clip')


def write_clip(path, width=64, height=64, num_frames=10, fps=10, audio=True, pts=None, seed=0):
  """A small H.264 (+ AAC) mp4; `pts` (frame timestamps in 1/fps) makes a file claim any duration."""
  import av
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if pts is None:
    sound = 0.3 * np.sin(2 * np.pi * 440 * np.arange(num_frames * 1600) / 16_000)[None].astype(np.float32)
    demo_data.write_mp4(path, rng.integers(0, 255, (num_frames, height, width, 3), dtype=np.uint8), fps,
                        sound if audio else None)
    return
  with av.open(path, 'w') as container:
    stream = container.add_stream('libx264', rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, 'yuv420p'
    for t in pts:
      frame = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format='rgb24')
      frame.pts = t
      container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def write_jsonl(folder, lines, split='train'):
  """Lines: dicts (written as JSON) or bytes (written as they are)."""
  with open(os.path.join(folder, f'{split}.jsonl'), 'wb') as f:
    for line in lines:
      f.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b'\n')


@pytest.fixture(scope='module')
def tokenizer_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tokenizer') / 'tokenizer.model')
  tokenizer.train(['what is it?', 'a clip', 'what number?', 'seven', 'options: a | b'] * 20, 300, path)
  return path


def _config(folder, tokenizer_path, batch_size=2, **data):
  config = tiny_config('ttm')
  config.model.num_frames, config.model.num_chunks, config.model.image_size = 4, 2, (32, 32)
  config.model.vocab_size = 512
  config.data.path, config.data.tokenizer = folder, tokenizer_path
  config.data.update(data)
  config.batch_size = batch_size
  return config


def read_all(config, split='train'):
  """-> (reason name or 'read' per record, in record order) over one ordered pass."""
  batches = list(pipeline.build(config, split, train=False))
  index = np.concatenate([b['index'] for b in batches])
  codes = np.concatenate([b['skip_reason'] for b in batches])
  mask = np.concatenate([b['example_mask'] for b in batches])
  keep = index >= 0
  assert np.all(mask[keep] == (codes[keep] == 0))  # read <=> in the loss and the metrics
  order = np.argsort(index[keep])
  return ['read' if c == 0 else REASONS[c - 1] for c in codes[keep][order]]


def nested(depth):
  value = 'deep'
  for _ in range(depth):
    value = [value]
  return value


def within(seconds, fn, *args):
  """fn(*args), failing the test instead of hanging if it takes longer than `seconds`."""
  result = {}

  def run():
    try:
      result['value'] = fn(*args)
    except BaseException as e:  # pylint: disable=broad-except
      result['error'] = e
  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), f'{fn.__name__} still running after {seconds}s: it blocks'
  if 'error' in result:
    raise result['error']
  return result['value']


# ---------------------------------------------------------------------------------------------------------------
# 1. Wrong types in a record.

def test_wrongly_typed_jsonl_lines_cost_one_example_each(tmp_path, tokenizer_path, caplog):
  folder = str(tmp_path)
  write_clip(os.path.join(folder, 'videos', 'good.mp4'))
  good = dict(video='videos/good.mp4', **GOOD)
  cases = [
      ('read', good),
      ('bad_record', dict(good, video=123)),
      ('bad_record', dict(good, video=None)),
      ('bad_record', dict(good, video=['videos/good.mp4'])),
      ('bad_record', dict(good, start='abc')),
      ('bad_record', dict(good, start=[1])),
      ('bad_record', dict(good, end={})),
      ('bad_record', dict(good, start=True)),  # a bool is no number of seconds
      ('bad_record', json.dumps(dict(good, start=0)).replace('"start": 0', '"start": NaN').encode()),
      ('bad_record', json.dumps(dict(good, end=0)).replace('"end": 0', '"end": 1e999').encode()),  # inf
      ('bad_record', json.dumps(dict(good, start=0)).replace('"start": 0', '"start": ' + '9' * 5000).encode()),
      ('bad_record', dict(good, start=10 ** 400)),  # parses, but no float holds it
      ('bad_record', dict(good, options=5)),
      ('bad_record', dict(good, options=[1, 2])),
      ('bad_record', dict(good, options='a | b')),
      ('bad_record', dict(good, answer={'text': 'a clip'})),
      ('bad_record', dict(good, id=['x'])),
      ('bad_record', dict(good, answer_index=True)),
      ('bad_record', dict(good, question='\ud800')),  # a lone surrogate: JSON allows it, UTF-8 does not
      ('bad_record', dict(good, extra=nested(40))),  # no record needs it; msgpack refuses deeper
      ('bad_record', dict(good, extra=2 ** 70)),  # no shard could store it
      ('bad_record', b'{"video": "videos/good.mp4", "question": "\xff\xfe", "answer": "a"}'),  # invalid UTF-8
      ('bad_record', b'[' * 100_000 + b']' * 100_000),  # nested past the recursion limit
      ('bad_record', b'[1, 2]'),
      ('bad_record', b'{"video": "videos/good.mp4", "answer": "a"' + b' ' * 400_000 + b'}'),  # over max_line_bytes
      ('read', dict(good, _task=7, _index='x', error_kind='x')),  # reserved fields never come from a line
      ('read', dict(good, start=0.5, end=1)),  # an int is a number
      ('read', dict(good, options=['a', 'b'], captions=['one', 'two'], label=3)),
  ]
  write_jsonl(folder, [line for _, line in cases])
  config = _config(folder, tokenizer_path, max_line_bytes=300_000)
  source = sources.open_source(config.data, 'train')  # one bad byte no longer fails the whole split
  assert len(source) == len(cases)
  for i in range(len(source)):  # what the tokenizer and convert commands and the evaluators read: no bad type left
    tokenizer.text_fields(source[i])
    msgpack.packb(source[i])
  assert read_all(config) == [reason for reason, _ in cases]
  for message in ('"video" must be a path', '"start" must be a finite number', '"options" must be a list of texts',
                  'not valid UTF-8', 'nested too deeply', 'longer than 300000 bytes', 'integer out of the 64-bit',
                  'Exceeds the limit (4300 digits)', 'lone surrogate', 'nested more than 32 levels'):
    assert message in caplog.text, message


def test_array_record_records_that_are_not_maps_or_mistyped_are_skipped(tmp_path, tokenizer_path):
  from array_record.python import array_record_module
  folder = str(tmp_path)
  write_clip(os.path.join(folder, 'good.mp4'))
  with open(os.path.join(folder, 'good.mp4'), 'rb') as f:
    clip = f.read()
  good = dict(id='good', video_bytes=clip, **GOOD)
  cases = [
      ('read', msgpack.packb(good)),
      ('bad_record', msgpack.packb([1, 2, 3])),
      ('bad_record', msgpack.packb(7)),
      ('bad_record', b'\xc1'),  # no msgpack value
      ('bad_record', msgpack.packb(good)[:40]),  # truncated
      ('bad_record', b'\x91' * 100_000),  # nested 100000 levels
      ('bad_record', msgpack.packb(dict(good, video_bytes=os.path.join(folder, 'good.mp4')))),  # a str is no media
      ('bad_record', msgpack.packb({1: 'a', **good})),
      ('bad_record', msgpack.packb(dict(good, start='x'))),
      ('bad_record', msgpack.packb(dict(good, options=[b'a']))),
      ('bad_record', msgpack.packb({'id': 'path only', 'video_path': os.path.join(folder, 'good.mp4'), **GOOD})),
      ('undecodable', msgpack.packb(dict(good, video_bytes=clip[:len(clip) // 4]))),
      ('read', msgpack.packb(dict(good, _task=5, video_path='/etc/passwd'))),  # a shard's path is never used
  ]
  shards = str(tmp_path / 'shards')
  os.makedirs(shards)
  writer = array_record_module.ArrayRecordWriter(os.path.join(shards, 'train.array_record-00000-of-00001'),
                                                 'group_size:1')
  for _, data in cases:
    writer.write(data)
  writer.close()
  config = _config(shards, tokenizer_path, source='array_record')
  assert read_all(config) == [reason for reason, _ in cases]
  # And any record DecodeExample may be handed, whatever its source.
  decode = pipeline.DecodeExample(config.model, config.data, train=False)
  for record in ([1, 2], None, {'video_path': 5}, {'video_bytes': clip, 'start': float('nan'), **GOOD}):
    assert decode.decode(record, None)['skipped']


# ---------------------------------------------------------------------------------------------------------------
# 2. Unbounded work.

def test_examples_over_a_limit_are_skipped_with_their_reason(tmp_path, tokenizer_path):
  folder = str(tmp_path)
  video = lambda name: os.path.join(folder, 'videos', name)
  write_clip(video('good.mp4'))
  write_clip(video('hour.mp4'), pts=[0, 1, 36_000], audio=False)  # 3 frames, claims an hour at 10 fps
  write_clip(video('large.mp4'), width=128, height=96, num_frames=3)
  write_clip(video('wide.mp4'), width=512, height=16, num_frames=3)  # 32:1
  cases = [
      ('read', dict(video='videos/good.mp4')),
      ('clip_bounds', dict(video='videos/good.mp4', start=-1e7)),  # would allocate the audio of 116 days
      ('clip_bounds', dict(video='videos/good.mp4', start=-0.5, end=0.5)),
      ('clip_bounds', dict(video='videos/good.mp4', start=0.8, end=0.3)),
      ('clip_bounds', dict(video='videos/good.mp4', start=0.5, end=0.5)),
      ('clip_bounds', dict(video='videos/good.mp4', start=50.0)),
      ('too_long', dict(video='videos/hour.mp4')),  # no end: the whole claimed hour
      ('read', dict(video='videos/hour.mp4', start=0.0, end=0.5)),
      ('too_large', dict(video='videos/large.mp4')),
      ('too_large', dict(video='videos/wide.mp4')),
  ]
  write_jsonl(folder, [dict(line, **GOOD) for _, line in cases])
  config = _config(folder, tokenizer_path, max_frame_pixels=100 * 100)  # the other limits at their defaults
  assert config.data.max_clip_seconds == 600 and config.data.max_aspect_ratio == 4
  assert read_all(config) == [reason for reason, _ in cases]
  # Every limit can be lifted (0); the clip bounds are no limit.
  unlimited = _config(folder, tokenizer_path, max_frame_pixels=0, max_aspect_ratio=0, max_clip_seconds=0)
  assert [r == 'read' for r in read_all(unlimited)] == [reason != 'clip_bounds' for reason, _ in cases]


def test_decoding_past_its_deadline_is_skipped_as_a_timeout(tmp_path, tokenizer_path):
  folder = str(tmp_path)
  write_clip(os.path.join(folder, 'videos', 'good.mp4'))
  write_jsonl(folder, [dict(video='videos/good.mp4', **GOOD)] * 2)
  assert read_all(_config(folder, tokenizer_path, decode_timeout_s=1e-9)) == ['timeout'] * 2
  assert read_all(_config(folder, tokenizer_path, decode_timeout_s=60.0)) == ['read'] * 2


def test_pipes_devices_and_folders_are_refused_without_blocking(tmp_path, tokenizer_path):
  folder = str(tmp_path)
  write_clip(os.path.join(folder, 'videos', 'good.mp4'))
  os.mkfifo(os.path.join(folder, 'videos', 'pipe.mp4'))  # opening it for reading would wait for a writer forever
  os.symlink('/dev/zero', os.path.join(folder, 'videos', 'zero.mp4'))  # reading it would never end
  cases = [('read', 'videos/good.mp4'), ('not_regular_file', 'videos/pipe.mp4'),
           ('not_regular_file', 'videos/zero.mp4'), ('not_regular_file', 'videos'), ('read', 'videos/good.mp4')]
  write_jsonl(folder, [dict(video=name, **GOOD) for _, name in cases])
  config = _config(folder, tokenizer_path, allow_outside_media=True)  # /dev/zero is refused as a device
  assert within(60, read_all, config) == [reason for reason, _ in cases]
  with pytest.raises(media.MediaError, match='a named pipe, not a regular file'):
    within(10, media.open_regular, os.path.join(folder, 'videos', 'pipe.mp4'))


# ---------------------------------------------------------------------------------------------------------------
# 3. Paths that leave the dataset folder.

def _outside_dataset(tmp_path):
  """A dataset folder whose lines reach a clip outside it in each way, and one inside."""
  folder = str(tmp_path / 'data')
  outside = str(tmp_path / 'elsewhere' / 'secret.mp4')
  write_clip(outside, seed=1)
  write_clip(os.path.join(folder, 'videos', 'good.mp4'))
  os.symlink(outside, os.path.join(folder, 'videos', 'link_out.mp4'))
  os.symlink(os.path.join(folder, 'videos', 'good.mp4'), os.path.join(folder, 'videos', 'link_in.mp4'))
  cases = [('read', 'videos/good.mp4'), ('outside_dataset', outside), ('outside_dataset', '../elsewhere/secret.mp4'),
           ('outside_dataset', 'videos/../../elsewhere/secret.mp4'), ('outside_dataset', 'videos/link_out.mp4'),
           ('read', 'videos/link_in.mp4'), ('read', os.path.join(folder, 'videos', 'good.mp4'))]
  write_jsonl(folder, [dict(video=name, **GOOD) for _, name in cases])
  return folder, cases


def test_media_outside_the_dataset_folder_are_refused_unless_allowed(tmp_path, tokenizer_path, caplog):
  folder, cases = _outside_dataset(tmp_path)
  assert read_all(_config(folder, tokenizer_path)) == [reason for reason, _ in cases]
  assert 'config.data.allow_outside_media=True' in caplog.text
  assert read_all(_config(folder, tokenizer_path, allow_outside_media=True)) == ['read'] * len(cases)
  # media_root moves the folder that media must stay in.
  elsewhere = str(tmp_path / 'elsewhere')
  write_jsonl(folder, [dict(video='secret.mp4', **GOOD), dict(video='../data/videos/good.mp4', **GOOD)])
  assert read_all(_config(folder, tokenizer_path, media_root=elsewhere)) == ['read', 'outside_dataset']


def test_convert_never_embeds_outside_or_non_regular_files(tmp_path, tokenizer_path):
  from mirasol_jax import main
  folder, cases = _outside_dataset(tmp_path)
  os.mkfifo(os.path.join(folder, 'videos', 'pipe.mp4'))
  with open(os.path.join(folder, 'train.jsonl'), 'a') as f:
    f.write(json.dumps(dict(video='videos/pipe.mp4', **GOOD)) + '\n')
  cases.append(('not_regular_file', 'videos/pipe.mp4'))
  config = _config(folder, tokenizer_path)
  output = str(tmp_path / 'shards')
  within(60, main.convert, config, output, 'array_record', 2)
  source = sources.ArrayRecordSource(output, 'train')
  with open(str(tmp_path / 'elsewhere' / 'secret.mp4'), 'rb') as f:
    secret = f.read()
  for i, (reason, _) in enumerate(cases):
    record = source[i]
    assert ('video_bytes' in record) == (reason == 'read'), i
    assert record.get('error_kind') == (None if reason == 'read' else reason), i
    assert record.get('video_bytes') != secret
  assert read_all(_config(output, tokenizer_path, source='array_record')) == [reason for reason, _ in cases]


# ---------------------------------------------------------------------------------------------------------------
# 4. Silent failure: the skip budget.

def test_training_on_unreadable_data_stops_naming_the_reasons(tmp_path, tokenizer_path):
  folder = str(tmp_path)
  os.makedirs(os.path.join(folder, 'videos'))
  os.mkfifo(os.path.join(folder, 'videos', 'pipe.mp4'))
  write_jsonl(folder, [dict(video=f'videos/missing_{i}.mp4', **GOOD) for i in range(9)] +
              [dict(video='videos/pipe.mp4', **GOOD), dict(video='/etc/hostname', **GOOD)])
  # Grain workers decode: the reasons reach this process in the batches.
  config = _config(folder, tokenizer_path, batch_size=4, num_workers=2, skip_window=50, skip_window_min=8)
  iterator = pipeline.build(config, 'train')
  next(iterator)  # 4 examples: fewer than skip_window_min
  with pytest.raises(pipeline.SkipBudgetExceeded) as error:
    within(120, next, iterator)
  message = str(error.value)
  assert '8 of the last 8 training examples' in message and 'max_skipped_fraction=0.5' in message
  assert 'missing_file' in message and 'its media file does not exist' in message
  # Evaluation never stops: it reads every example, each masked and counted as skipped with its reason.
  assert set(read_all(config)) == {'missing_file', 'not_regular_file', 'outside_dataset'}


def test_the_skip_budget_counts_a_window_of_recent_examples():
  budget = pipeline.SkipBudget(max_fraction=0.25, window=8, min_examples=4)
  code = pipeline.SKIP_CODES['undecodable']
  budget.add(np.array([code, 0]), np.array([0, 1]))  # 1 of 2, but fewer than min_examples
  budget.add(np.array([0, 0, 0, 0, 0, 0]), np.arange(2, 8))  # 1 of 8
  budget.add(np.array([0, 0, 0, 0, 0, 0, code, 0]), np.arange(8, 16))  # the first skip left the window: 1 of 8
  with pytest.raises(pipeline.SkipBudgetExceeded, match=r'(?s)3 of the last 8 .*undecodable \(3\).*records 14, 16, 17'):
    budget.add(np.array([code, code]), np.array([16, 17]))
  assert pipeline.SkipBudget.from_config({'max_skipped_fraction': 1.0}) is None  # 1.0 never stops


def test_several_processes_stop_together_on_the_global_count(tmp_path, tokenizer_path):
  folder = str(tmp_path)
  write_jsonl(folder, [dict(video=f'videos/missing_{i}.mp4', **GOOD) for i in range(8)])
  config = _config(folder, tokenizer_path, batch_size=4, skip_window=50, skip_window_min=8)
  # Process 1 of 2 only counts (it would otherwise stop alone while process 0 waits in the step's collectives) ...
  iterator = pipeline.build(config, 'train', process_index=1, process_count=2)
  for _ in range(6):
    assert next(iterator)['skipped'].all()
  assert 'missing_file (12)' in iterator.skip_report()
  # ... and the trainer stops every process on the count of whole global batches, the same number everywhere.
  budget = pipeline.GlobalSkipBudget.from_config(config.data)
  budget.add(1, 4)
  budget.add(1, 4)  # 2 of 8
  budget.add(4, 4)  # 6 of 12: half is within the budget
  with pytest.raises(pipeline.SkipBudgetExceeded,
                     match=r"(?s)10 of the last 16 training examples of all processes.*This process's share.*missing"):
    budget.add(4, 4, iterator.skip_report)
  window = pipeline.GlobalSkipBudget(max_fraction=0.5, window=8, min_examples=4)
  for skipped in (0, 0, 4):  # the window keeps the last 8 examples: 4 of 8
    window.add(skipped, 4)
  with pytest.raises(pipeline.SkipBudgetExceeded, match='5 of the last 8'):
    window.add(1, 4)


def test_a_few_unreadable_examples_do_not_stop_training(tmp_path, tokenizer_path):
  folder = str(tmp_path)
  write_clip(os.path.join(folder, 'videos', 'good.mp4'))
  write_jsonl(folder, [dict(video='videos/good.mp4', **GOOD)] * 3 + [dict(video='videos/missing.mp4', **GOOD)])
  config = _config(folder, tokenizer_path, batch_size=4, skip_window=8, skip_window_min=4)
  iterator = pipeline.build(config, 'train')
  skipped = sum(int(next(iterator)['skipped'].sum()) for _ in range(5))
  assert skipped == 5  # one in four, every epoch


# ---------------------------------------------------------------------------------------------------------------
# 5. Resuming with another number of workers.

def test_a_run_resumes_with_another_number_of_workers(tmp_path, tokenizer_path):
  folder = str(tmp_path)
  write_clip(os.path.join(folder, 'videos', 'good.mp4'))
  write_jsonl(folder, [dict(video='videos/good.mp4', start=0.1 * i, **GOOD) for i in range(6)] +
              [dict(video='videos/missing.mp4', **GOOD)])
  config = _config(folder, tokenizer_path, batch_size=2)
  reference = pipeline.build(config, 'train')
  for _ in range(2):
    next(reference)
  state = reference.get_state()
  expected = [next(reference) for _ in range(6)]  # crosses into the next epoch
  for workers, first in ((2, 0), (1, 3)):
    config.data.num_workers = workers
    resumed = pipeline.build(config, 'train')
    resumed.set_state(state)  # saved with another worker count: grain alone refuses it
    for step in range(first, first + 3):
      got = next(resumed)
      for key in expected[step]:
        np.testing.assert_array_equal(got[key], expected[step][key], err_msg=f'{workers} workers, {key}')
    state = resumed.get_state()  # saved by 2 workers, resumed by 1


def test_worker_count_translation_keeps_the_position():
  template = {'version': 2, 'sampler': 's', 'data_source': 'd'}
  for position in range(12):
    for saved_workers in (0, 1, 2, 3):
      slots = max(saved_workers, 1)
      # What grain saves after `position` examples: each worker's last index, in turns from worker 0.
      given = [len(range(i, position, slots)) for i in range(slots)]
      state = dict(template, worker_count=saved_workers,
                   last_worker_index=position % slots - 1 if saved_workers else -1,
                   last_seen_indices={str(i): i + (given[i] - 1) * slots for i in range(slots)})
      for workers in (0, 1, 2, 3, 5):
        moved = json.loads(pipeline._state_for_workers(json.dumps(state).encode(), workers))
        back = json.loads(pipeline._state_for_workers(json.dumps(moved).encode(), saved_workers))
        assert back == state, (position, saved_workers, workers)
        assert moved['worker_count'] == workers and moved['sampler'] == 's'


# ---------------------------------------------------------------------------------------------------------------
# 7. Stale shards.

def test_converting_again_replaces_the_earlier_shards(tmp_path, tokenizer_path, monkeypatch):
  folder = str(tmp_path / 'data')
  write_clip(os.path.join(folder, 'videos', 'good.mp4'))
  write_jsonl(folder, [dict(id=str(i), video='videos/good.mp4', **GOOD) for i in range(5)])
  output = str(tmp_path / 'shards')
  assert len(sources.write_array_record(folder, output, 'train', num_shards=4)) == 4
  write_jsonl(folder, [dict(id=str(i), video='videos/good.mp4', **GOOD) for i in range(3)])
  paths = sources.write_array_record(folder, output, 'train', num_shards=2)
  assert sources.shard_paths(output, 'train') == paths and len(paths) == 2
  assert [sources.ArrayRecordSource(output, 'train')[i]['id'] for i in range(3)] == ['0', '1', '2']
  assert len(sources.ArrayRecordSource(output, 'train')) == 3  # not 4 + 2 shards' worth

  # A conversion that fails leaves the earlier shards whole, and no partial ones.
  calls = []

  def failing(record, max_media_bytes=0):
    calls.append(record)
    if len(calls) == 2:
      raise OSError('disk full')
    return encode(record, max_media_bytes)
  encode = sources.encode_record
  monkeypatch.setattr(sources, 'encode_record', failing)
  with pytest.raises(OSError, match='disk full'):
    sources.write_array_record(folder, output, 'train', num_shards=3)
  assert sorted(os.listdir(output)) == sorted(os.path.basename(p) for p in paths)

  # Shards of two conversions (an older version of this code, or copied by hand) are refused, not read twice.
  os.link(paths[0], os.path.join(output, 'train.array_record-00000-of-00004'))
  with pytest.raises(ValueError, match='not one conversion'):
    sources.ArrayRecordSource(output, 'train')


def test_converting_to_tfds_again_rebuilds_it(tmp_path, tokenizer_path):
  from mirasol_jax import main
  folder = str(tmp_path / 'data')
  write_clip(os.path.join(folder, 'videos', 'good.mp4'))
  config = _config(folder, tokenizer_path)
  for count in (3, 2):
    write_jsonl(folder, [dict(id=str(i), video='videos/good.mp4', **GOOD) for i in range(count)])
    main.convert(config, str(tmp_path / 'tfds'), 'tfds', 1)
    source = sources.open_source(_config(str(tmp_path / 'tfds'), tokenizer_path, source='tfds').data, 'train')
    assert len(source) == count
