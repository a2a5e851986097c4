"""Config helpers: `key=value` arguments of config files, and loading `path.py[:arg]` outside absl flags."""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Optional

import ml_collections


def parse_arg(arg: Optional[str], **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'size=tiny,combiner=ttm' into a ConfigDict, typed like `defaults`; unknown keys are an error."""
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'config argument {key!r} is not one of {sorted(defaults)} (given {arg!r})')
    default = defaults[key]
    if not sep:
      value = 'True'  # a bare flag, e.g. 'runlocal'
    if isinstance(default, bool):
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'config argument {key}={value!r} is not a boolean')
      result[key] = value.lower() in ('true', '1')
    else:
      result[key] = type(default)(value) if default is not None else value
  return result


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads 'configs/pretrain.py:size=tiny' as `--config=` would."""
  path, _, arg = spec.partition(':')
  if not os.path.exists(path):
    raise FileNotFoundError(f'config file {path!r} does not exist')
  module_spec = importlib.util.spec_from_file_location('mirasol_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
