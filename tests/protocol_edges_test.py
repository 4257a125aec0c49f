"""The protocol of docs/design.md §3 on its edges, from raw interactions to the metrics.

One hand-made raw list holds every edge at once: a user first seen in validation, a user first
seen in test, an item first seen in validation (so outside the catalog), interactions of one
user at one timestamp (in training, and a group that straddles the train cut), histories longer
than `maxlen`, and held-out interactions with no context at all. The split, every step of both
parts (window, whole context, target), the skips and the drops are worked out by hand below;
a fixed ranker's ranks, top-10 lists and metrics are recomputed in plain Python from those
hand-worked steps, never from what pka_jax builds.

Order of interactions at one timestamp: the source order (the order of the rows handed to
`Interactions.from_raw`), kept by the split's stable sorts — `Events` documents "ties keep the
source order"; docs/design.md §3 does not say. `test_ties_follow_the_source_order` pins it.
"""

import math
import statistics
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pka_jax.data import store
from pka_jax.data.interactions import Interactions
from pka_jax.data.split import temporal_split
from pka_jax.evaluation import evaluator, protocol

MAXLEN = 3  # T: the scored window; several histories below are longer
TOP_K = 10
# The split's fractions, chosen so that the cuts fall where worked out under RAW_INTERACTIONS
# (the protocol's 0.95 / 0.97 would leave too few held-out interactions in a list this short).
# max_eval is far above the 18 held-out interactions: the cap plays no part here.
Q_VALID, Q_TEST, MAX_EVAL = 0.8, 0.9, 1000

# (user, raw item, timestamp), grouped by user, so not in time order. 54 interactions, 12 users,
# items 101..116 in training plus 199. Times: training 10..44, validation 50..58, test 60..66.
RAW_INTERACTIONS = [
    # a: six training items, twice maxlen. In validation it comes back to its oldest item 101,
    # which is masked though outside the window; in test its context holds 101 twice.
    ('a', 101, 10), ('a', 112, 11), ('a', 113, 12), ('a', 114, 13), ('a', 115, 14),
    ('a', 116, 15), ('a', 101, 55), ('a', 102, 65),
    # b: three interactions at one time, 50, in the source order 105, 102, 109 (not item
    # order). The train quantile lands in the middle of this group: all three go to validation.
    ('b', 103, 16), ('b', 104, 17), ('b', 105, 50), ('b', 102, 50), ('b', 109, 50),
    ('b', 111, 66),
    # c: first seen in validation; its first held-out interaction has no context at all.
    ('c', 107, 51), ('c', 110, 53), ('c', 103, 61),
    # d: first seen in test.
    ('d', 104, 60), ('d', 106, 62),
    # e: item 199 is first seen in validation: outside the catalog, so e's interaction with it
    # is dropped and never joins e's history.
    ('e', 106, 18), ('e', 111, 19), ('e', 199, 52), ('e', 108, 54),
    # f: absent from training; its validation interaction (199) is dropped, so its test one has
    # no context either.
    ('f', 199, 56), ('f', 112, 63),
    # g: two training interactions at one time, 22, in the source order 110, 108.
    ('g', 102, 20), ('g', 105, 21), ('g', 110, 22), ('g', 108, 22), ('g', 113, 57),
    # h: exactly maxlen training items.
    ('h', 107, 23), ('h', 109, 24), ('h', 101, 25), ('h', 114, 58),
    # i, j, k: training only.
    ('i', 101, 26), ('i', 102, 27), ('i', 103, 28), ('i', 104, 29), ('i', 105, 30),
    ('i', 106, 31), ('i', 107, 32),
    ('j', 108, 33), ('j', 109, 34), ('j', 110, 35), ('j', 111, 36), ('j', 112, 37),
    ('j', 113, 38),
    ('k', 114, 39), ('k', 115, 40), ('k', 116, 41), ('k', 101, 42), ('k', 102, 43),
    ('k', 103, 44),
    # l: only item 199, in test: every interaction dropped, so l is no user of the dataset.
    ('l', 199, 64),
]
# The split by hand (n = 54):
#   e = 0.9 + 0.8 - 1 = 0.7; r = 0.2 / 0.3 = 2/3; no cap (2/3 < 1000 / (54 * 0.3)).
#   Train quantile: position 0.7 * 53 = 37.1 -> 37 of the sorted times. Positions 0..35 are the
#   36 training rows (times 10..44, 22 twice); 36, 37, 38 are b's group at time 50. So the cut
#   is time 50 and training is everything before it: 36 rows, none of the group (a cut by
#   position would have put b's first row in training).
#   The rest (18 rows, cold ones included: they are dropped after the cut) is cut at its
#   position (2/3) * 17 = 11.33 -> 11: times 50, 50, 50, 51..58 are positions 0..10 and 60 is
#   position 11. Validation is times 50..58 (11 rows), test 60..66 (7 rows).
#   Dropped for item 199: (e, 52) and (f, 56) in validation, (l, 64) in test.
CATALOG = list(range(101, 117))  # the training items; dense id = raw id - 100
KEPT_USERS = list('abcdefghijk')  # l is gone, c, d and f (absent from training) stay

TRAIN_HISTORIES = {
    'a': [101, 112, 113, 114, 115, 116],
    'b': [103, 104],
    'c': [], 'd': [], 'f': [],
    'e': [106, 111],
    'g': [102, 105, 110, 108],  # the tie at 22 in source order
    'h': [107, 109, 101],
    'i': [101, 102, 103, 104, 105, 106, 107],
    'j': [108, 109, 110, 111, 112, 113],
    'k': [114, 115, 116, 101, 102, 103],
}
VALID_EVENTS = [('b', 105, 50), ('b', 102, 50), ('b', 109, 50), ('c', 107, 51), ('c', 110, 53),
                ('e', 108, 54), ('a', 101, 55), ('g', 113, 57), ('h', 114, 58)]
TEST_EVENTS = [('d', 104, 60), ('c', 103, 61), ('d', 106, 62), ('f', 112, 63), ('a', 102, 65),
               ('b', 111, 66)]


class Step(NamedTuple):
  """An evaluated step: `window` is the scored input (left-padded with 0 to MAXLEN), `context`
  the user's whole history before the step, every item of which is masked."""
  user: str
  target: int
  window: list[int]
  context: list[int]


class Skip(NamedTuple):
  """A held-out interaction with an empty context: no step, but its item joins the history."""
  user: str
  item: int


# Every held-out interaction of validation, in time order (dropped ones as comments).
VALID_PROTOCOL = [
    Step('b', 105, window=[0, 103, 104], context=[103, 104]),  # the tie group's first row
    Step('b', 102, window=[103, 104, 105], context=[103, 104, 105]),  # sees the first
    # Longer than maxlen: 103 is masked but no longer scored.
    Step('b', 109, window=[104, 105, 102], context=[103, 104, 105, 102]),
    Skip('c', 107),  # c first seen in validation: nothing before it
    # (e, 199) dropped: 199 is not in the catalog.
    Step('c', 110, window=[0, 0, 107], context=[107]),  # the skipped 107 joined the history
    Step('e', 108, window=[0, 106, 111], context=[106, 111]),  # 199 never joined
    # The target, 101, is in the context but five items back: masked, so a miss.
    Step('a', 101, window=[114, 115, 116], context=[101, 112, 113, 114, 115, 116]),
    # (f, 199) dropped.
    Step('g', 113, window=[105, 110, 108], context=[102, 105, 110, 108]),
    Step('h', 114, window=[107, 109, 101], context=[107, 109, 101]),
]
# Every held-out interaction of test, in time order: contexts now include validation.
TEST_PROTOCOL = [
    Skip('d', 104),  # d first seen in test
    Step('c', 103, window=[0, 107, 110], context=[107, 110]),  # c's validation items only
    Step('d', 106, window=[0, 0, 104], context=[104]),  # the skipped 104 joined the history
    Skip('f', 112),  # f's only earlier interaction (199) was dropped: still nothing before it
    # (l, 199) dropped, and l with it.
    Step('a', 102, window=[115, 116, 101],
         context=[101, 112, 113, 114, 115, 116, 101]),  # 101 twice: masked all the same
    Step('b', 111, window=[105, 102, 109], context=[103, 104, 105, 102, 109]),
]
PROTOCOL = {'valid': VALID_PROTOCOL, 'test': TEST_PROTOCOL}

# The fixed ranker. A fixed preference over the catalog, best first (a popularity-like order,
# scrambled so that an item's score is not its id), worth 16 down to 1 ...
PREFERENCE = [101, 109, 104, 113, 106, 102, 115, 110, 103, 116, 107, 111, 105, 114, 108, 112]
# ... plus BONUS for the item after the window's oldest item (`successor`), so that which items
# make the window shows in the ranks, not only in the batches. Every score is distinct: no ties
# to break. The padding column scores above everything, so an unmasked padding would show.
BONUS = 50
PADDING_SCORE = 1000


def base_score(item: int) -> int:
  return len(PREFERENCE) - PREFERENCE.index(item)


def successor(item: int) -> int:
  """The next catalog item, 116 wrapping to 101."""
  return CATALOG[(CATALOG.index(item) + 1) % len(CATALOG)]


# Each step's rank under the fixed ranker, worked by hand: the number of unmasked items scoring
# above the target (None: the target is masked). 10 and above are misses at k = 10.
#   valid b 105: bonus 104 masked; above: 101 109 113 106 102 115 110 116 107 111 -> 10
#   valid b 102: above: 101 109 113 106 -> 4
#   valid b 109: above: 101 -> 1
#   valid c 110: bonus 108; above: 108 101 109 104 113 106 102 115 -> 8
#   valid e 108: bonus 107; above: 107 101 109 104 113 102 115 110 103 116 105 114 -> 12
#   valid a 101: masked -> None
#   valid g 113: bonus 106; above: 106 101 109 104 -> 4
#   valid h 114: bonus 108; above: 108 104 113 106 102 115 110 103 116 111 105 -> 11
#   test c 103: bonus 108; above: 108 101 109 104 113 106 102 115 -> 8
#   test d 106: bonus 105; above: 105 101 109 113 -> 4
#   test a 102: bonus 116 masked; above: 109 104 106 -> 3
#   test b 111: bonus 106; above: 106 101 113 115 110 116 107 -> 7
HAND_RANKS = {'valid': [10, 4, 1, 8, 12, None, 4, 11], 'test': [8, 4, 3, 7]}


def steps_of(part: str) -> list[Step]:
  return [entry for entry in PROTOCOL[part] if isinstance(entry, Step)]


def independent_ranking(step: Step) -> tuple[list[int], int | None]:
  """The fixed ranker's top-k list and the target's 0-based rank in the whole ranking (None
  when masked), from the hand-worked step alone."""
  masked = set(step.context)
  bonus_item = successor(next(item for item in step.window if item))
  scores = {item: base_score(item) + (BONUS if item == bonus_item else 0)
            for item in CATALOG if item not in masked}
  assert len(set(scores.values())) == len(scores)  # tie-free
  ranking = sorted(scores, key=scores.get, reverse=True)
  return ranking[:TOP_K], (ranking.index(step.target) if step.target in scores else None)


def independent_metrics(steps: list[Step]) -> dict[str, float]:
  """HR, NDCG and MRR at k with their standard errors (ddof 1), COV and the step count."""
  per_step = {'hr': [], 'ndcg': [], 'mrr': []}
  recommended = set()
  for step in steps:
    top, rank = independent_ranking(step)
    recommended.update(top)
    hit = rank is not None and rank < TOP_K
    per_step['hr'].append(1.0 if hit else 0.0)
    per_step['ndcg'].append(1.0 / math.log2(rank + 2) if hit else 0.0)
    per_step['mrr'].append(1.0 / (rank + 1) if hit else 0.0)
  summary = {}
  for name, values in per_step.items():
    summary[f'{name}@{TOP_K}'] = statistics.fmean(values)
    summary[f'{name}@{TOP_K}_se'] = statistics.stdev(values) / math.sqrt(len(values))
  summary[f'cov@{TOP_K}'] = len(recommended) / len(CATALOG)
  summary['num_steps'] = len(steps)
  return summary


def interactions(rows=RAW_INTERACTIONS) -> Interactions:
  users, items, times = zip(*rows)
  return Interactions.from_raw(np.array(users), np.array(items), np.array(times))


def split(rows=RAW_INTERACTIONS):
  return temporal_split(interactions(rows), q_valid=Q_VALID, q_test=Q_TEST, max_eval=MAX_EVAL)


def raw_item(dataset, dense: int) -> int:
  return 0 if dense == 0 else int(dataset.item_ids[dense - 1])


def decode_events(dataset, events) -> list[tuple[str, int, int]]:
  return [(str(dataset.user_ids[u]), raw_item(dataset, i), int(t))
          for u, i, t in zip(events.user, events.item, events.timestamp)]


def train_histories(dataset) -> dict[str, list[int]]:
  return {str(dataset.user_ids[u]): [raw_item(dataset, i) for i in dataset.train[u]]
          for u in range(dataset.num_users)}


# The fixed ranker as the protocol calls it: scores of the whole catalog from each window.
SCORES_V = np.array([PADDING_SCORE] + [base_score(item) for item in CATALOG], np.float32)


@jax.jit
def fixed_ranker_scores(inputs_BxT):
  oldest_column_B = jnp.argmax(inputs_BxT != 0, axis=1)  # windows are left-padded
  oldest_B = jnp.take_along_axis(inputs_BxT, oldest_column_B[:, None], axis=1)[:, 0]
  bonus_item_B = oldest_B % len(CATALOG) + 1  # `successor` in dense ids (dense = raw - 100)
  items_1xV = jnp.arange(len(CATALOG) + 1)[None, :]
  return jnp.asarray(SCORES_V)[None, :] + BONUS * (items_1xV == bonus_item_B[:, None])


class ObservedStep(NamedTuple):
  step: Step
  top: list[int]
  rank: int  # pka_jax's: -1 outside the top k


def evaluation_pass(dataset, part: str, batch_size: int):
  """Runs `evaluate_ranked` with the fixed ranker, keeping every batch it ranks and what the
  ranking returned; returns the metrics, the steps as the pass saw them and the steps object."""
  steps = protocol.successive_steps(dataset, part, maxlen=MAXLEN)
  ranker = protocol.ranker_from_scores(fixed_ranker_scores, dataset.num_items, TOP_K)
  ranked = []

  def keep_and_rank(batch):
    top_items_BxK, ranks_B = ranker(batch)
    ranked.append((batch, np.asarray(top_items_BxK), np.asarray(ranks_B)))
    return top_items_BxK, ranks_B

  summary = protocol.evaluate_ranked(keep_and_rank, dataset, part, maxlen=MAXLEN,
                                     batch_size=batch_size, top_k=TOP_K, progress=False,
                                     steps=steps)
  observed = []
  for batch, top_items_BxK, ranks_B in ranked:
    seen_by_row = [[] for _ in batch.targets_B]  # one block (shards=1): rows are batch rows
    for row, item in zip(batch.seen_rows_P, batch.seen_items_P):
      if item:  # (0, 0) pads the pairs
        seen_by_row[row].append(raw_item(dataset, item))
    for row in np.flatnonzero(batch.valid_B):
      index = len(observed)  # no trim: the pass runs the steps in step order
      assert batch.targets_B[row] == steps.target[index]
      step = Step(user=str(dataset.user_ids[steps.user[index]]),
                  target=raw_item(dataset, batch.targets_B[row]),
                  window=[raw_item(dataset, i) for i in batch.inputs_BxT[row]],
                  context=seen_by_row[row])
      observed.append(ObservedStep(step, [raw_item(dataset, i) for i in top_items_BxK[row]],
                                   int(ranks_B[row])))
  return summary, observed, steps


def test_split_lands_where_worked_by_hand():
  dataset = split()
  info = dataset.info
  assert info['train_quantile'] == pytest.approx(0.7)
  assert info['valid_quantile_of_rest'] == pytest.approx(2 / 3)
  assert info['num_raw_interactions'] == 54
  # The train quantile is the middle row of b's group; the cut is its time, and all three rows
  # are held out (36 training rows, not the 37 a cut by position would give).
  assert info['train_end_time'] == 50 and info['num_train'] == 36
  assert info['valid_end_time'] == 60
  assert info['num_valid'] == 9 and info['num_test'] == 6  # 11 and 7 before the drops
  assert info['num_dropped_cold_items'] == 3  # (e, 199), (f, 199), (l, 199)
  assert list(dataset.item_ids) == CATALOG  # 199 never trained: not in the catalog
  assert list(dataset.user_ids) == KEPT_USERS
  assert train_histories(dataset) == TRAIN_HISTORIES
  assert decode_events(dataset, dataset.valid) == VALID_EVENTS
  assert decode_events(dataset, dataset.test) == TEST_EVENTS


def test_ties_follow_the_source_order():
  # The same rows handed over in reverse: b's group now comes 109, 102, 105 and g's tie 108,
  # 110. Nothing else changes (every other user's rows have distinct times).
  dataset = split(RAW_INTERACTIONS[::-1])
  assert [item for user, item, _ in decode_events(dataset, dataset.valid) if user == 'b'] == [
      109, 102, 105]
  assert train_histories(dataset)['g'] == [102, 105, 108, 110]
  assert train_histories(dataset)['a'] == TRAIN_HISTORIES['a']
  assert dataset.info['train_end_time'] == 50 and dataset.info['num_train'] == 36


@pytest.mark.parametrize('part', ['valid', 'test'])
@pytest.mark.parametrize('batch_size', [1, 3, 8])
def test_steps_and_skips_worked_by_hand(part, batch_size):
  dataset = split()
  summary, observed, steps = evaluation_pass(dataset, part, batch_size)
  events = dataset.valid if part == 'valid' else dataset.test
  # The held-out interactions that survive the split are exactly the hand-worked entries.
  assert [(user, item) for user, item, _ in decode_events(dataset, events)] == [
      (entry.user, entry.target if isinstance(entry, Step) else entry.item)
      for entry in PROTOCOL[part]]
  skips = [entry for entry in PROTOCOL[part] if isinstance(entry, Skip)]
  assert (len(events), len(steps), len(skips)) == {'valid': (9, 8, 1), 'test': (6, 4, 2)}[part]
  assert len(events) - len(steps) == len(skips)
  assert [o.step for o in observed] == steps_of(part)
  assert summary['num_steps'] == len(steps_of(part))


def test_hand_worked_ranks_agree_with_the_independent_ranking():
  for part, ranks in HAND_RANKS.items():
    assert [independent_ranking(step)[1] for step in steps_of(part)] == ranks, part


@pytest.mark.parametrize('source', ['memory', 'prepared store'])
@pytest.mark.parametrize('part', ['valid', 'test'])
def test_fixed_ranker_metrics_match_an_independent_computation(part, source, tmp_path):
  dataset = split()
  if source == 'prepared store':  # what training reads: the saved split, memory-mapped
    store.save_split(dataset, str(tmp_path / 'prepared'))
    dataset = store.load_split(str(tmp_path / 'prepared'))
  summary, observed, _ = evaluation_pass(dataset, part, batch_size=3)
  # Step by step: the top-10 list and the rank (-1 outside the top 10).
  for seen, step in zip(observed, steps_of(part), strict=True):
    top, rank = independent_ranking(step)
    assert seen.top == top, step
    assert seen.rank == (rank if rank is not None and rank < TOP_K else -1), step
  expected = independent_metrics(steps_of(part))
  assert summary.keys() == expected.keys()
  for key, value in expected.items():
    assert summary[key] == pytest.approx(value, abs=1e-6), key


def test_evaluator_gives_the_independent_metrics():
  # The trainer's path: an Evaluator, whose second validation pass reuses kept batches.
  dataset = split()
  ranker = protocol.ranker_from_scores(fixed_ranker_scores, dataset.num_items, TOP_K)
  runner = evaluator.Evaluator(dataset, lambda params, batch: ranker(batch), maxlen=MAXLEN,
                               batch_size=4, top_k=TOP_K)
  for part in ('valid', 'valid', 'test'):
    summary = runner.evaluate(part, params=None)
    expected = independent_metrics(steps_of(part))
    for key, value in expected.items():
      assert summary[key] == pytest.approx(value, abs=1e-6), (part, key)
