"""Evaluators as plug-ins: config.evals maps a name to an evaluator, the trainer calls the ones that are due.

  config.evals.validation = evaluators.base.config('vqa', split='validation', group_by='kind')
  config.evals.captions = evaluators.base.config('caption', task='caption', max_new_tokens=24)

Each type is a module of this package (TYPES) with one `Evaluator` class, built with (name, its config, a
Context) and run with `run(params, step)`, which yields (metric, value) pairs; the trainer logs them as
`eval/<name>/<metric>`. What an evaluator reads: config.data as its task sees it (`task`, a name of
config.data.tasks, '' for config.data itself), with `source`, `path`, `media_root` and `split` overriding it when
set (an evaluator can read another dataset than training does). Every evaluator of a run shares the fields of
COMMON; each type adds its own (its module's DEFAULTS), so that each can be set from the command line:
`--config.evals.validation.beam_size=4`.

`every_steps`: 0 runs the evaluator every config.eval_every_steps (and at the last step) during training, a
positive value every that many steps, a negative value never during training (the `eval` command runs every
evaluator). Examples that cannot be read are left out of every metric and counted (`skipped`).

`run_batches` is the loop every evaluator shares: one compiled function over the sharded batches of the split, its
per-example outputs gathered on every process in record order.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from mirasol_jax import host_memory
from mirasol_jax import paths
from mirasol_jax import sharding
from mirasol_jax.data import pipeline
from mirasol_jax.data import sources
from mirasol_jax.data import tasks as tasks_lib

TYPES = {
    'vqa': 'mirasol_jax.evaluators.vqa',
    'caption': 'mirasol_jax.evaluators.caption',
    'classification': 'mirasol_jax.evaluators.classification',
    'multiple_choice': 'mirasol_jax.evaluators.multiple_choice',
    'loss': 'mirasol_jax.evaluators.loss',
}
COMMON = dict(type='', task='', split='', source='', path='', media_root='', every_steps=0, group_by='')


def evaluator_class(kind: str):
  if kind not in TYPES:
    raise ValueError(f'evaluator type {kind!r} is not one of {", ".join(TYPES)}')
  return importlib.import_module(TYPES[kind]).Evaluator


def config(kind: str, **overrides) -> ml_collections.ConfigDict:
  """The config of an evaluator of type `kind`: COMMON and the type's DEFAULTS, with `overrides`."""
  fields = {**COMMON, **evaluator_class(kind).DEFAULTS, 'type': kind}
  for key, value in overrides.items():
    if key not in fields:
      raise ValueError(f'{kind} evaluator: no field {key!r} (fields: {", ".join(sorted(fields))})')
    fields[key] = value
  return ml_collections.ConfigDict(fields)


@dataclasses.dataclass
class Context:
  """What every evaluator of a run shares: the run's config and model, the mesh and shardings, the tokenizer."""
  config: Any
  model: Any
  mesh: jax.sharding.Mesh
  rules: tuple
  param_shardings: Any
  abstract_params: Any
  workdir: str
  processor: Any
  process_index: int = 0
  process_count: int = 1

  @property
  def batch_sharding(self) -> NamedSharding:
    return sharding.batch_sharding(self.mesh)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def log(self, message: str) -> None:
    if self.process_index == 0:
      print(message, flush=True)


@dataclasses.dataclass
class Outputs:
  """What run_batches gathers: every readable example's outputs in record order, the summed scalars."""
  indices: np.ndarray  # [N] the examples' positions in the split's source
  arrays: dict[str, np.ndarray]  # name -> [N, ...]
  sums: dict[str, float]  # the step's scalars, summed over batches
  skipped: int  # examples that could not be read: in no output, in no metric


class Evaluator:
  """The base of every evaluator: its data, when it is due, the shared batch loop and the predictions file."""

  DEFAULTS: dict[str, Any] = {}
  NEEDS_TEXT = True  # it tokenises candidates or decodes answers: the run must have a tokenizer


  def __init__(self, name: str, eval_config: ml_collections.ConfigDict, ctx: Context):
    self.name, self.cfg, self.ctx = name, eval_config, ctx
    unknown = set(eval_config.keys()) - set(COMMON) - set(self.DEFAULTS)
    if unknown:
      raise ValueError(f'config.evals.{name}: no field {", ".join(sorted(unknown))} for type {eval_config.type!r}')
    self.data = tasks_lib.task_data(ctx.config.data, eval_config.get('task', ''))
    for key in ('source', 'path', 'media_root'):
      if eval_config.get(key):
        self.data[key] = eval_config[key]
    self.split = eval_config.get('split') or self.data.eval_split
    self.group_by = eval_config.get('group_by', '')
    self._compiled: dict[str, Any] = {}
    self._source = None

  def check_text(self) -> None:
    """Raises if this evaluator reads or writes text and the run has none (no tokenizer: data without text)."""
    if self.NEEDS_TEXT and self.ctx.processor is None:
      data = self.ctx.config.data
      raise ValueError(f'config.evals.{self.name} ({self.cfg.type}) reads and writes text, but config.data '
                       f'({data.source} {data.path or ""}) has none, so there is no tokenizer: set '
                       f'config.evals.{self.name}.every_steps=-1 or config.eval_every_steps=0')

  # -- when ------------------------------------------------------------------------------------------------------

  def every(self) -> int:
    every = int(self.cfg.get('every_steps', 0))
    return int(self.ctx.config.eval_every_steps) if every == 0 else every

  def due(self, step: int, total_steps: int) -> bool:
    every = self.every()
    return every > 0 and (step % every == 0 or step == total_steps)

  # -- what ------------------------------------------------------------------------------------------------------

  @property
  def source(self):
    if self._source is None:
      self._source = sources.open_source(self.data, self.split)
    return self._source

  def record(self, index: int) -> dict[str, Any]:
    return self.source[int(index)]

  def prompt(self, record: Mapping[str, Any]) -> str:
    return tasks_lib.prompt(record, self.data.get('prompt', ''))

  def group(self, record: Mapping[str, Any]) -> Optional[Any]:
    return record.get(self.group_by) if self.group_by else None

  def check_groups(self, groups: Sequence[Optional[Any]]) -> None:
    """Warns when group_by names a field that none of the examples has: no per-group metric would say so."""
    if self.group_by and groups and all(g is None for g in groups):
      self.ctx.log(f'warning: config.evals.{self.name}.group_by={self.group_by!r}: no example of '
                   f'{self.split} has that field, so there are no per-group metrics')

  def run(self, params, step: int) -> Iterator[tuple[str, float]]:
    raise NotImplementedError

  def evaluate(self, params, step: int) -> dict[str, float]:
    """run() as a dict of eval/<name>/<metric>, timed and logged."""
    start = time.perf_counter()
    result = {f'eval/{self.name}/{metric}': float(value) for metric, value in self.run(params, step)}
    self.ctx.log(f'step {step}: {self.name} ({self.cfg.type}, {self.split}) in {time.perf_counter() - start:.1f}s: '
                 + self.headline(result))
    return result

  def headline(self, result: Mapping[str, float]) -> str:
    """The evaluator's main figures, for the log line."""
    keys = [k for k in result if k.count('/') == 2][:4]
    return ', '.join(f'{k.rsplit("/", 1)[1]} {result[k]:.4g}' for k in keys)

  # -- how -------------------------------------------------------------------------------------------------------

  def compile(self, key: str, fn: Callable, batch_shapes: Mapping[str, jax.ShapeDtypeStruct], extra_args=()):
    """fn(params, batch, *extra_args) -> (scalars, per-example outputs), compiled once for this evaluator; scalars
    replicated, per-example outputs sharded like the batch."""
    if key not in self._compiled:
      ctx = self.ctx
      extra_shardings = tuple(ctx.replicated for _ in extra_args)
      with jax.set_mesh(ctx.mesh), nn.logical_axis_rules(ctx.rules):
        self._compiled[key] = jax.jit(
            fn, in_shardings=(ctx.param_shardings, ctx.batch_sharding) + extra_shardings,
            out_shardings=(ctx.replicated, ctx.batch_sharding)).lower(
                ctx.abstract_params, dict(batch_shapes), *extra_args).compile()
      host_memory.release()  # what the compiler freed (host_memory)
    return self._compiled[key]

  def batch_shapes(self, extra: Optional[Mapping[str, tuple[tuple[int, ...], Any]]] = None):
    from mirasol_jax.models import mirasol
    shapes = dict(mirasol.batch_shapes(self.ctx.config.model, self.ctx.config.batch_size))
    shapes.update(extra or {})
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.ctx.batch_sharding)
            for k, (shape, dtype) in shapes.items()}

  def run_batches(self, params, fn: Callable, key: str = 'step',
                  extra_inputs: Optional[Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]] = None,
                  extra_shapes: Optional[Mapping[str, tuple[tuple[int, ...], Any]]] = None,
                  extra_args=()) -> Outputs:
    """Runs fn(params, batch, *extra_args) -> (scalars, per-example [B, ...] outputs) over every batch of the
    split: the scalars are summed over batches, the outputs of the readable examples gathered in record order.
    `extra_inputs(host_batch)` adds per-example inputs (e.g. tokenised answer options) to each batch."""
    ctx, config = self.ctx, self.ctx.config
    compiled = self.compile(key, fn, self.batch_shapes(extra_shapes), extra_args)
    sums: dict[str, float] = {}
    columns: dict[str, list[np.ndarray]] = {}
    meta: dict[str, list[np.ndarray]] = {'index': [], 'example_mask': [], 'skipped': []}
    spec = PartitionSpec(sharding.BATCH_AXES)
    for host_batch in pipeline.eval_batches(config, self.split, ctx.process_index, ctx.process_count, self.data):
      inputs = pipeline.model_inputs(host_batch)
      if extra_inputs is not None:
        inputs.update(extra_inputs(host_batch))
      scalars, outputs = compiled(params, pipeline.to_global(inputs, ctx.batch_sharding), *extra_args)
      for name, value in jax.device_get(scalars).items():
        sums[name] = sums.get(name, 0.0) + float(value)
      for name, value in outputs.items():
        columns.setdefault(name, []).append(
            np.asarray(multihost_utils.global_array_to_host_local_array(value, ctx.mesh, spec)))
      for name in meta:
        meta[name].append(np.asarray(host_batch[name]))
    gathered = {name: _gather(np.concatenate(values)) for name, values in {**meta, **columns}.items()}
    keep = gathered['example_mask'].astype(bool) & (gathered['index'] >= 0)
    skipped = int(np.sum(gathered['skipped'].astype(bool) & (gathered['index'] >= 0)))
    order = np.argsort(gathered['index'][keep], kind='stable')
    arrays = {name: gathered[name][keep][order] for name in columns}
    return Outputs(gathered['index'][keep][order], arrays, sums, skipped)

  def write_predictions(self, step: int, rows: list[dict[str, Any]]) -> None:
    if self.ctx.process_index != 0:
      return
    paths.write_text(paths.join(self.ctx.workdir, 'predictions', f'{self.name}_{step}.jsonl'),
                     ''.join(json.dumps(row) + '\n' for row in rows))


def _gather(local: np.ndarray) -> np.ndarray:
  """Every process's rows, process 0's first (each process has as many: the evaluation steps are the same)."""
  if jax.process_count() == 1:
    return local
  return np.asarray(multihost_utils.process_allgather(local)).reshape(-1, *local.shape[1:])


def grouped_means(values: Mapping[str, np.ndarray], groups: list[Optional[Any]]) -> dict[str, float]:
  """The mean of each named per-example array, overall and per group value ('<name>/<group>'), and the examples
  of each group ('examples/<group>')."""
  from mirasol_jax.evaluators import grounding
  present = sorted({g for g in groups if g is not None}, key=str)
  result = {}
  for name, flags in values.items():
    flags = np.asarray(flags, np.float64)
    result[name] = float(flags.mean()) if len(flags) else 0.0
    for value in present:
      members = flags[[g == value for g in groups]]
      result[f'{name}/{grounding.metric_name(value)}'] = float(members.mean())
  for value in present:
    result[f'examples/{grounding.metric_name(value)}'] = float(sum(g == value for g in groups))
  return result


def build(ctx: Context) -> dict[str, Evaluator]:
  """The evaluators of config.evals, in order."""
  evaluators = {}
  for name, cfg in (ctx.config.get('evals') or {}).items():
    try:
      evaluators[name] = evaluator_class(cfg.get('type', ''))(name, cfg, ctx)
    except ValueError as e:
      raise ValueError(e if str(e).startswith('config.') else f'config.evals.{name}: {e}') from None
  return evaluators
