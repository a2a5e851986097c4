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
    '--config.model.dtype=float32', '--config.evals.validation.max_new_tokens=2',
    '--config.model.av.mask_ratio=0.0',  # its random draws depend on how a batch is split into micro-batches
]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """A small demo dataset whose training split also names a file that does not exist."""
  folder = str(tmp_path_factory.mktemp('demo') / 'data')
  demo_data.generate(folder, num_train=12, num_validation=4)
  with open(os.path.join(folder, 'train.jsonl'), 'a') as f:
    f.write(json.dumps(dict(id='lost', video='videos/lost.mp4', question='where is it?', answer='gone')) + '\n')
  return folder


def _command(repo, data, workdir, *extra):
  return [sys.executable, '-m', 'mirasol_jax.main', 'train', f'--workdir={workdir}', *TINY,
          f'--config.data.path={data}', *extra]


_CACHE = os.path.join(os.environ.get('TMPDIR', '/tmp'), f'mirasol_test_jax_cache_{os.getuid()}')


def _env(devices=1):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  # Runs of the same program (the reference, the killed and the resumed run) compile it once.
  env['JAX_COMPILATION_CACHE_DIR'] = _CACHE
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
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
  result = _run(repo, data, workdir, *STEPS)
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, 7))
  # 24 examples drawn from 13 records: the missing file comes up, is logged and counted, and the run goes on.
  assert 'lost.mp4: file does not exist' in result.stderr
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  assert sum(line.get('data/skipped_examples', 0) for line in lines) >= 1
  # The trainer's resident host memory, logged with the throughput: more than the Python runtime with jax, less
  # than the machine has.
  if sys.platform == 'linux':
    resident = [line['perf/host_memory_mib'] for line in lines if 'perf/host_memory_mib' in line]
    assert resident and all(150 < r < os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**20
                            for r in resident), resident
  return {'losses': losses, 'workdir': workdir}


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  return {line['step']: line['train/loss'] for line in lines if 'train/loss' in line}


def _logged_steps(workdir):
  """The steps with a training loss in metrics.jsonl, read while a run writes it. A read can see a line half
  appended, or a resumed run's rewrite half done (the file truncated, then its kept lines written): whole lines
  only."""
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      lines = f.read().split('\n')[:-1]
  except FileNotFoundError:
    return []
  return [scalars['step'] for scalars in map(json.loads, lines) if 'train/loss' in scalars]


def _start_and_stop(repo, data, workdir, stop_signal, after_step, checkpoint=None):
  """Starts the 6-step run and sends stop_signal once step `after_step` is logged and, if given, the checkpoint of
  step `checkpoint` is complete; returns the exit code and stdout.

  Orbax saves asynchronously: a step's checkpoint is written to `<step>.orbax-checkpoint-tmp` while training goes
  on, and renamed to `<step>` once complete. A run killed before that resumes from the checkpoint before (or from
  scratch), so a logged step says nothing about which checkpoint exists.
  """
  started = time.time()
  process = subprocess.Popen(_command(repo, data, workdir, *STEPS), cwd=repo, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  complete = os.path.join(workdir, 'checkpoints', str(checkpoint))
  deadline = started + 300
  while time.time() < deadline and process.poll() is None:
    # Written by this process (a resumed run first rewrites the file), far enough, and the checkpoint complete.
    if (os.path.exists(metrics) and os.path.getmtime(metrics) > started and
        max(_logged_steps(workdir), default=0) >= after_step and (checkpoint is None or os.path.isdir(complete))):
      break
    time.sleep(0.005)
  assert process.poll() is None, 'the run ended before it could be stopped'
  process.send_signal(stop_signal)
  out, _ = process.communicate(timeout=300)
  return process.returncode, out


def test_runs_stopped_by_sigkill_and_sigterm_resume_bit_identically(repo, data, reference, tmp_path):
  workdir = str(tmp_path / 'stopped')
  # Killed past its complete checkpoint of step 3, before its last one (step 6) is complete.
  code, _ = _start_and_stop(repo, data, workdir, signal.SIGKILL, after_step=4, checkpoint=3)
  assert code == -signal.SIGKILL and '6' not in os.listdir(os.path.join(workdir, 'checkpoints'))
  # Preemption: SIGTERM saves a checkpoint at the current step and exits cleanly.
  code, out = _start_and_stop(repo, data, workdir, signal.SIGTERM, after_step=4)
  assert f'resumed from {workdir}/checkpoints/3' in out, out[-2000:]
  assert code == 0 and 'signal 15 received; checkpoint saved' in out, out[-2000:]
  result = _run(repo, data, workdir, *STEPS)
  assert 'resumed from' in result.stdout
  assert _losses(workdir) == reference['losses']  # every step's loss, bit for bit


def test_init_from_loads_the_selected_parameters(repo, data, reference, tmp_path):
  import jax
  from mirasol_jax import checkpoint
  workdir = str(tmp_path / 'finetune')
  result = _run(repo, data, workdir, '--config.total_steps=1', '--config.checkpoint_every_steps=1',
                '--config.lr=0.0', '--config.warmup_steps=0', f'--config.init_from={reference["workdir"]}',
                '--config.init_from_regex=^text_decoder/')
  assert 'initialised' in result.stdout
  source, tuned = checkpoint.read_params(reference['workdir']), checkpoint.read_params(workdir)
  for name in ('text_decoder', 'video_encoder'):
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(source[name]), jax.tree.leaves(tuned[name])))
    assert same == (name == 'text_decoder'), name  # lr 0: loaded parameters stay, the others are fresh


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
