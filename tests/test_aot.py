"""benchmarks/aot_compile.py: the tiny preset's train step compiled ahead of time for a 4-device mesh in a
subprocess, with sane memory and collective figures; a mesh that does not divide refused by name; the collective
count of an HLO module with nested loops, tuples, promotions and sliced all-reduces."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import aot_compile  # noqa: E402

SCRIPT = os.path.join(REPO, 'benchmarks', 'aot_compile.py')

# Eight devices. The entry gathers f32[2,8] into f32[8,8] over groups of 4 and all-reduces f32[64] over pairs,
# promoted from bf16 (its reducer's name) and only sliced afterwards. A loop of known trip count 3 all-reduces a
# tuple (f32[4,8], bf16[16]) over groups of 4 and holds a loop of 2 trips with a collective-permute in which 2 of 8
# devices send; a loop without a trip count all-to-alls f32[8].
HLO = """HloModule test

%add.clone_promoted (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%add (x.1: f32[], y.1: f32[]) -> f32[] {
  %x.1 = f32[] parameter(0)
  %y.1 = f32[] parameter(1)
  ROOT %sum.1 = f32[] add(%x.1, %y.1)
}

%inner_body (q: (s32[], f32[16])) -> (s32[], f32[16]) {
  %q = (s32[], f32[16]{0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %v = f32[16]{0} get-tuple-element(%q), index=1
  %cp = f32[16]{0} collective-permute(%v), channel_id=3, source_target_pairs={{0,1},{1,0},{2,2},{3,3},{4,4},{5,5},{6,6},{7,7}}
  ROOT %out = (s32[], f32[16]{0}) tuple(%j, %cp)
}

%inner_cond (q.1: (s32[], f32[16])) -> pred[] {
  %q.1 = (s32[], f32[16]{0}) parameter(0)
  %j.1 = s32[] get-tuple-element(%q.1), index=0
  %two = s32[] constant(2)
  ROOT %lt.1 = pred[] compare(%j.1, %two), direction=LT
}

%body (p: (s32[], f32[4,8], bf16[16])) -> (s32[], f32[4,8], bf16[16]) {
  %p = (s32[], f32[4,8]{1,0}, bf16[16]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %w = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %z = bf16[16]{0} get-tuple-element(%p), index=2
  %ar = (f32[4,8]{1,0}, bf16[16]{0}) all-reduce(%w, %z), channel_id=1, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, use_global_device_ids=true, to_apply=%add
  %w1 = f32[4,8]{1,0} get-tuple-element(%ar), index=0
  %z1 = bf16[16]{0} get-tuple-element(%ar), index=1
  %zf = f32[16]{0} convert(%z1)
  %init.1 = (s32[], f32[16]{0}) tuple(%i, %zf)
  %inner = (s32[], f32[16]{0}) while(%init.1), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"2"}}
  ROOT %t = (s32[], f32[4,8]{1,0}, bf16[16]{0}) tuple(%i, %w1, %z1)
}

%cond (p.1: (s32[], f32[4,8], bf16[16])) -> pred[] {
  %p.1 = (s32[], f32[4,8]{1,0}, bf16[16]{0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%i.1, %three), direction=LT
}

%body2 (r: (s32[], f32[8])) -> (s32[], f32[8]) {
  %r = (s32[], f32[8]{0}) parameter(0)
  %k = s32[] get-tuple-element(%r), index=0
  %u = f32[8]{0} get-tuple-element(%r), index=1
  %a2a = f32[8]{0} all-to-all(%u), channel_id=4, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  ROOT %out.2 = (s32[], f32[8]{0}) tuple(%k, %a2a)
}

%cond2 (r.1: (s32[], f32[8])) -> pred[] {
  %r.1 = (s32[], f32[8]{0}) parameter(0)
  ROOT %yes = pred[] constant(false)
}

ENTRY %main (a: f32[2,8], g: bf16[64], s: (s32[], f32[4,8], bf16[16]), e: (s32[], f32[8])) -> f32[8,8] {
  %a = f32[2,8]{1,0} parameter(0)
  %g = bf16[64]{0} parameter(1)
  %s = (s32[], f32[4,8]{1,0}, bf16[16]{0}) parameter(2)
  %e = (s32[], f32[8]{0}) parameter(3)
  %ag = f32[8,8]{1,0} all-gather(%a), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}
  %gf = f32[64]{0} convert(%g)
  %grad = f32[64]{0} all-reduce(%gf), channel_id=5, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add.clone_promoted
  %zero = s32[] constant(0)
  %shard = f32[32]{0} dynamic-slice(%grad, %zero), dynamic_slice_sizes={32}
  %loop = (s32[], f32[4,8]{1,0}, bf16[16]{0}) while(%s), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %loop2 = (s32[], f32[8]{0}) while(%e), condition=%cond2, body=%body2
  ROOT %res = f32[8,8]{1,0} copy(%ag)
}
"""


def test_collective_traffic_multiplies_loops_and_undoes_the_cpu_habits():
  c = aot_compile.collective_traffic(HLO, num_devices=8)
  gather = c['all-gather']
  assert gather['count'] == 1 and gather['bytes'] == 256 and gather['wire'] == pytest.approx(256 * 3 / 4)
  reduce = c['all-reduce']
  # Entry: one f32[64] (256 bytes) over pairs; the loop: three tuples of 128 + 32 bytes over groups of 4.
  assert reduce['count'] == 1 + 3
  assert reduce['bytes'] == 256 + 3 * 160
  assert reduce['wire'] == pytest.approx(2 * 0.5 * 256 + 3 * 2 * 0.75 * 160)
  # On GPU/TPU the promoted, sliced one is a bf16 reduce-scatter: (1/2) * 256 / 2 bytes.
  assert reduce['wire_gpu_tpu'] == pytest.approx(0.5 * 256 / 2 + 3 * 2 * 0.75 * 160)
  permute = c['collective-permute']
  assert permute['count'] == 3 * 2 and permute['bytes'] == 6 * 64 and permute['wire'] == pytest.approx(6 * 64 / 4)
  assert c['all-to-all']['count'] == 1 and c['all-to-all']['wire'] == pytest.approx(32 * 7 / 8)
  assert c['loops without a known trip count'] == 1
  assert c['reduce-scatter']['count'] == 0


def test_quick_compiles_tiny_for_four_devices(tmp_path):
  out = tmp_path / 'aot.json'
  result = subprocess.run([sys.executable, SCRIPT, '--quick', '--json', str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'XLA memory analysis per device' in result.stdout and 'Analytic model against the compiler' in result.stdout
  report = json.loads(out.read_text())
  (compiled,) = report['compiled']
  assert compiled['devices'] == 4 and compiled['mesh'] == [1, 2, 2]
  memory, state = compiled['memory'], compiled['state_bytes']
  # The arguments are exactly the state's shards and the batch's; the donated state is reused by the outputs.
  assert memory['arguments'] == sum(state.values()) + compiled['batch_bytes']
  assert state['params'] + state['opt_state'] <= memory['aliased'] <= memory['outputs']
  assert memory['temporaries'] > 0
  assert memory['peak'] == (memory['arguments'] + memory['outputs'] - memory['aliased'] + memory['temporaries'] +
                            memory['generated_code'])
  # Adam's two moments per parameter, and the parameters split over fsdp x tensor = 4 devices (some replicated).
  assert state['opt_state'] == pytest.approx(2 * state['params'], rel=0.01)
  total = 4 * aot_compile.Preset('tiny').shards((1, 1, 1))['local']
  assert total / 4 < state['params'] < total / 1.5
  collectives = compiled['collectives']
  for kind in ('all-gather', 'all-reduce'):  # fsdp gathers weights, tensor parallelism reduces activations
    assert collectives[kind]['count'] > 0 and collectives[kind]['wire'] > 0
  assert collectives['loops without a known trip count'] == 0
  ratio = report['ratios']['tiny/full']
  assert 0.5 < ratio < 2.5, ratio  # the analytic model is within a factor of 2 of XLA


def test_a_mesh_that_does_not_divide_is_refused_by_name():
  result = subprocess.run([sys.executable, SCRIPT, '--quick', '--meshes', '1x1x4'], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode != 0
  assert 'mesh 1x1x4 does not divide' in result.stdout
  assert '(heads=2) over tensor=4' in result.stdout  # the tiny towers have 2 heads
  assert 'compiling' not in result.stdout
