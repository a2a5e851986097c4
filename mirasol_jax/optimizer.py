"""The optimizer from config: AdamW or Adafactor, linear warm-up then cosine decay, global-norm clipping,
weight decay on matrices only, a learning-rate multiplier per tower, and frozen parameters by regex on their path.

Two ways not to train a tower: config.frozen (a regex on parameter paths) or a learning-rate multiplier of 0. Either
way the train step drops its gradients before anything reads them (`drop_untrained`), so that XLA does not compute
them, and `frozen_towers` names the towers that do not train for the FLOP count (flops.count) behind the MFU.
"""
from __future__ import annotations

import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mirasol_jax.models import mirasol


def schedule(config) -> optax.Schedule:
  warmup = int(config.get('warmup_steps', 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else config.lr, peak_value=config.lr, warmup_steps=warmup,
      decay_steps=max(config.total_steps, warmup + 1), end_value=config.lr * config.get('lr_end_ratio', 0.0))


def path_names(params: Any) -> Any:
  """The same tree with each leaf replaced by its '/'-joined path, e.g. 'text_decoder/embed/embedding'.

  A flax partitioning box counts as one leaf, so this tree is a prefix of boxed params; callers map over it first.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  return flax.traverse_util.unflatten_dict({k: k for k in flat}, sep='/')


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices and kernels (ndim >= 2, scanned layers included), not on biases, norms, embeddings
  of positions or single tokens."""
  return jax.tree.map(lambda name, p: np.ndim(nn.unbox(p)) >= 2 and not name.endswith(('bias', 'scale')),
                      path_names(params), params)


def frozen_labels(params: Any, frozen_regex: str) -> Any:
  pattern = re.compile(frozen_regex) if frozen_regex else None
  return jax.tree.map(lambda name: 'frozen' if pattern and pattern.search(name) else 'train', path_names(params))


def drop_frozen(grads: Any, frozen_regex: str) -> Any:
  """Zeros in place of the gradients of frozen parameters. In the train step, before the optimizer and the grad-norm
  metric: nothing then reads those gradients, so XLA does not compute them."""
  if not frozen_regex:
    return grads
  return jax.tree.map(lambda g, label: jnp.zeros_like(g) if label == 'frozen' else g, grads,
                      frozen_labels(grads, frozen_regex))


def zero_rate_towers(config) -> set[str]:
  """The towers whose config.lr_multipliers entry is 0."""
  return {tower for tower, value in check_lr_multipliers(config.get('lr_multipliers')).items() if value == 0.0}


def drop_untrained(grads: Any, config) -> Any:
  """Zeros in place of the gradients of every parameter that config does not train: those config.frozen matches and
  those of a tower at a learning-rate multiplier of 0 (whose update the multiplier zeroes anyway). In the train step,
  before the optimizer, the clipping norm and the grad-norm metrics: nothing then reads those gradients, so XLA
  does not compute them (nor the backward of a tower with nothing trainable upstream of it). Their
  train/grad_norm/<tower> reads 0, and the global norm that clipping divides by holds only what trains."""
  pattern = re.compile(config.frozen) if config.get('frozen') else None
  zero_rate = zero_rate_towers(config)
  if pattern is None and not zero_rate:
    return grads

  def drop(name: str) -> bool:
    return bool(pattern and pattern.search(name)) or (bool(zero_rate) and tower_of(name) in zero_rate)

  return jax.tree.map(lambda name, g: jnp.zeros_like(g) if drop(name) else g, path_names(grads), grads)


def parameter_names(model_config) -> list[str]:
  """The '/'-joined paths of every parameter of `config.model`, from jax.eval_shape (no memory, no compilation)."""
  model = mirasol.Model(**model_config)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in mirasol.batch_shapes(model_config, 1).items()}
  shapes = jax.eval_shape(model.init, jax.random.key(0), batch)['params']
  return list(flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes), sep='/'))


def frozen_towers(config) -> tuple[str, ...]:
  """The towers (mirasol.TOWERS, in order) that `config` does not train: every parameter matched by config.frozen,
  or a learning-rate multiplier of 0. A tower only partly matched by config.frozen counts as training. For
  flops.count(config.model, frozen_towers(config))."""
  untrained = zero_rate_towers(config)
  if config.get('frozen'):
    pattern = re.compile(config.frozen)
    names: dict[str, list[str]] = {}
    for name in parameter_names(config.model):
      names.setdefault(tower_of(name), []).append(name)
    untrained |= {tower for tower, paths in names.items() if all(pattern.search(p) for p in paths)}
  return tuple(tower for tower in mirasol.TOWERS if tower in untrained)


def tower_of(name: str) -> str:
  """The tower (a key of mirasol.TOWERS) that the parameter at path `name` belongs to."""
  top = name.split('/', 1)[0]
  for tower, tops in mirasol.TOWERS.items():
    if top in tops:
      return tower
  raise ValueError(f'parameter {name} belongs to no tower in mirasol.TOWERS')


def check_lr_multipliers(multipliers) -> dict[str, float]:
  multipliers = dict(multipliers or {})
  unknown = sorted(set(multipliers) - set(mirasol.TOWERS))
  if unknown:
    raise ValueError(f'config.lr_multipliers names {unknown}, which are not towers; towers are {list(mirasol.TOWERS)}')
  negative = {k: v for k, v in multipliers.items() if v < 0}
  if negative:
    raise ValueError(f'config.lr_multipliers {negative} must be >= 0')
  return {k: float(v) for k, v in multipliers.items()}


def scale_by_tower(multipliers) -> optax.GradientTransformation:
  """Multiplies each parameter's update by its tower's entry of `multipliers` (1 where absent): the learning rate
  and the decoupled weight decay of that tower both scale, as with a separate optimizer per tower."""
  multipliers = check_lr_multipliers(multipliers)

  def update_fn(updates, state, params=None):
    del params
    scaled = jax.tree.map(lambda name, u: u * multipliers.get(tower_of(name), 1.0),
                          path_names(updates), updates)
    return scaled, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make(config) -> optax.GradientTransformation:
  """config.optimizer (adamw | adafactor), config.lr with warm-up and cosine decay, config.grad_clip,
  config.weight_decay, config.lr_multipliers (tower -> factor on its learning rate), config.frozen (regex of
  parameter paths that never change)."""
  lr = schedule(config)
  if config.optimizer == 'adamw':
    inner = optax.adamw(lr, b1=config.get('b1', 0.9), b2=config.get('b2', 0.999),
                        weight_decay=config.get('weight_decay', 0.0), mask=decay_mask)
  elif config.optimizer == 'adafactor':
    inner = optax.adafactor(lr, weight_decay_rate=config.get('weight_decay', 0.0) or None,
                            weight_decay_mask=decay_mask)
  else:
    raise ValueError(f'config.optimizer={config.optimizer!r} is not adamw or adafactor')
  tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), inner) if config.get('grad_clip') else inner
  if config.get('frozen'):
    tx = optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()},
                               lambda params: frozen_labels(params, config.frozen))
  # After the frozen split, which hands its inner transformation placeholders in place of frozen leaves. Checked
  # even when every multiplier is 1 (and nothing is chained), so that a misspelt tower is an error.
  multipliers = check_lr_multipliers(config.get('lr_multipliers'))
  if any(v != 1.0 for v in multipliers.values()):
    tx = optax.chain(tx, scale_by_tower(multipliers))
  return tx
