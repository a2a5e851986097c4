"""The paper configs (configs/paper/) load and build their model, and mirasol_jax/paper.py reads runs into tables."""
import json
import os

import jax
import pytest

from mirasol_jax import config_lib
from mirasol_jax import paper
from mirasol_jax.data.converters import CONVERTERS
from mirasol_jax.models import mirasol

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, arg='size=tiny'):
  return config_lib.load_config(os.path.join(REPO, f'configs/paper/{name}.py:{arg}'))


@pytest.mark.parametrize('name', list(paper.PAPER))
def test_paper_config_loads_and_builds(name):
  benchmark = paper.PAPER[name]
  assert name in CONVERTERS and os.path.exists(os.path.join(REPO, benchmark.config))
  config = _config(name)
  assert config.benchmark == name and config.data.source == 'jsonl' and config.data.eval_split == benchmark.split
  assert list(config.evals) == [benchmark.evaluator]
  evaluator = config.evals[benchmark.evaluator]
  assert evaluator.type == benchmark.type and evaluator.get('mean_ap', False) == benchmark.mean_ap
  assert (evaluator.type == 'classification') == config.data.random_flip
  assert evaluator.group_by == ('kind' if evaluator.type in ('vqa', 'multiple_choice') else '')
  assert config.lr == 1e-4 and config.init_from == '' and config.total_steps > config.warmup_steps > 0
  module_doc = open(os.path.join(REPO, benchmark.config)).read()
  assert str(benchmark.paper) in module_doc and f'converters {name} --annotations=' in module_doc
  assert f'--config={benchmark.config} --workdir=' in module_doc
  # config.init_from brings the pretrained run's tokenizer (train.ensure_tokenizer): no --config.data.tokenizer
  assert 'init_from` also brings' in module_doc and 'config.data.tokenizer' not in module_doc
  shapes = jax.eval_shape(mirasol.Model(**config.model).init, jax.random.key(0), mirasol.example_batch(config, 1))
  assert mirasol.count_params_per_tower(shapes['params'])['total'] > 0
  base = _config(name, '')  # the default: the base model
  assert base.model.width == 768 and base.evals.to_dict() == config.evals.to_dict()


def _workdir(tmp_path, name, config, lines, torn=''):
  folder = tmp_path / name
  folder.mkdir()
  if config is not None:
    (folder / 'config.json').write_text(config if isinstance(config, str) else json.dumps(config))
  text = ''.join(json.dumps(line) + '\n' if line else '\n' for line in lines) + torn
  (folder / 'metrics.jsonl').write_text(text)
  return str(folder)


def test_results_and_markdown(tmp_path):
  msrvtt = _config('msrvtt_qa')
  msrvtt.data.path = '/data/msrvtt_qa'
  activitynet = json.loads(_config('activitynet_qa').to_json_best_effort())
  del activitynet['benchmark']  # identified by its data path instead
  activitynet['data']['path'] = '/data/ActivityNet-QA'
  epic = _config('epic_sounds')
  demo = config_lib.load_config(os.path.join(REPO, 'configs/demo.py'))
  workdirs = [
      _workdir(tmp_path, 'msrvtt', msrvtt.to_json_best_effort(indent=1), [
          {'step': 50, 'train/loss': 3.0},
          {'step': 1000, 'eval/test/accuracy': 0.31, 'eval/test/examples': 100.0},
          {},  # a blank line
          {'step': 2000, 'eval/test/accuracy': 0.4567, 'eval/test/accuracy/3': 0.5, 'eval/test/examples': 100.0},
          {'step': 2050, 'train/loss': 1.0},
      ], torn='{"step": 3000, "eval/test/accuracy": 0.9'),  # killed while writing: not read
      _workdir(tmp_path, 'anet', activitynet, [{'step': 500, 'eval/test/accuracy': 0.25, 'eval/test/examples': 8.0}]),
      _workdir(tmp_path, 'epic', epic.to_json_best_effort(), [
          {'step': 100, 'eval/validation/top1': 0.5, 'eval/validation/top5': 0.75, 'eval/validation/mean_ap': 0.125,
           'eval/validation/examples': 40.0}]),
      _workdir(tmp_path, 'kinetics', _config('kinetics_sound').to_json_best_effort(), [{'step': 10, 'train/loss': 2}]),
      _workdir(tmp_path, 'demo', demo.to_json_best_effort(), [
          {'step': 600, 'eval/validation/accuracy': 0.5, 'eval/validation/accuracy/colour': 0.25,
           'eval/validation/no_audio/accuracy': 0.4, 'eval/validation/examples': 120.0, 'eval/captions/cider': 0.8,
           'eval/captions/bleu4': 0.25, 'eval/captions/examples': 120.0, 'eval/choice/accuracy': 0.6,
           'eval/choice/examples': 120.0},
          {'step': 1200, 'eval/validation/accuracy': 0.75, 'eval/validation/examples': 120.0}], torn='{"step": 13'),
      # evaluators like MSRVTT-QA's and ActivityNet-QA's with nothing telling them apart: neither benchmark's
      _workdir(tmp_path, 'unsure', {'evals': {'test': {'type': 'vqa'}}, 'data': {'eval_split': 'test', 'path': '/d'}},
               [{'step': 7, 'eval/test/accuracy': 0.125}]),
  ]
  rows = paper.results(workdirs)
  by_workdir = {os.path.basename(r['workdir']): r for r in rows if r['benchmark']}
  assert {k: r['benchmark'] for k, r in by_workdir.items()} == {
      'msrvtt': 'msrvtt_qa', 'anet': 'activitynet_qa', 'epic': 'epic_sounds', 'kinetics': 'kinetics_sound'}
  assert (by_workdir['msrvtt']['ours'], by_workdir['msrvtt']['step'], by_workdir['msrvtt']['examples']) == (
      pytest.approx(45.67), 2000, 100)
  assert by_workdir['epic']['extra'] == {'top5': 75.0, 'mean_ap': 12.5}
  assert by_workdir['kinetics']['ours'] is None and by_workdir['kinetics']['step'] is None
  others = [(os.path.basename(r['workdir']), r['evaluator'], r['metric'], r['step']) for r in rows
            if not r['benchmark']]
  assert others == [('demo', 'validation', 'accuracy', 1200), ('demo', 'captions', 'cider', 600),
                    ('demo', 'captions', 'bleu4', 600), ('demo', 'choice', 'accuracy', 600),
                    ('unsure', 'test', 'accuracy', 7)]

  text = paper.markdown(rows)
  print(text)
  first, second = text.split('Runs of no benchmark')
  assert f'| MSRVTT-QA | accuracy, open-ended (test) | 50.42 | 45.67 | 2000 | 100 | {workdirs[0]} |' in first
  assert f'| ActivityNet-QA | accuracy, open-ended (test) | 51.13 | 25.00 | 500 | 8 | {workdirs[1]} |' in first
  assert '| NExT-QA | accuracy, 5-way choice (validation) | 72.0 | — | — | — | — |' in first
  assert '| VGG-Sound | top-1 accuracy (test) | 69.8 | — | — | — | — |' in first
  assert f'| Kinetics-Sound | top-1 accuracy (validation) | 90.1 | — | — | — | {workdirs[3]} |' in first
  assert f'| EPIC-Sounds | top-1 accuracy (validation) | 78.2 | 50.00 | 100 | 40 | {workdirs[2]} |' in first
  assert f'| {workdirs[4]} | validation | accuracy | 75.00 | 1200 | 120 |' in second
  assert f'| {workdirs[4]} | captions | cider | 80.00 | 600 | 120 |' in second
  assert 'colour' not in text and 'no_audio' not in text
  assert f'- {workdirs[2]} (epic_sounds, step 100): top5 75.00, mean_ap 12.50' in second
  assert f'- {workdirs[5]}: could be msrvtt_qa or activitynet_qa: train with configs/paper/' in second


def test_main_and_runs_without_config(tmp_path, capsys):
  # No config.json: the metric alone would also fit the demo's runs, so a benchmark needs its name in the data path.
  bare = _workdir(tmp_path, 'bare', None, [{'step': 3, 'eval/validation/accuracy': 0.5}])
  tagged = _workdir(tmp_path, 'vgg', {'benchmark': 'vggsound', 'data': {}}, [{'step': 4, 'eval/test/top1': 0.5}])
  assert paper.main(['paper', bare, tagged, str(tmp_path / 'missing')]) == 0
  out = capsys.readouterr().out
  assert f'| VGG-Sound | top-1 accuracy (test) | 69.8 | 50.00 | 4 | — | {tagged} |' in out
  assert f'| {bare} | validation | accuracy | 50.00 | 3 | — |' in out
  assert f'- {tmp_path / "missing"}: not a folder' in out
  assert paper.main(['paper']) == 2
