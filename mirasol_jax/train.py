"""The trainer: from a config and a workdir to a trained, evaluated, checkpointed Mirasol model.

One linear file, read top to bottom: processes and mesh -> tokenizer and data -> shapes and sharded init ->
restore (this workdir's checkpoint, else config.init_from, else scratch) -> compiled steps -> evaluation -> the loop.
The same code runs the CPU demo and a multi-host pod: only config.mesh, config.axis_rules and the process flags
change.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics as clu_metrics
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mirasol_jax import checkpoint
from mirasol_jax import flops
from mirasol_jax import host_memory
from mirasol_jax import metrics as metrics_lib
from mirasol_jax import optimizer
from mirasol_jax import paths
from mirasol_jax import pretrained
from mirasol_jax import sharding
from mirasol_jax.data import pipeline
from mirasol_jax.data import sources
from mirasol_jax.data import tasks as tasks_lib
from mirasol_jax.data import tokenizer as tokenizer_lib
from mirasol_jax.evaluators import base as evaluators
from mirasol_jax.models import mirasol


class NonFiniteLossError(FloatingPointError):
  """A loss became NaN or Inf; the message names the step and the loss terms."""


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def check_config(config, num_devices: int) -> tuple[int, ...]:
  """Errors that need no compilation: the mesh, and a batch that does not divide over the data axes."""
  shape = sharding.mesh_shape(config.mesh, num_devices)
  data_ways = shape[0] * shape[1]
  if config.batch_size % data_ways:
    raise ValueError(f'config.batch_size={config.batch_size} does not divide over the {data_ways} data-parallel '
                     f'shards of config.mesh {dict(zip(sharding.MESH_AXES, shape))}')
  micro = config.get('microbatches', 1)
  if config.batch_size % micro or (config.batch_size // micro) % data_ways:
    raise ValueError(f'config.batch_size={config.batch_size} does not split into config.microbatches={micro} '
                     f'micro-batches divisible over {data_ways} data-parallel shards')
  if config.batch_size % jax.process_count():
    raise ValueError(f'config.batch_size={config.batch_size} does not divide over {jax.process_count()} processes')
  return shape


def ensure_tokenizer(config, workdir: str) -> None:
  """config.data.tokenizer, or WORKDIR/tokenizer.model: config.init_from's when that run has one (the decoder it
  loads reads its token ids), else trained by process 0 on the training split(s).

  With config.data.require_target False (pretraining on video with sound), a training split without any text gets
  no tokenizer and config.data.tokenizer stays empty.
  """
  if config.data.tokenizer:
    return
  path = paths.join(workdir, 'tokenizer.model')
  inherited = paths.join(config.init_from, 'tokenizer.model') if config.get('init_from') else ''
  if jax.process_index() == 0 and not paths.exists(path) and inherited and paths.exists(inherited):
    # Fine-tuning: the text decoder loaded from config.init_from reads that run's token ids.
    paths.copy(inherited, path)
    _log(f'tokenizer of {config.init_from}')
  if jax.process_index() == 0 and not paths.exists(path):
    names = tasks_lib.task_names(config.data) or ['']
    task_configs = [tasks_lib.task_data(config.data, name) for name in names]
    source = [sources.open_source(t, t.train_split) for t in task_configs]
    try:
      tokenizer_lib.train_on_source(source, config.model.vocab_size, path, config.data.get('tokenizer_type', 'bpe'))
    except tokenizer_lib.NoTextError:
      if config.data.get('require_target', True):
        raise
      _log(f'{source!r} hold no text: no tokenizer, and no text loss')
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('tokenizer')
  if paths.exists(path):
    with config.unlocked():
      config.data.tokenizer = path


def init_params(model: mirasol.Model, rng: jax.Array, batch) -> tuple[Any, jax.Array]:
  """The random initialisation of a run whose rng is `rng` (jax.random.PRNGKey(config.seed)): its parameters
  (boxed with their logical axes) and the rng the training steps go on with."""
  params_rng, train_rng = jax.random.split(rng)
  return model.init({'params': params_rng, 'dropout': params_rng}, batch)['params'], train_rng


def init_sources(config) -> list[str]:
  """What a fresh run of the config loads over its random initialisation: config.init_from, then the image ViT
  checkpoints of config.init_video_encoder and init_audio_encoder; empty when none is set."""
  return [path for path in [config.init_from, *pretrained.sources(config).values()] if path]


def load_init_from(config, params):
  """`params` with the arrays of config.init_from's latest checkpoint whose paths match config.init_from_regex,
  then the video and audio encoders built from config.init_video_encoder and init_audio_encoder (pretrained.py);
  returns them and the names loaded."""
  names = []
  if config.init_from:
    params, names = checkpoint.load_params(config.init_from, params, config.get('init_from_regex', '.*'))
  params, tower_names, report = pretrained.load_towers(config, params)
  for line in report:
    _log(line)
  return params, names + tower_names


def _split_microbatches(batch, count: int):
  return jax.tree.map(lambda x: x.reshape(count, x.shape[0] // count, *x.shape[1:]), batch)


def _mesh(config):
  check_config(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  _log(f'{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} device(s), mesh '
       f'{dict(mesh.shape)}')
  return mesh, tuple(tuple(rule) for rule in config.axis_rules)


def evaluate(config, workdir: str, step: Optional[int] = None) -> dict[str, float]:
  """Runs every evaluator of config.evals on the parameters of the workdir's checkpoint of `step` (by default the
  newest that reads; config.init_from's when the workdir has none), appends the metrics to metrics.jsonl and returns
  them.

  Reads the parameters alone (not the optimizer state, not the data iterator), so the evaluators may read other
  data than the run trained on (--config.data.path=...); uses the run's tokenizer; leaves config.json alone.
  """
  mesh, rules = _mesh(config)
  if not config.data.tokenizer:
    path = paths.join(workdir, 'tokenizer.model')
    if not paths.exists(path):
      raise FileNotFoundError(f'{workdir} has no tokenizer.model and config.data.tokenizer is empty: which tokenizer '
                              'did the model train with?')
    config.unlock()
    config.data.tokenizer = path
    config.lock()
  processor = pipeline.load_tokenizer(config.data, config.model)
  model = mirasol.Model(**config.model)
  init_batch = mirasol.example_batch(config, 1)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda rng: init_params(model, rng, init_batch)[0], jax.random.PRNGKey(config.seed))
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    abstract = checkpoint.abstract_with_shardings(sharding.box_values(boxed), shardings)
  if step is not None or checkpoint.saved_steps(checkpoint.checkpoints_folder(workdir)):
    step, params = checkpoint.params_at(workdir, step, abstract)  # the newest passes over damaged newer ones
  if step is not None:
    _log(f'evaluating {workdir}/checkpoints/{step}')
  elif init_sources(config):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      params = jax.jit(lambda rng: nn.unbox(init_params(model, rng, init_batch)[0]), out_shardings=shardings)(
          jax.random.PRNGKey(config.seed))
    params, names = load_init_from(config, params)
    step = 0
    _log(f'evaluating {len(names)} parameter arrays of {", ".join(init_sources(config))}')
  else:
    raise FileNotFoundError(f'{workdir} holds no checkpoint to evaluate (and config.init_from, init_video_encoder '
                            'and init_audio_encoder are empty)')
  evals = evaluators.build(evaluators.Context(config, model, mesh, rules, shardings, abstract, workdir, processor,
                                              jax.process_index(), jax.process_count()))
  if not evals:
    raise ValueError('config.evals is empty: there is nothing to evaluate')
  result = {}
  for evaluator in evals.values():
    result.update(evaluator.evaluate(params, step))
  if jax.process_index() == 0:
    metrics_lib.append(workdir, step, result)
  return result


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """A config's train step over a mesh, with the shapes and shardings of its state. The trainer compiles it; the
  benchmarks and ahead-of-time compilation for meshes this machine does not have compile the same thing without
  any data."""
  config: Any
  mesh: Mesh
  rules: tuple
  model: mirasol.Model
  tx: optax.GradientTransformation
  init_state: Callable[[jax.Array], Any]  # rng -> the boxed state of a fresh run
  state_shardings: Any
  abstract: Any  # the state as jax.ShapeDtypeStructs with their shardings
  batch_shapes: dict[str, jax.ShapeDtypeStruct]  # the global batch, sharded over the batch axes
  step: Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]]  # (state, batch) -> (state, metrics)

  def lower(self):
    """The jitted step lowered for `abstract` and `batch_shapes`: the state is donated, the metrics replicated."""
    replicated = NamedSharding(self.mesh, PartitionSpec())
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return jax.jit(self.step, in_shardings=(self.state_shardings, sharding.batch_sharding(self.mesh)),
                     out_shardings=(self.state_shardings, replicated), donate_argnums=(0,)).lower(
                         self.abstract, self.batch_shapes)

  def compile(self):
    """`lower()` compiled; what the compiler freed goes back to the operating system (host_memory.release)."""
    compiled = self.lower().compile()
    host_memory.release()
    return compiled

  def init(self, seed: int):
    """A fresh state, initialised in place on its shards."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      state = jax.jit(lambda rng: nn.unbox(self.init_state(rng)), out_shardings=self.state_shardings)(
          jax.random.PRNGKey(seed))
    jax.block_until_ready(state)  # initialised, then what it freed handed back
    host_memory.release()
    return state


def build_train_step(config, mesh: Mesh, rules) -> TrainStep:
  """The model and optimizer of `config`, its train state's shapes and shardings over `mesh`, and the train step:
  donated state, micro-batches accumulated with lax.scan, frozen parameters' gradients dropped."""
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharding = sharding.batch_sharding(mesh)
  model = mirasol.Model(**config.model)
  tx = optimizer.make(config)
  init_batch = mirasol.example_batch(config, 1)

  def init_state(rng):
    params, train_rng = init_params(model, rng, init_batch)
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'opt_state': sharding.drop_reduced_boxes(tx.init(params), params), 'rng': train_rng}

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init_state, jax.random.PRNGKey(config.seed))
    state_shardings = jax.tree.map(
        lambda s: replicated if s is None else s,
        sharding.logical_shardings(boxed, mesh, rules), is_leaf=lambda x: x is None)
    abstract = checkpoint.abstract_with_shardings(sharding.box_values(boxed), state_shardings)

  microbatches = config.get('microbatches', 1)

  def loss_fn(params, batch, rng, denominators=None):
    """-> the total loss, and (the loss terms, the model's statistics that are not losses)."""
    out = model.apply({'params': params}, batch, train=True, denominators=denominators, rngs={'dropout': rng})
    return out['losses']['total'], (out['losses'], out['stats'])

  def train_step(state, batch):
    rng, step_rng = jax.random.split(state['rng'])
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
      (_, (terms, stats)), grads = grad_fn(state['params'], batch, step_rng)
    else:
      # Every micro-batch divides by the whole batch's denominators, so the sum of their losses and gradients is
      # exactly the whole batch's, whatever the masks.
      denominators = mirasol.loss_denominators(batch, config.model.num_chunks, config.model.tokens_per_chunk)

      def accumulate(carry, micro):
        index, sub = micro
        (_, sub_aux), sub_grads = grad_fn(state['params'], sub, jax.random.fold_in(step_rng, index), denominators)
        return jax.tree.map(jnp.add, carry, (sub_grads, sub_aux)), None
      micro = _split_microbatches(batch, microbatches)
      aux_shape = jax.eval_shape(
          lambda: loss_fn(state['params'], jax.tree.map(lambda x: x[0], micro), step_rng, denominators)[1])
      zeros = (jax.tree.map(jnp.zeros_like, state['params']),
               jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape))
      (grads, (terms, stats)), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(microbatches), micro))
      # Statistics are not parts of a whole like the losses: the step reports their mean over micro-batches.
      stats = jax.tree.map(lambda s: s / microbatches, stats)
    grads = optimizer.drop_untrained(grads, config)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new_state = {'step': state['step'] + 1, 'params': optax.apply_updates(state['params'], updates),
                 'opt_state': opt_state, 'rng': rng}
    step_metrics = {('train/loss' if k == 'total' else f'train/loss_{k}'): v for k, v in terms.items()}
    step_metrics.update({f'train/{k}': v for k, v in stats.items()})
    step_metrics['train/grad_norm'] = optax.global_norm(grads)
    # How far each tower moved this step relative to its size (`updates` is new params - params): 0 for a frozen
    # tower; with Adam about lr over the tower's rms parameter. Reductions over arrays the step holds anyway.
    param_norms, update_norms = metrics_lib.tower_norms(state['params']), metrics_lib.tower_norms(updates)
    for tower, grad_norm in metrics_lib.tower_norms(grads).items():
      step_metrics[f'train/grad_norm/{tower}'] = grad_norm
      step_metrics[f'train/update_ratio/{tower}'] = update_norms[tower] / jnp.maximum(param_norms[tower], 1e-12)
    step_metrics['train/lr'] = optimizer.schedule(config)(state['step'])
    # Training batches have no padding: a masked example is one that could not be read.
    step_metrics['data/skipped_examples'] = jnp.sum(~batch['example_mask'])
    return new_state, step_metrics

  batch_shapes = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
                  for k, (shape, dtype) in mirasol.batch_shapes(config.model, config.batch_size).items()}
  return TrainStep(config, mesh, tuple(rules), model, tx, init_state, state_shardings, abstract, batch_shapes,
                   train_step)


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains config.total_steps steps (resuming from workdir if it holds a checkpoint); returns the last result of
  each evaluator that ran."""
  # ---------------------------------------------------------------------------------------------------------------
  # Processes and mesh.
  paths.makedirs(workdir)
  process_index, process_count = jax.process_index(), jax.process_count()
  mesh, rules = _mesh(config)
  batch_sharding = sharding.batch_sharding(mesh)

  # ---------------------------------------------------------------------------------------------------------------
  # Tokenizer and data.
  ensure_tokenizer(config, workdir)
  if process_index == 0:
    paths.write_text(paths.join(workdir, 'config.json'), config.to_json_best_effort(indent=1))
  train_iter = pipeline.build(config, config.data.train_split, process_index, process_count)
  processor = pipeline.load_tokenizer(config.data, config.model) if config.data.tokenizer else None

  # ---------------------------------------------------------------------------------------------------------------
  # Model, optimizer, the shapes and shardings of the train state, and the train step.
  parts = build_train_step(config, mesh, rules)
  model, state_shardings, abstract = parts.model, parts.state_shardings, parts.abstract
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract['params']))
  _log(f'model: {num_params:,} parameters')

  # ---------------------------------------------------------------------------------------------------------------
  # Restore: this workdir's newest checkpoint that restores (damaged newer ones are set aside), else a sharded init
  # (with selected parameters of another run). Process 0 deletes the temporary folders of interrupted saves.
  mngr = checkpoint.manager(workdir, config.get('keep_checkpoints', 3), clean_temporary=True)
  latest, state = checkpoint.resume(mngr, workdir, abstract, train_iter)
  if latest is not None:
    host_memory.release()  # what restoring freed (TrainStep.init hands back what initialising frees)
    _log(f'resumed from {workdir}/checkpoints/{latest}')
  else:
    state = parts.init(config.seed)
    if init_sources(config):
      state['params'], names = load_init_from(config, state['params'])
      host_memory.release()  # what reading the other run's parameters freed
      _log(f'initialised {len(names)} parameter arrays from {", ".join(init_sources(config))}')
  start_step = int(state['step'])

  # ---------------------------------------------------------------------------------------------------------------
  # Evaluation: the evaluators of config.evals (mirasol_jax/evaluators), each run when it is due.
  evals = evaluators.build(evaluators.Context(
      config, model, mesh, rules, state_shardings['params'], abstract['params'], workdir, processor, process_index,
      process_count))
  active = {name: e for name, e in evals.items() if e.every() > 0}
  for evaluator in active.values():
    evaluator.check_text()  # before compiling: data without text has nothing to answer

  def evaluate(due, step: int) -> dict[str, float]:
    result = {}
    for evaluator in due:
      result.update(evaluator.evaluate(state['params'], step))
    return result

  compiled_step = parts.compile()
  memory = compiled_step.memory_analysis()
  if memory is not None:
    _log(f'train step memory per device: arguments {memory.argument_size_in_bytes / 2**20:.1f} MiB, outputs '
         f'{memory.output_size_in_bytes / 2**20:.1f} MiB, temporaries {memory.temp_size_in_bytes / 2**20:.1f} MiB')

  # ---------------------------------------------------------------------------------------------------------------
  # The loop. Metrics of step s are fetched while step s + 1 runs, so the host never waits on the device.
  writer = metrics_lib.Writer(workdir, start_step, enabled=process_index == 0)
  if config.get('peak_tflops', 0.0):
    peak, peak_source = config.peak_tflops * 1e12, 'config.peak_tflops'
  else:
    peak, peak_source = metrics_lib.device_peak_flops()
  _log(f'MFU against {peak / 1e12:.4g} TFLOP/s per device ({peak_source})')
  # MFU counts the work the step does: towers that do not train cost their forward pass (and the backward through
  # them only when a tower upstream trains).
  train_flops = flops.count(config.model, optimizer.frozen_towers(config))['train']['total']
  throughput = metrics_lib.Throughput(train_flops, jax.device_count(), peak)
  preempted = {'signal': None}
  previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: preempted.update(signal=signum))
  history: dict[str, clu_metrics.Average] = {}  # per-step scalars averaged over each logging interval
  last_eval: dict[str, float] = {}
  pending: Optional[tuple[int, Any]] = None
  saved_step = start_step  # the newest checkpoint of this run, or 0 for none
  data_state = None
  started = time.perf_counter()

  # A run of several processes stops for unreadable data on the count of whole global batches (every process at
  # the same step); one process alone applies the budget in its data iterator.
  skip_budget = pipeline.GlobalSkipBudget.from_config(config.data) if process_count > 1 else None

  def settle(pending) -> None:
    """Fetches a finished step's metrics, stops on a non-finite loss, logs every log_every_steps."""
    step, device_metrics = pending
    scalars = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    throughput.add(config.batch_size)
    if not metrics_lib.finite(scalars):
      terms = ', '.join(f'{k}={v}' for k, v in scalars.items() if k.startswith('train/loss'))
      raise NonFiniteLossError(f'non-finite loss at step {step}: {terms}. The last checkpoint (step '
                               f'{mngr.latest_step()}) is intact; lower config.lr or check the data.')
    if skip_budget is not None:
      skip_budget.add(int(scalars['data/skipped_examples']), config.batch_size, train_iter.skip_report)
    for key, value in scalars.items():
      average = clu_metrics.Average.from_model_output(jnp.asarray(value))
      history[key] = history[key].merge(average) if key in history else average
    if step % config.log_every_steps == 0 or step == config.total_steps:
      logged = {k: float(v.compute()) for k, v in history.items()}
      history.clear()
      logged.update(throughput.report())
      writer.write(step, logged)
      elapsed = time.perf_counter() - started
      eta = elapsed / max(step - start_step, 1) * (config.total_steps - step)
      _log(f'step {step}/{config.total_steps}: loss {logged["train/loss"]:.4f} (text '
           f'{logged.get("train/loss_text", 0):.4f}), {logged["perf/examples_per_sec"]:.1f} examples/s, '
           f'{logged["perf/tflops_per_device"]:.4f} TFLOP/s/device, MFU {100 * logged["perf/mfu"]:.1f}%, '
           f'ETA {eta:.0f}s')

  try:
    for step in range(start_step + 1, config.total_steps + 1):
      try:
        host_batch = next(train_iter)
      except Exception as error:
        if preempted['signal'] is None:
          raise
        # The signal reached the data workers too (a whole process group signalled, a worker killed beside the
        # trainer): save the last completed step with the iterator state from before this batch, so that a resumed
        # run reads this batch again and goes on exactly as an uninterrupted one.
        if pending is not None:
          settle(pending)
          pending = None
        if step - 1 != saved_step:
          checkpoint.save(mngr, step - 1, state, data_state, config)
        _log(f'step {step - 1}: signal {preempted["signal"]} received; '
             f'{"checkpoint saved" if step > 1 else "nothing to save"}, stopping (the data pipeline failed with it: '
             f'{type(error).__name__}: {error})')
        break
      data_state = checkpoint.IteratorSnapshot(train_iter)  # after this step's batch: where a resume reads on
      skipped = int(host_batch['skipped'].sum())
      if skipped:
        logging.warning('step %d: %d examples of this process\'s batch could not be read (see the warnings above; '
                        'data/skipped_examples in metrics.jsonl averages them per step)', step, skipped)
      batch = pipeline.to_global(pipeline.model_inputs(host_batch), batch_sharding)
      state, step_metrics = compiled_step(state, batch)
      if pending is not None:
        settle(pending)
      pending = (step, step_metrics)
      save_now = step % config.checkpoint_every_steps == 0 or step == config.total_steps
      if save_now or preempted['signal'] is not None:
        settle(pending)  # never checkpoint a state whose loss was not finite
        pending = None
        checkpoint.save(mngr, step, state, data_state, config)  # the iterator's state after this step's batch
        saved_step = step
      if preempted['signal'] is not None:
        _log(f'step {step}: signal {preempted["signal"]} received; checkpoint saved, stopping')
        break
      due = [e for e in active.values() if e.due(step, config.total_steps)]
      if due:
        if pending is not None:
          settle(pending)
          pending = None
        result = evaluate(due, step)
        writer.write(step, result)
        last_eval.update(result)
    if pending is not None:
      settle(pending)
    if not last_eval and active and start_step >= config.total_steps:
      last_eval = evaluate(active.values(), start_step)  # a finished run started again: report its result
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    signal.signal(signal.SIGTERM, previous_handler)
  return last_eval
