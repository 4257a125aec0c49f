"""Readers for the raw formats of the paper's datasets; each returns `Interactions`.

Text formats take a fast columnar path (pyarrow's multithreaded CSV and JSON readers, keeping
only the needed columns). When that path rejects the input, a slow line-by-line re-scan finds
the first offending line, so every `DataError` names the file, the 1-based line and the
problem. Parquet files are read column by column, batch by batch, with the interaction filters
applied in arrow. Identifiers are encoded by hashing against their sorted unique values, which
is linear in the rows and gives the same codes as a sort-based factorization.
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import io
import json
import os
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pka_jax.data.errors import DataError
from pka_jax.data.interactions import Interactions

# Field kinds: how each field is parsed and checked. DATE (JSON only) is an ISO date string.
INT, FLOAT, STR, ISO_UTC, DATE, SKIP = 'int', 'float', 'str', 'iso_utc', 'date', 'skip'
_ARROW_TYPES = {
    INT: pa.int64(), FLOAT: pa.float64(), STR: pa.string(),
    ISO_UTC: pa.timestamp('s', tz='UTC'), SKIP: pa.string(),
}
_EXPECTED = {
    INT: 'an integer', FLOAT: 'a number', STR: 'a non-empty string',
    ISO_UTC: 'an ISO 8601 time with a zone (e.g. 2010-10-19T23:55:27Z)',
    DATE: 'an ISO 8601 date string',
}
_INT_RE = re.compile(r'[+-]?\d+')
_BLOCK_SIZE = 16 << 20  # bytes per parallel parse block; larger than any single record
_PARQUET_BATCH = 1 << 20  # rows per parquet batch


# ---- sources: a plain, gzip or zip-member file named the same way in every message ----


def _describe(path: str, member: str | None) -> str:
  return f'{path} (member {member})' if member else path


@contextlib.contextmanager
def _open_binary(path: str, member: str | None = None) -> Iterator[IO[bytes]]:
  """Opens `path` (or `member` inside the zip at `path`), decompressing `.gz` transparently."""
  if member is None:
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
      yield f
    return
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise DataError(f'{path}: not a zip archive ({e}); expected one holding {member}') from e
  with archive:
    if member not in archive.namelist():
      raise DataError(
          f'{path}: no member {member} in the archive; expected the original archive, '
          f'which holds {member} (found: {", ".join(archive.namelist()[:10]) or "nothing"})')
    with archive.open(member) as f:
      yield f


def _read_all(path: str, member: str | None) -> bytes:
  with _open_binary(path, member) as f:
    try:
      return f.read()
    except (OSError, EOFError, zipfile.BadZipFile) as e:  # gzip.BadGzipFile is an OSError
      raise DataError(f'{_describe(path, member)}: cannot decompress ({e})') from e


def _numbered_lines(path: str, member: str | None) -> Iterator[tuple[int, str]]:
  """Yields `(1-based line number, text without the line break)` for non-blank lines."""
  with _open_binary(path, member) as f:
    try:
      for number, raw in enumerate(f, start=1):
        line = raw.decode('utf-8', errors='replace').rstrip('\r\n')
        if line.strip():
          yield number, line
    except (OSError, EOFError, zipfile.BadZipFile) as e:
      raise DataError(f'{_describe(path, member)}: cannot decompress ({e})') from None


def _locate_bad_line(path: str, member: str | None, check: Callable[[str], None],
                     skip_lines: int = 0) -> None:
  """Raises a `DataError` at the first line `check` rejects; returns if none does."""
  for number, line in _numbered_lines(path, member):
    if number <= skip_lines:
      continue
    try:
      check(line)
    except ValueError as e:
      shown = line if len(line) <= 120 else line[:117] + '...'
      raise DataError(f'{_describe(path, member)}: line {number}: {e} in {shown!r}') from None


def _fast_path_failed(path: str, member: str | None, check: Callable[[str], None],
                      reason: str, skip_lines: int = 0) -> DataError:
  _locate_bad_line(path, member, check, skip_lines)
  return DataError(f'{_describe(path, member)}: could not be parsed: {reason}')


# ---- field checks of the slow path ----


def _check_field(kind: str, text: str) -> None:
  if kind == INT and not _INT_RE.fullmatch(text):
    raise ValueError(f'expected {_EXPECTED[INT]}, got {text!r}')
  if kind == FLOAT:
    try:
      float(text)
    except ValueError:
      raise ValueError(f'expected {_EXPECTED[FLOAT]}, got {text!r}') from None
  if kind == STR and not text:
    raise ValueError(f'expected {_EXPECTED[STR]}, got an empty field')
  if kind == ISO_UTC:
    _check_iso(text, need_zone=True)


def _check_iso(text: str, need_zone: bool = False) -> None:
  try:
    value = datetime.datetime.fromisoformat(text)
  except ValueError:
    raise ValueError(f'expected an ISO 8601 date or time, got {text!r}') from None
  if need_zone and value.tzinfo is None:
    raise ValueError(f'expected {_EXPECTED[ISO_UTC]}, got {text!r}')


def _check_date(text: str) -> None:
  """A DATE field: `_ISO_DATE_PATTERN`, and a real calendar date and time."""
  match = re.fullmatch(_ISO_DATE_PATTERN, text)
  try:
    if match is None:
      raise ValueError
    datetime.datetime.strptime(f'{match["date"]} {match["time"] or "00:00:00"}',
                               '%Y-%m-%d %H:%M:%S')
  except ValueError:
    raise ValueError(f'expected {_EXPECTED[DATE]} (YYYY-MM-DD[ hh:mm:ss[.fff]][Z|±hh:mm]), '
                     f'got {text!r}') from None


def _delimited_checker(sep: str, kinds: Sequence[str]) -> Callable[[str], None]:
  def check(line: str) -> None:
    fields = line.split(sep)
    if len(fields) != len(kinds):
      raise ValueError(f'expected {len(kinds)} fields separated by {sep!r}, got {len(fields)}')
    for position, (kind, text) in enumerate(zip(kinds, fields, strict=True), start=1):
      try:
        _check_field(kind, text)
      except ValueError as e:
        raise ValueError(f'field {position}: {e}') from None
  return check


# ---- encoding into dense codes ----


def _encode(values: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
  """Dense int64 codes into the sorted unique values, and those values as numpy."""
  uniques = pc.unique(values)
  uniques = uniques.take(pc.array_sort_indices(uniques))
  codes = pc.index_in(values, value_set=uniques)
  codes = codes.combine_chunks() if isinstance(codes, pa.ChunkedArray) else codes
  return (codes.to_numpy(zero_copy_only=False).astype(np.int64, copy=False),
          uniques.to_numpy(zero_copy_only=False))


def _seconds(values: pa.ChunkedArray) -> np.ndarray:
  """Times (arrow timestamps or integers) as int64 seconds."""
  if pa.types.is_timestamp(values.type):
    values = pc.cast(values, pa.timestamp('s', tz=values.type.tz), safe=False)
  values = values.cast(pa.int64())
  return values.combine_chunks().to_numpy(zero_copy_only=False)


def _to_interactions(source: str, table: pa.Table, user: str, item: str,
                     time: str) -> Interactions:
  if table.num_rows == 0:
    raise DataError(f'{source}: no interactions left to read (empty file, or every row '
                    'filtered out); expected at least one')
  user_codes, user_ids = _encode(table[user])
  item_codes, item_ids = _encode(table[item])
  return Interactions(user=user_codes, item=item_codes, timestamp=_seconds(table[time]),
                      user_ids=user_ids, item_ids=item_ids)


def _keep_rated(table: pa.Table, rating: str, min_rating: float | None) -> pa.Table:
  if min_rating is None:
    return table
  return table.filter(pc.greater_equal(table[rating], min_rating))


def _require_nonempty(data: bytes, source: str, expected: str) -> None:
  if not data.strip():
    raise DataError(f'{source}: empty file; expected {expected}')


# ---- delimited text: GroupLens .dat / u.data / ratings.csv, Amazon CSV, SNAP check-ins ----


def _read_delimited(path: str, *, member: str | None, sep: str, columns: Mapping[str, str],
                    header: Sequence[str] | None = None) -> pa.Table:
  """Reads a separated text file whose columns are `columns` (name -> kind), in order."""
  source = _describe(path, member)
  data = _read_all(path, member)
  names, kinds = list(columns), list(columns.values())
  _require_nonempty(data, source, f'lines of {len(names)} fields ({", ".join(names)})')
  skip = 0
  if header is not None:
    skip = 1
    first = data.split(b'\n', 1)[0].decode('utf-8', errors='replace').strip()
    if first.split(sep) != list(header):
      raise DataError(f'{source}: line 1: expected the header {sep.join(header)!r}, '
                      f'got {first!r}')

  # '::' is read as ':' with an empty column between fields; typing those columns as null
  # makes the parse reject any stray single ':' instead of silently shifting fields.
  doubled = len(sep) == 2 and sep[0] == sep[1]
  arrow_names, types = [], {}
  for position, (name, kind) in enumerate(columns.items()):
    if doubled and position:
      gap = f'_gap{position}'
      arrow_names.append(gap)
      types[gap] = pa.null()
    arrow_names.append(name)
    types[name] = _ARROW_TYPES[kind]
  wanted = [name for name, kind in columns.items() if kind != SKIP]
  parsed = [name for name in arrow_names if columns.get(name) != SKIP]  # gaps included
  check = _delimited_checker(sep, kinds)
  try:
    table = pa_csv.read_csv(
        io.BytesIO(data),
        read_options=pa_csv.ReadOptions(column_names=arrow_names, skip_rows=skip,
                                        block_size=_BLOCK_SIZE),
        parse_options=pa_csv.ParseOptions(delimiter=sep[0], quote_char=False),
        convert_options=pa_csv.ConvertOptions(column_types=types, include_columns=parsed,
                                              null_values=[''], strings_can_be_null=True))
  except pa.ArrowInvalid as e:
    raise _fast_path_failed(path, member, check, str(e), skip) from None
  if any(table[name].null_count for name in wanted):
    raise _fast_path_failed(path, member, check, 'empty fields', skip)
  return table.select(wanted)


def read_grouplens(path: str, *, member: str, layout: str,
                   min_rating: float | None = None) -> Interactions:
  """MovieLens ratings from inside the GroupLens zip at `path`.

  `layout` is `dat` (`UserID::MovieID::Rating::Timestamp`, ML-1M/10M), `tsv` (`u.data`,
  ML-100K, tab-separated) or `csv` (`ratings.csv` with a header, ML-20M/25M/32M).
  """
  columns = {'user': INT, 'item': INT, 'rating': FLOAT, 'timestamp': INT}
  if layout == 'dat':
    table = _read_delimited(path, member=member, sep='::', columns=columns)
  elif layout == 'tsv':
    table = _read_delimited(path, member=member, sep='\t', columns=columns)
  elif layout == 'csv':
    header = ('userId', 'movieId', 'rating', 'timestamp')
    table = _read_delimited(path, member=member, sep=',', columns=columns, header=header)
  else:
    raise ValueError(f'read_grouplens: unknown layout {layout!r} (dat, tsv or csv)')
  table = _keep_rated(table, 'rating', min_rating)
  return _to_interactions(_describe(path, member), table, 'user', 'item', 'timestamp')


def read_amazon_ratings(path: str, *, min_rating: float | None = None) -> Interactions:
  """Amazon 2014 ratings-only CSV: `user,item,rating,timestamp` without a header."""
  columns = {'user': STR, 'item': STR, 'rating': FLOAT, 'timestamp': INT}
  table = _read_delimited(path, member=None, sep=',', columns=columns)
  table = _keep_rated(table, 'rating', min_rating)
  return _to_interactions(path, table, 'user', 'item', 'timestamp')


def read_snap_checkins(path: str) -> Interactions:
  """SNAP location check-ins (Gowalla, Brightkite): `user, ISO time, lat, lon, location`."""
  columns = {'user': INT, 'time': ISO_UTC, 'latitude': SKIP, 'longitude': SKIP,
             'location': INT}
  table = _read_delimited(path, member=None, sep='\t', columns=columns)
  return _to_interactions(path, table, 'user', 'location', 'time')


# ---- JSON lines: Amazon 5-core reviews, Yelp reviews ----

_JSON_TYPES = {INT: pa.int64(), FLOAT: pa.float64(), STR: pa.string(), DATE: pa.string()}
# ISO 8601 dates as the raw datasets write them: a date, an optional time (` ` or `T`) with
# optional fractional seconds (dropped), and an optional zone (`Z`, `±hh:mm`, `±hhmm`); a time
# without a zone is taken as UTC. The fast path (arrow) and the line checker share it.
_ISO_DATE_PATTERN = (r'^(?P<date>\d{4}-\d{2}-\d{2})(?:[ T](?P<time>\d{2}:\d{2}:\d{2})(?:\.\d+)?)?'
                     r'(?P<zone>Z|[+-]\d{2}:?\d{2})?$')


def _json_checker(fields: Mapping[str, str]) -> Callable[[str], None]:
  def check(line: str) -> None:
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'malformed JSON ({e.msg} at column {e.colno})') from None
    if not isinstance(record, dict):
      raise ValueError('expected a JSON object')
    for name, kind in fields.items():
      if record.get(name) is None:
        raise ValueError(f'missing field {name!r}')
      value = record[name]
      if not _json_value_ok(kind, value):
        raise ValueError(f'field {name!r}: expected {_EXPECTED[kind]}, got {value!r}')
      if kind == DATE:
        try:
          _check_date(value)
        except ValueError as e:
          raise ValueError(f'field {name!r}: {e}') from None
  return check


def _json_value_ok(kind: str, value: Any) -> bool:
  if isinstance(value, bool):
    return False
  if kind == INT:
    return isinstance(value, int)
  if kind == FLOAT:
    return isinstance(value, (int, float))
  return isinstance(value, str) and (kind == DATE or value != '')


def _parse_dates(values: pa.ChunkedArray) -> pa.ChunkedArray:
  """`_ISO_DATE_PATTERN` strings to int64 UTC seconds; anything else becomes null."""
  parts = pc.extract_regex(values, pattern=_ISO_DATE_PATTERN)
  time = pc.struct_field(parts, 'time')
  time = pc.if_else(pc.equal(time, ''), '00:00:00', time)
  local = pc.strptime(pc.binary_join_element_wise(pc.struct_field(parts, 'date'), time, ' '),
                      format='%Y-%m-%d %H:%M:%S', unit='s', error_is_null=True)
  zone = pc.replace_substring(pc.struct_field(parts, 'zone'), ':', '')  # '', 'Z' or ±hhmm
  has_offset = pc.greater(pc.utf8_length(zone), 1)
  sign = pc.if_else(pc.starts_with(zone, '-'), -1, 1)

  def digits(start: int) -> pa.ChunkedArray:
    text = pc.utf8_slice_codeunits(zone, start, start + 2)
    return pc.cast(pc.if_else(has_offset, text, '0'), pa.int64())

  offset = pc.multiply(sign, pc.add(pc.multiply(digits(1), 3600), pc.multiply(digits(3), 60)))
  return pc.subtract(pc.cast(local, pa.int64()), offset)


def _read_json_lines(path: str, fields: Mapping[str, str]) -> pa.Table:
  """Streams a JSON-lines file (optionally gzip) keeping only `fields` (name -> kind)."""
  check = _json_checker(fields)
  schema = pa.schema([(name, _JSON_TYPES[kind]) for name, kind in fields.items()])
  if next(_numbered_lines(path, None), None) is None:
    raise DataError(f'{path}: empty file; expected one JSON object a line')
  batches = []
  try:
    with pa.input_stream(path, compression='detect') as stream:
      reader = pa_json.open_json(
          stream, read_options=pa_json.ReadOptions(block_size=_BLOCK_SIZE),
          parse_options=pa_json.ParseOptions(explicit_schema=schema,
                                             unexpected_field_behavior='ignore'))
      batches.extend(reader)
  except (pa.ArrowInvalid, OSError) as e:
    raise _fast_path_failed(path, None, check, str(e)) from None
  table = pa.Table.from_batches(batches, schema=schema)
  for name, kind in fields.items():
    if kind == DATE:
      table = table.set_column(table.schema.get_field_index(name), name,
                               _parse_dates(table[name]))
  if any(table[name].null_count for name in fields):
    raise _fast_path_failed(path, None, check, 'missing fields or unparsable dates')
  return table


def _read_rated_json_lines(path: str, *, user: str, item: str, time: str, time_kind: str,
                           rating: str, min_rating: float | None) -> Interactions:
  """JSON-lines reviews; the rating column is read only when a threshold is set."""
  fields = {user: STR, item: STR, time: time_kind}
  if min_rating is not None:
    fields[rating] = FLOAT
  table = _keep_rated(_read_json_lines(path, fields), rating, min_rating)
  return _to_interactions(path, table, user, item, time)


def read_amazon_reviews(path: str, *, min_rating: float | None = None) -> Interactions:
  """Amazon 2014 reviews JSON lines (e.g. the 5-core `reviews_Beauty_5.json.gz`)."""
  return _read_rated_json_lines(path, user='reviewerID', item='asin', time='unixReviewTime',
                                time_kind=INT, rating='overall', min_rating=min_rating)


def read_yelp_reviews(path: str, *, min_rating: float | None = None) -> Interactions:
  """Yelp academic dataset reviews: JSON lines with `user_id, business_id, stars, date`."""
  return _read_rated_json_lines(path, user='user_id', item='business_id', time='date',
                                time_kind=DATE, rating='stars', min_rating=min_rating)


# ---- parquet: Zvuk, Yambda ----


def _is_id(t: pa.DataType) -> bool:
  return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_time(t: pa.DataType) -> bool:
  return pa.types.is_integer(t) or pa.types.is_timestamp(t)


def _is_number(t: pa.DataType) -> bool:
  return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _open_parquet(path: str) -> pq.ParquetFile:
  if os.path.getsize(path) == 0:
    raise DataError(f'{path}: empty file; expected a parquet file')
  try:
    return pq.ParquetFile(path)
  except (pa.ArrowInvalid, OSError) as e:
    raise DataError(f'{path}: not a readable parquet file ({e})') from None


def _check_columns(path: str, schema: pa.Schema, wanted: Mapping[str, tuple]) -> None:
  present = set(schema.names)
  for name, (is_ok, expected) in wanted.items():
    if name not in present:
      raise DataError(f'{path}: missing column {name!r}; expected {expected} '
                      f'(found columns: {", ".join(schema.names)})')
    actual = schema.field(name).type
    if not is_ok(actual):
      raise DataError(f'{path}: column {name!r} has type {actual}; expected {expected}')


def _read_parquet(path: str, *, user: str, item: str, time: str,
                  at_least: Mapping[str, float] | None = None) -> pa.Table:
  """Reads the id/time columns of a parquet file, keeping rows with `column >= value`."""
  at_least = {k: v for k, v in (at_least or {}).items() if v is not None}
  parquet = _open_parquet(path)
  schema = parquet.schema_arrow
  wanted = {user: (_is_id, 'integer or string ids'), item: (_is_id, 'integer or string ids'),
            time: (_is_time, 'integer seconds or timestamps')}
  wanted.update({name: (_is_number, 'numbers') for name in at_least})
  _check_columns(path, schema, wanted)
  if parquet.metadata.num_rows == 0:
    raise DataError(f'{path}: the file has no rows; expected interactions')
  kept, start = [], 0
  for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH, columns=list(wanted)):
    for name in wanted:
      column = batch.column(name)
      if column.null_count:
        row = start + pc.index(pc.is_null(column), True).as_py() + 1
        raise DataError(f'{path}: column {name!r}, row {row}: null value; expected a value')
    mask = None
    for name, threshold in at_least.items():
      keep = pc.greater_equal(batch.column(name).cast(pa.float64()), threshold)
      mask = keep if mask is None else pc.and_(mask, keep)
    start += batch.num_rows
    batch = batch.select([user, item, time])
    kept.append(batch if mask is None else batch.filter(mask))
  return pa.Table.from_batches(kept, schema=kept[0].schema)


def read_zvuk(path: str, *, min_play_duration: float | None = None) -> Interactions:
  """Zvuk `zvuk-interactions.parquet`: `user_id, session_id, datetime, track_id, play_duration`.

  Every play is an interaction unless `min_play_duration` (in the file's unit) is given.
  """
  table = _read_parquet(path, user='user_id', item='track_id', time='datetime',
                        at_least={'play_duration': min_play_duration})
  return _to_interactions(path, table, 'user_id', 'track_id', 'datetime')


def read_yambda(path: str, *, organic_only: bool = False,
                min_played_ratio_pct: float | None = None) -> Interactions:
  """Yambda flat parquet (`likes` or `listens`): `uid, timestamp, item_id, is_organic, ...`.

  Yambda timestamps count seconds from the dataset's start, rounded to 5 s.
  """
  at_least = {'is_organic': 1 if organic_only else None,
              'played_ratio_pct': min_played_ratio_pct}
  table = _read_parquet(path, user='uid', item='item_id', time='timestamp', at_least=at_least)
  return _to_interactions(path, table, 'uid', 'item_id', 'timestamp')
