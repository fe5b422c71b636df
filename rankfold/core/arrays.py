"""Partial sums through an object store without copies.

Ray's object store hands NumPy arrays to a reader as read-only views of its shared memory, but
unpickles a torch tensor into a fresh copy (measured with Ray 2.60: reading a 400 MB float64 tensor
grew the reader's USS by 400 MB, the same array as NumPy by nothing). A shard's partial statistics
(4.1 GB a layer at Llama-3-70B's widths, packed) therefore travel as NumPy arrays and are read back
as tensors sharing their memory: the reducing shard holds its running sum, not a copy of every
partial. In one process the round trip shares memory too: nothing is copied either way.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

_NUMPY_DTYPES = {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.bool}


def shareable(value: Any) -> Any:
    """`value` with every CPU tensor of a NumPy dtype (in dicts, lists, tuples) as a NumPy array on the
    same memory; other values (bfloat16 tensors, GPU tensors, scalars) as they are."""
    if isinstance(value, torch.Tensor):
        return value.detach().numpy() if value.device.type == "cpu" and value.dtype in _NUMPY_DTYPES else value
    if isinstance(value, dict):
        return {key: shareable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(shareable(item) for item in value)
    return value


def as_tensor(value: Any) -> Any:
    """A NumPy array as a tensor on the same memory (read-only when it is a view of the object store:
    add into a copy, never into it); anything else as it is."""
    if not isinstance(value, np.ndarray):
        return value
    with warnings.catch_warnings():  # torch warns that the array is not writable; it is only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(value)
