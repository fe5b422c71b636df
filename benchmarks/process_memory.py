"""What the scale benchmarks share: Σ RSS / PSS sampling of a process tree, a synthetic Llama's shapes
and weights, and their result files."""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# libgomp's threads spin while they wait; on a small machine shared with other work that makes
# MKL's SVD ~60× slower with 2 threads (1024² fp64: 24 s instead of 0.4 s, measured here while
# another job ran). Passive waiting costs nothing when the machine is idle. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import psutil  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file
from benchmarks.common import describe  # noqa: E402

GB = 1e9


def _pss(pid: int) -> int | None:
    """PSS of one process in bytes, from /proc/PID/smaps_rollup. PSS divides every shared page among
    the processes mapping it (shared libraries, Ray's object store, mmapped safetensors), so PSS sums
    count each page once; RSS sums count it once per process. The kernel walks the page tables to
    answer: ~15 ms per GB resident, hence read less often than RSS (from statm, O(1))."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:  # gone, or a zombie
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) << 10
    return None


def _label(proc: psutil.Process) -> str:
    """'PID command': the first words of the command line, paths shortened to their last part."""
    try:
        words = " ".join(proc.cmdline()).split()[:3]
    except psutil.Error:
        words = []
    return " ".join([str(proc.pid)] + [Path(w).name if w.startswith("/") else w for w in words])[:60]


@dataclass
class Sample:
    t: float           # time.time(): comparable with a job report's stage started_at
    procs: int
    rss: int
    pss: int | None    # None: not read at this tick


class TreeSampler(threading.Thread):
    """Every `interval_s`, sums RSS over process `root` and all its descendants; PSS every
    `pss_every`-th tick. `cpu_s` is what the sampling itself cost (it competes with the job).

    Why the process tree and not "the user's processes started after the benchmark": an embedded
    `ray.init()` starts gcs_server, raylet, the dashboard agent, log and autoscaler monitors as
    children of the job's process, and raylet starts every worker, so the tree is exactly the job.
    Everything here runs as one user, and other sessions' tests run beside it: a user filter would
    count them. A process seen once stays counted while it lives, should it be re-parented to init."""

    def __init__(self, root: int, interval_s: float = 0.2, pss_every: int = 5):
        super().__init__(daemon=True)
        self.root, self.interval_s, self.pss_every = root, interval_s, pss_every
        self.samples: list[Sample] = []
        self.top: dict[str, tuple[int, list]] = {"rss": (0, []), "pss": (0, [])}  # peak sum, per process
        self.cpu_s = 0.0
        self._seen: dict[int, psutil.Process] = {}
        self._stop_event = threading.Event()

    def sample(self, with_pss: bool = True) -> Sample:
        try:
            root = psutil.Process(self.root)
            for proc in [root, *root.children(recursive=True)]:
                self._seen.setdefault(proc.pid, proc)
        except psutil.NoSuchProcess:
            pass
        each = []  # (process, RSS, PSS or 0)
        for pid, proc in list(self._seen.items()):
            try:
                if not proc.is_running():  # exited (is_running also rejects a recycled pid)
                    raise psutil.NoSuchProcess(pid)
                each.append((proc, proc.memory_info().rss, (_pss(pid) or 0) if with_pss else 0))
            except psutil.Error:
                del self._seen[pid]
        rss, pss = sum(e[1] for e in each), sum(e[2] for e in each)
        sample = Sample(time.time(), len(each), rss, pss if with_pss else None)
        for key, total, index in (("rss", rss, 1), ("pss", pss, 2)):
            if total > self.top[key][0]:  # a new peak: keep who held what
                self.top[key] = (total, sorted(((_label(e[0]), e[index]) for e in each), key=lambda x: -x[1]))
        self.samples.append(sample)
        return sample

    def run(self) -> None:
        tick = 0
        while not self._stop_event.is_set():
            start = time.thread_time()
            self.sample(with_pss=tick % self.pss_every == 0)
            self.cpu_s += time.thread_time() - start
            tick += 1
            self._stop_event.wait(self.interval_s)

    def finish(self) -> list[Sample]:
        self._stop_event.set()
        self.join()
        return self.samples

    def alive(self) -> list[psutil.Process]:
        return [proc for proc in self._seen.values() if proc.is_running()]

    def peak(self, start: float = -math.inf, stop: float = math.inf) -> dict:
        """Peak sums between two times; a window without samples gets the last sample before it."""
        peaks = {}
        for key in ("rss", "pss"):
            before = [s for s in self.samples if s.t <= stop and getattr(s, key) is not None]
            window = [s for s in before if s.t >= start] or before[-1:]
            peaks[key] = max((getattr(s, key) for s in window), default=0)
            if key == "rss":
                peaks["procs"] = max((s.procs for s in window), default=0)
        return peaks


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


@dataclass(frozen=True)
class SyntheticLlama:
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    dtype: str            # storage dtype of the safetensors shards
    layers_per_shard: int
    seed: int = 0

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.ffn,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.kv_heads, max_position_embeddings=4096,
                           tie_word_embeddings=False, rms_norm_eps=1e-5, dtype=self.dtype)

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        head_dim = self.hidden // self.heads
        q, kv = self.heads * head_dim, self.kv_heads * head_dim
        return {"input_layernorm.weight": (self.hidden,), "post_attention_layernorm.weight": (self.hidden,),
                "self_attn.q_proj.weight": (q, self.hidden), "self_attn.k_proj.weight": (kv, self.hidden),
                "self_attn.v_proj.weight": (kv, self.hidden), "self_attn.o_proj.weight": (self.hidden, q),
                "mlp.gate_proj.weight": (self.ffn, self.hidden), "mlp.up_proj.weight": (self.ffn, self.hidden),
                "mlp.down_proj.weight": (self.hidden, self.ffn)}


def _random(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)  # RMSNorm weights start at 1
    return torch.empty(shape).normal_(0.0, 0.02, generator=generator).to(dtype)  # HF's initializer_range


def add_run_arguments(parser: argparse.ArgumentParser, out: Path) -> None:
    """The arguments both memory benchmarks take: work folder, result folder, sampling, target ratio."""
    parser.add_argument("--work", type=Path, default=Path("/tmp/rankfold-scale"), help="checkpoints, runs, scratch")
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--interval", type=float, default=0.2, help="memory sampling period, seconds")
    parser.add_argument("--pss-every", type=int, default=5, help="read PSS every this many samples (it costs "
                        "~15 ms of CPU per GB resident)")
    parser.add_argument("--ratio", type=float, default=0.2)


def provenance_lines(r: dict) -> list[str]:
    """The markdown footer of a memory result: code, machine, and the command that reruns it."""
    return [f"Code {r['commit']}; {describe(r['machine'])} (load average at the end).", f"Rerun: `{r['command']}`", ""]
