"""The datasets pka_jax can prepare: where each raw file comes from, how to read it, how to filter.

Adding a dataset is one `Dataset` entry here and, for a new raw format, one reader in
`readers.py`. Raw files live in `<data_dir>/<name>/`; the prepared store goes beside them.

What the authors did (`anonymcode/IJCAI2026`, read for facts only):
* `processor.py` (`prepare_data_exclude`, called by `experiment_utils.train_and_eval`) reads a
  `userid,itemid,timestamp` CSV per dataset and applies no rating threshold, no k-core filter
  and no deduplication of its own: the filtering, if any, happened when each CSV was made.
* ML-1M: every rating, unfiltered (`utils.ml_downloader` keeps `userid, movieid, timestamp`;
  the split sizes noted in `experiment_utils.train_and_eval`, 920208 + 49966 + 29988, are all
  but 47 cold-item interactions of the 1,000,209 ratings).
* Amazon Beauty: the ready-made 5-core reviews file (`defaults.use_cached_pcore = True`,
  `utils.amz_downloader` with `reviewerID, asin, unixReviewTime`); every review counts, the
  rating is dropped (`preprocess_data.ipynb`).
* Yambda: the 50M `listens.parquet` flattened to `uid, item_id, timestamp` with every event
  kept: no `is_organic` and no `played_ratio_pct` filter (`preprocess_data.ipynb`). Likes are
  taken the same way.
* Yelp, Gowalla, Zvuk: the preprocessing is not in the repository. The split sizes noted in
  `experiment_utils.train_and_eval` total about 2.29M interactions for Yelp and 2.63M for
  Gowalla, fewer than the raw files hold, so the authors filtered them somehow; the defaults
  below are the field's standard 5-core and are marked as our choice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pka_jax.data.errors import DataError
from pka_jax.data.interactions import Interactions


@dataclasses.dataclass(frozen=True)
class RawFile:
  """One raw file: its name under `<data_dir>/<dataset>/` and where to get it."""

  name: str  # where the file is placed (and downloaded to)
  urls: tuple[str, ...] = ()  # mirrors tried in order; empty when there is no direct download
  sha256: str | None = None  # checked after a download when known
  other_names: tuple[str, ...] = ()  # names the same file also ships under
  how_to_get: str = ''  # for files without a URL: where the user obtains them

  @property
  def names(self) -> tuple[str, ...]:
    return (self.name, *self.other_names)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A registry entry: raw file, reader and preprocessing defaults."""

  name: str
  title: str
  raw: RawFile
  reader: str  # a function of readers.py: reader(path, **reader_options[, min_rating=...])
  reader_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  interaction: str = 'every rating'  # what counts as an interaction, in words
  min_rating: float | None = None  # keep ratings >= this; None keeps all (readers with ratings)
  min_user_interactions: int = 1  # k-core: users with fewer interactions are dropped ...
  min_item_interactions: int = 1  # ... and items, repeated until both hold
  licence: str = ''

  def read(self, path: str, **options) -> Interactions:
    """The raw file at `path`, read by this entry's reader."""
    # Imported here, not above: pyarrow takes a fifth of a second to import, and every
    # command imports this registry while only preparing a dataset reads a raw file.
    from pka_jax.data import readers  # pylint: disable=g-import-not-at-top
    return getattr(readers, self.reader)(path, **options)

  def settings(self) -> dict:
    """The preprocessing settings that define the prepared data (JSON-serialisable)."""
    return {
        'reader': f'pka_jax.data.readers.{self.reader}',
        'reader_options': dict(self.reader_options),
        'min_rating': self.min_rating,
        'min_user_interactions': self.min_user_interactions,
        'min_item_interactions': self.min_item_interactions,
    }


_GROUPLENS = 'https://files.grouplens.org/datasets/movielens/'
_SNAP_AMAZON = 'http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/'
_YAMBDA = 'https://huggingface.co/datasets/yandex/yambda/resolve/main/flat/50m/'
_GROUPLENS_LICENCE = 'GroupLens research licence: no redistribution'

# Checksums are left None: no published sha256 was available to check them against.
DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset(
        name='ml1m', title='MovieLens-1M',
        raw=RawFile('ml-1m.zip', urls=(_GROUPLENS + 'ml-1m.zip',)),
        reader='read_grouplens',
        reader_options={'member': 'ml-1m/ratings.dat', 'layout': 'dat'},
        interaction='every rating (authors: no threshold, no k-core)',
        licence=_GROUPLENS_LICENCE),
    Dataset(
        name='ml100k', title='MovieLens-100K',
        raw=RawFile('ml-100k.zip', urls=(_GROUPLENS + 'ml-100k.zip',)),
        reader='read_grouplens',
        reader_options={'member': 'ml-100k/u.data', 'layout': 'tsv'},
        interaction='every rating (as for ML-1M)',
        licence=_GROUPLENS_LICENCE),
    Dataset(
        name='ml20m', title='MovieLens-20M',
        raw=RawFile('ml-20m.zip', urls=(_GROUPLENS + 'ml-20m.zip',)),
        reader='read_grouplens',
        reader_options={'member': 'ml-20m/ratings.csv', 'layout': 'csv'},
        interaction='every rating (as for ML-1M)',
        licence=_GROUPLENS_LICENCE),
    Dataset(
        name='beauty', title='Amazon Beauty (2014, 5-core)',
        raw=RawFile('reviews_Beauty_5.json.gz',
                    urls=(_SNAP_AMAZON + 'reviews_Beauty_5.json.gz',)),
        reader='read_amazon_reviews',
        interaction='every review of the 5-core file as shipped, any rating (authors)',
        licence='Amazon review data (McAuley et al.): research use, no redistribution'),
    Dataset(
        name='beauty_ratings', title='Amazon Beauty (2014 ratings CSV, made 5-core)',
        raw=RawFile('ratings_Beauty.csv', urls=(_SNAP_AMAZON + 'ratings_Beauty.csv',)),
        reader='read_amazon_ratings',
        interaction='every rating, then 5-core (the standard that made the 5-core file)',
        min_user_interactions=5, min_item_interactions=5,
        licence='Amazon review data (McAuley et al.): research use, no redistribution'),
    Dataset(
        name='yelp', title='Yelp (academic dataset reviews)',
        raw=RawFile(
            'yelp_academic_dataset_review.json', other_names=('review.json',),
            how_to_get=('Yelp licenses the academic dataset only after a sign-up at '
                        'https://www.yelp.com/dataset; extract the review file from the '
                        'archive')),
        reader='read_yelp_reviews',
        interaction='every review, any rating; 5-core (our choice: not in the authors\' code)',
        min_user_interactions=5, min_item_interactions=5,
        licence='Yelp dataset terms: no redistribution'),
    Dataset(
        name='gowalla', title='Gowalla (SNAP check-ins)',
        raw=RawFile('loc-gowalla_totalCheckins.txt.gz',
                    urls=('https://snap.stanford.edu/data/loc-gowalla_totalCheckins.txt.gz',)),
        reader='read_snap_checkins',
        interaction='every check-in; 5-core (our choice: not in the authors\' code)',
        min_user_interactions=5, min_item_interactions=5,
        licence='SNAP: free for research'),
    Dataset(
        name='zvuk', title='Zvuk',
        raw=RawFile(
            'zvuk-interactions.parquet',
            how_to_get=('get zvuk-interactions.parquet from the Zvuk dataset release '
                        '(Sber/Zvuk music listening data); its licence forbids mirroring')),
        reader='read_zvuk',
        reader_options={'min_play_duration': None},
        interaction='every play, any duration; 5-core (our choice: not in the authors\' code)',
        min_user_interactions=5, min_item_interactions=5,
        licence='Zvuk dataset licence: no redistribution'),
    Dataset(
        name='yambda_likes', title='Yambda-50M likes',
        raw=RawFile('likes.parquet', urls=(_YAMBDA + 'likes.parquet',)),
        reader='read_yambda',
        reader_options={'organic_only': False, 'min_played_ratio_pct': None},
        interaction='every like, organic or recommended (authors, as for listens)',
        licence='Apache-2.0'),
    Dataset(
        name='yambda_listens', title='Yambda-50M listens',
        raw=RawFile('listens.parquet', urls=(_YAMBDA + 'listens.parquet',)),
        reader='read_yambda',
        reader_options={'organic_only': False, 'min_played_ratio_pct': None},
        interaction='every listen, any played ratio, organic or recommended (authors)',
        licence='Apache-2.0'),
)}


def get(name: str) -> Dataset:
  """The entry named `name`; a `DataError` listing the known names otherwise."""
  try:
    return DATASETS[name]
  except KeyError:
    raise DataError(
        f'Unknown dataset {name!r}; expected one of: {", ".join(sorted(DATASETS))} '
        '(or synthetic)') from None
