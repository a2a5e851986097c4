"""Preemption and grain's data workers.

A SIGTERM (SLURM's --signal, a TPU maintenance event, `kill`) makes the trainer save a checkpoint at the next step
boundary and stop (train.py). Schedulers signal the whole process group, and grain's data workers, spawned by the
trainer, are in it: a worker that died of the signal would take the batch the trainer waits for with it. The workers
therefore outlive SIGTERM as long as the process that spawned them: the trainer stops them as it exits, and a worker
whose parent did not survive the signal (`eval`, or a trainer signalled before it set its handler) exits soon after.
"""
from __future__ import annotations

import functools
import os
import signal
import threading
import time

import grain

_watching_parent = False


def _exit_when_orphaned(parent_pid: int) -> None:
  while os.getppid() == parent_pid:
    time.sleep(0.2)
  os._exit(128 + signal.SIGTERM)  # as if the signal had ended it


def _sigterm_in_worker(parent_pid: int, signum, frame) -> None:
  """Keeps the worker alive while its parent lives, and makes it exit once its parent is gone."""
  global _watching_parent
  if not _watching_parent:
    _watching_parent = True
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()


class WorkersOutliveSigterm(grain.transforms.Map):
  """The first operation of every DataLoader: passes examples through, and sets the SIGTERM handler of each data
  worker process.

  grain 0.2's DataLoader takes no worker initialisation function, but it pickles its operations into each worker:
  the handler is set as this operation is unpickled there, before the worker reads any data. Created (and kept,
  when num_workers is 0) in the process that iterates, where it changes nothing.
  """

  def __init__(self):
    self._parent_pid = os.getpid()

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    # Only a process's main thread may set a handler; grain unpickles in its workers' main thread.
    if os.getpid() != self._parent_pid and threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, functools.partial(_sigterm_in_worker, self._parent_pid))

  def map(self, element):
    return element
