"""Walking jaxprs in tests: what a traced program computes, before XLA sees it."""

from collections.abc import Iterator


def equations(jaxpr) -> Iterator:
  """Every equation of a jaxpr and of every jaxpr nested in it (scans, conds, custom VJPs)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, 'eqns') or hasattr(sub, 'jaxpr'):  # a Jaxpr or a ClosedJaxpr
          yield from equations(getattr(sub, 'jaxpr', sub))
