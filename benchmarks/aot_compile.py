"""Scale on paper, checked by the compiler: the train step of a size compiled ahead of time for meshes of many
devices on this CPU, its memory and collective traffic per device, an analytic model checked against it, and the
mesh to use on 64, 256 and 1024 chips.

  python benchmarks/aot_compile.py                                    # 3b and 10b on 8, 64 and 256 devices
  python benchmarks/aot_compile.py --sizes 10b --meshes 1x64x1,1x16x4 --remat full --batch_per_device 2
  python benchmarks/aot_compile.py --quick                            # tiny, 4 devices (the test)

What is compiled is what `train` runs: `train.build_train_step(config, mesh, rules).lower()` (the jitted step with
its shardings and the state donated, lowered for abstract shapes: no parameters are created, no data is read) and
XLA's compiler for that mesh. Each mesh compiles in a subprocess of its own started with
XLA_FLAGS=--xla_force_host_platform_device_count=N, since jax reads the device count once, at start; layers are
scanned, so the compile time and memory hardly grow with depth or device count (3b and 10b: 0.5 to 2.5 minutes
each on a shared 2-core machine, 2.2 to 2.9 GB of RSS, from 8 to 1024 devices). A mesh is DATAxFSDPxTENSOR
(`config.mesh`); the global batch is --batch_per_device examples per data-parallel shard (data x fsdp of them; the
tensor axis shares its examples). The first mesh of each size is also compiled with the other remat policies
(--check_remat) and a larger batch (--check_batch), so that the analytic model is checked on every policy it
extrapolates and on its growth with the batch. A mesh that does not divide a sharded parameter dimension (heads
over tensor, widths over fsdp) or the batch is refused before compiling, naming the parameters.

Per device, the script prints:
* XLA's memory analysis: arguments (the state and the batch), outputs, temporaries, generated code, and what the
  donation saves (outputs that reuse the arguments' buffers); the peak is arguments + outputs - aliased +
  temporaries + code;
* the state's bytes per device from its shardings (parameters, Adam moments);
* the collective traffic of one step from the compiled HLO text: count and bytes of all-reduce, all-gather,
  reduce-scatter, all-to-all and collective-permute. An op inside a while loop (layers scanned with nn.scan, the
  TTM Combiner's chunks, micro-batches) is counted as many times as its loop runs: the loops' trip counts are read
  from the compiled HLO (XLA writes `known_trip_count` on every loop of a scan) and multiplied through nested loops;
  a loop without one is counted once and reported. A tuple collective counts once, its bytes summed.
  `wire` bytes are what one device sends with ring algorithms: all-reduce 2(g-1)/g of its size, all-gather and
  all-to-all (g-1)/g, reduce-scatter (g-1) times its output, for groups of g devices; a collective-permute its
  size times the fraction of devices that send.
  The CPU compiler is not the GPU or TPU one, and two of its habits are undone in the `GPU/TPU` column: it carries
  bf16 collectives in f32 (it promotes them: an operand converted up from bf16 just before the collective, or a
  reduction computation named *_promoted), counted at half size there; and it does not turn an all-reduce whose
  result is only sliced into a reduce-scatter (GPU and TPU compilers do: the gradients of fsdp-sharded
  parameters), counted there as the reduce-scatter it becomes.

Against an H100 (80 GB) and a TPU v5p chip (95 GB), a step fits when its peak is at most 90% of the memory (the
rest for the runtime, the collectives' buffers, fragmentation). GB here is 10^9 bytes. The CPU compiler's
temporaries are a proxy for a GPU's or TPU's: it keeps some bf16 values in f32, and attention is XLA's (scores
materialised), not a fused kernel.

The analytic model (`analytic_memory`) counts, per device: parameters and both Adam moments in fp32 as their
shardings split them (exact: the same partition specs); the batch; fp32 gradients sharded like the parameters (and
an accumulator with micro-batches); one layer's gathered weights, twice (the step's and the next one's); the
activations each Transformer layer keeps for the backward pass under the remat policy, per example, for every tower
(video and audio ViTs per chunk, the Combiner per chunk, the AV Transformer over T*m tokens, the text decoder with
its cross-attention); one layer's recomputed working set when a policy recomputes; and the activations outside the
layers (the pixels each tube's convolution keeps, the TTM Combiner's token learners, which no policy
rematerialises, the text logits). `analytic_traffic` counts the bytes each mesh axis moves per step. Both are
printed beside the compiled figures with their ratio; the largest memory ratio of a size and policy scales the
extrapolation to meshes that were not compiled, 1024 chips included.

The recommendation, on paper, per size, chip count and chip (H100 in nodes of 8 on NVLink with one 400 Gb/s
network card each; TPU v5p on its inter-chip links): among the meshes that divide every sharded dimension, the
remat policies (none, dots_no_batch, full) and per-device batches (powers of two) whose peak fits, with at most
--max_global_batch clips in all, the most examples per second per chip, a step taking the longer of its compute
(the analytic FLOPs, mirasol_jax/flops.py, at ACHIEVED of the peak, times the recomputation) and its collectives
(`analytic_traffic` at each axis' bandwidth: inside a node or across); within 5% of the best, the smallest global
batch, then the least tensor parallelism, then the lowest peak. The constants are in HARDWARE, ACHIEVED and
RECOMPUTE. The recommendations for --verify_chips (1024) are then compiled too, XLA's peak printed beside the
prediction.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GB = 1e9
USABLE = 0.9  # of a chip's memory, for the step; the rest for the runtime, collective buffers, fragmentation
REMAT_POLICIES = ('none', 'dots', 'dots_no_batch', 'full')
MESH_AXES = ('data', 'fsdp', 'tensor')

# Compiled unless --meshes says otherwise: 8, 64 and 256 devices, several shapes each, and 1024. 3b's AV
# Transformer, Combiner and audio tower have 12 heads, so its tensor axis stops at 4; 10b's heads all divide by 8.
DEFAULT_MESHES = {
    '3b': ('1x8x1', '2x4x1', '1x4x2', '1x64x1', '4x16x1', '1x16x4', '1x256x1', '4x64x1', '1x64x4', '4x256x1'),
    '10b': ('1x8x1', '1x4x2', '1x2x4', '1x64x1', '1x16x4', '1x8x8', '1x256x1', '4x64x1', '1x32x8', '4x256x1'),
}
QUICK_MESHES = ('1x2x2',)
RESULT_PREFIX = 'AOT_RESULT '
DTYPE_BYTES = {'pred': 1, 's4': 1, 'u4': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
               'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16, 'f8e4m3fn': 1, 'f8e5m2': 1}
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')


def parse_mesh(text: str) -> tuple[int, int, int]:
  parts = text.lower().split('x')
  if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f'mesh {text!r} is not DATAxFSDPxTENSOR with positive sizes, e.g. 1x64x4')
  return tuple(int(p) for p in parts)


def mesh_name(shape: Sequence[int]) -> str:
  return 'x'.join(str(s) for s in shape)


def make_config(size: str, shape: Sequence[int], batch_per_device: int, remat: str, microbatches: int = 1):
  """The pretraining config of `size` (configs/pretrain.py) on mesh `shape`, with batch_per_device examples per
  data-parallel shard."""
  from mirasol_jax import config_lib
  config = config_lib.base_config(size)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = (int(s) for s in shape)
  config.batch_size = batch_per_device * shape[0] * shape[1]
  config.microbatches = microbatches
  config.model.remat_policy = remat
  return config


# ---------------------------------------------------------------------------------------------------------------
# Shardings without devices: the parameters' partition specs, what each device holds, and whether a mesh divides.


def _mesh_axes_of(names: Sequence[Optional[str]], rules) -> tuple[tuple[str, ...], ...]:
  """The mesh axes each dimension is split over under the logical axis rules (flax's first-match semantics)."""
  import flax.linen as nn
  axes = []
  for entry in nn.logical_to_mesh_axes(tuple(names), [tuple(r) for r in rules]):
    axes.append(() if entry is None else (entry,) if isinstance(entry, str) else tuple(entry))
  return tuple(axes)


class Preset:
  """A size's model config, axis rules and parameters (path, shape, logical axes, from jax.eval_shape: no memory,
  no devices): what the analytic model and the divisibility check read. Per-mesh sums are cached."""

  def __init__(self, size: str):
    import flax.linen as nn
    import jax
    from mirasol_jax import train
    from mirasol_jax.models import mirasol
    self.size = size
    self.config = make_config(size, (1, 1, 1), 1, 'none')
    self.model = self.config.model
    self.rules = tuple(tuple(r) for r in self.config.axis_rules)
    module = mirasol.Model(**self.model)
    boxed = jax.eval_shape(lambda rng: train.init_params(module, rng, mirasol.example_batch(self.config, 1))[0],
                           jax.random.PRNGKey(0))
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    self.params = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=is_box):
      value = leaf.value if is_box(leaf) else leaf
      names = tuple(leaf.names) if is_box(leaf) else (None,) * len(value.shape)
      self.params.append(('/'.join(str(getattr(k, 'key', k)) for k in path), tuple(value.shape),
                          _mesh_axes_of(names, self.rules), names))
    self.towers = towers(self.model)
    self._shards: dict[tuple[int, ...], dict[str, Any]] = {}
    self._flops: Optional[float] = None

  def shards(self, shape: Sequence[int]) -> dict[str, Any]:
    """On mesh `shape`, per device: parameter elements (`local`); elements of the parameters split over fsdp as
    one fsdp gather makes them (`gathered`) and of those not split over it (`unsplit`); the same three of the
    Combiner alone (`combiner_local`, ...); the dimensions that do not divide evenly (`uneven`)."""
    shape = tuple(shape)
    if shape not in self._shards:
      sizes = dict(zip(MESH_AXES, shape))
      sums = {k: 0 for k in ('local', 'gathered', 'unsplit', 'combiner_local', 'combiner_gathered',
                             'combiner_unsplit')}
      uneven = []
      for path, dims, axes, names in self.params:
        count = 1
        for dim, (size, on) in enumerate(zip(dims, axes)):
          ways = math.prod(sizes[a] for a in on)
          if size % ways:
            uneven.append(f'{path} {list(dims)}: dimension {dim} ({names[dim]}={size}) over {"x".join(on)}={ways}')
          count *= -(-size // ways)
        split = any('fsdp' in on for on in axes)
        for prefix in ('', 'combiner_') if path.startswith('combiner/') else ('',):
          sums[prefix + 'local'] += count
          sums[prefix + ('gathered' if split else 'unsplit')] += count * sizes['fsdp'] if split else count
      self._shards[shape] = dict(sums, uneven=uneven)
    return self._shards[shape]

  def train_flops(self) -> float:
    """Training FLOPs per example (mirasol_jax/flops.py)."""
    if self._flops is None:
      from mirasol_jax import flops
      self._flops = flops.count(self.model)['train']['total']
    return self._flops


def mesh_refusal(preset: Preset, shape: Sequence[int], batch_size: int) -> Optional[str]:
  """Why `shape` cannot run the preset, or None: a batch that does not split over the data-parallel shards, or a
  sharded parameter dimension that the mesh axes do not divide (jax would refuse it with a message about one
  argument of the jitted step)."""
  data_ways = shape[0] * shape[1]
  if batch_size % data_ways:
    return f'batch_size={batch_size} does not divide over data x fsdp = {data_ways} shards'
  uneven = preset.shards(shape)['uneven']
  if uneven:
    more = f' (and {len(uneven) - 3} more)' if len(uneven) > 3 else ''
    return (f'mesh {mesh_name(shape)} does not divide {len(uneven)} parameter dimension(s): ' +
            '; '.join(uneven[:3]) + more)
  return None


# ---------------------------------------------------------------------------------------------------------------
# The analytic model.


@dataclasses.dataclass
class Tower:
  """A Transformer stack as the memory model sees it: per example, `sequences` sequences of `tokens` tokens."""
  name: str
  layers: int
  width: int
  heads: int
  mlp: int
  tokens: int
  sequences: int
  context: int = 0  # cross-attention keys per sequence (text decoder: T*m latents; Q-Former: a chunk's tokens)
  context_width: int = 0


def towers(model) -> list[Tower]:
  from mirasol_jax.models import encoders
  t, m, d = model.num_chunks, model.tokens_per_chunk, model.width
  k = model.num_frames // t
  f = encoders.num_video_tokens(model.video.tubes, (k, *model.image_size))
  patch = tuple(model.audio.get('patch_size', (16, 16)))
  s = encoders.num_audio_tokens(model.audio_frames_per_chunk, model.mel_bins, patch)
  comb = model.combiner_args
  comb_tokens = {'ttm': m, 'transformer': f + s + m, 'qformer': m}[model.combiner]
  return [
      Tower('video_encoder', model.video.depth, model.video.width, model.video.num_heads, model.video.mlp_dim, f, t),
      Tower('audio_encoder', model.audio.depth, model.audio.width, model.audio.num_heads, model.audio.mlp_dim, s, t),
      Tower('combiner', comb.depth, d, comb.num_heads, comb.mlp_dim, comb_tokens, t,
            context=(f + s) if model.combiner == 'qformer' else 0, context_width=d),
      Tower('av_transformer', model.av.depth, d, model.av.num_heads, model.av.mlp_dim, t * m, 1),
      Tower('text_decoder', model.text.depth, model.text.width, model.text.num_heads, model.text.mlp_dim,
            model.max_text_len, 1, context=t * m, context_width=d),
  ]


def layer_bytes_per_token(tw: Tower, tensor: int, policy: str) -> float:
  """Bytes one layer keeps per token for its backward pass under `policy`: what JAX's autodiff saves of a
  pre-LayerNorm block (the residuals of the scanned layer, as the compiled HLO shows them), the tensor-parallel
  parts split `tensor` ways.

  none: each LayerNorm, computed in fp32, keeps its input, centred and normalised values (3 x 4d bytes) and its
  bf16 output (2d); q, k, v and the attention output (2d/t each); the scores in fp32 and the probabilities in bf16
  (6 bytes per head and key: XLA's attention materialises them, masked or not); the MLP's hidden layer six times
  in bf16 (fc1's output and the terms of GELU's tanh approximation); cross-attention its query and output and its
  scores over the context. full: the layer's input only (the scan's carry). dots_no_batch: the carry and the
  outputs of the weight matmuls (q, k, v, out-projection, fc1, fc2); dots: also the attention's batched matmuls
  (scores, probabilities x values).
  """
  b = 2
  d, f, h = tw.width, tw.mlp / tensor, tw.heads / tensor
  dt = d / tensor
  carry = b * d
  weight_dots = b * (3 * dt + d + f + d)
  batch_dots = b * (h * tw.tokens + dt)
  if tw.context:
    weight_dots += b * (dt + d)
    batch_dots += b * (h * tw.context + dt)
  if policy == 'full':
    return carry
  if policy == 'dots_no_batch':
    return carry + weight_dots
  if policy == 'dots':
    return carry + weight_dots + batch_dots
  norms = 3 if tw.context else 2
  kept = norms * (12 * d + b * d) + 4 * b * dt + 6 * h * tw.tokens + 6 * b * f
  if tw.context:
    kept += 2 * b * dt + 6 * h * tw.context
  return kept  # none


def context_bytes_per_layer(tw: Tower, tensor: int, policy: str) -> float:
  """Cross-attention keys and values of the context, computed in every layer (weight matmuls), per sequence."""
  if not tw.context or policy == 'full':
    return 0.0
  return 2 * 2 * tw.context * tw.width / tensor


def activation_bytes_per_example(preset: Preset, tensor: int, policy: str) -> dict[str, float]:
  """The activations one example keeps for the backward pass, per tower, plus the working set of one recomputed
  layer (when the policy recomputes) and the activations outside the Transformer layers."""
  from mirasol_jax.models import encoders
  model = preset.model
  result, working = {}, 0.0
  for tw in preset.towers:
    per_layer = tw.sequences * (tw.tokens * layer_bytes_per_token(tw, tensor, policy) +
                                context_bytes_per_layer(tw, tensor, policy))
    result[tw.name] = tw.layers * per_layer
    if policy != 'none':
      # The backward pass of one layer recomputes what the policy did not keep, and holds its gradients.
      full = tw.sequences * (tw.tokens * layer_bytes_per_token(tw, tensor, 'none') +
                             context_bytes_per_layer(tw, tensor, 'none'))
      working = max(working, 2 * full - per_layer)
  result['recomputed layer'] = working
  t, m, d = model.num_chunks, model.tokens_per_chunk, model.width
  k = model.num_frames // t
  pixels = t * k * model.image_size[0] * model.image_size[1] * 3
  # Each tube's convolution keeps its (bf16) input slice for its kernel's gradient.
  outside = 2 * pixels * len(model.video.tubes)
  f = encoders.num_video_tokens(model.video.tubes, (k, *model.image_size))
  patch = tuple(model.audio.get('patch_size', (16, 16)))
  n = f + encoders.num_audio_tokens(model.audio_frames_per_chunk, model.mel_bins, patch)
  outside += t * n * d * (2 + 4)  # the chunk tokens u, bf16, and their fp32 sum with the modality embedding
  if model.combiner == 'ttm':
    mem, hidden = model.combiner_args.memory_tokens, model.combiner_args.tokenlearner_hidden / tensor
    for rows, outputs in ((mem + n, m), (mem + m + n, mem)):  # read, then write, in every chunk
      # Per row: the LayerNorm in fp32 (3 x 4d) and the bf16 concatenated input and normalised rows (2 x 2d), the
      # hidden layer and GELU's terms in bf16 (6 x 2 bytes), the weight logits, softmax and mask (10 bytes each).
      outside += t * rows * (12 * d + 4 * d + 12 * hidden + 10 * outputs)
  outside += 3 * 4 * model.max_text_len * model.vocab_size / tensor  # logits, log-softmax, their gradient (fp32)
  result['outside layers'] = outside
  return result


def analytic_memory(preset: Preset, shape: Sequence[int], per_shard: int, policy: str,
                    microbatches: int = 1) -> dict[str, float]:
  """Bytes per device of one train step on mesh `shape` with `per_shard` examples per data-parallel shard (see
  the module docstring)."""
  import numpy as np
  from mirasol_jax.models import mirasol
  tensor = shape[2]
  elements = preset.shards(shape)['local']
  batch = sum(math.prod(s) * np.dtype(dt).itemsize for s, dt in mirasol.batch_shapes(preset.model, per_shard).values())
  # The largest layer's weights, gathered over fsdp (split over tensor): self-attention and MLP, and the
  # cross-attention's four projections where there is one.
  layer_params = max(4 * tw.width ** 2 + 2 * tw.width * tw.mlp +
                     (4 * tw.width * max(tw.width, tw.context_width) if tw.context else 0) for tw in preset.towers)
  acts = activation_bytes_per_example(preset, tensor, policy)
  result = {
      'parameters': 4.0 * elements,
      'adam moments': 8.0 * elements,
      'batch': float(batch),
      'gradients': 4.0 * elements * (2 if microbatches > 1 else 1),
      'gathered layer': 2 * 4.0 * layer_params / tensor,
      'activations': (per_shard / microbatches) * sum(acts.values()),
  }
  result['state'] = result['parameters'] + result['adam moments']
  result['total'] = sum(v for k, v in result.items() if k != 'state')
  return result


def analytic_traffic(preset: Preset, shape: Sequence[int], per_shard: int, policy: str) -> dict[str, float]:
  """Bytes one device sends per step over each mesh axis, with ring algorithms and bf16 collectives (what GPU and
  TPU compilers move: compare with the compiled `GPU/TPU` column).

  fsdp: the weights gathered once in the forward pass and once in the backward pass (a remat policy recomputes
  with the backward pass's copy), the gradients reduce-scattered; parameters not split over fsdp have their
  gradients all-reduced over it. The TTM Combiner runs inside its loop over the T chunks, and XLA gathers its
  weights and reduces its gradients in every chunk: T times. data: every gradient shard all-reduced, in fp32 by
  then (the Combiner's T times). tensor: per layer and example, the activations all-reduced after the attention and MLP
  out-projections in the forward pass and before the q/k/v and fc1 projections' input gradients in the backward
  pass (cross-attention adds its own, and the gradient of the context), again in a forward pass that `full`
  recomputes.
  """
  data, fsdp, tensor = shape
  shards = preset.shards(shape)
  b = 2  # bf16
  repeat = preset.model.num_chunks - 1 if preset.model.combiner == 'ttm' else 0  # the Combiner's extra times

  def ring(g):
    return (g - 1) / g

  def times(key):
    return shards[key] + repeat * shards['combiner_' + key]

  result = {
      'fsdp': 3 * b * times('gathered') * ring(fsdp) + 2 * b * times('unsplit') * ring(fsdp),
      'data': 2 * 4 * times('local') * ring(data),
  }
  recompute = 1 if policy == 'full' else 0
  per_example = 0.0
  for tw in preset.towers:
    tokens = tw.sequences * tw.tokens
    volume = (4 + 2 * recompute) * tokens * tw.width
    if tw.context:
      volume += (2 + recompute) * tokens * tw.width + tw.sequences * tw.context * tw.context_width
    per_example += tw.layers * volume
  result['tensor'] = per_shard * per_example * b * 2 * ring(tensor)
  return result


# ---------------------------------------------------------------------------------------------------------------
# Collectives of a compiled HLO module.

_SHAPE_RE = re.compile(r'\b(' + '|'.join(sorted(DTYPE_BYTES, key=len, reverse=True)) + r')\[([0-9,]*)\]')
_INSTR_RE = re.compile(r'^\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$')
_HEADER_RE = re.compile(r'^(ENTRY\s+)?%([^\s(]+)')
_CALLED_RE = re.compile(r'\b(calls|to_apply|condition|body|true_computation|false_computation)=%([^\s,})]+)')
_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_PASS_THROUGH = ('bitcast', 'convert', 'copy', 'reshape', 'transpose')


@dataclasses.dataclass
class _Instr:
  name: str
  shape: str
  op: str
  operands: list
  attrs: str
  root: bool


def _split_operands(rest: str) -> tuple[str, str]:
  depth = 0
  for i, ch in enumerate(rest):
    if ch in '({':
      depth += 1
    elif ch in ')}':
      if depth == 0:
        return rest[:i], rest[i + 1:]
      depth -= 1
  return rest, ''


def _arrays(shape: str) -> list[tuple[str, int]]:
  """(dtype, bytes) of each array of a shape string, tuple elements in order."""
  return [(dt, DTYPE_BYTES[dt] * math.prod(int(x) for x in dims.split(',') if x))
          for dt, dims in _SHAPE_RE.findall(shape)]


def parse_hlo(text: str) -> tuple[dict[str, dict[str, _Instr]], str]:
  """{computation: {instruction: _Instr}} and the entry computation's name."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    if not line.strip() or line.startswith('HloModule'):
      continue
    if not line[0].isspace():
      if line.startswith('}'):
        current = None
        continue
      header = _HEADER_RE.match(line)
      if header and line.rstrip().endswith('{'):
        current = header.group(2)
        comps[current] = {}
        if header.group(1):
          entry = current
      continue
    if current is None:
      continue
    match = _INSTR_RE.match(line)
    if not match:
      continue
    name, shape, op, rest = match.groups()
    operands, attrs = _split_operands(rest)
    comps[current][name] = _Instr(name, shape, op, re.findall(r'%([^\s,()]+)', operands), attrs,
                                  line.lstrip().startswith('ROOT'))
  return comps, entry


def _multiplicities(comps, entry) -> tuple[dict[str, int], int]:
  """How many times each computation runs per execution of the entry, through while loops' trip counts; and how
  many loops had no known trip count (counted once)."""
  edges: dict[str, list[tuple[str, int]]] = {name: [] for name in comps}
  unknown = 0
  for name, instrs in comps.items():
    for ins in instrs.values():
      factor = 1
      if ins.op == 'while':
        trip = _TRIP_RE.search(ins.attrs)
        if trip:
          factor = int(trip.group(1))
        else:
          unknown += 1
      for _, callee in _CALLED_RE.findall(ins.attrs):
        if callee in comps:
          edges[name].append((callee, factor))
      branches = re.search(r'branch_computations=\{([^}]*)\}', ins.attrs)
      if branches:  # every branch counted, as if each ran: an upper bound
        for callee in re.findall(r'%([^\s,]+)', branches.group(1)):
          if callee in comps:
            edges[name].append((callee, 1))
  indegree = {name: 0 for name in comps}
  for callees in edges.values():
    for callee, _ in callees:
      indegree[callee] += 1
  mult = {name: 0 for name in comps}
  mult[entry] = 1
  ready = [name for name, deg in indegree.items() if deg == 0]
  while ready:
    name = ready.pop()
    for callee, factor in edges[name]:
      mult[callee] += mult[name] * factor
      indegree[callee] -= 1
      if indegree[callee] == 0:
        ready.append(callee)
  return mult, unknown


def _upcast_from(comps, instrs, node, into_fusions: bool = True) -> bool:
  """Whether `node` is a bf16 value converted to f32, through bitcasts, copies, reshapes and transposes, and (with
  `into_fusions`) through a fusion whose computation ends so."""
  for _ in range(8):
    if node is None:
      return False
    if node.op == 'convert':
      source = instrs.get(node.operands[0]) if node.operands else None
      return source is not None and source.shape.startswith('bf16')
    if into_fusions and node.op == 'fusion':
      called = re.search(r'calls=%([^\s,]+)', node.attrs)
      fused = comps.get(called.group(1), {}) if called else {}
      return _upcast_from(comps, fused, next((i for i in fused.values() if i.root), None), into_fusions=False)
    if node.op not in _PASS_THROUGH or not node.operands:
      return False
    node = instrs.get(node.operands[0])
  return False


def _is_upcast(comps, instrs, name: str) -> bool:
  """Whether value `name` is a bf16 value converted to f32 just before a collective (the CPU's promotion)."""
  return _upcast_from(comps, instrs, instrs.get(name))


def _only_sliced(comps, instrs, users, name: str, depth: int = 0) -> bool:
  """Whether every use of value `name` ends in a slice of it, through converts, bitcasts and fusions of those."""
  if depth > 8 or not users.get(name):
    return False
  for user in users[name]:
    node = instrs[user]
    if node.op in ('dynamic-slice', 'slice'):
      continue
    if node.op in _PASS_THROUGH:
      if not _only_sliced(comps, instrs, users, user, depth + 1):
        return False
      continue
    if node.op == 'fusion':
      called = re.search(r'calls=%([^\s,]+)', node.attrs)
      body = comps.get(called.group(1), {}) if called else {}
      ops = {i.op for i in body.values()}
      if ops & {'dynamic-slice', 'slice'}:
        continue
      if ops <= set(_PASS_THROUGH) | {'parameter'} and _only_sliced(comps, instrs, users, user, depth + 1):
        continue
    return False
  return True


def _group_size(attrs: str, num_devices: int) -> int:
  listed = re.search(r'replica_groups=\{\{([0-9,]*)\}', attrs)
  if listed:
    return len([x for x in listed.group(1).split(',') if x])
  iota = re.search(r'replica_groups=\[(\d+),(\d+)\]<=', attrs)
  if iota:
    return int(iota.group(2))
  named = re.search(r'replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}', attrs)
  if named:
    sizes = {a: int(s) for a, s in re.findall(r"'([^']+)'=(\d+)", named.group(1))}
    return math.prod(sizes.get(a, 1) for a in re.findall(r"'([^']+)'", named.group(2)))
  return num_devices  # replica_groups={} : every device


def collective_traffic(text: str, num_devices: int) -> dict[str, Any]:
  """Per kind: executions per step, payload bytes and wire bytes per device as compiled, and wire bytes with the
  CPU's promotions to f32 undone and sliced all-reduces counted as reduce-scatters (see the module docstring)."""
  comps, entry = parse_hlo(text)
  mult, unknown_loops = _multiplicities(comps, entry)
  kinds = {k: dict(count=0, bytes=0.0, wire=0.0, wire_gpu_tpu=0.0) for k in COLLECTIVES}
  starts = {}
  for comp_name, instrs in comps.items():
    times = mult.get(comp_name, 0)
    if not times:
      continue
    users: dict[str, list[str]] = {}
    for ins in instrs.values():
      for operand in ins.operands:
        users.setdefault(operand, []).append(ins.name)
    for ins in instrs.values():
      op = ins.op
      if op.endswith('-start') and op[:-6] in COLLECTIVES:
        starts[ins.name] = ins
        continue
      attrs, operands = ins.attrs, ins.operands
      if op.endswith('-done') and op[:-5] in COLLECTIVES:
        start = starts.get(operands[0]) if operands else None
        op = op[:-5]
        if start is not None:
          attrs, operands = start.attrs, start.operands
      elif op not in COLLECTIVES:
        continue
      arrays = _arrays(ins.shape)
      group = _group_size(attrs, num_devices)
      reducer = re.search(r'to_apply=%([^\s,]+)', attrs)
      promoted_all = bool(reducer) and 'promoted' in reducer.group(1)
      stats = kinds[op]
      stats['count'] += times
      for index, (dtype, size) in enumerate(arrays):
        operand = operands[index] if index < len(operands) else None
        promoted = promoted_all or (dtype == 'f32' and operand is not None and _is_upcast(comps, instrs, operand))
        if op == 'all-reduce':
          if len(arrays) > 1:
            element_users = [u for u in users.get(ins.name, []) if instrs[u].op == 'get-tuple-element' and
                             re.search(rf'\bindex={index}\b', instrs[u].attrs)]
            sliced = bool(element_users) and all(_only_sliced(comps, instrs, users, u) for u in element_users)
          else:
            sliced = _only_sliced(comps, instrs, users, ins.name)
          wire = 2 * (group - 1) / group * size
          gpu = ((group - 1) / group if sliced else 2 * (group - 1) / group) * size
        elif op == 'reduce-scatter':
          wire = gpu = (group - 1) * size
        elif op == 'collective-permute':
          pairs = re.findall(r'\{(\d+),(\d+)\}', attrs.split('source_target_pairs=')[-1])
          moving = sum(1 for a, b in pairs if a != b) / max(num_devices, 1)
          wire = gpu = size * moving
        else:  # all-gather (size is the gathered result), all-to-all
          wire = gpu = (group - 1) / group * size
        stats['bytes'] += times * size
        stats['wire'] += times * wire
        stats['wire_gpu_tpu'] += times * gpu * (0.5 if promoted else 1.0)
  kinds['loops without a known trip count'] = unknown_loops
  return kinds


# ---------------------------------------------------------------------------------------------------------------
# One compilation (in the subprocess).


def compile_one(size: str, shape: Sequence[int], batch_per_device: int, remat: str, microbatches: int) -> dict:
  import jax
  import numpy as np
  from mirasol_jax import sharding
  from mirasol_jax import train
  config = make_config(size, shape, batch_per_device, remat, microbatches)
  refusal = mesh_refusal(Preset(size), shape, config.batch_size)
  if refusal:
    return {'size': size, 'mesh': list(shape), 'refused': refusal}
  train.check_config(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  rules = tuple(tuple(rule) for rule in config.axis_rules)
  start = time.perf_counter()
  step = train.build_train_step(config, mesh, rules)
  lowered = step.lower()
  lowered_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start - lowered_s
  memory = compiled.memory_analysis()

  def shard_bytes(leaf):
    return int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize

  state = {part: sum(shard_bytes(leaf) for leaf in jax.tree.leaves(step.abstract[part]))
           for part in step.abstract}
  batch = sum(shard_bytes(leaf) for leaf in step.batch_shapes.values())
  result = {
      'size': size, 'mesh': list(shape), 'devices': jax.device_count(), 'remat': remat,
      'batch_per_device': batch_per_device, 'global_batch': config.batch_size, 'microbatches': microbatches,
      'lower_s': lowered_s, 'compile_s': compile_s,
      'rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      'state_bytes': state, 'batch_bytes': batch,
      'collectives': collective_traffic(compiled.as_text(), jax.device_count()),
  }
  if memory is not None:
    result['memory'] = {
        'arguments': memory.argument_size_in_bytes, 'outputs': memory.output_size_in_bytes,
        'aliased': memory.alias_size_in_bytes, 'temporaries': memory.temp_size_in_bytes,
        'generated_code': memory.generated_code_size_in_bytes,
    }
    m = result['memory']
    m['peak'] = m['arguments'] + m['outputs'] - m['aliased'] + m['temporaries'] + m['generated_code']
  return result


def run_subprocess(size: str, shape: Sequence[int], remat: str, batch_per_device: int, args) -> dict:
  """Compiles one mesh in a fresh Python with as many virtual CPU devices as the mesh has.

  LLVM's optimisation of the CPU code is turned off (--xla_backend_optimization_level=0): it halves the compile
  time and changes nothing measured here, which is all decided before code generation (the same memory analysis
  and collectives, checked on the tiny preset).
  """
  devices = math.prod(shape)
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith('--xla_force_host_platform_device_count')]
  env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={devices}',
                                       '--xla_backend_optimization_level=0'])
  env['JAX_PLATFORMS'] = 'cpu'
  command = [sys.executable, os.path.abspath(__file__), '--worker', '--sizes', size, '--meshes', mesh_name(shape),
             '--remat', remat, '--batch_per_device', str(batch_per_device),
             '--microbatches', str(args.microbatches)]
  start = time.perf_counter()
  try:
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
  except subprocess.TimeoutExpired:
    return {'size': size, 'mesh': list(shape), 'error': f'compilation took more than --timeout={args.timeout} s'}
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT_PREFIX):
      result = json.loads(line[len(RESULT_PREFIX):])
      # The SPMD partitioner's warnings that it could not reshard a value and replicated it whole: where the
      # shardings of the model disagree (a cost the collectives above include).
      replicated = sorted({m.group(1) for m in re.finditer(r'Involuntary full rematerialization.*?op_name="([^"]+)"',
                                                           proc.stderr or '')})
      result.update(wall_s=time.perf_counter() - start, replicated_by_partitioner=replicated)
      return result
  tail = '\n'.join(line for line in (proc.stderr or '').splitlines() if 'Involuntary' not in line)[-2000:]
  return {'size': size, 'mesh': list(shape), 'error': f'exit code {proc.returncode}: {tail}'}


# ---------------------------------------------------------------------------------------------------------------
# Reports.


UNIT = ['GB', GB]  # MB in --quick


def _num(x: float, width: int = 7) -> str:
  return f'{x / UNIT[1]:{width}.2f}'


def fits(peak: float) -> str:
  return '  '.join(f'{"fits" if peak <= USABLE * hw["memory"] else "NO":>4}' for hw in HARDWARE.values())


def print_compiled(results: list[dict]) -> None:
  u = UNIT[0]
  chips = ' / '.join(f'{name} {hw["memory"] / GB:.0f} GB' for name, hw in HARDWARE.items())
  print(f'\nXLA memory analysis per device ({u}); peak = arguments + outputs - aliased + temporaries + code; fits: '
        f'peak <= {USABLE:.0%} of {chips}')
  print(f'{"size":>5} {"mesh":>9} {"remat":>13} {"global":>6} {"args":>7} {"outputs":>7} {"aliased":>7} '
        f'{"temps":>7} {"code":>7} {"peak":>7} {"state":>7} {"H100":>4}  {"v5p":>4}  {"compile s":>9} {"RSS GB":>6}')
  for r in results:
    m = r['memory']
    state = sum(r['state_bytes'].values())
    print(f'{r["size"]:>5} {mesh_name(r["mesh"]):>9} {r["remat"]:>13} {r["global_batch"]:>6} {_num(m["arguments"])} '
          f'{_num(m["outputs"])} {_num(m["aliased"])} {_num(m["temporaries"])} {_num(m["generated_code"])} '
          f'{_num(m["peak"])} {_num(state)} {fits(m["peak"])}  {r["compile_s"]:9.0f} {r["rss_bytes"] / GB:6.1f}')
  print(f'\nCollectives per device per step, compiled for CPU: ops executed (loops multiplied out) and wire {u} '
        f'(payload {u} in brackets); last column: wire {u} as GPU/TPU compilers would move it')
  print(f'{"size":>5} {"mesh":>9} {"remat":>13} ' + ' '.join(f'{k:>26}' for k in COLLECTIVES) +
        f' {"GPU/TPU":>8}')
  for r in results:
    c = r['collectives']
    cells = [f'{c[k]["count"]:>5} {_num(c[k]["wire"], 8)} ({_num(c[k]["bytes"], 0).strip()})' for k in COLLECTIVES]
    print(f'{r["size"]:>5} {mesh_name(r["mesh"]):>9} {r["remat"]:>13} ' + ' '.join(f'{x:>26}' for x in cells) +
          f' {_num(sum(c[k]["wire_gpu_tpu"] for k in COLLECTIVES), 8)}')
    if c['loops without a known trip count']:
      print(f'      {c["loops without a known trip count"]} loop(s) without a known trip count: their collectives '
            'were counted once')
    for op_name in r.get('replicated_by_partitioner', []):
      print(f'      the SPMD partitioner replicated a value it could not reshard: {op_name}')


def check_analytic(results: list[dict], presets: dict[str, Preset]) -> dict[tuple[str, str], float]:
  """Prints the analytic model beside the compiled figures; returns XLA's peak over the model's per (size, remat),
  the largest over the compiled meshes, to scale extrapolations."""
  u = UNIT[0]
  print(f'\nAnalytic model against the compiler, per device ({u}; traffic: wire {u} per step, GPU/TPU)')
  print(f'{"size":>5} {"mesh":>9} {"remat":>13} {"state":>7} {"XLA st.":>7} {"grads":>7} {"acts":>7} {"model":>7} '
        f'{"XLA peak":>8} {"XLA/mod":>7} {"traffic":>8} {"XLA":>8} {"XLA/mod":>7}')
  ratios: dict[tuple[str, str], float] = {}
  for r in results:
    preset = presets[r['size']]
    model = analytic_memory(preset, r['mesh'], r['batch_per_device'], r['remat'], r['microbatches'])
    ratio = r['memory']['peak'] / model['total']
    key = (r['size'], r['remat'])
    ratios[key] = max(ratios.get(key, 0.0), ratio)
    traffic = sum(analytic_traffic(preset, r['mesh'], r['batch_per_device'], r['remat']).values())
    compiled = sum(r['collectives'][k]['wire_gpu_tpu'] for k in COLLECTIVES)
    xla_state = r['state_bytes']['params'] + r['state_bytes']['opt_state']
    print(f'{r["size"]:>5} {mesh_name(r["mesh"]):>9} {r["remat"]:>13} {_num(model["state"])} {_num(xla_state)} '
          f'{_num(model["gradients"])} {_num(model["activations"])} {_num(model["total"])} '
          f'{_num(r["memory"]["peak"], 8)} {ratio:7.2f} {_num(traffic, 8)} {_num(compiled, 8)} '
          f'{compiled / max(traffic, 1.0):7.2f}')
  return ratios


# ---------------------------------------------------------------------------------------------------------------
# Meshes for many chips, on paper.

# bf16 dense peak; memory; devices per node joined by the fast links (None: one interconnect for the whole
# slice); bandwidth per device inside a node and between nodes, GB/s one way. H100: NVLink 4, and one 400 Gb/s
# network card per GPU. TPU v5p: its inter-chip links, about 200 GB/s for a ring along one axis of the torus.
HARDWARE = {
    'H100': dict(memory=80 * GB, tflops=989.0, node=8, intra_gbs=450.0, inter_gbs=50.0),
    'TPU v5p': dict(memory=95 * GB, tflops=459.0, node=None, intra_gbs=200.0, inter_gbs=200.0),
}
ACHIEVED = 0.5  # fraction of the peak the matmuls reach, for the compute time of a step
# Compute of a step relative to no remat: `full` runs the forward pass twice; the dots policies recompute the
# elementwise work (and `dots_no_batch` the attention).
RECOMPUTE = {'none': 1.0, 'dots': 1.02, 'dots_no_batch': 1.1, 'full': 4 / 3}


def candidate_meshes(chips: int) -> list[tuple[int, int, int]]:
  shapes = []
  for tensor in (1, 2, 4, 8):
    fsdp = 1
    while fsdp * tensor <= chips:
      if chips % (fsdp * tensor) == 0:
        shapes.append((chips // (fsdp * tensor), fsdp, tensor))
      fsdp *= 2
  return shapes


def axis_bandwidth(hw: dict, shape: Sequence[int], axis: str) -> float:
  """Bytes/s one device moves in a collective over `axis`: the mesh puts tensor innermost, then fsdp, then data
  (sharding.make_mesh), so a group spans its size times the product of the inner axes' sizes in device ids."""
  index = MESH_AXES.index(axis)
  span = shape[index] * math.prod(shape[index + 1:])
  inside = hw['node'] is None or span <= hw['node']
  return 1e9 * (hw['intra_gbs'] if inside else hw['inter_gbs'])


def step_estimate(preset: Preset, shape: Sequence[int], per_shard: int, policy: str, hw: dict,
                  scale: float) -> dict[str, float]:
  """Peak memory (the analytic model times `scale`), compute and communication time of one step on `hw`."""
  compute = (per_shard * preset.train_flops() * RECOMPUTE[policy] / shape[2] / (hw['tflops'] * 1e12 * ACHIEVED))
  traffic = analytic_traffic(preset, shape, per_shard, policy)
  comm = sum(bytes_ / axis_bandwidth(hw, shape, axis) for axis, bytes_ in traffic.items())
  step = max(compute, comm)  # collectives overlap compute (XLA's asynchronous collectives)
  return dict(peak=scale * analytic_memory(preset, shape, per_shard, policy)['total'], compute_s=compute,
              comm_s=comm, step_s=step, examples_per_chip_s=per_shard / shape[2] / step)


def largest_batch(preset: Preset, shape: Sequence[int], policy: str, memory: float, scale: float,
                  limit: int = 1024) -> int:
  """The largest power of two examples per data-parallel shard whose scaled peak fits in USABLE x memory; 0 if
  not even one does."""
  b = 0
  while b < limit and scale * analytic_memory(preset, shape, max(2 * b, 1), policy)['total'] <= USABLE * memory:
    b = max(2 * b, 1)
  return b


def _scale(ratios: dict, size: str, policy: str) -> float:
  """XLA/model for the size and policy; the largest measured ratio where that pair was not compiled."""
  return ratios.get((size, policy), max(ratios.values(), default=1.0))


def valid_meshes(preset: Preset, chips: int) -> list[tuple[int, int, int]]:
  return [s for s in candidate_meshes(chips) if not preset.shards(s)['uneven']]


def recommend(presets: dict[str, Preset], ratios: dict, chips_list: Sequence[int],
              max_global_batch: int) -> list[dict]:
  """Per size, chip count and hardware: among the meshes that divide every sharded dimension, the remat policies
  and per-device batches (powers of two) that fit, at most max_global_batch clips in all, the most examples per
  second per chip on paper; within 5% of that, the smallest global batch, then the least tensor parallelism,
  then the lowest peak memory."""
  rows = []
  for size, preset in presets.items():
    for chips in chips_list:
      for hw_name, hw in HARDWARE.items():
        options = []
        for shape in valid_meshes(preset, chips):
          shards = shape[0] * shape[1]
          for policy in ('none', 'dots_no_batch', 'full'):
            scale = _scale(ratios, size, policy)
            b = 1
            while b * shards <= max_global_batch:
              estimate = step_estimate(preset, shape, b, policy, hw, scale)
              if estimate['peak'] > USABLE * hw['memory']:
                break
              options.append(dict(size=size, chips=chips, hardware=hw_name, mesh=mesh_name(shape), remat=policy,
                                  batch_per_device=b, global_batch=b * shards, tensor=shape[2], scale=scale,
                                  largest_fitting=largest_batch(preset, shape, policy, hw['memory'], scale),
                                  **estimate))
              b *= 2
        if not options:
          rows.append(dict(size=size, chips=chips, hardware=hw_name, mesh='nothing fits'))
          continue
        best = max(o['examples_per_chip_s'] for o in options)
        good = [o for o in options if o['examples_per_chip_s'] >= 0.95 * best]
        rows.append(min(good, key=lambda o: (o['global_batch'], o['tensor'], o['peak'])))
  return rows


def print_extrapolation(presets: dict[str, Preset], ratios: dict, chips_list: Sequence[int]) -> None:
  """Per size and chip count, for each tensor size the mesh with the most fsdp that divides: state and peak per
  device at one example per data-parallel shard, and the largest per-device batch that fits."""
  print(f'\nExtrapolated: the analytic model x its XLA/model ratio (GB per device; state: parameters and Adam '
        f'moments; b/dev: the largest power of two examples per data-parallel shard within {USABLE:.0%})')
  print(f'{"size":>5} {"chips":>6} {"mesh":>10} {"remat":>13} {"state":>7} {"peak@1":>7} {"H100 b/dev":>10} '
        f'{"v5p b/dev":>9}')
  for size, preset in presets.items():
    for chips in chips_list:
      for tensor in (1, 4, 8):
        shapes = [s for s in valid_meshes(preset, chips) if s[2] == tensor]
        if not shapes:
          continue
        shape = max(shapes, key=lambda s: s[1])
        for policy in ('none', 'full'):
          scale = _scale(ratios, size, policy)
          model = analytic_memory(preset, shape, 1, policy)
          fitting = [largest_batch(preset, shape, policy, hw['memory'], scale) for hw in HARDWARE.values()]
          print(f'{size:>5} {chips:>6} {mesh_name(shape):>10} {policy:>13} {model["state"] / GB:7.2f} '
                f'{scale * model["total"] / GB:7.2f} {fitting[0]:>10} {fitting[1]:>9}')


def print_recommendations(rows: list[dict], max_global_batch: int) -> None:
  print(f'\nRecommended meshes, on paper: memory from the analytic model x its XLA/model ratio, within {USABLE:.0%} '
        f'of the chip; step = max(compute at {ACHIEVED:.0%} of peak, collectives at the links\' bandwidth); '
        f'global batch = batch/dev x data x fsdp <= {max_global_batch}; max b/dev: the largest that fits')
  print(f'{"size":>5} {"chips":>6} {"hardware":>8} {"mesh DxFxT":>11} {"remat":>13} {"batch/dev":>9} '
        f'{"global":>7} {"peak GB":>7} {"compute s":>9} {"comm s":>7} {"ex/s/chip":>9} {"max b/dev":>9}')
  for r in rows:
    if 'remat' not in r:
      print(f'{r["size"]:>5} {r["chips"]:>6} {r["hardware"]:>8} {r["mesh"]:>11}')
      continue
    print(f'{r["size"]:>5} {r["chips"]:>6} {r["hardware"]:>8} {r["mesh"]:>11} {r["remat"]:>13} '
          f'{r["batch_per_device"]:>9} {r["global_batch"]:>7} {r["peak"] / GB:7.1f} {r["compute_s"]:9.3f} '
          f'{r["comm_s"]:7.3f} {r["examples_per_chip_s"]:9.2f} {r["largest_fitting"]:>9}')


def verify_recommendations(rows: list[dict], presets: dict[str, Preset], args) -> list[dict]:
  """Compiles each recommended configuration and prints XLA's peak beside the predicted one."""
  compiled, done = [], {}
  for row in rows:
    key = (row['size'], row['mesh'], row['remat'], row['batch_per_device'])
    if key not in done:
      shape = parse_mesh(row['mesh'])
      print(f'{row["size"]} mesh {row["mesh"]} ({math.prod(shape)} devices, remat {row["remat"]}, global batch '
            f'{row["global_batch"]}): compiling the recommendation ...', flush=True)
      done[key] = run_subprocess(row['size'], shape, row['remat'], row['batch_per_device'], args)
      if 'memory' in done[key]:
        compiled.append(done[key])
  print('\nRecommendations compiled (GB per device): predicted peak (analytic x ratio) and XLA\'s')
  print(f'{"size":>5} {"chips":>6} {"hardware":>8} {"mesh":>10} {"remat":>13} {"batch/dev":>9} {"predicted":>9} '
        f'{"XLA":>7} {"H100":>4}  {"v5p":>4}')
  for row in rows:
    result = done[(row['size'], row['mesh'], row['remat'], row['batch_per_device'])]
    if 'memory' not in result:
      print(f'{row["size"]:>5} {row["chips"]:>6} {row["hardware"]:>8} {row["mesh"]:>10}  failed: '
            f'{result.get("error") or result.get("refused")}')
      continue
    peak = result['memory']['peak']
    print(f'{row["size"]:>5} {row["chips"]:>6} {row["hardware"]:>8} {row["mesh"]:>10} {row["remat"]:>13} '
          f'{row["batch_per_device"]:>9} {row["peak"] / GB:9.2f} {peak / GB:7.2f} {fits(peak)}')
    row['xla_peak'] = peak
  return compiled


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--sizes', default='3b,10b', help='comma-separated presets of mirasol_jax/models/sizes.py')
  parser.add_argument('--meshes', default='', help='comma-separated DATAxFSDPxTENSOR; default: DEFAULT_MESHES')
  parser.add_argument('--remat', default='full', choices=REMAT_POLICIES, help='config.model.remat_policy')
  parser.add_argument('--check_remat', default='none,dots_no_batch',
                      help='policies also compiled on the first mesh of each size, to check the model for them')
  parser.add_argument('--batch_per_device', type=int, default=1, help='examples per data-parallel shard')
  parser.add_argument('--check_batch', type=int, default=4,
                      help='also compile the first mesh of each size with this batch per device (0: no)')
  parser.add_argument('--microbatches', type=int, default=1)
  parser.add_argument('--chips', default='64,256,1024', help='chip counts to recommend meshes for')
  parser.add_argument('--max_global_batch', type=int, default=2048)
  parser.add_argument('--verify_chips', default='1024',
                      help='compile the recommendations for these chip counts and print XLA beside the prediction')
  parser.add_argument('--timeout', type=int, default=1800, help='seconds per compilation')
  parser.add_argument('--json', default='', help='write every figure to this file')
  parser.add_argument('--from_json', default='',
                      help="--json files of earlier runs (comma-separated): their compiled figures analysed "
                      'again, nothing compiled')
  parser.add_argument('--quick', action='store_true', help='the tiny preset on 4 devices, no recommendations')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.quick:
    args.sizes = 'tiny' if args.sizes == '3b,10b' else args.sizes
    args.meshes = args.meshes or ','.join(QUICK_MESHES)
    args.check_remat = ''
    args.check_batch = 0
    UNIT[:] = ['MB', 1e6]
  sizes = [s for s in args.sizes.split(',') if s]
  try:
    meshes = {size: [parse_mesh(m) for m in (args.meshes.split(',') if args.meshes else DEFAULT_MESHES[size])]
              for size in sizes}
  except (KeyError, ValueError) as e:
    sys.exit(f'error: {e} (sizes with default meshes: {sorted(DEFAULT_MESHES)}; give --meshes for others)')

  if args.worker:
    result = compile_one(sizes[0], meshes[sizes[0]][0], args.batch_per_device, args.remat, args.microbatches)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return

  results, refused, presets = [], [], {}
  if args.from_json:
    for path in args.from_json.split(','):
      with open(path) as f:
        results += [r for r in json.load(f)['compiled'] if r['size'] in sizes]
    sizes, meshes = [s for s in sizes if any(r['size'] == s for r in results)], {}
  for size in sizes:
    presets[size] = Preset(size)
    if args.from_json:
      continue
    # The meshes, and on the first one the other remat policies and a larger batch: the analytic model is checked
    # on every policy the recommendations use and on how activations grow with the batch.
    first = meshes[size][0]
    runs = [(shape, args.remat, args.batch_per_device) for shape in meshes[size]]
    runs[1:1] = [(first, p, args.batch_per_device) for p in args.check_remat.split(',') if p and p != args.remat]
    if args.check_batch and args.check_batch != args.batch_per_device:
      runs.insert(1, (first, args.remat, args.check_batch))
    for shape, remat, batch_per_device in runs:
      config = make_config(size, shape, batch_per_device, remat, args.microbatches)
      reason = mesh_refusal(presets[size], shape, config.batch_size)
      if reason:
        print(f'{size} mesh {mesh_name(shape)}: refused: {reason}', flush=True)
        refused.append({'size': size, 'mesh': list(shape), 'refused': reason})
        continue
      print(f'{size} mesh {mesh_name(shape)} ({math.prod(shape)} devices, remat {remat}, global batch '
            f'{config.batch_size}): compiling ...', flush=True)
      result = run_subprocess(size, shape, remat, batch_per_device, args)
      if 'memory' not in result:
        print(f'  failed: {result.get("error") or result.get("refused") or "no memory analysis"}', flush=True)
        refused.append(result)
        continue
      print(f'  compiled in {result["compile_s"]:.0f} s (lowered in {result["lower_s"]:.0f} s), RSS '
            f'{result["rss_bytes"] / GB:.1f} GB; peak {_num(result["memory"]["peak"], 0).strip()} {UNIT[0]} per '
            'device', flush=True)
      results.append(result)

  ratios, rows = {}, []
  if results:
    print_compiled(results)
    ratios = check_analytic(results, presets)
    if not args.quick:
      chips = [int(c) for c in args.chips.split(',')]
      print_extrapolation(presets, ratios, chips)
      rows = recommend(presets, ratios, chips, args.max_global_batch)
      print_recommendations(rows, args.max_global_batch)
      verify = [int(c) for c in args.verify_chips.split(',') if c and not args.from_json]
      verified = verify_recommendations([r for r in rows if r['chips'] in verify and 'remat' in r], presets, args)
      results += verified
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'compiled': results, 'refused': refused, 'ratios': {f'{k[0]}/{k[1]}': v for k, v in ratios.items()},
                 'recommendations': rows}, f, indent=1)
  if refused:
    sys.exit(f'{len(refused)} mesh(es) refused or failed')


if __name__ == '__main__':
  main()
