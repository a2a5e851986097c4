"""Answering a question about one media file (or captioning it) with a trained run, whole or chunk by chunk.

  python -m mirasol_jax.main answer --workdir=W --video=FILE [--start=S --end=E] [--question="..."] [--stream]

Where it sits: beside the `vqa` and `caption` evaluators, for one file a user names instead of a dataset's records.
  FILE [start, end] -> pipeline.DecodeExample(train=False) -> video [1, T, k, H, W, 3], audio [1, T, F, M]
  {'question': ...} -> the run's task's prompt template (data/tasks.py) -> BOS prompt, as evaluation tokenises it
  whole clip: Model.encode_av -> AV latents [1, T, m, D] -> greedy_decode (or beam_decode) -> answer
  --stream:   for t = 1..T: Model.stream_step(chunk t, carried state) -> h_t; latents h_1..h_t -> decoder -> answer
The input is what evaluation sees of the same record (centre crop, a frame in the middle of each of N segments,
log-mel per chunk), so the answer is the `eval` command's answer to that record.

The score of an answer is the log-probability the decoder gives its tokens and the EOS that ends it, teacher-forced
over the same latents after generation (one more decoder pass): its mean per token, and its total, whose exponential
is the probability of the whole answer.

Streaming. The clip is decoded once, up front, by the evaluation's code, then fed to the model one chunk at a time
as if it were playing: after chunk t the model has seen chunks 1..t and nothing later. Decoding up front keeps the
input bit-identical to evaluation's; the only information from later in the clip that chunk t carries is the
log-mel's floor (80 dB under the clip's loudest frame) and the half window (12.5 ms) of audio past its end that its
last spectrogram frames overlap. Each chunk costs one encoder pass over that chunk, one Combiner step against the
carried state (the TTM memory) and one AV Transformer step against the KV cache of the earlier chunks
(Model.stream_step): nothing of an earlier chunk is computed again, and block-causal attention makes h_t equal to
the full pass's latents of chunk t. The decoder then cross-attends to exactly the latents h_1..h_t, as it would for
a clip of t chunks: no parameter depends on the number of chunks (the AV Transformer's chunk positions are sin-cos,
the decoder's cross-attention takes any length, and `text.context_norm='tokens'` standardises over the latents it
is given). Masking the later chunks instead would need a context mask the decoder does not have, and its
standardisation would still count them. So the answer after chunk t costs a decoding over t*m latents: it grows
with the latents attended, and the answer after the last chunk is the whole clip's. The model was trained on clips
of T chunks only: its answers from fewer are what it makes of a clip cut short.

Shapes are static: the chunk step is compiled once, the answer once per number of chunks seen, and each is compiled
and run once before the first chunk, so that the per-chunk times printed are those of programs already warm. The
programs are kept for the process (answering another file with the same run compiles nothing).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mirasol_jax import checkpoint
from mirasol_jax import config_lib
from mirasol_jax import decoding
from mirasol_jax import sharding
from mirasol_jax.data import media
from mirasol_jax.data import pipeline
from mirasol_jax.data import tasks as tasks_lib
from mirasol_jax.data import tokenizer as tokenizer_lib
from mirasol_jax.models import mirasol

Array = jax.Array

CAPTION_TARGETS = ('caption', 'captions')
# Decoding settings when the run has no evaluator for the chosen task: those of the vqa and caption evaluators.
DEFAULT_MAX_NEW_TOKENS = {'answer': 8, 'caption': 24}


class AnswerError(Exception):
  """Something the user can fix: a missing file or workdir, a question for a model that only captions, ..."""


# ---------------------------------------------------------------------------------------------------------------
# The run: its config, the task to prompt with, its parameters.


def load_config(workdir: str, override: Optional[ml_collections.ConfigDict] = None) -> ml_collections.ConfigDict:
  """The run's config: `override` (from --config) or WORKDIR/config.json, which the trainer writes.

  A config.json of an older version lacks the data fields added since (decoding limits, say): they take the
  defaults of config_lib.data_config, as a run started now would have them.
  """
  if override is not None:
    config = ml_collections.ConfigDict(override.to_dict())
  else:
    path = os.path.join(workdir, 'config.json')
    if not os.path.exists(path):
      raise AnswerError(f'{workdir} has no config.json (the trainer writes it); pass --config=FILE to name the run\'s '
                        'config')
    try:
      with open(path, encoding='utf-8') as f:
        config = ml_collections.ConfigDict(json.load(f))
    except (OSError, ValueError) as e:
      raise AnswerError(f'{path}: cannot read the run\'s config ({e}); pass --config=FILE to name it') from e
  defaults = config_lib.data_config()
  for key in defaults:
    if key not in config.data:
      config.data[key] = defaults[key]
  # The user names the file: the dataset folder's containment of media does not apply.
  config.data.allow_outside_media = True
  tokenizer = os.path.join(workdir, 'tokenizer.model')
  if os.path.exists(tokenizer):  # the run's own, wherever the workdir has moved since config.json was written
    config.data.tokenizer = tokenizer
  elif not config.data.tokenizer or not os.path.exists(config.data.tokenizer):
    raise AnswerError(f'{workdir} has no tokenizer.model and config.data.tokenizer={config.data.tokenizer!r} does not '
                      'exist: which tokenizer did the model train with?')
  return config


@dataclasses.dataclass(frozen=True)
class Task:
  """The task whose prompt the model is given: its name in config.data.tasks ('' for config.data itself), its
  config.data as it sees it, and what it produces ('answer' or 'caption')."""
  name: str
  data: ml_collections.ConfigDict
  kind: str

  @property
  def prompt(self) -> str:
    return self.data.get('prompt', '')


def _reads_question(data) -> bool:
  """An empty template is the title, the question and the options (data/tasks.py)."""
  template = data.get('prompt', '')
  return not template or '{question}' in template


def _describe(name: str, data) -> str:
  return f'{name or "config.data"} (prompt {data.get("prompt", "")!r}, target {data.get("target", "") or "any"!r})'


def choose_task(data: ml_collections.ConfigDict, question: Optional[str], name: Optional[str] = None) -> Task:
  """The run's task to prompt with: with a question, one whose prompt reads it (the first, or the one named);
  without one, one that captions (target caption or captions) or whose prompt reads no question.

  Raises AnswerError when the run has no such task: a question for a model trained only to caption, or no question
  for a model trained only to answer.
  """
  names = tasks_lib.task_names(data) or ['']
  if name:
    if name not in names:
      listed = ', '.join(n for n in names if n) or 'config.data alone'
      raise AnswerError(f'--task={name}: the run\'s tasks are {listed}')
    names = [name]
  candidates = [(n, tasks_lib.task_data(data, n)) for n in names]
  if question:
    chosen = [(n, d) for n, d in candidates if _reads_question(d) and d.get('target', '') not in CAPTION_TARGETS]
    if not chosen:
      raise AnswerError('the model was not trained to answer questions: ' +
                        '; '.join(_describe(n, d) for n, d in candidates) + ' reads no question. Leave --question '
                        'out to caption the clip')
    return Task(*chosen[0], 'answer')
  chosen = ([(n, d) for n, d in candidates if d.get('target', '') in CAPTION_TARGETS] or
            [(n, d) for n, d in candidates if not _reads_question(d)])
  if not chosen:
    raise AnswerError('the model was trained to answer questions, not to caption: ' +
                      '; '.join(_describe(n, d) for n, d in candidates) + '. Give --question="..."')
  return Task(*chosen[0], 'caption')


def decode_settings(config, task: Task, beam: Optional[int], max_new_tokens: Optional[int]) -> dict[str, Any]:
  """max_new_tokens, beam_size, length_penalty: the flags' where given, else those of the run's first vqa or
  caption evaluator of this task (so that the answer is the one `eval` gives), else the evaluators' defaults."""
  settings = {'max_new_tokens': DEFAULT_MAX_NEW_TOKENS[task.kind], 'beam_size': 1, 'length_penalty': 0.0}
  for cfg in (config.get('evals') or {}).values():
    if cfg.get('type') in ('vqa', 'caption') and cfg.get('task', '') == task.name:
      settings.update({k: cfg[k] for k in settings if k in cfg})
      break
  if beam is not None:
    settings['beam_size'] = beam
  if max_new_tokens is not None:
    settings['max_new_tokens'] = max_new_tokens
  if settings['beam_size'] < 1 or settings['max_new_tokens'] < 1:
    raise AnswerError(f'--beam and --max_new_tokens must be at least 1 (beam {settings["beam_size"]}, '
                      f'max_new_tokens {settings["max_new_tokens"]})')
  return settings


def restore_params(config, workdir: str, step: Optional[int] = None) -> tuple[int, Any]:
  """The parameters alone of the workdir's checkpoint of `step` (default: the newest that reads), as the `eval`
  command reads them, on one device."""
  folder = checkpoint.checkpoints_folder(workdir)
  if not checkpoint.saved_steps(folder):
    raise AnswerError(f'{workdir} holds no checkpoint ({folder}/<step>): train it first')
  model = mirasol.Model(**config.model)
  batch = mirasol.example_batch(config, 1)
  rng = jax.random.PRNGKey(0)
  boxed = jax.eval_shape(lambda r: model.init({'params': r, 'dropout': r}, batch)['params'], rng)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          sharding.box_values(boxed))
  try:
    if step is not None:
      return step, checkpoint.restore_params(workdir, step, abstract)
    return checkpoint.newest_params(workdir, abstract)
  except (FileNotFoundError, checkpoint.MismatchError) as e:
    raise AnswerError(str(e)) from None


# ---------------------------------------------------------------------------------------------------------------
# The input: the clip as evaluation decodes it, the prompt as evaluation tokenises it.


@dataclasses.dataclass
class Clip:
  """One example (numpy, batch axis of 1) and where its chunks lie in the file."""
  example: dict[str, np.ndarray]  # the model's keys (mirasol.batch_shapes) with B = 1
  record: dict[str, Any]
  prompt: str
  chunk_bounds: list[tuple[float, float]]  # seconds in the file, one per chunk

  @property
  def start(self) -> float:
    return self.chunk_bounds[0][0]

  @property
  def end(self) -> float:
    return self.chunk_bounds[-1][1]


def read_clip(config, task: Task, path: str, start: Optional[float] = None, end: Optional[float] = None,
              question: Optional[str] = None, processor=None) -> Clip:
  """The record {'video_path', 'start', 'end', 'question'} decoded by the evaluation pipeline's DecodeExample
  (train=False) and prompted by the task's template, its target left empty (what `decoding` reads of the text is the
  prompt: BOS and the prompt's tokens, cut as encode_example cuts them)."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise AnswerError(f'{path}: no such file')
  data = ml_collections.ConfigDict(task.data.to_dict())
  data.require_target = False  # the record has no answer: the text is tokenised here, below
  limits = media.MediaLimits.from_config(data)
  try:
    info = media.probe(path, limits)
  except media.MediaError as e:
    raise AnswerError(str(e)) from None
  start = 0.0 if start is None else float(start)
  end = info.duration if end is None else min(float(end), info.duration)
  if not 0.0 <= start < end:
    raise AnswerError(f'{path}: no clip [{start:.2f}, {end:.2f}] s in a file of {info.duration:.2f} s')
  if limits.max_clip_seconds and end - start > limits.max_clip_seconds:
    raise AnswerError(f'{path}: a clip of {end - start:.1f} s, over config.data.max_clip_seconds='
                      f'{limits.max_clip_seconds:g}: choose a part with --start and --end')
  record = {'id': os.path.basename(path), 'video_path': path, 'start': start, 'end': end}
  if question:
    record['question'] = question
  decoder = pipeline.DecodeExample(config.model, data, train=False)
  example = decoder.decode(record, None)
  if example['skipped']:
    reason = list(pipeline.SKIP_REASONS)[int(example['skip_reason']) - 1]
    raise AnswerError(f'{path}: {pipeline.SKIP_REASONS[reason]} (see the warning above)')
  prompt = tasks_lib.prompt(record, task.prompt)
  processor = processor or pipeline.load_tokenizer(config.data, config.model)
  example['text_tokens'], example['text_loss_mask'] = tokenizer_lib.encode_example(
      processor, prompt, '', config.model.max_text_len)
  example = {k: v[None] for k, v in pipeline.model_inputs(example).items()}
  bounds = media.chunk_bounds(start, end, config.model.num_chunks)
  return Clip(example, record, prompt, bounds)


# ---------------------------------------------------------------------------------------------------------------
# Generation and its score.


@dataclasses.dataclass(frozen=True)
class Reply:
  text: str
  log_prob: float  # the total over its tokens and its EOS
  tokens: int  # how many were scored: the answer's tokens and its EOS (when it ended within max_new_tokens)

  @property
  def mean_log_prob(self) -> float:
    return self.log_prob / max(self.tokens, 1)

  @property
  def probability(self) -> float:
    return float(np.exp(self.log_prob))


def generated_log_probs(model, variables, latents: Array, text_tokens: Array, text_loss_mask: Array,
                        generated: Array, eos_id: int = tokenizer_lib.EOS_ID) -> tuple[Array, Array]:
  """Teacher-forced log-probabilities [B, N] of generated tokens [B, N] written after each prompt, and the mask
  [B, N] of those that count: up to and including the first EOS, inside the text buffer (decoding emits padding
  after them)."""
  batch, length = text_tokens.shape
  prompt_len = decoding.prompt_lengths(text_loss_mask)
  is_eos = generated == eos_id
  emitted = (jnp.cumsum(is_eos, axis=1) - is_eos) == 0
  positions = prompt_len[:, None] + jnp.arange(generated.shape[1])[None, :]
  emitted &= positions < length
  rows = jnp.arange(batch)[:, None]
  tokens = decoding.prompt_only(text_tokens, prompt_len).at[rows, positions].set(
      jnp.where(emitted, generated, tokenizer_lib.PAD_ID), mode='drop')
  logits = model.apply(variables, tokens, latents.reshape(batch, -1, latents.shape[-1]),
                       method=mirasol.Model.text_logits)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  before = jnp.clip(positions - 1, 0, length - 1)  # the logits at position p - 1 predict the token at p
  picked = jnp.take_along_axis(log_probs[rows, before], generated[..., None], axis=-1)[..., 0]
  return jnp.where(emitted, picked, 0.0), emitted


def respond(model, settings: Mapping[str, Any], params, text_tokens: Array, text_loss_mask: Array,
            latents: Array, chunks: Optional[int] = None) -> tuple[Array, Array, Array]:
  """Generation (greedy_decode, or beam_decode with settings['beam_size'] > 1) over the latents of the first
  `chunks` chunks (all by default) -> (tokens [B, N], their log-probabilities [B, N], mask [B, N])."""
  variables = {'params': params}
  latents = latents if chunks is None else latents[:, :chunks]
  text = {'text_tokens': text_tokens, 'text_loss_mask': text_loss_mask}
  n, eos = settings['max_new_tokens'], tokenizer_lib.EOS_ID
  if settings['beam_size'] > 1:
    tokens = decoding.beam_decode(model, variables, text, n, eos, beam_size=settings['beam_size'],
                                  length_penalty=settings['length_penalty'], latents=latents)[0]
  else:
    tokens = decoding.greedy_decode(model, variables, text, n, eos, latents=latents)
  log_probs, mask = generated_log_probs(model, variables, latents, text_tokens, text_loss_mask, tokens, eos)
  return tokens, log_probs, mask


# Compiled programs, kept for the life of the process under what they depend on (the model's config, the decoding
# settings, the program): answering another file, or with another checkpoint of the same run, compiles nothing.
_PROGRAMS: dict[tuple, Callable] = {}


class Answerer:
  """A run's model and parameters with programs compiled for one example (B = 1) of its geometry: encode the whole
  clip, step one chunk, respond over the latents of the first t chunks."""

  def __init__(self, config, params, processor, settings: Mapping[str, Any]):
    self.config, self.params, self.processor = config, params, processor
    self.settings = dict(settings)
    self.model = mirasol.Model(**config.model)
    self.num_chunks = int(config.model.num_chunks)
    self._shapes = {k: jax.ShapeDtypeStruct(shape, dtype)
                    for k, (shape, dtype) in mirasol.batch_shapes(config.model, 1).items()}
    self._key = (json.dumps(config.model.to_dict(), sort_keys=True, default=str),
                 tuple(sorted(self.settings.items())))

  # -- compiling ahead of time, so that the timed calls run compiled code ---------------------------------------

  def _program(self, build: Callable[[], Callable], *name) -> Callable:
    key = (*self._key, *name)
    if key not in _PROGRAMS:
      _PROGRAMS[key] = build()
    return _PROGRAMS[key]

  def _latent_shape(self) -> jax.ShapeDtypeStruct:
    m = self.model
    return jax.ShapeDtypeStruct((1, m.num_chunks, m.tokens_per_chunk, m.width), jnp.dtype(m.dtype))

  def respond_program(self, chunks: int) -> Callable:
    """(params, text_tokens, text_loss_mask, latents [1, T, m, D]) -> respond over the first `chunks` chunks."""
    def build():
      fn = jax.jit(functools.partial(respond, self.model, self.settings), static_argnames=('chunks',))
      return fn.lower(self.params, self._shapes['text_tokens'], self._shapes['text_loss_mask'], self._latent_shape(),
                      chunks=chunks).compile()
    return self._program(build, 'respond', chunks)

  def encode_program(self) -> Callable:
    """(params, batch) -> the AV latents [1, T, m, D] of the whole clip."""
    def build():
      encode = lambda params, batch: self.model.apply({'params': params}, batch, method=mirasol.Model.encode_av)[1]
      return jax.jit(encode).lower(self.params, self._shapes).compile()
    return self._program(build, 'encode')

  def step_program(self) -> Callable:
    """(params, video chunk [1, k, H, W, 3], audio chunk [1, F, M], audio_mask [1], state, latents [1, T, m, D])
    -> (state, latents with this chunk's written at its index)."""
    if not self.model.av.get('block_causal', True):
      raise AnswerError('--stream needs a block-causal AV Transformer: this run has model.av.block_causal=False, so '
                        'every chunk\'s latents depend on later chunks')
    model = self.model

    def step(params, video_chunk, audio_chunk, audio_mask, state, latents):
      h_t, new_state = model.apply({'params': params}, video_chunk, audio_chunk, audio_mask, state,
                                   method=mirasol.Model.stream_step)
      latents = jax.lax.dynamic_update_slice_in_dim(latents, h_t[:, None].astype(latents.dtype), state['chunk'],
                                                    axis=1)
      return new_state, latents

    def build():
      video, audio = self._shapes['video'], self._shapes['audio']
      state = jax.eval_shape(lambda: model.apply({'params': self.params}, 1, method=mirasol.Model.stream_init))
      chunk = (jax.ShapeDtypeStruct(video.shape[:1] + video.shape[2:], video.dtype),
               jax.ShapeDtypeStruct(audio.shape[:1] + audio.shape[2:], audio.dtype), self._shapes['audio_mask'])
      return jax.jit(step).lower(self.params, *chunk, state, self._latent_shape()).compile()
    return self._program(build, 'step')

  def prepare(self, clip: Clip, stream: bool) -> float:
    """Compiles what answering `clip` runs (with `stream`, the chunk step and the answer over each number of chunks)
    and runs each program once, on the clip's first chunk or the whole clip: the first run of a compiled program
    costs more than the next (about 100 ms on CPU), and the times printed are of the next. Returns the seconds it
    took."""
    start = time.perf_counter()
    text = (self.params, clip.example['text_tokens'], clip.example['text_loss_mask'])
    if stream:
      state, latents = self._stream_start()
      state, latents = self.step_program()(self.params, *self._chunk(clip, 0), state, latents)
      for t in range(1, self.num_chunks + 1):
        jax.block_until_ready(self.respond_program(t)(*text, latents))
    else:
      latents = self.encode_program()(self.params, clip.example)
      jax.block_until_ready(self.respond_program(self.num_chunks)(*text, latents))
    return time.perf_counter() - start

  # -- running --------------------------------------------------------------------------------------------------

  def _reply(self, outputs) -> Reply:
    tokens, log_probs, mask = jax.device_get(outputs)
    return Reply(tokenizer_lib.decode(self.processor, tokens[0]), float(np.sum(log_probs[0])), int(np.sum(mask[0])))

  def encode(self, clip: Clip) -> Array:
    """The whole clip's AV latents [1, T, m, D] (Model.encode_av, as evaluation computes them)."""
    return self.encode_program()(self.params, clip.example)

  def answer(self, clip: Clip, latents: Optional[Array] = None, chunks: Optional[int] = None) -> Reply:
    """The reply to the clip's prompt from `latents` (default: the whole clip's) of its first `chunks` chunks."""
    latents = self.encode(clip) if latents is None else latents
    chunks = chunks or self.num_chunks
    example = clip.example
    return self._reply(self.respond_program(chunks)(self.params, example['text_tokens'], example['text_loss_mask'],
                                                    latents))

  def _stream_start(self) -> tuple[Any, Array]:
    """The state before the first chunk, and the latents buffer [1, T, m, D] the chunk steps fill."""
    state = self.model.apply({'params': self.params}, 1, method=mirasol.Model.stream_init)
    shape = self._latent_shape()
    return state, jnp.zeros(shape.shape, shape.dtype)

  @staticmethod
  def _chunk(clip: Clip, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    example = clip.example
    return example['video'][:, t], example['audio'][:, t], example['audio_mask']

  def stream(self, clip: Clip) -> Iterator[tuple[int, Reply, float, float]]:
    """Feeds the clip's chunks one at a time; yields after each (t, the reply given chunks 1..t, seconds of the
    chunk step, seconds of the reply)."""
    step = self.step_program()
    text = (self.params, clip.example['text_tokens'], clip.example['text_loss_mask'])
    state, latents = self._stream_start()
    for t in range(self.num_chunks):
      started = time.perf_counter()
      state, latents = step(self.params, *self._chunk(clip, t), state, latents)
      jax.block_until_ready(latents)
      encoded = time.perf_counter()
      reply = self._reply(self.respond_program(t + 1)(*text, latents))
      yield t + 1, reply, encoded - started, time.perf_counter() - encoded


# ---------------------------------------------------------------------------------------------------------------
# The command.


def format_reply(reply: Reply) -> str:
  """'left  (log-prob -0.031 per token, p=0.94)'; p is the probability of the whole answer, its EOS included."""
  return f'{reply.text}  (log-prob {reply.mean_log_prob:.3f} per token, p={reply.probability:.2f})'


def run(workdir: str, video: str, question: Optional[str] = None, start: Optional[float] = None,
        end: Optional[float] = None, stream: bool = False, step: Optional[int] = None, beam: Optional[int] = None,
        max_new_tokens: Optional[int] = None, task: Optional[str] = None,
        config: Optional[ml_collections.ConfigDict] = None, out: Callable[[str], None] = print
        ) -> list[Reply]:
  """The `answer` command: prints the reply to `question` about `video` [start, end] (a caption without a
  question), or with `stream` the reply after each chunk with its time; returns the replies (one, or one a chunk).
  """
  if not os.path.isdir(workdir):
    raise AnswerError(f'{workdir}: no such workdir')
  config = load_config(workdir, config)
  chosen = choose_task(config.data, question, task)
  settings = decode_settings(config, chosen, beam, max_new_tokens)
  processor = pipeline.load_tokenizer(config.data, config.model)
  clip = read_clip(config, chosen, video, start, end, question, processor)
  step, params = restore_params(config, workdir, step)
  answerer = Answerer(config, params, processor, settings)
  m = config.model
  how = 'greedy' if settings['beam_size'] == 1 else f'beam search ({settings["beam_size"]} beams)'
  out(f'{workdir}/checkpoints/{step}, task {_describe(chosen.name, chosen.data)}, {how}')
  out(f'clip {clip.record["id"]} {clip.start:.2f}-{clip.end:.2f} s: {m.num_chunks} chunks of '
      f'{(clip.end - clip.start) / m.num_chunks:.2f} s, {m.num_frames // m.num_chunks} frames each, '
      f'{"with" if clip.example["audio_mask"][0] else "without"} audio')
  if clip.prompt:
    out(f'prompt: {clip.prompt!r}')
  label = chosen.kind
  compile_s = answerer.prepare(clip, stream)
  if not stream:
    started = time.perf_counter()
    latents = jax.block_until_ready(answerer.encode(clip))
    encoded = time.perf_counter()
    reply = answerer.answer(clip, latents)
    done = time.perf_counter()
    out(f'{label}: {format_reply(reply)}')
    out(f'{1e3 * (done - started):.1f} ms: encode {1e3 * (encoded - started):.1f} + {label} '
        f'{1e3 * (done - encoded):.1f} (compiled and run once before, in {compile_s:.1f} s)')
    return [reply]
  out(f'streaming: the chunk step and the {label} over 1 to {m.num_chunks} chunks compiled and run once, in '
      f'{compile_s:.1f} s')
  replies = []
  for t, reply, step_s, reply_s in answerer.stream(clip):
    replies.append(reply)
    out(f'chunk {t}/{m.num_chunks}  {clip.start:.2f}-{clip.chunk_bounds[t - 1][1]:.2f} s  '
        f'{1e3 * (step_s + reply_s):5.1f} ms (step {1e3 * step_s:.1f} + {label} {1e3 * reply_s:.1f})  '
        f'{label}: {format_reply(reply)}')
  return replies
