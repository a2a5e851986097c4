"""The workdir's files through mirasol_jax.paths: on a disk, and written as on an object store (no appends, no
renames: what a gs:// workdir gets), by the same code the trainer runs."""
import json
import os
import struct
import subprocess
import sys

import pytest

from mirasol_jax import paths
from mirasol_jax.data import demo_data


@pytest.fixture(params=['disk', 'object_store'])
def mode(request, monkeypatch):
  if request.param == 'object_store':
    monkeypatch.setenv(paths.OBJECT_STORE_ENV, '1')
  else:
    monkeypatch.delenv(paths.OBJECT_STORE_ENV, raising=False)
  return request.param


def test_files_folders_and_appends(mode, tmp_path):
  root = str(tmp_path / 'run')
  assert not paths.exists(root) and paths.listdir(root) == [] and paths.glob(root, '*.json') == []
  paths.write_text(paths.join(root, 'sub', 'a.json'), '{"x": 1}')  # folders made as needed
  paths.write_text(paths.join(root, 'sub', 'a.json'), '{"x": 2}')  # replaced whole
  paths.write_bytes(paths.join(root, 'sub', 'b.json'), b'[]')
  assert paths.read_text(paths.join(root, 'sub', 'a.json')) == '{"x": 2}'
  assert paths.listdir(paths.join(root, 'sub')) == ['a.json', 'b.json']  # no temporary file left behind
  assert [os.path.basename(p) for p in paths.glob(paths.join(root, 'sub'), '*.json')] == ['a.json', 'b.json']
  assert paths.isdir(paths.join(root, 'sub')) and not paths.isdir(paths.join(root, 'sub', 'a.json'))

  log = paths.join(root, 'log.jsonl')
  paths.write_bytes(log, b'{"step": 1}\n')
  appender = paths.Appender(log)  # starts from what the file holds
  appender.append(b'{"step": 2}\n')
  appender.append(b'{"step": 3}\n')
  assert paths.read_bytes(log) == b'{"step": 1}\n{"step": 2}\n{"step": 3}\n'

  paths.copy(paths.join(root, 'sub', 'a.json'), paths.join(root, 'copy', 'a.json'))
  paths.move(paths.join(root, 'sub'), paths.join(root, 'moved', 'sub'))  # a folder, with its files
  assert not paths.exists(paths.join(root, 'sub'))
  assert paths.read_text(paths.join(root, 'moved', 'sub', 'a.json')) == '{"x": 2}'
  assert paths.read_text(paths.join(root, 'copy', 'a.json')) == '{"x": 2}'


def test_cloud_paths_are_joined_and_named_without_the_local_file_system():
  assert not paths.is_local('gs://bucket/run') and paths.object_store('gs://bucket/run')
  assert paths.join('gs://bucket/run', 'checkpoints', '3') == 'gs://bucket/run/checkpoints/3'
  assert paths.absolute('gs://bucket/run') == 'gs://bucket/run'
  assert paths.basename('gs://bucket/run/checkpoints/') == 'checkpoints'
  assert paths.absolute('relative') == os.path.abspath('relative')


def _events(folder):
  """(tag, value) of every scalar in the TensorBoard event files of `folder`, read record by record (length, its
  checksum, the Event, its checksum)."""
  from tensorboardX.proto import event_pb2
  scalars = []
  for name in sorted(os.listdir(folder)):
    if not name.startswith('events.out.tfevents'):
      continue
    with open(os.path.join(folder, name), 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      scalars += [(v.tag, v.simple_value) for v in event.summary.value]
      offset += 12 + length + 4
    assert offset == len(data)  # whole records only
  return scalars


def test_tensorboard_events_reach_the_folder(mode, tmp_path):
  writer = paths.summary_writer(str(tmp_path / 'tb'), flush_secs=1)
  for step in range(3):
    writer.add_scalar('train/loss', 1.0 / (step + 1), step)
  writer.close()
  assert _events(str(tmp_path / 'tb')) == [('train/loss', 1.0), ('train/loss', 0.5), ('train/loss', pytest.approx(1 / 3))]


def test_a_run_written_as_on_an_object_store(tmp_path, repo):
  """train, resumed, then the commands that read a workdir: every file the run writes outside orbax goes through
  paths, here with no appends and no renames, as on gs://."""
  data = str(tmp_path / 'data')
  demo_data.generate(data, num_train=8, num_validation=4)
  workdir = str(tmp_path / 'run')
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1',
             **{paths.OBJECT_STORE_ENV: '1'})
  common = ['--config=configs/pretrain.py:size=tiny', '--config.model.vocab_size=512', '--config.batch_size=4',
            f'--config.data.path={data}', '--config.data.source=jsonl', '--config.model.dtype=float32',
            '--config.log_every_steps=1', '--config.checkpoint_every_steps=2', '--config.eval_every_steps=2',
            '--config.evals.validation.max_new_tokens=2', f'--workdir={workdir}']
  for steps in (2, 4):
    result = subprocess.run([sys.executable, '-m', 'mirasol_jax.main', 'train', *common,
                             f'--config.total_steps={steps}'], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
  assert 'resumed from' in result.stdout
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  assert [line['step'] for line in lines if 'train/loss' in line] == [1, 2, 3, 4]
  assert {2, 4} <= {line['step'] for line in lines if any(k.startswith('eval/') for k in line)}
  assert json.load(open(os.path.join(workdir, 'config.json')))['total_steps'] == 4
  assert os.path.getsize(os.path.join(workdir, 'tokenizer.model')) > 0
  assert sorted(os.listdir(os.path.join(workdir, 'predictions'))) == ['validation_2.jsonl', 'validation_4.jsonl']
  assert sum(tag == 'train/loss' for tag, _ in _events(workdir)) == 4
  assert not [name for name in os.listdir(workdir) if '.tmp' in name]

  from mirasol_jax import paper
  assert [line['step'] for line in paper.read_metrics(workdir) if 'train/loss' in line] == [1, 2, 3, 4]
