"""mirasol_jax: Mirasol3B-style multimodal autoregressive models in JAX/Flax."""
from setuptools import find_packages, setup

# Ranges seen installing and passing the test suite together (Python 3.11, CPU, 2026-11):
# jax/jaxlib 0.10.2, flax 0.12.8, optax 0.2.8, orbax-checkpoint 0.12.8, ml_collections 1.1.0,
# tensorflow-datasets 4.9.10, grain 0.2.18, clu 0.0.12, numpy 2.4.6, absl-py 2.5.1, av 18.1.0, sentencepiece 0.2.3,
# msgpack 1.2.4, importlib_resources 7.1.0, tensorboardX 2.6.5, librosa 0.11.0 (tests only: the log-mel reference),
# pycocoevalcap 1.2 (with the pycocotools 2.0.11 it requires); notebooks in the tests: nbclient 0.11.0, nbformat 5.11.1,
# ipykernel 7.4.0, matplotlib 3.11.2.
INSTALL_REQUIRES = [
    'jax>=0.10.2,<0.11',
    'flax>=0.12.8,<0.13',
    'optax>=0.2.8,<0.3',
    'orbax-checkpoint>=0.12.8,<0.13',
    'ml_collections>=1.1.0,<1.2',
    'tensorflow-datasets>=4.9.10,<4.10',
    'grain>=0.2.18,<0.3',
    'clu>=0.0.12,<0.1',
    'numpy>=2.0,<3',
    'absl-py>=2.1,<3',
    'av>=14,<19',
    'sentencepiece>=0.2.0,<0.3',
    'msgpack>=1.0,<2',
    'importlib_resources>=6,<8',  # tensorflow-datasets needs it for builders defined in a package
    'tensorboardX>=2.6,<3',  # TensorBoard event files without TensorFlow (clu's writers import TensorFlow)
    'pycocoevalcap>=1.2,<1.3',  # COCO caption metrics (BLEU, ROUGE-L, CIDEr-D): only its pure-Python scorers
]

# The notebooks' kernel and pictures; the test suite executes every notebook.
NOTEBOOKS = ['nbclient>=0.10,<0.12', 'nbformat>=5.10,<6', 'ipykernel>=6.29,<8', 'matplotlib>=3.9,<4']

setup(
    name='mirasol_jax',
    version='0.1.0',
    description='Mirasol3B: autoregressive models of time-aligned (video, audio) and contextual (text) modalities.',
    packages=find_packages(include=['mirasol_jax', 'mirasol_jax.*']),
    python_requires='>=3.10',
    install_requires=INSTALL_REQUIRES,
    extras_require={
        'test': ['pytest>=8,<10', 'librosa>=0.10.2,<0.12', *NOTEBOOKS],
        'notebooks': NOTEBOOKS,
        # Workdirs on Google Cloud Storage (gs://...): the file system etils.epath uses without TensorFlow. Seen
        # installing beside the ranges above: gcsfs 2026.10.1 with fsspec 2026.9.0.
        'gcs': ['gcsfs>=2026.9,<2027'],
        # jax's own extras at the jax range above: its CUDA 12 plugin with the CUDA, cuDNN and NCCL wheels (the host
        # needs only an NVIDIA driver for CUDA 12), and libtpu for Cloud TPU VMs; both from the package index.
        'gpu': ['jax[cuda12]>=0.10.2,<0.11'],
        'tpu': ['jax[tpu]>=0.10.2,<0.11'],
    },
    entry_points={'console_scripts': ['mirasol=mirasol_jax.main:run']},
)
