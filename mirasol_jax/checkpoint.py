"""Checkpoints in the workdir: orbax CheckpointManager holding the train state, every process's grain iterator state
and the config, saved asynchronously; restore into the shardings of a live run; partial loads for fine-tuning."""
from __future__ import annotations

import os
import re
from typing import Any, Optional

import flax
import grain
import jax
import orbax.checkpoint as ocp


class _IteratorSnapshot:
  """The iterator state at save time (an asynchronous save may run after training has moved on)."""

  def __init__(self, iterator):
    self._state = iterator.get_state()

  def get_state(self):
    return self._state


def manager(workdir: str, keep: int, asynchronous: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=asynchronous)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'), options=options,
                               item_names=('state', 'data', 'config'))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, iterator, config) -> None:
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator)),
      config=ocp.args.JsonSave(config.to_dict())))


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any, iterator) -> Any:
  """The train state of `step` laid out like `abstract_state` (ShapeDtypeStructs with shardings); `iterator`
  continues from the batch after that step."""
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(iterator)))
  return restored['state']


def restore_params(workdir: str, step: int, abstract_params: Any) -> Any:
  """The parameters alone of a checkpoint of this project, laid out like `abstract_params` (ShapeDtypeStructs with
  shardings): neither the optimizer state nor the data iterator is read."""
  path = os.path.join(os.path.abspath(workdir), 'checkpoints', str(step), 'state')
  target = {'params': abstract_params}
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
  return restored['params']


def read_params(path: str, step: Optional[int] = None) -> Any:
  """The parameters of a run's checkpoint (its workdir or its checkpoints folder; the latest step by default)."""
  folder = path if os.path.basename(os.path.normpath(path)) == 'checkpoints' else os.path.join(path, 'checkpoints')
  with ocp.CheckpointManager(folder, item_names=('state', 'data', 'config')) as source:
    step = source.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'{path!r} holds no checkpoint')
    restored = source.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return restored['state']['params']


def load_params(path: str, target_params: Any, regex: str, step: Optional[int] = None) -> tuple[Any, list[str]]:
  """Parameters of another run's checkpoint whose paths match `regex`, copied into `target_params` (keeping their
  shardings); returns the new params and the paths loaded. Shapes must agree."""
  loaded = flax.traverse_util.flatten_dict(read_params(path, step), sep='/')
  target = flax.traverse_util.flatten_dict(target_params, sep='/')
  pattern = re.compile(regex)
  names = sorted(name for name in target if pattern.search(name) and name in loaded)
  if not names:
    raise ValueError(f'config.init_from_regex={regex!r} matches no parameter of {path!r}')
  for name in names:
    if tuple(loaded[name].shape) != tuple(target[name].shape):
      raise ValueError(f'init_from {path!r}: {name} has shape {loaded[name].shape}, this model needs '
                       f'{target[name].shape}')
    target[name] = jax.device_put(loaded[name].astype(target[name].dtype), target[name].sharding)
  return flax.traverse_util.unflatten_dict(target, sep='/'), names
