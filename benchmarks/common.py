"""What every benchmark shares: where the repository and the offline data are, where results go, and
the record every saved result starts with (what ran, the command that reruns it, the machine, the
date, the commit), from which benchmarks/report.py renders the results page."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RANKFOLD_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"
PROVENANCE = ("benchmark", "command", "machine", "date", "commit")  # the keys provenance() gives

if str(REPO) not in sys.path:  # run as a file (python benchmarks/x.py) as well as a module (-m benchmarks.x)
    sys.path.insert(0, str(REPO))


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def machine() -> dict:
    """The machine a result was measured on. With torch loaded (most benchmarks) also its version,
    threads and GPU; the load average, because a shared machine's timings depend on it."""
    info = {"python": platform.python_version(), "machine": platform.machine(), "cpu": _cpu_name(),
            "cpus": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    info |= {name: os.environ[name] for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if name in os.environ}
    torch = sys.modules.get("torch")
    if torch is not None:
        info |= {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    return info


def describe(info: dict | str | None) -> str:
    """One line of a machine record (a string from before records were dicts is kept as it is)."""
    if not isinstance(info, dict):
        return str(info) if info else "not recorded"
    return ", ".join(f"{key} {' / '.join(map(str, v)) if isinstance(v, list) else v}" for key, v in info.items())


def git_commit(checkout: Path = REPO) -> str:
    """HEAD's short hash, marked when tracked files differ from it (untracked results do not count)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=checkout, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown (not a git checkout)"
    return head + (" + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


STARTED_FROM = git_commit()  # the code this process runs: a commit made during a long run does not count


def provenance(benchmark: str, argv: list[str] | None = None) -> dict:
    """The keys every result starts with; `argv` defaults to this process's arguments; the commit is the
    one the process started from."""
    args = sys.argv[1:] if argv is None else argv
    return {"benchmark": benchmark, "command": f"python -m benchmarks.{benchmark} {shlex.join(args)}".strip(),
            "machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": STARTED_FROM}


def write_result(name: str, result: dict, folder: Path | None = None, markdown: str | None = None) -> Path:
    """FOLDER/<name>.json (and .md), FOLDER defaulting to RESULTS/<benchmark>: the results page is
    rendered from RESULTS/*/*.json. `result` must start with provenance(...)."""
    missing = [key for key in PROVENANCE if key not in result]
    if missing:
        raise ValueError(f"result {name!r} lacks {missing}: build it as {{**provenance(...), ...}}")
    folder = Path(folder or RESULTS / result["benchmark"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False, default=str) + "\n")
    if markdown is not None:
        path.with_suffix(".md").write_text(markdown)
    return path


def publish(name: str, result: dict, markdown: str, folder: Path | None = None) -> Path:
    """write_result, then the markdown on stdout and where both files went on stderr."""
    path = write_result(name, result, folder=folder, markdown=markdown)
    print(markdown)
    print(f"written: {path.with_suffix('.md')}, {path}", file=sys.stderr)
    return path
