"""Job memory benchmark: memory of a whole job on Ray against checkpoint size.

A synthetic Llama (random weights, default 24 layers of hidden 1536 / ffn 4096, GQA 12/4 heads,
float32 storage: 3.0 GB in 6 safetensors shards, SmolLM2's tokenizer) compressed by
`rankfold run SPEC` with `execution: {executor: ray, workers: 2}` (SVD-LLM, 20 %) in a child
process. Every 0.2 s the RSS (every 1 s the PSS) of that process and all its descendants are
summed; the peak sums are divided by the checkpoint's size on disk. An idle baseline — the job's
imports, embedded Ray and its two shard actors, no data — shows what is Ray/torch overhead rather
than data; the processes holding memory at the peak are listed. Per-stage peaks use the windows the
job's report gives (each stage's start time and wall time).

    python -m benchmarks.job_memory           # ~10-15 min on 2 cores; the checkpoint is cached in --work
    python -m benchmarks.job_memory --layers 2 --hidden 64 --ffn 160 --heads 4 --kv-heads 2 \
        --samples 4 --seq-len 64 --window 64 --executor local --skip-baseline   # tiny, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

# libgomp's threads spin while they wait; on a small machine shared with other work that makes
# MKL's SVD ~60× slower with 2 threads (1024² fp64: 24 s instead of 0.4 s, measured here while
# another job ran). Passive waiting costs nothing when the machine is idle. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file
from benchmarks.common import DATA, REPO, RESULTS, provenance, publish  # noqa: E402
from benchmarks.process_memory import (  # noqa: E402
    SyntheticLlama,
    TreeSampler,
    _gb,
    _random,
    add_run_arguments,
    provenance_lines,
)
from rankfold.evaluation.report import metric_table  # noqa: E402


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
        "target": {"ratio": args.ratio, **({"allocation": {"kind": "flra", "fisher_samples": args.fisher_samples}}
                                           if args.allocation == "flra" else {})},
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
from rankfold.workers.shard import SequenceShard, ShardConfig
spec = load_spec(sys.argv[1])
executor = make_executor(spec)
config = ShardConfig(str(spec.model.source), spec.model.dtype, 1 << 20)
shards = executor.actors(SequenceShard, [(config,)] * spec.execution.workers)
executor.call_all(shards, "pid")
print("ready", flush=True)
sys.stdin.read()
executor.release(shards)
executor.close()
"""




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
                 pss_every: int) -> tuple[int, TreeSampler, float, float]:
    """Run `command`, sampling its process tree; its output goes to `log_path`. Returns (exit code,
    sampler, start and end in Unix time)."""
    started = time.time()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
        sampler = TreeSampler(process.pid, interval_s, pss_every)
        sampler.start()
        code = process.wait()
    sampler.finish()
    for proc in sampler.alive():  # the job's Ray processes normally end with it; never leave one behind
        print(f"  stopping leftover process {proc.pid} ({proc.name()})", file=sys.stderr)
        proc.kill()
    return code, sampler, started, time.time()


def stage_windows(report: dict, started: float, finished: float) -> list[tuple[str, float, float]]:
    """(stage, start, stop) in Unix time: each stage the report lists, from its `started_at` for its
    wall time; the time before the first (imports, Ray, preflight) and after the last (report,
    shutdown) are windows of their own."""
    rows = sorted((row for row in report["stages"] if row.get("started_at")), key=lambda row: row["started_at"])
    windows = [("start-up and preflight", started, rows[0]["started_at"] if rows else finished)]
    windows += [(row["stage"], row["started_at"], row["started_at"] + row["wall_s"]) for row in rows]
    windows.append(("report and shutdown", windows[-1][2], finished))
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
    if not args.resume:  # a fresh job: a reused folder would skip every stage already stored
        shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
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
        code, sampler, started, finished = run_measured(command, env, run_dir / "job.log", args.interval,
                                                        args.pss_every)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if code != 0:
        raise SystemExit(f"the job failed (exit code {code}); its log: {run_dir / 'job.log'}")
    report = json.loads((run_dir / "job" / "report.json").read_text())

    stages = []
    job_stages = {row["stage"]: row for row in report["stages"]}
    for stage, start, stop in stage_windows(report, started, finished):
        row = {"stage": stage, "wall_s": round(stop - start, 1), **sampler.peak(start, stop)}
        if stage in job_stages:
            row.update(report_stage=stage, report_wall_s=job_stages[stage]["wall_s"],
                       driver_peak_rss_mb=job_stages[stage]["peak_rss_mb"])
        stages.append(row)
    peak = sampler.peak()
    result = {
        **provenance("job_memory", args.argv), "model": asdict(model),
        "checkpoint": str(model_dir), "checkpoint_bytes": size,
        "shards": shards, "spec": json.loads(spec_path.read_text()), "executor": report["executor"],
        "calibration_tokens": report["calibration_tokens"], "perplexity": metric_table(report["rows"]),
        "achieved_compression": report["parameters"]["achieved_compression"],
        "job_wall_s": round(finished - started, 1), "interval_s": args.interval,
        "pss_interval_s": args.interval * args.pss_every, "sampler_cpu_s": round(sampler.cpu_s, 1),
        "resumed": args.resume, "peak": peak, "baseline": baseline, "stages": stages, "samples": len(sampler.samples),
        "at_peak": {key: [{"process": label, "bytes": value} for label, value in sampler.top[key][1]]
                    for key in ("rss", "pss")},
        "ratio_rss": peak["rss"] / size, "ratio_pss": peak["pss"] / size, "goal": args.goal,
    }
    if baseline:
        result["ratio_pss_above_idle"] = (peak["pss"] - baseline["pss"]) / size
    publish(args.name, result, checkpoint_markdown(result), folder=args.out)
    return result


def checkpoint_markdown(r: dict) -> str:
    m, base, peak = r["model"], r["baseline"], r["peak"]
    verdict = lambda ratio: "met" if ratio <= r["goal"] else "NOT met"  # noqa: E731
    lines = [f"### Scale: {m['layers']}-layer synthetic Llama on `{r['executor']}`", "",
             f"Checkpoint: {r['shards']} safetensors shards, {_gb(r['checkpoint_bytes'])} on disk ({m['dtype']}; "
             f"hidden {m['hidden']}, ffn {m['ffn']}, {m['heads']}/{m['kv_heads']} heads, vocab {m['vocab']}, "
             "untied head). "
             f"Job: SVD-LLM {r['spec']['target']['ratio']:.0%}"
             f"{' with FLRA' if 'allocation' in r['spec']['target'] else ''}, model dtype {r['spec']['model']['dtype']}, "
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
    if r.get("resumed"):
        lines += ["- **resumed**: an interrupted job's folder was kept, so stages and factors already stored were "
                  "reused; the timings below cover only what was left"]
    lines += ["", "Stages as the job's report times them (start-up and shutdown apart); beside them the "
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
              f"compressed {ppl['compressed']:.0f}; achieved compression {r['achieved_compression']:.2%}.",
              *provenance_lines(r)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, RESULTS / "job_memory")
    for name, default in (("layers", 24), ("hidden", 1536), ("ffn", 4096), ("heads", 12), ("kv-heads", 4),
                          ("layers-per-shard", 4), ("samples", 16), ("seq-len", 512), ("batch-size", 4),
                          ("window", 1024), ("windows", 2), ("workers", 2)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--storage-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the job's model.dtype")
    parser.add_argument("--executor", choices=["ray", "local"], default="ray")
    parser.add_argument("--calib-data", type=Path, default=DATA / "calibration" / "enwiki_excerpt.txt")
    parser.add_argument("--eval-data", type=Path, default=DATA / "wikitext2" / "wiki.test.raw")
    parser.add_argument("--allocation", choices=["uniform", "flra"], default="uniform",
                        help="flra: the Fisher pass and spectra stages run too")
    parser.add_argument("--fisher-samples", type=int, default=8, help="with --allocation flra")
    parser.add_argument("--name", default="checkpoint", help="the result's file name (without .json)")
    parser.add_argument("--goal", type=float, default=0.6,
                        help="peak Σ RSS / checkpoint to meet (the scale issue: 0.6 at 3 GB, 0.3 at 12 GB)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--resume", action="store_true",
                        help="keep the run folder: an interrupted job reuses its stored stages and factors "
                             "(the stage timings then cover only what was left)")
    parser.add_argument("--baseline-seconds", type=float, default=5.0)

    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    return checkpoint_main(args)


if __name__ == "__main__":
    main()
