"""CPU time of a low rank + sparse linear (modules/sparse.py: y = B(A x) + S x, CSR product) against the
dense nn.Linear it replaces, on SmolLM2's projection shapes.

    python -m benchmarks.sparse_linear                         # 576→1536 and 1536→576, 2048 tokens
    python -m benchmarks.sparse_linear --tokens 512 --densities 0.1 0.25 0.5 --ranks 0 64

Prints a table: shape, rank, sparse density, median ms per forward, and the ratio to dense; saves it
as benchmarks/results/sparse_linear/sparse_linear.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import provenance, write_result  # noqa: E402
from rankfold.modules.sparse import LowRankSparseLinear, flat_sparse  # noqa: E402


def median_ms(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        module(x)  # warm-up (builds the CSR tensor once)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def sparse_module(weight: torch.Tensor, rank: int, density: float) -> LowRankSparseLinear:
    rows, cols = weight.shape
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    values, indices = flat_sparse(weight - (u[:, :rank] * s[:rank]) @ vh[:rank], int(density * weight.numel()))
    module = LowRankSparseLinear(cols, rows, rank, values.numel())
    with torch.no_grad():
        module.A.copy_(vh[:rank])
        module.B.copy_(u[:, :rank] * s[:rank])
        module.S_values.copy_(values)
        module.S_indices.copy_(indices)
    return module


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--ranks", type=int, nargs="+", default=[0, 128])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for rows_out, cols_in in ((1536, 576), (576, 1536)):
        dense = nn.Linear(cols_in, rows_out, bias=False)
        x = torch.randn(args.tokens, cols_in)
        dense_ms = median_ms(dense, x, args.repeats)
        rows.append({"shape": f"{cols_in}→{rows_out}", "rank": "dense", "density": 1.0, "ms": dense_ms, "ratio": 1.0})
        for rank in args.ranks:
            for density in args.densities:
                ms = median_ms(sparse_module(dense.weight.detach(), rank, density), x, args.repeats)
                rows.append({"shape": f"{cols_in}→{rows_out}", "rank": rank, "density": density, "ms": ms,
                             "ratio": ms / dense_ms})
    print(f"{'shape':<12}{'rank':>6}{'density':>9}{'ms':>10}{'× dense':>9}   ({args.tokens} tokens, float32, "
          f"{torch.get_num_threads()} threads)")
    for row in rows:
        print(f"{row['shape']:<12}{row['rank']!s:>6}{row['density']:>9.2f}{row['ms']:>10.2f}{row['ratio']:>9.2f}")
    result = {**provenance("sparse_linear", argv), "tokens": args.tokens, "dtype": "float32",
              "repeats": args.repeats, "rows": rows}
    print(f"written: {write_result('sparse_linear', result)}\nrerun: {result['command']}")
    return rows


if __name__ == "__main__":
    main()
