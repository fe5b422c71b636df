"""rankfold: training-free low-rank compression of large language models.

    rankfold run jobs/smollm2-svdllm-20.yaml      # compress + evaluate
    model = rankfold.load("runs/smollm2-svdllm-20/model")
"""

import os

# On a shared machine, OpenMP threads that spin in their barriers while a neighbour holds a core make
# small factorisations 10× slower (measured: a 576×1536 float64 SVD took 4.01 s instead of 0.33 s
# with two busy neighbours). PASSIVE lets idle threads sleep. It must be set before torch loads its
# OpenMP runtime, hence here; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from rankfold.checkpoint import load  # noqa: E402
from rankfold.core.version import __version__  # noqa: E402

__all__ = ["load", "__version__"]
