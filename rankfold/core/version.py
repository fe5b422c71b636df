"""rankfold's version: part of every artifact digest, so a new release never reuses old results."""

__version__ = "0.3.0"
