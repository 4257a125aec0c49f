"""Raw files: found under the data directory, or downloaded where the licence allows.

A download streams into a temporary file beside the destination, checks the sha256 when one
is known and is renamed into place only when complete. When the file is absent and cannot be
downloaded, `DataUnavailableError` says which URL to fetch and the exact path to put it at.
Setting the environment variable `PKA_JAX_NO_DOWNLOAD=1` forbids network access (tests do).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable

from absl import logging
import tqdm

from pka_jax.data.errors import DataError, DataUnavailableError
from pka_jax.data.registry import Dataset

NO_DOWNLOAD_ENV = 'PKA_JAX_NO_DOWNLOAD'
_CHUNK = 1 << 20
_TIMEOUT_S = 60

Opener = Callable[..., object]  # urllib.request.urlopen(url, timeout=...) or a test double


def downloads_allowed() -> bool:
  """False when `PKA_JAX_NO_DOWNLOAD` is set to anything but '' or '0'."""
  return os.environ.get(NO_DOWNLOAD_ENV, '') in ('', '0')


def find_raw_file(dataset: Dataset, directory: str) -> str | None:
  """The path of the dataset's raw file under `directory`, under any of its names."""
  for name in dataset.raw.names:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return None


def ensure_raw_file(dataset: Dataset, directory: str, *, allow_download: bool = True,
                    opener: Opener = urllib.request.urlopen) -> str:
  """The raw file's path, downloading it first if it is missing and a URL is known."""
  found = find_raw_file(dataset, directory)
  if found:
    return found
  destination = os.path.abspath(os.path.join(directory, dataset.raw.name))
  if not dataset.raw.urls:
    raise DataUnavailableError(_instructions(dataset, destination))
  if not allow_download:
    raise DataUnavailableError(_instructions(
        dataset, destination,
        f'downloads are disabled: {NO_DOWNLOAD_ENV} is set or --nodownload was given'))
  failures = []
  for url in dataset.raw.urls:
    try:
      fetch(url, destination, sha256=dataset.raw.sha256, opener=opener)
      return destination
    except (urllib.error.URLError, http.client.HTTPException, OSError, DataError) as e:
      logging.warning('Download of %s failed: %s', url, e)
      failures.append(f'{url}: {e}')
  raise DataUnavailableError(_instructions(
      dataset, destination, 'automatic download failed: ' + '; '.join(failures)))


def _instructions(dataset: Dataset, destination: str, reason: str | None = None) -> str:
  raw = dataset.raw
  lines = [f'{dataset.title}: the raw file {raw.name} is missing.']
  if raw.urls:
    lines.append(f'Download {" or ".join(raw.urls)}')
    lines.append(f'and place it at {destination}')
  else:
    lines.append(f'It cannot be downloaded automatically: {raw.how_to_get}.')
    lines.append(f'Place it at {destination}')
  if raw.other_names:
    others = ', '.join(os.path.join(os.path.dirname(destination), n) for n in raw.other_names)
    lines.append(f'(or at {others})')
  if reason:
    lines.append(f'({reason})')
  return '\n'.join(lines)


def fetch(url: str, destination: str, *, sha256: str | None = None,
          opener: Opener = urllib.request.urlopen) -> None:
  """Downloads `url` to `destination` atomically, with a progress bar and a checksum check."""
  directory = os.path.dirname(os.path.abspath(destination))
  created = _first_missing(directory)
  os.makedirs(directory, exist_ok=True)
  name = os.path.basename(destination)
  fd, partial = tempfile.mkstemp(prefix=f'.{name}.', suffix='.part', dir=directory)
  try:
    digest = hashlib.sha256()
    with os.fdopen(fd, 'wb') as out, opener(url, timeout=_TIMEOUT_S) as response:
      total = int(response.headers.get('Content-Length') or 0) or None
      with tqdm.tqdm(total=total, unit='B', unit_scale=True, desc=name, mininterval=1) as bar:
        while chunk := response.read(_CHUNK):
          out.write(chunk)
          digest.update(chunk)
          bar.update(len(chunk))
    if sha256 is not None and digest.hexdigest() != sha256:
      raise DataError(f'{url}: checksum mismatch: expected sha256 {sha256}, '
                      f'got {digest.hexdigest()}')
    os.replace(partial, destination)
    logging.info('Downloaded %s to %s', url, destination)
  except BaseException:
    if os.path.exists(partial):
      os.remove(partial)
    if created:  # leave no empty directories behind a failed download
      shutil.rmtree(created, ignore_errors=True)
    raise


def _first_missing(directory: str) -> str | None:
  """The outermost ancestor of `directory` (or itself) that does not exist yet."""
  missing = None
  while not os.path.isdir(directory):
    missing, directory = directory, os.path.dirname(directory)
  return missing
