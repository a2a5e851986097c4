"""The trainer end to end, in subprocesses as a user runs it: resume after SIGKILL, NaN, parallelism, processes."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mirasol_jax.data import demo_data

TINY = [
    '--config=configs/pretrain.py:size=tiny', '--config.model.vocab_size=512',
    '--config.data.source=jsonl', '--config.batch_size=4', '--config.log_every_steps=1',
    '--config.eval_every_steps=0', '--config.warmup_steps=2', '--config.lr=0.001', '--config.peak_tflops=1.0',
    '--config.model.dtype=float32', '--config.eval_max_new_tokens=2',
    '--config.model.av.mask_ratio=0.0',  # its random draws depend on how a batch is split into micro-batches
]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('demo') / 'data')
  demo_data.generate(folder, num_train=12, num_validation=4)
  return folder


def _command(repo, data, workdir, *extra):
  return [sys.executable, '-m', 'mirasol_jax.main', 'train', f'--workdir={workdir}', *TINY,
          f'--config.data.path={data}', *extra]


def _env(devices=1):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _run(repo, data, workdir, *extra, devices=1, check=True):
  result = subprocess.run(_command(repo, data, workdir, *extra), cwd=repo, env=_env(devices), capture_output=True,
                          text=True, timeout=600)
  if check:
    assert result.returncode == 0, result.stderr[-4000:]
  return result


STEPS = ['--config.total_steps=6', '--config.checkpoint_every_steps=3']


@pytest.fixture(scope='module')
def reference(repo, data, tmp_path_factory):
  """An uninterrupted 6-step run on one device: its per-step losses, which every other run is compared with, and
  its workdir (checkpoints of steps 3 and 6)."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  _run(repo, data, workdir, *STEPS)
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, 7))
  return {'losses': losses, 'workdir': workdir}


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  return {line['step']: line['train/loss'] for line in lines if 'train/loss' in line}


def test_a_run_killed_with_sigkill_resumes_bit_identically(repo, data, reference, tmp_path):
  killed = str(tmp_path / 'killed')
  process = subprocess.Popen(_command(repo, data, killed, *STEPS), cwd=repo, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if os.path.exists(os.path.join(killed, 'metrics.jsonl')) and max(_losses(killed), default=0) >= 4:
      break  # past the checkpoint of step 3, in the middle of the run
    time.sleep(0.02)
  assert process.poll() is None, 'the run ended before it could be killed'
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert max(_losses(killed)) < 6
  result = _run(repo, data, killed, *STEPS)
  assert 'resumed from' in result.stdout
  assert _losses(killed) == reference['losses']  # every step's loss, bit for bit


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(repo, data, reference, tmp_path):
  workdir = str(tmp_path / 'nan')
  shutil.copytree(reference['workdir'], workdir)
  # A zero audio std turns the log-mel into inf and the losses into NaN from the next step on.
  result = _run(repo, data, workdir, '--config.total_steps=9', '--config.checkpoint_every_steps=1',
                '--config.model.audio.input_std=0.0', check=False)
  assert result.returncode != 0
  assert 'non-finite loss at step 7' in result.stderr and 'train/loss_text=' in result.stderr
  assert 'The last checkpoint (step 6) is intact' in result.stderr
  assert '6' in os.listdir(os.path.join(workdir, 'checkpoints')) and '7' not in os.listdir(
      os.path.join(workdir, 'checkpoints'))
  again = _run(repo, data, workdir, '--config.total_steps=7', '--config.checkpoint_every_steps=7')
  assert 'resumed from' in again.stdout and sorted(_losses(workdir)) == list(range(1, 8))


@pytest.mark.parametrize('mesh', ['data=4,fsdp=1,tensor=1', 'data=1,fsdp=2,tensor=2'])
def test_sharded_runs_give_the_losses_of_one_device(repo, data, reference, tmp_path, mesh):
  axes = dict(item.split('=') for item in mesh.split(','))
  _run(repo, data, str(tmp_path), *STEPS, *[f'--config.mesh.{k}={v}' for k, v in axes.items()], devices=4)
  losses = _losses(str(tmp_path))
  expected = reference['losses']
  assert sorted(losses) == sorted(expected)
  np.testing.assert_allclose([losses[s] for s in sorted(losses)], [expected[s] for s in sorted(expected)],
                             rtol=2e-5)


def test_gradient_accumulation_matches_the_full_batch(repo, data, reference, tmp_path):
  _run(repo, data, str(tmp_path), *STEPS, '--config.microbatches=2')
  losses, expected = _losses(str(tmp_path)), reference['losses']
  assert sorted(losses) == sorted(expected)
  np.testing.assert_allclose([losses[s] for s in sorted(losses)], [expected[s] for s in sorted(expected)],
                             rtol=2e-5)


def test_config_errors_come_before_compilation(repo, data, tmp_path):
  result = _run(repo, data, str(tmp_path / 'w'), '--config.batch_size=3', '--config.mesh.data=2', devices=2,
                check=False)
  assert result.returncode != 0 and 'config.batch_size=3 does not divide over the 2 data-parallel' in result.stderr
  result = _run(repo, data, str(tmp_path / 'w'), '--config.mesh.data=3', devices=2, check=False)
  assert result.returncode != 0 and 'needs 3 devices but 2 are present' in result.stderr
  result = _run(repo, data, str(tmp_path / 'w'), '--config.no_such_field=1', check=False)
  assert result.returncode != 0 and 'no_such_field' in result.stderr


def test_two_processes_under_jax_distributed_give_the_losses_of_one(repo, data, reference, tmp_path):
  import socket
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  workdir = str(tmp_path / 'two')
  processes = [subprocess.Popen(
      _command(repo, data, workdir, *STEPS, f'--coordinator_address=localhost:{port}', '--num_processes=2',
               f'--process_id={i}'), cwd=repo, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in processes]
  for process, (_, err) in zip(processes, outputs):
    assert process.returncode == 0, err[-4000:]
  assert '2 process(es), 2 cpu device(s)' in outputs[0][0]
  losses, expected = _losses(workdir), reference['losses']
  assert sorted(losses) == sorted(expected)
  np.testing.assert_allclose([losses[s] for s in sorted(losses)], [expected[s] for s in sorted(expected)],
                             rtol=2e-5)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', '6', 'data'))) == [
      'commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json']
