"""Pretrained towers: the video and audio encoders initialised from image ViT checkpoints in big_vision's `.npz`.

Where it sits: a fresh run's parameters are the random initialisation, then config.init_from's arrays, then the
encoders named by config.init_video_encoder and config.init_audio_encoder (`load_towers`, called by
train.load_init_from; a resumed run reads its own checkpoint instead).

The layout read is the one google-research/big_vision defines:

* big_vision/utils.py: `save_checkpoint` (its `.npz` writer until it moved to tensorstore in 2023) stores
  `np.savez` of the tree flattened by `tree_flatten_with_names`, '/'-joined names such as
  `params/embedding/kernel`; `load_params` takes the parameters from under `params/`, from under `opt/target/` (Flax
  optimizer checkpoints) or from the top (the published ViT files), and a `:key` after the file name picks a
  sub-model (`siglip.npz:img`); `recover_dtype` views the void arrays that np.savez writes for bfloat16 as bfloat16.
* big_vision/models/vit.py: `_Model` holds `embedding` (the patch Conv: kernel [ph, pw, 3, D], HWIO), `pos_embedding`
  [1, N, D] (posemb 'learn'), `cls` [1, 1, D] (pool_type 'tok'), `Transformer` (an `Encoder`: `encoderblock_{i}` per
  layer, or with `scan` one `encoderblock` whose arrays have a leading depth axis, see `pyloop_to_scan`; then
  `encoder_norm`), and the heads `MAPHead_0`, `pre_logits`, `head`. An `Encoder1DBlock` is `LayerNorm_0`,
  `MultiHeadDotProductAttention_0` (`query`, `key`, `value`: kernel [D, heads, head_dim], bias [heads, head_dim];
  `out`: kernel [heads, head_dim, D], bias [D]), `LayerNorm_1`, `MlpBlock_0` (`Dense_0` [D, mlp], `Dense_1`
  [mlp, D]). `fix_old_checkpoints` renames pre-Linen modules (numbered across types: `LayerNorm_2`,
  `MlpBlock_3`), here with flax's own `convert_pre_linen`.

| big_vision (blocks under `Transformer/`)              | ours (under `video_encoder/` and `audio_encoder/`)     |
|-------------------------------------------------------|--------------------------------------------------------|
| `encoderblock_{i}/LayerNorm_0/{scale,bias}`           | `vit/layers_{i}/ln_self/{scale,bias}`                  |
| `encoderblock_{i}/MultiHeadDotProductAttention_0/`    | `vit/layers_{i}/self_attn/`                            |
|   `{query,key,value,out}/{kernel,bias}`               |   `{query,key,value,out}/{kernel,bias}`, same shapes   |
| `encoderblock_{i}/LayerNorm_1/{scale,bias}`           | `vit/layers_{i}/ln_mlp/{scale,bias}`                   |
| `encoderblock_{i}/MlpBlock_0/Dense_0`, `.../Dense_1`  | `vit/layers_{i}/mlp/fc1`, `.../fc2`                    |
| `encoder_norm/{scale,bias}`                           | `vit/ln_final/{scale,bias}`                            |
| `embedding/kernel` [ph, pw, 3, D]                     | video `tube_{j}/kernel` [kt, kh, kw, 3, D],            |
|                                                       | audio `patch_embed/kernel` [pf, pm, 1, D]              |
| `embedding/bias` [D]                                  | every `tube_{j}/bias`, audio `patch_embed/bias`        |
| `pos_embedding`, `cls`, `MAPHead_0`, `pre_logits`,    | not loaded                                             |
| `head`                                                |                                                        |

With config.model.scan_layers the blocks are one `vit/layers/...` with a leading layer axis, whichever of the two
layouts the checkpoint has. The blocks compute what big_vision's do (pre-LayerNorm with flax's default epsilon, tanh
GELU, attention scaled by 1/sqrt(head_dim)), so a loaded tower encodes its tokens as the ViT would.

Rules, and where they come from:

* Width, heads, head_dim and mlp_dim must be the checkpoint's: an error names the array and both shapes. A deeper
  checkpoint gives its first `depth` blocks (with a warning; `encoder_norm` still loads); a shallower one is an
  error, as it would leave random blocks above pretrained ones.
* Another patch size: each kernel sees a patch as the checkpoint's sees the same pixels enlarged bilinearly to the
  larger of the two sizes. To a larger patch this is PI-resize (FlexiViT, Beyer et al., CVPR 2023;
  big_vision/models/proj/flexi/vit.py `resample_patchemb`): the least-norm w' with <enlarge(x), w'> = <x, w>. To a
  smaller one (the base config's 4x4, 8x8 and 12x12 tubes from 16x16 patches) it is w' = enlarge^T w, which makes
  <x', w'> = <enlarge(x'), w> exact, where FlexiViT's least squares through a shrink would be approximate and, with
  its resize (tf.image.resize, not antialiased), would read only 2 of every 4 pixels of a 16-to-4 shrink. Either way
  a uniform patch keeps its token.
* Tubes (TubeViT, Piergiovanni et al., CVPR 2023): a tube of one frame is TubeViT's 2D patch, the image
  tokenizer itself (its Sec. 3.6 reuses a pretrained image ViT's). A tube of kt frames gets the 2D kernel, resized to
  (kh, kw) as above, repeated over its kt frames and divided by kt: the inflation of I3D (Carreira and Zisserman,
  2017), which TubeViT cites for initialising 3D kernels from image ones and compares with ('Inflated 3D patches', its
  Table 5). The tube kernel summed over time is then the resized 2D kernel, so a still clip gives the tube the token
  that kernel gives one frame. (TubeViT's own tube kernels are learned; its 'interpolated kernels' ablation resizes
  one learned 3D kernel to every tube.)
* Audio from an image ViT (AST, Gong et al., Interspeech 2021): the kernel summed over its three input channels, as
  AST's code does (a spectrogram copied into R, G and B gives the same token), image rows on mel bins and columns on
  time (AST turns its [time, mel] input into a [mel, time] image), then resized as above to
  config.model.audio.patch_size.
* Positions are not loaded: both towers add fixed sin-cos embeddings (at tube centres for video, TubeViT's choice:
  fixed sin-cos beat learned positions in its Table 7a) and have no learned position array to resample into.
* Inputs: the video tower feeds the ViT pixels in [-1, 1], big_vision's `value_range(-1, 1)`; a checkpoint trained on
  other inputs (ImageNet mean and std) needs its first layer converted first, as big_vision did for DeiT-3.
"""
from __future__ import annotations

import os
import re
import zipfile
from typing import Any, Sequence

import flax
import jax
import ml_dtypes
import numpy as np
from flax.training import checkpoints as flax_checkpoints

from mirasol_jax.checkpoint import MismatchError

TOWERS = {'video': 'video_encoder', 'audio': 'audio_encoder'}  # config.init_<key>_encoder -> params subtree

# big_vision Encoder1DBlock module -> layers.Block module; the arrays inside keep their names and shapes.
BLOCK_MODULES = {
    'LayerNorm_0': 'ln_self',
    'MultiHeadDotProductAttention_0': 'self_attn',
    'LayerNorm_1': 'ln_mlp',
    'MlpBlock_0/Dense_0': 'mlp/fc1',
    'MlpBlock_0/Dense_1': 'mlp/fc2',
}
_STACK = 'vit'  # the layers.Stack inside both encoders
_BLOCK_RE = re.compile(r'^Transformer/encoderblock_(\d+)/(.+)$')


# ---------------------------------------------------------------------------------------------------------------
# Reading a checkpoint.


def _split_submodel(path: str) -> tuple[str, str]:
  """'file.npz:img' -> ('file.npz', 'img'), as big_vision's load_params reads it; ('file.npz', '') without a key."""
  file, sep, key = path.rpartition(':')
  if sep and re.fullmatch(r'[\w/]+', key) and not os.path.exists(path):
    return file, key.strip('/')
  return path, ''


def _recover_dtype(array: np.ndarray) -> np.ndarray:
  """np.savez writes bfloat16 as a 2-byte void type."""
  if array.dtype.type is np.void and array.dtype.itemsize == 2:
    return array.view(ml_dtypes.bfloat16)
  return array


def read_vit(path: str) -> dict[str, np.ndarray]:
  """The parameters of a big_vision ViT `.npz` (optionally `file.npz:submodel`) as float32 numpy arrays under flat
  names relative to the ViT ('embedding/kernel', 'Transformer/encoderblock_0/LayerNorm_0/scale', ...): the prefix
  `params/` or `opt/target/` removed, pre-Linen names renumbered, scanned blocks split into `encoderblock_{i}`."""
  file, key = _split_submodel(path)
  if not os.path.exists(file):
    raise FileNotFoundError(f'ViT checkpoint {file!r} does not exist')
  try:
    with np.load(file, allow_pickle=False) as npz:
      flat = {name: npz[name] for name in npz.files}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise ValueError(f'ViT checkpoint {file!r} is not a readable .npz of arrays ({type(e).__name__}: {e})') from e
  for prefix in ('params/', 'opt/target/'):
    if any(name.startswith(prefix) for name in flat):
      flat = {name[len(prefix):]: value for name, value in flat.items() if name.startswith(prefix)}
      break
  if key:
    flat = {name[len(key) + 1:]: value for name, value in flat.items() if name.startswith(key + '/')}
    if not flat:
      raise MismatchError(f'{file!r} holds no sub-model {key!r}')
  flat = {name: np.asarray(_recover_dtype(value), np.float32) for name, value in flat.items()}
  tree = flax_checkpoints.convert_pre_linen(flax.traverse_util.unflatten_dict(flat, sep='/'))
  flat = flax.traverse_util.flatten_dict(tree, sep='/')
  scanned = {name: value for name, value in flat.items() if name.startswith('Transformer/encoderblock/')}
  for name, value in scanned.items():
    del flat[name]
    for layer in range(value.shape[0]):
      flat[name.replace('/encoderblock/', f'/encoderblock_{layer}/', 1)] = value[layer]
  if 'embedding/kernel' not in flat or not any(_BLOCK_RE.match(name) for name in flat):
    raise MismatchError(f'{path!r} is not a big_vision ViT checkpoint: no embedding/kernel or no '
                        f'Transformer/encoderblock_* among {sorted(flat)[:8]}...')
  return flat


def vit_depth(vit: dict[str, np.ndarray]) -> int:
  return 1 + max(int(m.group(1)) for name in vit if (m := _BLOCK_RE.match(name)))


# ---------------------------------------------------------------------------------------------------------------
# Patch kernels: PI-resize, inflation to tubes, RGB to one channel.


def linear_resize_matrix(old: int, new: int) -> np.ndarray:
  """[new, old]: linear interpolation of `old` samples to `new` >= old, with half-pixel centres and the edges clamped
  (tf.image.resize 'bilinear', which FlexiViT uses, and jax.image.resize 'linear' agree when enlarging)."""
  source = np.clip((np.arange(new) + 0.5) * old / new - 0.5, 0, old - 1)
  low = np.floor(source).astype(int)
  high = np.minimum(low + 1, old - 1)
  matrix = np.zeros((new, old))
  matrix[np.arange(new), low] += 1 - (source - low)
  matrix[np.arange(new), high] += source - low
  return matrix


def _kernel_resize_matrix(old: int, new: int) -> np.ndarray:
  """[new, old]: one axis of resize_patch_kernel."""
  if new >= old:
    return np.linalg.pinv(linear_resize_matrix(old, new).T)
  return linear_resize_matrix(new, old).T


def resize_patch_kernel(kernel: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """A patch kernel [h, w, in, out] resized to [size[0], size[1], in, out], each axis on its own, so that it sees a
  patch as the old kernel sees the same pixels enlarged (bilinearly) to the larger of the two sizes. To a larger size
  it is FlexiViT's PI-resize, the least-norm w' with <enlarge(x), w'> = <x, w> for every old-size patch x; to a
  smaller one w' = enlarge^T w, so that <x', w'> = <enlarge(x'), w> for every new-size patch x'. Both hold exactly,
  and a uniform patch keeps its token."""
  h, w = kernel.shape[:2]
  size = tuple(int(s) for s in size)
  if (h, w) == size:
    return kernel
  rows, columns = _kernel_resize_matrix(h, size[0]), _kernel_resize_matrix(w, size[1])
  return np.einsum('Yy,Xx,yx...->YX...', rows, columns, kernel.astype(np.float64)).astype(np.float32)


def inflate_to_tube(kernel: np.ndarray, tube_kernel: Sequence[int]) -> np.ndarray:
  """An image patch kernel [h, w, in, out] as the kernel [kt, kh, kw, in, out] of a tube: PI-resized to (kh, kw),
  repeated over the kt frames and divided by kt, so that its sum over time is the resized 2D kernel."""
  kt, kh, kw = (int(k) for k in tube_kernel)
  spatial = resize_patch_kernel(kernel, (kh, kw))
  return np.repeat(spatial[None] / kt, kt, axis=0)


def audio_patch_kernel(kernel: np.ndarray, patch_size: Sequence[int]) -> np.ndarray:
  """An image patch kernel [h, w, C, out] as a spectrogram patch kernel [frames, mel, 1, out]: summed over the C
  input channels, rows on mel bins and columns on time (AST), PI-resized to `patch_size` (frames, mel)."""
  mono = kernel.sum(axis=2, keepdims=True).transpose(1, 0, 2, 3)
  return resize_patch_kernel(mono, patch_size)


# ---------------------------------------------------------------------------------------------------------------
# Mapping a checkpoint onto a tower.


def _describe(target: dict[str, Any]) -> str:
  """'width 64, 2 heads of 32, mlp 256' from a tower's parameter shapes."""
  query = next(value.shape for name, value in target.items() if name.endswith('self_attn/query/kernel'))
  fc1 = next(value.shape for name, value in target.items() if name.endswith('mlp/fc1/kernel'))
  return f'width {query[-3]}, {query[-2]} heads of {query[-1]}, mlp {fc1[-1]}'


def _describe_vit(vit: dict[str, np.ndarray]) -> str:
  query = vit['Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel'].shape
  fc1 = vit['Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'].shape
  return f'width {query[0]}, {query[1]} heads of {query[2]}, mlp {fc1[1]}, depth {vit_depth(vit)}'


def _our_block_layout(target: dict[str, Any]) -> tuple[bool, int, list[str]]:
  """(scanned, depth, names inside one block) of a tower's parameters (flat names relative to the tower)."""
  scanned_prefix = f'{_STACK}/layers/'
  if any(name.startswith(scanned_prefix) for name in target):
    inner = sorted(name[len(scanned_prefix):] for name in target if name.startswith(scanned_prefix))
    return True, int(target[scanned_prefix + inner[0]].shape[0]), inner
  per_layer = [m for name in target if (m := re.match(rf'^{_STACK}/layers_(\d+)/(.+)$', name))]
  depth = 1 + max(int(m.group(1)) for m in per_layer)
  return False, depth, sorted({m.group(2) for m in per_layer})


def _checkpoint_name(inner: str) -> str:
  """A name inside one of our blocks ('self_attn/query/kernel') -> inside a big_vision block."""
  for theirs, ours in BLOCK_MODULES.items():
    if inner.startswith(ours + '/'):
      return theirs + inner[len(ours):]
  raise MismatchError(f'no big_vision array maps to the block parameter {inner!r} (pretrained.BLOCK_MODULES)')


def tower_arrays(vit: dict[str, np.ndarray], target: dict[str, Any], tower: str, source: str = 'the checkpoint'
                 ) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
  """The arrays of `tower` ('video' or 'audio') made from a read_vit checkpoint.

  `target` holds the tower's parameters (arrays or ShapeDtypeStructs) under flat names relative to it
  ('vit/layers/self_attn/query/kernel', 'tube_0/kernel', ...). Returns (name -> float32 array for every parameter
  of the tower, the checkpoint arrays not used, warnings). Raises a MismatchError naming the array whose shape does
  not fit, and both shapes.
  """
  arrays, used, warnings = {}, set(), []
  scanned, depth, inner_names = _our_block_layout(target)
  available = vit_depth(vit)
  if available < depth:
    raise MismatchError(f'{source} has {available} Transformer blocks, the {tower} encoder {depth} '
                        f'(config.model.{tower}.depth): loading it would leave random blocks above pretrained ones')
  if available > depth:
    warnings.append(f'{source} has {available} Transformer blocks: the {tower} encoder takes the first {depth}')

  def take(name: str) -> np.ndarray:
    if name not in vit:
      raise MismatchError(f'{source} has no array {name}')
    used.add(name)
    return vit[name]

  def check(ours: str, value: np.ndarray, theirs: str, needed: tuple[int, ...]) -> None:
    if value.shape != needed:
      raise MismatchError(
          f'{source}: {theirs} has shape {value.shape}, {TOWERS[tower]}/{ours} needs {needed} (the checkpoint: '
          f'{_describe_vit(vit)}; the {tower} encoder, config.model.{tower}: {_describe(target)})')

  for inner in inner_names:
    theirs = _checkpoint_name(inner)
    layers = [take(f'Transformer/encoderblock_{i}/{theirs}') for i in range(depth)]
    if scanned:
      ours, needed = f'{_STACK}/layers/{inner}', tuple(target[f'{_STACK}/layers/{inner}'].shape)
      check(ours, layers[0], f'Transformer/encoderblock_0/{theirs}', needed[1:])
      arrays[ours] = np.stack(layers)
    else:
      for i, value in enumerate(layers):
        ours = f'{_STACK}/layers_{i}/{inner}'
        check(ours, value, f'Transformer/encoderblock_{i}/{theirs}', tuple(target[ours].shape))
        arrays[ours] = value
  for leaf in ('scale', 'bias'):
    ours = f'{_STACK}/ln_final/{leaf}'
    arrays[ours] = take(f'Transformer/encoder_norm/{leaf}')
    check(ours, arrays[ours], f'Transformer/encoder_norm/{leaf}', tuple(target[ours].shape))

  kernel, bias = take('embedding/kernel'), take('embedding/bias')
  patch_kernels = sorted(name for name in target if name.endswith('/kernel') and not name.startswith(_STACK + '/'))
  for ours in patch_kernels:
    needed = tuple(target[ours].shape)
    # Video reads RGB; audio sums whatever input channels the checkpoint has.
    channels, width = (needed[-2] if tower == 'video' else kernel.shape[2]), needed[-1]
    if kernel.shape[2:] != (channels, width):
      raise MismatchError(
          f'{source}: embedding/kernel has shape {kernel.shape}, {TOWERS[tower]}/{ours} {needed} needs '
          f'{channels} input channels and width {width} (the checkpoint: {_describe_vit(vit)}; the {tower} encoder, '
          f'config.model.{tower}: {_describe(target)})')
    if tower == 'video':
      arrays[ours] = inflate_to_tube(kernel, needed[:3])
    else:
      arrays[ours] = audio_patch_kernel(kernel, needed[:2])
    bias_name = ours[:-len('kernel')] + 'bias'
    check(bias_name, bias, 'embedding/bias', tuple(target[bias_name].shape))
    arrays[bias_name] = bias

  missing = sorted(set(target) - set(arrays))
  if missing:
    raise MismatchError(f'no big_vision array maps to {TOWERS[tower]}/{missing[0]} (pretrained.tower_arrays)')
  unused = sorted(name for name in vit if name not in used)
  # An array of a loaded block that our blocks have no place for (a LayerScale, a query-key norm...) means the
  # block computes something else: refused rather than dropped.
  foreign = [name for name in unused if (m := _BLOCK_RE.match(name)) and int(m.group(1)) < depth]
  if foreign:
    raise MismatchError(f'{source}: {foreign[0]} has no place in a {tower} encoder block, which holds '
                        f'{", ".join(sorted(BLOCK_MODULES))} (not a big_vision ViT block)')
  return arrays, unused, warnings


def sources(config) -> dict[str, str]:
  """tower ('video', 'audio') -> the checkpoint config.init_<tower>_encoder names, for the towers that name one."""
  return {tower: path for tower in TOWERS if (path := config.get(f'init_{tower}_encoder', ''))}


def _modules(names: list[str]) -> str:
  """Unused checkpoint arrays by module, the unused blocks as one range: 'Transformer/encoderblock_6..11, cls,
  head, pos_embedding'."""
  blocks = sorted({int(m.group(1)) for name in names if (m := _BLOCK_RE.match(name))})
  modules = sorted({'/'.join(name.split('/')[:2 if name.startswith('Transformer/') else 1])
                    for name in names if not _BLOCK_RE.match(name)})
  if blocks:
    modules.insert(0, f'Transformer/encoderblock_{blocks[0]}' + (f'..{blocks[-1]}' if len(blocks) > 1 else ''))
  return ', '.join(modules)


def load_towers(config, params: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
  """`params` (a model's parameter tree of jax arrays) with the video and audio encoders built from the checkpoints
  of config.init_video_encoder and config.init_audio_encoder, each array placed in the sharding and dtype of the one
  it replaces. Returns (params, the names loaded, a line per tower to log: what was loaded and what was not)."""
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  names, report = [], []
  for tower, path in sources(config).items():
    prefix = TOWERS[tower] + '/'
    target = {name[len(prefix):]: value for name, value in flat.items() if name.startswith(prefix)}
    try:
      vit = read_vit(path)
    except (OSError, ValueError) as e:
      raise ValueError(f'config.init_{tower}_encoder={path!r}: {e}') from e
    arrays, unused, warnings = tower_arrays(vit, target, tower, source=repr(path))
    for name, value in arrays.items():
      old = flat[prefix + name]
      value = np.asarray(value, old.dtype)
      flat[prefix + name] = jax.make_array_from_callback(value.shape, old.sharding, lambda index, v=value: v[index])
      names.append(prefix + name)
    report.append(f'{TOWERS[tower]}: {len(arrays)} arrays from {path}'
                  f'{"; " + "; ".join(warnings) if warnings else ""}; not loaded: {_modules(unused) or "nothing"}')
  return flax.traverse_util.unflatten_dict(flat, sep='/'), names, report
