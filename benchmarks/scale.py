"""Scale benchmark: memory of a whole job on Ray against checkpoint size, and the cost of one
Llama-3-70B-shaped layer with a model of 80 layers on N GPU workers.

checkpoint — a synthetic Llama (random weights, default 24 layers of hidden 1536 / ffn 4096, GQA 12/4
  heads, float32 storage: 3.0 GB in 6 safetensors shards, SmolLM2's tokenizer) compressed by
  `rankfold run SPEC` with `execution: {executor: ray, workers: 2}` (SVD-LLM, 20 %) in a child
  process. Every 0.2 s the RSS (every 1 s the PSS) of that process and all its descendants are
  summed; the peak sums are divided by the checkpoint's size on disk (goal: ≤ 0.2). An idle
  baseline — the job's imports, embedded Ray and its two shard actors, no data — shows what is
  Ray/torch overhead rather than data; the processes holding memory at the peak are listed.
layer — one decoder layer of Llama-3-70B shape (hidden 8192, ffn 28672, 64 heads, 8 KV heads; bf16
  weights, std 0.02) built with the job's own code: its calibration (`propagate_layer`, per-group
  InputStats) over `--tokens` random hidden states, then per input group the whitening factor and,
  once per distinct matrix shape, SVD-LLM at the 20 % rank (W·S GEMM, SVD and triangular solve timed
  apart). From these, a model of the time for 80 layers on N GPU workers.

    python benchmarks/scale.py checkpoint           # ~10-15 min on 2 cores; the checkpoint is cached in --work
    python benchmarks/scale.py layer                # ~30 min on 2 cores; peak RSS ~18 GB
    python benchmarks/scale.py layer --scale 4      # smoke run: hidden 2048, ffn 7168 (~1 min)
    python benchmarks/scale.py checkpoint --layers 2 --hidden 64 --ffn 160 --heads 4 --kv-heads 2 \
        --samples 4 --seq-len 64 --window 64 --executor local --skip-baseline   # tiny, seconds
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

# libgomp's threads spin while they wait; on a small machine shared with other work that makes
# MKL's SVD ~60× slower with 2 threads (1024² fp64: 24 s instead of 0.4 s, measured here while
# another job ran). Passive waiting costs nothing when the machine is idle. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import psutil  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rankfold.evaluation.report import metric_table  # noqa: E402
from rankfold.methods.structure import rank_for_ratio  # noqa: E402
from rankfold.methods.svd import split_singular  # noqa: E402
from rankfold.methods.svd_llm import svd_llm_factors  # noqa: E402
from rankfold.methods.whitening import apply_inverse_right, whitening_factor  # noqa: E402
from rankfold.workers.activations import Activations  # noqa: E402
from rankfold.workers.layer_statistics import InputStats, propagate_layer  # noqa: E402

DATA = REPO.parent / "shared" / "data"
GB = 1e9

# ---------------------------------------------------------------- memory sampling


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
    t: float           # time.monotonic()
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
        sample = Sample(time.monotonic(), len(each), rss, pss if with_pss else None)
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


def git_state() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if git("status", "--porcelain") else "")


# ---------------------------------------------------------------- part 1: synthetic checkpoint on Ray


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


def generate_checkpoint(folder: Path, model: SyntheticLlama, tokenizer) -> int:
    """A Hugging Face folder: config, tokenizer, `model-0000k-of-0000N.safetensors` shards and
    `model.safetensors.index.json`. Written shard by shard (one shard's tensors in memory at a time).
    Cached: a folder whose `.complete` matches `model` is reused. Returns the bytes of the shards."""
    from safetensors.torch import save_file

    marker = folder / ".complete"
    if marker.is_file() and json.loads(marker.read_text()) == asdict(model):
        return sum(p.stat().st_size for p in folder.glob("model-*.safetensors"))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    dtype, generator = getattr(torch, model.dtype), torch.Generator().manual_seed(model.seed)
    per_shard = model.layers_per_shard
    groups = [range(i, min(i + per_shard, model.layers)) for i in range(0, model.layers, per_shard)]
    weight_map, total = {}, 0
    for k, layers in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        if k == 0:
            tensors["model.embed_tokens.weight"] = _random((model.vocab, model.hidden), generator, dtype)
        for i in layers:
            for key, shape in model.layer_shapes().items():
                tensors[f"model.layers.{i}.{key}"] = _random(shape, generator, dtype)
        if k == len(groups) - 1:
            tensors["model.norm.weight"] = _random((model.hidden,), generator, dtype)
            tensors["lm_head.weight"] = _random((model.vocab, model.hidden), generator, dtype)
        save_file(tensors, folder / name)
        weight_map.update({key: name for key in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        print(f"  wrote {name} ({_gb((folder / name).stat().st_size)})", file=sys.stderr)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    model.config().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker.write_text(json.dumps(asdict(model)))
    return sum(p.stat().st_size for p in folder.glob("model-*.safetensors"))


def job_spec(args: argparse.Namespace, model_dir: Path, out: Path) -> dict:
    return {
        "model": {"source": str(model_dir), "dtype": args.dtype},
        "method": {"name": "svd_llm"},
        "target": {"ratio": args.ratio},
        "calibration": {"data": {"path": str(args.calib_data)}, "num_samples": args.samples,
                        "seq_len": args.seq_len, "batch_size": args.batch_size},
        "evaluation": {"perplexity": [{"name": "wikitext2",
                                       "data": {"path": str(args.eval_data), "lines_as_rows": True},
                                       "window": args.window, "max_tokens": args.windows * args.window}]},
        "output": {"dir": str(out)},
        "execution": {"executor": args.executor, "workers": args.workers, "cpus_per_worker": 1},
    }


# The job's process with its executor and shard actors up, holding no data: what Ray + torch cost.
_BASELINE_SCRIPT = """
import sys
from rankfold.jobs.spec import load_spec
from rankfold.orchestrator.job import make_executor
from rankfold.workers.shard import SequenceShard
spec = load_spec(sys.argv[1])
executor = make_executor(spec, None)
shards = executor.actors(SequenceShard, [(str(spec.model.source), spec.model.dtype, 1 << 20)] * spec.execution.workers)
executor.call_all(shards, "pid")
print("ready", flush=True)
sys.stdin.read()
executor.release(shards)
executor.close()
"""

_PROGRESS = re.compile(r"^\((\d+)/(\d+)\) (.+?)  elapsed")


def idle_baseline(spec_path: Path, env: dict, seconds: float, interval_s: float, log_path: Path) -> dict:
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-c", _BASELINE_SCRIPT, str(spec_path)], env=env, cwd=REPO,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
    sampler = TreeSampler(process.pid, interval_s, pss_every=1)  # idle: PSS at every tick is affordable
    try:
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"idle baseline did not start (exit code {process.wait()})")
        time.sleep(2.0)  # let the workers settle after their imports
        sampler.start()
        time.sleep(seconds)
    finally:
        if sampler.is_alive():
            sampler.finish()
        process.stdin.close()
        process.wait(timeout=120)
    return {"rss": statistics.median(s.rss for s in sampler.samples),
            "pss": statistics.median(s.pss for s in sampler.samples if s.pss is not None),
            "procs": max(s.procs for s in sampler.samples), "seconds": seconds}


def run_measured(command: list[str], env: dict, log_path: Path, interval_s: float,
                 pss_every: int) -> tuple[int, TreeSampler, list]:
    """Run `command`, sampling its process tree; its stderr goes to `log_path`, and progress lines
    ('(i/N) stage  elapsed ...') are kept with their arrival time. Returns (exit code, sampler, lines)."""
    started = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.PIPE, text=True)
        sampler = TreeSampler(process.pid, interval_s, pss_every)
        sampler.start()
        lines = [(started, "start", 0, 0)]
        for line in process.stderr:
            log.write(line)
            log.flush()
            match = _PROGRESS.match(line)
            if match:
                lines.append((time.monotonic(), match.group(3), int(match.group(1)), int(match.group(2))))
                if match.group(1) == match.group(2):
                    print(f"  {line.rstrip()}  (Σ RSS {_gb(sampler.samples[-1].rss)})", file=sys.stderr)
        code = process.wait()
    sampler.finish()
    for proc in sampler.alive():  # the job's Ray processes normally end with it; never leave one behind
        print(f"  stopping leftover process {proc.pid} ({proc.name()})", file=sys.stderr)
        proc.kill()
    lines.append((time.monotonic(), "end", 0, 0))
    return code, sampler, lines


def stage_windows(lines: list) -> list[tuple[str, float, float]]:
    """(stage, start, stop): a stage runs from the previous stage's last progress line to its own
    (the first from the job's start, so it includes start-up: imports, Ray, preflight)."""
    windows, start = [], lines[0][0]
    for t, stage, done, total in lines[1:-1]:
        if done == total:
            windows.append((stage, start, t))
            start = t
    windows.append(("report and shutdown", start, lines[-1][0]))
    return windows


def checkpoint_main(args: argparse.Namespace) -> dict:
    from rankfold.models.sources import open_source

    tokenizer = open_source("smollm2-135m").tokenizer()
    model = SyntheticLlama(args.layers, args.hidden, args.ffn, args.heads, args.kv_heads, len(tokenizer),
                           args.storage_dtype, args.layers_per_shard)
    model_dir = args.work / f"llama-{model.layers}x{model.hidden}-{model.ffn}-{model.dtype}"
    started = time.perf_counter()
    size = generate_checkpoint(model_dir, model, tokenizer)
    generated_s = time.perf_counter() - started
    shards = len(list(model_dir.glob("model-*.safetensors")))
    print(f"checkpoint {model_dir}: {shards} shards, {_gb(size)} ({generated_s:.0f} s)", file=sys.stderr)

    run_dir = args.work / f"run-{model_dir.name}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh job: a reused one would skip every stage
    run_dir.mkdir(parents=True)
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps(job_spec(args, model_dir, run_dir / "job"), indent=2))
    # Ray's temp dir of our own: ray.init() would otherwise attach to a cluster another session
    # started with `ray start` (/tmp/ray/ray_current_cluster). Short path: Ray's sockets live there.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rfscale-", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    try:
        baseline = None if args.skip_baseline else idle_baseline(spec_path, env, args.baseline_seconds, args.interval,
                                                                 run_dir / "baseline.log")
        command = [sys.executable, "-m", "rankfold.cli", "run", str(spec_path)]
        code, sampler, lines = run_measured(command, env, run_dir / "job.log", args.interval, args.pss_every)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if code != 0:
        raise SystemExit(f"the job failed (exit code {code}); its log: {run_dir / 'job.log'}")
    report = json.loads((run_dir / "job" / "report.json").read_text())

    stages = []
    job_stages = {row["stage"]: row for row in report["stages"]}  # progress lines carry the stage's name
    for stage, start, stop in stage_windows(lines):
        row = {"stage": stage, "wall_s": round(stop - start, 1), **sampler.peak(start, stop)}
        if stage in job_stages:
            row.update(report_stage=stage, report_wall_s=job_stages[stage]["wall_s"],
                       driver_peak_rss_mb=job_stages[stage]["peak_rss_mb"])
        stages.append(row)
    peak = sampler.peak()
    result = {
        "command": "python benchmarks/scale.py " + " ".join(args.argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "load_average_1_5_15": os.getloadavg(), "code": git_state(), "model": asdict(model),
        "checkpoint": str(model_dir), "checkpoint_bytes": size,
        "shards": shards, "spec": json.loads(spec_path.read_text()), "executor": report["executor"],
        "calibration_tokens": report["calibration_tokens"], "perplexity": metric_table(report["rows"]),
        "achieved_compression": report["parameters"]["achieved_compression"],
        "job_wall_s": round(lines[-1][0] - lines[0][0], 1), "interval_s": args.interval,
        "pss_interval_s": args.interval * args.pss_every, "sampler_cpu_s": round(sampler.cpu_s, 1),
        "peak": peak, "baseline": baseline, "stages": stages, "samples": len(sampler.samples),
        "at_peak": {key: [{"process": label, "bytes": value} for label, value in sampler.top[key][1]]
                    for key in ("rss", "pss")},
        "ratio_rss": peak["rss"] / size, "ratio_pss": peak["pss"] / size, "goal": 0.2,
    }
    if baseline:
        result["ratio_pss_above_idle"] = (peak["pss"] - baseline["pss"]) / size
    _write(args.out, "checkpoint", result, checkpoint_markdown(result))
    return result


def checkpoint_markdown(r: dict) -> str:
    m, base, peak = r["model"], r["baseline"], r["peak"]
    verdict = lambda ratio: "met" if ratio <= r["goal"] else "NOT met"  # noqa: E731
    lines = [f"### Scale: {m['layers']}-layer synthetic Llama on `{r['executor']}`", "",
             f"Checkpoint: {r['shards']} safetensors shards, {_gb(r['checkpoint_bytes'])} on disk ({m['dtype']}; "
             f"hidden {m['hidden']}, ffn {m['ffn']}, {m['heads']}/{m['kv_heads']} heads, vocab {m['vocab']}, "
             "untied head). "
             f"Job: SVD-LLM {r['spec']['target']['ratio']:.0%}, model dtype {r['spec']['model']['dtype']}, "
             f"{r['calibration_tokens']} calibration tokens, perplexity on {r['perplexity'][0]['tokens']} tokens. "
             f"Memory: Σ over the job's process tree, RSS every {r['interval_s']} s, "
             f"PSS every {r['pss_interval_s']:g} s "
             f"({r['samples']} samples; the sampling cost {r['sampler_cpu_s']:.0f} CPU-s).", "",
             f"- peak Σ RSS **{_gb(peak['rss'])}** = {r['ratio_rss']:.3f} × checkpoint; peak Σ PSS "
             f"**{_gb(peak['pss'])}** = {r['ratio_pss']:.3f} × checkpoint ({peak['procs']} processes at most)",
             f"- goal peak Σ RSS ≤ {r['goal']} × checkpoint: **{verdict(r['ratio_rss'])}** "
             f"(with Σ PSS, which counts shared pages once: {verdict(r['ratio_pss'])})"]
    if base:
        workers = r["spec"]["execution"]["workers"]
        lines += [f"- idle baseline (job's imports + embedded Ray + {workers} shard actors, no data; median of "
                  f"{base['seconds']:.0f} s): Σ RSS {_gb(base['rss'])}, Σ PSS {_gb(base['pss'])} ({base['procs']} "
                  f"processes); peak Σ PSS above it: {r['ratio_pss_above_idle']:.3f} × checkpoint"]
    lines += ["", "Stages as the job's progress lines delimit them (the first includes start-up); beside them the "
              "job's report.json stage, its wall time and its driver process's peak RSS.", "",
              "| stage | wall s | peak Σ RSS | peak Σ PSS | processes | report stage (driver peak RSS MiB) |",
              "|---|---|---|---|---|---|"]
    for s in r["stages"]:
        job = (f"{s['report_stage']} {s['report_wall_s']:.1f} s ({s['driver_peak_rss_mb']:.0f})"
               if "report_stage" in s else "")
        lines.append(f"| {s['stage']} | {s['wall_s']:.1f} | {_gb(s['rss'])} | {_gb(s['pss'])} | {s['procs']} | "
                     f"{job} |")
    lines += ["", "Who held what at the peaks (pid, command line):", "",
              "| process at the Σ PSS peak | its PSS | its RSS at the Σ RSS peak |", "|---|---|---|"]
    rss_at_peak = {e["process"].split()[0]: e["bytes"] for e in r["at_peak"]["rss"]}
    for entry in r["at_peak"]["pss"]:
        rss = rss_at_peak.get(entry["process"].split()[0])
        lines.append(f"| `{entry['process']}` | {_gb(entry['bytes'])} | {_gb(rss) if rss is not None else '—'} |")
    ppl = r["perplexity"][0]
    lines += ["", f"Job wall {r['job_wall_s']:.0f} s; perplexity (random weights) dense {ppl.get('dense') or 0:.0f}, "
              f"compressed {ppl['compressed']:.0f}; achieved compression {r['achieved_compression']:.2%}. "
              f"Code {r['code']}; {r['machine']}; load average at the end {r['load_average_1_5_15'][1]:.1f} (5 min).",
              f"Rerun: `{r['command']}`", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- part 2: one 70B-shaped layer


LLAMA3_70B = {"hidden": 8192, "ffn": 28672, "heads": 64, "kv_heads": 8, "head_dim": 128}
# Distinct matrix shapes -> the (input group, matrix) pairs of that shape. The SVD-LLM of a shape is
# timed once, with the whitening factor of its first group, and counted for each of its matrices.
SHAPES = {"q": (("attn_in", "self_attn.q_proj"), ("attn_out", "self_attn.o_proj")),
          "kv": (("attn_in", "self_attn.k_proj"), ("attn_in", "self_attn.v_proj")),
          "gate": (("mlp_in", "mlp.gate_proj"), ("mlp_in", "mlp.up_proj")),
          "down": (("mlp_out", "mlp.down_proj"),)}


def gemm_rates(n: int = 2048) -> dict[str, float]:
    """GFLOP/s of an n×n (bf16: 2n×2n) matmul on this machine, median of 3, per dtype."""
    rates = {}
    for name, size in (("float64", n), ("float32", n), ("bfloat16", 2 * n)):
        a, b = (torch.randn(size, size).to(getattr(torch, name)) for _ in range(2))
        a @ b
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        rates[name] = 2 * size ** 3 / statistics.median(times) / 1e9
    return rates


class Pieces:
    """Wall time and peak RSS (a TreeSampler on this process) of named steps."""

    def __init__(self, interval_s: float, quiet: bool = False):
        self.sampler = TreeSampler(os.getpid(), interval_s, pss_every=1 << 30)  # RSS only
        self.sampler.start()
        self.rows: dict[str, dict] = {}
        self.quiet = quiet

    def run(self, name: str, fn, *args):
        start, wall = time.monotonic(), time.perf_counter()
        out = fn(*args)
        wall, stop = time.perf_counter() - wall, time.monotonic()
        self.sampler.sample(with_pss=False)
        self.rows[name] = {"wall_s": round(wall, 2), "peak_rss": self.sampler.peak(start, stop + 1e-3)["rss"]}
        if not self.quiet:
            print(f"  {name:44s} {wall:8.1f} s   peak RSS {_gb(self.rows[name]['peak_rss'])}", file=sys.stderr)
        return out


def layer_weights(config, dtype: torch.dtype, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Random bf16 weights (std 0.02), each from its own seed, so any one can be made again alone."""
    shapes = SyntheticLlama(1, config.hidden_size, config.intermediate_size, config.num_attention_heads,
                            config.num_key_value_heads, 0, "", 1).layer_shapes()
    return {key: _random(shapes[key], torch.Generator().manual_seed(sorted(shapes).index(key)), dtype)
            for key in (names or shapes)}


@contextmanager
def timed_gram_updates(seconds: dict[int, float]):
    """Adds the time of every InputStats.add_ (the calibration hook's Gram update) to `seconds`, by
    instance, while the job's own propagate_layer runs; the forward is the rest of its time."""
    original = InputStats.add_

    def add_(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            seconds[id(self)] = seconds.get(id(self), 0.0) + time.perf_counter() - start

    InputStats.add_ = add_
    try:
        yield
    finally:
        InputStats.add_ = original


def calibrate_layer(layer, runner, groups, chunks: list[torch.Tensor], product_dtype: torch.dtype,
                    pieces: Pieces) -> dict[str, InputStats]:
    """The calibration stage's work on one layer: workers/layer_statistics.py `propagate_layer` (a pre-hook on
    each group's first member adds its input to the group's InputStats) over `chunks`, keeping the
    outputs as the next layer's input, as a shard does. Each group's Gram updates are timed apart."""
    inputs, outputs = Activations(1 << 62), Activations(1 << 62)  # resident (a shard spills past its budget)
    for chunk in chunks:
        inputs.append(chunk)
    seconds: dict[int, float] = {}
    with timed_gram_updates(seconds):
        stats = pieces.run("forward + Gram accumulation", propagate_layer, layer, runner, inputs, outputs, groups,
                           product_dtype)
    inputs.release()
    outputs.release()
    row = pieces.rows.pop("forward + Gram accumulation")
    gram_s = {name: seconds.get(id(group_stats), 0.0) for name, group_stats in stats.items()}
    pieces.rows["forward"] = {"wall_s": round(row["wall_s"] - sum(gram_s.values()), 2), "peak_rss": row["peak_rss"]}
    for name, value in gram_s.items():
        pieces.rows[f"gram {name}"] = {"wall_s": round(value, 2), "peak_rss": row["peak_rss"]}
    return stats


def svd_llm_steps(weight: torch.Tensor, holder: dict, rank: int, park: Path | None, pieces: Pieces, label: str):
    """svd_llm_factors(weight, S, rank) as its three steps — same functions, same order (checked
    against it in `check_steps`) — timed apart. With `park`, S (in `holder`) waits on disk during
    the SVD: a 28672² factor is 6.6 GB."""
    from safetensors.torch import load_file, save_file

    ws = pieces.run(f"{label}: W·S (fp64 GEMM)", lambda: weight.to(torch.float64) @ holder["factor"])
    if park is not None:  # LAPACK returns S column-major: Sᵀ is the contiguous tensor to save
        save_file({"factor_t": holder.pop("factor").mT}, park)
    u, s, vh = pieces.run(f"{label}: SVD {tuple(ws.shape)}", lambda: torch.linalg.svd(ws, full_matrices=False))  # noqa: F821 (called at once)
    del ws
    b, a_white = split_singular(u, s, vh, rank)
    del u, s, vh
    if park is not None:
        holder["factor"] = load_file(park)["factor_t"].mT  # the same column-major layout as before
        park.unlink()
    a = pieces.run(f"{label}: A·S⁻¹ (triangular solve)", apply_inverse_right, a_white, holder["factor"])
    return b, a


def check_steps() -> None:
    """The stepwise path gives svd_llm_factors' result exactly (a small random case)."""
    x, weight = torch.randn(512, 96, dtype=torch.float64), torch.randn(64, 96).to(torch.bfloat16)
    factor = torch.linalg.cholesky(x.T @ x)
    expected = svd_llm_factors(weight, factor, 20)
    pieces = Pieces(1.0, quiet=True)
    pieces.sampler.finish()
    got = svd_llm_steps(weight, {"factor": factor}, 20, None, pieces, "check")
    if not all(torch.equal(e, g) for e, g in zip(expected, got)):
        raise SystemExit("svd_llm_steps no longer matches rankfold.methods.svd_llm.svd_llm_factors")


def layer_main(args: argparse.Namespace) -> dict:
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig

    from rankfold.models.architecture import architecture_for
    from rankfold.workers.layers import LayerRunner, materialize_layer, runtime_config

    check_steps()
    s = args.scale
    dims = {"hidden": LLAMA3_70B["hidden"] // s, "ffn": LLAMA3_70B["ffn"] // s, "heads": LLAMA3_70B["heads"] // s,
            "kv_heads": max(1, LLAMA3_70B["kv_heads"] // s), "head_dim": LLAMA3_70B["head_dim"]}
    tokens = args.tokens or LLAMA3_70B["hidden"] * 4 // s
    config = LlamaConfig(hidden_size=dims["hidden"], intermediate_size=dims["ffn"], num_attention_heads=dims["heads"],
                         num_key_value_heads=dims["kv_heads"], head_dim=dims["head_dim"], num_hidden_layers=1,
                         max_position_embeddings=args.seq_len, rms_norm_eps=1e-5, vocab_size=128256)
    arch, dtype = architecture_for(config), getattr(torch, args.dtype)
    product_dtype = getattr(torch, args.gram_product_dtype)
    work = args.work / f"layer-{s}"
    work.mkdir(parents=True, exist_ok=True)
    print(f"layer: {dims}, {tokens} tokens in sequences of {args.seq_len}, forward {args.dtype}, "
          f"Gram products {args.gram_product_dtype}; {torch.get_num_threads()} threads", file=sys.stderr)
    rates_before = gemm_rates()
    print("  GEMM GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in rates_before.items()), file=sys.stderr)

    pieces = Pieces(args.interval)
    weights = layer_weights(config, torch.bfloat16)
    layer_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    config = runtime_config(config)
    layer = materialize_layer(arch, config, 0, weights, dtype)
    del weights
    generator = torch.Generator().manual_seed(1)
    sequences = tokens // args.seq_len
    chunks = [torch.randn(min(args.batch, sequences - i), args.seq_len, dims["hidden"], generator=generator).to(dtype)
              for i in range(0, sequences, args.batch)]
    stats = calibrate_layer(layer, LayerRunner(arch, config), arch.groups, chunks, product_dtype, pieces)
    del layer, chunks
    # Statistics to disk, as the job stores them; each group's comes back alone (peak memory).
    stats_bytes = sum(8 * (st.gram.numel() + st.abs_sum.numel() + 1) for st in stats.values())
    for name in list(stats):
        path = work / f"stats-{name}.safetensors"
        pieces.run(f"symmetrise + store {name}", lambda: save_file(stats[name].to_tensors(name), path))  # noqa: B023 (called at once)
        del stats[name]

    ranks = {}
    for group in arch.groups:  # one decompose task of the job each
        if not any(g == group.name for shape in args.shapes for g, _ in SHAPES[shape]):
            continue
        path = work / f"stats-{group.name}.safetensors"
        gram = InputStats.from_tensors(load_file(path), group.name).gram
        path.unlink()
        holder = {"factor": pieces.run(f"cholesky {group.name} {gram.shape[0]}²", whitening_factor, gram)}
        del gram
        park = work / "factor.safetensors" if holder["factor"].numel() * 8 > args.park_factor_mb << 20 else None
        for shape in [k for k in args.shapes if SHAPES[k][0][0] == group.name]:
            key = f"{SHAPES[shape][0][1]}.weight"
            weight = layer_weights(config, torch.bfloat16, [key])[key]  # bf16, as the task reads it
            ranks[shape] = rank_for_ratio(*weight.shape, args.ratio)
            svd_llm_steps(weight, holder, ranks[shape], park, pieces, f"{shape} {tuple(weight.shape)} r={ranks[shape]}")
        del holder
    for path in work.glob("stats-*.safetensors"):
        path.unlink()
    pieces.sampler.finish()
    # The machine may be shared: the rates before and after the run, and their mean, which the model uses.
    rates_after = gemm_rates()
    rates = {k: (rates_before[k] + rates_after[k]) / 2 for k in rates_before}

    result = {
        "command": "python benchmarks/scale.py " + " ".join(args.argv),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   f"torch {torch.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
        "load_average_1_5_15": os.getloadavg(), "code": git_state(), "dims": dims, "scale": s, "tokens": tokens,
        "seq_len": args.seq_len, "dtype": args.dtype,
        "gram_product_dtype": args.gram_product_dtype, "ratio": args.ratio, "ranks": ranks, "shapes": args.shapes,
        "gemm_gflops": rates, "gemm_gflops_before_after": [rates_before, rates_after], "pieces": pieces.rows,
        "layer_bytes_bf16": layer_bytes, "stats_bytes": stats_bytes,
        "activation_bytes": tokens * dims["hidden"] * dtype.itemsize,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10,
        "park_factor_mb": args.park_factor_mb,
    }
    result["prediction"] = predict(result, args)
    _write(args.out, f"layer-{s}" if s != 1 else "layer", result, layer_markdown(result))
    return result


# ---------------------------------------------------------------- the model: 80 layers on N GPUs


def per_layer_seconds(r: dict) -> dict:
    """This CPU's seconds for one layer: forward, Gram, and per decompose task (one per input group)
    [Cholesky + W·S + triangular solves, SVDs] — each shape's steps counted once per matrix of it."""
    rows = r["pieces"]
    tasks = {key.split()[1]: [row["wall_s"], 0.0] for key, row in rows.items() if key.startswith("cholesky ")}
    for shape in r["shapes"]:
        for group, _ in SHAPES[shape]:
            for key, row in rows.items():
                if key.startswith(f"{shape} "):
                    tasks[group][1 if ": SVD" in key else 0] += row["wall_s"]
    gram = sum(row["wall_s"] for key, row in rows.items() if key.startswith("gram "))
    return {"forward": rows["forward"]["wall_s"], "gram": gram, "tasks": tasks}


def lpt_makespan(durations: list[float], workers: int) -> float:
    """Longest-processing-time-first schedule of independent tasks on `workers`: its makespan."""
    loads = [0.0] * workers
    for d in sorted(durations, reverse=True):
        heapq.heapreplace(loads, loads[0] + d)
    return max(loads)


def predict(r: dict, args: argparse.Namespace) -> dict:
    """A model, not a measurement: 80 layers on N GPU workers from this CPU's per-layer seconds.

    - calibration is sequential over layers and data-parallel over whole sequences: per layer each
      of min(N, sequences) shards runs its share of the tokens (forward at the forward dtype's rate,
      Gram at the product dtype's rate), reads the layer's weights, and the driver receives and adds
      every shard's float64 statistics in shard order;
    - decomposition is one task per (layer, input group), all independent: LPT-scheduled on N workers;
      each task reads its Gram; Cholesky, W·S and the triangular solve scale with fp64 GEMM rates,
      the SVD by its own (smaller) factor;
    - GPU rates are achievable dense rates (arguments), divided by this CPU's measured GEMM rates;
      assembly and evaluation are not counted."""
    seconds, rates = per_layer_seconds(r), r["gemm_gflops"]
    speed = {"forward": args.gpu_tflops[r["dtype"]] * 1e3 / rates[r["dtype"]],
             "gram": args.gpu_tflops[r["gram_product_dtype"]] * 1e3 / rates[r["gram_product_dtype"]],
             "fp64": args.gpu_tflops["float64"] * 1e3 / rates["float64"], "svd": args.gpu_svd_speedup}
    gram_bytes = {name: size for name, size in (("attn_in", r["dims"]["hidden"]), ("attn_out", r["dims"]["hidden"]),
                                                ("mlp_in", r["dims"]["hidden"]), ("mlp_out", r["dims"]["ffn"]))}
    task_gpu = [t[0] / speed["fp64"] + t[1] / speed["svd"] + gram_bytes[g] ** 2 * 8 / (args.read_gbps * GB)
                for g, t in seconds["tasks"].items()]
    rows = []
    for n in args.workers:
        shards = min(n, r["tokens"] // r["seq_len"])  # the job splits whole sequences over its shards
        compute = (seconds["forward"] / speed["forward"] + seconds["gram"] / speed["gram"]) / shards
        read = r["layer_bytes_bf16"] / (args.read_gbps * GB)
        reduce = shards * r["stats_bytes"] / (args.reduce_gbps * GB)
        decompose = lpt_makespan(task_gpu * args.layers, n)
        rows.append({"workers": n, "calibration_shards": shards, "calibrate_compute_s": compute * args.layers,
                     "weight_reads_s": read * args.layers,
                     "stats_reduce_s": reduce * args.layers, "decompose_s": decompose,
                     "total_s": (compute + read + reduce) * args.layers + decompose})
    cpu_layer = seconds["forward"] + seconds["gram"] + sum(sum(t) for t in seconds["tasks"].values())
    return {"layers": args.layers, "speedups": speed, "per_layer_cpu_s": seconds, "rows": rows,
            "this_cpu_one_worker_s": cpu_layer * args.layers, "complete": sorted(r["shapes"]) == sorted(SHAPES),
            "assumptions": {"gpu_tflops": args.gpu_tflops, "gpu_svd_speedup": args.gpu_svd_speedup,
                            "read_gbps": args.read_gbps, "reduce_gbps": args.reduce_gbps}}


def _hms(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def task_memory_note(r: dict) -> list[str]:
    """The job's decompose task keeps S resident through the SVD (its Gram is dropped once factorised,
    as here); this benchmark parks an S above --park-factor-mb on disk meanwhile."""
    notes = []
    for shape in r["shapes"]:
        n = r["dims"]["ffn" if shape == "down" else "hidden"]
        svd = next((row for key, row in r["pieces"].items() if key.startswith(f"{shape} ") and ": SVD" in key), None)
        if svd is not None and 8 * n * n > r["park_factor_mb"] << 20:
            notes.append(f"{shape}: SVD step {_gb(svd['peak_rss'])} + S {_gb(8 * n * n)}")
    return [f"The job's decompose task also holds S (parked on disk here) during the SVD: ≈ {'; '.join(notes)}."
            ] if notes else []


def ws_gflops(r: dict) -> float:
    """The fp64 GEMM rate of the largest W·S product as it ran (0 when the down shape was skipped)."""
    row = next((row for key, row in r["pieces"].items() if key.startswith("down ") and "W·S" in key), None)
    return 2 * r["dims"]["hidden"] * r["dims"]["ffn"] ** 2 / row["wall_s"] / 1e9 if row else 0.0


def layer_markdown(r: dict) -> str:
    d, p = r["dims"], r["prediction"]
    before, after = r["gemm_gflops_before_after"]
    scaled = "" if r["scale"] == 1 else f" ÷ {r['scale']}"
    lines = [f"### Scale: one decoder layer of Llama-3-70B shape{scaled}", "",
             f"hidden {d['hidden']}, ffn {d['ffn']}, {d['heads']} heads / {d['kv_heads']} KV heads; "
             "random bf16 weights; "
             f"{r['tokens']} tokens (sequences of {r['seq_len']}), forward {r['dtype']}, Gram products "
             f"{r['gram_product_dtype']} into float64 sums; SVD-LLM at {r['ratio']:.0%} (ranks {r['ranks']}). "
             "GEMM on this machine (mean of before / after the run): "
             + ", ".join(f"{k} {v:.0f} ({before[k]:.0f} / {after[k]:.0f}) GFLOP/s" for k, v in r["gemm_gflops"].items())
             + f". In situ, W·S of down ran at {ws_gflops(r):.0f} GFLOP/s (fp64).", "",
             "| step | wall s | peak RSS of the process |", "|---|---|---|"]
    lines += [f"| {name} | {row['wall_s']:.1f} | {_gb(row['peak_rss'])} |" for name, row in r["pieces"].items()]
    lines += ["", f"Peak RSS (ru_maxrss): {_gb(r['peak_rss'])}. One shape's SVD-LLM is timed once and counted for "
              "every matrix of that shape (q/o, k/v, gate/up, down). Layer weights bf16 "
              f"{_gb(r['layer_bytes_bf16'])}; float64 statistics {_gb(r['stats_bytes'])}; activations "
              f"{_gb(r['activation_bytes'])} per copy.", *task_memory_note(r), "",
              f"**Model, not measurement: {p['layers']} layers on N GPU workers**"
              + ("" if p["complete"] else " (PARTIAL: some shapes skipped)") + "", "",
              "| N | calibration shards | calibrate compute | weight reads | stats to driver | decompose | total |",
              "|---|---|---|---|---|---|---|"]
    for row in p["rows"]:
        cells = [_hms(row[k]) for k in ("calibrate_compute_s", "weight_reads_s", "stats_reduce_s", "decompose_s")]
        lines.append(f"| {row['workers']} | {row['calibration_shards']} | {' | '.join(cells)} | "
                     f"**{_hms(row['total_s'])}** |")
    a = p["assumptions"]
    rates, speed = ", ".join(f"{k} {v:g} TFLOP/s" for k, v in a["gpu_tflops"].items()), p["speedups"]
    lines += ["", f"This CPU as the only worker: {_hms(p['this_cpu_one_worker_s'])} (measured per layer × "
              f"{p['layers']}).",
              f"Assumptions (arguments): GPU rates {rates} → speed-ups over this CPU: "
              f"forward ×{speed['forward']:.0f}, Gram ×{speed['gram']:.0f}, Cholesky/GEMM/solve "
              f"×{speed['fp64']:.0f}, SVD ×{speed['svd']:g}; each worker reads weights and Grams at "
              f"{a['read_gbps']:g} GB/s; the driver receives and adds every "
              f"shard's statistics at {a['reduce_gbps']:g} GB/s (shards × {_gb(r['stats_bytes'])} per layer). "
              f"Calibration is sequential over layers and split over whole sequences ({r['tokens'] // r['seq_len']} "
              "here); decomposition is one independent task per (layer, group), LPT-scheduled; assembly and "
              "evaluation are not counted.", "",
              f"Code {r['code']}; {r['machine']}; load average at the end {r['load_average_1_5_15'][1]:.1f} (5 min).",
              f"Rerun: `{r['command']}`", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def _write(out: Path, name: str, result: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
    print(f"written: {out / f'{name}.md'}, {out / f'{name}.json'}", file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/rankfold-scale"), help="checkpoints, runs, scratch")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale")
    parser.add_argument("--interval", type=float, default=0.2, help="memory sampling period, seconds")
    parser.add_argument("--pss-every", type=int, default=5, help="read PSS every this many samples (it costs "
                        "~15 ms of CPU per GB resident)")
    parser.add_argument("--ratio", type=float, default=0.2)
    parts = parser.add_subparsers(dest="part", required=True)

    ckpt = parts.add_parser("checkpoint", help="a synthetic checkpoint through the Ray executor: Σ memory / size")
    for name, default in (("layers", 24), ("hidden", 1536), ("ffn", 4096), ("heads", 12), ("kv-heads", 4),
                          ("layers-per-shard", 4), ("samples", 16), ("seq-len", 512), ("batch-size", 4),
                          ("window", 1024), ("windows", 2), ("workers", 2)):
        ckpt.add_argument(f"--{name}", type=int, default=default)
    ckpt.add_argument("--storage-dtype", choices=["float32", "bfloat16"], default="float32")
    ckpt.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the job's model.dtype")
    ckpt.add_argument("--executor", choices=["ray", "local"], default="ray")
    ckpt.add_argument("--calib-data", type=Path, default=DATA / "calibration" / "enwiki_excerpt.txt")
    ckpt.add_argument("--eval-data", type=Path, default=DATA / "wikitext2" / "wiki.test.raw")
    ckpt.add_argument("--skip-baseline", action="store_true")
    ckpt.add_argument("--baseline-seconds", type=float, default=5.0)

    layer = parts.add_parser("layer", help="one Llama-3-70B-shaped layer: calibration + SVD-LLM, and the "
                             "80-layer model")
    layer.add_argument("--scale", type=int, default=1, help="divide hidden, ffn and heads by this (smoke runs)")
    layer.add_argument("--tokens", type=int, help="calibration tokens (default 32768 / scale: more than ffn, "
                       "so the down_proj Gram is not singular)")
    layer.add_argument("--seq-len", type=int, default=2048)
    layer.add_argument("--batch", type=int, default=2, help="sequences per forward chunk")
    layer.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="forward dtype")
    layer.add_argument("--gram-product-dtype", choices=["float32", "float64"], default="float32",
                       help="as the job's calibration.gram_product_dtype (its default: float32)")
    layer.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    layer.add_argument("--skip-shapes", nargs="+", choices=list(SHAPES), default=[])
    layer.add_argument("--park-factor-mb", type=int, default=4096,
                       help="a whitening factor larger than this waits on disk during its SVD")
    layer.add_argument("--layers", type=int, default=80, help="layers of the predicted model")
    layer.add_argument("--workers", type=int, nargs="+", default=[1, 8, 64], help="N of the prediction table")
    # H100 SXM dense peaks: bf16 989, fp32 (no TF32) 67, fp64 tensor core 67 TFLOP/s; ~60-75 % of them
    # is what large GEMMs reach. SVD: bidiagonalisation is half memory-bound BLAS-2, so GPUs gain far
    # less than on GEMM (cuSOLVER/MAGMA gesvd: ~5-15× over a multi-core CPU socket); 20× over this
    # 2-core box is deliberately conservative.
    layer.add_argument("--gpu-bf16-tflops", type=float, default=600.0)
    layer.add_argument("--gpu-fp32-tflops", type=float, default=45.0)
    layer.add_argument("--gpu-fp64-tflops", type=float, default=45.0)
    layer.add_argument("--gpu-svd-speedup", type=float, default=20.0, help="GPU SVD speed-up over this CPU's SVD")
    layer.add_argument("--read-gbps", type=float, default=2.0, help="per-worker read of weights and Grams, GB/s")
    layer.add_argument("--reduce-gbps", type=float, default=5.0, help="driver's intake + add of statistics, GB/s")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.part == "layer":
        args.shapes = [s for s in args.shapes if s not in args.skip_shapes]
        args.gpu_tflops = {"bfloat16": args.gpu_bf16_tflops, "float32": args.gpu_fp32_tflops,
                           "float64": args.gpu_fp64_tflops}
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    return checkpoint_main(args) if args.part == "checkpoint" else layer_main(args)


if __name__ == "__main__":
    main()
