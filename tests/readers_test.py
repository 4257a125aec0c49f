"""Readers on small files in every raw format, written here; expected results worked by hand."""

import gzip
import json
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pka_jax.data import readers
from pka_jax.data.errors import DataError

# 2016-03-09 00:44:42 UTC = 16869 days * 86400 + 2682 s.
T_2016_03_09_004442 = 1457484282
T_2016_03_09 = 1457481600  # 2016-03-09 00:00:00 UTC
T_2010_10_19_235527 = 1287532527  # 2010-10-19T23:55:27Z


def _zip(path, member, text):
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr(member, text)
  return str(path)


def _gz(path, text):
  with gzip.open(path, 'wt') as f:
    f.write(text)
  return str(path)


def _jsonl(records):
  return ''.join(json.dumps(r) + '\n' for r in records)


def _assert_interactions(x, user_ids, item_ids, user, item, timestamp):
  np.testing.assert_array_equal(x.user_ids, user_ids)
  np.testing.assert_array_equal(x.item_ids, item_ids)
  np.testing.assert_array_equal(x.user, user)
  np.testing.assert_array_equal(x.item, item)
  np.testing.assert_array_equal(x.timestamp, timestamp)
  assert x.user.dtype == x.item.dtype == x.timestamp.dtype == np.int64


# ---- GroupLens ----

ML1M_MEMBER = 'ml-1m/ratings.dat'
# Timestamps deliberately not monotonic within user 1.
ML1M_TEXT = '1::20::5::978300760\n2::10::3::978300700\n1::10::4::978300650\n'


def test_grouplens_dat_parses_non_monotonic_times(tmp_path):
  path = _zip(tmp_path / 'ml-1m.zip', ML1M_MEMBER, ML1M_TEXT)
  x = readers.read_grouplens(path, member=ML1M_MEMBER, layout='dat')
  _assert_interactions(x, user_ids=[1, 2], item_ids=[10, 20], user=[0, 1, 0], item=[1, 0, 0],
                       timestamp=[978300760, 978300700, 978300650])


def test_grouplens_rating_threshold_and_windows_line_ends(tmp_path):
  path = _zip(tmp_path / 'ml-1m.zip', ML1M_MEMBER, ML1M_TEXT.replace('\n', '\r\n'))
  x = readers.read_grouplens(path, member=ML1M_MEMBER, layout='dat', min_rating=4)
  _assert_interactions(x, user_ids=[1], item_ids=[10, 20], user=[0, 0], item=[1, 0],
                       timestamp=[978300760, 978300650])


@pytest.mark.parametrize('bad_line, line, problem', [
    ('3::30::4', 3, 'expected 4 fields'),
    ('x3::30::4::978300000', 3, 'field 1: expected an integer'),
    ('3::30:4::978300000::1', 3, "field 2: expected an integer, got '30:4'"),
    ('3:30::4::978300000', 3, 'expected 4 fields'),
    ('3::::4::978300000', 3, 'field 2: expected an integer'),
    ('3::30::4::12.5', 3, 'field 4: expected an integer'),
    ('3::30::five::978300000', 3, 'field 3: expected a number'),
])
def test_grouplens_dat_malformed_line_is_located(tmp_path, bad_line, line, problem):
  text = '1::10::5::978300760\n2::10::3::978300700\n' + bad_line + '\n4::10::1::978300000\n'
  path = _zip(tmp_path / 'ml-1m.zip', ML1M_MEMBER, text)
  with pytest.raises(DataError) as error:
    readers.read_grouplens(path, member=ML1M_MEMBER, layout='dat')
  message = str(error.value)
  assert path in message and ML1M_MEMBER in message
  assert f'line {line}:' in message and problem in message


def test_grouplens_line_numbers_count_blank_lines(tmp_path):
  path = _zip(tmp_path / 'ml-1m.zip', ML1M_MEMBER, '1::10::5::1\n\n\n2::x::3::2\n')
  with pytest.raises(DataError, match='line 4: field 2'):
    readers.read_grouplens(path, member=ML1M_MEMBER, layout='dat')


def test_grouplens_empty_member(tmp_path):
  path = _zip(tmp_path / 'ml-1m.zip', ML1M_MEMBER, '\n')
  with pytest.raises(DataError, match='empty file'):
    readers.read_grouplens(path, member=ML1M_MEMBER, layout='dat')


def test_grouplens_missing_member_and_not_a_zip(tmp_path):
  path = _zip(tmp_path / 'ml-1m.zip', 'ml-1m/movies.dat', '1::Toy Story::Comedy\n')
  with pytest.raises(DataError, match='no member ml-1m/ratings.dat'):
    readers.read_grouplens(path, member=ML1M_MEMBER, layout='dat')
  not_zip = tmp_path / 'plain.zip'
  not_zip.write_text(ML1M_TEXT)
  with pytest.raises(DataError, match='not a zip archive'):
    readers.read_grouplens(str(not_zip), member=ML1M_MEMBER, layout='dat')


def test_grouplens_u_data_tab_separated(tmp_path):
  member = 'ml-100k/u.data'
  path = _zip(tmp_path / 'ml-100k.zip', member, '196\t242\t3\t881250949\n186\t302\t3\t891717742\n')
  x = readers.read_grouplens(path, member=member, layout='tsv')
  _assert_interactions(x, user_ids=[186, 196], item_ids=[242, 302], user=[1, 0], item=[0, 1],
                       timestamp=[881250949, 891717742])
  bad = _zip(tmp_path / 'bad.zip', member, '196\t242\t3\t881250949\n186 302 3 891717742\n')
  with pytest.raises(DataError, match=r'line 2: expected 4 fields'):
    readers.read_grouplens(bad, member=member, layout='tsv')


def test_grouplens_ratings_csv_with_header(tmp_path):
  member = 'ml-20m/ratings.csv'
  text = 'userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n1,29,3.5,1112484676\n'
  path = _zip(tmp_path / 'ml-20m.zip', member, text)
  x = readers.read_grouplens(path, member=member, layout='csv', min_rating=3.5)
  _assert_interactions(x, user_ids=[1], item_ids=[2, 29], user=[0, 0], item=[0, 1],
                       timestamp=[1112486027, 1112484676])
  no_header = _zip(tmp_path / 'bad.zip', member, '1,2,3.5,1112486027\n')
  with pytest.raises(DataError, match="line 1: expected the header 'userId,movieId"):
    readers.read_grouplens(no_header, member=member, layout='csv')
  bad_row = _zip(tmp_path / 'bad2.zip', member, text + '2,3,4.0\n')
  with pytest.raises(DataError, match='line 4: expected 4 fields'):
    readers.read_grouplens(bad_row, member=member, layout='csv')


# ---- Amazon ----


def test_amazon_ratings_csv(tmp_path):
  path = tmp_path / 'ratings_Beauty.csv'
  path.write_text('A39HTATAQ9V7YF,0205616461,5.0,1369699200\n'
                  'A3JM6GV9MNOF9X,0558925278,3.0,1355443200\n'
                  'A39HTATAQ9V7YF,0558925278,4.0,1355270400\n')
  x = readers.read_amazon_ratings(str(path), min_rating=4)
  _assert_interactions(x, user_ids=['A39HTATAQ9V7YF'], item_ids=['0205616461', '0558925278'],
                       user=[0, 0], item=[0, 1], timestamp=[1369699200, 1355270400])
  path.write_text('A39HTATAQ9V7YF,0205616461,5.0,1369699200\nA3J,0558925278,3.0,yesterday\n')
  with pytest.raises(DataError, match="line 2: field 4: expected an integer, got 'yesterday'"):
    readers.read_amazon_ratings(str(path))


AMAZON_REVIEWS = [
    {'reviewerID': 'U2', 'asin': 'B1', 'overall': 5.0, 'unixReviewTime': 1400000000,
     'reviewText': 'lovely\nreally'},
    {'reviewerID': 'U1', 'asin': 'B2', 'overall': 2.0, 'unixReviewTime': 1300000000},
    {'reviewerID': 'U1', 'asin': 'B1', 'overall': 4.0, 'unixReviewTime': 1200000000},
]


def test_amazon_reviews_json_gz(tmp_path):
  path = _gz(tmp_path / 'reviews_Beauty_5.json.gz', _jsonl(AMAZON_REVIEWS))
  x = readers.read_amazon_reviews(path)
  _assert_interactions(x, user_ids=['U1', 'U2'], item_ids=['B1', 'B2'], user=[1, 0, 0],
                       item=[0, 1, 0], timestamp=[1400000000, 1300000000, 1200000000])
  kept = readers.read_amazon_reviews(path, min_rating=4)
  np.testing.assert_array_equal(kept.timestamp, [1400000000, 1200000000])


@pytest.mark.parametrize('line, problem', [
    ('{"reviewerID": "U3", "unixReviewTime": 1}', "missing field 'asin'"),
    ('{"reviewerID": "U3", "asin": "B3", "unixReviewTime": "soon"}',
     "field 'unixReviewTime': expected an integer"),
    ('{"reviewerID": "U3", "asin": "B3", "unixReviewTime": 1', 'malformed JSON'),
    ('[1, 2, 3]', 'expected a JSON object'),
])
def test_amazon_reviews_malformed_line_is_located(tmp_path, line, problem):
  path = _gz(tmp_path / 'r.json.gz', _jsonl(AMAZON_REVIEWS[:2]) + line + '\n')
  with pytest.raises(DataError) as error:
    readers.read_amazon_reviews(path)
  assert path in str(error.value)
  assert 'line 3:' in str(error.value) and problem in str(error.value)


def test_amazon_reviews_corrupt_gz(tmp_path):
  path = tmp_path / 'r.json.gz'
  path.write_bytes(gzip.compress(_jsonl(AMAZON_REVIEWS * 50).encode())[:-40])
  with pytest.raises(DataError, match='cannot decompress'):
    readers.read_amazon_reviews(str(path))


def test_amazon_reviews_empty_gz(tmp_path):
  with pytest.raises(DataError, match='empty file'):
    readers.read_amazon_reviews(_gz(tmp_path / 'r.json.gz', ''))


# ---- Yelp ----

YELP_REVIEWS = [
    {'review_id': 'r1', 'user_id': 'uB', 'business_id': 'b1', 'stars': 5,
     'date': '2016-03-09 00:44:42', 'text': 'great'},
    {'review_id': 'r2', 'user_id': 'uA', 'business_id': 'b2', 'stars': 2.0,
     'date': '2016-03-09'},
]


def test_yelp_reviews_iso_dates(tmp_path):
  path = tmp_path / 'review.json'
  path.write_text(_jsonl(YELP_REVIEWS))
  x = readers.read_yelp_reviews(str(path))
  _assert_interactions(x, user_ids=['uA', 'uB'], item_ids=['b1', 'b2'], user=[1, 0],
                       item=[0, 1], timestamp=[T_2016_03_09_004442, T_2016_03_09])
  kept = readers.read_yelp_reviews(str(path), min_rating=4)
  np.testing.assert_array_equal(kept.user_ids, ['uB'])


@pytest.mark.parametrize('date,seconds_after', [
    ('2016-03-09T00:44:42Z', 0),  # a UTC designator
    ('2016-03-09T00:44:42.913Z', 0),  # fractional seconds are dropped
    ('2016-03-09 00:44:42.5', 0),
    ('2016-03-09T02:44:42+02:00', 0),  # 02:44:42 at UTC+2 is 00:44:42 UTC
    ('2016-03-08T23:14:42-0130', 0),
    ('2016-03-09T00:44:43', 1),
])
def test_yelp_dates_in_every_iso_8601_form(tmp_path, date, seconds_after):
  # Regression: these forms used to fail with an error that named no line.
  path = tmp_path / 'review.json'
  path.write_text(_jsonl([{**YELP_REVIEWS[0], 'date': date}]))
  x = readers.read_yelp_reviews(str(path))
  np.testing.assert_array_equal(x.timestamp, [T_2016_03_09_004442 + seconds_after])


@pytest.mark.parametrize('date', ['2016-13-45 00:00:00', 'last tuesday', '', '2016-03-09T25:00:00Z',
                                  '2016-03-09T00:44:42+2'])
def test_yelp_bad_date_is_located(tmp_path, date):
  path = tmp_path / 'review.json'
  bad = {'user_id': 'uC', 'business_id': 'b3', 'stars': 1, 'date': date}
  path.write_text(_jsonl(YELP_REVIEWS + [bad]))
  with pytest.raises(DataError, match='line 3: .*ISO 8601'):
    readers.read_yelp_reviews(str(path))


def test_yelp_missing_field_and_empty_file(tmp_path):
  path = tmp_path / 'review.json'
  path.write_text(_jsonl([YELP_REVIEWS[0], {'user_id': 'uC', 'date': '2016-03-09'}]))
  with pytest.raises(DataError, match="line 2: missing field 'business_id'"):
    readers.read_yelp_reviews(str(path))
  path.write_text('')
  with pytest.raises(DataError, match='empty file'):
    readers.read_yelp_reviews(str(path))


# ---- SNAP Gowalla ----

GOWALLA_TEXT = ('0\t2010-10-19T23:55:27Z\t30.2359091167\t-97.7951395833\t22847\n'
                '0\t2010-10-18T22:17:43Z\t30.2691029532\t-97.7493953705\t420315\n'
                '7\t2010-10-19T23:55:27Z\t30.26\t-97.75\t22847\n')


def test_gowalla_checkins(tmp_path):
  path = _gz(tmp_path / 'loc-gowalla_totalCheckins.txt.gz', GOWALLA_TEXT)
  x = readers.read_snap_checkins(path)
  _assert_interactions(x, user_ids=[0, 7], item_ids=[22847, 420315], user=[0, 0, 1],
                       item=[0, 1, 0],
                       timestamp=[T_2010_10_19_235527, T_2010_10_19_235527 - 92264,
                                  T_2010_10_19_235527])


@pytest.mark.parametrize('bad_line, problem', [
    ('3\t2010-10-19 23:55:27\t1.0\t2.0\t5', 'field 2: expected an ISO 8601 time with a zone'),
    ('3\tyesterday\t1.0\t2.0\t5', 'field 2: expected an ISO 8601 date or time'),
    ('3\t2010-10-19T23:55:27Z\t1.0\t2.0', 'expected 5 fields'),
    ('3\t2010-10-19T23:55:27Z\t1.0\t2.0\tloc5', 'field 5: expected an integer'),
])
def test_gowalla_malformed_line_is_located(tmp_path, bad_line, problem):
  path = _gz(tmp_path / 'g.txt.gz', GOWALLA_TEXT + bad_line + '\n')
  with pytest.raises(DataError) as error:
    readers.read_snap_checkins(path)
  assert 'line 4:' in str(error.value) and problem in str(error.value)


def test_gowalla_corrupt_gzip(tmp_path):
  path = tmp_path / 'g.txt.gz'
  path.write_bytes(gzip.compress(GOWALLA_TEXT.encode())[:-12])
  with pytest.raises(DataError, match='cannot decompress'):
    readers.read_snap_checkins(str(path))


# ---- parquet: Zvuk and Yambda ----


def _zvuk_table(**overrides):
  columns = {
      'user_id': pa.array([5, 3, 5, 3], pa.int64()),
      'session_id': pa.array([1, 2, 1, 2], pa.int64()),
      'datetime': pa.array(np.array(['2023-01-02T00:00:10', '2023-01-01T00:00:00',
                                     '2023-01-02T00:00:00', '2023-01-01T00:01:00'],
                                    dtype='datetime64[ns]')),
      'track_id': pa.array([100, 100, 200, 300], pa.int64()),
      'play_duration': pa.array([30, 5, 200, 31], pa.int64()),
  }
  columns.update(overrides)
  return pa.table({k: v for k, v in columns.items() if v is not None})


def test_zvuk_parquet(tmp_path):
  path = str(tmp_path / 'zvuk-interactions.parquet')
  pq.write_table(_zvuk_table(), path, row_group_size=3)
  day = 1672531200  # 2023-01-01T00:00:00Z
  x = readers.read_zvuk(path)
  _assert_interactions(x, user_ids=[3, 5], item_ids=[100, 200, 300], user=[1, 0, 1, 0],
                       item=[0, 0, 1, 2],
                       timestamp=[day + 86410, day, day + 86400, day + 60])
  kept = readers.read_zvuk(path, min_play_duration=30)
  np.testing.assert_array_equal(kept.timestamp, [day + 86410, day + 86400, day + 60])


def test_zvuk_missing_column_null_and_empty(tmp_path):
  path = str(tmp_path / 'z.parquet')
  pq.write_table(_zvuk_table(track_id=None), path)
  with pytest.raises(DataError, match="missing column 'track_id'"):
    readers.read_zvuk(path)
  pq.write_table(_zvuk_table(user_id=pa.array([5, 3, None, 3], pa.int64())), path)
  with pytest.raises(DataError, match="column 'user_id', row 3: null value"):
    readers.read_zvuk(path)
  pq.write_table(_zvuk_table().slice(0, 0), path)
  with pytest.raises(DataError, match='no rows'):
    readers.read_zvuk(path)
  open(path, 'wb').close()
  with pytest.raises(DataError, match='empty file'):
    readers.read_zvuk(path)


def _yambda_listens():
  return pa.table({
      'uid': pa.array([100, 100, 200], pa.uint32()),
      'timestamp': pa.array([50, 10, 30], pa.uint32()),
      'item_id': pa.array([7, 8, 7], pa.uint32()),
      'is_organic': pa.array([1, 0, 0], pa.uint8()),
      'played_ratio_pct': pa.array([100, 20, 60], pa.uint16()),
      'track_length_seconds': pa.array([180, 200, 180], pa.uint32()),
  })


def test_yambda_listens_and_filters(tmp_path):
  path = str(tmp_path / 'listens.parquet')
  pq.write_table(_yambda_listens(), path)
  x = readers.read_yambda(path)
  _assert_interactions(x, user_ids=[100, 200], item_ids=[7, 8], user=[0, 0, 1], item=[0, 1, 0],
                       timestamp=[50, 10, 30])
  organic = readers.read_yambda(path, organic_only=True)
  np.testing.assert_array_equal(organic.timestamp, [50])
  listened = readers.read_yambda(path, min_played_ratio_pct=50)
  np.testing.assert_array_equal(listened.timestamp, [50, 30])


def test_yambda_wrong_column_type(tmp_path):
  path = str(tmp_path / 'likes.parquet')
  table = _yambda_listens().set_column(1, 'timestamp', pa.array(['a', 'b', 'c']))
  pq.write_table(table, path)
  with pytest.raises(DataError, match="column 'timestamp' has type string; expected integer"):
    readers.read_yambda(path)
  with open(path, 'wb') as f:
    f.write(b'not parquet at all')
  with pytest.raises(DataError, match='not a readable parquet file'):
    readers.read_yambda(path)


def test_every_row_filtered_out(tmp_path):
  path = str(tmp_path / 'listens.parquet')
  pq.write_table(_yambda_listens(), path)
  with pytest.raises(DataError, match='no interactions left'):
    readers.read_yambda(path, min_played_ratio_pct=101)
