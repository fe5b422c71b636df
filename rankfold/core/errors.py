"""Errors every layer may raise."""

from __future__ import annotations


class NumericalError(FloatingPointError):
    """A non-finite activation, loss or statistic: names where (layer, group) and the dtype, and what to try."""
