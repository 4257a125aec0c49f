"""From a raw file to the prepared store: read, filter, split, save, and reuse when unchanged.

The store of dataset `name` lives at `<data_dir>/<name>/prepared`. Its metadata records the
preprocessing and split settings, fingerprints of the raw file and the store format version;
their hash is the cache key. A store whose key matches is loaded as is; otherwise the dataset
is rebuilt and the new store replaces the old one atomically (`store.save_split`), so a failure
leaves the previous store, or none, and nothing half-written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import urllib.request
from typing import Any

from absl import logging
import numpy as np

from pka_jax.data import download, registry, store
from pka_jax.data.errors import DataError
from pka_jax.data.interactions import Interactions
from pka_jax.data.sequences import SplitDataset
from pka_jax.data.split import temporal_split

# Bump when the store layout or the preprocessing code changes what a store holds.
STORE_FORMAT_VERSION = 1
STORE_NAME = 'prepared'
_FULL_HASH_LIMIT = 256 << 20  # files up to this size are hashed whole
_EDGE_BYTES = 1 << 20  # larger files: size, mtime and hashes of the first and last MiB


@dataclasses.dataclass(frozen=True)
class SplitSettings:
  """The temporal split's parameters (docs/design.md §3)."""

  q_valid: float = 0.95
  q_test: float = 0.97
  max_eval: int = 50_000


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A prepared store: where it is, its metadata and whether it was reused."""

  directory: str
  meta: dict
  reused: bool


def store_directory(name: str, data_dir: str) -> str:
  return os.path.join(data_dir, name, STORE_NAME)


def fingerprint_file(path: str) -> dict:
  """Identifies a raw file's content cheaply: whole sha256 when small, edges when large."""
  size = os.path.getsize(path)
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    if size <= _FULL_HASH_LIMIT:
      for chunk in iter(lambda: f.read(_EDGE_BYTES), b''):
        digest.update(chunk)
      return {'name': os.path.basename(path), 'size': size, 'sha256': digest.hexdigest()}
    digest.update(f.read(_EDGE_BYTES))
    f.seek(size - _EDGE_BYTES)
    digest.update(f.read(_EDGE_BYTES))
  return {'name': os.path.basename(path), 'size': size, 'mtime_ns': os.stat(path).st_mtime_ns,
          'sha256_first_last_mib': digest.hexdigest()}


def cache_key(settings: dict, raw_files: list[dict]) -> str:
  blob = json.dumps({'format': STORE_FORMAT_VERSION, 'settings': settings, 'raw': raw_files},
                    sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()


def filter_min_counts(interactions: Interactions, min_user: int, min_item: int) -> Interactions:
  """Drops users and items with too few interactions, repeatedly, until both bounds hold."""
  user, item, time_ = interactions.user, interactions.item, interactions.timestamp
  num_users, num_items = len(interactions.user_ids), len(interactions.item_ids)
  while len(user):
    user_counts = np.bincount(user, minlength=num_users)
    item_counts = np.bincount(item, minlength=num_items)
    keep = (user_counts[user] >= min_user) & (item_counts[item] >= min_item)
    if keep.all():
      break
    user, item, time_ = user[keep], item[keep], time_[keep]
  if len(user) == len(interactions):
    return interactions
  return _compact(user, item, time_, interactions.user_ids, interactions.item_ids)


def _compact(user, item, time_, user_ids, item_ids) -> Interactions:
  """Re-encodes codes densely over the identifiers still in use (their order is kept)."""
  used_users = np.bincount(user, minlength=len(user_ids)) > 0
  used_items = np.bincount(item, minlength=len(item_ids)) > 0
  return Interactions(
      user=(np.cumsum(used_users) - 1)[user], item=(np.cumsum(used_items) - 1)[item],
      timestamp=time_, user_ids=user_ids[used_users], item_ids=item_ids[used_items])


def interaction_stats(interactions: Interactions) -> dict:
  lengths = np.bincount(interactions.user)
  return {
      'users': len(interactions.user_ids), 'items': len(interactions.item_ids),
      'interactions': len(interactions),
      'mean_sequence_length': float(lengths.mean()) if len(lengths) else 0.0,
      'median_sequence_length': float(np.median(lengths)) if len(lengths) else 0.0,
  }


def split_stats(dataset: SplitDataset) -> dict:
  info = dataset.info
  lengths = dataset.train.lengths()
  return {
      'train': info['num_train'], 'valid': info['num_valid'], 'test': info['num_test'],
      'train_users': int((lengths > 0).sum()), 'catalog': dataset.num_items,
      'dropped_cold_items': info['num_dropped_cold_items'],
  }


def read_and_filter(dataset: registry.Dataset, raw_path: str) -> tuple[Interactions, dict]:
  """Reads the raw file and applies the entry's filters; returns them and their statistics."""
  options: dict[str, Any] = dict(dataset.reader_options)
  if dataset.min_rating is not None:
    options['min_rating'] = dataset.min_rating
  raw = dataset.read(raw_path, **options)
  logging.info('%s: read %d interactions from %s', dataset.name, len(raw), raw_path)
  kept = filter_min_counts(raw, dataset.min_user_interactions, dataset.min_item_interactions)
  if not len(kept):
    raise DataError(
        f'{raw_path}: no interactions left after keeping users with at least '
        f'{dataset.min_user_interactions} and items with at least '
        f'{dataset.min_item_interactions} interactions')
  return kept, {'read': interaction_stats(raw), 'preprocessed': interaction_stats(kept)}


def prepare(name: str, data_dir: str, *, split: SplitSettings = SplitSettings(),
            overrides: dict | None = None, allow_download: bool | None = None,
            force: bool = False, opener: download.Opener = urllib.request.urlopen) -> Prepared:
  """Makes sure the prepared store of `name` is current; builds it when it is not.

  `overrides` replaces registry fields (e.g. `{'min_user_interactions': 10}`).
  `allow_download` None follows `PKA_JAX_NO_DOWNLOAD`.
  """
  dataset = dataclasses.replace(registry.get(name), **(overrides or {}))
  if allow_download is None:
    allow_download = download.downloads_allowed()
  raw_path = download.ensure_raw_file(dataset, os.path.join(data_dir, name),
                                      allow_download=allow_download, opener=opener)
  settings = {**dataset.settings(), 'split': dataclasses.asdict(split)}
  raw_files = [fingerprint_file(raw_path)]

  def build():
    interactions, stats = read_and_filter(dataset, raw_path)
    return interactions, stats, {'title': dataset.title, 'interaction': dataset.interaction}

  return prepare_store(name, data_dir, settings=settings, raw_files=raw_files, split=split,
                       build=build, force=force, source=raw_path)


def prepare_store(name: str, data_dir: str, *, settings: dict, raw_files: list[dict],
                  split: SplitSettings, build, force: bool = False,
                  source: str | None = None) -> Prepared:
  """Reuses the store of `name` when its cache key matches, else builds and saves it.

  `build()` returns `(interactions, stats, extra_meta)`; it runs only when a rebuild is due.
  `source` names the origin of the data in error messages.
  """
  key = cache_key(settings, raw_files)
  directory = store_directory(name, data_dir)
  meta = store.read_meta(directory)
  if meta is not None and meta.get('cache_key') == key and not force:
    logging.info('%s: reusing the prepared store at %s', name, directory)
    return Prepared(directory, meta, reused=True)

  start = time.monotonic()
  interactions, stats, extra_meta = build()
  try:
    split_dataset = temporal_split(interactions, q_valid=split.q_valid, q_test=split.q_test,
                                   max_eval=split.max_eval)
  except ValueError as e:  # degenerate data, e.g. every interaction at the same time
    raise DataError(f'{source or name}: cannot split: {e}') from None
  stats['split'] = split_stats(split_dataset)
  meta = {
      'dataset': name, 'store_format': STORE_FORMAT_VERSION, 'cache_key': key,
      'settings': settings, 'raw_files': raw_files, 'stats': stats,
      'build_seconds': time.monotonic() - start, **extra_meta,
  }
  try:
    store.save_split(split_dataset, directory, meta)
  except OSError as e:  # read-only data_dir, disk full: the previous store, if any, is intact
    raise DataError(f'{directory}: cannot write the prepared store: {e.strerror or e}') from None
  logging.info('%s: prepared store written to %s in %.1f s', name, directory,
               meta['build_seconds'])
  return Prepared(directory, store.read_meta(directory), reused=False)


def load_prepared(name: str, data_dir: str, **kwargs) -> SplitDataset:
  """`prepare` (same arguments), then the store memory-mapped."""
  return store.load_split(prepare(name, data_dir, **kwargs).directory)
