"""Greedy tokens of exported folders in vLLM (run with the vLLM venv's Python; no rankfold there):
`python vllm_greedy.py JOBS.json` with JOBS [{folder, prompts: [token ids], new_tokens, out}]."""

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    for job in json.loads(open(sys.argv[1]).read()):
        llm = LLM(job["folder"], dtype="float32", trust_remote_code=True, enforce_eager=True,
                  gpu_memory_utilization=0.25, max_model_len=256, seed=0)
        params = SamplingParams(max_tokens=job["new_tokens"], temperature=0.0, ignore_eos=True)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params, use_tqdm=False)
        open(job["out"], "w").write(json.dumps([list(o.outputs[0].token_ids) for o in outputs]))
        del llm


if __name__ == "__main__":  # vLLM starts its workers with spawn
    main()
