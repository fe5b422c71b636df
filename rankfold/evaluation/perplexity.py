"""Perplexity over non-overlapping windows, streamed: the windows are split over the executor's
workers, each pushes its share through one layer at a time (never the whole model in memory); the
summed next-token NLL is reduced on the driver.

    evaluation: {perplexity: [{name: wikitext2, data: {path: wiki.test.raw, lines_as_rows: true},
                               window: 2048, max_tokens: 32768}]}
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from transformers import PreTrainedTokenizerBase

from rankfold.core.errors import NumericalError
from rankfold.data.source import TextSource
from rankfold.data.text import load_text, tokenize
from rankfold.evaluation.registry import (
    EvaluationContext,
    Evaluator,
    EvaluatorOptions,
    ModelFacts,
    Row,
    register_evaluator,
)
from rankfold.execution.streaming import stream_shards
from rankfold.workers.shard import ShardConfig
from rankfold.workers.streamed_perplexity import make_windows

VERSION = "1"
RESIDENT_BYTES = 2 << 30  # activations held per evaluation before spilling to scratch


class PerplexityOptions(EvaluatorOptions):
    data: TextSource
    # Non-overlapping windows of this many tokens.
    window: int = Field(2048, ge=8)
    # Token budget: evaluate the first max_tokens tokens (whole windows); None = the whole text.
    max_tokens: int | None = Field(32768, ge=8)
    batch_size: int = Field(1, ge=1)


def windows_of(options: PerplexityOptions, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """(count, window) token ids; ValueError when the text holds less than one window."""
    return make_windows(tokenize(load_text(options.data), tokenizer), options.window, options.max_tokens)


def evaluate_perplexity(options: PerplexityOptions, context: EvaluationContext) -> list[Row]:
    windows = windows_of(options, context.tokenizer)
    config = ShardConfig(context.location, context.dtype, RESIDENT_BYTES, str(context.scratch))
    shards = stream_shards(context.executor, config, windows, options.batch_size, context.label,
                           context.num_layers, layout=context.layout)
    try:
        parts = context.executor.call_all(shards.shards, "nll")
    finally:
        shards.release()
    total, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
    value = float(torch.exp(torch.tensor(total / count, dtype=torch.float64)))
    if not math.isfinite(value):
        raise NumericalError(f"{context.label}: perplexity is {value} (non-finite logits under model.dtype "
                             f"{context.dtype}): try bfloat16 or float32")
    return [{"metric": "perplexity", "value": value, "window": options.window, "tokens": windows.numel(),
             "windows": windows.shape[0]}]


def check_windows(options: PerplexityOptions, facts: ModelFacts) -> None:
    """A window within the model's context (positions past it were never trained: a number that means
    nothing), and a text that holds at least one window."""
    if facts.context is not None and options.window > facts.context:
        raise ValueError(f"window = {options.window} tokens exceeds the model's context of {facts.context} "
                         "positions (config max_position_embeddings); choose a window ≤ the context")
    windows_of(options, facts.tokenizer)  # raises when the text holds less than one window


register_evaluator(Evaluator("perplexity", PerplexityOptions, evaluate_perplexity, VERSION,
                             inputs=lambda options: [options.data], check=check_windows))
