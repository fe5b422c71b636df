"""Compressed modules as drop-in torch modules; each file registers its kind (modules/layout.py), and
importing the package imports them all so a layout can name any kind."""

from rankfold.core.registry import import_all

import_all(__name__, __path__)
