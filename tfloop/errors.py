"""Errors that end a run with one line: what the binary prints instead of a traceback.

Why a type of its own: a run that stops because of the user's input, a
non-finite value or a preemption has one sentence to say, and a Python
traceback buries it. `tfloop.train.main` catches `RunError`, prints its
message as one line on stderr and exits with `exit_code`; anything else is a
bug in tfloop and keeps its traceback.
"""

from __future__ import annotations


class RunError(Exception):
    """A run stopped for a reason its one-line message explains."""

    exit_code = 1


class InputError(RunError, ValueError):
    """A flag, file or environment variable the run cannot use."""


class NonFiniteError(RunError, FloatingPointError):
    """A loss, gradient or BN statistic became NaN or Inf."""


class Preempted(RunError):
    """SIGTERM arrived; a checkpoint was written at the next step boundary.

    Exits with 42, `PreemptionCheckpointHandler`'s restart code, so that a
    cluster manager (or a shell loop) can tell it from a failure and restart.
    """

    exit_code = 42
