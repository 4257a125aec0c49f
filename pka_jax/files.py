"""Outputs written whole or not at all: under a temporary name beside the target, then renamed
into place, so that a crash never leaves a half-written file or directory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
import json
import os
import shutil
import tempfile


@contextlib.contextmanager
def new_file(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path` to write; renames it to `path` when the block
  completes, and removes it if the block fails."""
  tmp = f'{path}.tmp{os.getpid()}'  # several processes may write the same file
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_text(path: str, text: str) -> None:
  with new_file(path) as tmp, open(tmp, 'w') as f:
    f.write(text)


def write_json(path: str, payload: dict) -> None:
  write_text(path, json.dumps(payload, indent=2, sort_keys=True))


def temporary_directory_beside(directory: str) -> str:
  """An empty directory in `directory`'s parent, with the permissions `mkdir` would give."""
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.tmp-{os.path.basename(os.path.abspath(directory))}-',
                         dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the files from other users
  return tmp


def replace_directory(tmp: str, directory: str) -> None:
  """Puts the complete directory `tmp` in the place of `directory` (which may not exist)."""
  if os.path.exists(directory):
    old = tmp + '.old'
    os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old)
  else:
    os.rename(tmp, directory)


@contextlib.contextmanager
def new_directory(directory: str) -> Iterator[str]:
  """Yields an empty directory beside `directory` to fill; puts it in `directory`'s place when
  the block completes, and removes it if the block fails."""
  tmp = temporary_directory_beside(directory)
  try:
    yield tmp
    replace_directory(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
