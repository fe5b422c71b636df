"""Load exported folders in a Python where `import rankfold` fails, as a user without rankfold would:
`python load_without_rankfold.py JOBS.json TOKENS.pt PROMPT NEW_TOKENS`. For each job {folder, out}
it writes `out`: the logits on the tokens, greedy tokens after the first PROMPT tokens of row 0, and
whether any rankfold module was imported."""

import importlib.abc
import json
import sys


class _NoRankfold(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "rankfold" or name.startswith("rankfold."):
            raise ImportError(f"rankfold is not installed here (blocked: {name})")
        return None


sys.meta_path.insert(0, _NoRankfold())

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def main() -> None:
    jobs, tokens = json.load(open(sys.argv[1])), torch.load(sys.argv[2], weights_only=True)
    prompt, new = int(sys.argv[3]), int(sys.argv[4])
    for job in jobs:
        model = AutoModelForCausalLM.from_pretrained(job["folder"], trust_remote_code=True, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(tokens).logits
            generated = model.generate(tokens[:1, :prompt], max_new_tokens=new, do_sample=False, pad_token_id=0)
        imported = any(name == "rankfold" or name.startswith("rankfold.") for name in sys.modules)
        torch.save({"logits": logits, "generated": generated, "rankfold_imported": imported}, job["out"])


if __name__ == "__main__":
    main()
