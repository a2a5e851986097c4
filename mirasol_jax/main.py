"""Command line of mirasol_jax (also installed as `mirasol`).

  python -m mirasol_jax.main train     --config=configs/demo.py --workdir=DIR
  python -m mirasol_jax.main eval      --config=configs/demo.py --workdir=DIR [--step=N] [--config.data.path=...]
  python -m mirasol_jax.main params    --config=configs/pretrain.py:size=3b
  python -m mirasol_jax.main forward   --config=configs/demo.py --workdir=DIR
  python -m mirasol_jax.main forward   --config=configs/pretrain.py:size=small [--batch_size=2]
  python -m mirasol_jax.main tokenizer --config=configs/demo.py --workdir=DIR
  python -m mirasol_jax.main convert   --config=... --format=array_record|tfds|resampled --output=DIR [--num_shards=4]
                                       [--video_codec=h264|raw] [--frames_per_segment=1]
  python -m mirasol_jax.main probe     --config=configs/demo.py --workdir=DIR [--probe_examples=N] [--probe_init]
  python -m mirasol_jax.main answer    --workdir=DIR --video=FILE [--start=S --end=E] [--question=TEXT] [--stream]
  python -m mirasol_jax.main tables    WORKDIR [WORKDIR ...]

`train` trains (resuming from the workdir's checkpoint) and runs the evaluators of config.evals when they are due;
`eval` runs every evaluator on the parameters of a checkpoint (evaluators/base.py), on the config's data or any
other (`--config.data.path`), and appends the metrics to the workdir's metrics.jsonl. `tables` prints the results of
runs beside the paper's (mirasol_jax/paper.py). `params` prints the parameter count per tower from `jax.eval_shape`
(no memory is allocated) and the analytic training FLOPs per example. `forward` builds the model and runs, on the
first validation batch of config.data (the embedded dataset for configs/demo.py; a random batch when the config
names no data), a training-mode forward pass, greedy decoding with the KV cache, and the chunk-by-chunk path, and
prints what each gives. `tokenizer` trains a SentencePiece model (config.model.vocab_size pieces, byte fallback) on
the text of the training split and writes it to config.data.tokenizer, or to WORKDIR/tokenizer.model when that is
empty. `convert` writes every split of the dataset folder as ArrayRecord shards or as a TFDS dataset, media bytes
inside, or (`--format=resampled`) as a dataset folder whose media hold each clip at the frame size and frame rate
training reads (data/resample.py). `probe` fits linear probes from the output of each audio-video tower of the workdir's latest checkpoint to
the answers (evaluators/probe.py). `answer` answers a question about any media file (captions it without
--question) with the workdir's run (its config.json, tokenizer and newest checkpoint), decoded and prompted as
evaluation decodes a record, and prints the answer and its log-probability; with --stream it reads the file chunk by
chunk as if it were playing and prints after each chunk the answer given what has been seen so far, the time
decoding the chunk took and the model's time (answer.py). Any
config field can be overridden: `--config.model.combiner=qformer`, `--config.data.path=DIR`.
"""
from __future__ import annotations

import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, optionally with :arg.', lock_config=True)
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 2, '`forward`: examples in the random batch.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder of the run: config, checkpoints, metrics, tokenizer.')
_FORMAT = flags.DEFINE_enum('format', 'array_record', ['array_record', 'tfds', 'resampled'],
                            '`convert`: output format; resampled: a dataset folder of the clips at the frame size and '
                            'frame rate training reads (mirasol_jax/data/resample.py).')
_VIDEO_CODEC = flags.DEFINE_enum('video_codec', 'h264', ['h264', 'raw'], '`convert --format=resampled`: frames as '
                                 'H.264 (small) or decoded (raw: the fastest to read, 180 KB a frame of 460x258).')
_FRAMES_PER_SEGMENT = flags.DEFINE_integer('frames_per_segment', 1, '`convert --format=resampled`: frames stored per '
                                           'sampled segment (odd); more keep a finer training jitter.')
_OUTPUT = flags.DEFINE_string('output', None, '`convert`: output folder.')
_NUM_SHARDS = flags.DEFINE_integer('num_shards', 4, '`convert`: ArrayRecord shards per split.')
_STEP = flags.DEFINE_integer('step', None, '`eval`, `answer`: the checkpoint step to use (default the latest).')
_PROBE_EXAMPLES = flags.DEFINE_integer('probe_examples', None, '`probe`: fit on the first N examples of the training '
                                       'split (default all).', lower_bound=2)
_PROBE_INIT = flags.DEFINE_bool('probe_init', False, '`probe`: a workdir without checkpoint is probed at the random '
                                'initialisation a run of the config starts from.')
_VIDEO = flags.DEFINE_string('video', None, '`answer`: the media file (any format PyAV reads).')
_START = flags.DEFINE_float('start', None, '`answer`: where the clip starts in the file, in seconds (default 0).')
_END = flags.DEFINE_float('end', None, '`answer`: where the clip ends, in seconds (default the end of the file).')
_QUESTION = flags.DEFINE_string('question', None, '`answer`: the question; without it the clip is captioned, if the '
                                'run trained a captioning task.')
_STREAM = flags.DEFINE_bool('stream', False, '`answer`: read the clip from the file chunk by chunk as if it were '
                            'playing and answer after each chunk.')
_BEAM = flags.DEFINE_integer('beam', None, '`answer`: beam size (1: greedy; default the run\'s evaluator\'s).')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', None, '`answer`: tokens to generate at most (default the '
                                       'run\'s evaluator\'s).')
_TASK = flags.DEFINE_string('task', None, '`answer`: the task of config.data.tasks whose prompt to use (default the '
                            'first that reads a question, or without --question the first that captions).')

_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for several processes '
                                   '(or $JAX_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run (or $JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (or $JAX_PROCESS_ID).')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'Join the cluster jax.distributed finds on its own, without '
                                 'other signs of one: a Cloud TPU VM pod slice, whose workers learn of each other '
                                 'from the VM metadata (launch/tpu_pod.sh sets it).')

COMMANDS = ('train', 'eval', 'params', 'forward', 'tokenizer', 'convert', 'probe', 'answer', 'tables')


def initialize_distributed() -> None:
  """jax.distributed from flags or the usual environment variables, or found by JAX on a SLURM job or TPU pod of
  several processes; nothing to do for one process."""
  import os
  import jax

  address = _COORDINATOR.value or os.environ.get('JAX_COORDINATOR_ADDRESS')
  count = _NUM_PROCESSES.value or int(os.environ.get('JAX_NUM_PROCESSES', 0) or 0)
  if not address or count <= 1:
    slurm_tasks = int(os.environ.get('SLURM_NTASKS', 1) or 1)
    tpu_hosts = len([h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h])
    if slurm_tasks > 1 or tpu_hosts > 1 or _DISTRIBUTED.value:
      jax.distributed.initialize()  # JAX reads the cluster's environment (or a TPU VM's metadata)
    return
  process_id = _PROCESS_ID.value if _PROCESS_ID.value is not None else int(os.environ['JAX_PROCESS_ID'])
  # Collectives between CPU processes (tests, CPU clusters); accelerators use their own. Must precede any backend.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=process_id)


def _format_count(n: float) -> str:
  for unit, scale in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if n >= scale:
      return f'{n / scale:.2f}{unit}'
  return f'{n:.0f}'


def param_table(config) -> str:
  """Parameters per tower (from jax.eval_shape, no memory) and analytic training FLOPs per example."""
  import jax
  from mirasol_jax import flops
  from mirasol_jax import optimizer
  from mirasol_jax.models import mirasol

  model = mirasol.Model(**config.model)
  batch = mirasol.example_batch(config, 1)
  shapes = jax.eval_shape(model.init, jax.random.key(0), batch)
  counts = mirasol.count_params_per_tower(shapes['params'])
  train_flops = flops.count(config.model, optimizer.frozen_towers(config))['train']
  av_total = sum(counts[t] for t in mirasol.AV_TOWERS)
  rows = [f'{"tower":<16}{"params":>12}{"share":>8}{"train GFLOP/ex":>16}']
  for tower, n in counts.items():
    if tower == 'total':
      continue
    rows.append(f'{tower:<16}{_format_count(n):>12}{100 * n / counts["total"]:>7.1f}%'
                f'{train_flops[tower] / 1e9:>16.2f}')
  rows.append('-' * 52)
  rows.append(f'{"audio-video":<16}{_format_count(av_total):>12}{100 * av_total / counts["total"]:>7.1f}%')
  rows.append(f'{"total":<16}{_format_count(counts["total"]):>12}{"100.0%":>8}'
              f'{train_flops["total"] / 1e9:>16.2f}')
  rows.append(f'total parameters: {counts["total"]:,}')
  return '\n'.join(rows)


def _random_batch(config, batch_size: int):
  import numpy as np
  from mirasol_jax.models import mirasol

  rng = np.random.default_rng(config.seed)
  batch = mirasol.example_batch(config, batch_size)
  batch['video'] = rng.integers(0, 256, batch['video'].shape, dtype=np.uint8)
  batch['audio'] = rng.normal(-40.0, 20.0, batch['audio'].shape).astype(np.float32)
  length = batch['text_tokens'].shape[1]
  batch['text_tokens'] = rng.integers(3, config.model.vocab_size, batch['text_tokens'].shape, dtype=np.int32)
  batch['text_loss_mask'][:, length // 2:] = True
  return batch


def _data_batch(config, workdir):
  """The first evaluation batch of config.data, training the run's tokenizer first if there is none."""
  from mirasol_jax import train
  from mirasol_jax.data import pipeline

  if not config.data.tokenizer:
    if not workdir:
      raise app.UsageError('set --config.data.tokenizer=PATH or --workdir=DIR for the tokenizer to write')
    train.ensure_tokenizer(config, workdir)
  start = time.perf_counter()
  batch = next(pipeline.build(config, config.data.eval_split, train=False))
  print(f'first {config.data.eval_split} batch of {config.data.source} data: {time.perf_counter() - start:.1f}s')
  return pipeline.model_inputs(batch), pipeline.load_tokenizer(config.data, config.model)


def forward(config, batch_size: int, workdir) -> None:
  """Builds the model and runs it on real data (config.data) or, without data, on a random batch."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mirasol_jax import decoding
  from mirasol_jax.data import tokenizer as tokenizer_lib
  from mirasol_jax.models import mirasol

  model = mirasol.Model(**config.model)
  if config.data.source in ('demo', 'demo_unlabelled') or config.data.path:
    batch, processor = _data_batch(config, workdir)
  else:
    batch, processor = _random_batch(config, batch_size), None

  start = time.perf_counter()
  variables = jax.jit(model.init)(jax.random.key(config.seed), batch)
  params = {'params': variables['params']}
  print(f'init: {time.perf_counter() - start:.1f}s')
  apply = jax.jit(lambda p, b, r: model.apply(p, b, train=True, rngs={'dropout': r}))
  jax.block_until_ready(apply(params, batch, jax.random.key(1)))
  start = time.perf_counter()
  out = jax.block_until_ready(apply(params, batch, jax.random.key(2)))
  examples = len(batch['example_mask'])
  print(f'forward (train mode, compiled): {1e3 * (time.perf_counter() - start):.1f} ms for {examples} examples')
  for key in ('text_logits', 'av_latents'):
    print(f'  {key}: {out[key].shape} {out[key].dtype}')
  print('  losses: ' + ', '.join(f'{k}={float(v):.4f}' for k, v in out['losses'].items()))
  new_tokens = max(1, min(8, batch['text_tokens'].shape[1] // 2))
  tokens = jax.jit(lambda p, b: decoding.greedy_decode(model, p, b, new_tokens, tokenizer_lib.EOS_ID))(
      params, batch)
  if processor is None:
    print(f'greedy decoding (KV cache), first example: {np.asarray(tokens[0]).tolist()}')
  else:
    prompt_len = np.asarray(decoding.prompt_lengths(batch['text_loss_mask']))
    print('greedy decoding (KV cache) with the untrained model:')
    for i in range(min(3, examples)):
      question = tokenizer_lib.decode(processor, batch['text_tokens'][i, :prompt_len[i]])
      answer = tokenizer_lib.decode(processor, batch['text_tokens'][i, prompt_len[i]:])
      print(f'  Q: {question!r}  A: {answer!r}  model: {tokenizer_lib.decode(processor, tokens[i])!r}')
  full = jax.jit(lambda p, b: model.apply(p, b)['av_latents'])(params, batch)
  streamed = jax.jit(lambda p, b: decoding.stream_latents(model, p, b))(params, batch)
  err = float(jnp.max(jnp.abs(full.astype(jnp.float32) - streamed.astype(jnp.float32))))
  print(f'chunk-by-chunk latents vs full pass: max |diff| = {err:.2e} ({config.model.dtype})')


def summarize(config, workdir: str, result, seconds: float) -> None:
  """Process 0 prints each evaluator's figures: for question answering the accuracy beside the majority-answer
  baselines, the grounding table (accuracy per group with the clip as it is, shuffled, without audio, without
  video) and a few answered questions; for captioning CIDEr-D, BLEU-4, ROUGE-L and a few captions; for multiple
  choice and classification the accuracies per group; and the last update ratio of each tower."""
  import jax
  import textwrap
  from mirasol_jax.data import sources
  from mirasol_jax.data import tasks
  from mirasol_jax.evaluators import grounding
  from mirasol_jax.evaluators import vqa

  if jax.process_index() != 0:
    return
  print(f'\nresults after {seconds / 60:.1f} min')
  for name, cfg in (config.get('evals') or {}).items():
    prefix = f'eval/{name}/'
    metrics = {k[len(prefix):]: v for k, v in result.items() if k.startswith(prefix)}
    if not metrics:
      continue
    data = tasks.task_data(config.data, cfg.task)
    split = cfg.split or data.eval_split
    where = f'{name} ({cfg.type}, {split}, {int(metrics.get("examples", 0))} examples'
    where += f', {int(metrics["skipped"])} unreadable)' if metrics.get('skipped') else ')'
    if cfg.type == 'vqa':
      train_records = _records(sources.open_source(data, data.train_split))
      eval_records = _records(sources.open_source(data, split))
      answers = lambda records: [tasks.target(r, data.target) or '' for r in records]
      groups = (lambda records: [r.get(cfg.group_by) for r in records]) if cfg.group_by else (lambda records: None)
      baseline = vqa.majority_baseline(answers(train_records), answers(eval_records), groups(train_records),
                                       groups(eval_records))
      print(f'{where}: accuracy {100 * metrics["accuracy"]:.1f}%; majority-answer baseline (always '
            f'"{baseline["answer"]}") {100 * baseline["accuracy"]:.1f}%' +
            (f', majority answer per {cfg.group_by} {100 * baseline["per_group"]:.1f}%' if 'per_group' in baseline
             else ''))
      for line in grounding.table(result, name):
        print(line)
      for p in _last_predictions(workdir, name)[:6]:
        mark = 'right' if vqa.exact_match(p['prediction'], p['answer']) else 'wrong'
        print(f'  {p["question"]!r} -> {p["prediction"]!r} ({mark}; answer {p["answer"]!r})')
    elif cfg.type == 'caption':
      print(f'{where}: CIDEr-D {metrics.get("cider", 0):.3f}, BLEU-4 {metrics.get("bleu4", 0):.3f}, ROUGE-L '
            f'{metrics.get("rouge_l", 0):.3f}')
      for p in _last_predictions(workdir, name)[:4]:
        print(f'  {p["prediction"]!r} (reference {p["references"][0]!r})')
    else:
      main = [k for k in metrics if k in ('accuracy', 'top1', 'top5', 'mean_ap', 'loss')]
      groups = sorted(k for k in metrics if '/' in k and k.split('/')[0] in ('accuracy', 'top1'))
      print(f'{where}: ' + ', '.join(f'{k} {100 * metrics[k]:.1f}%' if k != 'loss' else f'loss {metrics[k]:.4f}'
                                     for k in main) +
            (' (' + ', '.join(f'{k.split("/", 1)[1]} {100 * metrics[k]:.1f}%' for k in groups) + ')' if groups
             else ''))
  step, ratios = _last_update_ratios(workdir)
  if ratios:
    text = ' '.join(f'{tower}={ratio:.1e}' if ratio else f'{tower}=0' for tower, ratio in ratios.items())
    print(textwrap.fill(f'update / parameter norm per step (train/update_ratio, step {step}): {text}', width=100,
                        initial_indent='  ', subsequent_indent='    '))


def _last_predictions(workdir: str, name: str) -> list[dict]:
  """The predictions file of evaluator `name` of the latest step."""
  import json
  import re
  from mirasol_jax import paths

  steps = [int(m.group(1)) for f in paths.listdir(paths.join(workdir, 'predictions'))
           if (m := re.fullmatch(re.escape(name) + r'_(\d+)\.jsonl', f))]
  if not steps:
    return []
  text = paths.read_text(paths.join(workdir, 'predictions', f'{name}_{max(steps)}.jsonl'))
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def _records(source) -> list:
  return [source[i] for i in range(len(source))]


def _last_update_ratios(workdir: str) -> tuple[int, dict[str, float]]:
  """The step and the train/update_ratio/<tower> values (in mirasol.TOWERS order) of the last line of
  metrics.jsonl that has them."""
  from mirasol_jax import paper
  from mirasol_jax.models import mirasol

  for scalars in reversed(paper.read_metrics(workdir)):
    ratios = {tower: scalars[f'train/update_ratio/{tower}'] for tower in mirasol.TOWERS
              if isinstance(scalars.get(f'train/update_ratio/{tower}'), (int, float))}
    if ratios and isinstance(scalars.get('step'), int):
      return scalars['step'], ratios
  return 0, {}


def _probe_params(config, model, workdir: str, from_init: bool):
  """The parameters to probe, their step and where they come from: the workdir's newest checkpoint that reads, else
  what a run of the config starts from (config.init_from over the random initialisation, or with --probe_init the
  random initialisation alone: the same values as the trainer's, from config.seed)."""
  import flax.linen as nn
  import jax
  from mirasol_jax import checkpoint
  from mirasol_jax import train
  from mirasol_jax.models import mirasol

  steps = checkpoint.saved_steps(checkpoint.checkpoints_folder(workdir))
  if steps:
    if from_init:
      raise app.UsageError(f'--probe_init probes a workdir without checkpoint; {workdir} holds step {steps[-1]}')
    step, params = checkpoint.params_at(workdir)  # the newest that reads, past damaged newer ones
    return params, step, f'{workdir}/checkpoints/{step}'
  sources = train.init_sources(config)  # init_from and pretrained towers
  if not (sources or from_init):
    raise app.UsageError(f'{workdir} holds no checkpoint to probe (--probe_init probes the random initialisation)')
  batch = mirasol.example_batch(config, 1)
  params = nn.unbox(jax.jit(lambda rng: train.init_params(model, rng, batch)[0])(jax.random.PRNGKey(config.seed)))
  if not sources:
    return params, 0, f'the random initialisation (seed {config.seed})'
  params, names = train.load_init_from(config, params)
  return params, 0, f'{len(names)} parameter arrays of {", ".join(sources)} over the random initialisation'


def probe(config, workdir: str, max_examples, from_init: bool) -> dict:
  """Linear probes of each representation (evaluators/probe.py) of the workdir's parameters: features of the first
  `max_examples` training examples (all by default) and of every evaluation example, decoded as in evaluation
  (centre crop, middle of each segment) in one ordered pass; one probe per representation and value of
  the evaluator's group_by. Prints the table, writes WORKDIR/probe.json and appends the accuracies to metrics.jsonl at
  the checkpoint's step (0 for an initialisation). Returns run's result."""
  import functools
  import json
  from mirasol_jax import paths
  import jax
  from mirasol_jax import metrics
  from mirasol_jax import train
  from mirasol_jax.data import pipeline
  from mirasol_jax.data import sources
  from mirasol_jax.data import tokenizer
  from mirasol_jax.evaluators import probe as probe_lib
  from mirasol_jax.models import mirasol

  paths.makedirs(workdir)
  model = mirasol.Model(**config.model)
  params, step, origin = _probe_params(config, model, workdir, from_init)
  print(f'probing {origin} (step {step})')
  train.ensure_tokenizer(config, workdir)  # the pipeline tokenises the text even though the probes do not read it
  encode = jax.jit(functools.partial(probe_lib.representations, model))
  group_by = next((e.group_by for e in (config.get('evals') or {}).values() if e.get('group_by')), '')
  splits = {}
  for split, limit in ((config.data.train_split, max_examples), (config.data.eval_split, None)):
    start = time.perf_counter()
    features, indices = probe_lib.extract(encode, params, pipeline.build(config, split, train=False), limit)
    source = sources.open_source(config.data, split)
    records = [source[int(i)] for i in indices]
    splits[split] = (features, [tokenizer.target_text(r) or '' for r in records],
                     [r.get(group_by) if group_by else None for r in records])
    print(f'{split}: features of {len(records)} examples in {time.perf_counter() - start:.1f}s')
  start = time.perf_counter()
  result = probe_lib.run(*splits[config.data.train_split], *splits[config.data.eval_split])
  print(f'probes fitted in {time.perf_counter() - start:.1f}s')
  for line in probe_lib.table(result, config.data.eval_split):
    print(line)
  paths.write_text(paths.join(workdir, 'probe.json'), json.dumps(
      {'step': step, 'params': origin, 'train_split': config.data.train_split, 'eval_split': config.data.eval_split,
       'group_by': group_by, **result}, indent=1))
  metrics.append(workdir, step, result['metrics'])
  return result


def train_tokenizer(config, workdir) -> str:
  """Trains the run's tokenizer on the training split's text; returns its path."""
  from mirasol_jax import paths
  from mirasol_jax.data import sources
  from mirasol_jax.data import tokenizer

  path = config.data.tokenizer or (paths.join(workdir, 'tokenizer.model') if workdir else None)
  if not path:
    raise app.UsageError('set --config.data.tokenizer=PATH or --workdir=DIR for the tokenizer to write')
  source = sources.open_source(config.data, config.data.train_split)
  count = tokenizer.train_on_source(source, config.model.vocab_size, path, config.data.tokenizer_type)
  print(f'tokenizer: {tokenizer.load(path).vocab_size()} pieces from {count} texts of {source!r} -> {path}')
  return path


def convert(config, output: str, output_format: str, num_shards: int) -> None:
  """Writes every split of the dataset folder into `output`, replacing an earlier conversion there (its stale
  shards would otherwise be read beside the new ones). Media outside the dataset folder (unless
  config.data.allow_outside_media), files that are not regular files and files over config.data.max_media_bytes
  are not embedded: their records keep the error, and the pipeline skips them."""
  import os
  from mirasol_jax.data import sources
  from mirasol_jax.data import tfds_source

  if output_format == 'resampled':
    from mirasol_jax.data import resample
    resample.convert(config, output, frames_per_segment=_FRAMES_PER_SEGMENT.value, video_codec=_VIDEO_CODEC.value)
    return
  folder = sources.dataset_folder(config.data)
  media_root = config.data.get('media_root') or None
  allow_outside = bool(config.data.get('allow_outside_media', False))
  max_bytes = int(config.data.get('max_media_bytes', 0))
  if output_format == 'tfds':
    path = tfds_source.prepare(folder, output, media_root, allow_outside, max_bytes, overwrite=True)
    print(f'tfds dataset of {folder} -> {path}')
    return
  for split in tfds_source.SPLITS:
    if os.path.exists(os.path.join(folder, f'{split}.jsonl')):
      paths = sources.write_array_record(folder, output, split, num_shards, media_root, allow_outside, max_bytes)
      print(f'{split}: {len(paths)} ArrayRecord shards in {output}')


def main(argv):
  from absl import logging
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax and grain are chatty at INFO; --verbosity=0 brings them back
  if len(argv) >= 2 and argv[1] == 'tables':
    from mirasol_jax import paper
    if len(argv) < 3:
      raise app.UsageError('usage: python -m mirasol_jax.main tables WORKDIR [WORKDIR ...]')
    print(paper.markdown(paper.results(argv[2:])))
    return
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f'usage: python -m mirasol_jax.main {{{"|".join(COMMANDS)}}} --config=FILE[:ARG]; got '
                         f'{" ".join(argv[1:]) or "no command"}')
  if argv[1] == 'answer':  # the run's config.json unless --config names another
    if not _WORKDIR.value or not _VIDEO.value:
      raise app.UsageError('answer needs --workdir=DIR and --video=FILE')
    from mirasol_jax import answer
    try:
      answer.run(_WORKDIR.value, _VIDEO.value, _QUESTION.value, _START.value, _END.value, _STREAM.value, _STEP.value,
                 _BEAM.value, _MAX_NEW_TOKENS.value, _TASK.value, _CONFIG.value)
    except answer.AnswerError as e:
      raise SystemExit(f'answer: {e}') from None
    return
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/pretrain.py:size=tiny')
  if argv[1] in ('train', 'eval'):
    if not _WORKDIR.value:
      raise app.UsageError(f'{argv[1]} needs --workdir=DIR')
    initialize_distributed()
    from mirasol_jax import train
    start = time.perf_counter()
    if argv[1] == 'eval':
      result = train.evaluate(config, _WORKDIR.value, _STEP.value)
    else:
      result = train.train_and_evaluate(config, _WORKDIR.value)
    if result:
      summarize(config, _WORKDIR.value, result, time.perf_counter() - start)
  elif argv[1] == 'params':
    print(param_table(config))
  elif argv[1] == 'forward':
    print(param_table(config))
    forward(config, _BATCH_SIZE.value, _WORKDIR.value)
  elif argv[1] == 'tokenizer':
    train_tokenizer(config, _WORKDIR.value)
  elif argv[1] == 'convert':
    if not _OUTPUT.value:
      raise app.UsageError('convert needs --output=DIR')
    convert(config, _OUTPUT.value, _FORMAT.value, _NUM_SHARDS.value)
  elif argv[1] == 'probe':
    if not _WORKDIR.value:
      raise app.UsageError('probe needs --workdir=DIR')
    probe(config, _WORKDIR.value, _PROBE_EXAMPLES.value, _PROBE_INIT.value)


HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'


def huge_pages_environment(environ: dict[str, str], libc: tuple[str, str], thp_setting: str):
  """The environment to restart with so that glibc's malloc backs large allocations with transparent huge pages, or
  None when there is nothing to do.

  XLA:CPU allocates a step's buffers afresh every step; with 4 KiB pages a CPU training step of about 100M
  parameters takes 330,000 page faults (the PyTorch peer of benchmarks/peer_pytorch.py 150,000), with huge pages
  about 2,000, and the step 11 to 20% less time (benchmarks/peer_pytorch.py). glibc reads the tunable only when a process starts (2.35 and later), so
  `run` restarts once with it. Nothing is done where transparent huge pages are off (`thp_setting`, the bracketed
  word of /sys/kernel/mm/transparent_hugepage/enabled), with another libc, when GLIBC_TUNABLES already names
  hugetlb, or when MIRASOL_HUGE_PAGES=0.
  """
  name, version = libc
  if environ.get('MIRASOL_HUGE_PAGES', '1') == '0' or name != 'glibc' or thp_setting not in ('always', 'madvise'):
    return None
  try:
    if tuple(int(x) for x in version.split('.')[:2]) < (2, 35):
      return None
  except ValueError:
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.hugetlb' in tunables:
    return None
  return {**environ, 'GLIBC_TUNABLES': f'{tunables}:{HUGE_PAGES_TUNABLE}' if tunables else HUGE_PAGES_TUNABLE}


def host_huge_pages_environment(environ: dict[str, str] | None = None):
  """`environ` (default this process's environment) with huge pages for malloc added (huge_pages_environment),
  where this host has them and they are not set yet; else None."""
  import os
  import platform
  if sys.platform != 'linux':
    return None
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      thp = f.read().split('[', 1)[1].split(']', 1)[0]
  except (OSError, IndexError):
    return None
  return huge_pages_environment(dict(os.environ if environ is None else environ), platform.libc_ver(), thp)


def _restart_with_huge_pages() -> None:
  import os
  environ = host_huge_pages_environment()
  if environ is not None:
    try:
      os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], environ)
    except OSError:
      pass  # run on without: huge pages only make it faster


def run():
  """Entry point of `python -m mirasol_jax.main` and of the console script `mirasol`: on Linux, first restarts once
  with huge pages for malloc (huge_pages_environment)."""
  _restart_with_huge_pages()
  app.run(main, argv=sys.argv)


if __name__ == '__main__':
  run()
