"""Faults a run survives or reports: preemption, non-finite losses, and test kill points."""

from __future__ import annotations

import collections
import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

# The exit status after a preemption save: a shell's status for a process ended by SIGTERM,
# so that schedulers and retry loops restart the run.
PREEMPTED_EXIT_STATUS = 128 + signal.SIGTERM


class Preempted(Exception):
  """The run saved its state and stopped for a preemption; the same command resumes it."""


class PreemptionSyncError(RuntimeError):
  """The hosts could not ask each other whether a preemption notice has come."""


class NonFiniteLoss(FloatingPointError):
  """A training step's loss or gradient was not finite; its update was not applied."""


class PreemptionWatch:
  """Whether to save and stop at a step boundary.

  One process: SIGTERM sets a flag (the handler is installed while the watch is entered).
  Several processes: JAX's preemption sync point, reached by every host at the same step
  (Cloud TPU maintenance notices and SIGTERM reach it through the distributed runtime).
  """

  def __init__(self):
    self.signalled = False
    self._previous = None

  def __enter__(self) -> PreemptionWatch:
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self.signalled = True

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.signalled
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError as error:
      # Without the sync, a notice that reached one host would be lost: an error, not a
      # silent "no preemption".
      raise PreemptionSyncError(
          f'the hosts could not agree on a preemption at step {step} (jax.distributed\'s '
          f'preemption service): {str(error).splitlines()[0] if str(error) else error!r}'
      ) from error


# Fault points for the crash tests: PKA_JAX_DIE_AT='save:2' SIGKILLs the process the second time
# it reaches `die_here('save')`, and PKA_JAX_TERM_AT='step:10' sends it SIGTERM (a preemption
# notice) the tenth time it reaches `die_here('step')` (points: 'step', 'save', 'eval_batch').
_DIE_AT = 'PKA_JAX_DIE_AT'
_TERM_AT = 'PKA_JAX_TERM_AT'
_reached = collections.Counter()


def die_here(point: str) -> None:
  wanted = {variable: os.environ.get(variable) for variable in (_DIE_AT, _TERM_AT)}
  if not any(wanted.values()):
    return
  _reached[point] += 1
  for variable, signum in ((_DIE_AT, signal.SIGKILL), (_TERM_AT, signal.SIGTERM)):
    name, _, count = (wanted[variable] or '').partition(':')
    if name == point and _reached[point] == int(count or 1):
      signal.raise_signal(signum)  # its Python handler has run when this returns
