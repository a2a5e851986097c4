"""The PyTorch side of benchmarks/peer_pytorch.py: one full training step of `mirasol_pytorch.Mirasol`, timed.

Runs inside the peer's own virtual environment (torch, x-transformers, mirasol-pytorch; no JAX, no mirasol_jax), as
a child process of peer_pytorch.py, which passes the workload as one JSON argument and reads one JSON line back
(parameter counts, median step wall and CPU time, minor page faults per step, peak RSS during the timed steps):

  python benchmarks/_peer_torch_step.py '{"batch": 4, "frames": 32, ...}'

The step is what a user of that package writes: forward with the loss, backward, global-norm clipping, AdamW.
Inputs are random (video in [-1, 1] as floats, log-mel-like audio, random token ids); the model is built with the
package's own constructor from the keyword arguments below, nothing patched.
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time


def peak_rss_mib() -> float:
  """This process's peak resident memory since the last reset_peak_rss (VmHWM), in MiB."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) / 1024
  return float('nan')


def reset_peak_rss() -> None:
  """Resets VmHWM to the current resident size, so that the next reading is the peak from now on."""
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')


def build(w: dict):
  from mirasol_pytorch import Mirasol
  heads, dim_head = w['heads'], w['width'] // w['heads']
  tower = dict(heads=heads, attn_dim_head=dim_head)  # the Encoder's own argument names for the ViTs
  return Mirasol(
      dim=w['width'],
      num_text_tokens=w['vocab'],
      video_image_size=w['image'],
      video_frames_per_timechunk=w['frames'] // w['chunks'],
      audio_freq_dim=w['mel_bins'],
      audio_time_dim_per_timechunk=w['audio_frames_per_chunk'],
      audio_patch_size=tuple(w['audio_patch']),  # (freq, time)
      video_patch_size=tuple(w['video_patch']),  # (spatial, time)
      video_recon_patch_size=tuple(w['video_recon_patch']),
      video_encoder=dict(depth=w['video_depth'], **tower),
      audio_encoder=dict(depth=w['audio_depth'], **tower),
      text_max_seq_len=w['text_len'],
      encoder_depth=w['av_depth'],
      decoder_depth=w['text_depth'],
      combiner_depth=w['combiner_depth'],
      combiner_output_num_tokens=w['tokens_per_chunk'],
      attn_dim_head=dim_head,
      attn_heads=heads,
  )


def main() -> None:
  w = json.loads(sys.argv[1])
  import torch
  torch.manual_seed(0)
  model = build(w)
  params = sum(p.numel() for p in model.parameters())
  groups = {}
  for name, p in model.named_parameters():
    top = name.split('.', 1)[0]
    groups[top] = groups.get(top, 0) + p.numel()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  batch = w['batch']
  video = torch.rand(batch, 3, w['frames'], w['image'], w['image']) * 2 - 1
  audio = torch.randn(batch, w['mel_bins'], w['chunks'] * w['audio_frames_per_chunk'])
  text = torch.randint(0, w['vocab'], (batch, w['text_len']))
  model.train()

  def step() -> float:
    loss = model(video=video, audio=audio, text=text)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)

  start = time.perf_counter()
  first_loss = step()
  first_s = time.perf_counter() - start
  for _ in range(w['warmup'] - 1):
    step()
  reset_peak_rss()
  times, cpu_times, loss = [], [], first_loss
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(w['steps']):
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = step()
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  print(json.dumps({
      'side': 'peer', 'params': params, 'param_groups': groups, 'first_step_s': first_s,
      'step_s': statistics.median(times), 'times': times,
      'cpu_s': statistics.median(cpu_times),
      'page_faults': (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / len(times),
      'first_loss': first_loss, 'last_loss': loss,
      'step_peak_rss_mib': peak_rss_mib(), 'threads': torch.get_num_threads(),
      'versions': {'torch': torch.__version__}}), flush=True)


if __name__ == '__main__':
  main()
