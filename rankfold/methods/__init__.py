"""Compression methods, one file each; importing the package imports every file, which registers its method."""

from rankfold.core.registry import import_all

import_all(__name__, __path__)
