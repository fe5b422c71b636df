"""rankfold: training-free low-rank compression of large language models.

    rankfold run jobs/smollm2-svdllm-20.yaml      # compress + evaluate
    model = rankfold.load("runs/smollm2-svdllm-20/model")
"""

from rankfold.checkpoint import load

__all__ = ["load"]
__version__ = "0.1.0"
