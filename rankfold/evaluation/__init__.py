"""Evaluators, one file each behind one interface (registry.py); importing the package imports every
file, which registers its evaluator."""

from rankfold.core.registry import import_all

import_all(__name__, __path__)
