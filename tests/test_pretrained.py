"""Pretrained towers (mirasol_jax/pretrained.py) from image ViT checkpoints written in big_vision's `.npz` layout.

The checkpoints come from `_ViT`, a few lines of flax with the module classes, names and nesting of big_vision's
models/vit.py (`embedding`, `pos_embedding`, `cls`, `Transformer` with `encoderblock_{i}` or one scanned
`encoderblock`, `encoder_norm`, `head`; a block is LayerNorm, MultiHeadDotProductAttention, LayerNorm, MlpBlock), so
every name and shape in the files is the one flax gives those modules; they are flattened with '/' under `params/`
and written with np.savez, as big_vision's utils.save_checkpoint did.
"""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import test_train
from conftest import tiny_config
from mirasol_jax import checkpoint
from mirasol_jax import pretrained
from mirasol_jax.models import layers
from mirasol_jax.models import mirasol

PATCH = (16, 16)


class MlpBlock(nn.Module):  # the class name gives the module its name, MlpBlock_0
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(self.mlp_dim)(x))  # Dense_0; modules are numbered in the order they are made
    return nn.Dense(x.shape[-1])(h)


class _Block(nn.Module):
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x, _=None):
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(y, y)
    return x + MlpBlock(self.mlp_dim)(nn.LayerNorm()(x)), None


class _Encoder(nn.Module):
  depth: int
  num_heads: int
  mlp_dim: int
  scan: bool = False

  @nn.compact
  def __call__(self, x):
    if self.scan:
      x, _ = nn.scan(_Block, variable_axes={'params': 0}, split_rngs={'params': True}, in_axes=nn.broadcast,
                     length=self.depth)(self.num_heads, self.mlp_dim, name='encoderblock')(x, None)
    else:
      for i in range(self.depth):
        x, _ = _Block(self.num_heads, self.mlp_dim, name=f'encoderblock_{i}')(x)
    return nn.LayerNorm(name='encoder_norm')(x)


class _ViT(nn.Module):
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  scan: bool = False

  @nn.compact
  def __call__(self, image):
    x = nn.Conv(self.width, PATCH, strides=PATCH, padding='VALID', name='embedding')(image)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c) + self.param('pos_embedding', nn.initializers.normal(0.02), (1, h * w, c))
    cls = self.param('cls', nn.initializers.normal(0.02), (1, 1, c))
    x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
    x = _Encoder(self.depth, self.num_heads, self.mlp_dim, self.scan, name='Transformer')(x)
    return nn.Dense(10, name='head')(x[:, 0])


def _random_params(module, seed):
  """The module's parameters with every array random (biases and LayerNorms too, so that a misplaced one shows)."""
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))['params']
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [rng.normal(0, 0.3, leaf.shape).astype(np.float32) for leaf in leaves])


def _write(path, params, prefix='params/', dtype=np.float32):
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  np.savez(path, **{prefix + name: np.asarray(value).astype(dtype) for name, value in flat.items()})
  return str(path)


def _tower_target(tower, scan_layers, **overrides):
  """A tiny config's tower parameters (ShapeDtypeStructs) under flat names relative to the tower."""
  config = tiny_config(scan_layers=scan_layers, **overrides)
  model = mirasol.Model(**config.model)
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), mirasol.example_batch(config, 1))))
  return flax.traverse_util.flatten_dict(shapes['params'][pretrained.TOWERS[tower]], sep='/')


def _video_vit(scan=False, width=64, depth=1, num_heads=2):
  """A ViT that fits the tiny config's video encoder (width 64, 1 block of 2 heads, mlp 256)."""
  return _ViT(width, depth, num_heads, 4 * width, scan)


@pytest.mark.parametrize('scan_file', [False, True], ids=['blocks', 'scanned'])
@pytest.mark.parametrize('scan_layers', [False, True], ids=['unrolled', 'scan_layers'])
def test_loaded_blocks_encode_as_the_vit_does(tmp_path, scan_file, scan_layers):
  vit = _ViT(32, 2, 2, 128, scan_file)  # the tiny audio encoder's shape, with a second block it ignores
  params = _random_params(vit, seed=1)
  # Scanned checkpoints are written in bfloat16 (np.savez stores it as void): read back as its float32 values.
  dtype = ml_dtypes.bfloat16 if scan_file else np.float32
  params = jax.tree.map(lambda p: np.asarray(p.astype(dtype), np.float32), params)
  path = _write(tmp_path / 'vit.npz', params, dtype=dtype)
  names = set(np.load(path).files)
  block = 'encoderblock' if scan_file else 'encoderblock_0'
  assert {f'params/Transformer/{block}/MultiHeadDotProductAttention_0/query/kernel',
          f'params/Transformer/{block}/MlpBlock_0/Dense_1/bias', 'params/embedding/kernel',
          'params/pos_embedding', 'params/cls', 'params/Transformer/encoder_norm/scale'} <= names

  arrays, unused, warnings = pretrained.tower_arrays(
      pretrained.read_vit(path), _tower_target('audio', scan_layers), 'audio')
  assert warnings == ['the checkpoint has 2 Transformer blocks: the audio encoder takes the first 1']
  assert {'pos_embedding', 'cls', 'head/kernel', 'Transformer/encoderblock_1/LayerNorm_0/scale'} <= set(unused)

  tokens = np.random.default_rng(2).normal(size=(2, 5, 32)).astype(np.float32)
  encoder = dict(params['Transformer'])
  if scan_file:
    encoder['encoderblock'] = jax.tree.map(lambda p: p[:1], encoder['encoderblock'])
  else:
    del encoder['encoderblock_1']
  expected = _Encoder(1, 2, 128, scan_file).apply({'params': encoder}, tokens)
  ours, _ = layers.Stack(1, 2, 128, scan_layers=scan_layers).apply(
      {'params': flax.traverse_util.unflatten_dict(arrays, sep='/')['vit']}, tokens)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_arrays_land_where_big_vision_names_them(tmp_path):
  path = _write(tmp_path / 'vit.npz', _random_params(_video_vit(), seed=3))
  saved = dict(np.load(path))
  arrays, _, warnings = pretrained.tower_arrays(
      pretrained.read_vit(path), _tower_target('video', scan_layers=True), 'video')
  assert not warnings
  block = 'params/Transformer/encoderblock_0/'
  np.testing.assert_array_equal(arrays['vit/layers/self_attn/query/kernel'][0],
                                saved[block + 'MultiHeadDotProductAttention_0/query/kernel'])
  np.testing.assert_array_equal(arrays['vit/layers/self_attn/out/kernel'][0],
                                saved[block + 'MultiHeadDotProductAttention_0/out/kernel'])
  np.testing.assert_array_equal(arrays['vit/layers/mlp/fc2/kernel'][0], saved[block + 'MlpBlock_0/Dense_1/kernel'])
  np.testing.assert_array_equal(arrays['vit/layers/ln_mlp/scale'][0], saved[block + 'LayerNorm_1/scale'])
  np.testing.assert_array_equal(arrays['vit/ln_final/bias'], saved['params/Transformer/encoder_norm/bias'])
  # The tiny tubes: (2, 8, 8), inflated, and (1, 16, 16), TubeViT's 2D patches: the image kernel itself.
  kernel = saved['params/embedding/kernel']
  np.testing.assert_array_equal(arrays['tube_1/kernel'], kernel[None])
  np.testing.assert_allclose(arrays['tube_0/kernel'].sum(0), pretrained.resize_patch_kernel(kernel, (8, 8)),
                             rtol=1e-6, atol=1e-6)
  for tube in ('tube_0', 'tube_1'):
    np.testing.assert_array_equal(arrays[f'{tube}/bias'], saved['params/embedding/bias'])


def test_a_sub_model_and_other_prefixes_read_alike(tmp_path):
  params = _random_params(_video_vit(), seed=4)
  plain = pretrained.read_vit(_write(tmp_path / 'a.npz', params))
  for name, spec in (('b.npz', 'opt/target/'), ('c.npz', ''), ('d.npz', 'params/img/')):
    path = _write(tmp_path / name, params, prefix=spec)
    read = pretrained.read_vit(path + (':img' if 'img' in spec else ''))
    assert read.keys() == plain.keys() and all(np.array_equal(read[k], plain[k]) for k in plain)
  with pytest.raises(checkpoint.MismatchError, match="no sub-model 'txt'"):
    pretrained.read_vit(str(tmp_path / 'd.npz') + ':txt')
  # Pre-Linen names (the original ViT files): modules numbered across types, the position embedding in the encoder.
  renamed = {'LayerNorm_1': 'LayerNorm_2', 'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
             'MlpBlock_0': 'MlpBlock_3'}
  block = {renamed.get(k, k): v for k, v in params['Transformer']['encoderblock_0'].items()}
  old = dict(params, Transformer=dict(params['Transformer'], encoderblock_0=block,
                                      posembed_input={'pos_embedding': params['pos_embedding']}))
  del old['pos_embedding']
  read = pretrained.read_vit(_write(tmp_path / 'e.npz', old, prefix=''))
  assert all(np.array_equal(read[k], plain[k]) for k in plain if k != 'pos_embedding')


def test_an_inflated_tube_kernel_sums_over_time_to_the_2d_kernel():
  kernel = np.random.default_rng(5).normal(size=(16, 16, 3, 8)).astype(np.float32)
  tube = pretrained.inflate_to_tube(kernel, (4, 16, 16))
  assert tube.shape == (4, 16, 16, 3, 8)
  np.testing.assert_allclose(tube.sum(0), kernel, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(tube[1], kernel / 4)
  tube = pretrained.inflate_to_tube(kernel, (2, 8, 12))
  assert tube.shape == (2, 8, 12, 3, 8)
  np.testing.assert_allclose(tube.sum(0), pretrained.resize_patch_kernel(kernel, (8, 12)), rtol=1e-6, atol=1e-6)


def test_a_resized_kernel_sees_a_patch_as_the_old_one_sees_it_enlarged():
  rng = np.random.default_rng(6)
  kernel = rng.normal(size=(8, 8, 3, 4))
  assert pretrained.resize_patch_kernel(kernel, (8, 8)) is kernel
  # The bilinear enlargement is jax.image.resize's (half-pixel centres, edges clamped).
  signal = rng.normal(size=8)
  np.testing.assert_allclose(pretrained.linear_resize_matrix(8, 16) @ signal,
                             jax.image.resize(signal, (16,), 'linear'), rtol=1e-5, atol=1e-6)

  def enlarge(patch, size):
    rows, columns = (pretrained.linear_resize_matrix(n, m) for n, m in zip(patch.shape[:2], size))
    return np.einsum('Yy,Xx,yxc->YXc', rows, columns, patch)

  def token(patch, kernel):
    return np.einsum('yxc,yxcd->d', patch, kernel)
  # To a larger patch (PI-resize): an enlarged patch gets the old token.
  patch = rng.normal(size=(8, 8, 3))
  larger = pretrained.resize_patch_kernel(kernel, (16, 12))
  np.testing.assert_allclose(token(enlarge(patch, (16, 12)), larger), token(patch, kernel), rtol=1e-4, atol=1e-4)
  # To a smaller patch: a patch gets the old kernel's token of its enlargement.
  small = rng.normal(size=(2, 4, 3))
  smaller = pretrained.resize_patch_kernel(kernel, (2, 4))
  np.testing.assert_allclose(token(small, smaller), token(enlarge(small, (8, 8)), kernel), rtol=1e-5, atol=1e-6)
  # A uniform patch keeps its token, whatever the sizes (4 x 64: the small config's audio strips).
  for size in ((16, 12), (2, 4), (4, 64)):
    np.testing.assert_allclose(pretrained.resize_patch_kernel(kernel, size).sum((0, 1)), kernel.sum((0, 1)),
                               rtol=1e-5, atol=1e-5)


def test_the_audio_kernel_sums_rgb_with_rows_on_mel_bins():
  kernel = np.random.default_rng(7).normal(size=(16, 16, 3, 8)).astype(np.float32)
  audio = pretrained.audio_patch_kernel(kernel, (16, 16))
  assert audio.shape == (16, 16, 1, 8)
  np.testing.assert_allclose(audio[:, :, 0], kernel.sum(2).transpose(1, 0, 2), rtol=1e-6)
  assert pretrained.audio_patch_kernel(kernel, (4, 64)).shape == (4, 64, 1, 8)  # the small config's time strips


def test_a_mismatched_tower_is_refused_naming_the_array(tmp_path):
  target = _tower_target('video', scan_layers=True)
  for vit, message in (
      (_video_vit(width=48), 'encoderblock_0/LayerNorm_1/bias has shape (48,), video_encoder/vit/layers/ln_mlp/bias '
                             'needs (64,)'),
      (_video_vit(num_heads=4), 'encoderblock_0/MultiHeadDotProductAttention_0/key/bias has shape (4, 16), '
                                'video_encoder/vit/layers/self_attn/key/bias needs (2, 32)')):
    path = _write(tmp_path / 'vit.npz', _random_params(vit, seed=8))
    with pytest.raises(checkpoint.MismatchError) as error:
      pretrained.tower_arrays(pretrained.read_vit(path), target, 'video', source=path)
    assert message in str(error.value) and 'config.model.video: width 64, 2 heads of 32, mlp 256' in str(error.value)
  shallow = pretrained.read_vit(_write(tmp_path / 'vit.npz', _random_params(_video_vit(), seed=8)))
  with pytest.raises(checkpoint.MismatchError, match='has 1 Transformer blocks, the video encoder 2'):
    pretrained.tower_arrays(shallow, _tower_target('video', True, video=dict(tiny_config().model.video, depth=2)),
                            'video')
  grey = {**shallow, 'embedding/kernel': shallow['embedding/kernel'][:, :, :1]}
  with pytest.raises(checkpoint.MismatchError, match=r'embedding/kernel has shape \(16, 16, 1, 64\).*needs 3 input'):
    pretrained.tower_arrays(grey, target, 'video')
  scaled = {**shallow, 'Transformer/encoderblock_0/LayerScale_0/scale': np.ones(64, np.float32)}
  with pytest.raises(checkpoint.MismatchError, match='LayerScale_0/scale has no place in a video encoder block'):
    pretrained.tower_arrays(scaled, target, 'video')


def test_loaded_arrays_keep_the_shardings_of_those_they_replace(tmp_path):
  import ml_collections
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  path = _write(tmp_path / 'vit.npz', _random_params(_video_vit(), seed=11))
  mesh = Mesh(np.array(jax.devices()[:4]), ('fsdp',))

  def placed(shape):  # split over the 4 devices along the last axis, as fsdp would split `embed`
    spec = PartitionSpec(*[None] * (len(shape) - 1), 'fsdp') if shape[-1] % 4 == 0 else PartitionSpec()
    return jax.device_put(np.zeros(shape, np.float32), NamedSharding(mesh, spec))
  target = _tower_target('video', scan_layers=True)
  params = {'video_encoder': flax.traverse_util.unflatten_dict(
      {name: placed(value.shape) for name, value in target.items()}, sep='/'), 'text_decoder': {'w': placed((4,))}}
  config = ml_collections.ConfigDict(dict(init_video_encoder=path, init_audio_encoder=''))
  loaded, names, report = pretrained.load_towers(config, params)
  assert sorted(names) == sorted(f'video_encoder/{name}' for name in target) and len(report) == 1
  expected, _, _ = pretrained.tower_arrays(pretrained.read_vit(path), target, 'video')
  before = flax.traverse_util.flatten_dict(params, sep='/')
  for name, value in flax.traverse_util.flatten_dict(loaded, sep='/').items():
    assert value.sharding == before[name].sharding, name
    if name.startswith('video_encoder/'):
      np.testing.assert_array_equal(value, expected[name[len('video_encoder/'):]])
  assert loaded['text_decoder']['w'] is params['text_decoder']['w']


def test_a_run_starts_from_the_pretrained_towers(repo, small_demo, tmp_path):
  video = _write(tmp_path / 'video.npz', _random_params(_video_vit(), seed=9))
  audio = _write(tmp_path / 'audio.npz', _random_params(_ViT(32, 1, 2, 128), seed=10))
  workdir = str(tmp_path / 'run')
  # test_train's run of its init_from test: the same program, compiled once for both (persistent cache).
  result = test_train._run(repo, small_demo, workdir, '--config.total_steps=1', '--config.checkpoint_every_steps=1',
                           '--config.lr=0.0', '--config.warmup_steps=0', f'--config.init_video_encoder={video}',
                           f'--config.init_audio_encoder={audio}')
  assert f'video_encoder: 22 arrays from {video}; not loaded: cls, head, pos_embedding' in result.stdout
  assert f'initialised 42 parameter arrays from {video}, {audio}' in result.stdout
  # Learning rate 0: the parameters of step 1 are those the run started from.
  params = checkpoint.read_params(workdir)
  saved = {name: dict(np.load(path)) for name, path in (('video', video), ('audio', audio))}
  kernel = saved['video']['params/embedding/kernel']
  np.testing.assert_array_equal(params['video_encoder']['tube_1']['kernel'], kernel[None])
  np.testing.assert_allclose(params['video_encoder']['tube_0']['kernel'].sum(0),
                             pretrained.resize_patch_kernel(kernel, (8, 8)), rtol=1e-6, atol=1e-6)
  for tower in ('video', 'audio'):
    np.testing.assert_array_equal(
        params[f'{tower}_encoder']['vit']['layers']['self_attn']['value']['kernel'][0],
        saved[tower]['params/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/value/kernel'])
  np.testing.assert_allclose(params['audio_encoder']['patch_embed']['kernel'],
                             pretrained.audio_patch_kernel(saved['audio']['params/embedding/kernel'], (8, 8)),
                             rtol=1e-6, atol=1e-6)
