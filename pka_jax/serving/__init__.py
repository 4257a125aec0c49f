"""Serving a trained model: the serving files of a workdir, the `Recommender` (raw ids in,
top-k raw ids and scores out), the scorer exported with `jax.export`, and the requests a
command line or a file of histories makes.

  from pka_jax.serving import Recommender
  recommender = Recommender.from_workdir('runs/synthetic')
  recommender.recommend([12, 7, 33], k=5)
"""

from pka_jax.serving.recommender import Recommendations, Recommender

__all__ = ['Recommendations', 'Recommender']
