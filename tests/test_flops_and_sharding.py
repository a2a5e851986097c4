"""Analytic FLOPs agree with XLA; logical sharding over a mesh of virtual devices gives the same loss."""
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import COMBINERS, random_batch, tiny_config
from mirasol_jax import flops
from mirasol_jax import sharding
from mirasol_jax.models import mirasol


@pytest.mark.parametrize('combiner', COMBINERS)
def test_analytic_training_flops_agree_with_xla_cost_analysis(combiner):
  # Unrolled layers: XLA's cost analysis counts the body of a loop once.
  config = tiny_config(combiner, scan_layers=False)
  model = mirasol.Model(**config.model)
  batch = random_batch(config, batch_size=2)
  params = jax.jit(model.init)(jax.random.key(0), batch)['params']

  def loss(p):
    return model.apply({'params': p}, batch, train=True, rngs={'dropout': jax.random.key(0)})['losses']['total']

  cost = jax.jit(jax.value_and_grad(loss)).lower(params).compile().cost_analysis()
  xla_per_example = cost['flops'] / 2
  analytic = flops.count(config.model)['train']['total']
  assert abs(xla_per_example / analytic - 1.0) < 0.15, (xla_per_example, analytic)


def test_flops_grow_linearly_with_chunks_except_av_attention(repo):
  from mirasol_jax import config_lib
  short = flops.count(config_lib.load_config(f'{repo}/configs/pretrain.py:size=base,frames=128').model)['train']
  long = flops.count(config_lib.load_config(f'{repo}/configs/pretrain.py:size=base,frames=512').model)['train']
  for tower in ('video_encoder', 'audio_encoder', 'combiner'):
    np.testing.assert_allclose(long[tower], 4 * short[tower], rtol=1e-9)
  assert 4 * short['av_transformer'] < long['av_transformer'] < 5 * short['av_transformer']


@pytest.mark.parametrize('mesh_config', [dict(data=1, fsdp=2, tensor=2)])
def test_sharded_init_and_forward_match_one_device(mesh_config):
  assert jax.device_count() >= 4, 'conftest sets 4 virtual CPU devices'
  config = tiny_config('ttm')
  model = mirasol.Model(**config.model)
  batch = random_batch(config, batch_size=4)
  rules = config.axis_rules

  def loss(variables, b):
    return model.apply(variables, b)['losses']['total']

  reference_vars = jax.jit(model.init)(jax.random.key(0), batch)
  reference = float(jax.jit(loss)(nn.unbox(reference_vars), batch))

  mesh = sharding.make_mesh(mesh_config, jax.devices()[:4])
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = jax.eval_shape(model.init, jax.random.key(0), batch)
    shardings = sharding.logical_shardings(abstract, mesh, rules)
    variables = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), batch)
    sharded_batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    value = float(jax.jit(loss)(nn.unbox(variables), sharded_batch))
  kernel = nn.unbox(variables)['params']['text_decoder']['stack']['layers']['mlp']['fc1']['kernel']
  assert len(kernel.sharding.device_set) > 1  # parameters really are spread over the mesh
  np.testing.assert_allclose(value, reference, rtol=1e-5)


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
