"""The authors' test pass against a correct successive protocol, on a small generated dataset.

Runs in a separate environment with the authors' code (`anonymcode/IJCAI2026`: `processor.py`,
`utils.py`, `defaults.py`, `experiment_utils.py`, `models/SASRec_custom.py`) and their
dependencies (torch, pandas, ...), none of which pka_jax depends on; it imports neither pka_jax
nor jax:

  python experiments/authors_protocol/compare.py --authors_code=<clone> --out=<dir>

It writes a few hundred users' interactions, `<dir>/synthetic_collision.csv` (`userid,itemid,
timestamp`, the raw format of the authors' `processor.read_raw_data`), some of whose users
first appear in the validation window and some in the test window. Then it

1. prepares and partitions them exactly as the authors' `experiment_utils.train_and_eval` does
   (`processor.prepare_data_exclude` with quantiles 0.95 and 0.97, items shifted by one,
   `utils.generate_partition` for validation and for test);
2. maps the users of their test pass back to the raw ids and reports, for every test user new
   since training, whose history their test pass takes as that user's context;
3. ranks by training popularity (the whole context masked) through their
   `experiment_utils.evaluate(..., eval_mode='successive')` and through the protocol of
   docs/design.md §3 written out here, and prints both side by side.

`<dir>/compare.json` keeps the numbers for `experiments/authors_protocol/pka_side.py`, which
evaluates the same ranker with pka_jax's own protocol.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import math
import os
import sys
import types

import numpy as np
import pandas as pd
import torch

DATASET_NAME = 'synthetic_collision'
USER, ITEM, TIME = 'userid', 'itemid', 'timestamp'  # the columns the authors' code reads
Q_VALID, Q_TEST, MAX_EVAL = 0.95, 0.97, 50_000  # train_and_eval's time_offset_q, defaults'
TOP_K = 10
MAXLEN = 200


# ---- the generated data ----


def generate_interactions(seed: int, num_users: int, num_items: int,
                          late_share: float) -> pd.DataFrame:
  """Users active over the whole time line, plus late joiners whose first interaction falls
  in the last tenth of it (which holds the validation and the test windows).

  Items follow a Zipf-like popularity and never repeat within a user. Timestamps are unique,
  so that every ordering by time is unambiguous (their sorts are not stable).
  """
  rng = np.random.default_rng(seed)
  popularity = 1.0 / np.arange(1, num_items + 1) ** 0.9
  popularity /= popularity.sum()
  raw_item_of_rank = 1001 + rng.permutation(num_items)  # raw ids unrelated to popularity
  raw_user_ids = 1 + rng.permutation(num_users)  # late joiners scattered among the ids
  num_late = round(late_share * num_users)
  rows = []
  for position, raw_user in enumerate(raw_user_ids):
    if position < num_users - num_late:
      count = int(rng.integers(10, 41))
      start = rng.uniform(0.0, 0.7)
      end = rng.uniform(start + 0.2, 1.0)
    else:
      count = int(rng.integers(3, 13))
      start = rng.uniform(0.9, 1.0)
      end = min(1.0, start + 0.04)
    times = np.sort(np.concatenate([[start], rng.uniform(start, end, count - 1)]))
    items = raw_item_of_rank[rng.choice(num_items, size=count, replace=False, p=popularity)]
    rows += [(int(raw_user), int(item), float(t)) for item, t in zip(items, times)]
  frame = pd.DataFrame(rows, columns=[USER, ITEM, 'time'])
  order = np.argsort(frame['time'].to_numpy(), kind='stable')
  timestamps = np.empty(len(frame), dtype=np.int64)
  timestamps[order] = 978_300_000 + 10 * np.arange(len(frame))  # ML-1M's era, 10 s apart
  frame[TIME] = timestamps
  # Rows grouped by user, as in ML-1M's file: the row order decides their factorize order.
  return frame[[USER, ITEM, TIME]].sort_values([USER, TIME]).reset_index(drop=True)


# ---- the correct protocol (docs/design.md §3), on raw ids ----


def temporal_split(raw: pd.DataFrame) -> dict[str, pd.DataFrame]:
  """Global split by time; held-out interactions with items unseen in train are dropped."""
  n = len(raw)
  train_quantile = Q_TEST + Q_VALID - 1.0
  valid_quantile_of_rest = (1.0 - Q_VALID) / (1.0 - train_quantile)
  if valid_quantile_of_rest > MAX_EVAL / (n * (1.0 - train_quantile)):
    train_quantile = 1.0 - MAX_EVAL / (n * valid_quantile_of_rest)
  time = raw[TIME].to_numpy()
  is_train = time < np.quantile(time, train_quantile, method='nearest')
  valid_end = np.quantile(time[~is_train], valid_quantile_of_rest, method='nearest')
  catalog = set(raw.loc[is_train, ITEM])
  known = raw[ITEM].isin(catalog).to_numpy()
  by_time = lambda mask: raw.loc[mask].sort_values(TIME)
  return {
      'train': by_time(is_train),
      'valid': by_time(~is_train & (time < valid_end) & known),
      'test': by_time(~is_train & (time >= valid_end) & known),
  }


def popularity_order(train: pd.DataFrame) -> list[int]:
  """Training items, most interacted first; ties by raw item id (no ties left to any top-k)."""
  counts = train[ITEM].value_counts()
  return sorted(counts.index.tolist(), key=lambda item: (-counts[item], item))


def histories_of(*parts: pd.DataFrame) -> dict[int, list[int]]:
  history = collections.defaultdict(list)
  for part in parts:
    for user, item in part[[USER, ITEM]].itertuples(index=False):
      history[user].append(item)
  return history


def metrics_of(ranks: list[int]) -> dict[str, float]:
  """HR, NDCG and MRR at TOP_K of 0-based ranks (-1: not in the list)."""
  hits = [r for r in ranks if r >= 0]
  return {
      'num_steps': len(ranks),
      'HR@10': len(hits) / len(ranks),
      'NDCG@10': sum(1.0 / math.log2(r + 2) for r in hits) / len(ranks),
      'MRR@10': sum(1.0 / (r + 1) for r in hits) / len(ranks),
  }


def successive_reference(split: dict[str, pd.DataFrame], part: str,
                         ranking: list[int]) -> dict[str, float]:
  """Each held-out interaction in time order is a step; its context is the user's own history
  before the part plus the user's earlier interactions in the part. Steps with an empty context
  are skipped but their item joins the history. The whole context is masked."""
  before = [split['train']] if part == 'valid' else [split['train'], split['valid']]
  history = histories_of(*before)
  ranks = []
  for user, item in split[part][[USER, ITEM]].itertuples(index=False):
    context = history[user]
    if context:
      seen = set(context)
      top = [candidate for candidate in ranking if candidate not in seen][:TOP_K]
      ranks.append(top.index(item) if item in top else -1)
    context.append(item)
  return metrics_of(ranks)


# ---- the authors' code ----


class FixedScoreModel:
  """What their `evaluate_step_batched` reads of a model (`dev`, `pos_emb.num_embeddings`,
  `log2feats`, `item_emb.weight`), scoring every context with one fixed vector: their
  predictions are `log2feats(...)[:, -1] @ item_emb.weight.T`, here `1 * score[item]`."""

  def __init__(self, score_by_item: np.ndarray):
    self.dev = 'cpu'
    self.pos_emb = types.SimpleNamespace(num_embeddings=MAXLEN)
    self.item_emb = types.SimpleNamespace(
        weight=torch.tensor(score_by_item, dtype=torch.float32)[:, None])
    self.rows_scored = 0  # their evaluation scores exactly the steps it does not skip

  def log2feats(self, seq_tensor: torch.Tensor) -> torch.Tensor:
    self.rows_scored += seq_tensor.shape[0]
    return torch.ones(seq_tensor.shape[0], seq_tensor.shape[1], 1)


def import_authors_code(authors_code: str, data_dir: str) -> types.SimpleNamespace:
  sys.path.insert(0, authors_code)
  with contextlib.redirect_stdout(io.StringIO()):
    import defaults  # pylint: disable=import-outside-toplevel
    import experiment_utils  # pylint: disable=import-outside-toplevel
    import processor  # pylint: disable=import-outside-toplevel
    import utils  # pylint: disable=import-outside-toplevel
  defaults.data_dir = data_dir  # processor.read_raw_data reads <data_dir>/<name>.csv
  return types.SimpleNamespace(processor=processor, utils=utils, evaluate=experiment_utils.evaluate)


def authors_partitions(authors: types.SimpleNamespace) -> dict:
  """The data steps of their `experiment_utils.train_and_eval`, line for line."""
  with contextlib.redirect_stdout(io.StringIO()):
    tune_datapack, test_datapack = authors.processor.prepare_data_exclude(
        DATASET_NAME, time_offset_q=[Q_VALID, Q_TEST])
  train_df, valid_df, processor_index = tune_datapack
  train_full_df, test_df, _ = test_datapack
  for df in (train_df, valid_df, train_full_df, test_df):
    df[ITEM] = df[ITEM] + 1
  return {
      'train_df': train_df, 'valid_df': valid_df, 'train_full_df': train_full_df,
      'test_df': test_df, 'processor_items': processor_index['items'],
      'valid': authors.utils.generate_partition(train_df, valid_df, USER, ITEM, TIME,
                                                stepwise_eval=False),
      'test': authors.utils.generate_partition(train_full_df, test_df, USER, ITEM, TIME,
                                               stepwise_eval=False),
  }


def partition_frames(authors, observed: pd.DataFrame, holdout: pd.DataFrame):
  """The frames inside their `generate_partition`: its own renumbering of `observed` and the
  held-out rows mapped onto it. Every step of their code keeps the raw file's row labels."""
  observed_p, index = authors.utils.reindex_data(observed, [USER, ITEM], base=1)
  holdout_p = authors.utils.verify_reindex(holdout, USER, ITEM, index)
  return observed_p, holdout_p, index


def by_user(frame: pd.DataFrame) -> dict[int, list[int]]:
  return frame.sort_values(TIME).groupby(USER, sort=False)[ITEM].apply(list).to_dict()


def authors_metrics(authors, partition, score_by_item: np.ndarray) -> dict[str, float]:
  model = FixedScoreModel(score_by_item)
  config = {'eval_batch_size': 256, 'manual_seed': 111}
  with contextlib.redirect_stdout(io.StringIO()):  # their evaluate prints its scores
    results = authors.evaluate(model, partition, TOP_K, config, eval_mode='successive')
  return {'num_steps': model.rows_scored,
          **{name: results[name]['score'] for name in ('HR@10', 'NDCG@10', 'MRR@10')}}


# ---- the collision ----


def describe_test_users(raw, split, parts, authors) -> dict:
  """For every user of their test pass: whose history it gets as context."""
  observed_p, holdout_p, index = partition_frames(
      authors, parts['train_full_df'], parts['test_df'])
  user_train, user_test, _, _ = parts['test']
  # The mirror is exact: same contexts and same held-out lists as their generate_partition.
  assert by_user(observed_p) == user_train and by_user(holdout_p) == user_test

  raw_user_of_row = raw[USER]
  owners = observed_p.assign(raw=raw_user_of_row.loc[observed_p.index].to_numpy()).groupby(
      USER)['raw'].unique()
  tested = holdout_p.assign(raw=raw_user_of_row.loc[holdout_p.index].to_numpy()).groupby(
      USER)['raw'].unique()
  assert owners.map(len).eq(1).all() and tested.map(len).eq(1).all()
  owner_of = {user: raws[0] for user, raws in owners.items()}
  train_users = set(split['train'][USER])
  valid_users = set(split['valid'][USER])
  test_steps = split['test'][USER].value_counts()

  rows = []
  for test_id, raws in tested.items():
    raw_user = raws[0]
    owner = owner_of.get(test_id)
    if raw_user in train_users:
      assert owner == raw_user  # users seen in training keep their own history
      continue
    if owner is None:
      kind = 'lost_validation_history' if raw_user in valid_users else 'new_no_context'
    else:
      kind = 'own_history' if owner == raw_user else 'other_users_history'
    rows.append({'raw_user': int(raw_user), 'test_id': int(test_id),
                 'context_owner': None if owner is None else int(owner), 'kind': kind,
                 'first_seen': 'valid' if raw_user in valid_users else 'test',
                 'test_steps': int(test_steps[raw_user])})
  return {'rows': rows, 'user_train': user_train, 'index': index}


def processor_id(frame: pd.DataFrame, raw: pd.DataFrame, raw_user: int) -> int:
  ids = frame.loc[raw.loc[frame.index, USER].to_numpy() == raw_user, USER].unique()
  assert len(ids) == 1
  return int(ids[0])


def print_example(example, raw, split, parts, collision) -> None:
  raw_user, owner = example['raw_user'], example['context_owner']
  own_validation = split['valid'].loc[split['valid'][USER] == raw_user, ITEM].tolist()
  test_items = split['test'].loc[split['test'][USER] == raw_user, ITEM].tolist()
  owner_history = histories_of(split['train'], split['valid'])[owner]
  context = collision['user_train'][example['test_id']]
  items_index = collision['index'][ITEM]
  context_raw = [int(parts['processor_items'][items_index[i] - 1]) for i in context]
  assert context_raw == owner_history
  num_train_users = len(set(split['train'][USER]))
  in_frame = 'valid_df' if owner not in set(split['train'][USER]) else 'train_df'
  test_id = processor_id(parts['test_df'], raw, raw_user)
  owner_id = processor_id(parts[in_frame], raw, owner)
  print(f'Example: raw user {raw_user}, first seen in the {example["first_seen"]} window, '
        f'{len(test_items)} test interactions; own history before test: '
        f'{own_validation or "none"}.')
  print(f'  test_df numbers raw user {raw_user} {test_id} = {num_train_users} training users + '
        f'{test_id - num_train_users}; {in_frame} numbers raw user {owner} {owner_id} = '
        f'{num_train_users} + {owner_id - num_train_users}.')
  print(f'  their test pass scores raw user {raw_user} with raw user {owner}\'s history as '
        f'context ({len(context_raw)} items, all masked): {context_raw}')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--authors_code', required=True,
                      help='a clone of anonymcode/IJCAI2026 (or a folder with its files)')
  parser.add_argument('--out', required=True, help='folder for the generated data and JSON')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--num_users', type=int, default=400)
  parser.add_argument('--num_items', type=int, default=100)
  parser.add_argument('--late_share', type=float, default=0.3,
                      help='share of users whose first interaction is in the last tenth')
  args = parser.parse_args()

  os.makedirs(args.out, exist_ok=True)
  raw = generate_interactions(args.seed, args.num_users, args.num_items, args.late_share)
  data_path = os.path.join(args.out, f'{DATASET_NAME}.csv')
  raw.to_csv(data_path, index=False)
  print(f'Generated {len(raw)} interactions of {raw[USER].nunique()} users over '
        f'{raw[ITEM].nunique()} items (seed {args.seed}): {DATASET_NAME}.csv')

  split = temporal_split(raw)
  authors = import_authors_code(os.path.abspath(args.authors_code), os.path.abspath(args.out))
  parts = authors_partitions(authors)
  sizes = {name: len(split[name]) for name in ('train', 'valid', 'test')}
  their_sizes = {name: len(parts[f'{name}_df']) for name in ('train', 'valid', 'test')}
  print(f'Split (train/valid/test interactions): reference {sizes}, theirs {their_sizes}')
  assert sizes == their_sizes
  train_users = set(split['train'][USER])
  new_in_valid = set(split['valid'][USER]) - train_users
  new_in_test = set(split['test'][USER]) - train_users - new_in_valid
  print(f'Users: {len(train_users)} in training, {len(new_in_valid)} first seen in validation, '
        f'{len(new_in_test)} first seen in test')

  collision = describe_test_users(raw, split, parts, authors)
  kinds = collections.Counter(row['kind'] for row in collision['rows'])
  affected = [row for row in collision['rows'] if row['kind'] == 'other_users_history']
  print(f'\nTheir test pass, {len(collision["rows"])} test users new since training:')
  print(f'  scored with ANOTHER user\'s history as context: {kinds["other_users_history"]} '
        f'users, {sum(row["test_steps"] for row in affected)} test interactions')
  print(f'  scored with their own validation history: {kinds["own_history"]}')
  print(f'  no context although they have a validation history: '
        f'{kinds["lost_validation_history"]}')
  print(f'  no context, truly new in test (correct): {kinds["new_no_context"]}')
  print('  raw user -> owner of the context their test pass uses (- none):')
  pairs = [f'{row["raw_user"]}->{row["context_owner"] or "-"}' for row in collision['rows']]
  for start in range(0, len(pairs), 10):
    print('    ' + ' '.join(pairs[start:start + 10]))
  for window in ('test', 'valid'):  # one user new in each window, if any was affected
    of_window = [row for row in affected if row['first_seen'] == window]
    if of_window:
      print_example(min(of_window, key=lambda row: row['raw_user']), raw, split, parts,
                    collision)

  ranking = popularity_order(split['train'])
  results = {}
  for part in ('valid', 'test'):
    _, index = authors.utils.reindex_data(
        parts['train_df' if part == 'valid' else 'train_full_df'], [USER, ITEM], base=1)
    # Their item k is processor item index[k] - 1; padding (0) scores lowest.
    raw_of_item = [None] + [parts['processor_items'][index[ITEM][k] - 1]
                            for k in range(1, len(index[ITEM]))]
    score_of_raw = {item: len(ranking) - rank for rank, item in enumerate(ranking)}
    score_by_item = np.array([-1e9] + [score_of_raw[item] for item in raw_of_item[1:]])
    results[part] = {
        'reference': successive_reference(split, part, ranking),
        'authors': authors_metrics(authors, parts[part], score_by_item),
    }

  print('\nTraining-popularity ranker, successive protocol, top 10:')
  print(f'{"part":6} {"protocol":22} {"steps":>6} {"HR@10":>8} {"NDCG@10":>8} {"MRR@10":>8}')
  for part, by_protocol in results.items():
    for name, label in (('reference', 'correct (this script)'), ('authors', 'their evaluate')):
      m = by_protocol[name]
      print(f'{part:6} {label:22} {m["num_steps"]:6d} {m["HR@10"]:8.4f} {m["NDCG@10"]:8.4f} '
            f'{m["MRR@10"]:8.4f}')
  for part, by_protocol in results.items():
    gap = by_protocol['authors']['NDCG@10'] - by_protocol['reference']['NDCG@10']
    print(f'NDCG@10 theirs - correct, {part}: {gap:+.4f} '
          f'({gap / by_protocol["reference"]["NDCG@10"]:+.1%})')

  with open(os.path.join(args.out, 'compare.json'), 'w') as f:
    json.dump({'data': f'{DATASET_NAME}.csv', 'popularity_order': [int(i) for i in ranking],
               'split_sizes': sizes, 'results': results, 'collision': collision['rows'],
               'counts': dict(kinds)}, f, indent=1)


if __name__ == '__main__':
  main()
