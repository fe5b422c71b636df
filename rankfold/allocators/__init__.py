"""Rank allocators: how the parameter budget is split over the compressed matrices. Importing the
package imports every file, which registers its allocator."""

from rankfold.core.registry import import_all

import_all(__name__, __path__)
