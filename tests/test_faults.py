"""Faults that must neither end a run nor lose its work: a SIGTERM to the whole process group of a run with data
workers, a data pipeline that dies with the signal, damaged checkpoints and interrupted saves, a torn or garbled
metrics.jsonl; and init_from's shape check, from the checkpoint's metadata before any array is read."""
import glob
import json
import logging
import multiprocessing
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from mirasol_jax import checkpoint
from mirasol_jax import main
from mirasol_jax import metrics
from test_train import STEPS, TINY, _env, _logged_steps, _losses

flags.FLAGS.mark_as_parsed()  # grain workers read absl flags


def _train(repo, data, workdir, *extra, driver=('-m', 'mirasol_jax.main'), **popen):
  return subprocess.Popen([sys.executable, *driver, 'train', f'--workdir={workdir}', *TINY,
                           f'--config.data.path={data}', *STEPS, *extra], cwd=repo, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _finish(process):
  out, err = process.communicate(timeout=300)
  assert process.returncode == 0, err[-4000:]
  return out, err


@pytest.fixture(scope='module')
def reference(repo, small_demo, tmp_path_factory):
  """An uninterrupted 6-step run without data workers: its per-step losses and its workdir (a checkpoint of every
  step)."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  _finish(_train(repo, small_demo, workdir, '--config.checkpoint_every_steps=1', '--config.keep_checkpoints=6'))
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, 7))
  return {'losses': losses, 'workdir': workdir}


# The trainer's batches, of which the second fails as when the data workers die of the SIGTERM the trainer gets.
_DIES_WITH_THE_SIGNAL = '''
import signal
from mirasol_jax import main
from mirasol_jax.data import pipeline


class DiesWithTheSignal:

  def __init__(self, batches):
    self._batches, self._count = batches, 0

  def __iter__(self):
    return self

  def __next__(self):
    self._count += 1
    if self._count == 2:
      signal.raise_signal(signal.SIGTERM)
      raise RuntimeError('Worker process was terminated unexpectedly with exit code -15.')
    return next(self._batches)

  def __getattr__(self, name):
    return getattr(self._batches, name)


build = pipeline.build
pipeline.build = lambda *args, **kwargs: DiesWithTheSignal(build(*args, **kwargs))
main.run()
'''


def test_sigterm_to_the_process_group_saves_the_last_step_and_resumes_exactly(repo, small_demo, reference, tmp_path):
  workdir = str(tmp_path / 'preempted')
  # As SLURM's --signal does: SIGTERM to the trainer and its two data workers at once.
  started = time.time()
  process = _train(repo, small_demo, workdir, '--config.data.num_workers=2', start_new_session=True)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  while process.poll() is None and time.time() < started + 300 and not (
      os.path.exists(metrics_path) and os.path.getmtime(metrics_path) > started and _logged_steps(workdir)):
    time.sleep(0.005)
  assert process.poll() is None, 'the run ended before it could be stopped'
  os.killpg(process.pid, signal.SIGTERM)
  out, _ = _finish(process)
  stopped = re.search(r'step (\d+): signal 15 received; checkpoint saved, stopping', out)
  assert stopped, out[-2000:]
  step = int(stopped.group(1))
  assert step < 5 and str(step) in os.listdir(os.path.join(workdir, 'checkpoints'))

  # Resumed (without workers: the batches are the same), and preempted again with a data pipeline that fails with
  # the signal: its one completed step is saved all the same, with the iterator state after that step's batch.
  out, _ = _finish(_train(repo, small_demo, workdir, driver=('-c', _DIES_WITH_THE_SIGNAL)))
  assert f'resumed from {workdir}/checkpoints/{step}' in out, out[-2000:]
  assert f'step {step + 1}: signal 15 received; checkpoint saved, stopping (the data pipeline failed' in out, out
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, step + 2))
  assert losses == {s: reference['losses'][s] for s in losses}  # bit for bit: the same batches
  # Exactly the uninterrupted run's checkpoint of that step: its parameters, and where its data iterator reads on.
  runs = (workdir, reference['workdir'])
  for saved, expected in zip(*(jax.tree.leaves(checkpoint.read_params(run, step + 1)) for run in runs)):
    np.testing.assert_array_equal(saved, expected)
  saved, expected = (pathlib.Path(run, 'checkpoints', str(step + 1), 'data', 'process_0-of-1.json').read_text()
                     for run in runs)
  assert saved == expected


def test_data_workers_outlive_sigterm(repo, small_demo, reference):
  from mirasol_jax import config_lib
  from mirasol_jax.data import pipeline
  config = config_lib.load_config(os.path.join(repo, 'configs/pretrain.py:size=tiny'))
  with config.unlocked():
    config.model.vocab_size, config.batch_size = 512, 4
    config.data.update(source='jsonl', path=small_demo, num_workers=2,
                       tokenizer=os.path.join(reference['workdir'], 'tokenizer.model'))
  others = set(multiprocessing.active_children())
  batches = pipeline.build(config, 'train')
  first = next(batches)
  workers = [p for p in multiprocessing.active_children() if p not in others and p.name.startswith('grain')]
  assert len(workers) == 2
  for worker in workers:
    os.kill(worker.pid, signal.SIGTERM)
  time.sleep(0.5)
  assert all(worker.is_alive() for worker in workers)
  indices = np.concatenate([first['index']] + [next(batches)['index'] for _ in range(3)])
  assert sorted(indices[:12]) == list(range(12))  # one epoch of the 12 clips, nothing lost
  del batches  # its workers stop as it is collected


def _array_chunks(step_folder):
  """The files of a checkpoint that hold its arrays' values (OCDBT's data of each process); the metadata, shapes
  included, is elsewhere."""
  return glob.glob(os.path.join(step_folder, 'state', 'ocdbt.process_*', 'd', '*'))


def test_damaged_checkpoints_and_metrics_do_not_stop_a_resume(repo, small_demo, reference, tmp_path):
  workdir = str(tmp_path / 'damaged')
  shutil.copytree(reference['workdir'], workdir)
  folder = os.path.join(workdir, 'checkpoints')
  for name in _array_chunks(os.path.join(folder, '6')):  # its metadata still reads, its arrays no longer do
    with open(name, 'r+b') as f:
      f.truncate(os.path.getsize(name) // 2)
  os.makedirs(os.path.join(folder, '9'))  # empty, as a copy or a sync can leave it
  os.makedirs(os.path.join(folder, '7.orbax-checkpoint-tmp-1700000000', 'state'))  # a save a kill interrupted
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path, 'rb') as f:
    lines = f.read().split(b'\n')[:-1]
  with open(path, 'wb') as f:  # garbage from a crash of the file system, and the last line torn by a kill
    f.write(b'\n'.join([*lines[:2], b'\xff\xfe\x00{"step": 2', *lines[2:-1], lines[-1][:20]]))

  # eval and probe read the newest checkpoint that reads, and leave the damaged ones where they are.
  step, params = checkpoint.params_at(workdir)
  assert step == 5 and '6' in os.listdir(folder) and '9' in os.listdir(folder)
  assert main._last_update_ratios(workdir)[0] == 5

  # The trainer moves them aside and resumes from step 5: its save of step 6 and orbax's garbage collection (3
  # checkpoints kept) do not trip over them.
  process = _train(repo, small_demo, workdir, '--config.checkpoint_every_steps=1')
  out, err = _finish(process)
  assert f'resumed from {folder}/5' in out, out[-2000:]
  for bad in ('6', '9'):
    assert f'{folder}/{bad} cannot be restored' in err and f'moved to {workdir}/checkpoints.damaged/{bad}' in err
  assert 'dropped line(s) 3, 7' in err, err[-4000:]
  assert sorted(os.listdir(folder)) == ['4', '5', '6']  # the interrupted save is gone; 1 to 3 were collected
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints.damaged'))) == ['6', '9']
  assert _losses(workdir) == reference['losses']


def test_shapes_are_checked_from_metadata_before_any_array_is_read(reference, tmp_path):
  source = checkpoint.read_params(reference['workdir'])
  target = {name: jnp.zeros(array.shape, array.dtype)
            for name, array in flax.traverse_util.flatten_dict(source, sep='/').items()}
  params, names = checkpoint.load_params(reference['workdir'], flax.traverse_util.unflatten_dict(target, sep='/'),
                                         '^text_decoder/')
  loaded = flax.traverse_util.flatten_dict(params, sep='/')
  expected = flax.traverse_util.flatten_dict(source, sep='/')
  assert names and all(name.startswith('text_decoder/') for name in names)
  for name, value in loaded.items():
    np.testing.assert_array_equal(value, expected[name] if name in names else 0, err_msg=name)

  # Without any array value left, the mismatch is still found: from the metadata alone.
  workdir = str(tmp_path / 'metadata_only')
  shutil.copytree(reference['workdir'], workdir)
  for step_folder in glob.glob(os.path.join(workdir, 'checkpoints', '*')):
    for name in _array_chunks(step_folder):
      os.remove(name)
  target['text_decoder/embed/embedding'] = jnp.zeros((100, target['text_decoder/embed/embedding'].shape[1]))
  with pytest.raises(ValueError, match=r'text_decoder/embed/embedding has shape \(512, 64\), this model needs '
                                       r'\(100, 64\)'):
    checkpoint.load_params(workdir, flax.traverse_util.unflatten_dict(target, sep='/'), '^text_decoder/')
  with pytest.raises(ValueError, match='matches no parameter'):
    checkpoint.load_params(workdir, flax.traverse_util.unflatten_dict(target, sep='/'), '^no_such_tower/')
  # A config that does not fit a run's checkpoints is reported as such (eval, resume), not taken for damage.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {name: jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=device) for name, array in target.items()}
  with pytest.raises(checkpoint.MismatchError, match=r'checkpoints/6 does not fit this config: '
                                                     r'text_decoder/embed/embedding has shape \(512, 64\) there'):
    checkpoint.params_at(workdir, None, flax.traverse_util.unflatten_dict(abstract, sep='/'))


def test_metrics_writer_keeps_the_whole_lines(tmp_path, caplog):
  path = tmp_path / 'metrics.jsonl'
  whole = [json.dumps({'step': step, 'train/loss': 1.0 / step}).encode() for step in (1, 2, 3, 4)]
  path.write_bytes(b'\n'.join([whole[0], b'', b'\x00\x00\xff{"st', whole[1], b'{"step": 1e999}', whole[2],
                               whole[3], whole[3][:9]]))
  with caplog.at_level(logging.WARNING):
    writer = metrics.Writer(str(tmp_path), resume_step=3)
  assert 'dropped line(s) 3, 5, 8' in caplog.text
  writer.write(4, {'train/loss': 0.5})
  writer.close()
  assert [json.loads(line) for line in path.read_text().splitlines()] == [
      json.loads(line) for line in whole[:3]] + [{'step': 4, 'train/loss': 0.5}]
