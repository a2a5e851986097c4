"""The paper's ablations in miniature: the main job (configs/demo.py) trained once per variant, one markdown table.

  python benchmarks/ablations.py [--steps N] [--root DIR] [--only ttm,qformer,...] [--seed S]
                                 [--pretrain_config configs/demo_pretrain.py] [--pretrain_dir DIR]

Each variant is the shipped demo config plus overrides, trained as a user runs it, one run after another:
`python -m mirasol_jax.main train --config=configs/demo.py[:combiner] --workdir=ROOT/<variant> <overrides>`, its
output in ROOT/<variant>/log.txt. The table (also written to ROOT/ablations.md) has one row per variant: the final
validation accuracy, overall and per question kind, the accuracy with the AV latents shuffled across examples, the
training step time and the wall time of the run, all read from the workdir's metrics.jsonl except the wall time,
which this script measures and keeps in ROOT/<variant>/ablation.json. A variant whose workdir holds a finished run
of the same command is not trained again, so running the command again prints the table again (after a change of
the code or the configs, use a new --root); an interrupted run resumes; a failed run is a row that says so, and the
others go on.

Variants (--only takes the names in brackets):
  ttm (shipped) [ttm], transformer combiner [transformer], qformer combiner [qformer],
  full attention over chunks [full_attention]: model.av.block_causal=False and the next-chunk losses off (each
    chunk would see the next one, which they predict),
  next-chunk losses on [next_chunk_on] / off [next_chunk_off]: loss_weights.latent and .video_recon both 1.0 / 0.0;
    the one that equals the shipped config is the shipped run itself,
  pretrained AV towers [pretrained]: a pretraining run (--pretrain_config, in ROOT/pretrain), then configs/demo.py
    with config.init_from=ROOT/pretrain and init_from_regex='^(?!text_decoder/)',
  and one row for each choice that makes the towers learn, undone: towers at the decoder's rate [one_rate]: every
    config.lr_multipliers 1.0; 16x16 audio patches [square_patches] instead of 125 ms time strips; AV towers
    frozen at their initialisation [frozen_towers]: only the text decoder trains (the main job before).
--steps N sets config.total_steps=N (and eval_every_steps=N, so that the run evaluates once, at its end) for every
fine-tuning run; the pretraining keeps its config's steps (what the rows compare is fine-tuning steps), in
--pretrain_dir (default ROOT/pretrain), where a finished pretraining is reused.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mirasol_jax import config_lib  # noqa: E402
from mirasol_jax.paper import read_metrics  # noqa: E402  (skips a line torn by a kill)

DEMO = 'configs/demo.py'
NAMES = ('ttm', 'transformer', 'qformer', 'full_attention', 'next_chunk_on', 'next_chunk_off', 'pretrained',
         'one_rate', 'square_patches', 'frozen_towers')


def plan(shipped, pretrain_dir: str) -> list[tuple[str, str, str, list[str]]]:
  """(name, row label, workdir, config and overrides) of each variant, in table order."""
  rows = [('ttm', 'ttm (shipped)', 'ttm', [f'--config={DEMO}']),
          ('transformer', 'transformer combiner', 'transformer', [f'--config={DEMO}:transformer']),
          ('qformer', 'qformer combiner', 'qformer', [f'--config={DEMO}:qformer']),
          ('full_attention', 'full attention over chunks', 'full_attention',
           [f'--config={DEMO}', '--config.model.av.block_causal=False', '--config.loss_weights.latent=0.0',
            '--config.loss_weights.video_recon=0.0'])]
  shipped_weights = (shipped.loss_weights.latent, shipped.loss_weights.video_recon)
  for name, label, weight in (('next_chunk_on', 'next-chunk losses on', 1.0),
                              ('next_chunk_off', 'next-chunk losses off', 0.0)):
    if shipped_weights == (weight, weight):  # the shipped config: its run, not a second one
      rows.append((name, label, 'ttm', [f'--config={DEMO}']))
    else:
      rows.append((name, label, name, [f'--config={DEMO}', f'--config.loss_weights.latent={weight}',
                                       f'--config.loss_weights.video_recon={weight}']))
  rows.append(('pretrained', 'pretrained AV towers', 'pretrained',
               [f'--config={DEMO}', f'--config.init_from={pretrain_dir}',
                '--config.init_from_regex=^(?!text_decoder/)']))
  # What makes the towers learn: each row undoes one choice of the shipped recipe.
  one_rate = [f'--config.lr_multipliers.{tower}=1.0' for tower in shipped.lr_multipliers]
  rows += [('one_rate', 'towers at the decoder\'s rate', 'one_rate', [f'--config={DEMO}'] + one_rate),
           ('square_patches', '16x16 audio patches', 'square_patches',
            [f'--config={DEMO}', '--config.model.audio.patch_size=(16,16)']),
           ('frozen_towers', 'AV towers frozen at init', 'frozen_towers',
            [f'--config={DEMO}', '--config.frozen=^(?!text_decoder/)', '--config.loss_weights.latent=0.0',
             '--config.loss_weights.video_recon=0.0'])]
  return rows


def train(workdir: str, args: list[str], total_steps: int) -> dict:
  """Runs `python -m mirasol_jax.main train --workdir=WORKDIR ARGS` unless WORKDIR holds its finished run; returns
  its record ({'args', 'returncode', 'wall_s'}), with 'error' when it could not run or failed."""
  args = ['-m', 'mirasol_jax.main', 'train', f'--workdir={workdir}', *args]
  path = os.path.join(workdir, 'ablation.json')
  record = {'args': args, 'returncode': None, 'wall_s': 0.0}
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if previous['args'] != args:
      # Resuming it would continue another configuration's run (another --steps, --seed, ...).
      return {**record, 'error': f'{workdir} holds a run of another command (see {path})'}
    record = previous
    # The trainer exits 0 after a SIGTERM too: finished means the checkpoint of the last step is there.
    if record['returncode'] == 0 and os.path.isdir(os.path.join(workdir, 'checkpoints', str(total_steps))):
      return record
  elif os.path.isdir(os.path.join(workdir, 'checkpoints')):
    return {**record, 'error': f'{workdir} holds a run this script did not start'}
  os.makedirs(workdir, exist_ok=True)
  with open(path, 'w') as f:  # before the run: if this script is interrupted, its next call resumes the run
    json.dump(record, f, indent=1)
  log = os.path.join(workdir, 'log.txt')
  print(f'training {workdir} (log: {log})', flush=True)
  start = time.perf_counter()
  with open(log, 'a') as f:
    f.write(f'$ python {" ".join(args)}\n')
    f.flush()
    returncode = subprocess.run([sys.executable, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
  # A resumed run adds its time to the earlier parts' (those that ended; an interrupted call records none).
  record.update(returncode=returncode, wall_s=record['wall_s'] + time.perf_counter() - start)
  with open(path, 'w') as f:
    json.dump(record, f, indent=1)
  if returncode:
    record['error'] = f'failed (see {log})'
  return record


def step_ms(lines: list[dict], batch_size: int) -> str:
  """Mean time of a training step, input pipeline included: each logging interval's steps at batch_size /
  perf/examples_per_sec, leaving out the intervals that hold an evaluation (the trainer times the whole interval)."""
  evals = [line['step'] for line in lines if any(k.startswith('eval/') for k in line)]
  seconds, steps, previous = 0.0, 0, 0
  for line in lines:
    if 'perf/examples_per_sec' not in line:
      continue
    step = line['step']
    if not any(previous <= e < step for e in evals):  # an evaluation at step e runs after e's line is written
      seconds += (step - previous) * batch_size / line['perf/examples_per_sec']
      steps += step - previous
    previous = step
  return f'{1e3 * seconds / steps:.0f}' if steps else '-'


def duration(seconds: float) -> str:
  return f'{seconds / 60:.1f} min' if seconds >= 60 else f'{seconds:.0f} s'


def row(label: str, record: dict, workdir: str, split: str, kinds: list[str]) -> list[str]:
  if 'error' in record:
    return [label, record['error']] + [''] * (len(kinds) + 3)
  lines = read_metrics(workdir)
  final = next((line for line in reversed(lines) if f'eval/{split}/accuracy' in line), {})
  percent = lambda key: f'{100 * final[key]:.1f}' if key in final else '-'
  with open(os.path.join(workdir, 'config.json')) as f:
    batch_size = json.load(f)['batch_size']
  return ([label, percent(f'eval/{split}/accuracy')] + [percent(f'eval/{split}/accuracy/{k}') for k in kinds] +
          [percent(f'eval/{split}/shuffled/accuracy'), step_ms(lines, batch_size),
           duration(record['wall_s'])])


def machine() -> str:
  import jax
  with open('/proc/cpuinfo') as f:
    cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), 'unknown CPU')
  return f'{cpu}, {os.cpu_count()} cores; jax {jax.__version__} on {jax.devices()[0].platform}'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, help='config.total_steps of every run (default: each config\'s own)')
  parser.add_argument('--root', default='/tmp/mirasol_ablations', help='folder of the runs\' workdirs')
  parser.add_argument('--only', help=f'comma-separated variants among {",".join(NAMES)} (default: all)')
  parser.add_argument('--seed', type=int, help='config.seed of every run (default: the configs\')')
  parser.add_argument('--pretrain_config', default='configs/demo_pretrain.py',
                      help='config of the pretraining run of the "pretrained AV towers" row')
  parser.add_argument('--pretrain_dir', help='workdir of the pretraining (default: ROOT/pretrain); a finished one '
                      'is reused, so rows at other --steps can share it')
  args = parser.parse_args()
  only = args.only.split(',') if args.only else list(NAMES)
  if set(only) - set(NAMES):
    parser.error(f'--only: {",".join(sorted(set(only) - set(NAMES)))} not among {",".join(NAMES)}')
  root = os.path.abspath(args.root)
  pretrain_dir = os.path.abspath(args.pretrain_dir or os.path.join(root, 'pretrain'))
  shipped = config_lib.load_config(os.path.join(REPO, DEMO))
  steps = args.steps or shipped.total_steps
  split = shipped.data.eval_split

  def overrides(evaluates: bool = True) -> list[str]:
    extra = [f'--config.seed={args.seed}'] if args.seed is not None else []
    if args.steps:
      extra.append(f'--config.total_steps={args.steps}')
      if evaluates:  # evaluate once, at the end, as the shipped schedule does at its end
        extra.append(f'--config.eval_every_steps={args.steps}')
    return extra

  variants = [v for v in plan(shipped, pretrain_dir) if v[0] in only]
  records, runs, pretrain = {}, {}, None  # runs: workdir -> record, so that a shared run is tried once
  for name, label, workdir, config_args in variants:
    if name == 'pretrained':
      pretrain_path = os.path.join(REPO, args.pretrain_config)
      if not os.path.exists(pretrain_path):
        records[name] = {'error': f'{args.pretrain_config} does not exist'}
        continue
      try:
        pretrain_config = config_lib.load_config(pretrain_path)
      except Exception as e:  # noqa: BLE001 (the row says why, the other rows go on)
        records[name] = {'error': f'{args.pretrain_config} does not load: {e!r}'}
        continue
      # The pretraining is the same whatever --steps says: fine-tuning steps are what the rows compare.
      pretrain_steps = pretrain_config.total_steps
      seed = [f'--config.seed={args.seed}'] if args.seed is not None else []
      pretrain = train(pretrain_dir, [f'--config={args.pretrain_config}'] + seed, pretrain_steps)
      if 'error' in pretrain:
        records[name] = {'error': f'pretraining {pretrain["error"]}'}
        continue
    if workdir not in runs:
      runs[workdir] = train(os.path.join(root, workdir), config_args + overrides(), steps)
    records[name] = runs[workdir]

  # Question kinds: the accuracy/<kind> keys of the final evaluations.
  prefix = f'eval/{split}/accuracy/'
  kinds = sorted({k[len(prefix):] for workdir in runs for line in read_metrics(os.path.join(root, workdir))
                  for k in line if k.startswith(prefix)})
  header = ['variant', 'accuracy %'] + [f'{k} %' for k in kinds] + ['shuffled %', 'step ms', 'wall']
  seed = shipped.seed if args.seed is None else args.seed
  lines = [f'Ablations of {DEMO}, {time.strftime("%Y-%m-%d")}: {steps} steps of {shipped.batch_size} examples, '
           f'seed {seed}. Machine: {machine()}.',
           (f'Every row has config.frozen={shipped.frozen!r}. ' if shipped.frozen else '') +
           f'Accuracy: exact match on the {split} split at the last step; shuffled: the same questions answered '
           f'with another example\'s AV latents; step ms: mean training step (input pipeline included), the batch '
           f'size over perf/examples_per_sec of the logging intervals without an evaluation; wall: the whole run, '
           f'compilation and evaluations included.', '',
           '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for name, label, workdir, _ in variants:
    lines.append('| ' + ' | '.join(row(label, records[name], os.path.join(root, workdir), split, kinds)) + ' |')
  lines.append('')
  for name, label, workdir, _ in variants:
    if workdir == 'ttm' and name != 'ttm':
      lines.append(f'{label}: the shipped config (loss_weights.latent={shipped.loss_weights.latent}, '
                   f'video_recon={shipped.loss_weights.video_recon}), so the ttm (shipped) run.')
  if pretrain and 'error' not in pretrain:
    lines.append(f'Pretraining ({args.pretrain_config}, {pretrain_steps} steps, {pretrain_dir}): '
                 f'{duration(pretrain["wall_s"])}.')
  table = '\n'.join(lines).rstrip() + '\n'
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, 'ablations.md'), 'w') as f:
    f.write(table)
  print('\n' + table, end='')


if __name__ == '__main__':
  main()
