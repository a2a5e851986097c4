"""Device mesh and logical-axis sharding: where every parameter and activation lives.

Parameters and activations carry logical axis names (`embed`, `mlp`, `heads`, `activation_batch`, ...); the rules
below map them onto the mesh axes `data`, `fsdp` and `tensor`. Changing the parallelism of a run is a change of
`config.mesh` and `config.axis_rules`, never of model code.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# (logical name, mesh axis or axes or None). Unlisted names are replicated.
DEFAULT_AXIS_RULES = (
    ('activation_batch', BATCH_AXES),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_heads', 'tensor'),
    ('activation_kv', None),
    ('activation_mlp', 'tensor'),
    ('activation_vocab', 'tensor'),
    ('layers', None),
    ('embed', 'fsdp'),
    ('embed_out', 'tensor'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('vocab', 'tensor'),
    ('recon', 'tensor'),
    ('norm', None),
    ('conv_t', None),
    ('conv_h', None),
    ('conv_w', None),
    ('conv_in', None),
)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor); one axis may be -1 and takes the devices that remain."""
  unknown = sorted(set(mesh_config) - set(MESH_AXES))
  if unknown:
    raise ValueError(f'config.mesh has unknown axes {unknown}; axes are {MESH_AXES}')
  sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  free = [i for i, size in enumerate(sizes) if size == -1]
  if len(free) > 1:
    raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1')
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if free:
    if num_devices % fixed:
      raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices do not divide by {fixed}')
    sizes[free[0]] = num_devices // fixed
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f'config.mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices but '
                     f'{num_devices} are present')
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Optional[Sequence[Any]] = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a tree whose leaves may be flax LogicallyPartitioned boxes (unboxed leaves: replicated)."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, [tuple(r) for r in rules])


def box_values(tree: Any) -> Any:
  """The values inside flax partitioning boxes, without the sharding constraint `nn.unbox` applies (which
  abstract ShapeDtypeStruct trees cannot take)."""
  is_box = lambda x: isinstance(x, nn.Partitioned)
  return jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def drop_reduced_boxes(opt_state: Any, params: Any) -> Any:
  """`opt_state` with every partitioning box whose value does not have its parameter's shape replaced by the bare
  value (replicated). An optimizer state is made by mapping over the boxed parameters, so each statistic inherits
  its parameter's logical names; Adafactor's factored second moments are the parameter reduced over an axis (a row
  and a column statistic, or a placeholder of shape (1,)), which those names do not describe. They are a small
  fraction of the parameter's size. A statistic is matched to its parameter by the end of its tree path."""
  is_box = lambda x: isinstance(x, nn.Partitioned)
  shapes = {tuple(path): np.shape(box.value) for path, box in
            jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)[0] if is_box(box)}
  depths = sorted({len(path) for path in shapes})

  def fix(path, x):
    if not is_box(x):
      return x
    own = [shapes.get(tuple(path[len(path) - d:])) for d in depths if d <= len(path)]
    return x if np.shape(x.value) in own else x.value

  return jax.tree_util.tree_map_with_path(fix, opt_state, is_leaf=is_box)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data and fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))
