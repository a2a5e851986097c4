"""Pure building blocks: masks, position embeddings, tube and patch embeddings, dense layers."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mirasol_jax.models import encoders
from mirasol_jax.models import layers


def test_block_causal_mask_is_full_inside_chunks_and_causal_across():
  mask = layers.block_causal_mask(num_chunks=3, tokens_per_chunk=2)
  expected = np.array([[1, 1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0],
                       [1, 1, 1, 1, 0, 0],
                       [1, 1, 1, 1, 1, 1],
                       [1, 1, 1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(mask, expected)


def test_cached_mask_matches_full_masks():
  # A block (chunk) written at position 4 of a cache of 8 sees keys 0..5; causal queries see up to themselves.
  block = layers.cached_attention_mask(jnp.array([4]), num_new=2, cache_len=8, causal=False)[0, 0]
  np.testing.assert_array_equal(block, np.array([[1, 1, 1, 1, 1, 1, 0, 0]] * 2, bool))
  causal = layers.cached_attention_mask(jnp.array([4]), num_new=2, cache_len=8, causal=True)[0, 0]
  np.testing.assert_array_equal(causal, np.array([[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]], bool))


@pytest.mark.parametrize('mask_kind', ['none', 'causal', 'padding', 'block'])
def test_dot_product_attention_matches_jax_and_its_gradients(mask_kind):
  q, k, v = (jax.random.normal(key, (2, 6, 3, 4)) for key in jax.random.split(jax.random.PRNGKey(0), 3))
  mask = {'none': None, 'causal': None, 'block': layers.block_causal_mask(3, 2)[None, None],
          'padding': layers.key_padding_mask(jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool))}[mask_kind]
  causal = mask_kind == 'causal'
  ours = lambda q, k, v: layers.dot_product_attention(q, k, v, mask, causal)
  theirs = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
  np.testing.assert_allclose(ours(q, k, v), theirs(q, k, v), rtol=1e-5, atol=1e-6)
  grads = [jax.grad(lambda *a, f=f: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v) for f in (ours, theirs)]
  for g_ours, g_theirs in zip(*grads):
    np.testing.assert_allclose(g_ours, g_theirs, rtol=1e-4, atol=1e-5)
  if mask_kind == 'padding':  # the padded keys change nothing
    v2 = v.at[0, 4:].set(100.0)
    np.testing.assert_allclose(ours(q, k, v2)[0], ours(q, k, v)[0], rtol=1e-6)


@pytest.mark.parametrize('query_shape, key_length, dtype, masked, nvidia, takes', [
    ((2, 392, 16, 64), 392, jnp.bfloat16, False, True, True),  # the 3b video tower
    ((2, 128, 16, 128), 128, jnp.bfloat16, True, True, True),  # the 3b text decoder, causal + padding
    ((2, 17, 2, 32), 17, jnp.bfloat16, True, True, False),  # odd lengths under a mask: jax refuses them
    ((2, 17, 2, 32), 17, jnp.bfloat16, False, True, True),  # ... but not without one
    ((2, 64, 4, 32), 64, jnp.float32, False, True, False),  # float32: no fused kernel
    ((2, 64, 4, 12), 64, jnp.bfloat16, False, True, False),  # head dim not a multiple of 8
    ((2, 64, 4, 192), 64, jnp.bfloat16, False, True, False),  # head dim over 128
    ((2, 64, 4, 64), 64, jnp.bfloat16, False, False, False),  # not an NVIDIA GPU
])
def test_cudnn_supports_what_jax_takes(query_shape, key_length, dtype, masked, nvidia, takes):
  assert layers.cudnn_supports(query_shape, key_length, dtype, masked, nvidia_gpu=nvidia) is takes


def test_auto_attention_is_the_implementation_cudnn_supports_chooses():
  """'auto' is exactly the kernel `cudnn_supports` picks: on a CPU the XLA computation, so that the presets' default
  changes nothing there."""
  q, k, v = (jax.random.normal(key, (2, 8, 2, 8), jnp.bfloat16) for key in jax.random.split(jax.random.PRNGKey(2), 3))
  mask = layers.block_causal_mask(4, 2)[None, None]
  chosen = 'cudnn' if layers.cudnn_supports(q.shape, 8, q.dtype, True) else 'xla'
  assert chosen == ('cudnn' if jax.default_backend() == 'gpu' else 'xla')
  np.testing.assert_array_equal(layers.dot_product_attention(q, k, v, mask, implementation='auto'),
                                layers.dot_product_attention(q, k, v, mask, implementation=chosen))
  with pytest.raises(ValueError, match="'flash' is not one of"):
    layers.dot_product_attention(q, k, v, implementation='flash')


@pytest.mark.parametrize('chunks,groups', [(5, 1), (5, 2), (5, 3), (5, 8), (8, 8), (7, 4)])
def test_block_causal_attention_in_query_groups_equals_the_dense_mask(chunks, groups):
  m = 3
  q, k, v = (jax.random.normal(key, (2, chunks * m, 2, 4)) for key in jax.random.split(jax.random.PRNGKey(1), 3))
  dense = lambda q, k, v: layers.dot_product_attention(q, k, v, layers.block_causal_mask(chunks, m)[None, None])
  grouped = lambda q, k, v: layers.block_causal_attention(q, k, v, m, groups)
  np.testing.assert_allclose(grouped(q, k, v), dense(q, k, v), rtol=1e-5, atol=1e-6)
  grads = [jax.grad(lambda *a, f=f: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v) for f in (grouped, dense)]
  for g_grouped, g_dense in zip(*grads):
    np.testing.assert_allclose(g_grouped, g_dense, rtol=1e-4, atol=1e-5)
  # Chunk c's outputs do not move when a later chunk's keys and values do.
  later = (chunks // 2 + 1) * m
  moved = grouped(q, k.at[:, later:].add(3.0), v.at[:, later:].add(3.0))
  np.testing.assert_allclose(moved[:, :later], grouped(q, k, v)[:, :later], rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='whole chunks'):
    layers.block_causal_attention(q[:, :-1], k[:, :-1], v[:, :-1], m, groups)


def test_sincos_distinguishes_positions_and_pads_odd_widths():
  emb = np.asarray(layers.sincos_nd(np.array([[0., 0, 0], [0, 0, 1], [1, 0, 0]]), 20))
  assert emb.shape == (3, 20)
  assert np.all(emb[:, 18:] == 0)  # 20 = 3 axes * 6 + 2 padding
  assert not np.allclose(emb[0], emb[1]) and not np.allclose(emb[0], emb[2]) and not np.allclose(emb[1], emb[2])


def test_tube_geometry():
  # TubeViT's 8x8x8 tube with stride (16, 32, 32) on a 32-frame 224x224 clip: 2 x 7 x 7 positions.
  tube = ((8, 8, 8), (16, 32, 32), (0, 0, 0))
  assert encoders.tube_grid(tube, (32, 224, 224)) == (2, 7, 7)
  centres = encoders.tube_centres(tube, (32, 224, 224))
  assert centres.shape == (98, 3)
  np.testing.assert_allclose(centres[0], [3.5, 3.5, 3.5])
  np.testing.assert_allclose(centres[-1], [19.5, 195.5, 195.5])


TUBE_NAMES = ('conv_t', 'conv_h', 'conv_w', 'conv_in', 'embed')


def _reference_conv(window, stride):
  """The nn.Conv the tubes were before PatchEmbed: its parameters are what checkpoints and pretrained.py hold."""
  return nn.Conv(8, window, strides=stride, padding='VALID', param_dtype=jnp.float32,
                 kernel_init=layers.logical_init(nn.initializers.lecun_normal(), TUBE_NAMES),
                 bias_init=layers.logical_init(nn.initializers.zeros_init(), ('embed',)))


# (window, stride, offset) on 5 frames of 10x11: tiles with a remainder to drop, the same shifted, and a sparse tube
# with gaps along every axis whose last position ends before the next stride would (the input is padded to reshape).
NON_OVERLAPPING = [((2, 4, 4), (2, 4, 4), (0, 0, 0)),
                   ((2, 4, 4), (2, 4, 4), (1, 2, 1)),
                   ((1, 3, 2), (2, 4, 4), (0, 1, 2))]


@pytest.mark.parametrize('window,stride,offset', NON_OVERLAPPING)
def test_non_overlapping_tube_as_matmul_equals_the_convolution(window, stride, offset):
  x = jax.random.normal(jax.random.key(1), (2, 5, 10, 11, 3))
  tube = encoders.PatchEmbed(8, window, stride, TUBE_NAMES, offset)
  params = tube.init(jax.random.key(0), x)
  cropped = x[:, offset[0]:, offset[1]:, offset[2]:]
  conv_params = _reference_conv(window, stride).init(jax.random.key(0), cropped)
  # Same names, shapes, logical axes and initial values as the convolution it replaces.
  assert jax.tree.structure(params) == jax.tree.structure(conv_params)
  for new, old in zip(jax.tree.leaves(params), jax.tree.leaves(conv_params)):
    np.testing.assert_array_equal(new, old)
  assert nn.get_partition_spec(params) == nn.get_partition_spec(conv_params)

  params = jax.tree.map(lambda p: p + 0.1, nn.unbox(params))  # a non-zero bias
  expected = _reference_conv(window, stride).apply(params, cropped)
  assert expected.shape[1:4] == encoders.tube_grid((window, stride, offset), x.shape[1:4])
  expected = expected.reshape(2, -1, 8)  # raster order (t, y, x)
  np.testing.assert_allclose(tube.apply(params, x), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(tube.clone(matmul=False).apply(params, x), expected, rtol=1e-6, atol=1e-6)

  def loss(p, module):
    return jnp.sum(jnp.sin(module.apply(p, x)))  # weights every token differently
  grads = jax.grad(loss)(params, tube)
  conv_grads = jax.grad(loss)(params, tube.clone(matmul=False))
  for new, old in zip(jax.tree.leaves(grads), jax.tree.leaves(conv_grads)):
    assert np.abs(old).max() > 0
    np.testing.assert_allclose(new, old, rtol=1e-4, atol=1e-4)


def test_overlapping_tube_keeps_the_convolution_and_audio_patches_match_it():
  x = jax.random.normal(jax.random.key(1), (2, 5, 10, 11, 3))
  window, stride = (2, 4, 4), (1, 3, 3)  # overlapping: the convolution path
  tube = encoders.PatchEmbed(8, window, stride, TUBE_NAMES)
  params = nn.unbox(tube.init(jax.random.key(0), x))
  expected = _reference_conv(window, stride).apply(params, x).reshape(2, -1, 8)
  np.testing.assert_allclose(tube.apply(params, x), expected, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='stride >= window'):
    encoders.patch_tokens(x, window, stride)
  # A 2-D patch (the audio encoder's), matmul against convolution.
  spectrogram = jax.random.normal(jax.random.key(2), (2, 12, 9, 1))
  patch = encoders.PatchEmbed(8, (4, 3), (4, 3), ('conv_h', 'conv_w', 'conv_in', 'embed'))
  params = nn.unbox(patch.init(jax.random.key(0), spectrogram))
  assert params['params']['kernel'].shape == (4, 3, 1, 8)
  np.testing.assert_allclose(patch.apply(params, spectrogram), patch.clone(matmul=False).apply(params, spectrogram),
                             rtol=1e-5, atol=1e-5)


def test_mlp_on_flattened_operands_matches_the_3d_contraction():
  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  mlp = layers.Mlp(16)
  params = nn.unbox(mlp.init(jax.random.key(0), x))['params']
  assert {k: v['kernel'].shape for k, v in params.items()} == {'fc1': (8, 16), 'fc2': (16, 8)}

  def reference(p, x):  # what nn.Dense computes on [B, S, D] without the reshape
    h = nn.gelu(jnp.einsum('bsd,df->bsf', x, p['fc1']['kernel']) + p['fc1']['bias'])
    return jnp.einsum('bsf,fd->bsd', h, p['fc2']['kernel']) + p['fc2']['bias']

  params = jax.tree.map(lambda p: p + 0.05, params)  # non-zero biases
  out = mlp.apply({'params': params}, x)
  assert out.shape == x.shape
  np.testing.assert_allclose(out, reference(params, x), rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda p: jnp.sum(jnp.sin(mlp.apply({'params': p}, x))))(params)
  expected = jax.grad(lambda p: jnp.sum(jnp.sin(reference(p, x))))(params)
  for new, old in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
    np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-5)
  # The dense layer keeps nn.Dense's parameters and initial values (checkpoints stay valid).
  plain = nn.Dense(16, kernel_init=nn.initializers.xavier_uniform())
  np.testing.assert_array_equal(nn.unbox(layers.dense(16, ('embed', 'mlp'), jnp.float32, 'fc1').init(
      jax.random.key(3), x))['params']['kernel'], plain.init(jax.random.key(3), x)['params']['kernel'])
