"""Our runs beside the paper's results: Mirasol3B (CVPR 2024), top-1 accuracy after fine-tuning on six benchmarks.

  python -m mirasol_jax.paper WORKDIR [WORKDIR ...]
  python -m mirasol_jax.main tables WORKDIR [WORKDIR ...]

`PAPER` lists the benchmarks: the paper's number, the config that fine-tunes on each (configs/paper/), and the
metric of ours that corresponds (the key the config's evaluator writes to metrics.jsonl). `results` reads each
workdir's config.json (written when training starts) and metrics.jsonl (one JSON object a line; a line torn by a
killed run, or blank, is skipped) and finds which benchmark the run is from its evaluators: a run is a benchmark's
when its config has that benchmark's evaluator (name, type and split). When several benchmarks share those
(MSRVTT-QA and ActivityNet-QA both answer `test` questions), the `benchmark` field that the paper configs record
decides, else the evaluator's `mean_ap`, else the benchmark's name in the data path; a run still ambiguous is no
benchmark's. A config.json without evaluators (or none) leaves the metric key, which then needs the `benchmark`
field or the name in the data path beside it (the demo's runs also write eval/validation/accuracy). The run's
figure is the last line of metrics.jsonl holding the benchmark's metric. Workdirs of no benchmark (e.g. the demo's
runs) get a second table: the last value of each of their headline evaluation metrics (`eval/<evaluator>/<metric>`
for the metrics of HEADLINE). `markdown` prints both tables. `finetune_config` is what the six configs share.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Mapping, Optional, Sequence

import ml_collections

from mirasol_jax import config_lib
from mirasol_jax import paths

HEADLINE = ('accuracy', 'top1', 'top5', 'cider', 'bleu4', 'rouge_l', 'mean_ap')
DASH = '—'


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """One benchmark of the paper and where our figure for it comes from.

  Attributes:
    name: the converter's and the config's name (mirasol_jax/data/converters, configs/paper/{name}.py).
    title: the benchmark's usual name.
    paper: Mirasol3B's result, in percent.
    metric: what the number measures, and on which split.
    evaluator, type, split: the config's evaluator (its name in config.evals), its type and the split it reads.
    mean_ap: whether the config's evaluator also computes mean average precision (it tells EPIC-Sounds from
      Kinetics-Sound, whose evaluators are otherwise alike).
    alias: a part of a data path that names the benchmark (lower case, without '_' and '-').
  The config's path is `config`; the metric of ours beside the paper's is `key`: eval/{evaluator}/top1 for a
  classification, eval/{evaluator}/accuracy otherwise, in metrics.jsonl.
  """
  name: str
  title: str
  paper: float
  metric: str
  evaluator: str
  type: str
  split: str
  mean_ap: bool = False
  alias: str = ''

  @property
  def config(self) -> str:
    return f'configs/paper/{self.name}.py'

  @property
  def key(self) -> str:
    return f'eval/{self.evaluator}/{"top1" if self.type == "classification" else "accuracy"}'


PAPER: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark('msrvtt_qa', 'MSRVTT-QA', 50.42, 'accuracy, open-ended (test)', 'test', 'vqa', 'test', alias='msrvtt'),
    Benchmark('activitynet_qa', 'ActivityNet-QA', 51.13, 'accuracy, open-ended (test)', 'test', 'vqa', 'test',
              alias='activitynet'),
    Benchmark('next_qa', 'NExT-QA', 72.0, 'accuracy, 5-way choice (validation)', 'validation', 'multiple_choice',
              'validation', alias='nextqa'),
    Benchmark('kinetics_sound', 'Kinetics-Sound', 90.1, 'top-1 accuracy (validation)', 'validation',
              'classification', 'validation', alias='kinetics'),
    Benchmark('vggsound', 'VGG-Sound', 69.8, 'top-1 accuracy (test)', 'test', 'classification', 'test',
              alias='vggsound'),
    Benchmark('epic_sounds', 'EPIC-Sounds', 78.2, 'top-1 accuracy (validation)', 'validation', 'classification',
              'validation', mean_ap=True, alias='epic'),
)}


def finetune_config(name: str, arg: Optional[str], *, prompt: str, target: str, eval_split: str,
                    evaluator: ml_collections.ConfigDict, total_steps: int, eval_every_steps: int,
                    random_flip: bool = False) -> ml_collections.ConfigDict:
  """The config of configs/paper/{name}.py: a pretrained run (config.init_from) fine-tuned on the benchmark `name`.

  The data are a converter's jsonl dataset (config.data.path and media_root come from the command line). The text
  loss weighs 10x and the audio-video towers learn at a tenth of the decoder's rate (config_lib.base_config): batch
  64, learning rate 1e-4 after 1,000 warmup steps, a checkpoint every 1,000 steps. `init_from` also brings the
  pretrained run's tokenizer (mirasol_jax/train.py `ensure_tokenizer`).

  Args:
    name: the benchmark, a key of PAPER; config.benchmark, the row that the run's results go into.
    arg: the config's argument (after the colon), comma separated: size = tiny | small | base | 3b (base by
      default); combiner = ttm | transformer | qformer (ttm); frames = number of frames (0 keeps the size's default).
    prompt: the decoder's prompt, a str.format template over the record's fields.
    target: the record's field that the decoder learns to write.
    eval_split: the split evaluated, and the name of `evaluator` in config.evals.
    evaluator: the benchmark's evaluator (evaluators.base.config).
    total_steps: how long the run trains.
    eval_every_steps: how often it evaluates.
    random_flip: whether clips are mirrored at random in training (classification: no class depends on left and
      right).
  """
  arg = config_lib.parse_arg(arg, size='base', combiner='ttm', frames=0)
  config = config_lib.base_config(arg.size, arg.combiner, arg.frames)
  config.benchmark = name
  config.data = config_lib.data_config(source='jsonl', path='', media_root='', prompt=prompt, target=target,
                                       eval_split=eval_split, random_flip=random_flip)
  config.evals = ml_collections.ConfigDict({eval_split: evaluator})
  config.loss_weights.text = 10.0
  config.update(batch_size=64, lr=1e-4, warmup_steps=1_000, total_steps=total_steps,
                eval_every_steps=eval_every_steps, checkpoint_every_steps=1_000)
  return config


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The lines of WORKDIR/metrics.jsonl that are JSON objects, in order ([] without the file)."""
  path = paths.join(workdir, 'metrics.jsonl')
  if not paths.exists(path):
    return []
  lines = []
  for line in paths.read_bytes(path).decode('utf-8', errors='replace').split('\n'):
    try:
      value = json.loads(line)
    except ValueError:  # torn by a kill, or blank
      continue
    if isinstance(value, dict):
      lines.append(value)
  return lines


def read_config(workdir: str) -> dict[str, Any]:
  """WORKDIR/config.json as a dict ({} without it or when it cannot be read)."""
  try:
    config = json.loads(paths.read_text(paths.join(workdir, 'config.json')))
  except (OSError, ValueError):
    return {}
  return config if isinstance(config, dict) else {}


def last(lines: Sequence[Mapping[str, Any]], key: str) -> Optional[Mapping[str, Any]]:
  """The last line holding a number under `key`, or None."""
  for line in reversed(lines):
    if isinstance(line.get(key), (int, float)):
      return line
  return None


def _evaluator_split(config: Mapping[str, Any], evaluator: Mapping[str, Any]) -> str:
  data = config.get('data') or {}
  return evaluator.get('split') or data.get('eval_split') or ''


def _data_path(config: Mapping[str, Any], evaluator: Mapping[str, Any]) -> str:
  path = evaluator.get('path') or (config.get('data') or {}).get('path') or ''
  return str(path).lower().replace('_', '').replace('-', '')


def identify(config: Mapping[str, Any], lines: Sequence[Mapping[str, Any]]) -> tuple[Optional[Benchmark], str]:
  """The benchmark a run is (see the module docstring), or None with the reason."""
  evals, tag = config.get('evals') or {}, config.get('benchmark')
  keys = {k for line in lines for k in line}
  candidates = []
  for b in PAPER.values():
    evaluator = evals.get(b.evaluator)
    if evals:
      if (isinstance(evaluator, Mapping) and evaluator.get('type') == b.type
          and _evaluator_split(config, evaluator) == b.split):
        candidates.append(b)
    elif b.key in keys and (tag == b.name or b.alias in _data_path(config, {})):
      candidates.append(b)  # no evaluators recorded (an older config.json, or none): the metric and another sign
  if tag in PAPER and PAPER[tag] not in candidates:
    b = PAPER[tag]
    return None, f'config.benchmark={tag!r}, but no {b.type} evaluator {b.evaluator!r} of split {b.split!r}'
  rules = (
      lambda b: b.name == tag,
      lambda b: bool((evals.get(b.evaluator) or {}).get('mean_ap', False)) == b.mean_ap if evals else True,
      lambda b: b.alias in _data_path(config, evals.get(b.evaluator) or {}),
  )
  for rule in rules:
    if len(candidates) <= 1:
      break
    narrowed = [b for b in candidates if rule(b)]
    candidates = narrowed or candidates
  if len(candidates) == 1:
    return candidates[0], ''
  if candidates:
    return None, (f'could be {" or ".join(b.name for b in candidates)}: train with configs/paper/ (they record '
                  'config.benchmark) or name the benchmark in config.data.path')
  return None, ''


def _number(line: Optional[Mapping[str, Any]], key: str) -> Optional[float]:
  value = line.get(key) if line else None
  return float(value) if isinstance(value, (int, float)) else None


def _count(value: Optional[float]) -> Optional[int]:
  return None if value is None else int(value)


def results(workdirs: Sequence[str]) -> list[dict[str, Any]]:
  """One row per benchmark run and per headline metric of the other runs, in the order of `workdirs`.

  A benchmark row: benchmark (its name), title, metric, paper, ours (percent, None before its first evaluation),
  step, examples, workdir, key, extra (the evaluator's other headline metrics on that line, percent). A row of a run
  of no benchmark: benchmark None, workdir, evaluator, metric, key, ours (value x 100), step, examples; a run
  without any headline metric gets one such row with evaluator, metric and ours None. Every row has `note` (''
  or why the run is not a benchmark's, e.g. its metrics.jsonl is missing).
  """
  rows = []
  for workdir in workdirs:
    config, lines = read_config(workdir), read_metrics(workdir)
    benchmark, note = identify(config, lines)
    if not paths.isdir(workdir):
      note = 'not a folder'
    elif not paths.exists(paths.join(workdir, 'metrics.jsonl')):
      note = note or 'no metrics.jsonl'
    if benchmark is not None:
      line = last(lines, benchmark.key)
      prefix = f'eval/{benchmark.evaluator}/'
      value = _number(line, benchmark.key)
      extra = {m: 100 * _number(line, prefix + m) for m in HEADLINE
               if prefix + m != benchmark.key and _number(line, prefix + m) is not None}
      rows.append(dict(benchmark=benchmark.name, title=benchmark.title, metric=benchmark.metric,
                       paper=benchmark.paper, ours=None if value is None else 100 * value,
                       step=_count(_number(line, 'step')), examples=_count(_number(line, prefix + 'examples')),
                       workdir=workdir, key=benchmark.key, extra=extra, note=note))
      continue
    headline = []
    for key in dict.fromkeys(k for line in lines for k in line):
      parts = key.split('/')
      if len(parts) == 3 and parts[0] == 'eval' and parts[2] in HEADLINE:
        headline.append((key, parts[1], parts[2]))
    for key, evaluator, metric in headline:
      line = last(lines, key)
      rows.append(dict(benchmark=None, workdir=workdir, evaluator=evaluator, metric=metric, key=key,
                       ours=100 * _number(line, key), step=_count(_number(line, 'step')),
                       examples=_count(_number(line, f'eval/{evaluator}/examples')), note=note))
    if not headline:
      rows.append(dict(benchmark=None, workdir=workdir, evaluator=None, metric=None, key=None, ours=None, step=None,
                       examples=None, note=note or 'no evaluation metrics yet'))
  return rows


def _cell(value: Any, digits: int = 2) -> str:
  if value is None:
    return DASH
  if isinstance(value, float):
    return f'{value:.{digits}f}'
  return str(value).replace('|', '\\|')


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
  return lines + ['| ' + ' | '.join(_cell(v) for v in row) + ' |' for row in rows]


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """The rows of `results` as markdown: every benchmark of PAPER beside our runs of it ('—' where there is none),
  then the headline metrics of the runs of no benchmark, then notes."""
  runs = [r for r in rows if r.get('benchmark')]
  table = []
  for b in PAPER.values():
    mine = [r for r in runs if r['benchmark'] == b.name] or [dict(ours=None, step=None, examples=None, workdir=None)]
    table += [(b.title, b.metric, str(b.paper), r['ours'], r['step'], r['examples'], r['workdir']) for r in mine]
  lines = ['Mirasol3B (CVPR 2024) after fine-tuning, and ours (percent; ours: the last evaluation of each run)', '',
           *_table(('benchmark', 'metric', 'paper', 'ours', 'step', 'examples', 'workdir'), table)]
  others = [r for r in rows if not r.get('benchmark')]
  if others:
    lines += ['', 'Runs of no benchmark: the last value of each headline metric (x 100)', '',
              *_table(('workdir', 'evaluator', 'metric', 'value', 'step', 'examples'),
                      [(r['workdir'], r['evaluator'], r['metric'], r['ours'], r['step'], r['examples'])
                       for r in others])]
  notes = [f'{r["workdir"]} ({r["benchmark"]}, step {r["step"]}): ' +
           ', '.join(f'{m} {v:.2f}' for m, v in r['extra'].items()) for r in runs if r.get('extra')]
  notes += [f'{workdir}: {note}' for workdir, note in dict.fromkeys((r['workdir'], r['note']) for r in rows
                                                                   if r.get('note'))]
  if notes:
    lines += [''] + [f'- {note}' for note in notes]
  return '\n'.join(lines)


def main(argv: Sequence[str]) -> int:
  """python -m mirasol_jax.paper WORKDIR [WORKDIR ...]: prints the tables of `markdown`."""
  if len(argv) < 2 or any(a in ('-h', '--help') for a in argv[1:]):
    print('usage: python -m mirasol_jax.paper WORKDIR [WORKDIR ...]', file=sys.stderr)
    return 2
  print(markdown(results(argv[1:])))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
