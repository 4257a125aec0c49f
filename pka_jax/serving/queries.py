"""Requests for recommendations as a user writes them: raw ids on the command line, or a file
of histories (CSV lines of raw item ids, or JSON lines naming a history or a user), and the
JSON lines that answer them. A mistake in the input is one line naming its place."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np

from pka_jax import files
from pka_jax.serving.recommender import Recommender, TooFewItemsError, warn_unknown


class InputError(ValueError):
  """A problem with the user's input that one line of text explains."""


def typed_id(token, ids: np.ndarray, where: str):
  """A raw id as the dataset's id type: int when its ids are integers, else str."""
  if not np.issubdtype(ids.dtype, np.integer):
    return str(token)
  if isinstance(token, bool) or not isinstance(token, (int, str)):
    raise InputError(f'{where}: {token!r} is not an integer id')
  try:
    return int(token)
  except ValueError:
    raise InputError(f'{where}: {token!r} is not an integer id') from None


class Query(NamedTuple):
  """One line of input: a history of raw ids, and what the output line echoes."""

  history: list
  echo: dict


def parse_line(line: str, where: str, recommender: Recommender) -> Query:
  """A CSV line of raw item ids, or a JSON object {"history": [...]} or {"user": ...}
  (optionally with an "id" echoed to the output)."""
  if not line.lstrip().startswith('{'):
    tokens = [t.strip() for t in next(csv.reader([line]), [])]
    return Query([typed_id(t, recommender.item_ids, where) for t in tokens if t], {})
  try:
    record = json.loads(line)
  except json.JSONDecodeError as error:
    raise InputError(f'{where}: not a JSON object ({error.msg} at column {error.colno})') from None
  if not isinstance(record, dict) or ('history' in record) == ('user' in record):
    raise InputError(f'{where}: expected an object with exactly one of "history" and "user"')
  echo = {key: record[key] for key in ('id', 'user') if key in record}
  if 'user' in record:
    user = typed_id(record['user'], recommender.user_ids, f'{where}: field "user"')
    try:
      return Query(recommender.user_history(user), echo)
    except KeyError as error:
      raise InputError(f'{where}: {error.args[0]}') from None
  if not isinstance(record['history'], list):
    raise InputError(f'{where}: field "history" must be a list of item ids')
  return Query([typed_id(t, recommender.item_ids, f'{where}: field "history"')
                for t in record['history']], echo)


def read_queries(path: str, recommender: Recommender) -> Iterator[Query]:
  if not os.path.isfile(path):
    raise InputError(f'{path}: no such file')
  with open(path, newline='') as f:
    for number, line in enumerate(f, 1):
      yield parse_line(line.rstrip('\r\n'), f'{path}:{number}', recommender)


def recommend_file(recommender: Recommender, path: str, k: int, *, exclude_seen: bool,
                   allowed_V: np.ndarray | None) -> Iterator[dict]:
  """The output records of every line of `path`, in order; one warning for unknown ids."""
  queries, unknown, dense_rows = [], [], []
  for query in read_queries(path, recommender):
    dense, missing = recommender.dense_items(query.history)
    queries.append(query)
    dense_rows.append(dense)
    unknown += missing
  warn_unknown(unknown, 'history')
  try:
    top = recommender.recommend_dense(dense_rows, k, exclude_seen=exclude_seen,
                                      allowed_V=allowed_V, progress=True)
  except TooFewItemsError as error:
    raise InputError(f'{path}:{error.row + 1}: {error}') from None
  for query, items, scores, popular in zip(queries, *top):
    yield record(items, scores, popular, query.echo)


def record(items: np.ndarray, scores: np.ndarray, popular: bool, echo: dict) -> dict:
  return {**echo, 'items': items.tolist(), 'scores': scores.tolist(),
          'source': 'popularity' if popular else 'model'}


def write_json_lines(records: Iterable[dict], path: str | None) -> None:
  """To stdout, or to `path` under a temporary name renamed into place when complete."""
  if path is None:
    for record in records:
      print(json.dumps(record))
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with files.new_file(path) as tmp, open(tmp, 'w') as f:
    for record in records:
      f.write(json.dumps(record) + '\n')
