"""Analytic FLOPs agree with XLA; mesh errors; the params command. (Sharded runs: tests/test_train.py.)"""
import subprocess
import sys

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
