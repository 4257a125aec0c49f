"""Preprocessing, the prepared-store cache, downloads and the command, on files written here."""

import hashlib
import io
import os
import subprocess
import sys
import urllib.error
import zipfile

import ml_collections
import numpy as np
import pytest

from pka_jax.data import download, load_dataset, prepare, registry, store
from pka_jax.data.errors import DataError, DataUnavailableError
from pka_jax.data.interactions import Interactions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ML1M_URL = 'https://files.grouplens.org/datasets/movielens/ml-1m.zip'


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
  monkeypatch.setenv(download.NO_DOWNLOAD_ENV, '1')


def _ml1m_text(num_users=40, per_user=25, seed=0):
  """`per_user` ratings for each user over 30 items, times spread so the split has 3 parts."""
  rng = np.random.default_rng(seed)
  lines = []
  for user in range(1, num_users + 1):
    for _ in range(per_user):
      item, rating = rng.integers(1, 31), rng.integers(1, 6)
      lines.append(f'{user}::{item}::{rating}::{rng.integers(978_000_000, 979_000_000)}')
  return '\n'.join(lines) + '\n'


def _write_ml1m(data_dir, text):
  directory = data_dir / 'ml1m'
  directory.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(directory / 'ml-1m.zip', 'w') as archive:
    archive.writestr('ml-1m/ratings.dat', text)


def _leftovers(data_dir):
  return [name for name in os.listdir(data_dir / 'ml1m') if name.startswith('.')]


# ---- preprocessing ----


def test_filter_min_counts_cascades():
  # z has one interaction -> dropped; then c has one -> dropped; a, b, x, y all keep two.
  x = Interactions.from_raw(['a', 'a', 'b', 'b', 'c', 'c'], ['x', 'y', 'x', 'y', 'x', 'z'],
                            [1, 2, 3, 4, 5, 6])
  kept = prepare.filter_min_counts(x, min_user=2, min_item=3)
  assert len(kept) == 0
  kept = prepare.filter_min_counts(x, min_user=2, min_item=2)
  np.testing.assert_array_equal(kept.user_ids, ['a', 'b'])
  np.testing.assert_array_equal(kept.item_ids, ['x', 'y'])
  np.testing.assert_array_equal(kept.user, [0, 0, 1, 1])
  np.testing.assert_array_equal(kept.item, [0, 1, 0, 1])
  np.testing.assert_array_equal(kept.timestamp, [1, 2, 3, 4])


def test_interaction_stats():
  x = Interactions.from_raw([1, 1, 1, 2, 3, 3], [5, 6, 7, 5, 5, 6], np.arange(6))
  assert prepare.interaction_stats(x) == {
      'users': 3, 'items': 3, 'interactions': 6,
      'mean_sequence_length': 2.0, 'median_sequence_length': 2.0}


# ---- the prepared store ----


def test_prepare_builds_then_reuses(tmp_path):
  _write_ml1m(tmp_path, _ml1m_text())
  built = prepare.prepare('ml1m', str(tmp_path))
  assert not built.reused
  stats = built.meta['stats']
  assert stats['preprocessed']['interactions'] == 1000
  assert stats['preprocessed']['users'] == 40
  assert stats['preprocessed']['mean_sequence_length'] == 25.0
  split = stats['split']
  assert split['train'] + split['valid'] + split['test'] + split['dropped_cold_items'] == 1000
  assert split['valid'] > 0 and split['test'] > 0
  assert built.meta['settings']['split'] == {'q_valid': 0.95, 'q_test': 0.97, 'max_eval': 50_000}
  assert built.meta['raw_files'][0]['name'] == 'ml-1m.zip'

  again = prepare.prepare('ml1m', str(tmp_path))
  assert again.reused and again.meta['cache_key'] == built.meta['cache_key']
  dataset = prepare.load_prepared('ml1m', str(tmp_path))
  assert dataset.train.items.sum() > 0 and len(dataset.test) == split['test']


def test_every_entry_names_a_reader_and_records_it_as_stores_made_before_did():
  # A prepared store keeps the reader's dotted name among its settings, and a store whose
  # settings differ is rebuilt: the names must stay those the functions themselves give.
  from pka_jax.data import readers  # pylint: disable=g-import-not-at-top
  for dataset in registry.DATASETS.values():
    reader = getattr(readers, dataset.reader)
    assert callable(reader), dataset.name
    assert dataset.settings()['reader'] == f'{reader.__module__}.{reader.__qualname__}'
  assert registry.get('ml1m').settings()['reader'] == 'pka_jax.data.readers.read_grouplens'


def test_prepare_rebuilds_when_raw_file_or_settings_change(tmp_path):
  _write_ml1m(tmp_path, _ml1m_text(seed=0))
  first = prepare.prepare('ml1m', str(tmp_path))
  _write_ml1m(tmp_path, _ml1m_text(seed=1))
  second = prepare.prepare('ml1m', str(tmp_path))
  assert not second.reused and second.meta['cache_key'] != first.meta['cache_key']
  third = prepare.prepare('ml1m', str(tmp_path), split=prepare.SplitSettings(q_valid=0.9))
  assert not third.reused
  fourth = prepare.prepare('ml1m', str(tmp_path), split=prepare.SplitSettings(q_valid=0.9),
                           overrides={'min_rating': 4})
  assert not fourth.reused
  assert fourth.meta['stats']['read']['interactions'] < 1000
  assert prepare.prepare('ml1m', str(tmp_path), split=prepare.SplitSettings(q_valid=0.9),
                         overrides={'min_rating': 4}).reused
  assert not prepare.prepare('ml1m', str(tmp_path), force=True).reused
  assert _leftovers(tmp_path) == []


def test_malformed_file_leaves_no_store(tmp_path):
  _write_ml1m(tmp_path, '1::10::5::978300760\n1::10::five::978300761\n')
  with pytest.raises(DataError, match='line 2: field 3'):
    prepare.prepare('ml1m', str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'ml1m')) == ['ml-1m.zip']


def test_failure_while_writing_leaves_previous_store(tmp_path, monkeypatch):
  _write_ml1m(tmp_path, _ml1m_text(seed=0))
  first = prepare.prepare('ml1m', str(tmp_path))
  _write_ml1m(tmp_path, _ml1m_text(seed=1))

  def fail(*args, **kwargs):
    raise OSError('disk full')

  monkeypatch.setattr(store.json, 'dump', fail)
  with pytest.raises(DataError, match=r'ml1m.*: cannot write the prepared store: disk full'):
    prepare.prepare('ml1m', str(tmp_path))
  assert _leftovers(tmp_path) == []
  assert store.read_meta(first.directory)['cache_key'] == first.meta['cache_key']


@pytest.mark.parametrize('renames_done', [1, 2])
def test_a_crash_between_the_store_renames_is_repaired(tmp_path, monkeypatch, renames_done):
  # Regression: a crash after moving the old store aside left it as a hidden '.old'
  # directory, never restored nor removed.
  _write_ml1m(tmp_path, _ml1m_text(seed=0))
  first = prepare.prepare('ml1m', str(tmp_path))
  _write_ml1m(tmp_path, _ml1m_text(seed=1))
  real_rename, calls = os.rename, []

  def crash_after(src, dst):
    calls.append(src)
    real_rename(src, dst)
    if len(calls) == renames_done:
      raise KeyboardInterrupt  # the process dies here

  monkeypatch.setattr(store.os, 'rename', crash_after)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare('ml1m', str(tmp_path))
  monkeypatch.undo()
  assert _leftovers(tmp_path)  # the store set aside, and the new one in place or not
  meta = store.read_meta(first.directory)  # any reader repairs it
  assert _leftovers(tmp_path) == []
  if renames_done == 1:  # only the old store had moved: it is back
    assert meta['cache_key'] == first.meta['cache_key']
  else:  # the new store was in place: the old one is gone
    assert meta['cache_key'] != first.meta['cache_key']
  assert len(store.load_split(first.directory).item_ids) > 0


def test_every_interaction_filtered_out(tmp_path):
  _write_ml1m(tmp_path, _ml1m_text())
  with pytest.raises(DataError, match='no interactions left'):
    prepare.prepare('ml1m', str(tmp_path), overrides={'min_user_interactions': 1000})
  assert not os.path.exists(prepare.store_directory('ml1m', str(tmp_path)))


def test_fingerprint_large_file_uses_edges(tmp_path, monkeypatch):
  monkeypatch.setattr(prepare, '_FULL_HASH_LIMIT', 10)
  monkeypatch.setattr(prepare, '_EDGE_BYTES', 4)
  path = tmp_path / 'f'
  path.write_bytes(b'0123456789abcdef')
  fingerprint = prepare.fingerprint_file(str(path))
  assert fingerprint['size'] == 16
  assert fingerprint['sha256_first_last_mib'] == hashlib.sha256(b'0123cdef').hexdigest()


# ---- missing data and downloads ----


def _config(data_dir, dataset='ml1m'):
  return ml_collections.ConfigDict({'dataset': dataset, 'data_dir': str(data_dir),
                                    'q_valid': 0.95, 'q_test': 0.97, 'max_eval': 50_000})


def test_load_dataset_without_data_says_where_to_put_it(tmp_path):
  with pytest.raises(DataUnavailableError) as error:
    load_dataset(_config(tmp_path))
  message = str(error.value)
  assert ML1M_URL in message
  assert os.path.join(str(tmp_path), 'ml1m', 'ml-1m.zip') in message


def test_load_dataset_reads_a_prepared_dataset(tmp_path):
  _write_ml1m(tmp_path, _ml1m_text())
  dataset = load_dataset(_config(tmp_path))
  assert dataset.num_users == 40 and len(dataset.train) == 40


def test_unknown_dataset(tmp_path):
  with pytest.raises(DataError, match="Unknown dataset 'netflix'.*ml1m"):
    load_dataset(_config(tmp_path, 'netflix'))


def test_yelp_has_no_url_and_names_both_file_names(tmp_path):
  with pytest.raises(DataUnavailableError) as error:
    download.ensure_raw_file(registry.get('yelp'), str(tmp_path / 'yelp'), allow_download=True)
  message = str(error.value)
  assert 'https://www.yelp.com/dataset' in message
  assert os.path.join(str(tmp_path), 'yelp', 'yelp_academic_dataset_review.json') in message
  assert os.path.join(str(tmp_path), 'yelp', 'review.json') in message


class _Response(io.BytesIO):

  def __init__(self, payload):
    super().__init__(payload)
    self.headers = {'Content-Length': str(len(payload))}


def test_fetch_checks_the_checksum_and_renames_atomically(tmp_path):
  payload = b'x' * 3_000_000
  good = hashlib.sha256(payload).hexdigest()
  destination = tmp_path / 'sub' / 'file.zip'
  download.fetch('http://example/file.zip', str(destination), sha256=good,
                 opener=lambda url, timeout: _Response(payload))
  assert destination.read_bytes() == payload
  assert os.listdir(tmp_path / 'sub') == ['file.zip']
  other = tmp_path / 'other' / 'file.zip'
  with pytest.raises(DataError, match='checksum mismatch'):
    download.fetch('http://example/file.zip', str(other), sha256='0' * 64,
                   opener=lambda url, timeout: _Response(payload))
  assert not os.path.exists(tmp_path / 'other')


def test_unreachable_network_names_url_and_path(tmp_path):
  calls = []

  def unreachable(url, timeout):
    calls.append(url)
    raise urllib.error.URLError('Name or service not known')

  with pytest.raises(DataUnavailableError) as error:
    download.ensure_raw_file(registry.get('ml1m'), str(tmp_path / 'ml1m'),
                             allow_download=True, opener=unreachable)
  assert calls == [ML1M_URL]
  assert 'automatic download failed' in str(error.value)
  assert os.path.join(str(tmp_path), 'ml1m', 'ml-1m.zip') in str(error.value)
  assert not os.path.exists(tmp_path / 'ml1m')


def test_download_disabled_never_opens_the_network(tmp_path):
  def forbidden(url, timeout):
    raise AssertionError('network access attempted')

  with pytest.raises(DataUnavailableError, match='downloads are disabled'):
    prepare.prepare('ml1m', str(tmp_path), opener=forbidden)


def test_download_then_prepare(tmp_path):
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as archive:
    archive.writestr('ml-1m/ratings.dat', _ml1m_text())
  prepared = prepare.prepare('ml1m', str(tmp_path), allow_download=True,
                             opener=lambda url, timeout: _Response(buffer.getvalue()))
  assert prepared.meta['stats']['preprocessed']['interactions'] == 1000


# ---- the command ----


def _run_cli(*args, env_extra=None):
  env = {**os.environ, download.NO_DOWNLOAD_ENV: '1', **(env_extra or {})}
  return subprocess.run([sys.executable, '-m', 'pka_jax.data', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120, check=False)


def test_cli_without_data_exits_with_instructions(tmp_path):
  result = _run_cli('--dataset=ml1m', f'--data_dir={tmp_path}')
  assert result.returncode != 0
  assert ML1M_URL in result.stderr
  assert os.path.join(str(tmp_path), 'ml1m', 'ml-1m.zip') in result.stderr
  assert 'Traceback' not in result.stderr + result.stdout


def test_cli_prints_statistics(tmp_path):
  _write_ml1m(tmp_path, _ml1m_text())
  result = _run_cli('--dataset=ml1m', f'--data_dir={tmp_path}', '--q_valid=0.9')
  assert result.returncode == 0, result.stderr
  table = dict(line.split('  ', 1) for line in result.stdout.splitlines())
  table = {k.strip(): v.strip() for k, v in table.items()}
  assert table['users'] == '40' and table['interactions'] == '1,000'
  assert table['mean sequence length'] == '25.0' and table['median sequence length'] == '25'
  for key in ('train interactions', 'validation interactions', 'test interactions'):
    assert key in table
