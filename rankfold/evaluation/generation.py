"""Generation quality: XSum summaries by greedy decoding (transformers' `generate` with its KV cache,
on the model loaded whole: plain low rank, shared projection and skip layouts alike), scored with
`rouge-score` (ROUGE-1/2/L F-measure, Porter stemmer on, reference first), mean over documents.
Documents are split over the executor's workers; outputs come back in document order.

    evaluation:
      generation:
        - name: xsum
          data: ../shared/data/xsum/test_1000.jsonl
          limit: 200

Defaults: the prompt below (the article cut to its first `max_document_tokens` tokens), 64 new
tokens at most, generation stopped at the first newline. The first `keep_outputs` summaries are kept
in the report beside their references for a person to read.

`progressive:` decodes a compressed model with FLRC's progressive low-rank decoding (methods/plrd.py):
the active rank shrinks with the decode step, e.g. to the average decode cost of a 20 % model:

        progressive: {shape: exponential, decay_tokens: 8, target_ratio: 0.2, order: fisher}

Rows then carry the solved schedule and `decode_cost` (parameters of the compressed matrices touched
per generated token / their dense parameters). The dense variant of a job decodes as it is. A skip
layout has no nested ranks and is refused before any model loads.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from transformers import PreTrainedTokenizerBase

from rankfold.data.benchmarks import data_files, read_documents
from rankfold.data.source import TextSource
from rankfold.evaluation.documents import ModelWorkers
from rankfold.evaluation.registry import (
    EvaluationContext,
    Evaluator,
    EvaluatorOptions,
    ModelFacts,
    Row,
    register_evaluator,
)
from rankfold.methods.plrd import DecodeSchedule, check_schedule
from rankfold.modules.shared import SKIP_TRUNCATION

VERSION = f"1+rouge_score-{importlib.metadata.version('rouge_score')}"
DEFAULT_PROMPT = "Summarize the following article in one sentence.\n\nArticle: {document}\n\nOne-sentence summary:"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


class GenerationOptions(EvaluatorOptions):
    data: Path                                  # XSum jsonl {document, summary, id}
    limit: int | None = Field(200, ge=1)        # the first `limit` documents; None: all
    prompt: str = DEFAULT_PROMPT                # must hold the placeholder {document}
    max_document_tokens: int = Field(1024, ge=16)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)
    # Forward dtype of this evaluation (None: the job's model.dtype). bfloat16 is ~2-3× faster on CPU;
    # README gives its measured difference from float32.
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    keep_outputs: int = Field(5, ge=0)
    progressive: DecodeSchedule | None = None   # FLRC's PLRD (compressed models; see the module doc)

    @field_validator("prompt")
    @classmethod
    def _has_placeholder(cls, prompt: str) -> str:
        try:
            filled = prompt.format(document="\0")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"prompt {prompt!r}: only the placeholder {{document}} may appear ({err!r})") from None
        if "\0" not in filled:
            raise ValueError(f"prompt {prompt!r} has no {{document}} placeholder")
        return prompt


def prompts_of(options: GenerationOptions, tokenizer: PreTrainedTokenizerBase) -> tuple[list[str], list[str]]:
    """(prompts, reference summaries) of the first `limit` documents; articles cut to max_document_tokens."""
    docs = read_documents("xsum", options.data, options.limit)
    prompts = []
    for doc in docs:
        ids = tokenizer(doc["document"], add_special_tokens=False).input_ids[:options.max_document_tokens]
        prompts.append(options.prompt.format(document=tokenizer.decode(ids).strip()))
    return prompts, [str(doc["summary"]) for doc in docs]


def rouge(references: list[str], predictions: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (rouge-score, stemmer on; reference first, as its API expects)."""
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(ref, pred) for ref, pred in zip(references, predictions, strict=True)]
    return {kind: sum(s[kind].fmeasure for s in scores) / len(scores) for kind in ROUGE_TYPES}


def _progressive(options: GenerationOptions, context: EvaluationContext) -> dict | None:
    """The schedule to decode with: none for a dense model; ValueError for a skip layout."""
    layers = [context.layout(i) for i in range(context.num_layers)]
    if options.progressive is None or all(layer is None for layer in layers):
        return None
    if any(module.get("skip") for layer in layers for module in layer or []):
        raise ValueError(f"evaluation.generation[{options.name}].progressive: {SKIP_TRUNCATION}")
    return options.progressive.model_dump(mode="json")


def evaluate_generation(options: GenerationOptions, context: EvaluationContext) -> list[Row]:
    progressive = _progressive(options, context)
    prompts, references = prompts_of(options, context.tokenizer)
    with ModelWorkers(context, len(prompts), options.dtype) as workers:
        plan = workers.call_first("decode_plan", progressive, options.max_new_tokens) if progressive else None
        outputs = workers.map("generate", prompts, options.max_new_tokens, options.batch_size,
                              plan["ranks"] if plan else None)  # solved once, on the first worker
    kept = [{"reference": ref, "output": out} for ref, out in zip(references, outputs)][:options.keep_outputs]
    decoding = {} if plan is None else {"schedule": plan["schedule"], "decode_cost": plan["decode_cost"],
                                        "stored_cost": plan["stored_cost"]}
    return [{"metric": kind, "value": value, "documents": len(prompts), "max_new_tokens": options.max_new_tokens,
             **decoding, **({"samples": kept} if kind == "rougeL" else {})}
            for kind, value in rouge(references, outputs).items()]


def check_generation(options: GenerationOptions, facts: ModelFacts) -> None:
    """Documents readable; every prompt and its new tokens within the model's context (positions past
    it were never trained); a progressive schedule the model can decode (methods/plrd.py
    `check_schedule`) — before any model loads."""
    prompts, _ = prompts_of(options, facts.tokenizer)
    if facts.context is not None and prompts:
        lengths = [len(ids) for ids in facts.tokenizer(prompts).input_ids]  # as the workers tokenize them
        longest = max(range(len(prompts)), key=lengths.__getitem__)
        if lengths[longest] + options.max_new_tokens > facts.context:
            raise ValueError(f"document {longest}: its prompt of {lengths[longest]} tokens plus max_new_tokens = "
                             f"{options.max_new_tokens} exceeds the model's context of {facts.context} positions "
                             f"(config max_position_embeddings); lower max_document_tokens "
                             f"(now {options.max_document_tokens}) or max_new_tokens")
    decode = facts.decode() if options.progressive is not None else None
    if decode is not None:
        check_schedule(options.progressive, decode.units, options.max_new_tokens, gains=decode.gains,
                       slack=decode.slack)


register_evaluator(Evaluator("generation", GenerationOptions, evaluate_generation, VERSION,
                             inputs=lambda options: [TextSource(path=p) for p in data_files("xsum", options.data, options.limit)],
                             check=check_generation))
