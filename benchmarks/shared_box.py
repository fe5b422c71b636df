"""Shared-box benchmark: the SVD-LLM job's decompose stage (SmolLM2-135M, 20 %, 210 factorisations in
120 tasks) quiet and beside busy neighbours (processes spinning on a core each), with the in-process
executor's threads chosen by each task's size (rankfold's policy, execution/local.py) and with every
task in turn on every thread (the policy before it). Many small multi-threaded LAPACK calls wait at
barriers for threads a neighbour has descheduled; single-threaded tasks side by side do not.

    python -m benchmarks.shared_box                          # ≈ 5 min on 2 cores
    python -m benchmarks.shared_box --busy 2 --repeats 2 --calib-samples 16

Each run is a fresh job (its own store), so decompose always computes; calibration is kept short
(decompose does not depend on the sample count: the Grams have the same size). Prints the decompose
wall time per (policy, load) and the loaded / quiet ratios; saves results/shared_box/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import DATA, provenance, write_result

BUSY_LOOP = "while True: pass"


def job(out: Path, calib_samples: int) -> dict:
    return {"model": {"source": "smollm2-135m", "dtype": "float32"}, "method": {"name": "svd_llm"},
            "target": {"ratio": 0.2},
            "calibration": {"data": {"path": str(DATA / "calibration" / "enwiki_excerpt.txt")},
                            "num_samples": calib_samples, "seq_len": 512, "seed": 0},
            "evaluation": {}, "output": {"dir": str(out)}}


def sequential_executor():
    """The policy before: every task in turn, each on every thread (the `work` sizes ignored)."""
    from rankfold.execution.local import LocalExecutor

    class Sequential(LocalExecutor):
        def map(self, fn, items, stage, work=None):
            return super().map(fn, items, stage)

    return Sequential()


def decompose_seconds(policy: str, calib_samples: int, scratch: Path) -> float:
    from rankfold.execution.local import LocalExecutor
    from rankfold.jobs.spec import parse_spec
    from rankfold.orchestrator.job import run_job

    out = Path(tempfile.mkdtemp(dir=scratch))
    executor = LocalExecutor() if policy == "by_size" else sequential_executor()
    report = run_job(parse_spec(job(out, calib_samples)), executor=executor)
    return next(row["wall_s"] for row in report["stages"] if row["stage"] == "decompose")


def with_neighbours(count: int, measure):
    """measure() while `count` processes spin on a core each."""
    busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]
    try:
        time.sleep(1.0)  # let them take their cores
        return measure()
    finally:
        for process in busy:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", type=int, default=2, help="busy-loop neighbours in the loaded runs")
    parser.add_argument("--repeats", type=int, default=1, help="runs per (policy, load); the minimum is kept")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--name", default="smollm2-svdllm-20")
    args = parser.parse_args(argv)
    import torch

    seconds: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="rankfold-shared-box-") as scratch:
        decompose_seconds("by_size", 4, Path(scratch))  # warm: GGUF conversion cache, imports
        for policy in ("by_size", "sequential"):
            quiet = [decompose_seconds(policy, args.calib_samples, Path(scratch)) for _ in range(args.repeats)]
            loaded = [with_neighbours(args.busy, lambda: decompose_seconds(policy, args.calib_samples,  # noqa: B023
                                                                           Path(scratch)))
                      for _ in range(args.repeats)]
            seconds[policy] = {"quiet_s": quiet, "loaded_s": loaded}
    summary = {policy: {"quiet_s": min(v["quiet_s"]), "loaded_s": min(v["loaded_s"]),
                        "loaded_over_quiet": round(min(v["loaded_s"]) / min(v["quiet_s"]), 2)}
               for policy, v in seconds.items()}
    result = {**provenance("shared_box", argv), "busy_neighbours": args.busy, "torch_threads": torch.get_num_threads(),
              "calibration_samples": args.calib_samples, "runs": seconds, "decompose": summary,
              "by_size_quiet_over_sequential_quiet": round(summary["by_size"]["quiet_s"] /
                                                           summary["sequential"]["quiet_s"], 2)}
    path = write_result(args.name, result)
    print(json.dumps(result, indent=1))
    print(f"saved {path}")
    return result


if __name__ == "__main__":
    main()
