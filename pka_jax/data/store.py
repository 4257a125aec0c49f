"""The prepared store: a split dataset as .npy files plus metadata, written atomically.

Layout of a store directory:
  train_offsets.npy, train_items.npy            per-user train sequences (CSR)
  {valid,test}_{user,item,timestamp}.npy        held-out events in time order
  item_ids.npy, user_ids.npy                    raw identifiers of the dense ids
  meta.json                                     split info plus whatever the caller adds

The directory is written under a temporary name and renamed into place, so a reader sees
either the whole store or none of it. Replacing a store moves the old one aside under a fixed
name first; a crash between the two renames is repaired by the next reader or writer, which
puts the old store back (or removes it, once the new one is in place).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from pka_jax.data.sequences import Events, SequenceStore, SplitDataset

META_FILE = 'meta.json'


def _raw_ids(ids: np.ndarray) -> np.ndarray:
  """Object arrays (pyarrow strings) become fixed-width unicode so they save without pickle."""
  return ids.astype(str) if ids.dtype == object else ids


def _set_aside(directory: str) -> str:
  """Where a store being replaced waits until its successor is in place."""
  directory = os.path.abspath(directory)
  return os.path.join(os.path.dirname(directory), '.' + os.path.basename(directory) + '.old')


def recover(directory: str) -> None:
  """Repairs a replacement cut short between its renames."""
  old = _set_aside(directory)
  if not os.path.exists(old):
    return
  if os.path.exists(directory):
    shutil.rmtree(old)
  else:
    os.rename(old, directory)


def save_split(dataset: SplitDataset, directory: str, meta: dict | None = None) -> None:
  """Writes `dataset` to `directory`, replacing an existing store only once complete."""
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  recover(directory)
  tmp = tempfile.mkdtemp(prefix='.tmp-' + os.path.basename(directory) + '-', dir=parent)
  try:
    arrays = {
        'train_offsets': dataset.train.offsets, 'train_items': dataset.train.items,
        'item_ids': _raw_ids(dataset.item_ids), 'user_ids': _raw_ids(dataset.user_ids),
    }
    for part in ('valid', 'test'):
      events = getattr(dataset, part)
      for field in ('user', 'item', 'timestamp'):
        arrays[f'{part}_{field}'] = getattr(events, field)
    for name, array in arrays.items():
      np.save(os.path.join(tmp, name + '.npy'), np.asarray(array), allow_pickle=False)
    with open(os.path.join(tmp, META_FILE), 'w') as f:
      json.dump({'split': dataset.info, **(meta or {})}, f, indent=2, sort_keys=True)
    if os.path.exists(directory):
      old = _set_aside(directory)
      os.rename(directory, old)
      os.rename(tmp, directory)
      shutil.rmtree(old)
    else:
      os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def read_meta(directory: str) -> dict | None:
  """The store's metadata, or None when there is no complete store at `directory`."""
  recover(directory)
  path = os.path.join(directory, META_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def load_split(directory: str) -> SplitDataset:
  """Loads a store written by `save_split` (arrays memory-mapped, read-only)."""
  meta = read_meta(directory)
  if meta is None:
    raise FileNotFoundError(f'No prepared dataset at {directory} (missing {META_FILE})')

  def load(name):
    return np.load(os.path.join(directory, name + '.npy'), mmap_mode='r', allow_pickle=False)

  def events(part):
    return Events(*(load(f'{part}_{f}') for f in ('user', 'item', 'timestamp')))

  return SplitDataset(
      train=SequenceStore(offsets=load('train_offsets'), items=load('train_items')),
      valid=events('valid'), test=events('test'),
      item_ids=load('item_ids'), user_ids=load('user_ids'), info=meta['split'])
