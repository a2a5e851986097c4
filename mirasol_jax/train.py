"""The trainer: from a config and a workdir to a trained, evaluated, checkpointed Mirasol model.

One linear file, read top to bottom: processes and mesh -> tokenizer and data -> shapes and sharded init ->
restore (this workdir's checkpoint, else config.init_from, else scratch) -> compiled steps -> evaluation -> the loop.
The same code runs the CPU demo and a multi-host pod: only config.mesh, config.axis_rules and the process flags
change.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics as clu_metrics
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from mirasol_jax import checkpoint
from mirasol_jax import decoding
from mirasol_jax import flops
from mirasol_jax import metrics as metrics_lib
from mirasol_jax import optimizer
from mirasol_jax import sharding
from mirasol_jax.data import pipeline
from mirasol_jax.data import sources
from mirasol_jax.data import tokenizer as tokenizer_lib
from mirasol_jax.evaluators import grounding
from mirasol_jax.evaluators import vqa
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
  """config.data.tokenizer, or WORKDIR/tokenizer.model trained by process 0 from the training split.

  With config.data.require_target False (pretraining on video with sound), a training split without any text gets
  no tokenizer and config.data.tokenizer stays empty.
  """
  if config.data.tokenizer:
    return
  path = os.path.join(workdir, 'tokenizer.model')
  if jax.process_index() == 0 and not os.path.exists(path):
    source = sources.open_source(config.data, config.data.train_split)
    try:
      tokenizer_lib.train_on_source(source, config.model.vocab_size, path, config.data.get('tokenizer_type', 'bpe'))
    except tokenizer_lib.NoTextError:
      if config.data.get('require_target', True):
        raise
      _log(f'{source!r} holds no text: no tokenizer, and no text loss')
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('tokenizer')
  if os.path.exists(path):
    with config.unlocked():
      config.data.tokenizer = path


def init_params(model: mirasol.Model, rng: jax.Array, batch) -> tuple[Any, jax.Array]:
  """The random initialisation of a run whose rng is `rng` (jax.random.PRNGKey(config.seed)): its parameters
  (boxed with their logical axes) and the rng the training steps go on with."""
  params_rng, train_rng = jax.random.split(rng)
  return model.init({'params': params_rng, 'dropout': params_rng}, batch)['params'], train_rng


def load_init_from(config, params):
  """`params` with the arrays of config.init_from's latest checkpoint whose paths match config.init_from_regex;
  returns them and the names loaded."""
  return checkpoint.load_params(config.init_from, params, config.get('init_from_regex', '.*'))


def _split_microbatches(batch, count: int):
  return jax.tree.map(lambda x: x.reshape(count, x.shape[0] // count, *x.shape[1:]), batch)


def train_and_evaluate(config, workdir: str, evaluate_only: bool = False) -> dict[str, float]:
  """Trains config.total_steps steps (resuming from workdir if it holds a checkpoint); returns the last eval.

  With evaluate_only, evaluates the workdir's latest checkpoint (or config.init_from) and returns.
  """
  # ---------------------------------------------------------------------------------------------------------------
  # Processes and mesh.
  os.makedirs(workdir, exist_ok=True)
  process_index, process_count = jax.process_index(), jax.process_count()
  check_config(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(rule) for rule in config.axis_rules)
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  _log(f'{process_count} process(es), {jax.device_count()} {jax.devices()[0].platform} device(s), mesh '
       f'{dict(mesh.shape)}')

  # ---------------------------------------------------------------------------------------------------------------
  # Tokenizer and data.
  ensure_tokenizer(config, workdir)
  if process_index == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=1))
  train_iter = pipeline.build(config, config.data.train_split, process_index, process_count)
  processor = pipeline.load_tokenizer(config.data, config.model) if config.data.tokenizer else None
  if processor is None and config.eval_every_steps > 0:
    raise ValueError(f'config.data ({config.data.source} {config.data.path or ""}) has no text, so there is no '
                     'answer to evaluate: set config.eval_every_steps=0')

  # ---------------------------------------------------------------------------------------------------------------
  # Model, optimizer and the shapes and shardings of the train state.
  model = mirasol.Model(**config.model)
  tx = optimizer.make(config)
  init_batch = mirasol.example_batch(config, 1)

  def init_state(rng):
    params, train_rng = init_params(model, rng, init_batch)
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params), 'rng': train_rng}

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init_state, jax.random.PRNGKey(config.seed))
    state_shardings = jax.tree.map(
        lambda s: replicated if s is None else s,
        sharding.logical_shardings(boxed, mesh, rules), is_leaf=lambda x: x is None)
    abstract = checkpoint.abstract_with_shardings(sharding.box_values(boxed), state_shardings)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract['params']))
  _log(f'model: {num_params:,} parameters')

  # ---------------------------------------------------------------------------------------------------------------
  # Restore: this workdir's latest checkpoint, else a sharded init (with selected parameters of another run).
  mngr = checkpoint.manager(workdir, config.get('keep_checkpoints', 3))
  latest = mngr.latest_step()
  if latest is not None:
    state = checkpoint.restore(mngr, latest, abstract, train_iter)
    _log(f'resumed from {workdir}/checkpoints/{latest}')
  else:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      state = jax.jit(lambda rng: nn.unbox(init_state(rng)), out_shardings=state_shardings)(
          jax.random.PRNGKey(config.seed))
    if config.init_from:
      state['params'], names = load_init_from(config, state['params'])
      _log(f'initialised {len(names)} parameter arrays from {config.init_from}')
  start_step = int(state['step'])

  # ---------------------------------------------------------------------------------------------------------------
  # The compiled train step: donated state, micro-batches accumulated with lax.scan.
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
    grads = optimizer.drop_frozen(grads, config.get('frozen', ''))
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

  # ---------------------------------------------------------------------------------------------------------------
  # Evaluation: validation loss, KV-cached greedy answers, exact-match accuracy, predictions file; with
  # config.eval_diagnostics the same for the grounding variants (evaluators/grounding.py), accuracies per value of
  # config.eval_group_by.
  max_new_tokens = config.get('eval_max_new_tokens', 8)
  variants = ('plain',) + (grounding.VARIANTS if config.get('eval_diagnostics', True) else ())
  group_by = config.get('eval_group_by', '')

  def eval_step(params, batch):
    """-> scalars (losses and statistics, each a mean over the batch's valid examples) and greedy answers
    [B, len(variants), max_new_tokens].

    The variants' examples are interleaved into one batch (B * 2 blanked clips through one encoding, B * 3 varied
    latents through one teacher-forced decoding, B * len(variants) through one greedy decoding), so the variants
    add one encoder and one decoder pass to the compiled step, not one per variant.
    """
    variables = {'params': params}
    out = model.apply(variables, batch)
    scalars = {'loss': out['losses']['total'], 'loss_text': out['losses']['text'], **out['stats']}
    latents = [out['av_latents']]
    if len(variants) > 1:
      blanked = grounding.interleave([grounding.without_audio(batch), grounding.without_video(batch)])
      _, blanked_latents = model.apply(variables, blanked, method=mirasol.Model.encode_av)
      blanked_latents = grounding.deinterleave(blanked_latents, 2)
      latents += [jnp.take(out['av_latents'], grounding.derangement(batch['example_mask']), axis=0),
                  blanked_latents[:, 0], blanked_latents[:, 1]]
      varied = grounding.interleave(latents[1:])
      tokens = grounding.interleave([batch['text_tokens']] * (len(variants) - 1))
      logits = model.apply(variables, tokens, varied.reshape(tokens.shape[0], -1, varied.shape[-1]),
                           method=mirasol.Model.text_logits)
      losses = grounding.text_losses(grounding.deinterleave(logits, len(variants) - 1), batch['text_tokens'],
                                     batch['text_loss_mask'], batch['example_mask'])
      scalars.update({f'{variant}/loss_text': losses[i] for i, variant in enumerate(variants[1:])})
    text = {k: grounding.interleave([batch[k]] * len(variants)) for k in ('text_tokens', 'text_loss_mask')}
    answers = decoding.greedy_decode(model, variables, text, max_new_tokens, tokenizer_lib.EOS_ID,
                                     latents=grounding.interleave(latents))
    return scalars, grounding.deinterleave(answers, len(variants))

  compiled_eval_cache = []

  def compiled_eval(params, batch):
    """Compiled on first use, so that runs that never evaluate never pay for it."""
    if not compiled_eval_cache:
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled_eval_cache.append(jax.jit(
            eval_step, in_shardings=(state_shardings['params'], batch_sharding),
            out_shardings=(replicated, batch_sharding)).lower(abstract['params'], batch_shapes).compile())
    return compiled_eval_cache[0](params, batch)

  eval_source = sources.open_source(config.data, config.data.eval_split)

  def evaluate(params, step: int) -> dict[str, float]:
    start = time.perf_counter()
    sums: dict[str, float] = {}
    rows = []
    for host_batch in pipeline.eval_batches(config, config.data.eval_split, process_index, process_count):
      scalars, answers = compiled_eval(params, pipeline.to_global(pipeline.model_inputs(host_batch), batch_sharding))
      weight = float(multihost_utils.process_allgather(host_batch['example_mask'].sum()).sum())
      for key, value in jax.device_get(scalars).items():
        sums[key] = sums.get(key, 0.0) + float(value) * weight
      local_answers = np.asarray(multihost_utils.global_array_to_host_local_array(answers, mesh, PartitionSpec(
          sharding.BATCH_AXES)))
      rows.append(np.concatenate([host_batch['index'][:, None], local_answers.reshape(len(local_answers), -1)], 1))
    rows = np.concatenate(rows)
    rows = np.asarray(multihost_utils.process_allgather(rows)).reshape(-1, rows.shape[-1])
    rows = rows[rows[:, 0] >= 0]
    count = max(len(rows), 1)
    predictions, correct, groups = [], {variant: [] for variant in variants}, []
    for index, *tokens in sorted(rows.tolist()):
      record = eval_source[index]
      answer = tokenizer_lib.target_text(record) or ''
      texts = {variant: tokenizer_lib.decode(processor, tokens[i * max_new_tokens:(i + 1) * max_new_tokens])
               for i, variant in enumerate(variants)}
      for variant, text in texts.items():
        correct[variant].append(vqa.exact_match(text, answer))
      groups.append(record.get(group_by) if group_by else None)
      prediction = {'id': record.get('id'), 'question': tokenizer_lib.prefix_text(record), 'answer': answer,
                    'prediction': texts['plain']}
      if group_by:
        prediction[group_by] = groups[-1]
      # A shuffled answer is about another example's clip: not kept.
      prediction.update({f'prediction_{v}': texts[v] for v in variants if v not in ('plain', 'shuffled')})
      predictions.append(prediction)
    if group_by and rows.size and all(g is None for g in groups):
      logging.warning('config.eval_group_by=%r: no %s record has that field, so there are no per-group accuracies',
                      group_by, config.data.eval_split)
    name = config.data.eval_split
    result = {f'eval/{name}/{key}': value / count for key, value in sums.items()}
    result.update({f'eval/{name}/{key}': value for key, value in grounding.accuracies(correct, groups).items()})
    result[f'eval/{name}/examples'] = float(len(rows))
    if process_index == 0:
      os.makedirs(os.path.join(workdir, 'predictions'), exist_ok=True)
      with open(os.path.join(workdir, 'predictions', f'{name}_{step}.jsonl'), 'w') as f:
        f.writelines(json.dumps(p) + '\n' for p in predictions)
    grounded = ', '.join(f'{grounding.LABELS[v]} {100 * result[f"eval/{name}/{v}/accuracy"]:.1f}%'
                         for v in variants[1:])
    _log(f'step {step}: eval on {len(rows)} {name} examples in {time.perf_counter() - start:.1f}s: accuracy '
         f'{100 * result[f"eval/{name}/accuracy"]:.1f}%' + (f' ({grounded})' if grounded else '') +
         f', loss {result[f"eval/{name}/loss"]:.4f}')
    return result

  if evaluate_only:
    if latest is None and not config.init_from:
      raise FileNotFoundError(f'{workdir} holds no checkpoint to evaluate')
    result = evaluate(state['params'], start_step)
    mngr.close()
    return result

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled_step = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                            out_shardings=(state_shardings, replicated), donate_argnums=(0,)).lower(
                                abstract, batch_shapes).compile()
  memory = compiled_step.memory_analysis()
  if memory is not None:
    _log(f'train step memory per device: arguments {memory.argument_size_in_bytes / 2**20:.1f} MiB, outputs '
         f'{memory.output_size_in_bytes / 2**20:.1f} MiB, temporaries {memory.temp_size_in_bytes / 2**20:.1f} MiB')

  # ---------------------------------------------------------------------------------------------------------------
  # The loop. Metrics of step s are fetched while step s + 1 runs, so the host never waits on the device.
  writer = metrics_lib.Writer(workdir, start_step, enabled=process_index == 0)
  peak = config.get('peak_tflops', 0.0) * 1e12 or metrics_lib.matmul_peak_flops()
  throughput = metrics_lib.Throughput(flops.count(config.model)['train']['total'], jax.device_count(), peak)
  preempted = {'signal': None}
  previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: preempted.update(signal=signum))
  history: dict[str, clu_metrics.Average] = {}  # per-step scalars averaged over each logging interval
  last_eval: dict[str, float] = {}
  pending: Optional[tuple[int, Any]] = None
  started = time.perf_counter()

  def settle(pending) -> None:
    """Fetches a finished step's metrics, stops on a non-finite loss, logs every log_every_steps."""
    step, device_metrics = pending
    scalars = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    throughput.add(config.batch_size)
    if not metrics_lib.finite(scalars):
      terms = ', '.join(f'{k}={v}' for k, v in scalars.items() if k.startswith('train/loss'))
      raise NonFiniteLossError(f'non-finite loss at step {step}: {terms}. The last checkpoint (step '
                               f'{mngr.latest_step()}) is intact; lower config.lr or check the data.')
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
      host_batch = next(train_iter)
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
        checkpoint.save(mngr, step, state, train_iter, config)
      if preempted['signal'] is not None:
        _log(f'step {step}: signal {preempted["signal"]} received; checkpoint saved, stopping')
        break
      if config.eval_every_steps > 0 and (step % config.eval_every_steps == 0 or step == config.total_steps):
        if pending is not None:
          settle(pending)
          pending = None
        last_eval = evaluate(state['params'], step)
        writer.write(step, last_eval)
    if pending is not None:
      settle(pending)
    if not last_eval and config.eval_every_steps > 0 and start_step >= config.total_steps:
      last_eval = evaluate(state['params'], start_step)  # a finished run started again: report its result
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    signal.signal(signal.SIGTERM, previous_handler)
  return last_eval
