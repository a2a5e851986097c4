"""The files of a run's workdir, on a local disk or on cloud storage alike.

Orbax writes the checkpoints through etils.epath. Everything else that a run reads or writes in its workdir goes
through this module, on the same library: config.json, metrics.jsonl, predictions/, tokenizer.model, probe.json,
TensorBoard event files, and the bookkeeping of the checkpoints folder (listing steps, reading their metadata,
setting damaged ones aside). A workdir may then be `gs://bucket/run` (install the `gcs` extra, which brings gcsfs)
or `s3://...` (s3fs) as well as a local folder; the local case runs the same code.

Object stores differ from a disk in two ways that matter here, and this module hides both:
* No append. `Appender` appends lines to a local file, and on an object store rewrites the whole object from a copy
  it keeps in memory (logs are small), so the object always holds a whole prefix of the log.
* No atomic rename of a folder. `write_bytes` and `write_text` replace a file whole: on a disk through a temporary
  file and a rename (a kill leaves the old file or the new one, never half of either); on an object store one write
  of an object is already whole. `move` moves a folder by copying it and deleting the original there.
"""
from __future__ import annotations

import io
import os
import posixpath
from typing import Optional, Union

from etils import epath

PathLike = Union[str, os.PathLike]
# The schemes etils.epath sends to its cloud backends; a path without one is a local path.
REMOTE_PREFIXES = ('gs://', 's3://', 'az://', 'hf://')


def is_local(path: PathLike) -> bool:
  return not os.fspath(path).startswith(REMOTE_PREFIXES)


# Set to 1 for a workdir on a mounted bucket (a FUSE file system over an object store, which may not append or rename
# reliably): local paths are then written as on an object store. The tests run the object-store code this way.
OBJECT_STORE_ENV = 'MIRASOL_OBJECT_STORE_PATHS'


def object_store(path: PathLike) -> bool:
  """Whether `path` is written as on an object store: no appends, no renames."""
  return not is_local(path) or os.environ.get(OBJECT_STORE_ENV, '') not in ('', '0')


def path(p: PathLike) -> epath.Path:
  return epath.Path(p)


def absolute(p: PathLike) -> str:
  """A local path made absolute (orbax needs one); a cloud path as it is."""
  return os.path.abspath(p) if is_local(p) else os.fspath(p)


def join(base: PathLike, *names: str) -> str:
  base = os.fspath(base)
  return posixpath.join(base, *names) if not is_local(base) else os.path.join(base, *names)


def basename(p: PathLike) -> str:
  return posixpath.basename(os.fspath(p).rstrip('/')) if not is_local(p) else os.path.basename(os.path.normpath(p))


def exists(p: PathLike) -> bool:
  return epath.Path(p).exists()


def isdir(p: PathLike) -> bool:
  return epath.Path(p).is_dir()


def makedirs(p: PathLike) -> None:
  epath.Path(p).mkdir(parents=True, exist_ok=True)


def listdir(p: PathLike) -> list[str]:
  """The names in folder `p`; [] when it does not exist."""
  folder = epath.Path(p)
  return sorted(child.name for child in folder.iterdir()) if folder.is_dir() else []


def glob(folder: PathLike, pattern: str) -> list[str]:
  """Paths in `folder` matching the shell pattern `pattern` (one level, e.g. 'process_*.json'), sorted."""
  base = epath.Path(folder)
  return sorted(os.fspath(p) for p in base.glob(pattern)) if base.is_dir() else []


def read_bytes(p: PathLike) -> bytes:
  return epath.Path(p).read_bytes()


def read_text(p: PathLike) -> str:
  return epath.Path(p).read_text(encoding='utf-8')


def write_bytes(p: PathLike, data: bytes) -> None:
  """Replaces the file `p` whole (its folder is made if missing)."""
  target = epath.Path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  if object_store(p):
    target.write_bytes(data)
    return
  tmp = epath.Path(f'{os.fspath(p)}.tmp{os.getpid()}')
  tmp.write_bytes(data)
  os.replace(os.fspath(tmp), os.fspath(p))


def write_text(p: PathLike, text: str) -> None:
  write_bytes(p, text.encode('utf-8'))


def copy(src: PathLike, dst: PathLike) -> None:
  """Copies file `src` to `dst`, which is replaced whole; either may be local or remote."""
  write_bytes(dst, read_bytes(src))


def move(src: PathLike, dst: PathLike) -> None:
  """Moves the file or folder `src` to `dst` (which must not exist; its parent is made if missing)."""
  source, target = epath.Path(src), epath.Path(dst)
  if not object_store(src) and not object_store(dst):
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(os.fspath(src), os.fspath(dst))
  elif source.is_dir():
    for child in source.iterdir():
      move(child, target / child.name)
    source.rmtree()
  else:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())
    source.unlink()


class Appender:
  """Appends to the file `path`: on a disk by opening it to append; on an object store by rewriting the whole
  object each time from a copy kept in memory, which starts from what the object holds."""

  def __init__(self, path: PathLike):
    self.path = os.fspath(path)
    self._copy: Optional[io.BytesIO] = None
    if object_store(self.path):
      self._copy = io.BytesIO(read_bytes(self.path) if exists(self.path) else b'')
      self._copy.seek(0, io.SEEK_END)

  def append(self, data: bytes) -> None:
    if self._copy is None:
      with open(self.path, 'ab') as f:
        f.write(data)
      return
    self._copy.write(data)
    epath.Path(self.path).write_bytes(self._copy.getvalue())


class _RecordFile:
  """A file object for tensorboardX's event writer that appends through an Appender on flush and close (tensorboardX
  flushes every flush_secs): how its event files reach an object store without extra libraries."""

  def __init__(self, path: str):
    self._appender = Appender(path)
    self._pending = io.BytesIO()

  def write(self, data: bytes) -> None:
    self._pending.write(data)

  def flush(self) -> None:
    if self._pending.tell():
      self._appender.append(self._pending.getvalue())
      self._pending = io.BytesIO()

  def close(self) -> None:
    self.flush()


class _RecordFiles:
  """tensorboardX's file opener for a scheme of ours: paths '<scheme>:<path>' open `path` through `_RecordFile`."""

  def __init__(self, strip: str = ''):
    self._strip = strip

  def open(self, path: str) -> _RecordFile:
    return _RecordFile(path[len(self._strip):])

  def directory_check(self, path: str) -> None:
    makedirs(path[len(self._strip):])


# A local folder written as on an object store goes to tensorboardX under this scheme.
_LOCAL_OBJECTS = 'mirasol-objects'


def summary_writer(logdir: PathLike, **kwargs):
  """A tensorboardX SummaryWriter whose event files go to `logdir` on a disk or a cloud store (tensorboardX picks
  its file opener by the scheme before the first ':'; cloud schemes, and local folders written as on an object
  store, are sent through this module)."""
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  for prefix in REMOTE_PREFIXES:
    record_writer.register_writer_factory(prefix.split(':')[0], _RecordFiles())
  logdir = os.fspath(logdir)
  if is_local(logdir) and object_store(logdir):
    record_writer.register_writer_factory(_LOCAL_OBJECTS, _RecordFiles(strip=f'{_LOCAL_OBJECTS}:'))
    logdir = f'{_LOCAL_OBJECTS}:{os.path.abspath(logdir)}'
  return SummaryWriter(logdir, **kwargs)
