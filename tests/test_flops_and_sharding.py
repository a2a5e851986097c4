"""Analytic FLOPs agree with XLA, also for towers that do not train, whose gradients the step must not compute;
mesh errors; the params command. (Sharded runs: tests/test_train.py.)"""
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from conftest import COMBINERS, random_batch, tiny_config
from mirasol_jax import flops
from mirasol_jax import optimizer
from mirasol_jax import sharding
from mirasol_jax import train
from mirasol_jax.models import mirasol

AV_TOWERS = list(mirasol.AV_TOWERS)


def _xla_train_flops_per_example(config, batch_size=2):
  """XLA's FLOPs per example of the loss and its gradients, the gradients config does not train dropped as the train
  step drops them (unrolled layers: XLA's cost analysis counts the body of a loop once)."""
  model = mirasol.Model(**config.model)
  batch = random_batch(config, batch_size=batch_size)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch)['params'])  # as the train step holds them

  def loss(p):
    return model.apply({'params': p}, batch, train=True, rngs={'dropout': jax.random.key(0)})['losses']['total']

  def value_and_grads(p):
    value, grads = jax.value_and_grad(loss)(p)
    return value, optimizer.drop_untrained(grads, config)

  cost = jax.jit(value_and_grads).lower(params).compile().cost_analysis()
  return cost['flops'] / batch_size


@pytest.mark.parametrize('combiner', COMBINERS + ('flat',))
def test_analytic_training_flops_agree_with_xla_cost_analysis(combiner):
  config = tiny_config('ttm' if combiner == 'flat' else combiner, scan_layers=False)
  if combiner == 'flat':
    config.model.av_mode = 'flat'
    config.loss_weights.latent = config.loss_weights.video_recon = 0.0
  xla_per_example = _xla_train_flops_per_example(config)
  analytic = flops.count(config.model)['train']['total']
  assert abs(xla_per_example / analytic - 1.0) < 0.15, (xla_per_example, analytic)


def test_towers_that_do_not_train_cost_their_forward_pass_and_are_not_differentiated():
  config = tiny_config(scan_layers=False)
  full = flops.count(config.model)
  av_frozen = flops.count(config.model, AV_TOWERS)
  # Nothing upstream of the AV towers trains: their forward pass only.
  for tower in AV_TOWERS:
    assert av_frozen['train'][tower] == full['forward'][tower] < full['train'][tower]
  # The decoder trains but no longer sends gradients into the latents: no dX of its cross-attention keys and values.
  assert full['forward']['text_decoder'] < av_frozen['train']['text_decoder'] < full['train']['text_decoder']
  # A frozen decoder below training towers still passes their gradients back: more than its forward pass.
  decoder_frozen = flops.count(config.model, ['text_decoder'])['train']
  assert full['forward']['text_decoder'] < decoder_frozen['text_decoder'] < full['train']['text_decoder']
  with pytest.raises(ValueError, match='not towers'):
    flops.count(config.model, ['vision'])

  # The gradients of towers at a learning-rate multiplier of 0 are dropped, so XLA does not compute them: the cost
  # of the step's gradients falls as the analytic count says.
  for tower in AV_TOWERS:
    config.lr_multipliers[tower] = 0.0
  assert optimizer.frozen_towers(config) == tuple(AV_TOWERS)
  xla_per_example = _xla_train_flops_per_example(config)
  analytic = av_frozen['train']['total']
  assert abs(xla_per_example / analytic - 1.0) < 0.15, (xla_per_example, analytic)
  assert analytic < 0.6 * full['train']['total']


def test_frozen_towers_from_the_regex_and_the_multipliers():
  config = tiny_config()
  assert optimizer.frozen_towers(config) == ()
  config.frozen = '^(video_encoder|text_decoder)/'
  assert optimizer.frozen_towers(config) == ('video_encoder', 'text_decoder')
  config.frozen = '^video_encoder/vit/'  # part of a tower: it still trains
  config.lr_multipliers.combiner = 0.0
  assert optimizer.frozen_towers(config) == ('combiner',)
  grads = {'video_encoder': {'vit': {'w': np.ones(2)}, 'tube_0': {'w': np.ones(3)}},
           'video_proj': {'kernel': np.ones(2)}, 'text_decoder': {'w': np.ones(2)}}
  dropped = optimizer.drop_untrained(grads, config)
  assert not dropped['video_encoder']['vit']['w'].any() and not dropped['video_proj']['kernel'].any()
  assert dropped['video_encoder']['tube_0']['w'].all() and dropped['text_decoder']['w'].all()


def test_the_train_step_leaves_untrained_towers_as_they_are_and_trains_the_others():
  config = tiny_config()
  config.batch_size = 4  # over the 4 virtual devices
  config.lr, config.warmup_steps = 1e-2, 0
  config.frozen = '^text_decoder/'
  config.lr_multipliers.video_encoder = 0.0
  mesh = sharding.make_mesh(config.mesh)
  parts = train.build_train_step(config, mesh, tuple(tuple(rule) for rule in config.axis_rules))
  state = parts.init(0)
  before = jax.device_get(state['params'])
  batch = {k: jax.device_put(v, parts.batch_shapes[k].sharding) for k, v in random_batch(config, 4).items()}
  state, metrics = parts.lower().compile()(state, batch)
  after, metrics = jax.device_get((state['params'], metrics))
  for name in before:
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])))
    assert same == (name in ('video_encoder', 'text_decoder')), name
  # Their gradients were never computed (dropped before anything read them), so none is logged.
  assert metrics['train/grad_norm/video_encoder'] == metrics['train/grad_norm/text_decoder'] == 0.0
  assert metrics['train/grad_norm/audio_encoder'] > 0.0


def test_utilization_splits_a_step_by_flops_or_times_each_tower():
  per_tower = {'video_encoder': 3e12, 'text_decoder': 1e12, 'total': 4e12}
  shares = flops.utilization(per_tower, 2.0, peak_flops=4e12)
  assert shares['video_encoder']['share'] == 0.75 and shares['total']['share'] == 1.0
  assert shares['total']['tflops'] == shares['text_decoder']['tflops'] == 2.0 and shares['total']['mfu'] == 0.5
  timed = flops.utilization(per_tower, {'video_encoder': 1.0, 'text_decoder': 1.0}, peak_flops=4e12, examples=2)
  assert timed['video_encoder']['tflops'] == 6.0 and timed['text_decoder']['mfu'] == 0.5
  assert timed['total']['tflops'] == 4.0


def test_flops_grow_linearly_with_chunks_except_av_attention(repo):
  from mirasol_jax import config_lib
  short = flops.count(config_lib.load_config(f'{repo}/configs/pretrain.py:size=base,frames=128').model)['train']
  long = flops.count(config_lib.load_config(f'{repo}/configs/pretrain.py:size=base,frames=512').model)['train']
  for tower in ('video_encoder', 'audio_encoder', 'combiner'):
    np.testing.assert_allclose(long[tower], 4 * short[tower], rtol=1e-9)
  assert 4 * short['av_transformer'] < long['av_transformer'] < 5 * short['av_transformer']


def test_adafactor_trains_over_an_fsdp_mesh_with_its_factored_moments_replicated():
  config = tiny_config()
  config.optimizer, config.batch_size = 'adafactor', 4
  config.model.text.width = 128  # Adafactor factors matrices with two axes of at least 128: the decoder's
  config.mesh = dict(data=2, fsdp=2, tensor=1)
  mesh = sharding.make_mesh(config.mesh)
  parts = train.build_train_step(config, mesh, tuple(tuple(rule) for rule in config.axis_rules))
  def axes(spec):
    return {a for entry in spec if entry for a in (entry if isinstance(entry, tuple) else (entry,))}

  # The parameters are split over fsdp.
  assert any('fsdp' in axes(s.spec) for s in jax.tree.leaves(parts.state_shardings['params']))
  moments = jax.tree.leaves(parts.abstract['opt_state'])
  # Row and column statistics (rank below their parameter's) are replicated; full-size statistics are split.
  reduced = [m for m in moments if m.ndim == 1 and m.shape[0] > 1 and m.sharding.spec == PartitionSpec()]
  assert reduced and any('fsdp' in axes(m.sharding.spec) for m in moments)
  state = parts.init(0)
  before = jax.device_get(state['params'])
  batch = {k: jax.device_put(v, parts.batch_shapes[k].sharding) for k, v in random_batch(config, 4).items()}
  state, metrics = parts.lower().compile()(state, batch)
  assert np.isfinite(float(metrics['train/loss']))
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state['params']))))


def test_mesh_errors():
  with pytest.raises(ValueError, match=r'needs 6 devices but 4 are present'):
    sharding.mesh_shape(dict(data=3, fsdp=2, tensor=1), 4)
  with pytest.raises(ValueError, match=r'unknown axes \[.pipeline.\]'):
    sharding.mesh_shape(dict(data=-1, pipeline=2), 4)
  assert sharding.mesh_shape(dict(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1)


def test_params_command_prints_every_tower_and_3b_is_about_3_billion(repo):
  result = subprocess.run(
      [sys.executable, '-m', 'mirasol_jax.main', 'params', '--config=configs/pretrain.py:size=3b'],
      cwd=repo, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  for tower in mirasol.TOWERS:
    assert tower in result.stdout
  total = int(result.stdout.split('total parameters:')[1].split()[0].replace(',', ''))
  assert 2.7e9 < total < 3.3e9
  av_share = float(result.stdout.split('audio-video')[1].split()[1].rstrip('%'))
  assert 40.0 < av_share < 60.0  # "about half in the AV part"
