"""KV-cache benchmark: Palu's latent cache against peers at equal bytes, through the cache itself.

    python benchmarks/kv_cache.py                      # everything below (~1 h on 2 cores)
    python benchmarks/kv_cache.py --quick              # 50 % only, 4 windows, no latency
    python benchmarks/kv_cache.py --latency-only       # decode attention time per token only

Perplexity: SmolLM2-135M, WikiText-2 test (rows joined with "\\n\\n"), --windows non-overlapping windows
of --window tokens, each one forward through a fresh cache: every layer stores the window's K/V (or
latents), and attention reads back what the cache holds — quantised rows read quantised keys and values
for every token, the current one included (Palu's own evaluation does the same, by simulation).
Rows:
  dense (transformers' DynamicCache);
  Palu, cache-only jobs (weights dense) through `rankfold run`'s stages: --ratios of the KV hidden size
  removed × --bits × head groups --groups × Hadamard off/on (only when quantised); Fisher rank search,
  and the uniform split beside it at 16 bits;
  peers: per-token RTN of K and V at 4/3/2 bits (groups of 32 along head_dim, float16 minimum and step,
  the quantiser Palu's latents use), and transformers' QuantizedCache (quanto backend) at 4 and 2 bits
  — it returns a chunk's own K/V unquantised, so it is fed in chunks of --quanto-chunk tokens (its
  residual length): every token reads its own chunk in full precision, which favours it;
  seed 002: SkipCat 20 % on the weights (q, o, gate, up, down) + Palu 50 % 3-bit cache (joint, g = 3).
KV bytes per token: every tensor the cache holds after a window (codes, minimums, steps included),
over the window's tokens, all 30 layers, keys and values.

Latency: one SmolLM2 attention layer at decode (batch 1, one new token) with --contexts cached tokens:
dense cache vs Palu 50 % (g = 1, 3; 16 and 3 bits), torch path on this machine's threads; median of
--latency-repeats.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file
import rankfold
from benchmarks.common import DATA, REPO, describe, provenance, write_result  # noqa: E402
from rankfold.data.source import TextSource
from rankfold.data.text import load_text, tokenize
from rankfold.jobs.spec import parse_spec
from rankfold.kernels.latent_quant import concat, dequantize, quantize
from rankfold.models.sources import open_source
from rankfold.modules.latent_cache import cache_nbytes
from rankfold.orchestrator.job import run_job
from rankfold.storage.store import LocalStore
from rankfold.workers.streamed_perplexity import make_windows

WEIGHTS = ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5])
    parser.add_argument("--bits", nargs="+", type=int, default=[16, 4, 3, 2])
    parser.add_argument("--groups", nargs="+", type=int, default=[1, 3])
    parser.add_argument("--rank-multiple", type=int, default=8)
    parser.add_argument("--quant-group", type=int, default=32)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--fisher-samples", type=int, default=32)
    parser.add_argument("--quanto-chunk", type=int, default=128)
    parser.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096])
    parser.add_argument("--latency-repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=None, help="regex: run only the rows it matches (others kept from OUT)")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--latency-only", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "kv_cache")
    parser.add_argument("--store", type=Path, default=None, help="artifact store (default: OUT/artifacts)")
    args = parser.parse_args(argv)
    if args.quick:
        args.ratios, args.windows, args.skip_latency = [0.5], 4, True
    return args


# --- models -----------------------------------------------------------------------------------------

def job_spec(args, out: Path, kv: dict, method: str = "svd_llm", matrices: list[str] | None = None,
             ratio: float = 0.2) -> dict:
    return {
        "model": {"source": args.model, "dtype": "float32"},
        "method": {"name": method},
        "target": {"ratio": ratio, "matrices": matrices or []},
        "calibration": {"data": {"path": str(DATA / "calibration" / "enwiki_excerpt.txt")},
                        "num_samples": args.calib_samples, "seq_len": args.seq_len},
        "evaluation": {"dense": False},
        "kv_cache": {"rank_multiple": args.rank_multiple, "quant_group": args.quant_group,
                     "fisher_samples": args.fisher_samples} | kv,
        "output": {"dir": str(out)},
    }


def palu_model(args, store: LocalStore, name: str, kv: dict, **weights) -> tuple[torch.nn.Module, dict, float]:
    """(model, the report's kv summary, wall s of the job) of one cache-only (or seed-002) job."""
    started = time.perf_counter()
    report = run_job(parse_spec(job_spec(args, args.out / "jobs" / name, kv, **weights)), store=store)
    model = rankfold.load(Path(report["checkpoint"]), dtype=getattr(torch, args.dtype))
    return model, report["kv_cache"], time.perf_counter() - started


def dense_model(args) -> torch.nn.Module:
    from rankfold.checkpoint import model_from_source

    return model_from_source(open_source(args.model), getattr(torch, args.dtype))


# --- peers' caches ----------------------------------------------------------------------------------

def rtn_cache(config, bits: int, group: int):
    """K/V quantised per token (groups of `group` along head_dim), read back dequantised."""
    from transformers.cache_utils import Cache, DynamicLayer

    class RTNLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.stored = [None, None]
            out = []
            for i, states in enumerate((key_states, value_states)):
                q = quantize(states, bits, min(group, states.shape[-1]))
                self.stored[i] = q if self.stored[i] is None else concat([self.stored[i], q], dim=2)
                out.append(dequantize(self.stored[i], states.dtype))
            self.keys = out[0][..., :0, :]  # get_seq_length reads the stored codes below
            self.length = out[0].shape[-2]
            return out[0], out[1]

        def get_seq_length(self):
            return getattr(self, "length", 0)

        def nbytes(self):
            return sum(q.nbytes for q in self.stored)

    return Cache(layers=[RTNLayer() for _ in range(config.num_hidden_layers)])


def cache_bytes(cache) -> int:
    layers = [layer for layer in cache.layers]
    if layers and hasattr(layers[0], "nbytes") and callable(layers[0].nbytes):
        return sum(layer.nbytes() for layer in layers)
    return cache_nbytes(cache)


def quanto_cache(config, bits: int, chunk: int):
    from transformers import QuantizedCache

    return QuantizedCache(backend="quanto", config=config, nbits=bits, q_group_size=64, residual_length=chunk)


def quanto_bytes(cache) -> int:
    """Bytes of transformers' quantised layers: the packed data, scales and shifts quanto keeps, plus the
    unquantised residual."""
    total = 0
    for layer in cache.layers:
        for name in ("_quantized_keys", "_quantized_values"):
            qtensor = getattr(layer, name)
            total += sum(t.numel() * t.element_size() for t in _quanto_tensors(qtensor))
        total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
    return total


def _quanto_tensors(qtensor) -> list[torch.Tensor]:
    names, _ = qtensor.__tensor_flatten__()
    out = []
    for name in names:
        inner = getattr(qtensor, name)
        out += _quanto_tensors(inner) if hasattr(inner, "__tensor_flatten__") else [inner]
    return out


# --- measurements -----------------------------------------------------------------------------------

def wikitext_windows(args, tokenizer) -> torch.Tensor:
    source = TextSource(path=DATA / "wikitext2" / "wiki.test.raw", lines_as_rows=True)
    return make_windows(tokenize(load_text(source), tokenizer), args.window, args.window * args.windows)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, make_cache, chunk: int | None = None) -> tuple[float, float, float]:
    """(perplexity, KV bytes per token of the last window, wall s), one fresh cache per window."""
    started, nll, count, per_token = time.perf_counter(), 0.0, 0, float("nan")
    for window in windows:
        ids = window[None]
        cache = make_cache()
        pieces = [ids] if chunk is None else list(ids.split(chunk, dim=1))
        logits = torch.cat([model(piece, cache=cache, use_cache=True).logits for piece in pieces], dim=1)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
        nll, count = nll + float(loss), count + ids.shape[1] - 1
        per_token = (quanto_bytes(cache) if chunk else cache_bytes(cache)) / ids.shape[1]
    return math.exp(nll / count), per_token, time.perf_counter() - started


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def wanted(args, name: str) -> bool:
    return args.only is None or re.search(args.only, name) is not None


def run_quality(args, store: LocalStore) -> list[dict]:
    from transformers import DynamicCache

    rows = []
    dense = dense_model(args)
    windows = wikitext_windows(args, open_source(args.model).tokenizer())
    config = dense.config

    def add(name: str, model, make_cache, extra: dict | None = None, chunk: int | None = None) -> None:
        if not wanted(args, name):
            return
        ppl, per_token, wall = perplexity(model, windows, make_cache, chunk)
        rows.append({"row": name, "ppl": ppl, "kv_bytes_per_token": per_token, "eval_s": wall} | (extra or {}))
        print(f"{name:<44} ppl {ppl:9.3f}  KV {per_token:8.0f} B/token  ({wall:.0f} s)", flush=True)
        write(args, rows)

    add("dense", dense, lambda: DynamicCache(config=config), {"weight_bytes": weight_bytes(dense)})
    for bits in (4, 3, 2):
        add(f"RTN K/V {bits}-bit", dense, lambda bits=bits: rtn_cache(config, bits, args.quant_group), {"bits": bits})
    for bits in (4, 2):
        try:
            add(f"transformers QuantizedCache quanto {bits}-bit", dense,
                lambda bits=bits: quanto_cache(config, bits, args.quanto_chunk), {"bits": bits}, chunk=args.quanto_chunk)
        except Exception as err:  # noqa: BLE001  (a peer that does not run here is reported, not fatal)
            rows.append({"row": f"transformers QuantizedCache quanto {bits}-bit", "error": repr(err)})
            print(f"QuantizedCache (quanto) does not run here: {err!r}", flush=True)
    del dense
    for ratio in args.ratios:
        for g in args.groups:
            for bits in args.bits:
                for hadamard in ([False] if bits == 16 else [False, True]):
                    searches = ["fisher", "uniform"] if bits == 16 else ["fisher"]
                    for search in searches:
                        kv = {"ratio": ratio, "group_heads": g, "bits": bits, "hadamard": hadamard,
                              "rank_search": search}
                        name = f"palu-{ratio:g}-g{g}-{bits}b{'-had' if hadamard else ''}-{search}"
                        if not wanted(args, name):
                            continue
                        model, summary, job_s = palu_model(args, store, name, kv)
                        add(name, model, lambda model=model: DynamicCache(config=model.config),
                            {"kv": kv, "kept_fraction": summary["kept_fraction"], "job_s": job_s})
    if not wanted(args, "SkipCat 20% + Palu 50% 3-bit (g=3)"):
        return rows
    model, summary, job_s = palu_model(args, store, "skipcat-0.2+palu-0.5-g3-3b",
                                       {"ratio": 0.5, "group_heads": 3, "bits": 3},
                                       method="skipcat", matrices=WEIGHTS, ratio=0.2)
    add("SkipCat 20% + Palu 50% 3-bit (g=3)", model, lambda: DynamicCache(config=model.config),
        {"weight_bytes": weight_bytes(model), "job_s": job_s})
    return rows


# --- decode attention latency -----------------------------------------------------------------------

def attention_latency(args, store: LocalStore) -> list[dict]:
    """Median time of one attention layer's decode step (one new token) with `context` cached tokens."""
    from transformers import DynamicCache

    torch.manual_seed(0)
    rows = []
    dense = dense_model(args)
    variants = [("dense", dense, None)]
    for g in (1, 3):
        for bits in (16, 3):
            kv = {"ratio": 0.5, "group_heads": g, "bits": bits, "hadamard": bits < 16}
            model, _, _ = palu_model(args, store, f"palu-0.5-g{g}-{bits}b{'-had' if bits < 16 else ''}-fisher", kv)
            variants.append((f"palu 50% g={g} {bits}-bit", model, kv))
    for context in args.contexts:
        for name, model, _ in variants:
            layer = model.model.layers[0]
            rotary = model.model.rotary_emb
            hidden = torch.randn(1, context, model.config.hidden_size, dtype=getattr(torch, args.dtype))
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                positions = torch.arange(context)[None]
                layer.self_attn(layer.input_layernorm(hidden), rotary(hidden, positions), None, cache=cache,
                                position_ids=positions)
                step = hidden[:, :1]
                tables = rotary(step, torch.tensor([[context]]))
                times = []
                for _ in range(args.latency_repeats):
                    snapshot = _snapshot(cache)
                    started = time.perf_counter()
                    layer.self_attn(step, tables, None, cache=cache, position_ids=torch.tensor([[context]]))
                    times.append(time.perf_counter() - started)
                    _restore(cache, snapshot)
            row = {"row": name, "context": context, "ms_per_token_layer": 1e3 * statistics.median(times)}
            rows.append(row)
            print(f"attention decode {name:<24} context {context:5d}: {row['ms_per_token_layer']:.3f} ms", flush=True)
    return rows


def _snapshot(cache):
    layer = cache.layers[0]
    return [getattr(layer, n, None) for n in ("keys", "values", "quantized_keys", "quantized_values", "length")]


def _restore(cache, snapshot) -> None:
    layer = cache.layers[0]
    for name, value in zip(("keys", "values", "quantized_keys", "quantized_values", "length"), snapshot):
        if value is not None or hasattr(layer, name):
            setattr(layer, name, value)


# --- output -----------------------------------------------------------------------------------------

def write(args, rows: list[dict], latency: list[dict] | None = None) -> None:
    """OUT/kv_cache.json of this run's rows so far; rows and latency it did not measure stay as the file
    before this run had them, and `kept_from` names the run that measured them."""
    previous = args.previous
    fresh = {row["row"] for row in rows}
    kept = [r for r in previous.get("rows", []) if r["row"] not in fresh] if args.only is not None or not rows else []
    kept_latency = [] if latency else previous.get("latency", [])
    data = {**args.run, "rows": kept + rows, "latency": latency or kept_latency}
    if kept or kept_latency:
        data["kept_from"] = {key: previous[key] for key in ("command", "rerun", "date", "commit") if key in previous}
    write_result("kv_cache", data, folder=args.out, markdown=markdown(data, args))


def markdown(data: dict, args) -> str:
    lines = [f"### KV cache: {args.model} ({args.dtype}), WikiText-2 perplexity through the cache",
             "", f"{args.windows} windows of {args.window} tokens; KV bytes per token over all layers, keys "
             "and values, measured from the cache's tensors.", "",
             "| row | kept KV fraction | WikiText-2 ppl | KV bytes / token |", "|---|---|---|---|"]
    for row in data["rows"]:
        if "error" in row:
            lines.append(f"| {row['row']} | — | does not run: {row['error'][:80]} | — |")
            continue
        kept = f"{row['kept_fraction']:.1%}" if "kept_fraction" in row else "—"
        lines.append(f"| {row['row']} | {kept} | {row['ppl']:.2f} | {row['kv_bytes_per_token']:.0f} |")
    for row in data["rows"]:
        if "weight_bytes" in row:
            total = row["weight_bytes"] + 4096 * row["kv_bytes_per_token"]
            lines.append(f"\n{row['row']}: weights {row['weight_bytes'] / 2**20:.1f} MiB + KV cache at 4k tokens "
                         f"{4096 * row['kv_bytes_per_token'] / 2**20:.1f} MiB = {total / 2**20:.1f} MiB")
    if data["latency"]:
        lines += ["", "| attention decode (one layer, batch 1) | context | ms / token |", "|---|---|---|"]
        lines += [f"| {r['row']} | {r['context']} | {r['ms_per_token_layer']:.3f} |" for r in data["latency"]]
    lines += ["", f"{describe(data['machine'])}.", f"Rerun: `{data['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.run = provenance("kv_cache", argv)  # recorded with every save of this run
    path = args.out / "kv_cache.json"
    args.previous = json.loads(path.read_text()) if path.is_file() else {}  # read once: the runs before this one
    store = LocalStore(args.store or args.out / "artifacts")
    rows = [] if args.latency_only else run_quality(args, store)
    latency = None if args.skip_latency else attention_latency(args, store)
    write(args, rows, latency)
    print((args.out / "kv_cache.md").read_text())


if __name__ == "__main__":
    main()
