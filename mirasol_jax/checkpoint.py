"""Checkpoints in the workdir: orbax CheckpointManager holding the train state, every process's grain iterator state
and the config, saved asynchronously; restore into the shardings of a live run; partial loads for fine-tuning.

A damaged checkpoint (an empty step folder, a missing item, arrays that no longer read) never stops a run or a
command: they use the newest checkpoint that reads, and the trainer moves the damaged ones to
WORKDIR/checkpoints.damaged/.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Callable, Optional, Sequence

import flax
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from mirasol_jax import paths

DAMAGED = 'checkpoints.damaged'


class MismatchError(ValueError):
  """A checkpoint that does not fit what asks for it (a parameter's shape, a regex matching nothing): an older
  checkpoint of the same run would not fit either, so no fallback is tried."""


class IteratorSnapshot:
  """An iterator's state when this was made: what a save writes (an asynchronous save may run after training has moved
  on, and a run whose data pipeline failed saves the state from before the batch that failed)."""

  def __init__(self, iterator):
    self._state = iterator.get_state()

  def get_state(self):
    return self._state


def manager(workdir: str, keep: int, asynchronous: bool = True, clean_temporary: bool = False
            ) -> ocp.CheckpointManager:
  """The run's checkpoints. `clean_temporary` (the trainer only): process 0 deletes the `<step>.orbax-checkpoint-tmp-*`
  folders of saves a kill interrupted, before this manager's first save. Never for `eval` or `probe`, which may run
  beside a trainer whose save in progress is such a folder."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous,
                                         cleanup_tmp_directories=clean_temporary)
  return ocp.CheckpointManager(paths.join(paths.absolute(workdir), 'checkpoints'), options=options,
                               item_names=('state', 'data', 'config'))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, iterator, config) -> None:
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(IteratorSnapshot(iterator)),
      config=ocp.args.JsonSave(config.to_dict())))


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any, iterator) -> Any:
  """The train state of `step` laid out like `abstract_state` (ShapeDtypeStructs with shardings); `iterator`
  continues from the batch after that step."""
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(iterator)))
  return restored['state']


def checkpoints_folder(path: str) -> str:
  """The checkpoints folder of a run: `path` itself when it is one, else path/checkpoints."""
  path = paths.absolute(path)
  return path if paths.basename(path) == 'checkpoints' else paths.join(path, 'checkpoints')


def saved_steps(folder: str) -> list[int]:
  """The steps of the finalised step folders in `folder`, oldest first (orbax names them by the step, and writes a
  save in progress to a `<step>.orbax-checkpoint-tmp-*` folder, renamed when complete)."""
  return sorted(int(name) for name in paths.listdir(folder)
                if name.isdigit() and paths.isdir(paths.join(folder, name)))


def incomplete(folder: str, step: int) -> Optional[str]:
  """Why folder/<step> is not a whole checkpoint of this project, judged from its small metadata files; None when it
  looks whole.

  A finalised folder was whole when orbax renamed it, so this is damage done later: an empty folder left by a copy
  or a sync, a disk that filled, a file system that lost files in a crash. Damage inside the arrays shows only when
  they are read (see _newest).
  """
  path = paths.join(folder, str(step))
  for item in ('state', 'data'):
    if not paths.isdir(paths.join(path, item)):
      return f'it has no {item}/ folder'
  iterator_states = paths.glob(paths.join(path, 'data'), 'process_*.json')
  try:
    for name in [paths.join(path, 'state', '_METADATA'), *iterator_states]:
      json.loads(paths.read_bytes(name))
  except (OSError, ValueError) as error:
    return f'its metadata does not read ({error})'
  return None if iterator_states else 'its data/ folder holds no iterator state'


def _on_every_process(flag: bool) -> bool:
  """Whether `flag` holds on every process: all of them must settle on the same checkpoint."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.process_allgather(np.asarray(flag)).all())


def _reason(error: BaseException) -> str:
  """The first line of the innermost cause of `error`: orbax wraps tensorstore's error, which names the file."""
  seen = {id(error)}
  while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
    seen.add(id(inner))
    error = inner
  return f'{type(error).__name__}: {(str(error).splitlines() or [""])[0][:300]}'


def _newest(folder: str, steps: Sequence[int], read: Callable[[int], Any]) -> tuple[Optional[int], Any, dict[int, str]]:
  """read(step) of the newest of `steps` that reads: its step, what `read` returned and, for every step passed over
  (newer ones that failed, and any that is not whole: incomplete), why; (None, None, why) when no step is whole.

  A step whose read raises counts as damaged only when an older one then reads. When none does, the newest one's
  error is raised: a config that does not fit the run's checkpoints fails them all, and must be reported as such,
  never taken for damage. A MismatchError is raised at once.
  """
  passed = {step: why for step in steps if (why := incomplete(folder, step))}
  first_error = None
  for step in sorted(set(steps) - set(passed), reverse=True):
    try:
      result, why = read(step), None
    except MismatchError:
      raise
    except Exception as error:  # orbax and tensorstore raise many kinds of error for a damaged file
      result, why = None, _reason(error)
      first_error = first_error or error
    if _on_every_process(why is None):
      return step, result, passed
    passed[step] = why or 'it does not read on another process'
  if first_error is not None:
    raise first_error
  return None, None, passed


def set_aside(workdir: str, step: int) -> str:
  """Moves checkpoints/<step> of a run to checkpoints.damaged/<step> (<step>-2, <step>-3, ... when that is taken);
  returns where it went."""
  damaged = paths.join(paths.absolute(workdir), DAMAGED)
  paths.makedirs(damaged)
  target, copy = paths.join(damaged, str(step)), 1
  while paths.exists(target):
    copy += 1
    target = paths.join(damaged, f'{step}-{copy}')
  paths.move(paths.join(checkpoints_folder(workdir), str(step)), target)
  return target


def resume(mngr: ocp.CheckpointManager, workdir: str, abstract_state: Any, iterator) -> tuple[Optional[int], Any]:
  """The step and train state (laid out like `abstract_state`) of the run's newest checkpoint that restores, with
  `iterator` set to continue after it; (None, None) when the run has no whole checkpoint.

  Process 0 moves every damaged checkpoint (passed over by _newest) to WORKDIR/checkpoints.damaged/, with a warning
  naming it. Moved rather than deleted, as it may hold what someone wants to recover; moved rather than left in
  place, because orbax would go on counting it among the config.keep_checkpoints it keeps (deleting good ones first),
  refuse to save its step when training reaches it again, and every later resume would meet it first.
  """
  folder = checkpoints_folder(workdir)

  def read(step: int) -> Any:
    _check_fits(paths.join(folder, str(step), 'state'), abstract_state['params'], f'{folder}/{step}')
    return restore(mngr, step, abstract_state, iterator)

  step, state, damaged = _newest(folder, mngr.all_steps(), read)
  if not damaged:
    return step, state
  if jax.process_index() == 0:
    for bad, why in sorted(damaged.items()):
      logging.warning('%s/%d cannot be restored (%s): moved to %s; %s', folder, bad, why, set_aside(workdir, bad),
                      'no checkpoint restores, starting from scratch' if step is None else f'resuming from step {step}')
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('damaged checkpoints set aside')
  mngr.reload()
  return step, state


def _param_shapes(state: str) -> dict[str, jax.ShapeDtypeStruct]:
  """Shape and dtype of each parameter (by its '/'-joined path) of the checkpoint item `state` (a folder), from its
  metadata: no array is read."""
  metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state)).tree
  return {name: jax.ShapeDtypeStruct(tuple(array.shape), array.dtype)
          for name, array in flax.traverse_util.flatten_dict(metadata['params'], sep='/').items()}


def _check_fits(state: str, abstract_params: Any, what: str) -> None:
  """Raises a MismatchError naming the first parameter of a model (`abstract_params`) that the checkpoint item
  `state` (a folder) lacks or holds in another shape: from the metadata alone, before any array is read, so that a
  config that does not fit a run's checkpoints is reported as such and never taken for damage."""
  saved = _param_shapes(state)
  needed = {name: tuple(array.shape)
            for name, array in flax.traverse_util.flatten_dict(abstract_params, sep='/').items()}
  for name in sorted(needed):
    if name not in saved:
      raise MismatchError(f'{what} does not fit this config: it has no parameter {name}')
    if saved[name].shape != needed[name]:
      raise MismatchError(f'{what} does not fit this config: {name} has shape {saved[name].shape} there, this model '
                          f'needs {needed[name]}')


def _read_params(state: str, params: Optional[Any] = None) -> Any:
  """The parameters named by the tree `params` (ShapeDtypeStructs with shardings: restored into them, cast to their
  dtypes) from the checkpoint item `state` (a folder), and no other array: not the optimizer state, not the
  parameters `params` leaves out. Without `params`, all of them, as numpy arrays."""
  if params is None:
    params = flax.traverse_util.unflatten_dict(_param_shapes(state), sep='/')
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params)
  else:
    restore_args = ocp.checkpoint_utils.construct_restore_args(params)
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(state, args=ocp.args.PyTreeRestore(
        item={'params': params}, restore_args={'params': restore_args}, partial_restore=True))
  return restored['params']


def _whole_step(folder: str, step: int) -> str:
  """The state item of folder/<step>, a checkpoint asked for by its step: an error says when it is missing or
  damaged."""
  if not paths.isdir(paths.join(folder, str(step))):
    raise FileNotFoundError(f'{folder} has no checkpoint of step {step} (it has {saved_steps(folder) or "none"})')
  why = incomplete(folder, step)
  if why:
    raise FileNotFoundError(f'{folder}/{step} is damaged: {why}')
  return paths.join(folder, str(step), 'state')


def _read_newest(path: str, read: Callable[[str], Any]) -> tuple[int, Any]:
  """read(state item folder) of the newest checkpoint of a run (its workdir or its checkpoints folder) that reads,
  and its step. Damaged newer ones are passed over with a warning naming them, and left where they are: this may
  run beside the run's trainer, which alone moves them."""
  folder = checkpoints_folder(path)
  step, result, passed = _newest(folder, saved_steps(folder), lambda s: read(paths.join(folder, str(s), 'state')))
  if jax.process_index() == 0:
    for bad, why in sorted(passed.items()):
      logging.warning('%s/%d cannot be read (%s); %s', folder, bad, why,
                      'no other checkpoint' if step is None else f'using step {step}')
  if step is None:
    raise FileNotFoundError(f'{path!r} holds no {"whole " if passed else ""}checkpoint')
  return step, result


def _read_step(path: str, step: Optional[int], read: Callable[[str], Any]) -> tuple[int, Any]:
  """read(state item folder) of a run's checkpoint (its workdir or its checkpoints folder) of `step`, or with None
  of its newest that reads (_read_newest), and the step read."""
  if step is None:
    return _read_newest(path, read)
  return step, read(_whole_step(checkpoints_folder(path), step))


def params_at(path: str, step: Optional[int] = None, abstract_params: Optional[Any] = None) -> tuple[int, Any]:
  """(step, parameters) of a run's checkpoint (its workdir or its checkpoints folder): that of `step`, by default
  the newest that reads (damaged newer ones passed over with a warning). Laid out like `abstract_params`
  (ShapeDtypeStructs with shardings; their names and shapes are checked against the checkpoint's before anything is
  read), or as numpy arrays without it. Neither the optimizer state nor the data iterator is read."""
  def read(state: str) -> Any:
    if abstract_params is not None:
      _check_fits(state, abstract_params, os.path.dirname(state))
    return _read_params(state, abstract_params)

  return _read_step(path, step, read)


def read_params(path: str, step: Optional[int] = None) -> Any:
  """The parameters alone, as numpy arrays, of params_at(path, step)."""
  return params_at(path, step)[1]


def load_params(path: str, target_params: Any, regex: str, step: Optional[int] = None) -> tuple[Any, list[str]]:
  """Parameters of another run's checkpoint (by default its newest that reads) whose paths match `regex`, copied
  into `target_params` (keeping their shardings and dtypes); returns the new params and the paths loaded.

  Names and shapes are checked against the checkpoint's metadata before any array is read, and only the matching
  arrays are read, straight into their shardings: a mismatch fails at once, and a large checkpoint costs only what is
  loaded.
  """
  target = flax.traverse_util.flatten_dict(target_params, sep='/')
  pattern = re.compile(regex)

  def read(state: str) -> tuple[list[str], Any]:
    saved = _param_shapes(state)
    names = sorted(name for name in target if pattern.search(name) and name in saved)
    if not names:
      raise MismatchError(f'config.init_from_regex={regex!r} matches no parameter of {path!r}')
    for name in names:
      if saved[name].shape != tuple(target[name].shape):
        raise MismatchError(f'init_from {path!r}: {name} has shape {saved[name].shape}, this model needs '
                            f'{tuple(target[name].shape)}')
    selected = {name: jax.ShapeDtypeStruct(target[name].shape, target[name].dtype, sharding=target[name].sharding)
                for name in names}
    return names, _read_params(state, flax.traverse_util.unflatten_dict(selected, sep='/'))

  _, (names, loaded) = _read_step(path, step, read)
  target.update(flax.traverse_util.flatten_dict(loaded, sep='/'))
  return flax.traverse_util.unflatten_dict(target, sep='/'), names
