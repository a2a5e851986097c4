"""Config helpers: the fields every training config has, `key=value` arguments, loading `path.py[:arg]`.

Config files in configs/ stay short: they call `base_config` and change what their experiment changes.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Optional

import ml_collections


def parse_arg(arg: Optional[str], **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'size=tiny,combiner=ttm' into a ConfigDict, typed like `defaults`; unknown keys are an error."""
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'config argument {key!r} is not one of {sorted(defaults)} (given {arg!r})')
    default = defaults[key]
    if not sep:
      value = 'True'  # a bare flag, e.g. 'runlocal'
    if isinstance(default, bool):
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'config argument {key}={value!r} is not a boolean')
      result[key] = value.lower() in ('true', '1')
    else:
      result[key] = type(default)(value) if default is not None else value
  return result


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads 'configs/pretrain.py:size=tiny' as `--config=` would."""
  path, _, arg = spec.partition(':')
  if not os.path.exists(path):
    raise FileNotFoundError(f'config file {path!r} does not exist')
  module_spec = importlib.util.spec_from_file_location('mirasol_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def data_config(**overrides) -> ml_collections.ConfigDict:
  """config.data: where examples come from and how they are decoded (mirasol_jax/data/pipeline.py)."""
  data = dict(
      source='jsonl',  # jsonl (a dataset folder) | demo | demo_unlabelled (the embedded datasets) | array_record | tfds
      path='',  # the dataset folder (jsonl, demo), shard folder (array_record) or data_dir (tfds)
      media_root='',  # jsonl: the folder that the records' `video` paths are relative to; '' is the dataset folder
      tokenizer='',  # SentencePiece model; `python -m mirasol_jax.main tokenizer` trains one
      tokenizer_type='bpe',  # bpe | unigram, for the tokenizer command
      train_split='train',
      eval_split='validation',
      num_workers=0,  # grain worker processes decoding media
      sample_rate=16_000,
      window_ms=25.0,
      hop_ms=10.0,
      train_resize_ratio=1.15,  # training: short side resized to 1.15 x the crop, then a random crop
      # Training: mirror whole clips at random. Off by default: a mirrored clip contradicts any text about left and
      # right (questions, captions); turn it on for classification.
      random_flip=False,
      # An example without a target text (answer, caption, label) is skipped when True; when False it trains with no
      # text loss (pretraining on video with sound).
      require_target=True,
      # The task (data/tasks.py): the decoder's prompt, a str.format template over the record's fields ('' is the
      # title, the question and the options), and the field it must write ('' is the first of answer, caption,
      # captions, label).
      prompt='',
      target='',
      # A target field holding several references (a list, e.g. captions): training draws one at random each time
      # ('random') or always reads the first ('first'). Evaluation reads the first; caption metrics all of them.
      reference='random',
      # Several tasks mixed in training: name -> dict(weight=..., and any of source, path, media_root, train_split,
      # eval_split, prompt, target over the fields above). Empty: config.data is the one task.
      tasks=ml_collections.ConfigDict(),
      # With tasks: False mixes them within every batch, in proportion to their weights; True gives each step's
      # batch to one task, the tasks taking turns in proportion to their weights (alternating updates).
      task_per_step=False,
      # jsonl: media must resolve (links followed) inside the dataset folder, or media_root when set; True reads
      # media anywhere, e.g. through a link to another disk. Applies to training, evaluation and `convert`.
      allow_outside_media=False,
      # Bounds on one example's cost; an example over one is skipped with its reason (0 is no bound). The clip
      # (end - start, or the whole file without them) bounds decoding time and audio memory (64 KB a second);
      max_clip_seconds=600.0,
      # the frame size and shape of the video bound each decoded frame and, resized by its short side, each
      # resized one;
      max_frame_pixels=4096 * 4096,
      max_aspect_ratio=4.0,
      # seconds to open and decode one example's media, checked while probing the file and after every packet and
      # frame (PyAV cannot stop FFmpeg inside one packet);
      decode_timeout_s=60.0,
      # How frames are found, never which (data/media.py DecodeOptions): seek past stretches of a clip that no sampled
      # frame needs (off: see DecodeOptions), let the decoder skip the unreferenced frames no sampled frame shows, and
      # decoder threads per process (0: one per data worker, two in the trainer's process without workers).
      decode_seek=False,
      decode_skip_unneeded=True,
      decode_threads=0,
      # a jsonl line longer than this is a bad record (a line is held whole to parse it);
      max_line_bytes=1 << 20,
      # `convert` does not embed a larger media file (a shard holds each file whole).
      max_media_bytes=1 << 30,
      # Training stops with an error naming the most common reasons when more than max_skipped_fraction of the
      # last skip_window examples (of this process) were skipped; before the window fills, of those read, from
      # skip_window_min on. 1.0 never stops. Evaluation never stops: it counts unreadable examples (`skipped`).
      max_skipped_fraction=0.5,
      skip_window=1000,
      skip_window_min=100,
  )
  data.update(overrides)
  return ml_collections.ConfigDict(data)


def base_config(size: str = 'tiny', combiner: str = 'ttm', frames: int = 0) -> ml_collections.ConfigDict:
  """A complete training config around the `size` model preset (models/sizes.py)."""
  from mirasol_jax import sharding
  from mirasol_jax.evaluators import base as evaluators
  from mirasol_jax.models import mirasol
  from mirasol_jax.models import sizes

  config = ml_collections.ConfigDict()
  config.model = sizes.model_config(size, combiner)
  if frames:
    k = config.model.num_frames // config.model.num_chunks
    if frames % k:
      raise ValueError(f'frames={frames} is not a multiple of the chunk length k={k} frames')
    config.model.num_frames, config.model.num_chunks = frames, frames // k
  # One object, seen as config.loss_weights and config.model.loss_weights: an override of either changes both.
  config.loss_weights = ml_collections.ConfigDict(dict(text=1.0, latent=1.0, video_recon=1.0, audio_recon=0.0,
                                                            av_contrastive=0.0))
  config.model.loss_weights = config.loss_weights
  config.data = data_config()
  config.batch_size = 8
  config.total_steps = 10_000
  config.log_every_steps = 50
  config.eval_every_steps = 1_000  # and at the last step; 0 never evaluates
  config.checkpoint_every_steps = 1_000
  config.seed = 0
  config.optimizer = 'adamw'  # adamw | adafactor
  config.lr = 1e-4
  config.warmup_steps = 500
  config.lr_end_ratio = 0.0  # cosine decay to lr * lr_end_ratio at total_steps
  config.weight_decay = 0.01  # on matrices only
  config.grad_clip = 1.0  # global norm; 0 disables
  # Factor on the learning rate (and weight decay) of each tower (mirasol.TOWERS); 0 stops a tower's updates but
  # still computes its gradients (config.frozen skips them). The audio-video towers learn at a tenth of the text
  # decoder's rate: trained from scratch with the text loss at one rate, they are pushed to erase what tells clips
  # apart before the decoder has learned to read it (their latents' spread across examples falls to a few percent:
  # train/latent_target_spread), and the answers fall back on the question's prior. Measured on the demo, README.
  # Configs without a text loss (pretraining) set every factor to 1.
  config.lr_multipliers = ml_collections.ConfigDict(
      {tower: 1.0 if tower == 'text_decoder' else 0.1 for tower in mirasol.TOWERS})
  config.frozen = ''  # regex of parameter paths that are not trained, e.g. '^video_encoder/'
  config.microbatches = 1  # gradient accumulation: batch_size examples in this many lax.scan steps
  config.keep_checkpoints = 3
  # The evaluators (mirasol_jax/evaluators/base.py): name -> type, data, when, prediction settings, group_by. The
  # default answers the questions of config.data's eval_split, scores exact matches per question `kind`, and with
  # `diagnostics` also answers with another example's clip, without audio and with grey frames
  # (evaluators/grounding.py: about four times the decoding).
  config.evals = ml_collections.ConfigDict({'validation': evaluators.config('vqa', group_by='kind')})
  config.peak_tflops = 0.0  # per device, for MFU; 0 measures a matmul on the device instead
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.axis_rules = sharding.DEFAULT_AXIS_RULES
  config.init_from = ''  # a workdir whose latest checkpoint initialises the parameters matching init_from_regex
  config.init_from_regex = '.*'
  # Image ViT checkpoints in big_vision's .npz layout ('file.npz', or 'file.npz:img' for a sub-model) that initialise
  # the video and audio encoders of a fresh run, after init_from (mirasol_jax/pretrained.py: the tube kernels are the
  # patch kernel inflated over time, the audio kernel its RGB channels summed; positions stay sin-cos). '' keeps the
  # tower as init_from or the random initialisation left it; a resumed run reads its own checkpoint.
  config.init_video_encoder = ''
  config.init_audio_encoder = ''
  return config

