"""The bottom layer: hashing, atomic file writes, option models, registries, the package version.

Imports nothing else of rankfold, so every other layer may import it.
"""
