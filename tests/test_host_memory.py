"""host_memory.release hands back to the operating system what malloc keeps after a burst of small frees, as after
XLA compiles a step."""
import ctypes
import ctypes.util
import platform
import sys

import pytest

from mirasol_jax import host_memory

glibc = sys.platform == 'linux' and platform.libc_ver()[0] == 'glibc'


@pytest.mark.skipif(not glibc, reason='malloc_trim is glibc\'s')
def test_release_returns_freed_small_blocks():
  libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  libc.malloc.argtypes, libc.malloc.restype = (ctypes.c_size_t,), ctypes.c_void_p
  libc.free.argtypes, libc.free.restype = (ctypes.c_void_p,), None
  libc.memset.argtypes, libc.memset.restype = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t), ctypes.c_void_p
  # 160 MiB of 2 KiB blocks, small enough to come from the heap rather than their own mappings, each written so
  # that its pages are resident; every 64th is kept, so that free() alone cannot shrink the heap past it nor hand
  # back the holes between them.
  blocks = []
  for _ in range(80_000):
    pointer = libc.malloc(2048)
    libc.memset(pointer, 1, 2048)
    blocks.append(pointer)
  for i, pointer in enumerate(blocks):
    if i % 64:
      libc.free(pointer)
  before = host_memory.resident_mib()
  assert host_memory.release()
  after = host_memory.resident_mib()
  for pointer in blocks[::64]:
    libc.free(pointer)
  assert before - after > 100, (before, after)
