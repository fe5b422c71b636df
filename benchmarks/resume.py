"""Resume benchmark: the time from `rankfold run SPEC` of a job whose every stage is complete to its
report — the cost of deciding that nothing needs to run (0.2 re-hashed every artifact, on S3 after
downloading it; 0.3 compares recorded checksums and version tokens). Each run is a fresh process,
so it includes interpreter start and imports (measured apart as `rankfold --help`).

    python -m benchmarks.resume runs/smollm2-svdllm-20/job.yaml            # the job must have run once
    rankfold run benchmarks/specs/resume-small.yaml && python -m benchmarks.resume benchmarks/specs/resume-small.yaml
    PYTHONPATH=/path/to/old/checkout python -m benchmarks.resume SPEC      # the same with other code
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, git_commit, provenance, write_result


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", type=Path, help="a job spec whose job has completed (its output.dir exists)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default=None, help="result file name (default: the spec's stem)")
    args = parser.parse_args(argv)
    from rankfold.core.strict_yaml import load_yaml

    spec = load_yaml(args.spec.read_text())
    out = Path(spec["output"]["dir"])
    cli = [sys.executable, "-c", "import sys; from rankfold.cli import main; sys.exit(main())"]
    startup = min(timed(cli + ["--help"]) for _ in range(args.repeats))
    runs = [timed(cli + ["run", str(args.spec)]) for _ in range(args.repeats)]
    report = json.loads((out / "report.json").read_text())
    result = {**provenance("resume", argv), "spec": str(args.spec), "code": os.environ.get("PYTHONPATH") or str(REPO),
              "store": report["artifacts"]["store"], "store_bytes": folder_bytes(out / "artifacts")
              if (out / "artifacts").is_dir() else None, "reused_stages": len(report["reused_stages"]),
              "stages": len(report["artifacts"]["digests"]), "startup_s": round(startup, 2),
              "resume_s": [round(s, 2) for s in runs], "resume_minus_startup_s": round(min(runs) - startup, 2)}
    if "PYTHONPATH" in os.environ:  # the code timed is that checkout's, not this one's
        result["commit"] = git_commit(Path(result["code"].split(os.pathsep)[0]))
        result["command"] = f"PYTHONPATH={result['code']} {result['command']}"
    if result["reused_stages"] != result["stages"]:
        print(f"warning: {result['stages'] - result['reused_stages']} stages ran: the job was not complete")
    print(json.dumps(result, indent=1))
    write_result(args.name or args.spec.stem, result)
    print(f"rerun: {result['command']}")
    return result


if __name__ == "__main__":
    main()
