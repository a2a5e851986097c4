"""The notebooks, run as a user runs them, and the attention maps one of them draws.

Every notebook under notebooks/ is executed top to bottom in a fresh Jupyter kernel of this interpreter:
quickstart.ipynb first (it generates a small dataset, trains a tiny run through the trainer with its evaluation and
checkpoint, and answers a question with `answer`), then the others on its workdir (inspect_workdir.ipynb reads its
metrics, predictions and checkpoint). A cell that raises fails the test. Tiny settings reach the notebooks through
environment variables (MIRASOL_NB_SIZE, MIRASOL_NB_STEPS, ...). Committed notebooks carry no outputs.

mirasol_jax/attention_maps.py gives the weights the decoder uses: recombined with the values and the layer's output
projection they give back the cross-attention output each layer computed, in a scanned and an unrolled model; the
row of each answer token is the query whose logits chose it; the chunk columns follow the latents.
"""
import functools
import glob
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, random_batch, tiny_config
from mirasol_jax import attention_maps
from mirasol_jax import decoding
from mirasol_jax.data import tokenizer as tokenizer_lib
from mirasol_jax.models import mirasol
from test_train import _env

NOTEBOOKS = os.path.join(REPO, 'notebooks')
FIRST = 'quickstart.ipynb'  # trains the run that the others read
# Appended to each notebook before it runs: under the Agg backend plt.show() draws nothing, so this renders every
# figure the notebook made (an error in a figure fails here) and counts them.
DRAW_FIGURES = '''import matplotlib.pyplot as plt
for number in plt.get_fignums():
  plt.figure(number).canvas.draw()
print(f'{len(plt.get_fignums())} figures drawn with {plt.get_backend()}')'''


def _notebooks():
  paths = sorted(glob.glob(os.path.join(NOTEBOOKS, '*.ipynb')), key=lambda p: (os.path.basename(p) != FIRST, p))
  assert paths and os.path.basename(paths[0]) == FIRST, f'{NOTEBOOKS} has no {FIRST}'
  return paths


def test_committed_notebooks_are_valid_and_carry_no_outputs():
  import nbformat
  for path in _notebooks():
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.nbformat == 4, path
    for cell in notebook.cells:
      if cell.cell_type == 'code':
        assert cell.outputs == [] and cell.execution_count is None, f'{path}: a cell has outputs: clear them'


@pytest.fixture(scope='module')
def kernel_name(tmp_path_factory):
  """A kernelspec that runs this interpreter (the one with the package and the test extras), found first through
  JUPYTER_PATH: whatever 'python3' kernel a machine has installed, the notebooks run in this environment."""
  root = tmp_path_factory.mktemp('jupyter')
  spec = root / 'kernels' / 'mirasol_tests'
  spec.mkdir(parents=True)
  spec.joinpath('kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'mirasol_jax tests', 'language': 'python'}))
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv('JUPYTER_PATH', str(root))
    patch.setenv('JUPYTER_RUNTIME_DIR', str(root / 'runtime'))
    yield 'mirasol_tests'


def _text(notebook) -> str:
  """What the notebook's cells printed."""
  return ''.join(output.get('text', '') for cell in notebook.cells if cell.cell_type == 'code'
                 for output in cell.outputs if output.get('output_type') == 'stream')


def test_every_notebook_runs_on_a_tiny_run(kernel_name, tmp_path):
  import nbclient
  import nbformat
  env = _env()  # one CPU device, the tests' compilation cache
  (tmp_path / 'tmp').mkdir()
  env.update({
      'TMPDIR': str(tmp_path / 'tmp'),  # the quickstart's temporary folder (its new video file) stays in here
      'MPLBACKEND': 'Agg', 'IPYTHONDIR': str(tmp_path / 'ipython'), 'MIRASOL_CACHE': str(tmp_path / 'cache'),
      # The kernel imports this checkout's package, whatever an installed copy points at.
      'PYTHONPATH': os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH')) if p),
      'MIRASOL_NB_SIZE': 'tiny', 'MIRASOL_NB_STEPS': '4', 'MIRASOL_NB_CLIPS': '24',
      'MIRASOL_NB_DATA': str(tmp_path / 'data'), 'MIRASOL_WORKDIR': str(tmp_path / 'run')})
  executed = {}
  for path in _notebooks():
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(DRAW_FIGURES))
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name=kernel_name,
                                     resources={'metadata': {'path': NOTEBOOKS}})
    client.execute(env=env)  # raises CellExecutionError, naming the cell, when a cell raises
    executed[os.path.basename(path)] = notebook

  run = tmp_path / 'run'
  assert '4' in os.listdir(run / 'checkpoints')
  assert os.path.exists(run / 'predictions' / 'validation_4.jsonl')
  text = _text(executed[FIRST])
  assert 'log-probability' in text and 'the clip\'s answer is' in text
  assert '1 figures drawn with agg' in text.lower()  # the example as the model sees it
  text = _text(executed['inspect_workdir.ipynb'])
  for kind in ('colour', 'count', 'direction'):  # the predictions per question kind, one attention map per kind
    assert f'{kind} ' in text
  assert text.count('per layer, the chunk each answer token weighs most') == 3
  assert '2 colour questions; per decoder layer' in text  # the number for the demo's colour questions
  assert '4 figures drawn with agg' in text.lower()  # the curves, and one attention map per kind


# ---------------------------------------------------------------------------------------------------------------
# attention_maps


def _random_params(model, batch, seed=0):
  """Random parameters of the model's shapes, drawn with numpy: LayerNorm scales about 1, every other array about
  0.2. The properties tested hold for any parameters, and compiling the model's initialisation would cost more
  than the rest of these tests."""
  rng = np.random.default_rng(seed)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(seed), batch)['params'])

  def draw(path, leaf):
    value = rng.normal(0.0, 0.2, leaf.shape)
    return (value + (1.0 if getattr(path[-1], 'key', '') == 'scale' else 0.0)).astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope='module')
def tiny():
  """(config, model, params, batch, latents, capture): the tiny model (scanned layers, latents standardised per
  token feature as in the demo) with random parameters, two random examples, their AV latents, and
  attention_maps.cross_attention of that model, compiled."""
  config = tiny_config()
  config.model.text.context_norm = 'tokens'
  model = mirasol.Model(**config.model)
  batch = random_batch(config, 2)
  params = _random_params(model, batch)
  _, latents = jax.jit(lambda p, b: model.apply({'params': p}, b, method=mirasol.Model.encode_av))(params, batch)
  capture = jax.jit(functools.partial(attention_maps.cross_attention, model))
  return config, model, params, batch, latents, capture


@pytest.mark.parametrize('scanned', [True, False])
def test_the_weights_give_back_each_layers_cross_attention_output(tiny, scanned):
  config, model, params, batch, latents, capture = tiny
  if not scanned:  # the same decoder with unrolled layers and latents fed as they are (model.text.context_norm)
    model = model.clone(scan_layers=False, text={**model.text, 'context_norm': 'none'})
    params = attention_maps.unrolled(model, params)[1]
    capture = jax.jit(functools.partial(attention_maps.cross_attention, model))
  tokens = batch['text_tokens']
  captured = capture(params, tokens, latents)
  expected = jax.jit(lambda p, t, h: model.apply({'params': p}, t, h.reshape(2, -1, h.shape[-1]),
                                                 method=mirasol.Model.text_logits))(params, tokens, latents)
  np.testing.assert_allclose(captured.logits, expected, rtol=1e-5, atol=1e-5)  # the model's own pass, unrolled or not

  text = config.model.text
  weights = np.asarray(captured.weights)
  m, chunks = config.model.tokens_per_chunk, config.model.num_chunks
  assert weights.shape == (text.depth, 2, text.num_heads, tokens.shape[1], chunks * m)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
  stack = params['text_decoder']['stack']
  for layer in range(text.depth):
    out = stack['layers']['cross_attn']['out'] if scanned else stack[f'layers_{layer}']['cross_attn']['out']
    kernel, bias = (out['kernel'][layer], out['bias'][layer]) if scanned else (out['kernel'], out['bias'])
    values, output = np.asarray(captured.values[layer]), np.asarray(captured.outputs[layer])
    mixed = np.einsum('bhls,bshd->blhd', weights[layer], values)
    recomputed = np.einsum('blhd,hde->ble', mixed, np.asarray(kernel)) + np.asarray(bias)
    np.testing.assert_allclose(recomputed, output, rtol=1e-4, atol=1e-5)
    # Not a property of any weights summing to 1: uniform attention gives another output.
    uniform = np.broadcast_to(values.mean(1, keepdims=True), mixed.shape)
    assert np.abs(np.einsum('blhd,hde->ble', uniform, np.asarray(kernel)) + np.asarray(bias) - output).max() > 1e-3


def test_each_answer_row_is_the_query_that_chose_its_token(tiny):
  config, model, params, batch, latents, capture = tiny
  result = attention_maps.answer_attention(model, params, batch, max_new_tokens=4, example=1)
  n = len(result.tokens)
  is_eos = result.tokens == tokenizer_lib.EOS_ID
  assert not is_eos[:-1].any() and (is_eos[-1] or n == 4)  # up to the first EOS, or max_new_tokens without one
  prompt_len = int(decoding.prompt_lengths(batch['text_loss_mask'])[1])
  np.testing.assert_array_equal(result.positions, prompt_len - 1 + np.arange(n))

  tokens = np.array(batch['text_tokens'])
  tokens[1, prompt_len:] = tokenizer_lib.PAD_ID
  tokens[1, prompt_len:prompt_len + n] = result.tokens
  captured = capture(params, jnp.asarray(tokens), latents)
  # Each token is the argmax of the logits at its row, after the tokens before it: the answer is greedy decoding's
  # (decoding.greedy_decode, KV-cached), and each row is the query that chose its token.
  np.testing.assert_array_equal(np.argmax(captured.logits[1, result.positions], -1), result.tokens)
  np.testing.assert_allclose(result.weights, np.asarray(captured.weights)[:, 1][:, :, result.positions], atol=1e-6)
  chunks, m = config.model.num_chunks, config.model.tokens_per_chunk
  assert result.by_chunk.shape == (config.model.text.depth, n, chunks)
  np.testing.assert_allclose(result.by_chunk.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(result.by_chunk, result.weights.reshape(*result.weights.shape[:3], chunks, m)
                             .sum(-1).mean(1), rtol=1e-6)


def test_the_chunk_columns_follow_the_latents(tiny):
  config, model, params, batch, latents, capture = tiny
  chunks = config.model.num_chunks

  def maps(h):
    return np.asarray(attention_maps.by_chunk(capture(params, batch['text_tokens'], h).weights, chunks))

  original = maps(latents)
  swapped = maps(latents[:, jnp.array([2, 1, 0, 3])])  # chunks 1 and 3 trade places
  np.testing.assert_allclose(swapped, original[..., [2, 1, 0, 3]], rtol=1e-4, atol=1e-6)
  reversed_within = maps(latents[:, :, ::-1])  # each chunk's latents in reverse order: each chunk's sum stays
  np.testing.assert_allclose(reversed_within, original, rtol=1e-4, atol=1e-6)
  assert np.abs(original - 1.0 / chunks).max() > 1e-3  # the maps are not uniform, so the checks above could fail
