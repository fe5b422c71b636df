"""One file per model family, each registering its Architecture; importing the package imports them all."""

from rankfold.core.registry import import_all

import_all(__name__, __path__)
