"""Test setup: 4 virtual CPU devices (for sharding tests) and helpers for tiny configs and random batches."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mirasol_jax import config_lib  # noqa: E402
from mirasol_jax.models import mirasol  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMBINERS = ('ttm', 'transformer', 'qformer')


def tiny_config(combiner='ttm', dtype='float32', **model_overrides):
  config = config_lib.load_config(os.path.join(REPO, f'configs/pretrain.py:size=tiny,combiner={combiner}'))
  config.model.dtype = dtype
  for key, value in model_overrides.items():
    config.model[key] = value
  return config


def random_batch(config, batch_size=2, seed=0):
  """A model batch (mirasol.example_batch) of random content: prompt = first half of the text, target = second half."""
  rng = np.random.default_rng(seed)
  batch = mirasol.example_batch(config, batch_size)
  batch['video'] = rng.integers(0, 256, batch['video'].shape, dtype=np.uint8)
  batch['audio'] = rng.normal(-40.0, 20.0, batch['audio'].shape).astype(np.float32)
  batch['text_tokens'] = rng.integers(3, config.model.vocab_size, batch['text_tokens'].shape, dtype=np.int32)
  batch['text_tokens'][:, 0] = 1
  batch['text_loss_mask'][:, batch['text_tokens'].shape[1] // 2:] = True
  return batch


@pytest.fixture(scope='session')
def repo():
  return REPO


@pytest.fixture(scope='session')
def small_demo(tmp_path_factory):
  """A small clean demo dataset (12 training and 4 validation clips), generated once for the session."""
  from mirasol_jax.data import demo_data
  folder = str(tmp_path_factory.mktemp('small_demo') / 'data')
  demo_data.generate(folder, num_train=12, num_validation=4)
  return folder
