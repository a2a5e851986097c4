"""Model presets: `model_config(size)` returns the `config.model` fields (the Model's keyword arguments).

| size  | use                         | input                          | towers                                       |
|-------|-----------------------------|--------------------------------|----------------------------------------------|
| tiny  | tests                       | 8 frames 32x32, T=4, m=4       | width 32 to 64, 1 to 2 layers                |
| small | CPU demo                    | 16 frames 64x64, T=4, m=8      | width 128, 2 to 3 layers                     |
| base  | one accelerator             | 128 frames 224x224, T=16, m=32 | ViT-B towers, 12-layer AV and text decoder   |
| 3b    | the paper                   | 128 frames 224x224, T=16, m=32 | ViT-L video, ViT-B audio, AV 32L d1536, text 22L d2048 |
| 10b   | scaling past the paper      | 128 frames 224x224, T=16, m=32 | ViT-H video, ViT-L audio, AV 32L d3072, text 20L d4096 |

`10b` (10.4B parameters) doubles the widths of `3b`'s Combiner, AV Transformer and text decoder at about the
same depths, so that the AV part stays about half of the model; every head count divides by 8 and every width by
256, so tensor parallelism up to 8 and fully sharded data parallelism up to 256 ways shard every parameter evenly
(`benchmarks/aot_compile.py` compiles its train step for such meshes).

Tubes are (kernel, stride, offset) in (t, y, x). For k = 8 frames per chunk the TubeViT shapes are shortened so
that none is longer than a chunk; the 1-frame tube gives 2D patches on one frame per chunk.
"""
from __future__ import annotations

import ml_collections

SIZES = ('tiny', 'small', 'base', '3b', '10b')

# TubeViT's four tubes adapted to 8-frame chunks at 224x224: 49 + 49 + 98 + 196 = 392 video tokens per chunk.
TUBES_224_K8 = (
    ((8, 8, 8), (8, 32, 32), (0, 0, 0)),
    ((8, 4, 4), (8, 32, 32), (0, 8, 8)),
    ((4, 12, 12), (4, 32, 32), (0, 16, 16)),
    ((1, 16, 16), (8, 16, 16), (0, 0, 0)),
)


def _tower(width, depth, num_heads, mlp_ratio=4, **extra):
  return dict(width=width, depth=depth, num_heads=num_heads, mlp_dim=mlp_ratio * width, **extra)


def model_config(size: str, combiner: str = 'ttm') -> ml_collections.ConfigDict:
  if size not in SIZES:
    raise ValueError(f'size={size!r} is not one of {SIZES}')
  if size == 'tiny':
    c = dict(
        num_frames=8, num_chunks=4, image_size=(32, 32), audio_frames_per_chunk=16, mel_bins=32, max_text_len=16,
        vocab_size=128, tokens_per_chunk=4, width=64,
        video=_tower(64, 1, 2, tubes=(((2, 8, 8), (2, 8, 8), (0, 0, 0)), ((1, 16, 16), (2, 16, 16), (0, 8, 8)))),
        audio=_tower(32, 1, 2, patch_size=(8, 8)),
        combiner_args=dict(depth=1, num_heads=2, mlp_dim=128),
        av=dict(depth=2, num_heads=2, mlp_dim=128, mask_ratio=0.2),
        text=_tower(64, 2, 2), video_recon_size=(8, 8), audio_recon_pool=(4, 4), memory_tokens=8,
        tokenlearner_hidden=32)
  elif size == 'small':
    c = dict(
        num_frames=16, num_chunks=4, image_size=(64, 64), audio_frames_per_chunk=32, mel_bins=64, max_text_len=32,
        vocab_size=1024, tokens_per_chunk=8, width=128,
        video=_tower(128, 3, 4, tubes=(((4, 16, 16), (4, 16, 16), (0, 0, 0)),
                                       ((2, 8, 8), (2, 16, 16), (0, 4, 4)),
                                       ((1, 16, 16), (4, 16, 16), (0, 8, 8)))),
        # Time strips (4 frames = 125 ms x all 64 mel bins) rather than 16x16 squares: as many tokens per chunk, but
        # 8 time steps per second instead of 2, so that sounds 0.4 s apart (the demo's beeps) fall in tokens of
        # their own. Measured on the demo: counting them learns in 300 steps instead of not at all in 1200 for
        # some seeds.
        audio=_tower(128, 2, 4, patch_size=(4, 64)),
        combiner_args=dict(depth=2, num_heads=4, mlp_dim=512),
        av=dict(depth=3, num_heads=4, mlp_dim=512, mask_ratio=0.15),
        text=_tower(128, 3, 4), video_recon_size=(16, 16), audio_recon_pool=(4, 4), memory_tokens=16,
        tokenlearner_hidden=128)
  elif size == 'base':
    c = dict(
        num_frames=128, num_chunks=16, image_size=(224, 224), audio_frames_per_chunk=64, mel_bins=128,
        max_text_len=64, vocab_size=32_000, tokens_per_chunk=32, width=768,
        video=_tower(768, 12, 12, tubes=TUBES_224_K8),
        audio=_tower(768, 12, 12, patch_size=(16, 16)),
        combiner_args=dict(depth=2, num_heads=12, mlp_dim=3072),
        av=dict(depth=12, num_heads=12, mlp_dim=3072, mask_ratio=0.15),
        text=_tower(768, 12, 12), video_recon_size=(16, 16), audio_recon_pool=(4, 4), memory_tokens=64,
        tokenlearner_hidden=512)
  elif size == '3b':
    c = dict(
        num_frames=128, num_chunks=16, image_size=(224, 224), audio_frames_per_chunk=64, mel_bins=128,
        max_text_len=128, vocab_size=32_000, tokens_per_chunk=32, width=1536,
        video=_tower(1024, 24, 16, tubes=TUBES_224_K8),
        audio=_tower(768, 12, 12, patch_size=(16, 16)),
        combiner_args=dict(depth=4, num_heads=12, mlp_dim=6144),
        # 32 AV layers and 22 text layers put about half of the 3B in the AV part, as the paper states; an even
        # split, 24 and 24, gives 2.83B with only 42% in the AV part.
        av=dict(depth=32, num_heads=12, mlp_dim=6144, mask_ratio=0.15),
        text=_tower(2048, 22, 16), video_recon_size=(16, 16), audio_recon_pool=(4, 4), memory_tokens=128,
        tokenlearner_hidden=1024)
  else:  # 10b
    c = dict(
        num_frames=128, num_chunks=16, image_size=(224, 224), audio_frames_per_chunk=64, mel_bins=128,
        max_text_len=128, vocab_size=32_000, tokens_per_chunk=32, width=3072,
        video=_tower(1280, 32, 16, tubes=TUBES_224_K8),
        audio=_tower(1024, 24, 16, patch_size=(16, 16)),
        combiner_args=dict(depth=4, num_heads=24, mlp_dim=12288),
        # 32 AV layers and 20 text layers at twice 3b's widths: 49% of the parameters in the AV part, as in 3b.
        av=dict(depth=32, num_heads=24, mlp_dim=12288, mask_ratio=0.15),
        text=_tower(4096, 20, 32), video_recon_size=(16, 16), audio_recon_pool=(4, 4), memory_tokens=128,
        tokenlearner_hidden=1024)
  memory_tokens, tokenlearner_hidden = c.pop('memory_tokens'), c.pop('tokenlearner_hidden')
  if combiner == 'ttm':
    c['combiner_args'].update(memory_tokens=memory_tokens, tokenlearner_hidden=tokenlearner_hidden)
  c['audio'].update(input_mean=-40.0, input_std=20.0)  # log-mel in dB (power_to_db, top_db=80).
  c['text'].update(tie_embeddings=True, context_norm='none')
  c['av'].setdefault('block_causal', True)
  # The block-causal attention in 8 runs of query chunks, each against the keys it may see: 9/16 of a dense mask's
  # pairs (layers.block_causal_attention). 1 = one dense masked attention.
  c['av'].setdefault('query_groups', 8)
  # Attention through cuDNN's fused kernel on NVIDIA GPUs where it takes the shape, else the XLA computation
  # (layers.dot_product_attention): on one H100 the `3b` train step ran 1.28x faster than with XLA's alone.
  c.update(combiner=combiner, latent_loss='cosine', dtype='bfloat16', scan_layers=True, remat_policy='none',
           dropout_rate=0.0, attention_impl='auto', av_mode='chunked')
  return ml_collections.ConfigDict(c)
