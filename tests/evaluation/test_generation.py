"""Generation: rouge-score's ROUGE, and the evaluator's greedy decoding equal to `model.generate` on
the same prompt for every compressed layout (plain low rank, shared projection + skip)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rankfold.evaluation.generation import DEFAULT_PROMPT, GenerationOptions, prompts_of, rouge


def test_rouge_l_of_a_known_pair():
    """LCS('the cat sat on the mat', 'the cat lay on the mat') = 5 of 6 tokens each way: F = 5/6."""
    from rouge_score.rouge_scorer import RougeScorer

    reference, prediction = "The cat sat on the mat.", "the cat lay on the mat"
    scores = rouge([reference], [prediction])
    assert scores["rougeL"] == pytest.approx(5 / 6)
    expected = RougeScorer(["rougeL", "rouge2"], use_stemmer=True).score(reference, prediction)
    assert scores["rougeL"] == expected["rougeL"].fmeasure and scores["rouge2"] == expected["rouge2"].fmeasure
    assert rouge(["cats running"], ["cat runs"])["rouge1"] == 1.0  # the stemmer is on


@pytest.mark.parametrize("prompt", ["Summarize: {doc}", "Summarize the article.", "{document} {0}"])
def test_prompt_needs_the_placeholder(prompt):
    with pytest.raises(ValidationError, match="prompt"):
        GenerationOptions(name="x", data="x.jsonl", prompt=prompt)


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory):
    """Tiny compressed checkpoints of three layouts: svd (plain low rank), skipcat (shared + skip) and
    palu (svd weights + a 4-bit latent KV cache)."""

    from rankfold.jobs.spec import parse_spec
    from rankfold.orchestrator.job import run_job
    from tests.conftest import tiny_spec_dict

    out = {}
    for method in ("svd", "skipcat", "palu"):
        spec = tiny_spec_dict(tiny_model_dir, tmp_path_factory.mktemp(method), "svd" if method == "palu" else method)
        spec["evaluation"] = {"dense": False}
        if method == "palu":
            spec["target"]["matrices"] = ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            spec["kv_cache"] = {"ratio": 0.5, "rank_search": "uniform", "bits": 4, "quant_group": 8, "residual": 2}
        out[method] = run_job(parse_spec(spec))["checkpoint"]
    return out


@pytest.mark.parametrize("method", ["svd", "skipcat", "palu"])
def test_greedy_generation_equals_model_generate(method, checkpoints, shared_data):
    import rankfold
    from rankfold.workers.lm import ModelWorker, first_line

    worker = ModelWorker(checkpoints[method], "float32")
    options = GenerationOptions(name="xsum", data=shared_data / "xsum" / "test_1000.jsonl", limit=3,
                                max_document_tokens=48, max_new_tokens=6)
    prompts, _ = prompts_of(options, worker.tokenizer)
    assert prompts[0].startswith(DEFAULT_PROMPT.split("{document}")[0])
    ours = worker.generate(prompts, options.max_new_tokens, batch_size=1)
    model = rankfold.load(checkpoints[method])
    assert any("LowRank" in type(m).__name__ for m in model.modules())
    assert any(type(m).__name__ == "LatentKVAttention" for m in model.modules()) == (method == "palu")
    for prompt, text in zip(prompts, ours):
        ids = worker.tokenizer(prompt, return_tensors="pt").input_ids
        reference = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert text == first_line(worker.tokenizer.decode(reference[0, ids.shape[1]:], skip_special_tokens=True))
