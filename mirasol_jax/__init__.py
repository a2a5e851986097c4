"""mirasol_jax: Mirasol3B-style multimodal autoregressive models (video, audio, text) in JAX/Flax."""
__version__ = '0.1.0'
