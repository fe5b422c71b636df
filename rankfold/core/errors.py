"""Errors every layer may raise. Each rankfold error derives from RankfoldError, whose `exit_code` and
`label` are what `rankfold` exits with and prints; it also derives from the builtin error it refines
(ValueError, RuntimeError, ...), so callers may catch either."""

from __future__ import annotations

EXIT_BAD_INPUT = 2  # the spec, model, data, budget, storage or cluster is wrong: nothing ran that matters
EXIT_FAILED = 1     # the work itself failed (a decomposition, the numerics, a plan wired wrongly)


class RankfoldError(Exception):
    """Base of every error rankfold reports; the message names what is wrong and where."""

    exit_code: int = EXIT_FAILED
    label: str = "error"


class BadInput(RankfoldError):
    """Input that cannot run: the CLI exits with EXIT_BAD_INPUT."""

    exit_code = EXIT_BAD_INPUT


class NumericalError(RankfoldError, FloatingPointError):
    """A non-finite activation, loss or statistic: names where (layer, group) and the dtype, and what to try."""

    label = "numerical failure"


class DecompositionError(RankfoldError, ValueError):
    """A decomposition that would give an inaccurate model: names the module and the quantity."""

    label = "decomposition failed"
