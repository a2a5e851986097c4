"""The host process's memory: handing back to the operating system what compilation freed.

XLA's compiler allocates hundreds of megabytes of small objects while it compiles a step and frees most of them
when it is done: for the 107M-parameter model of benchmarks/peer_pytorch.py (float32, unrolled) the process's
resident size goes from 0.36 GiB after tracing to 1.4 GiB, and stays there, although only 0.8 GiB is still in use.
glibc's malloc keeps what was freed in its arenas, where the step's large buffers (mapped apart) cannot reuse it,
so the process trains with that garbage resident beside its state and its step's buffers. `release()` asks malloc
to return every free page (`malloc_trim(0)`); the trainer, the evaluators and `answer` call it after compiling and
after initialising the state. It costs milliseconds (tens of them after a compilation's worth of frees), and
nothing where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Callable, Optional


@functools.cache
def _malloc_trim() -> Optional[Callable[[int], int]]:
  if sys.platform != 'linux':
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    trim = libc.malloc_trim  # glibc only: musl and others have no such function
  except (OSError, AttributeError):
    return None
  trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
  return trim


def release() -> bool:
  """Returns the free pages of malloc's arenas to the operating system; True when there was a way to (glibc)."""
  trim = _malloc_trim()
  if trim is None:
    return False
  trim(0)
  return True


def resident_mib() -> Optional[float]:
  """This process's resident memory now, in MiB (None where /proc is not there)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmRSS:'):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return None
