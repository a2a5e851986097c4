"""Pure building blocks: masks and position embeddings."""
import jax.numpy as jnp
import numpy as np

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
