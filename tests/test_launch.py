"""launch/: the SLURM, TPU pod and local launchers, run with stand-ins for srun, gcloud and python first on PATH.

Each stand-in records its arguments, working folder and environment. srun plays every task of the job and gcloud
every worker of the slice (running the remote command in a home folder of its own), so the tests read the exact
command each host would run, and what `main.initialize_distributed` and jax.distributed make of its environment. No
cluster, no network, no training.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from unittest import mock

from absl import flags
import pytest

from mirasol_jax import main

flags.FLAGS.mark_as_parsed()  # initialize_distributed reads the (default) --coordinator_address flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch')
SCRIPTS = ('local.sh', 'slurm_gpu.sbatch', 'tpu_pod.sh', 'tpu_setup.sh')
# Arguments a shell would mangle if a launcher quoted them wrongly: a space, a glob, parentheses, a dollar.
TRICKY_ARGS = ['--config.data.path=/shared/data/my videos', '--config.init_from_regex=^(?!text_decoder/).*',
               '--config.data.media_root=/shared/$media']

_RECORD = f"""\
#!{sys.executable} -S
import json, os, sys, uuid
with open(os.path.join(os.environ['LAUNCH_RECORDS'], uuid.uuid4().hex + '.json'), 'w') as f:
  json.dump({{'program': os.path.basename(sys.argv[0]), 'argv': sys.argv[1:], 'cwd': os.getcwd(),
             'env': dict(os.environ)}}, f)
"""
# srun: its own options, then the command, run once per task with the variables slurmd gives each task.
_SRUN = _RECORD + textwrap.dedent("""\
    import subprocess
    command = sys.argv[1:]
    while command[0].startswith('-'):
      command.pop(0)
    hosts = os.environ['FAKE_SLURM_HOSTS'].split(',')
    per_node = int(os.environ['SLURM_NTASKS_PER_NODE'])
    status = 0
    for rank in range(len(hosts) * per_node):
      env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % per_node),
                 SLURM_NODEID=str(rank // per_node), SLURMD_NODENAME=hosts[rank // per_node],
                 SLURM_STEP_NODELIST=os.environ['SLURM_JOB_NODELIST'], SLURM_STEP_NUM_NODES=str(len(hosts)),
                 SLURM_STEP_NUM_TASKS=str(len(hosts) * per_node), SLURM_STEP_ID='0')
      status = max(status, subprocess.call(command, env=env))
    sys.exit(status)
""")
# gcloud compute tpus tpu-vm ssh|scp: each worker is a home folder; ssh runs the command there with bash.
_GCLOUD = _RECORD + textwrap.dedent("""\
    import shutil, subprocess
    args = sys.argv[1:]
    verb = args[3]
    options = dict(a[2:].split('=', 1) for a in args[4:] if a.startswith('--'))
    positional = [a for a in args[4:] if not a.startswith('--')]
    count = int(os.environ['FAKE_TPU_WORKERS'])
    workers = range(count) if options['worker'] == 'all' else [int(options['worker'])]
    status = 0
    for worker in workers:
      home = os.path.join(os.environ['FAKE_TPU_HOMES'], f'worker{worker}')
      os.makedirs(home, exist_ok=True)
      if verb == 'ssh':
        shell = subprocess.run(['bash', '-c', options['command']], cwd=home, env=dict(os.environ, HOME=home))
        status = max(status, shell.returncode)
      else:
        source, destination = positional
        shutil.copy(source, os.path.join(home, destination.split(':', 1)[1]))
    sys.exit(status)
""")


@pytest.fixture
def bench(tmp_path):
  """Stand-ins first on PATH, a clean environment for the launchers, and a reader of what the stand-ins recorded."""
  bin_dir, records = tmp_path / 'bin', tmp_path / 'records'
  bin_dir.mkdir()
  records.mkdir()
  for name, text in (('python', _RECORD), ('python3', _RECORD), ('srun', _SRUN), ('gcloud', _GCLOUD)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM', 'JAX_', 'TPU_', 'MIRASOL_'))}
  env.update(PATH=f'{bin_dir}:{env["PATH"]}', LAUNCH_RECORDS=str(records), FAKE_TPU_HOMES=str(tmp_path / 'workers'))

  class Bench:
    workers = tmp_path / 'workers'

    @staticmethod
    def run(script, *args, **extra_env):
      return subprocess.run(['bash', os.path.join(LAUNCH, script), *args], cwd=REPO, env={**env, **extra_env},
                            capture_output=True, text=True, timeout=60)

    @staticmethod
    def records(program):
      found = [json.load(open(p)) for p in glob.glob(str(records / '*.json'))]
      return [r for r in found if r['program'] == program]

  return Bench


def jax_cluster_view(env):
  """What `jax.distributed.initialize()` without arguments derives from a process's environment, as
  jax/_src/distributed.py does: $JAX_LOCAL_DEVICE_IDS, then the cluster's detection. (coordinator address, number of
  processes, process id, local device ids)."""
  from jax._src import clusters
  with mock.patch.dict(os.environ, env, clear=True):
    ids = os.environ.get('JAX_LOCAL_DEVICE_IDS')
    ids = [int(i) for i in ids.split(',')] if ids else None
    return clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, ids, None, 300)


def main_initialize_calls(env):
  """The calls `main.initialize_distributed` makes to jax.distributed.initialize in a process's environment."""
  with mock.patch.dict(os.environ, env, clear=True), mock.patch('jax.distributed.initialize') as initialize:
    main.initialize_distributed()
  return initialize.call_args_list


def sbatch_environment(script):
  """The variables sbatch gives the batch step of the script's #SBATCH request, on nodes gpu001, gpu002, ..."""
  request = dict(re.findall(r'^#SBATCH --([\w-]+)=(\S+)', open(script).read(), re.M))
  nodes, per_node = int(request['nodes']), int(request['ntasks-per-node'])
  hosts = [f'gpu{i:03d}' for i in range(1, nodes + 1)]
  return {'SLURM_JOB_ID': '4242', 'SLURM_JOB_NODELIST': f'gpu[001-{nodes:03d}]', 'SLURM_NNODES': str(nodes),
          'SLURM_NTASKS': str(nodes * per_node), 'SLURM_NTASKS_PER_NODE': str(per_node),
          'SLURM_CPUS_PER_TASK': request['cpus-per-task'], 'SLURM_GPUS_ON_NODE': request['gpus-per-node'],
          'SLURM_SUBMIT_DIR': REPO, 'FAKE_SLURM_HOSTS': ','.join(hosts)}, request


@pytest.mark.parametrize('script', SCRIPTS)
def test_scripts_parse(script):
  path = os.path.join(LAUNCH, script)
  assert os.access(path, os.X_OK), f'{script} is not executable'
  subprocess.run(['bash', '-n', path], check=True)
  if shutil.which('shellcheck'):
    result = subprocess.run(['shellcheck', path], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_slurm_gpu_every_node_runs_the_trainer_on_all_its_gpus(bench):
  script = os.path.join(LAUNCH, 'slurm_gpu.sbatch')
  slurm, request = sbatch_environment(script)
  args = ['--config=configs/pretrain.py:size=3b', '--workdir=/shared/runs/3b', *TRICKY_ARGS]
  result = bench.run('slurm_gpu.sbatch', *args, **slurm)
  assert result.returncode == 0, result.stderr

  [srun] = bench.records('srun')
  assert srun['argv'][0] == '--kill-on-bad-exit=1'
  tasks = sorted(bench.records('python'), key=lambda r: int(r['env']['SLURM_PROCID']))
  nodes, gpus = int(request['nodes']), int(request['gpus-per-node'])
  workers = int(request['cpus-per-task']) // 2
  assert len(tasks) == nodes
  port = 4242 % 4096 + 65536 - 4096  # jax's SLURM detection: a port from the job id
  for rank, task in enumerate(tasks):
    assert task['argv'] == ['-m', 'mirasol_jax.main', 'train', *args, f'--config.data.num_workers={workers}']
    assert task['cwd'] == REPO
    assert main_initialize_calls(task['env']) == [mock.call()]  # no arguments: jax reads the SLURM variables
    assert jax_cluster_view(task['env']) == (f'gpu001:{port}', nodes, rank, list(range(gpus)))


def test_slurm_gpu_keeps_the_command_lines_data_workers(bench):
  slurm, _ = sbatch_environment(os.path.join(LAUNCH, 'slurm_gpu.sbatch'))
  args = ['--config=configs/demo.py', '--workdir=/shared/runs/demo', '--config.data.num_workers=3']
  assert bench.run('slurm_gpu.sbatch', *args, **slurm).returncode == 0
  assert {tuple(r['argv'][3:]) for r in bench.records('python')} == {tuple(args)}


@pytest.mark.parametrize('args, message', [
    ([], '--config and --workdir are required'),
    (['--config=configs/demo.py'], '--config and --workdir are required'),
    (['--workdir=/shared/runs/x', '--config.seed=1'], '--config and --workdir are required'),
])
def test_slurm_gpu_refuses_incomplete_command_lines(bench, args, message):
  slurm, _ = sbatch_environment(os.path.join(LAUNCH, 'slurm_gpu.sbatch'))
  result = bench.run('slurm_gpu.sbatch', *args, **slurm)
  assert result.returncode == 2
  assert message in result.stderr and 'usage: sbatch launch/slurm_gpu.sbatch' in result.stderr
  assert not bench.records('srun')


def test_slurm_gpu_refuses_a_job_without_gpus(bench):
  slurm, _ = sbatch_environment(os.path.join(LAUNCH, 'slurm_gpu.sbatch'))
  del slurm['SLURM_GPUS_ON_NODE']
  result = bench.run('slurm_gpu.sbatch', '--config=configs/demo.py', '--workdir=/x', **slurm)
  assert result.returncode != 0 and 'no GPU allocated on the node' in result.stderr
  assert not bench.records('srun')


def _installed_workers(bench, count):
  """Worker homes as launch/tpu_setup.sh leaves them: the project in ~/mirasol_jax."""
  for worker in range(count):
    (bench.workers / f'worker{worker}' / 'mirasol_jax').mkdir(parents=True)


@pytest.mark.parametrize('project', [None, 'my-project'])
def test_tpu_pod_runs_the_trainer_on_every_worker(bench, project):
  _installed_workers(bench, 4)
  args = ['--config=configs/pretrain.py:size=3b', '--workdir=gs://my-bucket/runs/3b', *TRICKY_ARGS]
  project_args = [f'--project={project}'] if project else []
  result = bench.run('tpu_pod.sh', 'my-tpu', 'us-central2-b', *project_args, *args, FAKE_TPU_WORKERS='4')
  assert result.returncode == 0, result.stderr

  [ssh] = bench.records('gcloud')
  assert ssh['argv'][:5] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu']
  options = [a for a in ssh['argv'][5:] if not a.startswith('--command=')]
  assert sorted(options) == sorted(['--zone=us-central2-b', '--worker=all', *project_args])
  hosts = sorted(bench.records('python3'), key=lambda r: r['cwd'])
  assert [h['cwd'] for h in hosts] == [str(bench.workers / f'worker{i}' / 'mirasol_jax') for i in range(4)]
  for host in hosts:
    assert host['argv'] == ['-m', 'mirasol_jax.main', 'train', '--distributed', *args]


def test_tpu_pod_fails_on_a_worker_without_the_project(bench):
  _installed_workers(bench, 1)
  result = bench.run('tpu_pod.sh', 'my-tpu', 'us-central2-b', '--config=configs/demo.py', '--workdir=/mnt/x',
                     FAKE_TPU_WORKERS='2')
  assert result.returncode == 1
  assert 'no ~/mirasol_jax on this worker: run launch/tpu_setup.sh' in result.stderr
  assert [r['cwd'] for r in bench.records('python3')] == [str(bench.workers / 'worker0' / 'mirasol_jax')]


@pytest.mark.parametrize('args, message', [
    (['--config=configs/demo.py', '--workdir=/mnt/x'], "the TPU's name and zone come first"),
    (['my-tpu'], "the TPU's name and zone come first"),
    (['my-tpu', '--zone=us-central2-b', '--config=configs/demo.py', '--workdir=/mnt/x'],
     "the TPU's name and zone come first"),
    (['my-tpu', 'us-central2-b', '--config=configs/demo.py'], '--config and --workdir are required'),
])
def test_tpu_pod_refuses_incomplete_command_lines(bench, args, message):
  result = bench.run('tpu_pod.sh', *args, FAKE_TPU_WORKERS='2')
  assert result.returncode == 2
  assert message in result.stderr and 'usage: launch/tpu_pod.sh TPU_NAME ZONE' in result.stderr
  assert not bench.records('gcloud')


def test_tpu_setup_installs_this_checkout_with_the_tpu_extra_on_every_worker(bench):
  if subprocess.run(['git', '-C', REPO, 'rev-parse', '--git-dir'], capture_output=True).returncode:
    pytest.skip('not a git checkout: launch/tpu_setup.sh takes its file list from git')
  stale = bench.workers / 'worker1' / 'mirasol_jax' / 'stale.py'
  stale.parent.mkdir(parents=True)
  stale.write_text('from an earlier copy')
  result = bench.run('tpu_setup.sh', 'my-tpu', 'us-central2-b', '--project=my-project', FAKE_TPU_WORKERS='2')
  assert result.returncode == 0, result.stderr

  scp, ssh = sorted(bench.records('gcloud'), key=lambda r: r['argv'][3])
  assert scp['argv'][:4] == ['compute', 'tpus', 'tpu-vm', 'scp'] and scp['argv'][5] == 'my-tpu:mirasol_jax.tar.gz'
  assert ssh['argv'][:5] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu']
  for call in (scp, ssh):
    assert {'--zone=us-central2-b', '--project=my-project', '--worker=all'} <= set(call['argv'])
  installs = sorted(bench.records('python3'), key=lambda r: r['cwd'])
  assert len(installs) == 2
  for worker, install in enumerate(installs):
    copy = bench.workers / f'worker{worker}' / 'mirasol_jax'
    assert install['cwd'] == str(copy)
    assert install['argv'] == ['-m', 'pip', 'install', '-e', '.[tpu,gcs]']
    for path in ('setup.py', 'mirasol_jax/main.py', 'launch/tpu_pod.sh', 'configs/pretrain.py'):
      assert (copy / path).read_bytes() == open(os.path.join(REPO, path), 'rb').read()
    assert not list(copy.rglob('__pycache__')) and not (copy / '.git').exists()
    assert not (copy / 'stale.py').exists()
    assert not (copy.parent / 'mirasol_jax.tar.gz').exists()


@pytest.mark.parametrize('args', [[], ['my-tpu'], ['my-tpu', 'us-central2-b', 'my-project'],
                                  ['my-tpu', 'us-central2-b', '--project=p', 'extra']])
def test_tpu_setup_refuses_bad_usage(bench, args):
  result = bench.run('tpu_setup.sh', *args, FAKE_TPU_WORKERS='2')
  assert result.returncode == 2 and 'usage: launch/tpu_setup.sh TPU_NAME ZONE [--project=PROJECT]' in result.stderr
  assert not bench.records('gcloud')


def test_local_runs_one_process_per_id_on_one_coordinator(bench):
  args = ['train', '--config=configs/demo.py', '--workdir=/tmp/mirasol_2p']
  assert bench.run('local.sh', '3', *args, MIRASOL_PORT='23456').returncode == 0
  processes = sorted(bench.records('python'), key=lambda r: r['argv'][-1])
  assert [p['argv'] for p in processes] == [
      ['-m', 'mirasol_jax.main', *args, '--coordinator_address=localhost:23456', '--num_processes=3',
       f'--process_id={i}'] for i in range(3)]


@pytest.mark.parametrize('args', [[], ['train', '--config=configs/demo.py'], ['0', 'train']])
def test_local_refuses_bad_usage(bench, args):
  result = bench.run('local.sh', *args)
  assert result.returncode == 2 and 'usage: launch/local.sh NUM_PROCESSES COMMAND' in result.stderr
  assert not bench.records('python')


def test_accelerator_extras_pin_jaxs_own_extras_to_the_installed_range():
  import ast
  import importlib.metadata

  tree = ast.parse(open(os.path.join(REPO, 'setup.py')).read())
  # setup.py's lists of requirements (module-level literals), then extras_require evaluated over them.
  lists = {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body
           if isinstance(n, ast.Assign) and isinstance(n.value, ast.List)}
  install_requires = lists['INSTALL_REQUIRES']
  extras = next(eval(compile(ast.Expression(k.value), 'setup.py', 'eval'), {}, lists)  # noqa: S307
                for n in ast.walk(tree) if isinstance(n, ast.Call) for k in n.keywords if k.arg == 'extras_require')
  assert set(extras['notebooks']) <= set(extras['test'])  # the suite executes the notebooks
  [jax_range] = [r[len('jax'):] for r in install_requires if re.match(r'jax[<>=]', r)]
  assert extras['gpu'] == [f'jax[cuda12]{jax_range}']
  assert extras['tpu'] == [f'jax[tpu]{jax_range}']
  assert {'cuda12', 'tpu'} <= set(importlib.metadata.metadata('jax').get_all('Provides-Extra'))


def test_the_entry_point_restarts_with_huge_pages_for_malloc_where_linux_and_glibc_have_them():
  env = main.huge_pages_environment({'A': '1'}, ('glibc', '2.36'), 'madvise')
  assert env == {'A': '1', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  appended = main.huge_pages_environment({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, ('glibc', '2.39'), 'always')
  assert appended['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  for environ, libc, thp in [({'MIRASOL_HUGE_PAGES': '0'}, ('glibc', '2.36'), 'madvise'),  # opted out
                             ({}, ('glibc', '2.36'), 'never'),  # the kernel has them off
                             ({}, ('glibc', '2.31'), 'always'),  # glibc before the tunable
                             ({}, ('', ''), 'always'),  # another libc
                             ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, ('glibc', '2.36'), 'always')]:  # chosen
    assert main.huge_pages_environment(environ, libc, thp) is None, (environ, libc, thp)
  # The restart itself, where this machine allows it: the process goes on with the tunable set, once.
  code = ('import os; from mirasol_jax import main; main._restart_with_huge_pages(); '
          'print(os.environ.get("GLIBC_TUNABLES"))')
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'MIRASOL_HUGE_PAGES')}
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, check=True).stdout
  expected = main.host_huge_pages_environment(env)
  assert out.strip() == (expected['GLIBC_TUNABLES'] if expected else 'None')
