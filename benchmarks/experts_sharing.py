"""One projection shared by every expert of a layer (`target.experts: shared`) against per-expert factors,
at the same parameter budget, on a mixture of experts upcycled from SmolLM2 — the one real model here.

The mixture (Mixtral's class): SmolLM2's embeddings, attention and norms; in every layer E experts, each
SmolLM2's MLP plus independent Gaussian noise of relative Frobenius size `--noise` on its gate, up and
down (sparse upcycling, then divergence: Mixtral-style experts are known to stay similar); a random
router (std 1/√hidden), top-k of E. Both variants run the same job (SkipCat by default, uniform ranks)
on one artifact store: the calibration and the dense evaluation run once. Per-expert factors whiten
each expert with the Gram of the tokens routed to it; the shared projection whitens with the union
Gram and stores one A per layer and a B per expert, so at the same budget it affords a higher rank.

    python -m benchmarks.experts_sharing                       # ~23 min on 2 cores (4 jobs)
    python -m benchmarks.experts_sharing --ratios 0.4 --noise 0.1 0.3
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from benchmarks.common import DATA, REPO, provenance, write_result
from rankfold.evaluation.report import metric_table
from rankfold.jobs.spec import parse_spec
from rankfold.models.sources import open_source
from rankfold.orchestrator.job import run_job


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="the dense Llama the mixture is upcycled from")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--noise", nargs="+", type=float, default=[0.1], help="experts' relative divergence")
    parser.add_argument("--method", default="skipcat")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4])
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "results" / "experts_sharing" / "work")
    parser.add_argument("--name", default="smollm2-upcycled")
    return parser.parse_args(argv)


def _diverged(weight: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """weight + Gaussian noise of Frobenius norm noise · ‖weight‖."""
    delta = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
    return weight + delta * (noise * weight.norm() / delta.norm())


def upcycle(args: argparse.Namespace, noise: float, folder: Path) -> Path:
    """The mixture as a safetensors folder (written once per setting)."""
    if (folder / "config.json").is_file():
        return folder
    source = open_source(args.model)
    dense = source.config
    config = MixtralConfig(vocab_size=dense.vocab_size, hidden_size=dense.hidden_size,
                           intermediate_size=dense.intermediate_size, num_hidden_layers=dense.num_hidden_layers,
                           num_attention_heads=dense.num_attention_heads, num_key_value_heads=dense.num_key_value_heads,
                           max_position_embeddings=dense.max_position_embeddings, rms_norm_eps=dense.rms_norm_eps,
                           rope_parameters=dense.rope_parameters, tie_word_embeddings=dense.tie_word_embeddings,
                           num_local_experts=args.experts, num_experts_per_tok=args.top_k, sliding_window=None,
                           bos_token_id=dense.bos_token_id, eos_token_id=dense.eos_token_id)
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    generator = torch.Generator().manual_seed(args.seed)
    state = {"model.embed_tokens.weight": source.embedding(), "model.norm.weight": source.final_norm()}
    if not dense.tie_word_embeddings:
        state["lm_head.weight"] = source.lm_head()
    for i in range(dense.num_hidden_layers):
        layer, prefix = source.layer_state(i), f"model.layers.{i}."
        state.update({prefix + k: v for k, v in layer.items() if not k.startswith("mlp.")})
        gate_up = [torch.cat([_diverged(layer["mlp.gate_proj.weight"], noise, generator),
                              _diverged(layer["mlp.up_proj.weight"], noise, generator)]) for _ in range(args.experts)]
        state[prefix + "mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        state[prefix + "mlp.experts.down_proj"] = torch.stack(
            [_diverged(layer["mlp.down_proj.weight"], noise, generator) for _ in range(args.experts)])
        state[prefix + "mlp.gate.weight"] = torch.randn(args.experts, dense.hidden_size, generator=generator) \
            / dense.hidden_size ** 0.5
    model.load_state_dict(state, assign=True, strict=not dense.tie_word_embeddings)
    if dense.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(folder)
    source.tokenizer().save_pretrained(folder)
    return folder


def job(args: argparse.Namespace, model: Path, ratio: float, experts: str | None, out: Path) -> dict:
    target = {"ratio": ratio} | ({"experts": experts} if experts else {})
    spec = parse_spec({
        "model": {"source": str(model)}, "method": {"name": args.method}, "target": target,
        "calibration": {"data": {"path": str(DATA / "calibration" / "enwiki_excerpt.txt")},
                        "num_samples": args.calib_samples, "seq_len": args.seq_len},
        "evaluation": {"perplexity": [{"name": "wikitext2", "window": args.window, "max_tokens": args.eval_tokens,
                                       "data": {"path": str(DATA / "wikitext2" / "wiki.test.raw"),
                                                "lines_as_rows": True}}]},
        "output": {"dir": str(out)}})
    started = time.perf_counter()
    report = run_job(spec)
    row = metric_table(report["rows"])[0]
    return {"dense": row["dense"], "compressed": row["compressed"], "wall_s": round(time.perf_counter() - started, 1),
            "achieved_compression": report["parameters"]["achieved_compression"],
            "groups_with_few_tokens": len(report["few_calibration_tokens"])}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rows = []
    for noise in args.noise:
        model = upcycle(args, noise, args.work / f"model-noise{noise}")
        for ratio in args.ratios:
            for experts in (None, "shared"):
                out = args.work / f"noise{noise}-{ratio}-{experts or 'per_expert'}"
                measured = job(args, model, ratio, experts, out)
                rows.append({"noise": noise, "ratio": ratio, "experts": experts or "per_expert", **measured})
                print(f"noise {noise} ratio {ratio} {experts or 'per_expert':10s} dense {measured['dense']:.2f} "
                      f"compressed {measured['compressed']:.2f} ({measured['wall_s']} s)", flush=True)
    result = {**provenance("experts_sharing", argv),
              "setting": {"model": args.model, "experts": args.experts, "top_k": args.top_k, "method": args.method,
                          "calibration": f"{args.calib_samples} × {args.seq_len} tokens of enwiki_excerpt",
                          "evaluation": f"WikiText-2 test, {args.eval_tokens} tokens in windows of {args.window}"},
              "rows": rows}
    write_result(args.name, result)
    return result


if __name__ == "__main__":
    main()
