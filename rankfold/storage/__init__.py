"""Artifact stores (a local folder or S3) and checkpoints read straight from a store. Importing the
package registers the "store:" model-source scheme, so any worker can open a stored checkpoint."""

from rankfold.storage import stored_model  # noqa: F401  (registers the "store:" scheme)
